"""
What C{twist curvetun} runs on each connection it accepts: a forwarder,
which pipes the connection both ways to a connection it opens through
another endpoint, or an echo service; and L{OpenConnections}, which lets a
listener wait for its connections to finish when it stops.

Either side of a forwarder may be a curvetun connection: the application
protocol of an accepted curvetun connection starts only once the client is
authenticated, so the forward connection is never opened for a client that
fails the handshake.

Flow control comes from Twisted's L{twisted.protocols.portforward}: each
side's transport is registered as the producer of the other's, so a slow
reader on one side stops the reading of the other and memory stays
bounded whatever the amount carried.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IProtocol,
    IReactorTime,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.portforward import Proxy, ProxyClient
from twisted.python.failure import Failure

from .interfaces import ICurveTunTransport
from .keys import fingerprint
from .transport import format_address

log = Logger()


def describe_peer(transport: ITransport | None) -> tuple[str, str]:
    """
    The peer of C{transport} for a log message: its address (see
    L{format_address}), and the fingerprint of its authenticated long-term
    key, or C{"-"} if it is not a curvetun connection.
    """
    if transport is None:
        return "-", "-"
    address = format_address(transport.getPeer())
    key = "-"
    if ICurveTunTransport.providedBy(transport):
        public_key = transport.peer_public_key
        if public_key:
            key = fingerprint(public_key)
    return address, key


class Abortable(TypingProtocol):
    """
    A connection that L{OpenConnections} can close at once.
    """

    def abort(self) -> None:
        """
        Close the connection now, dropping whatever has not been sent.
        """


class OpenConnections:
    """
    The open connections of one listener, so that stopping can wait for
    them to finish and abort those that take too long.

    @ivar accepting: false once L{drain} has begun; factories then refuse
        new connections.
    """

    def __init__(self) -> None:
        self.accepting = True
        self._open: set[Abortable] = set()
        self._waiting: list[Deferred[None]] = []

    def __len__(self) -> int:
        return len(self._open)

    def __iter__(self) -> Iterator[Abortable]:
        return iter(list(self._open))

    def add(self, connection: Abortable) -> None:
        """
        C{connection} has opened.
        """
        self._open.add(connection)

    def remove(self, connection: Abortable) -> None:
        """
        C{connection} has closed (idempotent).
        """
        self._open.discard(connection)
        if not self._open:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    def when_empty(self) -> Deferred[None]:
        """
        A Deferred that fires once no connection is open (at once if none
        is).
        """
        if not self._open:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d

    def drain(self, grace: float, clock: IReactorTime) -> Deferred[int]:
        """
        Refuse new connections, wait up to C{grace} seconds for the open ones
        to close, then abort the rest.

        @return: a Deferred that fires, once every connection is closed,
            with the number of connections that had to be aborted.
        """
        self.accepting = False
        done: Deferred[int] = Deferred()

        def closed_in_time(_: None) -> None:
            if timer.active():
                timer.cancel()
                done.callback(0)

        def abort_the_rest() -> None:
            late = list(self._open)
            log.info(
                "Aborting {count} connection(s) still open after {grace} seconds",
                count=len(late),
                grace=grace,
            )
            for connection in late:
                connection.abort()
            self.when_empty().addCallback(lambda _: done.callback(len(late)))

        timer = clock.callLater(grace, abort_the_rest)
        self.when_empty().addCallback(closed_in_time)
        return done


class TrackingFactory(Factory[Protocol]):
    """
    A factory whose protocols register in C{connections}, and which
    refuses new connections once that is draining.
    """

    def __init__(self, connections: OpenConnections | None = None) -> None:
        self.connections = connections if connections is not None else OpenConnections()

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        if not self.connections.accepting:
            # Stopping: a TCP accept is closed at once; a curvetun handshake
            # that completes now ends with "the application refused".
            return None
        return super().buildProtocol(addr)


# -- echo ----------------------------------------------------------------------


class Echo(Protocol):
    """
    Writes back what it receives. The transport is its own producer, so a
    peer that does not read what is echoed stops being read from, rather
    than filling our memory.
    """

    factory: EchoFactory

    def __init__(self) -> None:
        self.echoed = 0
        self._peer = ("-", "-")

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.factory.connections.add(self)
        self._peer = describe_peer(self.transport)
        log.info("Echo for {peer} (key {key}) opened", peer=self._peer[0], key=self._peer[1])
        self.transport.registerProducer(self.transport, True)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.echoed += len(data)
        self.transport.write(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        log.info(
            "Echo for {peer} (key {key}) closed: {why}; {echoed} bytes echoed",
            peer=self._peer[0],
            key=self._peer[1],
            why=reason.getErrorMessage(),
            echoed=self.echoed,
        )
        self.factory.connections.remove(self)

    def abort(self) -> None:
        """
        See L{Abortable.abort}.
        """
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


class EchoFactory(TrackingFactory):
    """
    Builds an L{Echo} for each connection.
    """

    protocol = Echo


# -- forwarding ------------------------------------------------------------------


class Forwarder(Proxy):
    """
    The accepted side of a forwarded connection.

    When it starts (for curvetun: once the client is authenticated) it
    stops reading and connects through the factory's forward endpoint; the
    other side, a L{ForwardedConnection}, wires the two transports together
    and resumes reading. If the forward connection fails, it is logged and
    this connection closed. When both sides are closed, the pair is logged
    with the bytes carried each way.

    It extends L{Proxy} rather than L{portforward.ProxyServer}, whose only
    method, the one that connects, is the one replaced here.

    @ivar bytes_forwarded: bytes received here and sent to the forward side.
    @ivar bytes_returned: bytes received from the forward side and sent here.
    """

    def __init__(self, forwarding: ForwardingFactory) -> None:
        self.forwarding = forwarding
        self.bytes_forwarded = 0
        self.bytes_returned = 0
        self.forward_side: ForwardedConnection | None = None
        self._connecting: Deferred[IProtocol] | None = None
        self._open_sides = 0
        self._accepted_side_closed = False
        self._first_close = ""
        self._peer = ("-", "-")

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.forwarding.connections.add(self)
        self._open_sides = 1
        self._peer = describe_peer(self.transport)
        log.info(
            "Connection from {peer} (key {key}): forwarding to {forward}",
            peer=self._peer[0],
            key=self._peer[1],
            forward=self.forwarding.description,
        )
        # Read nothing until there is somewhere to send it.
        self.transport.pauseProducing()  # type: ignore[attr-defined]
        # Kept before the callbacks are added, which clear it: connect may
        # have fired already.
        self._connecting = self.forwarding.endpoint.connect(_ForwardSideFactory(self))
        self._connecting.addCallbacks(self._forward_connected, self._forward_failed)

    def _forward_connected(self, protocol: IProtocol) -> None:
        self._connecting = None

    def _forward_failed(self, failure: Failure) -> None:
        self._connecting = None
        if self._accepted_side_closed:
            # We cancelled it, as this side closed (or was aborted) first.
            log.debug("Forward connection cancelled: {why}", why=failure.getErrorMessage())
            return
        log.warn(
            "Forwarding {peer} (key {key}) to {forward} failed: {why}",
            peer=self._peer[0],
            key=self._peer[1],
            forward=self.forwarding.description,
            why=failure.getErrorMessage(),
        )
        self._first_close = (
            self._first_close or f"forward connection failed: {failure.getErrorMessage()}"
        )
        if self.transport is not None:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        forward_side = self.forward_side
        if forward_side is None or forward_side.closed or forward_side.transport is None:
            return  # the forward side has closed: nowhere to send it
        self.bytes_forwarded += len(data)
        forward_side.transport.write(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._accepted_side_closed = True
        self.peer = None
        connecting = self._connecting
        if connecting is not None:
            # The forward connection is not made yet: give it up.
            self._first_close = (
                f"client closed before the forward connection was made: {reason.getErrorMessage()}"
            )
            self._side_closed(reason, "client")
            connecting.cancel()
            return
        forward_side = self.forward_side
        if (
            forward_side is not None
            and not forward_side.closed
            and forward_side.transport is not None
        ):
            forward_side.transport.loseConnection()
        self._side_closed(reason, "client")

    def _forward_side_made(self, forward_side: ForwardedConnection) -> None:
        self.forward_side = forward_side
        self._open_sides += 1

    def _side_closed(self, reason: Failure, side: str) -> None:
        """
        One side has closed: log the pair once both have.
        """
        if not self._first_close:
            self._first_close = f"{side} closed: {reason.getErrorMessage()}"
        self._open_sides -= 1
        if self._open_sides > 0:
            return
        log.info(
            "Connection from {peer} (key {key}) to {forward} ended ({why}); "
            "{forwarded} bytes forwarded, {returned} bytes returned",
            peer=self._peer[0],
            key=self._peer[1],
            forward=self.forwarding.description,
            why=self._first_close,
            forwarded=self.bytes_forwarded,
            returned=self.bytes_returned,
        )
        # Last: whoever waits for the connections to close may act at once.
        self.forwarding.connections.remove(self)

    def abort(self) -> None:
        """
        See L{Abortable.abort}: abort both sides, or the forward connection
        being made.
        """
        if self._connecting is not None:
            self._connecting.cancel()
        forward_side = self.forward_side
        if (
            forward_side is not None
            and not forward_side.closed
            and forward_side.transport is not None
        ):
            forward_side.transport.abortConnection()  # type: ignore[attr-defined]
        if not self._accepted_side_closed and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


class ForwardedConnection(ProxyClient):
    """
    The side of a forwarded connection that L{Forwarder} opened.
    L{ProxyClient.connectionMade} registers each side's transport as the
    producer of the other's and resumes the accepted side's reading.

    @ivar closed: whether this connection has ended.
    """

    def __init__(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder
        self.closed = False
        self.setPeer(forwarder)

    def connectionMade(self) -> None:
        self.forwarder._forward_side_made(self)
        if self.forwarder._accepted_side_closed:
            # Too late: the accepted side is gone (the connect was not
            # cancellable in time).
            assert self.transport is not None
            self.transport.abortConnection()  # type: ignore[attr-defined]
            return
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        forwarder = self.forwarder
        if forwarder._accepted_side_closed or forwarder.transport is None:
            return  # the accepted side has closed: nowhere to send it
        forwarder.bytes_returned += len(data)
        forwarder.transport.write(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.closed = True
        self.peer = None
        forwarder = self.forwarder
        if not forwarder._accepted_side_closed and forwarder.transport is not None:
            # After what it has been sent so far.
            forwarder.transport.loseConnection()
        forwarder._side_closed(reason, "forward side")


class _ForwardSideFactory(Factory[Protocol]):
    """
    Builds the one L{ForwardedConnection} of a L{Forwarder}.
    """

    def __init__(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder

    def buildProtocol(self, addr: IAddress | None) -> ForwardedConnection:
        protocol = ForwardedConnection(self.forwarder)
        protocol.factory = self  # type: ignore[assignment]
        return protocol


class ForwardingFactory(TrackingFactory):
    """
    Builds a L{Forwarder} for each accepted connection, forwarding it
    through C{endpoint}.

    @ivar description: the forward endpoint as given (for log messages).
    """

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        description: str,
        connections: OpenConnections | None = None,
    ) -> None:
        super().__init__(connections)
        self.endpoint = endpoint
        self.description = description

    def buildProtocol(self, addr: IAddress | None) -> Forwarder | None:
        if not self.connections.accepting:
            return None
        protocol = Forwarder(self)
        protocol.factory = self  # type: ignore[assignment]
        return protocol
