"""
Long-term public keys as people read and write them: parse, format, compare.

A key is 32 raw bytes inside curvetun. In files and on command lines it is
64 hexadecimal digits (what curvetun writes) or standard base64 (accepted
because other tools print keys that way).
"""

from __future__ import annotations

import base64
import hmac

KEY_SIZE = 32

# The Curve25519 points of small order, as u-coordinates (little-endian),
# from libsodium's blocklist (crypto_scalarmult/curve25519/ref10). An X25519
# with any of them gives a shared key an attacker knows, so libsodium refuses
# them; refusing them here as well turns a baffling failure at the first
# connection into a clear message when the key is configured. libsodium
# ignores the top bit of the last byte, and so does _is_low_order.
_LOW_ORDER_POINTS = frozenset(
    bytes.fromhex(h)
    for h in (
        # 0 (order 4)
        "0000000000000000000000000000000000000000000000000000000000000000",
        # 1 (order 1)
        "0100000000000000000000000000000000000000000000000000000000000000",
        # 325606250916557431795983626356110631294008115727848805560023387167927233504 (order 8)
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
        # 39382357235489614581723060781553021112529911719440698176882885853963445705823 (order 8)
        "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
        # p - 1 (order 2)
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        # p, a non-canonical 0 (order 4)
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        # p + 1, a non-canonical 1 (order 1)
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    )
)

_EXPECTED = "expected 64 hex digits or 44 base64 characters (a 32-byte public key)"


def _is_low_order(key: bytes) -> bool:
    return key[:31] + bytes([key[31] & 0x7F]) in _LOW_ORDER_POINTS


def quoted(text: str) -> str:
    """
    Quote user input for an error message: its C{repr}, cut to at most 72
    characters, so that a message stays one line even if a whole file was
    pasted where a key belongs.
    """
    text = repr(text)
    return text if len(text) <= 72 else text[:69] + "..."


def parse_public_key(text: str) -> bytes:
    """
    Parse a long-term public key written as 64 hex digits (either case) or
    as standard base64 with padding (44 characters).

    @return: the 32-byte key.
    @raise ValueError: C{text} is neither form of a 32-byte key, or the key
        is a low-order point (the all-zero key among them), which no real
        key pair has.
    """
    text = text.strip()
    key = b""
    try:
        if len(text) == 2 * KEY_SIZE:
            key = bytes.fromhex(text)
        elif len(text) == 44:
            key = base64.b64decode(text, validate=True)
    except ValueError:  # binascii.Error is one too
        pass
    if len(key) != KEY_SIZE:
        raise ValueError(f"bad public key {quoted(text)}: {_EXPECTED}")
    if _is_low_order(key):
        raise ValueError(
            f"bad public key {quoted(text)}: a low-order Curve25519 point, not a real public key"
        )
    return key


_FIELD_PRIME = 2**255 - 19


def is_canonical(key: bytes) -> bool:
    """
    Is C{key} the one encoding of its Curve25519 point: a little-endian
    number below the field prime (so with the top bit clear)?
    """
    return int.from_bytes(key, "little") < _FIELD_PRIME


def format_public_key(key: bytes) -> str:
    """
    Write a 32-byte public key as 64 lowercase hex digits, the form curvetun
    uses in its files and messages.
    """
    return key.hex()


def fingerprint(key: bytes) -> str:
    """
    A short name for a public key in log messages: its first 16 hex digits.
    """
    return key[:8].hex()


def keys_equal(a: bytes, b: bytes) -> bool:
    """
    Compare two keys in constant time, so that the time taken does not tell
    how much of a guessed key was right.
    """
    return hmac.compare_digest(a, b)
