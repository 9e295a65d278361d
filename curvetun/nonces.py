"""
The 24-byte nonces of the wire protocol and the safe-nonce scrambler.

No nonce is ever sent whole: each side rebuilds it from a fixed ASCII
prefix and a value that is on the wire (a packet counter or a safe nonce).
See the "Nonces" and "Safe nonces" sections of the wire spec.
"""

from __future__ import annotations

import struct

# Short-term prefixes (16 bytes), followed by u64be(counter).
HELLO_PREFIX = b"CurveCP-client-H"
VOUCH_PREFIX = b"CurveCP-client-I"
CLIENT_MESSAGE_PREFIX = b"CurveCP-client-M"
SERVER_MESSAGE_PREFIX = b"CurveCP-server-M"

# Long-term prefixes (8 bytes), followed by a 16-byte safe nonce.
COOKIE_BOX_PREFIX = b"CurveCPK"
VOUCH_INNER_PREFIX = b"CurveCPV"
MINUTE_KEY_PREFIX = b"minute-k"


def short_term_nonce(prefix16: bytes, counter: int) -> bytes:
    """
    Build a short-term nonce: C{prefix16 || u64be(counter)}.

    @param prefix16: one of the 16-byte C{*_PREFIX} constants above.
    @param counter: the packet counter, 0 <= counter < 2**64.
    """
    return prefix16 + counter.to_bytes(8, "big")


def long_term_nonce(prefix8: bytes, safe_nonce16: bytes) -> bytes:
    """
    Build a long-term nonce: C{prefix8 || safe_nonce16}.

    @param prefix8: one of the 8-byte C{*_PREFIX} constants above.
    @param safe_nonce16: a 16-byte safe nonce from a vault.
    """
    return prefix8 + safe_nonce16


_MASK64 = 2**64 - 1
_DELTA = 0x9E3779B97F4A7C15
# The round sums, sum_i = i * delta mod 2**64, computed once.
_SUMS = tuple((_DELTA * i) & _MASK64 for i in range(1, 33))
_BLOCK = struct.Struct("<2Q")
_KEY = struct.Struct("<4Q")


def scramble16(block16: bytes, key32: bytes) -> bytes:
    """
    Scramble a 16-byte block under a 32-byte key with 64-bit TEA, 32 rounds
    (C{enacl_ext:scramble_block_16}, spec "Safe nonces").

    A vault uses this so that the counter inside a safe nonce does not leak;
    the peer never decodes it.

    @param block16: the 16-byte input, read as two little-endian u64.
    @param key32: the 32-byte key, read as four little-endian u64.
    @return: the scrambled 16 bytes.
    """
    v0, v1 = _BLOCK.unpack(block16)
    k0, k1, k2, k3 = _KEY.unpack(key32)
    # v0 and v1 are reduced mod 2**64 after each step, so the right shifts
    # see 64-bit values; +, ^ and << only need their result reduced.
    for total in _SUMS:
        v0 = (v0 + (((v1 << 7) + k0) ^ (v1 + total) ^ ((v1 >> 12) + k1))) & _MASK64
        v1 = (v1 + (((v0 << 16) + k2) ^ (v0 + total) ^ ((v0 >> 8) + k3))) & _MASK64
    return _BLOCK.pack(v0, v1)
