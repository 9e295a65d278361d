"""
Fixtures for the C{twist curvetun} tests: tunnels built from command
lines, a producer-driven hashing client, a hashing echo backend, and a
measure of what the transports buffer. (Key directories, log capture and
the collecting client are in L{tests._support}.)
"""

from __future__ import annotations

import hashlib
import os
import sys
from typing import Any, TypeVar

from twisted.internet import reactor
from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from curvetun.tap import Options
from curvetun.transport import CurveTunProtocol
from curvetun.tunnel import Echo, Forwarder
from curvetun.tunnel_service import TunnelService, build_tunnel

T = TypeVar("T")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- tunnels -------------------------------------------------------------------


def parse(*argv: str) -> Options:
    """
    The options of C{twist curvetun ARGV}.
    """
    options = Options()
    options.parseOptions(list(argv))
    return options


def build(*argv: str, clock: IReactorTime | None = None) -> TunnelService:
    """
    The (one) tunnel of C{twist curvetun ARGV}, built but not started.
    """
    [config] = parse(*argv).tunnels
    return build_tunnel(config, reactor, clock)


def start_tunnel(
    testcase: SynchronousTestCase, *argv: str, clock: IReactorTime | None = None
) -> TunnelService:
    """
    Build the tunnel of C{twist curvetun ARGV} and start it; it is stopped
    (if the test did not) at cleanup.
    """
    tunnel = build(*argv, clock=clock)
    tunnel.startService()

    def stop() -> Deferred[None] | None:
        return tunnel.stopService() if tunnel.running else None

    testcase.addCleanup(stop)
    return tunnel


def port_of(tunnel: TunnelService, index: int = 0) -> int:
    """
    The port the C{index}th listen endpoint of C{tunnel} listens on.
    """
    port = tunnel.listeners[index].port
    assert port is not None
    address = port.getHost()
    assert isinstance(address, (IPv4Address, IPv6Address)), address
    return address.port


# -- peers --------------------------------------------------------------------


@implementer(IPushProducer)
class StreamingClient(Protocol):
    """
    Sends C{total} random bytes as a push producer, writing only while its
    transport has not paused it, and hashes them; hashes what comes back,
    and fires C{done} once C{total} bytes have come back.
    """

    CHUNK = 64 * 1024

    def __init__(self, total: int, stall: tuple[int, float] | None = None) -> None:
        """
        @param stall: C{(after, seconds)}: once C{after} bytes have come
            back, stop reading for C{seconds}, as a slow reader would.
        """
        self.total = total
        self.stall = stall
        self.sent = 0
        self.received = 0
        self.sent_hash = hashlib.sha256()
        self.received_hash = hashlib.sha256()
        self.paused = True
        self.done: Deferred[None] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self.reason: Failure | None = None

    def start(self) -> None:
        assert self.transport is not None
        self.transport.registerProducer(self, True)  # type: ignore[attr-defined]
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        assert self.transport is not None
        while not self.paused and self.sent < self.total:
            chunk = os.urandom(min(self.CHUNK, self.total - self.sent))
            self.sent_hash.update(chunk)
            self.sent += len(chunk)
            # May call pauseProducing before it returns.
            self.transport.write(chunk)
        if self.sent >= self.total and not self.paused:
            self.paused = True
            self.transport.unregisterProducer()  # type: ignore[attr-defined]

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.paused = True

    def dataReceived(self, data: bytes) -> None:
        self.received_hash.update(data)
        self.received += len(data)
        self.stall = stall_reading(self.transport, self.received, self.stall)
        if self.received >= self.total and not self.done.called:
            self.done.callback(None)

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        # The reason is kept, not passed: a Failure would errback.
        self.reason = reason
        self.lost.callback(None)


def stall_reading(
    transport: Any, received: int, stall: tuple[int, float] | None
) -> tuple[int, float] | None:
    """
    Stop reading from C{transport} for a while if C{stall} says it is
    time; return what is left of C{stall}. (For a transport that is not its
    own producer: see L{Reading}.)
    """
    if stall is None or received < stall[0]:
        return stall
    transport.pauseProducing()
    reactor.callLater(stall[1], transport.resumeProducing)
    return None


