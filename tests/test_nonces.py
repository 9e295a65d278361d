"""
Tests for L{curvetun.nonces}: the nonce constructions and the TEA scrambler.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from curvetun.nonces import (
    CLIENT_MESSAGE_PREFIX,
    COOKIE_BOX_PREFIX,
    HELLO_PREFIX,
    MINUTE_KEY_PREFIX,
    SERVER_MESSAGE_PREFIX,
    VOUCH_INNER_PREFIX,
    VOUCH_PREFIX,
    long_term_nonce,
    scramble16,
    short_term_nonce,
)
from tests._vectors import load, unhex

HANDSHAKE = load("handshake.json")
PACKETS = HANDSHAKE["packets"]
HELLO, COOKIE, VOUCH = PACKETS[0], PACKETS[1], PACKETS[2]
MESSAGES = PACKETS[3:]


class ScrambleTests(SynchronousTestCase):
    """
    L{scramble16} is the 64-bit TEA of C{enacl_ext:scramble_block_16}.
    """

    def test_every_known_answer(self) -> None:
        """
        Every case of tea-scramble.json scrambles to its recorded output.
        """
        cases = load("tea-scramble.json")["cases"]
        self.assertEqual(len(cases), 14)
        for case in cases:
            self.assertEqual(
                scramble16(unhex(case["in"]), unhex(case["key"])).hex(),
                case["out"],
                case["name"],
            )

    def test_handshake_safe_nonces(self) -> None:
        """
        The two safe nonces of handshake.json are
        C{scramble16(u64be(counter) || random8, key)} of their inputs, with
        the vault's first counter value 0.
        """
        inputs = HANDSHAKE["inputs"]
        for side in ("server", "client"):
            block = bytes(8) + unhex(inputs[f"{side}_safe_nonce_random8"])
            key = unhex(inputs[f"{side}_safe_nonce_scramble_key"])
            self.assertEqual(scramble16(block, key).hex(), inputs[f"{side}_safe_nonce_16"], side)


class NonceTests(SynchronousTestCase):
    """
    The 24-byte nonces are a fixed prefix and a counter or a safe nonce.
    """

    def test_prefix_sizes(self) -> None:
        """
        Short-term prefixes are 16 bytes and long-term ones 8, so that every
        nonce is 24 bytes.
        """
        for prefix in (HELLO_PREFIX, VOUCH_PREFIX, CLIENT_MESSAGE_PREFIX, SERVER_MESSAGE_PREFIX):
            self.assertEqual(len(prefix), 16, prefix)
        for prefix in (COOKIE_BOX_PREFIX, VOUCH_INNER_PREFIX, MINUTE_KEY_PREFIX):
            self.assertEqual(len(prefix), 8, prefix)

    def test_short_term_nonce_is_prefix_and_big_endian_counter(self) -> None:
        """
        L{short_term_nonce} appends the counter as 8 big-endian bytes.
        """
        self.assertEqual(
            short_term_nonce(VOUCH_PREFIX, 0x0102030405060708),
            b"CurveCP-client-I\x01\x02\x03\x04\x05\x06\x07\x08",
        )
        self.assertEqual(
            short_term_nonce(SERVER_MESSAGE_PREFIX, 2**64 - 1),
            b"CurveCP-server-M" + b"\xff" * 8,
        )

    def test_short_term_nonces_of_the_vectors(self) -> None:
        """
        The hello, vouch and message nonces of handshake.json.
        """
        self.assertEqual(short_term_nonce(HELLO_PREFIX, 0).hex(), HELLO["box_nonce_24"])
        self.assertEqual(short_term_nonce(VOUCH_PREFIX, 1).hex(), VOUCH["box_nonce_24"])
        for msg in MESSAGES:
            prefix = (
                CLIENT_MESSAGE_PREFIX
                if msg["direction"] == "client->server"
                else SERVER_MESSAGE_PREFIX
            )
            self.assertEqual(short_term_nonce(prefix, msg["counter"]).hex(), msg["box_nonce_24"])

    def test_long_term_nonces_of_the_vectors(self) -> None:
        """
        The cookie box, cookie secretbox and inner vouch nonces of
        handshake.json are an 8-byte prefix and the 16-byte safe nonce.
        """
        server_nonce = unhex(COOKIE["safe_nonce_16"])
        client_nonce = unhex(VOUCH["vouch_safe_nonce_16"])
        self.assertEqual(
            long_term_nonce(COOKIE_BOX_PREFIX, server_nonce).hex(), COOKIE["box_nonce_24"]
        )
        self.assertEqual(
            long_term_nonce(MINUTE_KEY_PREFIX, server_nonce).hex(),
            COOKIE["cookie_secretbox_nonce_24"],
        )
        self.assertEqual(
            long_term_nonce(VOUCH_INNER_PREFIX, client_nonce).hex(),
            VOUCH["inner_V_nonce_24"],
        )
