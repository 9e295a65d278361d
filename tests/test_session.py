"""
Tests for L{curvetun.session}: message counters, limits and boxes.
"""

from __future__ import annotations

from nacl.bindings import crypto_box_keypair
from twisted.trial.unittest import SynchronousTestCase

from curvetun.errors import BadPacket, CounterExhausted, MessageTooLong
from curvetun.packets import MAX_MESSAGE, MAX_PAYLOAD, Message, parse_as
from curvetun.session import Session
from tests._vectors import connected_sessions

# Any 32 bytes do as a shared key for these tests.
KEY = crypto_box_keypair()[1]


def pair() -> tuple[Session, Session]:
    """
    A fresh C{(client, server)} pair of sessions sharing L{KEY}.
    """
    return Session.for_client(KEY), Session.for_server(KEY)


def sealed(sender: Session, *plaintexts: bytes) -> list[Message]:
    """
    Seal each plaintext with C{sender}, as the receiver will parse them.
    """
    return [parse_as(sender.seal(p), Message) for p in plaintexts]


class CounterTests(SynchronousTestCase):
    """
    Each direction counts from 2 by 1, and a receiver accepts only the
    previous counter plus 1.
    """

    def test_send_counters_start_at_two_and_step_by_one(self) -> None:
        """
        The first three messages carry counters 2, 3 and 4.
        """
        client, _ = pair()
        self.assertEqual([m.counter for m in sealed(client, b"a", b"b", b"c")], [2, 3, 4])
        self.assertEqual(client.next_send, 5)

    def test_directions_count_separately(self) -> None:
        """
        A session's sending does not move its receive counter, nor the
        peer's send counter.
        """
        client, server = pair()
        sealed(client, b"a", b"b")
        self.assertEqual((client.last_received, server.next_send), (1, 2))
        self.assertEqual(sealed(server, b"x")[0].counter, 2)

    def test_in_order_messages_open(self) -> None:
        """
        Messages opened in order give their plaintexts and advance
        C{last_received}.
        """
        client, server = pair()
        messages = sealed(client, b"one", b"two")
        self.assertEqual(server.last_received, 1)
        self.assertEqual([server.open(m) for m in messages], [b"one", b"two"])
        self.assertEqual(server.last_received, 3)

    def test_out_of_order_refused_without_advancing(self) -> None:
        """
        Counter 3 before 2 is refused and leaves the receiver expecting 2.
        """
        client, server = pair()
        first, second = sealed(client, b"one", b"two")
        exc = self.assertRaises(BadPacket, server.open, second)
        self.assertEqual(exc.reason, "message counter 3 is not previous+1 (2)")
        self.assertEqual(server.last_received, 1)
        self.assertEqual(server.open(first), b"one")
        self.assertEqual(server.open(second), b"two")

    def test_duplicate_refused_without_advancing(self) -> None:
        """
        A replay of an accepted message is refused; the next one still opens.
        """
        client, server = pair()
        first, second = sealed(client, b"one", b"two")
        server.open(first)
        self.assertRaises(BadPacket, server.open, first)
        self.assertEqual(server.last_received, 2)
        self.assertEqual(server.open(second), b"two")

    def test_skipped_counter_refused_without_advancing(self) -> None:
        """
        A gap (counter 4 when 3 is expected) is refused: it means a message
        was removed from the stream.
        """
        client, server = pair()
        first, second, third = sealed(client, b"one", b"two", b"three")
        server.open(first)
        self.assertRaises(BadPacket, server.open, third)
        self.assertEqual(server.last_received, 2)
        self.assertEqual(server.open(second), b"two")


