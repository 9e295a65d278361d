"""
The message API: curvetun connections as channels of whole messages, with
Deferreds, in the spirit of Erlang's C{gen_tcp} (and of the original
C{curve_tun} API)::

    listener = await listen(serverEndpoint)
    channel = await listener.accept()
    message = await channel.recv()
    await channel.send(b"reply")
    await channel.close()

    channel = await connect(clientEndpoint)

Each C{send} is received by exactly one C{recv}, whole. Several pending
C{recv} calls are served in the order they were made. Once the connection
is closed, C{recv} first returns the messages that had already arrived, then
fails at once.
"""

from __future__ import annotations

from collections import deque

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IPushProducer,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from .errors import ConnectionClosed, CurveTunError
from .transport import CurveTunProtocol


@implementer(IPushProducer)
class MessageChannel(Protocol):
    """
    One established curvetun connection, as messages.

    Flow control works both ways. Received messages that nobody has asked
    for yet are queued; past C{high_water} of them the channel stops
    reading from the network until C{recv} drains the queue below
    C{low_water}. C{send}'s Deferred fires once the network can take more:
    a sender that waits for it never fills memory faster than the peer
    reads.
    """

    high_water = 64
    low_water = 16
    # A channel runs only on a curvetun transport.
    transport: CurveTunProtocol

    def __init__(self) -> None:
        self._received: deque[bytes] = deque()
        self._receivers: deque[Deferred[bytes]] = deque()
        self._senders: deque[Deferred[None]] = deque()
        self._closers: list[Deferred[None]] = []
        self._closed: Failure | None = None
        self._reading_paused = False
        self._sending_paused = False

    @property
    def peer_public_key(self) -> bytes:
        """
        The peer's long-term public key, authenticated by the handshake.
        """
        return self.transport.peer_public_key

    @property
    def peer_address(self) -> IAddress:
        """
        The peer's network address.
        """
        return self.transport.getPeer()

    def recv(self) -> Deferred[bytes]:
        """
        Receive the next message.

        @return: a Deferred that fires with the message, or fails with
            L{ConnectionClosed} (or the handshake error that ended the
            connection, such as L{curvetun.errors.NotAuthorized}) once the
            connection is closed and every message that arrived before has
            been received.
        """
        if self._received:
            message = self._received.popleft()
            if self._reading_paused and len(self._received) <= self.low_water:
                self._reading_paused = False
                self.transport.resumeProducing()
            return succeed(message)
        if self._closed is not None:
            return fail(self._closed)
        waiting: Deferred[bytes] = Deferred(self._receivers.remove)
        self._receivers.append(waiting)
        return waiting

    def send(self, message: bytes) -> Deferred[None]:
        """
        Send C{message} (at most 65503 bytes) as one message.

        @return: a Deferred that fires when the network can take more
            (at once, unless it is backed up), or fails with
            L{curvetun.errors.MessageTooLong} or L{ConnectionClosed}.
        """
        if self._closed is not None:
            return fail(self._closed)
        try:
            self.transport.write_message(message)
        except CurveTunError:
            return fail()
        if not self._sending_paused:
            return succeed(None)
        waiting: Deferred[None] = Deferred(self._senders.remove)
        self._senders.append(waiting)
        return waiting

    def close(self) -> Deferred[None]:
        """
        Close the connection after every message sent so far.

        @return: a Deferred that fires when the connection is closed.
        """
        if self._closed is not None:
            return succeed(None)
        closing: Deferred[None] = Deferred()
        self._closers.append(closing)
        self.transport.loseConnection()
        return closing

    # -- IProtocol -----------------------------------------------------------

    def connectionMade(self) -> None:
        # We produce what we send: TCP pauses us when its buffer fills.
        self.transport.registerProducer(self, True)

    def dataReceived(self, message: bytes) -> None:
        if self._receivers:
            self._receivers.popleft().callback(message)
            return
        self._received.append(message)
        if not self._reading_paused and len(self._received) >= self.high_water:
            self._reading_paused = True
            self.transport.pauseProducing()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        if reason.check(ConnectionDone):
            reason = Failure(ConnectionClosed("the connection is closed"))
        self._closed = reason
        receivers, self._receivers = self._receivers, deque()
        for receiver in receivers:
            receiver.errback(reason)
        senders, self._senders = self._senders, deque()
        for sender in senders:
            sender.errback(reason)
        closers, self._closers = self._closers, []
        for closer in closers:
            closer.callback(None)

    # -- IPushProducer (the sending side) ------------------------------------

    def pauseProducing(self) -> None:
        self._sending_paused = True

    def resumeProducing(self) -> None:
        self._sending_paused = False
        while self._senders and not self._sending_paused:
            self._senders.popleft().callback(None)

    def stopProducing(self) -> None:
        # The connection is going away; connectionLost settles everything.
        pass


def connect(endpoint: IStreamClientEndpoint) -> Deferred[MessageChannel]:
    """
    Connect through a curvetun client endpoint (for instance one made by
    C{clientFromString(reactor, "curvetun:host:port:key=...")}).
    """
    return endpoint.connect(Factory.forProtocol(MessageChannel))  # type: ignore[return-value]


class MessageListener(Factory):
    """
    A listening curvetun port whose connections are accepted as
    L{MessageChannel}s, in the order they were established.
    """

    protocol = MessageChannel
    port: IListeningPort | None = None

    def __init__(self) -> None:
        self._accepted: deque[MessageChannel] = deque()
        self._accepters: deque[Deferred[MessageChannel]] = deque()

    def accept(self) -> Deferred[MessageChannel]:
        """
        The next established connection: a Deferred that fires with it.
        """
        if self._accepted:
            return succeed(self._accepted.popleft())
        waiting: Deferred[MessageChannel] = Deferred(self._accepters.remove)
        self._accepters.append(waiting)
        return waiting

    def close(self) -> Deferred[None]:
        """
        Stop listening; established connections are not affected.
        """
        assert self.port is not None
        stopped: Deferred[None] | None = self.port.stopListening()
        return succeed(None) if stopped is None else stopped

    def buildProtocol(self, addr: IAddress | None) -> MessageChannel:
        return _AcceptedChannel(self)

    def _established(self, channel: MessageChannel) -> None:
        if self._accepters:
            self._accepters.popleft().callback(channel)
        else:
            self._accepted.append(channel)


class _AcceptedChannel(MessageChannel):
    """
    A channel that announces itself to its listener once established.
    """

    def __init__(self, listener: MessageListener) -> None:
        super().__init__()
        self.factory = listener
        self._listener = listener

    def connectionMade(self) -> None:
        super().connectionMade()
        self._listener._established(self)


def listen(endpoint: IStreamServerEndpoint) -> Deferred[MessageListener]:
    """
    Listen on a curvetun server endpoint (for instance one made by
    C{serverFromString(reactor, "curvetun:7700")}).
    """
    listener = MessageListener()

    def listening(port: IListeningPort) -> MessageListener:
        listener.port = port
        return listener

    return endpoint.listen(listener).addCallback(listening)
