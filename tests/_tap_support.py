"""
Fixtures for the C{twist curvetun} tests: key directories, tunnels started
from command lines, a producer-driven hashing client, a hashing echo
backend, log capture, and a measure of what the transports buffer.
"""

from __future__ import annotations

import hashlib
import os
import sys
from typing import Any, cast

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from curvetun.endpoints import service_pool
from curvetun.keys import format_public_key
from curvetun.registry import FileRegistry
from curvetun.tap import Options, TunnelService, make_tunnel
from curvetun.transport import CurveTunProtocol
from curvetun.tunnel import Echo, Forwarder
from curvetun.vault import FileVault

from ._support import tcp_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- key directories and tunnels ---------------------------------------------------


def make_keydir(testcase: SynchronousTestCase) -> tuple[str, bytes]:
    """
    A new key directory in the test's temporary space; its path and public
    key. The vault is closed again, so the code under test can load it.
    """
    keydir = os.path.abspath(testcase.mktemp())
    vault = FileVault.create(keydir)
    vault.close()
    testcase.addCleanup(forget_keydir, keydir)
    return keydir, vault.public_key


def forget_keydir(keydir: str) -> None:
    """
    Drop the pool's service for C{keydir} (loaded by an endpoint string
    under test) and release its directory: the pool is process-wide.
    """
    service = service_pool.forget_keydir(keydir)
    if service is not None:
        close = getattr(service.vault, "close", None)
        if close is not None:
            close()


def admit(keydir: str, client_key: bytes) -> None:
    """
    Let C{client_key} connect from 127.0.0.1 to the server of C{keydir}.
    """
    FileRegistry(os.path.join(keydir, "registry")).add("127.0.0.1", client_key, "test client")


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def start_tunnel(
    testcase: SynchronousTestCase, *argv: str, clock: IReactorTime | None = None
) -> TunnelService:
    """
    Build the service of C{twist curvetun ARGV} and start it; it is stopped
    (if the test did not) at cleanup.
    """
    tunnel = make_tunnel(parse(*argv), reactor, clock)
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
    return tcp_port(port)


def hex_key(key: bytes) -> str:
    return format_public_key(key)


# -- logs ---------------------------------------------------------------------


def capture_logs(testcase: SynchronousTestCase) -> list[LogEvent]:
    """
    Every log event emitted until the end of the test.
    """
    events: list[LogEvent] = []
    # Any callable taking an event is a log observer; ILogObserver only
    # names that shape.
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    testcase.addCleanup(globalLogPublisher.removeObserver, observer)
    return events


def events_like(events: list[LogEvent], format_start: str) -> list[LogEvent]:
    """
    The events whose format begins with C{format_start}.
    """
    return [e for e in events if (e.get("log_format") or "").startswith(format_start)]


# -- peers --------------------------------------------------------------------


class Collector(Protocol):
    """
    A client that keeps what it receives; C{received_enough} fires once it
    has C{expected} bytes, C{lost} with the reason the connection ended.
    """

    def __init__(self, expected: int = 0) -> None:
        self.data = b""
        self.expected = expected
        self.received_enough: Deferred[bytes] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self.reason: Failure | None = None

    def expect(self, count: int) -> Deferred[bytes]:
        """
        Wait for C{count} more bytes (those received from now on).
        """
        self.data = b""
        self.expected = count
        self.received_enough = Deferred()
        return self.received_enough

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if len(self.data) >= self.expected and not self.received_enough.called:
            self.received_enough.callback(self.data)

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        # The reason is kept, not passed: a Failure would errback.
        self.reason = reason
        self.lost.callback(None)


async def round_trip(collector: Collector, data: bytes) -> bytes:
    """
    Write C{data} and wait for as many bytes back.
    """
    waiting = collector.expect(len(data))
    assert collector.transport is not None
    collector.transport.write(data)
    return await waiting


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


def buffered(transport: Any) -> int:
    """
    The bytes a transport holds: for TCP, its write buffer (Twisted's
    C{FileDescriptor} keeps C{dataBuffer} from C{offset} on, plus
    C{_tempDataLen} bytes not yet joined); for a curvetun connection, that
    of its TCP connection plus the frames it has read but not delivered.
    """
    if transport is None:
        return 0
    if isinstance(transport, CurveTunProtocol):
        return buffered(transport.transport) + len(getattr(transport, "_unprocessed", b""))
    data_buffer = getattr(transport, "dataBuffer", b"")
    return (
        len(data_buffer) - getattr(transport, "offset", 0) + getattr(transport, "_tempDataLen", 0)
    )


def tunnel_transports(tunnel: TunnelService) -> list[Any]:
    """
    The transports of every open connection of a tunnel: both sides of
    each forwarded one.
    """
    transports = []
    for listener in tunnel.listeners:
        for connection in listener.factory.connections:
            assert isinstance(connection, (Forwarder, Echo))
            transports.append(connection.transport)
            if isinstance(connection, Forwarder) and connection.forward_side is not None:
                transports.append(connection.forward_side.transport)
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