@implementer(IPushProducer)
class Reading:
    """
    The reading side of a transport, as the producer of its own writes (an
    echo's flow control), which can also stall: it reads only while
    neither its consumer has paused it nor it is stalled. (A transport
    registered as its own producer would resume reading as soon as its
    write buffer drained, ending a stall early.)
    """

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.paused_by_consumer = False
        self.stalled = False

    def pauseProducing(self) -> None:
        self.paused_by_consumer = True
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused_by_consumer = False
        if not self.stalled:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        pass

    def stall(self, seconds: float) -> None:
        self.stalled = True
        self.transport.pauseProducing()
        reactor.callLater(seconds, self._end_stall)

    def _end_stall(self) -> None:
        self.stalled = False
        if not self.paused_by_consumer:
            self.transport.resumeProducing()


class HashingEcho(Protocol):
    """
    The backend: echoes, with backpressure, and hashes what it receives.
    It can stall like the client (see L{StreamingClient}).
    """

    factory: HashingEchoFactory

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.factory.connections += 1
        self.factory.protocols.append(self)
        self.hash = hashlib.sha256()
        self.received = 0
        self.stall = self.factory.stall
        self.lost: Deferred[None] = Deferred()
        self.reason: Failure | None = None
        self.reading = Reading(self.transport)
        self.transport.registerProducer(self.reading, True)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.hash.update(data)
        self.received += len(data)
        self.transport.write(data)
        if self.stall is not None and self.received >= self.stall[0]:
            self.reading.stall(self.stall[1])
            self.stall = None

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        # The reason is kept, not passed: a Failure would errback.
        self.reason = reason
        self.lost.callback(None)


class HashingEchoFactory(Factory[Protocol]):
    protocol = HashingEcho

    def __init__(self, stall: tuple[int, float] | None = None) -> None:
        self.connections = 0
        self.protocols: list[HashingEcho] = []
        self.stall = stall


# -- memory -------------------------------------------------------------------
#
# What the transports hold is read from Twisted's and our own internals:
# there is no public measure. Each read checks that the attribute is there
# and of the type expected, so that a change of those internals fails the
# tests that use these figures (and tests/test_tap.py's BufferedTests)
# instead of silently measuring zero.


def tcp_write_buffer(transport: Any) -> int:
    """
    The bytes a TCP transport has been given to write and not yet handed
    to the kernel: Twisted's C{FileDescriptor} keeps C{dataBuffer} from
    C{offset} on, plus C{_tempDataLen} bytes not yet joined to it.
    """
    assert isinstance(transport, FileDescriptor), f"not a FileDescriptor: {transport!r}"
    data_buffer = _internal(transport, "dataBuffer", bytes)
    offset = _internal(transport, "offset", int)
    pending = _internal(transport, "_tempDataLen", int)
    return len(data_buffer) - offset + pending


def curvetun_read_buffer(protocol: CurveTunProtocol) -> int:
    """
    The bytes a curvetun connection has read and not yet delivered (its
    public C{read_buffer_size}: the unfinished frame it holds).
    """
    return protocol.read_buffer_size


def buffered(transport: Any) -> int:
    """
    The bytes a transport holds: for TCP, its write buffer; for a curvetun
    connection, that of its TCP connection plus what it has read and not
    delivered.
    """
    if isinstance(transport, CurveTunProtocol):
        return tcp_write_buffer(transport.transport) + curvetun_read_buffer(transport)
    return tcp_write_buffer(transport)


def _internal(owner: object, name: str, kind: type[T]) -> T:
    value = getattr(owner, name, None)
    assert isinstance(value, kind), (
        f"{type(owner).__name__}.{name} is {value!r}, not {kind.__name__}: the internals "
        "that buffered() reads have changed; update tests/_tap_support.py"
    )
    return value


def tunnel_transports(tunnel: TunnelService) -> list[Any]:
    """
    The transports of every open connection of a tunnel: both sides of
    each forwarded one.
    """
    transports: list[Any] = []
    for listener in tunnel.listeners:
        for connection in listener.connections:
            assert isinstance(connection, (Forwarder, Echo)), connection
            transports += connection.transports()
    return transports


def resident_bytes() -> int:
    """
    This process's resident set size now (Linux: /proc/self/statm); where
    there is no /proc, its peak so far (getrusage), which can only
    understate growth.
    """
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
