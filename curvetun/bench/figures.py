"""
The benchmark's figures, the goals they are measured against, and the
report that holds what one run measured.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import attrs

TRANSPORTS = ("tcp", "tls", "curvetun", "curvetun-memory")
"""
The transports compared, in table order: C{curvetun} runs through endpoint
strings with a key directory on each side, as applications use it;
C{curvetun-memory} with in-memory identities (no key files).
"""

STREAM_CHUNK = 65503
"""
Bytes per application write in the bulk figure: the most one curvetun
message carries (C{curvetun.packets.MAX_MESSAGE}).
"""

SMALL = 100
"""
Bytes per write in the ping-pong, pipelined and handshake figures.
"""

HANDSHAKE_CLIENTS = 8
"""
Concurrent clients in the concurrent-handshakes figure.
"""

MEMORY_CONCURRENCY = 16
"""
Connections opened at a time while filling the server for the memory
figure (below Twisted's default listen backlog of 50).
"""

TLS_SKIPPED = "TLS: skipped (install curvetun[bench])"
"""
What the report says when pyOpenSSL or service_identity is missing.
"""

LOCALHOST = "127.0.0.1"
"""
Where every server listens.
"""

READY_LINE = "curvetun-bench-server"
"""
The first word of a server process's first line.
"""


class BenchError(Exception):
    """
    The benchmark could not run: a server did not start, a measurement
    failed or took far too long. The message says which.
    """


# -- figures and targets ---------------------------------------------------------


@attrs.frozen
class Figure:
    """
    One measured figure.

    @ivar key: its name in C{--json} output.
    @ivar group: the C{--only} name that selects it.
    @ivar title: its row label.
    @ivar unit: the unit of its values.
    @ivar higher_is_better: false for costs (memory).
    @ivar columns: the transports it applies to (L{None}: all); in-process
        figures have the single column C{"pynacl"}.
    """

    key: str
    group: str
    title: str
    unit: str
    higher_is_better: bool = True
    columns: tuple[str, ...] | None = None

    @property
    def in_process(self) -> bool:
        """
        Is this a crypto-ceiling figure, measured without any network?
        """
        return self.columns == (CRYPTO_COLUMN,)

    def applies_to(self, column: str) -> bool:
        """
        Is this figure measured for C{column} (a transport, or
        C{"pynacl"})?
        """
        if self.columns is None:
            return column in TRANSPORTS
        return column in self.columns


CRYPTO_COLUMN = "pynacl"
"""
The column of the in-process crypto figures.
"""

FIGURES = (
    Figure("bulk", "bulk", "bulk one-way, 65503-byte writes", "MB/s"),
    Figure("pingpong", "pingpong", "ping-pong, 100 B, one connection", "round trips/s"),
    Figure("pipelined_stream", "pipelined", "pipelined 100 B writes, stream", "writes/s"),
    Figure(
        "pipelined_message",
        "pipelined",
        "pipelined 100 B messages (write_message)",
        "messages/s",
        columns=("curvetun", "curvetun-memory"),
    ),
    Figure("handshakes", "handshakes", "handshakes, sequential", "handshakes/s"),
    Figure(
        "handshakes_concurrent",
        "handshakes",
        f"handshakes, {HANDSHAKE_CLIENTS} concurrent clients",
        "handshakes/s",
    ),
    Figure(
        "idle_memory",
        "memory",
        "server memory per idle connection",
        "KiB/conn",
        higher_is_better=False,
    ),
    Figure("box_100", "crypto", "box 100 B", "boxes/s", columns=(CRYPTO_COLUMN,)),
    Figure("open_100", "crypto", "open 100 B", "opens/s", columns=(CRYPTO_COLUMN,)),
    Figure("box_65503", "crypto", "box 65503 B", "boxes/s", columns=(CRYPTO_COLUMN,)),
    Figure("open_65503", "crypto", "open 65503 B", "opens/s", columns=(CRYPTO_COLUMN,)),
    Figure(
        "x25519",
        "crypto",
        "X25519 (crypto_box_beforenm)",
        "ops/s",
        columns=(CRYPTO_COLUMN,),
    ),
)
"""
Every figure, in the order measured and shown.
"""

GROUPS = tuple(dict.fromkeys(figure.group for figure in FIGURES))
"""
The names C{--only} accepts.
"""

FIGURES_BY_KEY = {figure.key: figure for figure in FIGURES}


@attrs.frozen
class Summary:
    """
    The runs of one figure on one column: their median, minimum and
    maximum.
    """

    median: float
    low: float
    high: float
    runs: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        """
        Summarize C{values} (at least one).
        """
        if not values:
            raise ValueError("no values to summarize")
        return cls(statistics.median(values), min(values), max(values), tuple(values))


def summary_json(summary: Summary | None) -> dict[str, Any] | None:
    """
    A summary as the C{--json} reports of every mode write it (L{None}:
    not measured).
    """
    if summary is None:
        return None
    return {
        "median": summary.median,
        "min": summary.low,
        "max": summary.high,
        "runs": list(summary.runs),
    }


@attrs.define
class Report:
    """
    Everything one benchmark run measured, and what it was run on.

    @ivar samples: per figure key, per column, the value of each run.
    @ivar transports: the transports measured.
    @ivar skipped: per transport left out, why.
    @ivar figures: the figures measured.
    @ivar environment: versions, machine and date.
    @ivar argv: the command line, as given to L{main}.
    @ivar tls: the negotiated TLS version and cipher, when TLS ran.
    """

    transports: tuple[str, ...]
    figures: tuple[Figure, ...]
    runs: int
    quick: bool
    argv: list[str]
    environment: dict[str, str]
    skipped: dict[str, str] = attrs.field(factory=dict)
    samples: dict[str, dict[str, list[float]]] = attrs.field(factory=dict)
    tls: str = ""
    seconds: float = 0.0

    def add(self, figure: Figure, column: str, value: float) -> None:
        """
        Record one run's value.
        """
        self.samples.setdefault(figure.key, {}).setdefault(column, []).append(value)

    def summary(self, key: str, column: str) -> Summary | None:
        """
        The summary of figure C{key} on C{column}, if it was measured.
        """
        values = self.samples.get(key, {}).get(column)
        return Summary.of(values) if values else None

    def ratio(self, key: str, over: str) -> float | None:
        """
        curvetun's median over C{over}'s median for figure C{key}, if both
        were measured.
        """
        mine = self.summary(key, "curvetun")
        theirs = self.summary(key, over)
        if mine is None or theirs is None or theirs.median == 0:
            return None
        return mine.median / theirs.median

    def crypto_ceiling_100(self) -> float | None:
        """
        Messages per second that PyNaCl allows at 100 bytes when the
        sender boxes in one process and the receiver opens in another (on
        another core): the slower of box and open.
        """
        box = self.summary("box_100", CRYPTO_COLUMN)
        opened = self.summary("open_100", CRYPTO_COLUMN)
        if box is None or opened is None:
            return None
        return min(box.median, opened.median)


@attrs.frozen
class Target:
    """
    A performance goal: curvetun's median of C{figure}, over a reference,
    at least (or, with C{at_most}, at most) C{goal}.

    @ivar reference: C{"tcp"} or C{"tls"} (that transport's median),
        C{"crypto"} (L{Report.crypto_ceiling_100}), or C{""} (the value
        itself).
    """

    figure: str
    reference: str
    goal: float
    label: str
    at_most: bool = False

    def measure(self, report: Report) -> float | None:
        """
        The measured ratio (or value), if everything it needs was measured.
        """
        if self.reference in TRANSPORTS:
            return report.ratio(self.figure, self.reference)
        mine = report.summary(self.figure, "curvetun")
        if mine is None:
            return None
        if self.reference == "crypto":
            ceiling = report.crypto_ceiling_100()
            return None if not ceiling else mine.median / ceiling
        return mine.median

    def met(self, measured: float) -> bool:
        """
        Does C{measured} meet the goal?
        """
        return measured <= self.goal if self.at_most else measured >= self.goal


TARGETS = (
    Target("pingpong", "tcp", 0.85, "ping-pong >= 0.85 x TCP"),
    Target("pingpong", "tls", 1.4, "ping-pong >= 1.4 x TLS"),
    Target("bulk", "tls", 1.0, "bulk >= 1.0 x TLS"),
    Target("bulk", "tcp", 0.5, "bulk >= 0.5 x TCP"),
    Target("pipelined_stream", "tls", 1.0, "pipelined stream writes >= 1.0 x TLS"),
    Target(
        "pipelined_message",
        "crypto",
        0.6,
        "pipelined messages >= 0.6 x crypto ceiling (100 B)",
    ),
    Target("handshakes", "tls", 3.0, "handshakes, sequential >= 3 x TLS"),
    Target(
        "handshakes_concurrent",
        "tls",
        3.0,
        f"handshakes, {HANDSHAKE_CLIENTS} concurrent >= 3 x TLS",
    ),
    Target("idle_memory", "", 4.0, "idle memory per connection <= 4 KiB", at_most=True),
)
"""
The goals the data path is tuned against (see C{docs/performance.md}).
"""


@attrs.frozen
class TargetResult:
    """
    One target, as measured: C{measured} and C{met} are L{None} when the
    figures it needs were not measured.
    """

    target: Target
    measured: float | None
    met: bool | None


def evaluate_targets(report: Report) -> list[TargetResult]:
    """
    Check every target against C{report}.
    """
    results = []
    for target in TARGETS:
        measured = target.measure(report)
        met = None if measured is None else target.met(measured)
        results.append(TargetResult(target, measured, met))
    return results


# -- the tunnel comparison (--tunnel) ------------------------------------------------

TUNNELS = ("direct", "spiped", "stunnel", "curvetun")
"""
The columns of the tunnel comparison, in table order: no tunnel (the
ceiling), then each tunnel.
"""

TUNNEL_ENDS = ("spiped", "stunnel", "curvetun")
"""
The columns that have two tunnel-end processes.
"""

TUNNEL_FIGURES = (
    Figure("bulk", "bulk", "bulk through the tunnel, 65503-byte writes", "MB/s", columns=TUNNELS),
    Figure(
        "pingpong", "pingpong", "ping-pong 100 B, one connection", "round trips/s", columns=TUNNELS
    ),
    Figure(
        "pingpong_added",
        "pingpong",
        "time each round trip adds over direct",
        "µs",
        higher_is_better=False,
        columns=TUNNEL_ENDS,
    ),
    Figure(
        "connections",
        "connections",
        "new connections, sequential (full handshakes)",
        "connections/s",
        columns=TUNNELS,
    ),
    Figure(
        "connections_concurrent",
        "connections",
        f"new connections, {HANDSHAKE_CLIENTS} at once",
        "connections/s",
        columns=TUNNELS,
    ),
    Figure(
        "cpu_per_connection",
        "connections",
        "CPU per connection, both ends (sequential)",
        "ms",
        higher_is_better=False,
        columns=TUNNEL_ENDS,
    ),
    Figure(
        "idle_memory",
        "memory",
        "memory per idle connection, both ends",
        "KiB/conn",
        higher_is_better=False,
        columns=TUNNEL_ENDS,
    ),
)
"""
The figures of C{--tunnel}, in the order shown.
"""

TUNNEL_GROUPS = tuple(dict.fromkeys(figure.group for figure in TUNNEL_FIGURES))

TUNNEL_FIGURES_BY_KEY = {figure.key: figure for figure in TUNNEL_FIGURES}


# -- worker scaling (--workers) ------------------------------------------------------

SCALE_HANDSHAKE_LOOPS = 4
"""
Handshake loops each client process of C{--workers} keeps going (each:
connect, 100 bytes echoed, close, again): with the default client
processes, at most 16 handshakes in flight from 127.0.0.1, half the
server's default C{--max-handshakes-per-address} (32), which is counted
per worker process.
"""

SCALE_BULK_CONNECTIONS = 2
"""
Bulk connections each client process of C{--workers} keeps writing to.
"""

SCALE_FIGURES = (
    Figure("handshakes", "handshakes", "handshakes (connect, 100 B echoed, close)", "handshakes/s"),
    Figure(
        "cpu_per_handshake",
        "handshakes",
        "server CPU per handshake (every server process)",
        "ms",
        higher_is_better=False,
    ),
    Figure(
        "server_cpu_handshakes",
        "handshakes",
        "server CPU during handshakes (every server process)",
        "% of a core",
        higher_is_better=False,
    ),
    Figure(
        "client_cpu_handshakes",
        "handshakes",
        "client CPU during handshakes (every client process)",
        "% of a core",
        higher_is_better=False,
    ),
    Figure(
        "busiest_client_handshakes",
        "handshakes",
        "busiest client process during handshakes",
        "% of a core",
        higher_is_better=False,
    ),
    Figure(
        "server_wait_handshakes",
        "handshakes",
        "server waiting for a CPU during handshakes",
        "% of the time",
        higher_is_better=False,
    ),
    Figure(
        "client_wait_handshakes",
        "handshakes",
        "clients waiting for a CPU during handshakes",
        "% of the time",
        higher_is_better=False,
    ),
    Figure("bulk", "bulk", "bulk echoed, 65503-byte writes", "MB/s"),
    Figure(
        "cpu_per_mb",
        "bulk",
        "server CPU per MB echoed (every server process)",
        "ms",
        higher_is_better=False,
    ),
    Figure(
        "server_cpu_bulk",
        "bulk",
        "server CPU during bulk (every server process)",
        "% of a core",
        higher_is_better=False,
    ),
    Figure(
        "client_cpu_bulk",
        "bulk",
        "client CPU during bulk (every client process)",
        "% of a core",
        higher_is_better=False,
    ),
    Figure(
        "busiest_client_bulk",
        "bulk",
        "busiest client process during bulk",
        "% of a core",
        higher_is_better=False,
    ),
    Figure(
        "server_wait_bulk",
        "bulk",
        "server waiting for a CPU during bulk",
        "% of the time",
        higher_is_better=False,
    ),
    Figure(
        "client_wait_bulk",
        "bulk",
        "clients waiting for a CPU during bulk",
        "% of the time",
        higher_is_better=False,
    ),
)
"""
The figures of C{--workers}, in the order shown; each is measured with
one server worker and with N.
"""

SCALE_GROUPS = tuple(dict.fromkeys(figure.group for figure in SCALE_FIGURES))

SCALE_FIGURES_BY_KEY = {figure.key: figure for figure in SCALE_FIGURES}
