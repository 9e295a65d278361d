"""
The established phase by itself: sealing and opening, the write
coalescer, the first-message report, the figures and the idle timeout,
with a StringTransport, a Clock and recording callbacks.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from curvetun.errors import BadPacket, CounterExhausted, CurveTunError, IdleTimeout
from curvetun.established import Established
from curvetun.framing import FrameDecoder
from curvetun.packets import MAX_MESSAGE
from curvetun.session import Session

from ._support import RecordingProtocol, SocketDescriptor


def split_frames(stream: bytes) -> list[bytes]:
    frames = []
    while stream:
        length = int.from_bytes(stream[:2], "big")
        frames.append(stream[2 : 2 + length])
        stream = stream[2 + length :]
    return frames


class Phase:
    """
    A client's established phase, with the server's session to make and
    read its messages; it records the verdicts the phase reports.
    """

    def __init__(
        self,
        idle_timeout: float | None = None,
        on_first_message: Callable[[Phase], None] | None = None,
        socket: SocketDescriptor | None = None,
    ) -> None:
        key = os.urandom(32)
        self.peer = Session.for_server(key)
        self.clock = Clock()
        self.clock.advance(100)
        self.transport = StringTransport()
        self.socket = socket
        self.bad: list[BadPacket] = []
        self.closed: list[CurveTunError] = []
        self.opened: list[int] = []
        self.app = RecordingProtocol()
        self.frames = FrameDecoder(lambda frame: None)
        self.phase = Established(
            Session.for_client(key),
            self.frames,
            self.transport if socket is None else socket,
            self.clock,
            self,
            None if on_first_message is None else lambda: on_first_message(self),
            idle_timeout,
        )
        self.phase.deliver_to(self.app)

    def bad_packet(self, reason: BadPacket) -> None:
        self.bad.append(reason)

    def close(self, reason: Exception) -> None:
        assert isinstance(reason, CurveTunError)
        self.closed.append(reason)

    def from_peer(self, *messages: bytes) -> bytes:
        wire = b""
        for message in messages:
            head, box = self.peer.seal_frame(message)
            wire += head + box
        return wire

    def sent(self) -> list[bytes]:
        """
        The messages written so far, opened by the peer.
        """
        frames = split_frames(self.transport.value())
        self.transport.clear()
        return [self.peer.open_payload(frame) for frame in frames]


class ReceiveTests(SynchronousTestCase):
    def test_messages_that_open_are_delivered(self) -> None:
        phase = Phase()
        phase.phase.receive(phase.from_peer(b"one", b"two"))
        self.assertEqual(phase.app.received, [b"one", b"two"])

    def test_a_message_that_does_not_open_is_reported_and_not_delivered(self) -> None:
        phase = Phase()
        wire = bytearray(phase.from_peer(b"genuine"))
        wire[-1] ^= 1
        phase.phase.receive(bytes(wire))
        self.assertEqual(phase.app.received, [])
        [error] = phase.bad
        self.assertEqual(error.reason, "message does not verify")

    def test_a_handshake_packet_is_reported_as_unexpected(self) -> None:
        phase = Phase()
        hello = bytes.fromhex("6c09afb28aa9fafc") + bytes(120)
        phase.phase.receive(len(hello).to_bytes(2, "big") + hello)
        [error] = phase.bad
        self.assertEqual(error.reason, "unexpected hello packet, expected message")

    def test_the_first_message_is_reported_once_before_it_is_delivered(self) -> None:
        phase = Phase(on_first_message=lambda p: p.opened.append(len(p.app.received)))
        phase.phase.receive(phase.from_peer(b"one", b"two"))
        # Reported when nothing had been delivered yet, and only once.
        self.assertEqual(phase.opened, [0])
        self.assertEqual(phase.app.received, [b"one", b"two"])

    def test_a_close_when_the_first_message_is_reported_delivers_nothing(self) -> None:
        phase = Phase(on_first_message=lambda p: p.phase.stop())
        phase.phase.receive(phase.from_peer(b"one"))
        self.assertEqual(phase.app.received, [])

    def test_nothing_is_opened_once_stopped(self) -> None:
        phase = Phase()
        wire = phase.from_peer(b"one")
        phase.phase.stop()
        phase.phase.frame_received(wire[2:])
        self.assertEqual((phase.app.received, phase.bad), ([], []))


class SendTests(SynchronousTestCase):
    def test_a_message_is_sealed_as_one_frame(self) -> None:
        phase = Phase()
        phase.phase.write_message(b"whole")
        self.assertEqual(phase.sent(), [b"whole"])

    def test_small_writes_are_coalesced_until_the_next_reactor_turn(self) -> None:
        phase = Phase()
        for part in (b"a", b"b", b"c"):
            phase.phase.write(part)
        self.assertEqual(phase.sent(), [])
        phase.clock.advance(0)
        self.assertEqual(phase.sent(), [b"abc"])

    def test_writes_in_answer_to_a_read_go_out_with_the_end_of_the_read(self) -> None:
        phase = Phase()
        phase.app.dataReceived = lambda data: phase.phase.write(b"re: " + data)  # type: ignore[method-assign]
        phase.phase.receive(phase.from_peer(b"one", b"two"))
        self.assertEqual(phase.sent(), [b"re: onere: two"])
        self.assertEqual(phase.clock.getDelayedCalls(), [])

    def test_coalesced_writes_are_cut_where_the_next_would_overflow_a_message(self) -> None:
        phase = Phase()
        for _ in range(1000):
            phase.phase.write(b"w" * 100)
        phase.clock.advance(0)
        # 655 writes fill 65500 bytes of the 65503 a message carries: the
        # next starts a message, rather than the full one being split with
        # 97 bytes in a message of their own.
        self.assertEqual([len(message) for message in phase.sent()], [65500, 34500])
        self.assertEqual(phase.clock.getDelayedCalls(), [])

    def test_writes_that_fill_a_message_exactly_go_out_at_once(self) -> None:
        phase = Phase()
        phase.phase.write(b"a" * (MAX_MESSAGE - 3))
        phase.phase.write(b"bcd")
        self.assertEqual(phase.sent(), [b"a" * (MAX_MESSAGE - 3) + b"bcd"])
        phase.clock.advance(0)
        self.assertEqual(phase.sent(), [])

    def test_a_write_of_a_message_or_more_is_not_held(self) -> None:
        phase = Phase()
        data = b"x" * (MAX_MESSAGE + 10)
        phase.phase.write(data)
        self.assertEqual(phase.sent(), [data[:MAX_MESSAGE], data[MAX_MESSAGE:]])

    def test_an_exhausted_counter_is_reported_and_nothing_sent(self) -> None:
        phase = Phase()
        self.patch(Session, "COUNTER_LIMIT", 2)
        phase.phase.write_message(b"too many")
        self.assertEqual(phase.transport.value(), b"")
        [error] = phase.closed
        self.assertIsInstance(error, CounterExhausted)

    def test_nothing_is_sent_once_stopped_and_pending_writes_are_dropped(self) -> None:
        phase = Phase()
        phase.phase.write(b"pending")
        phase.phase.stop()
        phase.phase.write(b"later")
        phase.phase.write_message(b"later still")
        phase.clock.advance(0)
        self.assertEqual(phase.transport.value(), b"")
        self.assertEqual(phase.clock.getDelayedCalls(), [])


class SentAtOnceTests(SynchronousTestCase):
    """
    What the application writes in answer to a read is handed to the
    socket when the read is done, rather than a reactor turn later
    (Twisted's TCP transport sends from the reactor); other writes are left
    to the reactor, so that a burst of them still leaves in one C{send}.
    """

    def setUp(self) -> None:
        self.socket = SocketDescriptor()
        self.addCleanup(self.socket.close_sockets)
        self.phase = Phase(socket=self.socket)

    def test_an_answer_to_a_read_is_sent_when_the_read_is_done(self) -> None:
        self.phase.app.dataReceived = (  # type: ignore[method-assign]
            lambda data: self.phase.phase.write(b"re: " + data)
        )
        self.phase.phase.receive(self.phase.from_peer(b"one", b"two"))
        # One send, of one message: the two answers coalesced.
        [sent] = self.socket.sends
        self.assertEqual(
            [self.phase.peer.open_payload(frame) for frame in split_frames(sent)],
            [b"re: onere: two"],
        )
        self.assertFalse(self.socket.waiting_for_reactor)

    def test_a_resume_from_inside_the_read_still_sends_once_at_its_end(self) -> None:
        # A relay's write can drain its socket at once and so resume, from
        # inside the read, the producer that the same write had paused.
        phase = self.phase

        def answer(data: bytes) -> None:
            phase.phase.write(b"re: " + data)
            phase.frames.pause()
            phase.phase.resume()

        phase.app.dataReceived = answer  # type: ignore[method-assign]
        phase.phase.receive(phase.from_peer(b"one", b"two"))
        [sent] = self.socket.sends
        self.assertEqual(
            [phase.peer.open_payload(frame) for frame in split_frames(sent)],
            [b"re: onere: two"],
        )
        self.assertEqual(phase.clock.getDelayedCalls(), [])

    def test_a_read_without_an_answer_sends_nothing(self) -> None:
        self.phase.phase.receive(self.phase.from_peer(b"one"))
        self.assertEqual(self.socket.sends, [])

    def test_writes_outside_a_read_are_left_to_the_reactor(self) -> None:
        for n in range(3):
            self.phase.phase.write_message(b"message %d" % (n,))
        self.assertEqual(self.socket.sends, [])
        self.assertTrue(self.socket.waiting_for_reactor)
        # And then a read without an answer does not send them either.
        self.phase.phase.receive(self.phase.from_peer(b"one"))
        self.assertEqual(self.socket.sends, [])

    def test_a_relayed_read_is_sent_at_once_as_one_message(self) -> None:
        self.phase.phase.write_now(b"relayed")
        [sent] = self.socket.sends
        self.assertEqual(
            [self.phase.peer.open_payload(frame) for frame in split_frames(sent)], [b"relayed"]
        )
        self.assertFalse(self.socket.waiting_for_reactor)

    def test_a_relayed_read_larger_than_a_message_goes_in_full_messages(self) -> None:
        self.phase.phase.write_now(b"r" * (MAX_MESSAGE + 10))
        sent = b"".join(self.socket.sends)
        self.assertEqual(
            [len(self.phase.peer.open_payload(frame)) for frame in split_frames(sent)],
            [MAX_MESSAGE, 10],
        )

    def test_a_relayed_read_goes_after_the_writes_not_yet_coalesced(self) -> None:
        self.phase.phase.write(b"first ")
        self.phase.phase.write_now(b"second")
        [sent] = self.socket.sends
        self.assertEqual(
            [self.phase.peer.open_payload(frame) for frame in split_frames(sent)],
            [b"first ", b"second"],
        )
        self.assertEqual(self.phase.clock.getDelayedCalls(), [])

    def test_writes_coalesced_for_the_next_turn_are_sent_then_at_once(self) -> None:
        self.phase.phase.write(b"one ")
        self.phase.phase.write(b"two")
        self.assertEqual(self.socket.sends, [])
        self.phase.clock.advance(0)
        [sent] = self.socket.sends
        self.assertEqual(
            [self.phase.peer.open_payload(frame) for frame in split_frames(sent)], [b"one two"]
        )
        self.assertFalse(self.socket.waiting_for_reactor)

    def test_a_write_of_a_whole_message_outside_a_read_is_sent_at_once(self) -> None:
        self.phase.phase.write(b"w" * MAX_MESSAGE)
        [sent] = self.socket.sends
        self.assertEqual(
            [len(self.phase.peer.open_payload(frame)) for frame in split_frames(sent)],
            [MAX_MESSAGE],
        )
        self.assertFalse(self.socket.waiting_for_reactor)

    def test_a_small_write_that_fills_the_coalesced_message_sends_it_at_once(self) -> None:
        self.phase.phase.write(b"a" * (MAX_MESSAGE - 3))
        self.assertEqual(self.socket.sends, [])
        self.phase.phase.write(b"bcd")
        [sent] = self.socket.sends
        self.assertEqual(
            [self.phase.peer.open_payload(frame) for frame in split_frames(sent)],
            [b"a" * (MAX_MESSAGE - 3) + b"bcd"],
        )

    def test_what_an_answer_seals_before_a_close_goes_to_the_transport(self) -> None:
        def answer_and_stop(data: bytes) -> None:
            self.phase.phase.write_message(b"last words")
            self.phase.phase.stop()

        self.phase.app.dataReceived = answer_and_stop  # type: ignore[method-assign]
        self.phase.phase.receive(self.phase.from_peer(b"one"))
        # Left to the TCP transport, which sends it before it closes, or
        # drops it if it is aborted.
        self.assertEqual(self.socket.sends, [])
        self.assertTrue(self.socket.waiting_for_reactor)
        self.socket.doWrite()
        [sent] = self.socket.sends
        self.assertEqual(
            [self.phase.peer.open_payload(frame) for frame in split_frames(sent)],
            [b"last words"],
        )

    def test_nothing_is_sent_once_stopped(self) -> None:
        self.phase.phase.stop()
        self.phase.phase.write_now(b"late")
        self.assertEqual(self.socket.sends, [])
        self.assertFalse(self.socket.waiting_for_reactor)


class FigureTests(SynchronousTestCase):
    def test_the_figures_count_application_bytes_and_times(self) -> None:
        phase = Phase()
        self.assertEqual(phase.phase.established_at, 100)
        self.assertEqual((phase.phase.last_received_at, phase.phase.last_sent_at), (None, None))
        phase.clock.advance(5)
        phase.phase.receive(phase.from_peer(b"12345", b"678"))
        phase.clock.advance(2)
        phase.phase.write_message(b"ab")
        self.assertEqual((phase.phase.bytes_received, phase.phase.bytes_sent), (8, 2))
        self.assertEqual((phase.phase.last_received_at, phase.phase.last_sent_at), (105, 107))

    def test_a_message_that_does_not_open_is_not_counted(self) -> None:
        phase = Phase()
        wire = bytearray(phase.from_peer(b"genuine"))
        wire[-1] ^= 1
        phase.phase.receive(bytes(wire))
        self.assertEqual((phase.phase.bytes_received, phase.phase.last_received_at), (0, None))


class IdleTests(SynchronousTestCase):
    def test_no_message_for_the_idle_timeout_closes(self) -> None:
        phase = Phase(idle_timeout=10)
        phase.clock.advance(9.9)
        self.assertEqual(phase.closed, [])
        phase.clock.advance(0.1)
        [error] = phase.closed
        self.assertIsInstance(error, IdleTimeout)

    def test_each_message_restarts_the_count(self) -> None:
        phase = Phase(idle_timeout=10)
        phase.clock.advance(8)
        phase.phase.receive(phase.from_peer(b"tick"))
        phase.clock.advance(9.9)
        self.assertEqual(phase.closed, [])
        phase.clock.advance(0.1)
        self.assertEqual(len(phase.closed), 1)

    def test_part_of_a_message_does_not_restart_it(self) -> None:
        phase = Phase(idle_timeout=10)
        wire = phase.from_peer(b"never finished")
        for byte in range(len(wire) - 1):
            phase.phase.receive(wire[byte : byte + 1])
        phase.clock.advance(10)
        self.assertEqual(len(phase.closed), 1)

    def test_sending_does_not_restart_it(self) -> None:
        phase = Phase(idle_timeout=10)
        phase.clock.advance(8)
        phase.phase.write_message(b"anyone there?")
        phase.clock.advance(2)
        self.assertEqual(len(phase.closed), 1)

    def test_stopping_cancels_the_timer(self) -> None:
        phase = Phase(idle_timeout=10)
        phase.phase.stop()
        self.assertEqual(phase.clock.getDelayedCalls(), [])
