"""
curvetun over TCP: a protocol that runs a connection machine on TCP frames
and is, once the handshake is done, the transport of the application's
protocol (as Twisted's TLS layer is).

    TCP bytes -> frame (Int16StringReceiver) -> parse (curvetun.packets)
              -> machine input (curvetun.connection) -> send frame /
                 deliver to the application / close
    application write() -> coalesce, chunk -> seal -> frame -> TCP

Once a connection is established its machine hands the session to this
protocol (the per-message fast path): message frames are opened, and
application messages sealed, without a machine input each; anything that
does not verify still goes to the machine, which closes.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Protocol as TypingProtocol

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IDelayedCall,
    IProducer,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import Int16StringReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from .connection import (
    ClientCore,
    ClientMachine,
    ConnectionInputs,
    ServerCore,
    ServerMachine,
)
from .errors import BadPacket, CounterExhausted, IdleTimeout, MessageTooLong
from .handshake import CookieSealer
from .interfaces import ICurveTunTransport, IRegistry, IVault
from .keys import fingerprint
from .packets import MAX_MESSAGE, MAX_PAYLOAD, MESSAGE_MAGIC, Cookie, Hello, Message, Vouch, parse
from .session import Session

DEFAULT_HANDSHAKE_TIMEOUT = 10.0
"""
Seconds a connection may take from TCP connect to a completed handshake.
"""

_LENGTH = struct.Struct(">H")

log = Logger()


def format_address(address: IAddress) -> str:
    """
    An address for a log message: C{host:port} (C{[host]:port} for IPv6),
    or its C{str} if it is not an IP address.
    """
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is None or port is None:
        return str(address)
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


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


@attrs.frozen
class ConnectionLimits:
    """
    How many connections a server takes at once. Past a limit, a new TCP
    connection is closed as soon as it is accepted, before any crypto;
    established connections are not affected. L{None} means no limit.

    @ivar connections: established or handshaking connections, in all.
    @ivar connections_per_address: the same, from one IP address.
    @ivar handshakes: connections whose handshake is not complete.
    @ivar handshakes_per_address: the same, from one IP address.
    """

    connections: int | None = 4096
    connections_per_address: int | None = 256
    handshakes: int | None = 512
    handshakes_per_address: int | None = 32


@implementer(ICurveTunTransport, IConsumer, IPushProducer)
class CurveTunProtocol(Int16StringReceiver, TimeoutMixin):
    """
    One curvetun connection over one TCP connection.

    Before the handshake completes it talks only to its machine. When the
    peer is authenticated it builds the application's protocol from
    C{factory.wrappedFactory} and hands itself to it as its transport.

    @ivar wrappedProtocol: the application's protocol, once there is one.
    @ivar peer_public_key: the peer's authenticated long-term public key,
        once the handshake is done.
    """

    # Every payload fits the 2-byte length prefix (spec, "Framing").
    MAX_LENGTH = MAX_PAYLOAD

    # What we use of the TCP transport under us (narrower than Protocol's
    # Optional[ITransport]: we only run while connected).
    transport: _StreamTransport  # type: ignore[assignment]
    wrappedProtocol: IProtocol | None = None
    peer_public_key: bytes = b""
    peer_host = ""
    disconnecting = False
    handshake_done = False
    # Defaults on the class, not the instance: an idle connection's memory
    # holds only what it has set (the budget is 4 KiB a connection).
    _receiving = False
    _input_closed = False
    _close_reason: Failure | None = None
    _handshake_timer: IDelayedCall | None = None
    _waiting: Deferred[IProtocol] | None = None
    _lost_reported = False
    # Set by the machine once messages may bypass it (the fast path).
    _send_session: Session | None = None
    _receive_session: Session | None = None
    # Stream writes waiting to be coalesced (see write).
    _pending_writes: list[bytes] | None = None
    _pending_size = 0
    _flush_call: IDelayedCall | None = None

    # The machine's input for each packet type that parse() returns.
    _INPUTS: dict[type, str] = {
        Message: "message_received",
        Hello: "hello_received",
        Cookie: "cookie_received",
        Vouch: "vouch_received",
    }

    def __init__(
        self,
        factory: _CurveTunFactory,
        make_machine: Callable[[CurveTunProtocol], ConnectionInputs],
    ) -> None:
        self.factory = factory
        self._machine = make_machine(self)

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        """
        Schedule on the factory's clock (for TimeoutMixin's idle timeout).
        """
        clock: IReactorTime = self.factory.clock
        return clock.callLater(period, func)

    # -- TCP side ----------------------------------------------------------

    def connectionMade(self) -> None:
        if ITCPTransport.providedBy(self.transport):
            # Each handshake step is one small packet waiting on an answer:
            # Nagle's algorithm would hold each back by up to 40 ms.
            self.transport.setTcpNoDelay(True)
        timeout = self.factory.handshake_timeout
        if timeout is not None:
            self._handshake_timer = self.factory.clock.callLater(timeout, self._machine.timed_out)
        self._machine.connection_made()

    def dataReceived(self, data: bytes) -> None:
        if self._input_closed:
            return
        self.resetTimeout()
        self._receiving = True
        try:
            super().dataReceived(data)
        finally:
            self._receiving = False
        # What the application wrote in answer to this read goes out now,
        # coalesced, without waiting for the next reactor iteration.
        if self._pending_writes:
            self._flush_writes()

    def stringReceived(self, frame: bytes) -> None:
        session = self._receive_session
        if session is not None and frame.startswith(MESSAGE_MAGIC):
            # The per-message fast path (see ConnectionOwner.receiving_with):
            # no packet object, no machine input.
            try:
                plaintext = session.open_payload(frame)
            except BadPacket as error:
                self._machine.bad_packet(error)
                return
            self.wrappedProtocol.dataReceived(plaintext)  # type: ignore[union-attr]
            return
        try:
            packet = parse(frame)
        except BadPacket as error:
            self._machine.bad_packet(error)
        else:
            getattr(self._machine, self._INPUTS[type(packet)])(packet)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._discard_writes()
        self._cancel_timer()
        self.setTimeout(None)
        self._machine.connection_lost(reason)

    # -- what the machine asks of us (ConnectionOwner) -----------------------

    def send_frame(self, payload: bytes) -> None:
        # writeSequence, not write(prefix + payload): no 64 KiB copy.
        self.transport.writeSequence((_LENGTH.pack(len(payload)), payload))

    def sending_with(self, session: Session) -> None:
        self._send_session = session

    def receiving_with(self, session: Session) -> None:
        self._receive_session = session

    def deliver(self, message: bytes) -> None:
        assert self.wrappedProtocol is not None
        self.wrappedProtocol.dataReceived(message)

    def handshake_complete(self, peer_public_key: bytes) -> None:
        self._cancel_timer()
        self.handshake_done = True
        self.peer_public_key = peer_public_key
        self.factory.handshake_completed(self)
        self.setTimeout(self.factory.idle_timeout)
        protocol = self.factory.wrappedFactory.buildProtocol(self.getPeer())
        if protocol is None:
            self.disconnect(ConnectionDone("the application refused the connection"))
            return
        self.wrappedProtocol = protocol
        protocol.makeConnection(self)
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback(protocol)

    def disconnect(self, reason: BaseException) -> None:
        self._send_session = self._receive_session = None
        # Nothing more that arrives matters: stop Int16StringReceiver's loop
        # over the frames of the current read (a refused peer must not cost
        # a parse per frame) and ignore later reads.
        self._input_closed = self.paused = True
        if self._close_reason is None:
            self._close_reason = Failure(reason)
        self.transport.loseConnection()

    def lost(self, reason: Failure) -> None:
        self._send_session = self._receive_session = None
        if self._lost_reported:
            return
        self._lost_reported = True
        # What we closed for says more than TCP's "connection done".
        if self._close_reason is not None:
            reason = self._close_reason
        self.factory.connection_ended(self, reason)
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.connectionLost(reason)
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.errback(reason)

    # -- the application's transport (ICurveTunTransport) -------------------

    def write(self, data: bytes) -> None:
        """
        Send C{data} as part of a byte stream, in messages of at most 65503
        bytes. An empty write sends nothing, as with TCP.

        Small writes made in the same reactor turn are coalesced into one
        message (as Twisted's TLS transport coalesces them into one record):
        writes made while a read is delivered go out when that read is
        done, others at the next reactor iteration. Use L{write_message} to
        keep a message's boundary.
        """
        pending = self._pending_writes
        if pending:
            pending.append(data)
            size = self._pending_size = self._pending_size + len(data)
            if size >= MAX_MESSAGE:
                self._flush_writes()
            return
        if not data:
            return
        if len(data) >= MAX_MESSAGE:
            # Nothing to coalesce with: straight out, without a copy.
            self._send_stream(data)
            return
        self._pending_writes = [data]
        self._pending_size = len(data)
        if not self._receiving:
            self._flush_call = self.factory.clock.callLater(0, self._flush_writes)

    def _flush_writes(self) -> None:
        """
        Send what L{write} has buffered.
        """
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        pending = self._pending_writes
        if pending:
            data = b"".join(pending) if len(pending) > 1 else pending[0]
            self._pending_writes = None
            self._pending_size = 0
            self._send_stream(data)

    def _send_stream(self, data: bytes) -> None:
        if len(data) <= MAX_MESSAGE:
            self._send(data)
            return
        view = memoryview(data)
        for start in range(0, len(data), MAX_MESSAGE):
            self._send(bytes(view[start : start + MAX_MESSAGE]))

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def write_message(self, data: bytes) -> None:
        if len(data) > MAX_MESSAGE:
            raise MessageTooLong(f"a message can be at most {MAX_MESSAGE} bytes, not {len(data)}")
        # Stream data written before goes first.
        self._flush_writes()
        self._send(data)

    def _send(self, message: bytes) -> None:
        session = self._send_session
        if session is None:
            self._machine.send(message)
            return
        # The per-message fast path (see ConnectionOwner.sending_with).
        try:
            frame = session.seal_frame(message)
        except CounterExhausted:
            # The machine closes the connection for this.
            self._machine.send(message)
        else:
            self.transport.writeSequence(frame)

    def loseConnection(self) -> None:
        """
        Close after every message written so far has been sent. Idempotent.
        """
        self.disconnecting = True
        self._flush_writes()
        self._machine.close()

    def abortConnection(self) -> None:
        """
        Close at once, discarding anything not yet sent.
        """
        self.disconnecting = True
        self._discard_writes()
        # The machine closes first, so that nothing read after this point
        # is processed; then TCP drops what it has not sent.
        self._machine.close()
        self.transport.abortConnection()

    def getPeer(self) -> IAddress:
        return self.transport.getPeer()

    def getHost(self) -> IAddress:
        return self.transport.getHost()

    # Flow control. Writes reach TCP at once, or (coalesced) within the
    # reactor turn, less than one message's worth held back; TCP buffers
    # them, so the application's producer can be TCP's producer: TCP pauses
    # it when its buffer fills. In the other direction, pausing us stops both
    # the reading of TCP and the delivery of frames already read
    # (Int16StringReceiver's pauseProducing/resumeProducing).

    def resumeProducing(self) -> None:
        if self._input_closed:
            return
        self.paused = False
        self.transport.resumeProducing()
        # Int16StringReceiver would re-enter dataReceived here, and a
        # re-entered dataReceived processes the frames of the current read a
        # second time. Inside dataReceived, its loop carries on by itself.
        if not self._receiving:
            self.dataReceived(b"")

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()

    def timeoutConnection(self) -> None:
        """
        The idle timeout passed with nothing received: close.
        """
        self.disconnect(IdleTimeout(f"nothing received for {self.factory.idle_timeout} seconds"))
        self._machine.close()

    # -- internals -----------------------------------------------------------

    def when_established(self) -> Deferred[IProtocol]:
        """
        A Deferred that fires with the application's protocol when the
        handshake completes (client: once the vouch is sent), or fails with
        the reason the connection ended before that. Cancelling it aborts
        the connection. Call it at most once, before the handshake completes
        (the endpoint does).
        """
        assert self._waiting is None and self.wrappedProtocol is None
        self._waiting = Deferred(self._cancel_handshake)
        return self._waiting

    def _cancel_handshake(self, waiting: Deferred[IProtocol]) -> None:
        self._waiting = None
        self.abortConnection()

    def _discard_writes(self) -> None:
        self._pending_writes = None
        self._pending_size = 0
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None

    def _cancel_timer(self) -> None:
        if self._handshake_timer is not None:
            if self._handshake_timer.active():
                self._handshake_timer.cancel()
            self._handshake_timer = None


@implementer(IProtocolFactory)
class _CurveTunFactory(Factory):
    """
    What server and client factories share: the application's factory,
    the clock for the handshake timeout, and connection logging.
    """

    # No "Starting factory" / "Stopping factory" log lines: a client
    # factory starts and stops with every connection, and each connection's
    # end is logged already.
    noisy = False

    def __init__(
        self,
        wrappedFactory: IProtocolFactory,
        vault: IVault,
        clock: IReactorTime,
        handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
        idle_timeout: float | None = None,
    ) -> None:
        self.wrappedFactory = wrappedFactory
        self.vault = vault
        self.clock = clock
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.ended_callbacks: list[Callable[[CurveTunProtocol, Failure], None]] = []
        """
        Called with each connection of this factory when it ends, after it
        is logged.
        """

    def doStart(self) -> None:
        self.wrappedFactory.doStart()
        super().doStart()

    def doStop(self) -> None:
        self.wrappedFactory.doStop()
        super().doStop()

    def handshake_completed(self, protocol: CurveTunProtocol) -> None:
        """
        C{protocol}'s peer is authenticated.
        """

    def connection_ended(self, protocol: CurveTunProtocol, reason: Failure) -> None:
        """
        Log how a connection ended: peer address, peer key fingerprint when
        known, and why.
        """
        peer = format_address(protocol.getPeer())
        key = fingerprint(protocol.peer_public_key) if protocol.peer_public_key else "-"
        if protocol.wrappedProtocol is None:
            log.info(
                "curvetun handshake with {peer} failed: {why}",
                peer=peer,
                why=reason.getErrorMessage(),
            )
        else:
            log.info(
                "curvetun connection with {peer} (key {key}) closed: {why}",
                peer=peer,
                key=key,
                why=reason.getErrorMessage(),
            )
        for callback in self.ended_callbacks:
            callback(protocol, reason)


class CurveTunServerFactory(_CurveTunFactory):
    """
    Accepts curvetun connections and runs C{wrappedFactory}'s protocols on
    the authenticated ones.
    """

    def __init__(
        self,
        wrappedFactory: IProtocolFactory,
        vault: IVault,
        cookie_keys: CookieSealer,
        registry: IRegistry,
        remember_vouch: Callable[[bytes], bool],
        clock: IReactorTime,
        handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
        idle_timeout: float | None = None,
        limits: ConnectionLimits = ConnectionLimits(),
    ) -> None:
        super().__init__(wrappedFactory, vault, clock, handshake_timeout, idle_timeout)
        self.cookie_keys = cookie_keys
        self.registry = registry
        self.remember_vouch = remember_vouch
        self.limits = limits
        # Live counts, per peer host and in all, for the limits.
        self._connections: Counter[str] = Counter()
        self._handshakes: Counter[str] = Counter()
        self._refused = 0
        self._refusals_logged_at: float | None = None

    def _over_limit(self, peer_host: str) -> str | None:
        limits = self.limits
        for count, limit, what in (
            (self._connections.total(), limits.connections, "connections"),
            (
                self._connections[peer_host],
                limits.connections_per_address,
                "connections from one address",
            ),
            (self._handshakes.total(), limits.handshakes, "unfinished handshakes"),
            (
                self._handshakes[peer_host],
                limits.handshakes_per_address,
                "unfinished handshakes from one address",
            ),
        ):
            if limit is not None and count >= limit:
                return f"{limit} {what}"
        return None

    def _log_refusal(self, peer_host: str, limit: str) -> None:
        # Under a flood, one line every 10 seconds, with a count.
        self._refused += 1
        now = self.clock.seconds()
        if self._refusals_logged_at is None or now - self._refusals_logged_at >= 10:
            log.warn(
                "curvetun refused {count} connection(s), the last from {peer}:"
                " limit of {limit} reached",
                count=self._refused,
                peer=peer_host,
                limit=limit,
            )
            self._refused = 0
            self._refusals_logged_at = now

    def buildProtocol(self, addr: IAddress | None) -> CurveTunProtocol | None:
        # Non-IP transports have no host: only a "*" registry entry admits them.
        peer_host = getattr(addr, "host", "")
        limit = self._over_limit(peer_host)
        if limit is not None:
            # Returning None makes Twisted close the socket at once.
            self._log_refusal(peer_host, limit)
            return None
        self._connections[peer_host] += 1
        self._handshakes[peer_host] += 1

        def make_machine(owner: CurveTunProtocol) -> ConnectionInputs:
            return ServerMachine(
                ServerCore(
                    owner,
                    self.vault,
                    self.cookie_keys,
                    self.registry,
                    peer_host,
                    self.remember_vouch,
                )
            )

        protocol = CurveTunProtocol(self, make_machine)
        protocol.peer_host = peer_host
        return protocol

    def handshake_completed(self, protocol: CurveTunProtocol) -> None:
        self._uncount(self._handshakes, protocol.peer_host)

    def connection_ended(self, protocol: CurveTunProtocol, reason: Failure) -> None:
        if not protocol.handshake_done:
            self._uncount(self._handshakes, protocol.peer_host)
        self._uncount(self._connections, protocol.peer_host)
        super().connection_ended(protocol, reason)

    @staticmethod
    def _uncount(counter: Counter[str], host: str) -> None:
        counter[host] -= 1
        if counter[host] <= 0:
            del counter[host]


class CurveTunClientFactory(_CurveTunFactory):
    """
    Makes curvetun connections to a server with long-term key
    C{server_key} and runs C{wrappedFactory}'s protocol on each.
    """

    def __init__(
        self,
        wrappedFactory: IProtocolFactory,
        vault: IVault,
        server_key: bytes,
        clock: IReactorTime,
        handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
        idle_timeout: float | None = None,
    ) -> None:
        super().__init__(wrappedFactory, vault, clock, handshake_timeout, idle_timeout)
        self.server_key = server_key

    def buildProtocol(self, addr: IAddress | None) -> CurveTunProtocol:
        def make_machine(owner: CurveTunProtocol) -> ConnectionInputs:
            return ClientMachine(ClientCore(owner, self.vault, self.server_key))

        return CurveTunProtocol(self, make_machine)
