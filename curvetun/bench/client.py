"""
The client side of the library benchmark: the client protocol every
figure uses, the backpressured writer, and the measurements themselves,
each timed with C{time.perf_counter} on the benchmark's own reactor.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import attrs
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from .figures import LOCALHOST, MEMORY_CONCURRENCY, SMALL, STREAM_CHUNK, BenchError
from .server import ServerProcess, set_no_delay
from .transports import Connector


class _Client(Protocol):
    """
    The client protocol of every figure, on every transport. It counts
    the bytes it receives and lets one caller at a time wait for the next
    so many (L{expect}); L{ping_pong} runs round trips from
    C{dataReceived} with no Deferred per round trip.
    """

    def __init__(self) -> None:
        self.received = 0
        self.closed: Deferred[None] = Deferred()
        self._claimed = 0
        self._target = 0
        self._waiting: Deferred[None] | None = None
        self._pings_left = 0
        self._ping = b""

    def connectionMade(self) -> None:
        set_no_delay(self.transport)

    def expect(self, count: int) -> Deferred[None]:
        """
        A Deferred that fires once C{count} more bytes have arrived than
        earlier calls claimed.
        """
        assert self._waiting is None
        self._claimed += count
        waiting: Deferred[None] = Deferred()
        if self.received >= self._claimed:
            waiting.callback(None)
        else:
            self._target = self._claimed
            self._waiting = waiting
        return waiting

    def ping_pong(self, ping: bytes, count: int) -> Deferred[None]:
        """
        Write C{ping} C{count} times, each time once the whole echo of the
        previous one is back; fire when the last echo is back.
        """
        assert self.transport is not None and count > 0
        self._ping = ping
        self._pings_left = count - 1
        done = self.expect(len(ping))
        self.transport.write(ping)
        return done

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self._waiting is None or self.received < self._target:
            return
        if self._pings_left:
            self._pings_left -= 1
            self._claimed += len(self._ping)
            self._target = self._claimed
            assert self.transport is not None
            self.transport.write(self._ping)
            return
        waiting, self._waiting = self._waiting, None
        waiting.callback(None)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.errback(reason)
        self.closed.callback(None)

    async def close(self) -> None:
        """
        Close the connection and wait until it is closed.
        """
        assert self.transport is not None
        self.transport.loseConnection()
        await self.closed


@implementer(IPushProducer)
class Pump:
    """
    Writes C{count} copies of C{piece} through C{write} as fast as the
    transport takes them: the transport pauses it when its buffer is full
    and resumes it when the buffer has drained; every C{batch} writes it
    lets the reactor run (so that TLS's write aggregation flushes and
    acknowledgements are read).

    @ivar done: fires when the last piece is written.
    """

    def __init__(
        self,
        clock: IReactorTime,
        write: Callable[[bytes], object],
        piece: bytes,
        count: int,
        batch: int,
    ) -> None:
        self.done: Deferred[None] = Deferred()
        self._clock = clock
        self._write = write
        self._piece = piece
        self._left = count
        self._batch = batch
        self._paused = False
        self._running = False
        self._stopped = False
        self._scheduled: IDelayedCall | None = None

    def start(self) -> Deferred[None]:
        """
        Start writing; returns L{done}.
        """
        self._run()
        return self.done

    def _run(self) -> None:
        self._scheduled = None
        if self._running or self._stopped:
            return
        self._running = True
        try:
            write, piece = self._write, self._piece
            batch = min(self._batch, self._left)
            written = 0
            while written < batch and not self._paused:
                write(piece)
                written += 1
            self._left -= written
        finally:
            self._running = False
        if self._left == 0:
            if not self.done.called:
                self.done.callback(None)
        elif not self._paused and not self._stopped and self._scheduled is None:
            self._scheduled = self._clock.callLater(0, self._run)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self._left and not self._running and self._scheduled is None:
            self._run()

    def stopProducing(self) -> None:
        self._stopped = True
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        self._scheduled = None
        if not self.done.called:
            self.done.errback(ConnectionDone("the transport stopped the writer"))


class _ControlClient(LineReceiver):
    """
    Asks a server's control port for its memory use.
    """

    delimiter = b"\n"

    def __init__(self) -> None:
        self._answers: list[Deferred[bytes]] = []

    def ask_rss(self) -> Deferred[tuple[int, int]]:
        """
        The server's resident bytes and its number of open echo
        connections.
        """
        answer: Deferred[bytes] = Deferred()
        self._answers.append(answer)
        self.sendLine(b"rss")

        def parse(line: bytes) -> tuple[int, int]:
            rss, open_connections = line.split()
            return int(rss), int(open_connections)

        return answer.addCallback(parse)

    def lineReceived(self, line: bytes) -> None:
        self._answers.pop(0).callback(line)


async def connect(connector: Connector, port: int, server_key: bytes) -> _Client:
    """
    Connect a L{_Client} through C{connector} (through the whole
    handshake, for curvetun).
    """
    return await connect_endpoint(connector.endpoint(port, server_key))


async def connect_endpoint(endpoint: IStreamClientEndpoint) -> _Client:
    """
    Connect a L{_Client} through C{endpoint}.
    """
    protocol = await endpoint.connect(Factory.forProtocol(_Client))
    assert isinstance(protocol, _Client)
    return protocol


@attrs.define
class Peer:
    """
    What the measurements connect to, and how: the echo and sink ports
    (of a server process, or of a tunnel in front of one) and the
    connector of the transport.

    @ivar key: the server's curvetun public key (empty for other
        transports).
    @ivar control_port: the server process's control port (0: none).
    """

    name: str
    connector: Connector
    echo_port: int
    sink_port: int
    key: bytes = b""
    control_port: int = 0

    @classmethod
    def of(cls, connector: Connector, server: ServerProcess) -> Peer:
        """
        The peer that is C{server}, reached through C{connector}.
        """
        return cls(
            connector.transport,
            connector,
            server.echo_port,
            server.sink_port,
            server.key,
            server.control_port,
        )

    async def connect_echo(self) -> _Client:
        """
        A connection to the echo service.
        """
        return await connect(self.connector, self.echo_port, self.key)

    async def connect_sink(self) -> _Client:
        """
        A connection to the sink service.
        """
        return await connect(self.connector, self.sink_port, self.key)


# -- the measurements ---------------------------------------------------------


def _perf_counter() -> float:
    return time.perf_counter()


async def measure_stream(
    peer: Peer,
    piece: bytes,
    count: int,
    batch: int,
    message_api: bool = False,
) -> float:
    """
    Write C{piece} C{count} times to the sink with backpressure (through
    C{write_message} with C{message_api}, else C{write}); return the
    seconds from the first write until the sink confirms the last byte.
    """
    client = await peer.connect_sink()
    transport: Any = client.transport
    # Announce the count and wait for the answer: every handshake is over
    # (TLS finishes its own on the first write) before the clock starts.
    transport.write((len(piece) * count).to_bytes(8, "big"))
    await client.expect(1)
    confirmed = client.expect(1)
    write = transport.write_message if message_api else transport.write
    pump = Pump(peer.connector.reactor, write, piece, count, batch)
    started = _perf_counter()
    transport.registerProducer(pump, True)
    await pump.start()
    transport.unregisterProducer()
    await confirmed
    elapsed = _perf_counter() - started
    await client.close()
    return elapsed


async def measure_bulk(peer: Peer, count: int) -> float:
    """
    Bulk one-way: C{count} writes of 65503 bytes.
    """
    return await measure_stream(peer, b"\xa5" * STREAM_CHUNK, count, batch=16)


async def measure_pipelined(peer: Peer, count: int, message_api: bool = False) -> float:
    """
    Pipelined: C{count} writes (or messages) of 100 bytes.
    """
    return await measure_stream(peer, b"\x5a" * SMALL, count, batch=1000, message_api=message_api)


async def measure_ping_pong(peer: Peer, count: int) -> float:
    """
    C{count} round trips of 100 bytes on one connection (after ten
    untimed ones).
    """
    client = await peer.connect_echo()
    ping = b"\x3c" * SMALL
    await client.ping_pong(ping, 10)
    started = _perf_counter()
    await client.ping_pong(ping, count)
    elapsed = _perf_counter() - started
    await client.close()
    return elapsed


async def _handshake(peer: Peer, ping: bytes) -> None:
    """
    Connect, one round trip, close.
    """
    client = await peer.connect_echo()
    await client.ping_pong(ping, 1)
    await client.close()


async def measure_handshakes(peer: Peer, count: int, clients: int = 1) -> float:
    """
    C{count} times: connect, one 100-byte round trip, close; by
    C{clients} clients at once, each doing its share in sequence.
    """
    ping = b"\x3c" * SMALL

    async def client_loop(share: int) -> None:
        for _ in range(share):
            await _handshake(peer, ping)

    shares = [count // clients + (1 if i < count % clients else 0) for i in range(clients)]
    started = _perf_counter()
    await gatherResults(
        [Deferred.fromCoroutine(client_loop(share)) for share in shares if share],
        consumeErrors=True,
    )
    return _perf_counter() - started


async def open_idle(peer: Peer, count: int) -> list[_Client]:
    """
    Open C{count} echo connections, L{MEMORY_CONCURRENCY} at a time, each
    established on both sides (one byte there and back).
    """
    opened: list[_Client] = []
    left = iter(range(count))

    async def opener() -> None:
        for _ in left:
            client = await peer.connect_echo()
            opened.append(client)
            await client.ping_pong(b"!", 1)

    await gatherResults(
        [Deferred.fromCoroutine(opener()) for _ in range(min(count, MEMORY_CONCURRENCY))],
        consumeErrors=True,
    )
    return opened


async def close_all(clients: Iterable[_Client]) -> None:
    await gatherResults(
        [Deferred.fromCoroutine(client.close()) for client in clients], consumeErrors=True
    )


async def measure_idle_memory(peer: Peer, connections: int) -> float:
    """
    The growth of the (fresh) server's resident memory, in KiB per
    connection, when C{connections} idle established connections are
    added to as many already open.

    The first ones fill memory that start-up (imports, building the
    machines) touched and freed; that costs them nothing and would hide
    the cost of a connection. None is closed before the end, so no
    connection reuses what another one freed.
    """

    control = await TCP4ClientEndpoint(
        peer.connector.reactor, LOCALHOST, peer.control_port
    ).connect(Factory.forProtocol(_ControlClient))
    assert isinstance(control, _ControlClient)
    first = await open_idle(peer, connections)
    before, _ = await control.ask_rss()
    clients = await open_idle(peer, connections)
    after, open_connections = await control.ask_rss()
    await close_all(first + clients)
    assert control.transport is not None
    control.transport.loseConnection()
    if open_connections != len(first) + connections:
        raise BenchError(
            f"the {peer.name} server counts {open_connections} open connections,"
            f" not {len(first) + connections}"
        )
    return (after - before) / connections / 1024


def crypto_rate(operation: Callable[[], object], duration: float) -> float:
    """
    Calls of C{operation} per second, over at least C{duration} seconds.
    """
    count = 0
    batch = 16
    started = _perf_counter()
    while True:
        for _ in itertools.repeat(None, batch):
            operation()
        count += batch
        elapsed = _perf_counter() - started
        if elapsed >= duration:
            return count / elapsed
        batch = min(batch * 2, 4096)


def crypto_operations() -> dict[str, Callable[[], object]]:
    """
    The in-process crypto ceiling's operations, by figure key: PyNaCl box
    and open with a precomputed key (what a session does per message),
    and X25519 (what a handshake does a few times).
    """
    from nacl.bindings import (
        crypto_box_beforenm,
        crypto_box_easy_afternm,
        crypto_box_keypair,
        crypto_box_open_easy_afternm,
    )

    _, secret_key = crypto_box_keypair()
    peer_public_key, _ = crypto_box_keypair()
    shared = crypto_box_beforenm(peer_public_key, secret_key)
    nonce = bytes(24)
    operations: dict[str, Callable[[], object]] = {}
    for size in (SMALL, STREAM_CHUNK):
        message = b"\x42" * size
        box = crypto_box_easy_afternm(message, nonce, shared)
        operations[f"box_{size}"] = partial(crypto_box_easy_afternm, message, nonce, shared)
        operations[f"open_{size}"] = partial(crypto_box_open_easy_afternm, box, nonce, shared)
    operations["x25519"] = partial(crypto_box_beforenm, peer_public_key, secret_key)
    return operations
