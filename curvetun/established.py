"""
The established phase of a connection: one L{Established} object per
connection, from the end of the handshake to the close.

It owns the L{Session} and is the only thing that seals and opens messages:

    frame (from curvetun.framing) -> open -> the application's dataReceived
    the application's write()     -> coalesce, chunk -> seal -> TCP

and it keeps the connection's figures (application bytes each way, when it
was established, when the last message went each way) and its idle
timeout, which only a whole message that opened restarts.

What it cannot decide it reports to its L{Verdicts} (the connection's
machine): a frame that does not open goes to C{bad_packet}, a session that
cannot go on (its counter is exhausted) or an idle timeout to C{close}; the
machine then closes, and the connection calls L{Established.stop}.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol as TypingProtocol

from twisted.internet.interfaces import IDelayedCall, IProtocol, IReactorTime

from .direct_send import send_at_once
from .errors import BadPacket, CounterExhausted, IdleTimeout, MessageTooLong
from .framing import FrameDecoder
from .packets import MAX_MESSAGE, MESSAGE_MAGIC, Message, parse_as
from .session import Session


class FrameWriter(TypingProtocol):
    """
    Where sealed frames go: a TCP transport.
    """

    def writeSequence(self, data: Iterable[bytes]) -> None: ...


class Verdicts(TypingProtocol):
    """
    Who hears what the established phase cannot decide: the connection's
    machine.
    """

    def bad_packet(self, reason: BadPacket) -> None:
        "A frame did not open: close for C{reason}."

    def close(self, reason: Exception) -> None:
        "The session cannot go on (C{reason}): close."


class Established:
    """
    The established phase of one connection.

    Small writes made in the same reactor turn are coalesced into one
    message, as Twisted's TLS transport (C{_AggregateSmallWrites}) coalesces
    them into one record: writes made while a read is delivered go out when
    that read is done (L{receive}), others at the next reactor iteration.

    What is sealed during one event (a read delivered, the coalesced
    writes flushed a turn later, a relay's message: L{write_now}) is held,
    and handed to the socket at the event's end in one vectored send
    (L{curvetun.direct_send.send_at_once}), not a reactor turn later
    through the TCP transport's buffer. Anything else sealed (a
    L{write_message} from a timer, say) goes to the transport's buffer, as
    any write to a Twisted transport does.

    @ivar established_at: when the phase started (the clock's seconds).
    @ivar last_received_at: when the last message from the peer opened, or
        L{None} before the first.
    @ivar last_sent_at: when the last message to the peer was sealed, or
        L{None} before the first.
    @ivar bytes_received: application bytes received (opened) so far.
    @ivar bytes_sent: application bytes sent (sealed) so far.
    """

    __slots__ = (
        "_clock",
        "_flush_call",
        "_frames",
        "_held",
        "_idle_call",
        "_idle_timeout",
        "_message_opened",
        "_pending",
        "_pending_size",
        "_protocol",
        "_reading",
        "_session",
        "_transport",
        "_verdicts",
        "bytes_received",
        "bytes_sent",
        "established_at",
        "last_received_at",
        "last_sent_at",
    )

    def __init__(
        self,
        session: Session,
        frames: FrameDecoder,
        transport: FrameWriter,
        clock: IReactorTime,
        verdicts: Verdicts,
        message_opened: Callable[[], None] | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        """
        @param frames: the connection's frame decoder; from now on its
            frames come here.
        @param transport: where sealed frames are written.
        @param verdicts: told of a frame that does not open
            (C{bad_packet}), of a session that cannot go on or an idle
            timeout (C{close}).
        @param message_opened: called once, when the first message opens,
            before it is delivered.
        @param idle_timeout: seconds without a message from the peer after
            which to C{close}, or L{None}.
        """
        self._session: Session | None = session
        self._frames = frames
        # Objects, not bound methods: an idle connection's memory counts.
        self._transport = transport
        self._clock = clock
        self._verdicts = verdicts
        self._message_opened = message_opened
        self._protocol: IProtocol | None = None
        self._reading = False
        # The frames sealed during the event being handled, to be sent at
        # its end in one system call; None outside such an event.
        self._held: list[bytes] | None = None
        # Stream writes waiting to be coalesced (see write).
        self._pending: list[bytes] | None = None
        self._pending_size = 0
        self._flush_call: IDelayedCall | None = None
        self.established_at: float = clock.seconds()
        self.last_received_at: float | None = None
        self.last_sent_at: float | None = None
        self.bytes_received = 0
        self.bytes_sent = 0
        self._idle_timeout = idle_timeout
        self._idle_call: IDelayedCall | None = None
        if idle_timeout is not None:
            self._idle_call = clock.callLater(idle_timeout, self._check_idle)
        frames.expect(None)
        frames.deliver_to(self.frame_received)

    def deliver_to(self, protocol: IProtocol) -> None:
        """
        Deliver the messages that open to C{protocol}.
        """
        self._protocol = protocol

    # -- receiving ---------------------------------------------------------

    def receive(self, data: bytes) -> None:
        """
        One read from TCP: feed it to the frames, then send what the
        application wrote in answer, coalesced, and hand it to the socket,
        without waiting for the next reactor iteration.
        """
        self._reading = True
        self._held = []
        try:
            self._frames.feed(data)
        finally:
            self._reading = False
        if self._pending:
            self.flush()
        self._send_held()

    def resume(self) -> None:
        """
        Deliver the frames held while paused, as a read does.
        """
        if self._reading:
            # From inside a read (the application's producer, or a relay's
            # socket drained by what the read wrote, resumed us): that read
            # goes on delivering, and its end sends the answers.
            self._frames.resume()
            return
        self._reading = True
        self._held = []
        try:
            self._frames.resume()
        finally:
            self._reading = False
        if self._pending:
            self.flush()
        self._send_held()

    def frame_received(self, frame: bytes) -> None:
        """
        Open one message frame and deliver its plaintext.
        """
        session = self._session
        if session is None:
            return
        try:
            if frame.startswith(MESSAGE_MAGIC):
                # The fast path: no Message object.
                plaintext = session.open_payload(frame)
            else:
                # Always raises: says which packet came instead.
                plaintext = session.open(parse_as(frame, Message))
        except BadPacket as error:
            self._verdicts.bad_packet(error)
            return
        self.bytes_received += len(plaintext)
        self.last_received_at = self._clock.seconds()
        message_opened = self._message_opened
        if message_opened is not None:
            self._message_opened = None
            message_opened()
            if self._session is None:
                return  # closed by whoever heard of it
        protocol = self._protocol
        if protocol is not None:
            protocol.dataReceived(plaintext)

    def _check_idle(self) -> None:
        self._idle_call = None
        timeout = self._idle_timeout
        assert timeout is not None
        last = self.last_received_at
        if last is None:
            last = self.established_at
        # Rescheduled lazily: a message costs one clock read, not a timer.
        remaining = last + timeout - self._clock.seconds()
        if remaining > 0:
            self._idle_call = self._clock.callLater(remaining, self._check_idle)
        else:
            self._verdicts.close(IdleTimeout(f"no message received for {timeout} seconds"))

    # -- sending ------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """
        Send C{data} as part of a byte stream, in messages of at most 65503
        bytes, coalescing small writes (see the class docstring). An empty
        write sends nothing.
        """
        pending = self._pending
        if pending:
            size = self._pending_size + len(data)
            if size < MAX_MESSAGE:
                pending.append(data)
                self._pending_size = size
                return
            # The message being coalesced is full, or would overflow: it
            # goes now, whole (one join, no split: no small message cut off
            # its end), and C{data} starts the next. A flush already
            # scheduled stays, for what follows.
            if size == MAX_MESSAGE:
                pending.append(data)
                data = b""
            self._pending = None
            self._pending_size = 0
            self._send_large(pending[0] if len(pending) == 1 else b"".join(pending))
        if not data or self._session is None:
            return
        if len(data) >= MAX_MESSAGE:
            # Nothing to coalesce with: straight out, without a copy.
            self._send_large(data)
            return
        self._pending = [data]
        self._pending_size = len(data)
        if not self._reading and self._flush_call is None:
            self._flush_call = self._clock.callLater(0, self._flush_turn)

    def write_message(self, data: bytes) -> None:
        """
        Send C{data} as exactly one message, after the stream data written
        before it.

        @raise curvetun.errors.MessageTooLong: C{data} is longer than 65503
            bytes.
        """
        if len(data) > MAX_MESSAGE:
            raise MessageTooLong(f"a message can be at most {MAX_MESSAGE} bytes, not {len(data)}")
        if self._pending:
            self.flush()
        self._seal(data)

    def flush(self) -> None:
        """
        Send what L{write} has buffered.
        """
        flush_call = self._flush_call
        if flush_call is not None:
            self._flush_call = None
            if flush_call.active():  # not when it is what calls us
                flush_call.cancel()
        pending = self._pending
        if pending:
            data = b"".join(pending) if len(pending) > 1 else pending[0]
            self._pending = None
            self._pending_size = 0
            self._send_stream(data)

    def write_now(self, data: bytes) -> None:
        """
        Send C{data}, one read of another connection that a relay passes
        on, and hand it to the socket at once: as one message if it fits
        (L{write} would hold it a turn to coalesce it with later writes,
        and a relay writes once per read), else in messages of the largest
        size. The bytes on the wire are those C{write} would send.
        """
        if self._held is not None:
            # Inside one of our own events: its end sends this too.
            self._write_one_read(data)
            return
        self._held = []
        self._write_one_read(data)
        self._send_held()

    def _write_one_read(self, data: bytes) -> None:
        if self._pending:
            self.flush()
        if len(data) <= MAX_MESSAGE:
            if data:
                self._seal(data)
        else:
            self._send_stream(data)

    def _send_large(self, data: bytes) -> None:
        """
        Send C{data}, most of a message or more, and hand it to the socket
        at once: a system call per message this size costs little beside
        sealing it, and spares the TCP transport's buffer a join of the
        writes it holds.
        """
        if self._held is not None:
            self._send_stream(data)  # the event's end sends it
            return
        self._held = []
        self._send_stream(data)
        self._send_held()

    def _flush_turn(self) -> None:
        """
        The reactor turn after writes made outside a read: seal them, and
        send them at once.
        """
        self._flush_call = None
        if self._held is not None:
            self.flush()  # inside an event after all: its end sends them
            return
        self._held = []
        self.flush()
        self._send_held()

    def _send_held(self) -> None:
        held, self._held = self._held, None
        if held:
            send_at_once(self._transport, held)

    def _send_stream(self, data: bytes) -> None:
        if len(data) <= MAX_MESSAGE:
            self._seal(data)
            return
        view = memoryview(data)
        for start in range(0, len(data), MAX_MESSAGE):
            self._seal(bytes(view[start : start + MAX_MESSAGE]))

    def _seal(self, message: bytes) -> None:
        session = self._session
        if session is None:
            return  # closed: later writes are dropped, as TCP drops them
        try:
            frame = session.seal_frame(message)
        except CounterExhausted as error:
            self._verdicts.close(error)
            return
        # A vectored write (head, box): no copy of the box.
        held = self._held
        if held is None:
            self._transport.writeSequence(frame)
        else:
            held += frame
        self.bytes_sent += len(message)
        self.last_sent_at = self._clock.seconds()

    # -- the end ------------------------------------------------------------

    def stop(self) -> None:
        """
        The connection is closing: seal and open nothing more, drop the
        writes not yet coalesced, stop the timers.
        """
        self._session = None
        self._message_opened = None
        self._pending = None
        self._pending_size = 0
        held, self._held = self._held, None
        if held:
            # Sealed before the close: to the transport, which sends them
            # before it closes (or drops them, if it is aborted).
            self._transport.writeSequence(held)
        for call in (self._flush_call, self._idle_call):
            if call is not None and call.active():
                call.cancel()
        self._flush_call = self._idle_call = None
