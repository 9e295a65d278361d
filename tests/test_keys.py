"""
Tests for L{curvetun.keys}.
"""

from __future__ import annotations

import base64

from nacl.bindings import crypto_scalarmult
from nacl.exceptions import CryptoError
from twisted.trial.unittest import SynchronousTestCase

from curvetun.keys import (
    _LOW_ORDER_POINTS,
    fingerprint,
    format_public_key,
    keys_equal,
    parse_public_key,
)

KEY = bytes.fromhex("6984944f69cf6fabcdd48541e15d83dd5e01c66fb6f0d8f6b765e57e1e2bb51e")


class ParsePublicKeyTests(SynchronousTestCase):
    def test_hex_in_either_case(self) -> None:
        self.assertEqual(parse_public_key(KEY.hex()), KEY)
        self.assertEqual(parse_public_key(KEY.hex().upper()), KEY)

    def test_base64(self) -> None:
        text = base64.b64encode(KEY).decode("ascii")
        self.assertEqual(len(text), 44)
        self.assertEqual(parse_public_key(text), KEY)

    def test_surrounding_whitespace_is_ignored(self) -> None:
        self.assertEqual(parse_public_key(f"  {KEY.hex()}\n"), KEY)

    def test_malformed_keys_say_what_is_expected(self) -> None:
        for text in [
            "",
            KEY.hex()[:-2],  # 31 bytes
            KEY.hex() + "00",  # 33 bytes
            KEY.hex()[:-1] + "g",
            " ".join(KEY.hex()[i : i + 2] for i in range(0, 64, 2))[:64],
            base64.b64encode(KEY[:31]).decode() + "=",  # 44 characters, 31 bytes
            base64.b64encode(KEY).decode()[:-1] + "!",
            base64.urlsafe_b64encode(b"\xff" * 32).decode(),
            "é" * 64,
        ]:
            with self.assertRaises(ValueError, msg=text) as cm:
                parse_public_key(text)
            self.assertIn("expected 64 hex digits or 44 base64 characters", str(cm.exception))

    def test_error_quotes_at_most_about_80_characters_of_the_input(self) -> None:
        with self.assertRaises(ValueError) as cm:
            parse_public_key("x" * 10_000)
        message = str(cm.exception)
        self.assertNotIn("\n", message)
        self.assertLess(message.count("x"), 80)

    def test_low_order_points_are_refused(self) -> None:
        for point in sorted(_LOW_ORDER_POINTS):
            with_top_bit = point[:31] + bytes([point[31] | 0x80])
            for key in (point, with_top_bit):
                with self.assertRaises(ValueError, msg=key.hex()) as cm:
                    parse_public_key(key.hex())
                self.assertIn("low-order", str(cm.exception))

    def test_all_zero_key_is_refused(self) -> None:
        with self.assertRaises(ValueError) as cm:
            parse_public_key("00" * 32)
        self.assertIn("low-order", str(cm.exception))

    def test_blocklist_agrees_with_libsodium(self) -> None:
        """
        Every point on the list is one that libsodium refuses for X25519,
        so the list has no typo that would let a low-order key through.
        """
        self.assertEqual(len(_LOW_ORDER_POINTS), 7)
        for point in _LOW_ORDER_POINTS:
            self.assertRaises(CryptoError, crypto_scalarmult, b"\x01" * 32, point)


class FormatTests(SynchronousTestCase):
    def test_format_is_lowercase_hex_that_parses_back(self) -> None:
        text = format_public_key(KEY)
        self.assertEqual(text, KEY.hex())
        self.assertEqual(parse_public_key(text), KEY)

    def test_fingerprint_is_first_16_hex_digits(self) -> None:
        self.assertEqual(fingerprint(KEY), "6984944f69cf6fab")

    def test_keys_equal(self) -> None:
        self.assertTrue(keys_equal(KEY, bytes(KEY)))
        self.assertFalse(keys_equal(KEY, KEY[:31] + b"\x00"))
        self.assertFalse(keys_equal(KEY, KEY[:31]))
