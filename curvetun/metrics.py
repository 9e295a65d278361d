"""
What C{twist curvetun --metrics} reports, read from the live state of the
tunnels when it is asked for, never sampled in between.

  - L{ListenerFigures} follows one server factory (one curvetun listen
    endpoint) through its public callbacks: the connections it has
    established and not yet ended, the outcome of every handshake, and the
    application bytes of the connections that have ended, so that the byte
    counters include them (and never go back when a connection ends).
  - L{Observer} finds the server factories of the tunnels' identities as
    they are made (L{CurveTunService.server_factory_callbacks}) and answers
    the three questions of the monitoring endpoint: the figures of each
    tunnel (L{Observer.figures}), the status document (L{Observer.status},
    whose schema is L{curvetun.status}), and whether the process can serve
    (L{Observer.health}).
  - L{Figures} is one tunnel's figures as plain numbers: figures add up
    (L{sum_figures}) and go to and from JSON (L{Figures.as_json},
    L{Figures.from_json}), so that a supervisor of several worker
    processes can ask each for its figures and serve their sum.
  - L{CurveTunCollector} is a C{prometheus_client} collector whose
    C{collect()} turns the figures of the moment into metric families,
    with a C{tunnel} label; L{curvetun.monitoring} serves them.

Only the connections that curvetun listen endpoints accept are counted;
the outgoing connections of a tunnel that forwards to a C{curvetun:}
endpoint are the remote server's to count.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import attrs
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from . import __version__
from .addresses import format_address
from .admission import FAILURE_LABELS, failure_label
from .config import LIMITS
from .errors import AdmissionRefused, CurveTunError
from .factories import CurveTunServerFactory
from .transport import CurveTunProtocol

if TYPE_CHECKING:
    from .tunnel_service import Identity, TunnelService

HANDSHAKE_RESULTS: tuple[str, ...] = ("ok", *FAILURE_LABELS)
"""
The values of the C{result} label of C{curvetun_handshakes_total}: C{ok},
then every L{curvetun.admission.failure_label}. Each is reported from the
start, at 0, so that a rate over a new value needs no special case.
"""

REFUSAL_LIMITS: tuple[str, ...] = tuple(LIMITS)
"""
The values of the C{limit} label of C{curvetun_connections_refused_total}:
the limits of L{curvetun.admission.ConnectionLimits} (C{connections},
C{handshakes_per_address}, ...).
"""


def _zeros(labels: Iterable[str]) -> dict[str, int]:
    return dict.fromkeys(labels, 0)


@attrs.define
class Figures:
    """
    One tunnel's figures at one moment (or the sum of several processes').

    @ivar handshakes: handshakes since the start, by result (see
        L{HANDSHAKE_RESULTS}); connections refused at a limit are not
        handshakes, they are counted in C{refused}.
    @ivar connections: established connections now.
    @ivar handshakes_in_progress: handshakes not yet complete now.
    @ivar bytes_received: application bytes received from peers since the
        start, over ended and live connections.
    @ivar bytes_sent: the same, sent to peers.
    @ivar refused: connections refused at accept since the start, by limit
        (see L{REFUSAL_LIMITS}).
    """

    handshakes: dict[str, int] = attrs.field(factory=lambda: _zeros(HANDSHAKE_RESULTS))
    connections: int = 0
    handshakes_in_progress: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    refused: dict[str, int] = attrs.field(factory=lambda: _zeros(REFUSAL_LIMITS))

    def add(self, other: Figures) -> None:
        """
        Add C{other}'s figures to these.
        """
        for result, count in other.handshakes.items():
            self.handshakes[result] = self.handshakes.get(result, 0) + count
        for limit, count in other.refused.items():
            self.refused[limit] = self.refused.get(limit, 0) + count
        self.connections += other.connections
        self.handshakes_in_progress += other.handshakes_in_progress
        self.bytes_received += other.bytes_received
        self.bytes_sent += other.bytes_sent

    def as_json(self) -> dict[str, Any]:
        """
        These figures as a JSON object (for a supervisor to sum).
        """
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, document: object) -> Figures:
        """
        The figures of a JSON object made by L{as_json}.

        @raise ValueError: C{document} is not one.
        """
        if not isinstance(document, dict):
            raise ValueError("figures must be a JSON object")

        def count(value: object, name: str) -> int:
            if type(value) is not int or value < 0:
                raise ValueError(f"figure {name!r} must be a non-negative whole number")
            return value

        def counts(name: str) -> dict[str, int]:
            value = document.get(name, {})
            if not isinstance(value, dict):
                raise ValueError(f"figure {name!r} must be a JSON object")
            return {str(key): count(n, f"{name}.{key}") for key, n in value.items()}

        figures = cls()
        figures.add(
            cls(
                handshakes=counts("handshakes"),
                refused=counts("refused"),
                **{
                    name: count(document.get(name, 0), name)
                    for name in (
                        "connections",
                        "handshakes_in_progress",
                        "bytes_received",
                        "bytes_sent",
                    )
                },
            )
        )
        return figures


def sum_figures(documents: Iterable[Mapping[str, Figures]]) -> dict[str, Figures]:
    """
    The figures of several processes (each a mapping from tunnel name to
    L{Figures}) summed per tunnel, in the order the tunnels first appear.
    """
    total: dict[str, Figures] = {}
    for document in documents:
        for tunnel, figures in document.items():
            total.setdefault(tunnel, Figures()).add(figures)
    return total


class ListenerFigures:
    """
    Follows the connections of one server factory through its
    C{established_callbacks} and C{ended_callbacks}.

    @ivar factory: the factory.
    @ivar live: the established connections that have not ended, oldest
        first.
    @ivar handshakes: handshakes that ended, by result (C{"ok"} when
        established); connections refused at accept are not counted here,
        the factory's admission counts them.
    """

    def __init__(self, factory: CurveTunServerFactory) -> None:
        self.factory = factory
        self.live: dict[CurveTunProtocol, None] = {}
        self.handshakes: Counter[str] = Counter()
        self._ended_bytes_received = 0
        self._ended_bytes_sent = 0
        factory.established_callbacks.append(self._established)
        factory.ended_callbacks.append(self._ended)

    def _established(self, protocol: CurveTunProtocol) -> None:
        self.handshakes["ok"] += 1
        self.live[protocol] = None

    def _ended(self, protocol: CurveTunProtocol, reason: Failure) -> None:
        if protocol in self.live:
            del self.live[protocol]
            # Its bytes move from the live sum to the ended one: the
            # counters stay where they were.
            self._ended_bytes_received += protocol.bytes_received
            self._ended_bytes_sent += protocol.bytes_sent
        elif reason.check(AdmissionRefused) is None:
            self.handshakes[failure_label(reason)] += 1

    def figures(self) -> Figures:
        """
        The figures of this factory now.
        """
        admission = self.factory.admission
        figures = Figures(
            connections=admission.established,
            handshakes_in_progress=admission.handshakes,
            bytes_received=self._ended_bytes_received
            + sum(protocol.bytes_received for protocol in self.live),
            bytes_sent=self._ended_bytes_sent + sum(protocol.bytes_sent for protocol in self.live),
        )
        figures.add(Figures(handshakes=dict(self.handshakes), refused=dict(admission.refusals)))
        return figures


def tunnel_name(tunnel: TunnelService) -> str:
    """
    What the metrics' C{tunnel} label and the status document call a
    tunnel: its name in the config file, else its first listen endpoint.
    """
    return tunnel.config.name or tunnel.config.listen[0]


def server_keys(vault: Any) -> list[dict[str, str]]:
    """
    The public keys a server answers to, for the status document: the
    current one, then the previous one while a rollover overlaps. A vault
    that holds several says so with C{public_keys} (current first) or
    C{previous_public_key}; otherwise it has one, C{public_key}.
    """
    keys = getattr(vault, "public_keys", None)
    if keys is None:
        keys = [vault.public_key]
        previous = getattr(vault, "previous_public_key", None)
        if previous:
            keys.append(previous)
    return [
        {"key": bytes(key).hex(), "role": "current" if index == 0 else "previous"}
        for index, key in enumerate(keys)
    ]


def _latest(*times: float | None) -> float | None:
    known = [t for t in times if t is not None]
    return max(known) if known else None


def connection_status(protocol: CurveTunProtocol) -> dict[str, Any]:
    """
    One live connection in the status document.
    """
    return {
        "peer_key": protocol.peer_public_key.hex(),
        "address": format_address(protocol.getPeer()),
        "started": protocol.established_at,
        "bytes_received": protocol.bytes_received,
        "bytes_sent": protocol.bytes_sent,
        "last_message": _latest(protocol.last_received_at, protocol.last_sent_at),
        "last_received": protocol.last_received_at,
        "last_sent": protocol.last_sent_at,
    }


def _unwrapped(factory: object) -> Iterator[object]:
    """
    C{factory} and the factories it wraps (a PROXY-protocol endpoint
    wrapping a curvetun one wraps its factory).
    """
    for _ in range(8):
        yield factory
        inner = getattr(factory, "wrappedFactory", None)
        if inner is None:
            return
        factory = inner


class ObservedTunnels(Protocol):
    """
    What an L{Observer} observes: the tunnels of one process and their
    identities (L{curvetun.tunnel_service.Tunnels}, or a worker's tunnels).
    """

    @property
    def identities(self) -> Sequence[Identity]:
        """The identities the tunnels use."""

    @property
    def tunnels(self) -> Sequence[TunnelService]:
        """The tunnels."""

    @property
    def running(self) -> int:
        """Whether they run."""


class Observer:
    """
    The figures, status and health of the tunnels of one process
    (L{curvetun.tunnel_service.Tunnels}, or a worker's).

    Made before the tunnels start: it follows every server factory their
    identities make from then on, and keeps the counts of those that stop.
    """

    def __init__(self, tunnels: ObservedTunnels, clock: IReactorTime) -> None:
        self.tunnels = tunnels
        self.clock = clock
        self.listeners: list[ListenerFigures] = []
        for identity in tunnels.identities:
            identity.service.server_factory_callbacks.append(self._factory_made)

    def _factory_made(self, factory: CurveTunServerFactory) -> None:
        self.listeners.append(ListenerFigures(factory))

    def _of(self, tunnel: TunnelService) -> list[ListenerFigures]:
        """
        The listeners that serve C{tunnel}: their server factories run its
        listeners' factories.
        """
        ours = {id(listener.factory) for listener in tunnel.listeners}
        return [
            figures
            for figures in self.listeners
            if any(id(inner) in ours for inner in _unwrapped(figures.factory.wrappedFactory))
        ]

    def figures(self) -> dict[str, Figures]:
        """
        Each tunnel's figures now, by L{tunnel_name}.
        """
        result: dict[str, Figures] = {}
        for tunnel in self.tunnels.tunnels:
            figures = result.setdefault(tunnel_name(tunnel), Figures())
            for listener in self._of(tunnel):
                figures.add(listener.figures())
        return result

    def status(self) -> dict[str, Any]:
        """
        The status document (its schema: L{curvetun.status}).
        """
        return {
            "version": __version__,
            "now": self.clock.seconds(),
            "tunnels": [
                {
                    "name": tunnel_name(tunnel),
                    "listen": list(tunnel.config.listen),
                    "forward": tunnel.config.forward,
                    "server_keys": server_keys(tunnel.identity.vault),
                    "connections": [
                        connection_status(protocol)
                        for listener in self._of(tunnel)
                        for protocol in listener.live
                    ],
                }
                for tunnel in self.tunnels.tunnels
            ],
        }

    def health(self) -> str | None:
        """
        L{None} while every listener of every tunnel listens and every
        identity can store its nonce counter (it needs to, to go on making
        handshakes); otherwise why not, in one line.
        """
        if not self.tunnels.running:
            return "the tunnels are not running"
        for tunnel in self.tunnels.tunnels:
            for listener in tunnel.listeners:
                if listener.port is None:
                    return f"not listening on {listener.description}"
        for identity in self.tunnels.identities:
            check: Callable[[], None] | None = getattr(
                identity.service.vault, "check_counter", None
            )
            if check is None:
                continue  # a vault that stores no counter (in memory, say)
            try:
                check()
            except (CurveTunError, OSError) as error:
                return str(error).splitlines()[0] if str(error) else type(error).__name__
        return None


class CurveTunCollector(Collector):
    """
    The metrics of the figures that C{read} gives, read when the registry
    collects (at each scrape), in the reactor's thread.
    """

    def __init__(self, read: Callable[[], Mapping[str, Figures]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        figures = self._read()
        handshakes = CounterMetricFamily(
            "curvetun_handshakes_total",
            "Handshakes with curvetun clients, by result: ok, or why they failed.",
            labels=["tunnel", "result"],
        )
        connections = GaugeMetricFamily(
            "curvetun_connections",
            "Established curvetun connections.",
            labels=["tunnel"],
        )
        in_progress = GaugeMetricFamily(
            "curvetun_handshakes_in_progress",
            "curvetun handshakes begun and not yet complete.",
            labels=["tunnel"],
        )
        received = CounterMetricFamily(
            "curvetun_bytes_received_total",
            "Application bytes received from curvetun clients (ended connections included).",
            labels=["tunnel"],
        )
        sent = CounterMetricFamily(
            "curvetun_bytes_sent_total",
            "Application bytes sent to curvetun clients (ended connections included).",
            labels=["tunnel"],
        )
        refused = CounterMetricFamily(
            "curvetun_connections_refused_total",
            "Connections closed at accept, before any crypto, by the limit they reached.",
            labels=["tunnel", "limit"],
        )
        for tunnel, these in figures.items():
            for result, count in these.handshakes.items():
                handshakes.add_metric([tunnel, result], count)
            connections.add_metric([tunnel], these.connections)
            in_progress.add_metric([tunnel], these.handshakes_in_progress)
            received.add_metric([tunnel], these.bytes_received)
            sent.add_metric([tunnel], these.bytes_sent)
            for limit, count in these.refused.items():
                refused.add_metric([tunnel, limit], count)
        yield from (handshakes, connections, in_progress, received, sent, refused)
