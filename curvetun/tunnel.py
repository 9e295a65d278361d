"""
What C{twist curvetun} runs on each connection it accepts: a forwarder,
which pipes the connection both ways to a connection it opens through
another endpoint, or an echo service. Each registers, while open, in the
L{OpenConnections} of its listener, which can then wait for it to finish,
or abort it, when it stops.

Either side of a forwarder may be a curvetun connection: the application
protocol of an accepted curvetun connection starts only once the client is
authenticated, so the forward connection is never opened for a client that
fails the handshake.

With C{send_proxy}, each forward connection starts with a PROXY protocol
header (L{curvetun.proxy_header}) giving the accepted connection's peer as
the source and its local address as the destination; version 2 also
carries the client's authenticated public key when the accepted side is a
curvetun connection (a plain TCP client has none, and gets no key TLV).

Flow control is that of Twisted's L{twisted.protocols.portforward}: each
side's transport is registered as the producer of the other's, so a slow
reader on one side stops the reading of the other and memory stays
bounded whatever the amount carried.
"""

from __future__ import annotations

from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .addresses import format_address
from .direct_send import send_at_once
from .interfaces import ICurveTunTransport
from .keys import fingerprint
from .listeners import OpenConnections
from .packets import MAX_MESSAGE
from .proxy_header import ProxyVersion, proxy_header
from .shared_keys import share_transport_keys
from .transport import CurveTunProtocol

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


