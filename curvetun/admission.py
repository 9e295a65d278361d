"""
Which new connections a server takes, and how much it logs about those it
does not.

L{Admission} counts connections and unfinished handshakes in all, per peer
address and per peer network, refuses a newcomer past its own address's or
network's share, and, when the server as a whole is full, makes room by
evicting an unfinished handshake instead of refusing the newcomer: idle
sockets can then no longer lock new clients out. L{FailureLog} logs failed
handshakes one per line at debug level only, and sums them up in at most one
line per interval.

Both are driven by the connection factories; neither does I/O of its own
besides logging.
"""

from __future__ import annotations

import socket
import sys
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import attrs
from attrs.validators import and_, ge, instance_of, le
from twisted.internet.error import ConnectionClosed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from .errors import (
    BadPacket,
    HandshakeEvicted,
    HandshakeTimeout,
    KeyFileError,
    NotAuthorized,
    ReplayedVouch,
    ServerKeyMismatch,
)

DEFAULT_LOG_INTERVAL = 10.0
"""
Seconds between two summary lines of refusals or of failed handshakes.
"""

log = Logger()


def _limit(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and (type(value) is not int or value < 0):
        raise ValueError(f"{attribute.name} must be a non-negative whole number or None")


@attrs.frozen
class ConnectionLimits:
    """
    How many connections a server takes at once. Past a limit of the
    newcomer's own address or network, a new TCP connection is closed as
    soon as it is accepted, before any crypto. Past a limit of the server as
    a whole, an unfinished handshake is evicted to make room, if there is
    one (see L{Admission}); established connections are never closed.
    L{None} means no limit.

    Per-network limits are counted in addition to per-address ones: on IPv6
    one host usually has a whole /64, so there the per-network limits are
    the effective per-host limits; on IPv4 a /24 is commonly one site or one
    customer. Their defaults are twice (handshakes) and four times
    (connections) the per-address ones: two hosts of a network may use
    their whole per-address share of unfinished handshakes (a NAT'd office
    opening many connections at once sits behind one address anyway), and
    the global handshake limit holds at least eight full networks, so no
    one network can fill it.

    @ivar connections: established or handshaking connections, in all.
    @ivar connections_per_address: the same, from one IP address.
    @ivar connections_per_network: the same, from one network.
    @ivar handshakes: connections whose handshake is not complete.
    @ivar handshakes_per_address: the same, from one IP address.
    @ivar handshakes_per_network: the same, from one network.
    @ivar ipv4_prefix: the prefix length of an IPv4 network (0-32).
    @ivar ipv6_prefix: the prefix length of an IPv6 network (0-128).
        IPv4-mapped IPv6 addresses (C{::ffff:a.b.c.d}) count as IPv4; a
        peer without an IP address (a UNIX socket) is one address in a
        network of its own.
    """

    connections: int | None = attrs.field(default=4096, validator=_limit)
    connections_per_address: int | None = attrs.field(default=256, validator=_limit)
    handshakes: int | None = attrs.field(default=512, validator=_limit)
    handshakes_per_address: int | None = attrs.field(default=32, validator=_limit)
    connections_per_network: int | None = attrs.field(default=1024, validator=_limit)
    handshakes_per_network: int | None = attrs.field(default=64, validator=_limit)
    ipv4_prefix: int = attrs.field(default=24, validator=and_(instance_of(int), ge(0), le(32)))
    ipv6_prefix: int = attrs.field(default=64, validator=and_(instance_of(int), ge(0), le(128)))


def peer_address_and_network(host: str, ipv4_prefix: int, ipv6_prefix: int) -> tuple[str, str]:
    """
    What a peer host counts against: its normalized address and its
    network, e.g. C{("10.1.2.3", "10.1.2.0/24")}. An IPv4-mapped IPv6
    address is its IPv4 address; an IPv6 zone (C{%eth0}) is ignored; a host
    that is not an IP address (C{""} for a UNIX socket) is its own address
    and network.
    """
    # socket's parsers, not the ipaddress module's: this runs at every
    # accept, and ipaddress takes some 50 us an IPv6 address, this 2 us.
    try:
        if ":" in host:
            packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
        else:
            packed = socket.inet_pton(socket.AF_INET, host)
    except (OSError, ValueError):
        return host, host
    packed = packed.removeprefix(_IPV4_MAPPED)
    if len(packed) == 4:
        family, prefix = socket.AF_INET, ipv4_prefix
    else:
        family, prefix = socket.AF_INET6, ipv6_prefix
    bits = 8 * len(packed)
    host_bits = (1 << (bits - prefix)) - 1
    network = (int.from_bytes(packed, "big") & ~host_bits).to_bytes(len(packed), "big")
    # Interned: each connection's admission entry keeps both for its life,
    # and a tunnel's connections come from one address; interned strings
    # are freed once no entry holds them.
    return (
        sys.intern(socket.inet_ntop(family, packed)),
        sys.intern(f"{socket.inet_ntop(family, network)}/{prefix}"),
    )


_IPV4_MAPPED = bytes(10) + b"\xff\xff"


class Candidate(Protocol):
    """
    A connection whose handshake is not complete, as admission sees it.
    """

    @property
    def hello_verified(self) -> bool:
        """
        Whether the peer has sent a hello that verified.
        """

    def evict(self) -> None:
        """
        Abort the connection now, to make room for a newer one. It reports
        L{Admission.ended} later (or at once) as any connection does.
        """


# Stable labels (the ConnectionLimits field names) and what they count.
_LIMITS = {
    "connections": "connections",
    "connections_per_address": "connections from one address",
    "connections_per_network": "connections from one network",
    "handshakes": "unfinished handshakes",
    "handshakes_per_address": "unfinished handshakes from one address",
    "handshakes_per_network": "unfinished handshakes from one network",
}


@attrs.define
class _Entry:
    address: str
    network: str
    handshaking: bool = True


class _Unfinished:
    """
    The unfinished handshakes, by network, kept in the order in which
    L{Admission} evicts them: from the network with the most unfinished
    handshakes, those that have not sent a valid hello first, oldest first.

    Every operation is O(1), amortized: networks are kept in buckets by
    their number of unfinished handshakes (which moves by one at a time, so
    the largest is always known), and a candidate whose hello has verified
    since it was added is moved from the silent to the greeted queue of its
    network when eviction meets it, once.
    """

    def __init__(self) -> None:
        self._silent: dict[str, OrderedDict[Candidate, None]] = {}
        self._greeted: dict[str, OrderedDict[Candidate, None]] = {}
        self._size: Counter[str] = Counter()
        self._by_size: dict[int, OrderedDict[str, None]] = {}
        self._largest = 0

    def add(self, network: str, candidate: Candidate) -> None:
        self._silent.setdefault(network, OrderedDict())[candidate] = None
        self._resize(network, +1)

    def remove(self, network: str, candidate: Candidate) -> None:
        for queues in (self._silent, self._greeted):
            queue = queues.get(network)
            if queue is not None and candidate in queue:
                del queue[candidate]
                if not queue:
                    del queues[network]
                self._resize(network, -1)
                return

    def victim(self, newcomer: str) -> Candidate | None:
        """
        The unfinished handshake to evict first for a newcomer from network
        C{newcomer}, or L{None} if there is none. On a tie for the largest
        network, the newcomer's own gives way.
        """
        if not self._largest:
            return None
        if self._size[newcomer] == self._largest:
            network = newcomer
        else:
            network = next(iter(self._by_size[self._largest]))
        silent = self._silent.get(network)
        while silent:
            candidate = next(iter(silent))
            if not candidate.hello_verified:
                return candidate
            del silent[candidate]
            self._greeted.setdefault(network, OrderedDict())[candidate] = None
        self._silent.pop(network, None)
        return next(iter(self._greeted[network]))

    def _resize(self, network: str, step: int) -> None:
        before = self._size[network]
        after = before + step
        if before:
            bucket = self._by_size[before]
            del bucket[network]
            if not bucket:
                del self._by_size[before]
                if before == self._largest and step < 0:
                    self._largest = after
        if after:
            self._size[network] = after
            self._by_size.setdefault(after, OrderedDict())[network] = None
            self._largest = max(self._largest, after)
        else:
            del self._size[network]


class _Tally:
    """
    Counts events by label and calls C{write} with the counts, the last
    peer and the seconds covered, at the end of every interval that had
    events: at most one call per interval, and none for a quiet one. The
    first event after a quiet spell starts an interval.
    """

    def __init__(
        self,
        clock: IReactorTime,
        interval: float,
        write: Callable[[Counter[str], str, float], None],
    ) -> None:
        self._clock = clock
        self._interval = interval
        self._write = write
        self._counts: Counter[str] = Counter()
        self._last_peer = ""
        self._started = 0.0
        self._timer: IDelayedCall | None = None

    def add(self, label: str, peer: str) -> None:
        self._counts[label] += 1
        self._last_peer = peer
        if self._timer is None:
            self._started = self._clock.seconds()
            self._timer = self._clock.callLater(self._interval, self._interval_ended)

    def _interval_ended(self) -> None:
        self._timer = None
        self._flush()

    def _flush(self) -> None:
        counts, self._counts = self._counts, Counter()
        if counts:
            self._write(counts, self._last_peer, self._clock.seconds() - self._started)

    def stop(self) -> None:
        """
        Write what has been counted so far, and stop the timer.
        """
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        self._flush()


def _seconds(elapsed: float) -> str:
    return f"{round(elapsed, 1):g}"


class Admission:
    """
    Decides, at accept, whether a server takes a new connection, and keeps
    the counts that decision needs.

    A newcomer is refused if its own address or network is at one of its
    limits: it cannot take more than its share by evicting others. If the
    server as a whole is at its limit of unfinished handshakes, or of
    connections while some are unfinished, the newcomer evicts one
    unfinished handshake instead of being refused: an attacker holding
    sockets open that never finish no longer shuts new clients out.

    Whom to evict: an unfinished handshake of the network that has the most
    of them (the newcomer's own, on a tie); within that network, one that
    has not sent a valid hello if there is any; the oldest first.

      - The network comes before the hello because a valid hello costs an
        attacker nothing (a recorded one verifies again on any connection)
        while networks cost it address space. A newcomer takes a place from
        another network only if that network has more unfinished handshakes
        than the newcomer's own: a flood from one network churns its own
        handshakes, and an attacker spread over networks of C{c} each
        cannot evict from a network with fewer than C{c}. To reach an
        honest client alone in its network, every network must be down to
        one: the attacker needs about as many networks as the server takes
        unfinished handshakes (512 by default), and must make that many
        connections within the client's handshake (two round trips).
      - Oldest first, not at random: an honest handshake is over in a few
        round trips, so the oldest are the stalled ones; a random choice
        would give every attacker connection a fair chance at an honest
        client in the middle of its handshake.
      - Silent first within a network: a scanner or an idle socket goes
        before a client that is in the middle of its handshake.

    Refusals are counted per limit (L{refusals}) and logged as at most one
    warning per interval, with counts.
    """

    def __init__(
        self,
        limits: ConnectionLimits,
        clock: IReactorTime,
        log_interval: float = DEFAULT_LOG_INTERVAL,
    ) -> None:
        self.limits = limits
        self._entries: dict[Candidate, _Entry] = {}
        self._unfinished = _Unfinished()
        self._handshakes = 0
        # Live counts per address and per network (separate: for a peer
        # without an IP address the two keys are the same).
        self._connections_by_address: Counter[str] = Counter()
        self._connections_by_network: Counter[str] = Counter()
        self._handshakes_by_address: Counter[str] = Counter()
        self._handshakes_by_network: Counter[str] = Counter()
        self._refusals: Counter[str] = Counter()
        self._evictions = 0
        self._refusal_log = _Tally(clock, log_interval, self._log_refusals)

    # -- figures, for metrics ------------------------------------------------

    @property
    def established(self) -> int:
        """
        Connections whose handshake is complete and that have not ended.
        """
        return len(self._entries) - self._handshakes

    @property
    def handshakes(self) -> int:
        """
        Handshakes in progress.
        """
        return self._handshakes

    @property
    def refusals(self) -> Mapping[str, int]:
        """
        Connections refused since the start, per limit, keyed by the name
        of the L{ConnectionLimits} field (C{"handshakes_per_network"}...).
        """
        return dict(self._refusals)

    @property
    def evictions(self) -> int:
        """
        Unfinished handshakes evicted since the start to make room.
        """
        return self._evictions

    # -- what the factory tells us -------------------------------------------

    def admit(self, peer_host: str, connection: Candidate) -> str | None:
        """
        A new connection from C{peer_host} (C{""} if it has no IP address):
        take it, possibly evicting an older unfinished handshake, or refuse
        it.

        @return: L{None} if it is taken (it must then report
            L{handshake_done} and L{ended}); otherwise why not, in a phrase
            such as C{"32 unfinished handshakes from one address"}.
        """
        limits = self.limits
        address, network = peer_address_and_network(
            peer_host, limits.ipv4_prefix, limits.ipv6_prefix
        )
        victim = None
        label = self._own_share_reached(address, network)
        if label is None and (label := self._server_full()) is not None:
            victim = self._unfinished.victim(network)
            if victim is not None:
                label = None
        if label is not None:
            self._refusals[label] += 1
            self._refusal_log.add(label, peer_host)
            return f"{getattr(limits, label)} {_LIMITS[label]}"
        if victim is not None:
            # Forgotten before evict() is called: it may report ended() at once.
            self._forget(victim)
            self._evictions += 1
        self._entries[connection] = _Entry(address, network)
        self._unfinished.add(network, connection)
        self._handshakes += 1
        self._connections_by_address[address] += 1
        self._connections_by_network[network] += 1
        self._handshakes_by_address[address] += 1
        self._handshakes_by_network[network] += 1
        if victim is not None:
            victim.evict()
        return None

    def handshake_done(self, connection: Candidate) -> None:
        """
        C{connection}'s handshake is complete: it no longer counts as
        unfinished, and is never evicted.
        """
        entry = self._entries.get(connection)
        if entry is None or not entry.handshaking:
            return
        self._finish(connection, entry)

    def ended(self, connection: Candidate) -> None:
        """
        C{connection} has ended (however it ended, evicted ones included).
        """
        if connection in self._entries:
            self._forget(connection)

    def stop(self) -> None:
        """
        Log the refusals not yet logged, and stop the log's timer.
        """
        self._refusal_log.stop()

    # -- internals -----------------------------------------------------------

    def _own_share_reached(self, address: str, network: str) -> str | None:
        limits = self.limits
        for count, limit, label in (
            (
                self._handshakes_by_address[address],
                limits.handshakes_per_address,
                "handshakes_per_address",
            ),
            (
                self._handshakes_by_network[network],
                limits.handshakes_per_network,
                "handshakes_per_network",
            ),
            (
                self._connections_by_address[address],
                limits.connections_per_address,
                "connections_per_address",
            ),
            (
                self._connections_by_network[network],
                limits.connections_per_network,
                "connections_per_network",
            ),
        ):
            if limit is not None and count >= limit:
                return label
        return None

    def _server_full(self) -> str | None:
        limits = self.limits
        if limits.handshakes is not None and self._handshakes >= limits.handshakes:
            return "handshakes"
        if limits.connections is not None and len(self._entries) >= limits.connections:
            return "connections"
        return None

    def _finish(self, connection: Candidate, entry: _Entry) -> None:
        entry.handshaking = False
        self._handshakes -= 1
        self._unfinished.remove(entry.network, connection)
        _uncount(self._handshakes_by_address, entry.address)
        _uncount(self._handshakes_by_network, entry.network)

    def _forget(self, connection: Candidate) -> None:
        entry = self._entries.pop(connection)
        if entry.handshaking:
            self._finish(connection, entry)
        _uncount(self._connections_by_address, entry.address)
        _uncount(self._connections_by_network, entry.network)

    def _log_refusals(self, counts: Counter[str], peer: str, elapsed: float) -> None:
        limits = ", ".join(
            f"{n} at the limit of {getattr(self.limits, label)} {_LIMITS[label]}"
            for label, n in counts.most_common()
        )
        # twisted.logger's Logger has warn(), not warning().
        log.warn(
            "curvetun refused {count} connection(s) in the last {seconds} s, "
            "the last from {peer}: {limits}",
            count=counts.total(),
            seconds=_seconds(elapsed),
            peer=peer or "a local socket",
            limits=limits,
            counts=dict(counts),
        )


def _uncount(counter: Counter[str], key: str) -> None:
    # No zero entries: an attacker's many addresses must not stay behind.
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


# -- failed handshakes -------------------------------------------------------

# Most specific first: ReplayedVouch is a BadPacket.
_FAILURE_LABELS: tuple[tuple[type[BaseException], str], ...] = (
    (ReplayedVouch, "replay"),
    (NotAuthorized, "not_authorized"),
    (ServerKeyMismatch, "server_key_mismatch"),
    (HandshakeTimeout, "timeout"),
    (HandshakeEvicted, "evicted"),
    (BadPacket, "bad_packet"),
    (KeyFileError, "key_file"),
    (ConnectionClosed, "closed"),
)

FAILURE_LABELS = (*tuple(label for _, label in _FAILURE_LABELS), "other")
"""
Every label L{failure_label} gives.
"""

_FAILURE_PHRASES = {
    "replay": "replayed",
    "not_authorized": "not authorized",
    "server_key_mismatch": "server key mismatch",
    "timeout": "timed out",
    "evicted": "evicted",
    "bad_packet": "bad packet",
    "key_file": "key file error",
    "closed": "closed before the end",
    "other": "other",
}


def failure_label(reason: Failure) -> str:
    """
    A stable label for why a handshake failed (one of L{FAILURE_LABELS}):
    C{"not_authorized"}, C{"bad_packet"}, C{"replay"}, C{"timeout"},
    C{"server_key_mismatch"}, C{"evicted"}, C{"key_file"} (the server could
    not store its nonce counter), C{"closed"} (the peer or the network
    closed first) or C{"other"}.
    """
    for error_type, label in _FAILURE_LABELS:
        if reason.check(error_type) is not None:
            return label
    return "other"


class FailureLog:
    """
    Logs failed handshakes without flooding the log: each one as a debug
    event (peer, reason and its label), and at the end of each interval
    that had any, one info line with the counts per reason, e.g.::

        curvetun: 1532 handshakes failed in the last 10 s: 1500 not
        authorized, 32 timed out (last from 10.0.0.7:5555)

    The summary event also carries C{counts}, a dict from L{failure_label}
    to count, for machine readers.
    """

    def __init__(self, clock: IReactorTime, interval: float = DEFAULT_LOG_INTERVAL) -> None:
        self._tally = _Tally(clock, interval, self._summarize)

    def failed(self, peer: str, reason: Failure) -> None:
        """
        A handshake with C{peer} (an address as logs show it) failed for
        C{reason}.
        """
        label = failure_label(reason)
        log.debug(
            "curvetun handshake with {peer} failed: {why}",
            peer=peer,
            why=reason.getErrorMessage(),
            result=label,
        )
        self._tally.add(label, peer)

    def stop(self) -> None:
        """
        Write the summary of the failures not yet summed up, and stop the
        timer.
        """
        self._tally.stop()

    def _summarize(self, counts: Counter[str], peer: str, elapsed: float) -> None:
        count = counts.total()
        log.info(
            "curvetun: {count} handshake{s} failed in the last {seconds} s: {reasons} "
            "(last from {peer})",
            count=count,
            s="" if count == 1 else "s",
            seconds=_seconds(elapsed),
            reasons=", ".join(
                f"{n} {_FAILURE_PHRASES[label]}" for label, n in counts.most_common()
            ),
            peer=peer,
            counts=dict(counts),
        )
