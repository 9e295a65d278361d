"""
Draw the connection state machines of curvetun.connection as Graphviz
diagrams: docs/server-machine.svg and docs/client-machine.svg.

Edges between the same two states are merged into one, labelled with every
input that takes it; the closed state's self-loops (it ignores everything)
are left out. Run from the project root, with curvetun importable:
PYTHONPATH=. python docs/make_diagrams.py (needs Graphviz's dot on the
PATH). tests/test_docs.py checks that the .dot files are up to date.
"""

from __future__ import annotations

import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

from curvetun.connection import ClientMachine, ServerMachine

DOCS = Path(__file__).parent


def to_dot(name: str, machine: Any) -> str:
    automaton = machine.__automat_automaton__
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for old, input, new, _outputs in sorted(
        automaton.allTransitions(), key=lambda t: (t[0].name, t[1])
    ):
        if old.name == "closed" and new.name == "closed":
            continue
        edges[old.name, new.name].append(input)
    lines = [
        f'digraph "{name}" {{',
        "  rankdir=LR;",
        '  node [shape=ellipse, fontname="Helvetica"];',
        '  edge [fontname="Helvetica", fontsize=10];',
        f"  {automaton.initialState.name} [style=bold];",
    ]
    for (old, new), inputs in edges.items():
        label = "\\n".join(inputs)
        lines.append(f'  {old} -> {new} [label="{label}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def main() -> None:
    for name, machine in (("server", ServerMachine), ("client", ClientMachine)):
        dot = to_dot(f"curvetun {name} connection", machine)
        (DOCS / f"{name}-machine.dot").write_text(dot)
        svg = subprocess.run(
            ["dot", "-Tsvg"], input=dot.encode(), capture_output=True, check=True
        ).stdout
        (DOCS / f"{name}-machine.svg").write_bytes(svg)


if __name__ == "__main__":
    main()