class TrackingFactory(Factory[Protocol]):
    """
    A factory whose protocols register in C{connections}, and which
    refuses new connections once that is draining.
    """

    def __init__(self, connections: OpenConnections | None = None) -> None:
        self.connections = connections if connections is not None else OpenConnections()

    def doStart(self) -> None:
        # Before the first accepted connection's transport is made (and so
        # before any forward connection's, which only a forwarder opens).
        share_transport_keys()
        super().doStart()

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
        self.closed = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.factory.connections.add(self)
        # Debug only: the close line says all of it, and a line costs
        # more than a small connection's relaying.
        peer, key = describe_peer(self.transport)
        log.debug("Echo for {peer} (key {key}) opened", peer=peer, key=key)
        self.transport.registerProducer(self.transport, True)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.echoed += len(data)
        self.transport.write(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.closed = True
        # Asked now, not kept for the connection's life (see Forwarder).
        peer, key = describe_peer(self.transport)
        log.info(
            "Echo for {peer} (key {key}) closed: {why}; {echoed} bytes echoed",
            peer=peer,
            key=key,
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

    def transports(self) -> list[ITransport]:
        """
        The connection's transport, while it is open.
        """
        if self.closed or self.transport is None:
            return []
        return [self.transport]


class EchoFactory(TrackingFactory):
    """
    Builds an L{Echo} for each connection.
    """

    protocol = Echo


# -- forwarding ------------------------------------------------------------------


class Forwarder(Protocol):
    """
    The accepted side of a forwarded connection.

    When it starts (for curvetun: once the client is authenticated) it
    stops reading and connects through the factory's forward endpoint; the
    other side, a L{ForwardedConnection}, reports through
    L{forward_side_made}, L{send_back} and L{forward_side_lost}. If the
    forward connection fails, it is logged and this connection closed.
    When both sides are closed, the pair is logged with the bytes carried
    each way.

    @ivar bytes_forwarded: bytes received here and sent to the forward side.
    @ivar bytes_returned: bytes received from the forward side and sent here.
    @ivar forward_side: the forward connection, once it is made.
    @ivar closed: whether this (the accepted) side has ended.
    """

    def __init__(self, forwarding: ForwardingFactory) -> None:
        self.forwarding = forwarding
        self.bytes_forwarded = 0
        self.bytes_returned = 0
        self.forward_side: ForwardedConnection | None = None
        self.closed = False
        self._connecting: Deferred[IProtocol] | None = None
        self._open_sides = 0
        self._first_close = ""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.forwarding.connections.add(self)
        self._open_sides = 1
        # Debug only: the line at the end says all of it, with the outcome
        # (one info line per connection, each costing a JSON encoding).
        peer, key = describe_peer(self.transport)
        log.debug(
            "Connection from {peer} (key {key}): forwarding to {forward}",
            peer=peer,
            key=key,
            forward=self.forwarding.description,
        )
        _no_delay(self.transport)
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
        if self.closed:
            # We cancelled it, as this side closed (or was aborted) first.
            log.debug("Forward connection cancelled: {why}", why=failure.getErrorMessage())
            return
        peer, key = describe_peer(self.transport)
        log.warn(
            "Forwarding {peer} (key {key}) to {forward} failed: {why}",
            peer=peer,
            key=key,
            forward=self.forwarding.description,
            why=failure.getErrorMessage(),
        )
        self._first_close = (
            self._first_close or f"forward connection failed: {failure.getErrorMessage()}"
        )
        if self.transport is not None:
            self.transport.loseConnection()

    # -- what the forward side tells us --------------------------------------

    def forward_side_made(self, forward_side: ForwardedConnection) -> bool:
        """
        The forward connection is made: make each side's transport the
        producer of the other's (so a slow reader on one side stops the
        reading of the other, as in L{twisted.protocols.portforward}), and
        start reading.

        @return: whether to go on; false if this side has closed already
            (the connect could not be cancelled in time), and the forward
            side should abort.
        """
        if self.closed or self.transport is None or forward_side.transport is None:
            # Not counted as a side: the pair has been logged as ended.
            return False
        self.forward_side = forward_side
        self._open_sides += 1
        accepted, forward = self.transport, forward_side.transport
        _no_delay(forward)
        version = self.forwarding.send_proxy
        if version is not None:
            # Before any byte of the client's: the reading starts below.
            forward_side.send(
                proxy_header(version, accepted.getPeer(), accepted.getHost(), _client_key(accepted))
            )
        accepted.registerProducer(forward, True)  # type: ignore[attr-defined]
        forward.registerProducer(accepted, True)  # type: ignore[attr-defined]
        accepted.resumeProducing()  # type: ignore[attr-defined]
        return True

    def send_back(self, data: bytes) -> None:
        """
        Write C{data}, received from the forward side, to this side.
        """
        if self.closed or self.transport is None:
            return  # this side has closed: nowhere to send it
        self.bytes_returned += len(data)
        relay(self.transport, data)
        if len(data) > MAX_MESSAGE and self.forward_side is not None:
            _reads_fit_messages(self.forward_side.transport, self.transport)

    def forward_side_lost(self, forward_side: ForwardedConnection, reason: Failure) -> None:
        """
        The forward side has closed: close this side too, after what it has
        been sent so far.
        """
        if forward_side is not self.forward_side:
            return  # one that L{forward_side_made} turned away
        if not self.closed and self.transport is not None:
            self.transport.loseConnection()
        self._side_closed(reason, "forward side")

    # -- this side -----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        forward_side = self.forward_side
        if forward_side is None or not forward_side.send(data):
            return  # the forward side has closed: nowhere to send it
        self.bytes_forwarded += len(data)
        if len(data) > MAX_MESSAGE:
            _reads_fit_messages(self.transport, forward_side.transport)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.closed = True
        connecting = self._connecting
        if connecting is not None:
            # The forward connection is not made yet: give it up.
            self._first_close = (
                f"client closed before the forward connection was made: {reason.getErrorMessage()}"
            )
            self._side_closed(reason, "client")
            connecting.cancel()
            return
        if self.forward_side is not None:
            self.forward_side.close()
        self._side_closed(reason, "client")

    def _side_closed(self, reason: Failure, side: str) -> None:
        """
        One side has closed: log the pair once both have.
        """
        if not self._first_close:
            self._first_close = f"{side} closed: {reason.getErrorMessage()}"
        self._open_sides -= 1
        if self._open_sides > 0:
            return
        # The peer as the transport still reports it: kept for the
        # connection's life, the strings would cost each idle connection.
        peer, key = describe_peer(self.transport)
        log.info(
            "Connection from {peer} (key {key}) to {forward} ended ({why}); "
            "{forwarded} bytes forwarded, {returned} bytes returned",
            peer=peer,
            key=key,
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
        if self.forward_side is not None:
            self.forward_side.abort()
        if not self.closed and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def transports(self) -> list[ITransport]:
        """
        The transports of the sides still open.
        """
        transports = []
        if not self.closed and self.transport is not None:
            transports.append(self.transport)
        if self.forward_side is not None:
            transports += self.forward_side.transports()
        return transports


def relay(transport: ITransport, data: bytes) -> None:
    """
    Write C{data}, one read of the other side, to C{transport}, and hand it
    to the socket at once (see L{curvetun.direct_send}): a relay has
    nothing to add to it before the next read.

    On a curvetun transport a read that fits goes out as one message
    (C{write} would hold it for the next reactor turn to coalesce it with
    later writes, and a relay writes once per read). The bytes on the wire
    are the same; larger reads go out in messages of the largest size.
    """
    if isinstance(transport, CurveTunProtocol):
        transport.write_now(data)
    elif ICurveTunTransport.providedBy(transport):
        if 0 < len(data) <= MAX_MESSAGE:
            transport.write_message(data)
        else:
            transport.write(data)
    elif data:
        send_at_once(transport, (data,))


def _no_delay(transport: ITransport) -> None:
    """
    Turn Nagle's algorithm off on a plain TCP side: a relay passes on each
    read as it comes, and a small one held back for an ACK would wait up to
    40 ms. (A curvetun side turns it off on its own TCP connection.)
    """
    if ITCPTransport.providedBy(transport):
        transport.setTcpNoDelay(True)


def _reads_fit_messages(reader: ITransport | None, writer: ITransport | None) -> None:
    """
    C{reader} has just read more than a message holds: when its reads are
    relayed to C{writer}, a curvetun side, and it is a plain TCP side, read
    at most one message's worth at a time from now on.

    Twisted's TCP transport reads up to its C{bufferSize}, 64 KiB, and a
    message carries at most 65503 bytes: each full read of a bulk transfer
    would go out as a full message and a 33-byte one, after a copy of the
    first. Reading 65503 bytes makes every read one message, sent as it is.
    (The same number bounds that transport's write buffer before it pauses
    its producer: 33 bytes less than Twisted's default.) Only once a read
    has been that large: the attribute costs an idle connection most of a
    kilobyte (its transport's instance dictionary stops sharing its keys).
    """
    if (
        isinstance(reader, FileDescriptor)
        and writer is not None
        and ICurveTunTransport.providedBy(writer)
        and not ICurveTunTransport.providedBy(reader)
    ):
        reader.bufferSize = MAX_MESSAGE


def _client_key(transport: ITransport) -> bytes | None:
    """
    The authenticated public key of the client on C{transport}, if it is a
    curvetun connection.
    """
    if ICurveTunTransport.providedBy(transport) and transport.peer_public_key:
        key: bytes = transport.peer_public_key
        return key
    return None


class ForwardedConnection(Protocol):
    """
    The side of a forwarded connection that L{Forwarder} opened.

    @ivar closed: whether this connection has ended.
    """

    def __init__(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder
        self.closed = False

    def connectionMade(self) -> None:
        if not self.forwarder.forward_side_made(self):
            # Too late: the accepted side is gone.
            self.abort()

    def dataReceived(self, data: bytes) -> None:
        self.forwarder.send_back(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.closed = True
        self.forwarder.forward_side_lost(self, reason)

    def send(self, data: bytes) -> bool:
        """
        Write C{data} from the accepted side here.

        @return: whether it was written; false once this side has closed.
        """
        if self.closed or self.transport is None:
            return False
        relay(self.transport, data)
        return True

    def close(self) -> None:
        """
        Close this side after what it has been sent so far.
        """
        if not self.closed and self.transport is not None:
            self.transport.loseConnection()

    def abort(self) -> None:
        """
        Close this side now.
        """
        if not self.closed and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def transports(self) -> list[ITransport]:
        """
        This side's transport, while it is open.
        """
        if self.closed or self.transport is None:
            return []
        return [self.transport]


@implementer(IProtocolFactory)
class _ForwardSideFactory:
    """
    Builds the one L{ForwardedConnection} of a L{Forwarder}.

    Not a L{Factory}: the forward endpoint's wrapping keeps it for the
    connection's life, and a slotted object of one attribute is the
    smallest that can be kept. (A L{Factory} has an instance dict, and
    logs "Starting factory" per connection unless told not to.)
    """

    __slots__ = ("forwarder",)

    def __init__(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass

    def buildProtocol(self, addr: IAddress | None) -> ForwardedConnection:
        return ForwardedConnection(self.forwarder)


class ForwardingFactory(TrackingFactory):
    """
    Builds a L{Forwarder} for each accepted connection, forwarding it
    through C{endpoint}.

    @ivar description: the forward endpoint as given (for log messages).
    @ivar send_proxy: the version of the PROXY header each forward
        connection starts with, or L{None} for none.
    """

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        description: str,
        connections: OpenConnections | None = None,
        send_proxy: ProxyVersion | None = None,
    ) -> None:
        super().__init__(connections)
        self.endpoint = endpoint
        self.description = description
        self.send_proxy = send_proxy

    def buildProtocol(self, addr: IAddress | None) -> Forwarder | None:
        if not self.connections.accepting:
            return None
        protocol = Forwarder(self)
        protocol.factory = self
        return protocol
