"""
Tests for L{curvetun.packets}: parsing and encoding payloads.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from curvetun.errors import BadPacket
from curvetun.packets import (
    COOKIE_MAGIC,
    COOKIE_SIZE,
    HELLO_MAGIC,
    HELLO_SIZE,
    MAX_MESSAGE,
    MAX_PAYLOAD,
    MESSAGE_MAGIC,
    MESSAGE_OVERHEAD,
    VOUCH_MAGIC,
    VOUCH_SIZE,
    Cookie,
    Hello,
    Message,
    Vouch,
    parse,
    parse_as,
)
from tests._vectors import load, unhex

HANDSHAKE = load("handshake.json")
PACKETS = HANDSHAKE["packets"]
HELLO, COOKIE, VOUCH = (unhex(p["payload"]) for p in PACKETS[:3])
MESSAGES = [unhex(p["payload"]) for p in PACKETS[3:]]
MAGICS = [HELLO_MAGIC, COOKIE_MAGIC, VOUCH_MAGIC, MESSAGE_MAGIC]


class VectorPacketTests(SynchronousTestCase):
    """
    Every packet of handshake.json parses to its fields and re-encodes to
    the same bytes.
    """

    def test_sizes(self) -> None:
        """
        The size constants add up as the spec's layouts say.
        """
        self.assertEqual(HELLO_SIZE, 8 + 32 + 8 + 80)
        self.assertEqual(COOKIE_SIZE, 8 + 16 + 144)
        self.assertEqual(VOUCH_SIZE, 8 + 96 + 8 + 112)
        self.assertEqual(MAX_MESSAGE, MAX_PAYLOAD - MESSAGE_OVERHEAD)
        self.assertEqual(MAX_MESSAGE, 65503)

    def test_framed_is_big_endian_length_and_payload(self) -> None:
        """
        Each packet's C{framed} bytes are its 2-byte big-endian length and its
        payload (the framing the connection uses).
        """
        for packet in PACKETS:
            payload = unhex(packet["payload"])
            self.assertEqual(len(payload), packet["payload_len"])
            self.assertEqual(len(payload).to_bytes(2, "big") + payload, unhex(packet["framed"]))

    def test_hello(self) -> None:
        """
        The hello parses to C{EC}, counter 0 and its box.
        """
        hello = parse(HELLO)
        self.assertEqual(
            hello,
            Hello(
                unhex(HANDSHAKE["inputs"]["client_ephemeral_public_EC"]),
                0,
                unhex(PACKETS[0]["box"]),
            ),
        )
        self.assertEqual(hello.to_bytes(), HELLO)

    def test_cookie(self) -> None:
        """
        The cookie parses to C{SN} and its box.
        """
        cookie = parse(COOKIE)
        self.assertEqual(
            cookie, Cookie(unhex(PACKETS[1]["safe_nonce_16"]), unhex(PACKETS[1]["box"]))
        )
        self.assertEqual(cookie.to_bytes(), COOKIE)

    def test_vouch(self) -> None:
        """
        The vouch parses to C{K}, counter 1 and its box.
        """
        vouch = parse(VOUCH)
        self.assertEqual(vouch, Vouch(unhex(PACKETS[2]["cookie_K"]), 1, unhex(PACKETS[2]["box"])))
        self.assertEqual(vouch.to_bytes(), VOUCH)

    def test_messages(self) -> None:
        """
        Every message parses to its counter and box, including the one with
        an empty plaintext (32 bytes, the smallest message).
        """
        for vector, payload in zip(PACKETS[3:], MESSAGES, strict=True):
            message = parse(payload)
            self.assertEqual(message, Message(vector["counter"], unhex(vector["box"])))
            self.assertEqual(message.to_bytes(), payload)
        self.assertIn(MESSAGE_OVERHEAD, [len(m) for m in MESSAGES])

    def test_parse_as_returns_the_expected_type(self) -> None:
        """
        L{parse_as} returns the packet when it has the expected type.
        """
        self.assertIsInstance(parse_as(HELLO, Hello), Hello)
        self.assertIsInstance(parse_as(MESSAGES[0], Message), Message)

    def test_parse_as_refuses_another_type(self) -> None:
        """
        L{parse_as} raises L{BadPacket} for a well-formed packet of another
        type than the one expected.
        """
        exc = self.assertRaises(BadPacket, parse_as, VOUCH, Message)
        self.assertEqual(exc.reason, "unexpected vouch packet, expected message")
        self.assertRaises(BadPacket, parse_as, MESSAGES[0], Hello)


class MalformedPacketTests(SynchronousTestCase):
    """
    Malformed payloads raise L{BadPacket} with a short reason.
    """

    def assertBad(self, payload: bytes, reason: str) -> None:
        exc = self.assertRaises(BadPacket, parse, payload)
        self.assertEqual(exc.reason, reason)

    def test_unknown_magic(self) -> None:
        """
        A payload whose first 8 bytes are no packet's magic is refused,
        whatever its size, and so is anything shorter than a magic.
        """
        self.assertBad(b"\x00" * 128, "unknown packet magic")
        self.assertBad(bytes([HELLO[0] ^ 1]) + HELLO[1:], "unknown packet magic")
        self.assertBad(MESSAGE_MAGIC[:7], "unknown packet magic")
        self.assertBad(b"", "unknown packet magic")

    def test_handshake_packets_truncated_or_extended(self) -> None:
        """
        A hello, cookie or vouch one byte short or long, or cut after its
        magic, is refused.
        """
        for name, payload in (("hello", HELLO), ("cookie", COOKIE), ("vouch", VOUCH)):
            size = len(payload)
            self.assertBad(payload[:-1], f"{name} must be {size} bytes, got {size - 1}")
            self.assertBad(payload + b"\x00", f"{name} must be {size} bytes, got {size + 1}")
            self.assertBad(payload[:8], f"{name} must be {size} bytes, got 8")
        self.assertBad(HELLO[:12], "hello must be 128 bytes, got 12")

    def test_message_shorter_than_32_bytes(self) -> None:
        """
        A message too short to hold a counter and an authenticator is
        refused; any length from 32 up parses.
        """
        self.assertBad(MESSAGES[0][:31], "message shorter than 32 bytes")
        self.assertBad(MESSAGES[0][:12], "message shorter than 32 bytes")
        self.assertBad(MESSAGE_MAGIC, "message shorter than 32 bytes")
        self.assertIsInstance(parse(MESSAGES[0][:32]), Message)
        self.assertIsInstance(parse(MESSAGES[0] + b"\x00"), Message)


def _payloads() -> st.SearchStrategy[bytes]:
    # Arbitrary bytes rarely start with a magic, so also try real magics
    # followed by arbitrary bytes, and by exactly the right number of them.
    with_magic = st.builds(
        bytes.__add__, st.sampled_from(MAGICS), st.binary(max_size=VOUCH_SIZE + 8)
    )
    well_sized = st.sampled_from(
        [(HELLO_MAGIC, HELLO_SIZE), (COOKIE_MAGIC, COOKIE_SIZE), (VOUCH_MAGIC, VOUCH_SIZE)]
    ).flatmap(
        lambda magic_size: st.binary(min_size=magic_size[1] - 8, max_size=magic_size[1] - 8).map(
            magic_size[0].__add__
        )
    )
    return st.one_of(st.binary(max_size=300), with_magic, well_sized)


class ParsePropertyTests(SynchronousTestCase):
    """
    Properties of L{parse} over arbitrary input.
    """

    @given(_payloads())
    def test_parse_returns_a_packet_or_raises_bad_packet(self, payload: bytes) -> None:
        """
        L{parse} of any bytes returns a packet that re-encodes to exactly
        those bytes, or raises L{BadPacket}; never anything else.
        """
        try:
            packet = parse(payload)
        except BadPacket:
            return
        self.assertIsInstance(packet, (Hello, Cookie, Vouch, Message))
        self.assertEqual(packet.to_bytes(), payload)
