"""
curvetun over TCP: L{CurveTunProtocol} runs one connection on one TCP
connection and is, once the handshake is done, the transport of the
application's protocol (as Twisted's TLS layer is).

    TCP bytes -> frames (curvetun.framing)
              -> handshake: parse (curvetun.packets) -> machine input
                 (curvetun.connection) -> send frame / established / close
              -> established: open (curvetun.established) -> application
    application write() -> coalesce, chunk -> seal -> frame -> TCP

Each phase has one owner. Until the handshake is done, the machine decides
everything: it says which packet it expects next, and the frame decoder
refuses a frame of any other length as soon as its length prefix is read
(each handshake packet has one size). From the machine's C{established}
output on, an L{Established} object holds the session and is the only thing
that seals and opens messages.

When the application hears of it, on each side:

  - Server: the application's protocol is made, and its transport
    connected, when the client's vouch has verified; if the protocol
    provides L{IHandshakeListener}, its C{handshakeCompleted} is called
    right after C{connectionMade}.
  - Client: the application's protocol is made, and its transport
    connected (and the endpoint's C{connect()} fires), as soon as the vouch
    is sent, before the server has answered: the application may write at
    once, and TCP delivers the vouch first. The server is known to have
    accepted the vouch only when its first message opens: then, before that
    message is delivered, C{handshakeCompleted} is called. A server that
    refuses the vouch closes the connection instead; the application's
    C{connectionLost} then says so (L{curvetun.errors.NotAuthorized}).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IDelayedCall,
    IHandshakeListener,
    IProducer,
    IProtocol,
    IPushProducer,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from .addresses import peer_host
from .connection import ConnectionInputs, ConnectionOwner, HandshakePacket
from .direct_send import send_at_once
from .errors import (
    BadPacket,
    ConnectionClosed,
    HandshakeEvicted,
    HandshakeTimeout,
)
from .established import Established
from .framing import FrameDecoder
from .interfaces import ICurveTunTransport
from .packets import COOKIE_SIZE, HELLO_SIZE, VOUCH_SIZE, Cookie, Hello, Vouch, parse_as
from .session import Session

if TYPE_CHECKING:
    from .factories import _CurveTunFactory

# Each handshake packet has one size: the only frame length valid when it
# is expected (spec "Framing" and sections 1-3).
_SIZES: dict[type, int] = {Hello: HELLO_SIZE, Cookie: COOKIE_SIZE, Vouch: VOUCH_SIZE}
_NAMES = {HELLO_SIZE: "hello", COOKIE_SIZE: "cookie", VOUCH_SIZE: "vouch"}


class _StreamTransport(TypingProtocol):
    """
    The parts of a TCP transport that L{CurveTunProtocol} uses.
    """

    def writeSequence(self, data: Iterable[bytes]) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def getPeer(self) -> IAddress: ...
    def getHost(self) -> IAddress: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def stopProducing(self) -> None: ...
    def registerProducer(self, producer: IProducer, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...


@implementer(ICurveTunTransport, IConsumer, IPushProducer)
class CurveTunProtocol(Protocol):
    """
    One curvetun connection over one TCP connection.

    It is built by a factory of L{curvetun.factories} with a function that
    makes its machine. When the peer is authenticated it builds the
    application's protocol from C{factory.wrappedFactory} and hands itself
    to it as its transport.

    The figures of the connection (L{bytes_received}, L{bytes_sent},
    L{established_at}, L{last_received_at}, L{last_sent_at}) are read-only
    and cheap to read; times are the factory clock's seconds.

    @ivar wrappedProtocol: the application's protocol, once there is one.
    @ivar peer_public_key: the peer's authenticated long-term public key,
        once the handshake is done.
    @ivar peer_host: the peer's IP address (empty if it has none), once
        connected.
    @ivar hello_verified: whether the peer sent a hello that verified
        (servers only).
    @ivar disconnecting: whether L{loseConnection} or L{abortConnection}
        was called.
    """

    # What we use of the TCP transport under us (narrower than Protocol's
    # Optional[ITransport]: we only run while connected).
    transport: _StreamTransport  # type: ignore[assignment]

    def __init__(
        self,
        factory: _CurveTunFactory,
        make_machine: Callable[[ConnectionOwner], ConnectionInputs],
    ) -> None:
        # Every attribute is set here, none later: CPython (3.11) lets the
        # instances of a class share their attribute dicts' keys only if the
        # class learns all its keys from its first few instances. One
        # learned later, while many connections are open (a loaded server
        # starting, a bench opening 16 at a time), makes every later
        # instance's dict a dict of its own: some 0.8 KiB per connection.
        self.wrappedProtocol: IProtocol | None = None
        self.peer_public_key = b""
        self.peer_host = ""
        self.hello_verified = False
        self.disconnecting = False
        # The machine waits for its vault: frames wait too (hold_frames).
        self._holding = False
        # The application paused us (pauseProducing), and has not resumed.
        self._paused = False
        self.factory = factory
        self._frames = FrameDecoder(self._frame_too_early)
        self._machine = make_machine(self)
        self._established: Established | None = None
        # The first-packet and whole-handshake deadlines, while they run.
        self._hello_deadline: IDelayedCall | None = None
        self._handshake_deadline: IDelayedCall | None = None
        self._waiting: Deferred[IProtocol] | None = None

    # -- TCP side ----------------------------------------------------------

    def connectionMade(self) -> None:
        # The peer as the transport reports it: behind a PROXY-protocol
        # wrapper, the address from the header (unknown at buildProtocol).
        self.peer_host = peer_host(self.transport.getPeer())
        refusal = self.factory.connection_made(self)
        if refusal is not None:
            self._machine.close(refusal)
            return
        if ITCPTransport.providedBy(self.transport):
            # Each handshake step is one small packet waiting on an answer:
            # Nagle's algorithm would hold each back by up to 40 ms.
            self.transport.setTcpNoDelay(True)
        clock = self.factory.clock
        hello_timeout = self.factory.hello_timeout
        if hello_timeout is not None:
            self._hello_deadline = clock.callLater(hello_timeout, self._first_packet_late)
        handshake_timeout = self.factory.handshake_timeout
        if handshake_timeout is not None:
            self._handshake_deadline = clock.callLater(handshake_timeout, self._handshake_late)
        self._machine.connection_made()

    def dataReceived(self, data: bytes) -> None:
        established = self._established
        if established is not None:
            established.receive(data)
            return
        self._frames.feed(data)
        established = self._established
        if established is not None:
            # Established in this read (a vouch and the client's first
            # messages): what the application wrote in answer goes now.
            established.flush()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._machine.connection_lost(reason)

    # -- the handshake phase ----------------------------------------------------

    def _frame_too_early(self, frame: bytes) -> None:
        # No packet is expected before the machine says which: the client's
        # first frame can only come after its hello (and the server's
        # machine expects the hello as soon as it is connected).
        self._machine.close(BadPacket("a frame arrived before the handshake started"))

    def _frame_refused(self, length: int, expected: int) -> None:
        self._machine.bad_packet(
            BadPacket(f"{_NAMES.get(expected, 'packet')} must be {expected} bytes, got {length}")
        )

    def _first_packet_late(self) -> None:
        self._hello_deadline = None
        self._machine.close(
            HandshakeTimeout(
                f"no first packet within {self.factory.hello_timeout} seconds of connecting"
            )
        )

    def _handshake_late(self) -> None:
        self._handshake_deadline = None
        self._machine.close(HandshakeTimeout("the handshake did not complete in time"))

    def _cancel_deadlines(self) -> None:
        for deadline in (self._hello_deadline, self._handshake_deadline):
            if deadline is not None and deadline.active():
                deadline.cancel()
        self._hello_deadline = self._handshake_deadline = None

    # -- what the machine asks of us (ConnectionOwner) -----------------------

    def send_frame(self, payload: bytes) -> None:
        # A vectored send, not write(prefix + payload): no copy; and at
        # once, not a reactor turn later, as each packet answers a read.
        send_at_once(self.transport, (len(payload).to_bytes(2, "big"), payload))

    def expect_packet(
        self, packet_type: type[HandshakePacket], receiver: Callable[[HandshakePacket], None]
    ) -> None:
        machine = self._machine

        def handshake_frame(frame: bytes) -> None:
            hello_deadline = self._hello_deadline
            if hello_deadline is not None:
                # A whole first packet arrived, in time.
                self._hello_deadline = None
                hello_deadline.cancel()
            try:
                packet = parse_as(frame, packet_type)
            except BadPacket as error:
                machine.bad_packet(error)
            else:
                receiver(packet)

        self._frames.deliver_to(handshake_frame)
        self._frames.expect(_SIZES[packet_type], self._frame_refused)
        if self._holding:
            self._release_frames()
            self._frames.resume()

    def hold_frames(self) -> None:
        # The peer may send its first messages right after its vouch, before
        # our vault has answered: keep them (and stop reading TCP, so that
        # a peer cannot make us buffer without bound) until the machine
        # says what comes next.
        self._holding = True
        self._frames.pause()
        self.transport.pauseProducing()

    def _release_frames(self) -> None:
        self._holding = False
        self.transport.resumeProducing()

    def hello_accepted(self) -> None:
        self.hello_verified = True

    def established(
        self,
        session: Session,
        peer_public_key: bytes,
        message_opened: Callable[[], None] | None,
    ) -> None:
        self._cancel_deadlines()
        self.peer_public_key = peer_public_key
        factory = self.factory
        machine = self._machine
        established = self._established = Established(
            session,
            self._frames,
            self.transport,
            factory.clock,
            machine,
            message_opened,
            factory.idle_timeout,
        )
        factory.handshake_completed(self)
        protocol = factory.wrappedFactory.buildProtocol(self.getPeer())
        if protocol is None:
            machine.close(ConnectionDone("the application refused the connection"))
            return
        self.wrappedProtocol = protocol
        established.deliver_to(protocol)
        protocol.makeConnection(self)
        if self._holding and not self._paused:
            # The frames held while the vault answered: now the
            # application's (unless it paused us as it started).
            self._release_frames()
            established.resume()
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback(protocol)

    def handshake_confirmed(self) -> None:
        protocol = self.wrappedProtocol
        if protocol is not None and IHandshakeListener.providedBy(protocol):
            protocol.handshakeCompleted()

    def disconnect(self) -> None:
        # Nothing more that arrives matters: not even the rest of the
        # current read (a refused peer must not cost a parse per frame).
        self._frames.stop()
        if self._established is not None:
            self._established.stop()
        self.transport.loseConnection()

    def lost(self, reason: Failure) -> None:
        self._frames.stop()
        if self._established is not None:
            self._established.stop()
        self._cancel_deadlines()
        self.factory.connection_ended(self, reason)
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.connectionLost(reason)
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.errback(reason)

    # -- what the server's admission asks of us (admission.Candidate) --------

    def evict(self) -> None:
        """
        Abort this unfinished handshake now, to make room for a newer
        connection.
        """
        self._machine.close(
            HandshakeEvicted("evicted: the server is at its limit of unfinished handshakes")
        )
        self.transport.abortConnection()

    # -- the application's transport (ICurveTunTransport) -------------------

    def write(self, data: bytes) -> None:
        """
        Send C{data} as part of a byte stream, in messages of at most 65503
        bytes. An empty write sends nothing, as with TCP.

        Small writes made in the same reactor turn are coalesced into one
        message (as Twisted's TLS transport coalesces them into one record):
        writes made while a read is delivered go out when that read is
        done, others at the next reactor iteration. Use L{write_message} to
        keep a message's boundary. Writes after L{loseConnection} are
        dropped.

        @raise curvetun.errors.ConnectionClosed: the handshake is not done.
        """
        # The per-write path (a bulk sender calls it for every chunk): the
        # phase is looked up here rather than through _phase.
        established = self._established
        if established is None:
            self._phase()  # raises
        else:
            established.write(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self._phase().write(b"".join(data))

    def write_message(self, data: bytes) -> None:
        self._phase().write_message(data)

    def write_now(self, data: bytes) -> None:
        """
        Send C{data}, one read of another connection, and hand it to the
        TCP socket at once rather than at the reactor's next turn: for a
        relay, which writes once per read of the other side. As one message
        if it fits in one, else in messages of the largest size; the bytes
        on the wire are those L{write} would send.

        @raise curvetun.errors.ConnectionClosed: the handshake is not done.
        """
        self._phase().write_now(data)

    def _phase(self) -> Established:
        established = self._established
        if established is None:
            # The application gets this transport only once the handshake
            # is done: a programming error, not a peer's.
            raise ConnectionClosed("cannot send before the handshake is complete")
        return established

    def loseConnection(self) -> None:
        """
        Close after every message written so far has been sent. Idempotent.
        """
        self.disconnecting = True
        if self._established is not None:
            self._established.flush()
        self._machine.close(ConnectionDone("connection closed locally"))

    def abortConnection(self) -> None:
        """
        Close at once, discarding anything not yet sent.
        """
        self.disconnecting = True
        # The machine closes first, so that nothing read after this point
        # is processed and coalesced writes are dropped; then TCP drops
        # what it has not sent.
        self._machine.close(ConnectionDone("connection closed locally"))
        self.transport.abortConnection()

    def abort_with(self, reason: Exception) -> None:
        """
        Close at once, as L{abortConnection} does, for C{reason}: the log
        line of the connection's end and the application's
        C{connectionLost} give C{reason}.
        """
        self.disconnecting = True
        self._machine.close(reason)
        self.transport.abortConnection()

    def getPeer(self) -> IAddress:
        return self.transport.getPeer()

    def getHost(self) -> IAddress:
        return self.transport.getHost()

    # Flow control. Writes reach TCP at once, or (coalesced) within the
    # reactor turn, less than one message's worth held back; TCP buffers
    # them, so the application's producer can be TCP's producer: TCP pauses
    # it when its buffer fills. In the other direction, pausing us stops both
    # the reading of TCP and the delivery of frames already read.

    def pauseProducing(self) -> None:
        self._paused = True
        self._frames.pause()
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        self._holding = False
        if self._frames.stopped:
            return
        self.transport.resumeProducing()
        if self._established is not None:
            self._established.resume()
        else:
            self._frames.resume()

    def stopProducing(self) -> None:
        self._frames.pause()
        self.transport.stopProducing()

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()

    # -- figures ---------------------------------------------------------------

    @property
    def bytes_received(self) -> int:
        """
        Application bytes received so far (in messages that opened).
        """
        return 0 if self._established is None else self._established.bytes_received

    @property
    def bytes_sent(self) -> int:
        """
        Application bytes sent so far (sealed into messages).
        """
        return 0 if self._established is None else self._established.bytes_sent

    @property
    def established_at(self) -> float | None:
        """
        When the handshake was done, or L{None} before.
        """
        return None if self._established is None else self._established.established_at

    @property
    def last_received_at(self) -> float | None:
        """
        When the last message from the peer opened, or L{None} before the
        first.
        """
        return None if self._established is None else self._established.last_received_at

    @property
    def last_sent_at(self) -> float | None:
        """
        When the last message to the peer was sent, or L{None} before the
        first.
        """
        return None if self._established is None else self._established.last_sent_at

    @property
    def raw_bytes_received(self) -> int:
        """
        Bytes read from TCP so far, frames and handshake included.
        """
        return self._frames.received

    @property
    def read_buffer_size(self) -> int:
        """
        Bytes read from TCP and not yet delivered: frames not yet whole, or
        held while paused.
        """
        return self._frames.buffered

    # -- for the endpoint --------------------------------------------------------

    def when_established(self) -> Deferred[IProtocol]:
        """
        A Deferred that fires with the application's protocol when the
        handshake completes (client: once the vouch is sent; see the module
        docstring), or fails with the reason the connection ended before
        that. Cancelling it aborts the connection. Call it at most once,
        before the handshake completes (the endpoint does).
        """
        assert self._waiting is None and self.wrappedProtocol is None
        self._waiting = Deferred(self._cancel_handshake)
        return self._waiting

    def _cancel_handshake(self, waiting: Deferred[IProtocol]) -> None:
        self._waiting = None
        self.abortConnection()