class BoxTests(SynchronousTestCase):
    """
    Only messages that verify are opened.
    """

    def test_damaged_box_refused_without_advancing(self) -> None:
        """
        A message with one bit flipped does not verify and does not move the
        counter; the authentic message then opens.
        """
        client, server = pair()
        (message,) = sealed(client, b"hello")
        damaged = Message(message.counter, message.box[:-1] + bytes([message.box[-1] ^ 1]))
        exc = self.assertRaises(BadPacket, server.open, damaged)
        self.assertEqual(exc.reason, "message does not verify")
        self.assertEqual(server.last_received, 1)
        self.assertEqual(server.open(message), b"hello")

    def test_reflected_message_refused(self) -> None:
        """
        A client's message sent back to the client does not open: each
        direction has its own nonce prefix.
        """
        client, _ = pair()
        (message,) = sealed(client, b"hello")
        self.assertRaises(BadPacket, client.open, message)

    def test_other_session_key_refused(self) -> None:
        """
        A message from another session does not open.
        """
        client, _ = pair()
        _, other_server = connected_sessions()
        self.assertRaises(BadPacket, other_server.open, sealed(client, b"hello")[0])

    def test_empty_message_round_trip(self) -> None:
        """
        An empty message is a 32-byte payload that opens to empty bytes.
        """
        client, server = pair()
        payload = client.seal(b"")
        self.assertEqual(len(payload), 32)
        self.assertEqual(server.open(parse_as(payload, Message)), b"")


class LimitTests(SynchronousTestCase):
    """
    Message sizes and counters have limits.
    """

    def test_largest_message(self) -> None:
        """
        A 65503-byte message fills a 65535-byte payload and opens.
        """
        client, server = pair()
        payload = client.seal(b"x" * MAX_MESSAGE)
        self.assertEqual(len(payload), MAX_PAYLOAD)
        self.assertEqual(server.open(parse_as(payload, Message)), b"x" * MAX_MESSAGE)

    def test_message_too_long(self) -> None:
        """
        A 65504-byte message raises L{MessageTooLong} and uses no counter.
        """
        client, _ = pair()
        self.assertRaises(MessageTooLong, client.seal, b"x" * (MAX_MESSAGE + 1))
        self.assertEqual(client.next_send, 2)

    def test_send_counter_exhausted(self) -> None:
        """
        The last counter sent is 2**64 - 2; after it, L{Session.seal} raises
        L{CounterExhausted}, every time.
        """
        client, _ = pair()
        self.assertEqual(Session.COUNTER_LIMIT, 2**64 - 1)
        client.next_send = 2**64 - 2
        self.assertEqual(sealed(client, b"last")[0].counter, 2**64 - 2)
        self.assertRaises(CounterExhausted, client.seal, b"one more")
        self.assertRaises(CounterExhausted, client.seal, b"")
        self.assertEqual(client.next_send, 2**64 - 1)

    def test_lowered_limit(self) -> None:
        """
        The limit is the class attribute C{COUNTER_LIMIT}: a subclass can
        lower it, for both directions.
        """

        class SmallSession(Session):
            COUNTER_LIMIT = 4

        client, server = SmallSession.for_client(KEY), SmallSession.for_server(KEY)
        messages = sealed(client, b"2", b"3")
        self.assertRaises(CounterExhausted, client.seal, b"4")
        self.assertEqual([server.open(m) for m in messages], [b"2", b"3"])
        big = Session.for_client(KEY)
        big.next_send = 4
        exc = self.assertRaises(BadPacket, server.open, sealed(big, b"4")[0])
        self.assertEqual(exc.reason, "message counter limit")

    def test_receive_counter_limit(self) -> None:
        """
        A message with counter 2**64 - 1 is refused even when it is the
        previous counter plus 1.
        """
        client, server = pair()
        client.next_send = server.last_received = 2**64 - 2
        message = Message(2**64 - 1, sealed(client, b"x")[0].box)
        exc = self.assertRaises(BadPacket, server.open, message)
        self.assertEqual(exc.reason, "message counter limit")
        self.assertEqual(server.last_received, 2**64 - 2)


class ReprTests(SynchronousTestCase):
    """
    L{Session}'s repr.
    """

    def test_repr_hides_the_key(self) -> None:
        """
        The repr shows the side and counters, not the key.
        """
        client, server = pair()
        self.assertEqual(repr(client), "<Session client next_send=2 last_received=1>")
        self.assertEqual(repr(server), "<Session server next_send=2 last_received=1>")
        for text in (repr(client), str(client)):
            self.assertNotIn(KEY.hex(), text)
            self.assertNotIn(repr(KEY), text)
