"""
Load the known-answer vectors in C{tests/vectors/} (see their README).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load(name: str) -> dict[str, Any]:
    """
    Read the vector file C{name} (for example C{"handshake.json"}).
    """
    path = Path(__file__).parent / "vectors" / name
    with path.open(encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data


def unhex(value: str) -> bytes:
    """
    Decode a lowercase hex string from a vector file.
    """
    return bytes.fromhex(value)
