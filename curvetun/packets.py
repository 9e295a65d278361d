"""
The four packets of the wire protocol, as typed values, and their encoding.

A payload here is what one length-prefixed frame carries, without the
2-byte length (spec "Framing"). Parsing only checks the shape: the magic and
the sizes. Whether counters are right and boxes open is the business of
L{curvetun.handshake} and L{curvetun.session}, so that every kind of failure
stays distinguishable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import attrs

from curvetun.errors import BadPacket

# Spec "Framing": the first 8 bytes of every payload say what it is.
HELLO_MAGIC = bytes.fromhex("6c09afb28aa9fafc")
COOKIE_MAGIC = bytes.fromhex("1c45dcb941c0e3f6")
VOUCH_MAGIC = bytes.fromhex("6c09afb28aa9fafd")
MESSAGE_MAGIC = bytes.fromhex("6d1b39cbf65a11b4")

HELLO_SIZE = 128  # magic 8 || EC 32 || counter 8 || box 80
COOKIE_SIZE = 168  # magic 8 || SN 16 || box 144
VOUCH_SIZE = 224  # magic 8 || K 96 || counter 8 || box 112
MESSAGE_OVERHEAD = 32  # magic 8 || counter 8 || authenticator 16
MAX_PAYLOAD = 65535  # the largest 2-byte frame length
MAX_MESSAGE = MAX_PAYLOAD - MESSAGE_OVERHEAD  # 65503 bytes of plaintext


@attrs.frozen
class Hello:
    """
    hello, client to server (spec section 1).

    @ivar client_ephemeral_key: C{EC}, 32 bytes.
    @ivar counter: the packet counter; only 0 is valid, which the handshake
        checks.
    @ivar box: the 80-byte box of 64 zero bytes from C{ECs} to C{S}.
    """

    client_ephemeral_key: bytes
    counter: int
    box: bytes

    def to_bytes(self) -> bytes:
        """
        Encode this packet as a payload.
        """
        return HELLO_MAGIC + self.client_ephemeral_key + self.counter.to_bytes(8, "big") + self.box


@attrs.frozen
class Cookie:
    """
    cookie, server to client (spec section 2).

    @ivar safe_nonce: C{SN}, the server's 16-byte safe nonce.
    @ivar box: the 144-byte box of C{ES || K} from C{Ss} to C{EC}.
    """

    safe_nonce: bytes
    box: bytes

    def to_bytes(self) -> bytes:
        """
        Encode this packet as a payload.
        """
        return COOKIE_MAGIC + self.safe_nonce + self.box


@attrs.frozen
class Vouch:
    """
    vouch (CurveCP "initiate"), client to server (spec section 3).

    @ivar cookie: C{K}, the 96-byte cookie the server sealed for itself.
    @ivar counter: the packet counter; only 1 is valid, which the handshake
        checks.
    @ivar box: the 112-byte box of C{C || VN || V} from C{ECs} to C{ES}.
    """

    cookie: bytes
    counter: int
    box: bytes

    def to_bytes(self) -> bytes:
        """
        Encode this packet as a payload.
        """
        return VOUCH_MAGIC + self.cookie + self.counter.to_bytes(8, "big") + self.box


@attrs.frozen
class Message:
    """
    message, either direction (spec section 4).

    @ivar counter: the sender's message counter.
    @ivar box: the boxed message, 16 bytes longer than the plaintext.
    """

    counter: int
    box: bytes

    def to_bytes(self) -> bytes:
        """
        Encode this packet as a payload.
        """
        return MESSAGE_MAGIC + self.counter.to_bytes(8, "big") + self.box


Packet = Hello | Cookie | Vouch | Message
"""Any one of the four packets."""

_P = TypeVar("_P", Hello, Cookie, Vouch, Message)


def _fixed_size(name: str, size: int, payload: bytes) -> None:
    # Every handshake packet has one exact size; anything else is refused
    # before any field is read.
    if len(payload) != size:
        raise BadPacket(f"{name} must be {size} bytes, got {len(payload)}")


def _parse_hello(payload: bytes) -> Hello:
    _fixed_size("hello", HELLO_SIZE, payload)
    return Hello(payload[8:40], int.from_bytes(payload[40:48], "big"), payload[48:])


def _parse_cookie(payload: bytes) -> Cookie:
    _fixed_size("cookie", COOKIE_SIZE, payload)
    return Cookie(payload[8:24], payload[24:])


def _parse_vouch(payload: bytes) -> Vouch:
    _fixed_size("vouch", VOUCH_SIZE, payload)
    return Vouch(payload[8:104], int.from_bytes(payload[104:112], "big"), payload[112:])


def _parse_message(payload: bytes) -> Message:
    # The hot path: one length check, one int, one slice.
    if len(payload) < MESSAGE_OVERHEAD:
        raise BadPacket(f"message shorter than {MESSAGE_OVERHEAD} bytes")
    return Message(int.from_bytes(payload[8:16], "big"), payload[16:])


_PARSERS: dict[bytes, Callable[[bytes], Packet]] = {
    MESSAGE_MAGIC: _parse_message,
    HELLO_MAGIC: _parse_hello,
    COOKIE_MAGIC: _parse_cookie,
    VOUCH_MAGIC: _parse_vouch,
}

_NAMES: dict[type[Packet], str] = {
    Hello: "hello",
    Cookie: "cookie",
    Vouch: "vouch",
    Message: "message",
}


def parse(payload: bytes) -> Packet:
    """
    Decode one payload (a frame without its length prefix).

    Only the shape is checked: magic and sizes. Counters and boxes are
    checked by L{curvetun.handshake} and L{curvetun.session}.

    @raise BadPacket: unknown magic, or the wrong size for the packet type.
    """
    parser = _PARSERS.get(payload[:8])
    if parser is None:
        raise BadPacket("unknown packet magic")
    return parser(payload)


def parse_as(payload: bytes, packet_type: type[_P]) -> _P:
    """
    Decode one payload that must be of one given packet type, the only one
    the connection's current state accepts (spec "Connection states").

    @raise BadPacket: the payload does not parse, or is another packet type.
    """
    packet = parse(payload)
    if not isinstance(packet, packet_type):
        raise BadPacket(f"unexpected {_NAMES[type(packet)]} packet, expected {_NAMES[packet_type]}")
    return packet
