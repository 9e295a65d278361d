"""
Which new connections a server takes, and how much it logs about those it
does not.

L{Admission} counts connections and unfinished handshakes in all and per
peer address, refuses a newcomer past its address's share, and, when the
server as a whole is full, evicts an unfinished handshake (one that has not
sent a valid hello first, the oldest first) instead of refusing the
newcomer. L{FailureLog} logs failed handshakes one per line at debug level,
and sums them up in at most one info line per interval.
"""

from __future__ import annotations

from collections import Counter
from typing import Protocol

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

DEFAULT_LOG_INTERVAL = 10.0
"""
Seconds between two summary lines of refusals or of failed handshakes.
"""

log = Logger()


@attrs.frozen
class ConnectionLimits:
    """
    How many connections a server takes at once. Past a limit of the
    newcomer's own address, a new TCP connection is closed as soon as it is
    accepted, before any crypto; past a limit of the server as a whole, an
    unfinished handshake is evicted to make room, if there is one.
    Established connections are never closed. L{None} means no limit.

    @ivar connections: established or handshaking connections, in all.
    @ivar connections_per_address: the same, from one IP address.
    @ivar handshakes: connections whose handshake is not complete.
    @ivar handshakes_per_address: the same, from one IP address.
    """

    connections: int | None = 4096
    connections_per_address: int | None = 256
    handshakes: int | None = 512
    handshakes_per_address: int | None = 32


class Candidate(Protocol):
    """
    A connection whose handshake is not complete, as admission sees it.
    """

    @property
    def hello_verified(self) -> bool:
        "Whether the peer has sent a hello that verified."

    def evict(self) -> None:
        "Abort the connection now; it reports L{Admission.ended} later."


class _Tally:
    """
    Counts events by label, and writes the counts at the end of each
    interval that had any.
    """

    def __init__(self, clock: IReactorTime, interval: float, what: str) -> None:
        self._clock = clock
        self._interval = interval
        self._what = what
        self._counts: Counter[str] = Counter()
        self._last_peer = ""
        self._timer: IDelayedCall | None = None

    def add(self, label: str, peer: str) -> None:
        self._counts[label] += 1
        self._last_peer = peer
        if self._timer is None:
            self._timer = self._clock.callLater(self._interval, self._write)

    def _write(self) -> None:
        self._timer = None
        counts, self._counts = self._counts, Counter()
        if counts:
            log.info(
                "curvetun: {count} {what}: {reasons} (last from {peer})",
                count=counts.total(),
                what=self._what,
                reasons=", ".join(f"{n} {label}" for label, n in counts.most_common()),
                peer=self._last_peer,
            )

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._write()


class Admission:
    """
    Decides, at accept, whether a server takes a new connection, and keeps
    the counts that decision needs.
    """

    def __init__(self, limits: ConnectionLimits, clock: IReactorTime) -> None:
        self.limits = limits
        # Every admitted connection, oldest first: its host, and whether its
        # handshake is still unfinished.
        self._connections: dict[Candidate, tuple[str, bool]] = {}
        self._by_address: Counter[str] = Counter()
        self._handshakes_by_address: Counter[str] = Counter()
        self._handshakes = 0
        self._refusals = _Tally(clock, DEFAULT_LOG_INTERVAL, "connection(s) refused")

    def admit(self, peer_host: str, connection: Candidate) -> str | None:
        """
        Take a new connection from C{peer_host}, possibly evicting an
        unfinished handshake, or say why not.
        """
        limits = self.limits
        refusal = None
        for count, limit, what in (
            (self._handshakes_by_address[peer_host], limits.handshakes_per_address,
             "unfinished handshakes from one address"),
            (self._by_address[peer_host], limits.connections_per_address,
             "connections from one address"),
        ):  # fmt: skip
            if limit is not None and count >= limit:
                refusal = f"{limit} {what}"
        victim = None
        if refusal is None:
            for count, limit, what in (
                (self._handshakes, limits.handshakes, "unfinished handshakes"),
                (len(self._connections), limits.connections, "connections"),
            ):
                if limit is not None and count >= limit:
                    victim = self._victim()
                    if victim is None:
                        refusal = f"{limit} {what}"
        if refusal is not None:
            self._refusals.add(f"at the limit of {refusal}", peer_host)
            return refusal
        if victim is not None:
            self.ended(victim)
        self._connections[connection] = (peer_host, True)
        self._by_address[peer_host] += 1
        self._handshakes_by_address[peer_host] += 1
        self._handshakes += 1
        if victim is not None:
            victim.evict()
        return None

    def _victim(self) -> Candidate | None:
        unfinished = [c for c, (_, handshaking) in self._connections.items() if handshaking]
        silent = [c for c in unfinished if not c.hello_verified]
        for candidates in (silent, unfinished):
            if candidates:
                return candidates[0]
        return None

    def handshake_done(self, connection: Candidate) -> None:
        "C{connection}'s handshake is complete: it is never evicted."
        entry = self._connections.get(connection)
        if entry is not None and entry[1]:
            self._connections[connection] = (entry[0], False)
            self._finish(entry[0])

    def ended(self, connection: Candidate) -> None:
        "C{connection} has ended."
        entry = self._connections.pop(connection, None)
        if entry is None:
            return
        host, handshaking = entry
        if handshaking:
            self._finish(host)
        _uncount(self._by_address, host)

    def _finish(self, host: str) -> None:
        self._handshakes -= 1
        _uncount(self._handshakes_by_address, host)

    def stop(self) -> None:
        "Log the refusals not yet logged, and stop the log's timer."
        self._refusals.stop()


def _uncount(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


class FailureLog:
    """
    Logs failed handshakes without flooding the log: each as a debug event,
    and one info line with the counts per reason per interval.
    """

    def __init__(self, clock: IReactorTime, interval: float = DEFAULT_LOG_INTERVAL) -> None:
        self._tally = _Tally(clock, interval, "handshake(s) failed")

    def failed(self, peer: str, reason: Failure) -> None:
        "A handshake with C{peer} failed for C{reason}."
        log.debug("curvetun handshake with {peer} failed: {why}", peer=peer,
                  why=reason.getErrorMessage())  # fmt: skip
        self._tally.add(type(reason.value).__name__, peer)

    def stop(self) -> None:
        "Write the summary not yet written, and stop the timer."
        self._tally.stop()
