"""
curvetun: encrypted, mutually authenticated message tunnels over TCP for
Twisted, speaking the curve_tun wire protocol v1.0 (a CurveCP-style
handshake over length-prefixed TCP frames).

The public API, importable from here:

  - endpoints: L{CurveTunServerEndpoint}, L{CurveTunClientEndpoint},
    L{client_from_string} (and the C{curvetun:} endpoint strings, through
    Twisted's C{serverFromString}/C{clientFromString});
  - the message API: L{connect}, L{listen}, L{MessageChannel},
    L{MessageListener};
  - identities: L{CurveTunService}, L{FileVault}, L{MemoryVault},
    L{FileRegistry}, L{Registry}, and the interfaces L{IVault},
    L{IRegistry}, L{ICurveTunTransport};
  - errors: L{CurveTunError} and its subclasses.

Everything else is an implementation module: importable, documented, but
not a promise. Names load on first use (PEP 562), so that a program that
needs one part (the C{curvetun} key commands, say) does not import the
whole protocol stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "CurveTunServerEndpoint": "endpoints",
    "CurveTunClientEndpoint": "endpoints",
    "client_from_string": "endpoints",
    "connect": "channel",
    "listen": "channel",
    "MessageChannel": "channel",
    "MessageListener": "channel",
    "CurveTunService": "service",
    "FileVault": "vault",
    "MemoryVault": "vault",
    "FileRegistry": "registry",
    "Registry": "registry",
    "IVault": "interfaces",
    "IRegistry": "interfaces",
    "ICurveTunTransport": "interfaces",
    "CurveTunError": "errors",
    "BadPacket": "errors",
    "HandshakeFailed": "errors",
    "ServerKeyMismatch": "errors",
    "NotAuthorized": "errors",
    "HandshakeTimeout": "errors",
    "IdleTimeout": "errors",
    "MessageTooLong": "errors",
    "ConnectionClosed": "errors",
    "KeyFileError": "errors",
    "RegistryError": "errors",
}

__all__ = [
    "BadPacket",
    "ConnectionClosed",
    "CurveTunClientEndpoint",
    "CurveTunError",
    "CurveTunServerEndpoint",
    "CurveTunService",
    "FileRegistry",
    "FileVault",
    "HandshakeFailed",
    "HandshakeTimeout",
    "ICurveTunTransport",
    "IRegistry",
    "IVault",
    "IdleTimeout",
    "KeyFileError",
    "MemoryVault",
    "MessageChannel",
    "MessageListener",
    "MessageTooLong",
    "NotAuthorized",
    "Registry",
    "RegistryError",
    "ServerKeyMismatch",
    "__version__",
    "client_from_string",
    "connect",
    "listen",
]

if TYPE_CHECKING:
    from .channel import MessageChannel, MessageListener, connect, listen
    from .endpoints import CurveTunClientEndpoint, CurveTunServerEndpoint, client_from_string
    from .errors import (
        BadPacket,
        ConnectionClosed,
        CurveTunError,
        HandshakeFailed,
        HandshakeTimeout,
        IdleTimeout,
        KeyFileError,
        MessageTooLong,
        NotAuthorized,
        RegistryError,
        ServerKeyMismatch,
    )
    from .interfaces import ICurveTunTransport, IRegistry, IVault
    from .registry import FileRegistry, Registry
    from .service import CurveTunService
    from .vault import FileVault, MemoryVault


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'curvetun' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
