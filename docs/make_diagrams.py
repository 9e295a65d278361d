"""
Draw the connection state machines of curvetun.connection as Graphviz
diagrams: docs/server-machine.dot and .svg, docs/client-machine.dot and .svg.

The drawing is Automat's own (C{TypeMachine.asDigraph()}, its public API:
each transition a box with its input above its outputs), put in a stable
order: Automat numbers the transition boxes in the order of a set, which
changes from run to run. Run from the project root, with curvetun
importable and the C{visualize} extra installed:
C{PYTHONPATH=. python docs/make_diagrams.py} (the SVGs need Graphviz's
C{dot} on the PATH). tests/test_docs.py checks that the .dot files are up
to date.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from curvetun.connection import ClientMachine, ServerMachine

DOCS = Path(__file__).parent

MACHINES: dict[str, Any] = {"server": ServerMachine, "client": ClientMachine}

_STATE = re.compile(r"\t(?P<name>\w+) \[.*shape=ellipse.*\]\n")
_BOX = re.compile(r"\t(?P<box>t\d+) \[label=(?P<label><.*>) margin=0\.2 shape=none\]\n")
_INTO = re.compile(r"\t(?P<old>\w+) -> (?P<box>t\d+):tableport:w \[arrowhead=none\]\n")
_OUT_OF = re.compile(r"\t(?P<box>t\d+):tableport:e -> (?P<new>\w+)\n")


def to_dot(name: str, machine: Any) -> str:
    """
    The Graphviz source of C{machine}'s diagram, titled C{name}.

    @raise ValueError: Automat's drawing no longer has the shape this
        expects (a node per state, and a box and two edges per transition):
        look at what changed before regenerating.
    """
    digraph = machine.asDigraph()
    states: dict[str, str] = {}
    labels: dict[str, str] = {}
    old: dict[str, str] = {}
    new: dict[str, str] = {}
    for line in digraph.body:
        if match := _STATE.fullmatch(line):
            states[match["name"]] = line
        elif match := _BOX.fullmatch(line):
            labels[match["box"]] = match["label"]
        elif match := _INTO.fullmatch(line):
            old[match["box"]] = match["old"]
        elif match := _OUT_OF.fullmatch(line):
            new[match["box"]] = match["new"]
        else:
            raise ValueError(f"unexpected line in Automat's diagram: {line!r}")
    if not (set(labels) == set(old) == set(new)):
        raise ValueError("Automat's diagram has transitions without both ends")
    transitions = sorted((old[box], labels[box], new[box]) for box in labels)
    body = [states[state] for state in sorted(states)]
    for number, (before, label, after) in enumerate(transitions):
        box = f"t{number}"
        body += [
            f"\t{box} [label={label} margin=0.2 shape=none]\n",
            f"\t{before} -> {box}:tableport:w [arrowhead=none]\n",
            f"\t{box}:tableport:e -> {after}\n",
        ]
    digraph.body[:] = body
    digraph.name = name
    source: str = digraph.source
    return source


def main() -> None:
    for name, machine in MACHINES.items():
        dot = to_dot(f"curvetun {name} connection", machine)
        (DOCS / f"{name}-machine.dot").write_text(dot)
        (DOCS / f"{name}-machine.svg").write_bytes(_render(dot))


def _render(dot: str) -> bytes:
    import graphviz

    rendered: bytes = graphviz.Source(dot).pipe(format="svg")
    return rendered


if __name__ == "__main__":
    main()
