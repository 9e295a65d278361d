"""
The AMP commands between a curvetun worker and its vault process: one
command per handshake step (see L{curvetun.handshake_vault}), and one to
learn the public key.

Each command has one argument, C{request}, and one answer: raw bytes (AMP's
C{String}) that pack the step's fixed-size fields back to back, in the
order its docstring gives (one AMP value per call instead of one per field:
each value costs both ends a parse and a conversion). The vault checks the
sizes itself.
A step whose peer data does not verify answers the error C{BAD_PACKET}; a
vault that cannot make a nonce (its counter could not be stored) answers
C{VAULT_FAILED}; a request the vault cannot parse answers C{BAD_REQUEST}.
"""

from __future__ import annotations

from struct import Struct
from typing import ClassVar

from twisted.protocols import amp

from curvetun.errors import BadPacket, CurveTunError
from curvetun.handshake_vault import INNER_VOUCH_SIZE, SAFE_NONCE_SIZE
from curvetun.keys import KEY_SIZE
from curvetun.packets import HELLO_SIZE

BAD_PACKET = b"BAD_PACKET"
VAULT_FAILED = b"VAULT_FAILED"
BAD_REQUEST = b"BAD_REQUEST"

HELLO_REQUEST_SIZE = HELLO_SIZE + 3 * KEY_SIZE
OPEN_VOUCH_REQUEST_SIZE = KEY_SIZE + SAFE_NONCE_SIZE + INNER_VOUCH_SIZE
SEAL_VOUCH_REQUEST_SIZE = 2 * KEY_SIZE
SEAL_VOUCH_ANSWER_SIZE = SAFE_NONCE_SIZE + INNER_VOUCH_SIZE

_ERRORS: dict[type[Exception], bytes] = {BadPacket: BAD_PACKET, CurveTunError: VAULT_FAILED}


class GetPublicKey(amp.Command):
    """
    Which long-term public key does this vault answer for? A worker asks
    once per connection to the vault, before any handshake.
    """

    commandName = b"get-public-key"
    response: ClassVar[list[tuple[bytes, amp.Argument]]] = [(b"public_key", amp.String())]


class OpenHelloAndSealCookie(amp.Command):
    """
    Server, hello step: L{IHandshakeVault.open_hello_and_seal_cookie}.

    C{request} is L{HELLO_REQUEST_SIZE} bytes: the whole hello payload
    (128), then C{ES} and C{ESs} (the server's ephemeral key pair) and
    C{Ts} (the cookie key), 32 bytes each. The answer C{cookie} is the
    cookie payload (168 bytes).
    """

    commandName = b"open-hello-and-seal-cookie"
    arguments: ClassVar[list[tuple[bytes, amp.Argument]]] = [(b"request", amp.String())]
    response: ClassVar[list[tuple[bytes, amp.Argument]]] = [(b"cookie", amp.String())]
    errors: ClassVar[dict[type[Exception], bytes]] = _ERRORS


class OpenVouch(amp.Command):
    """
    Server, vouch step: open the inner vouch box C{V} from the client's
    long-term key C{C} under C{"CurveCPV" || VN}.

    C{request} is L{OPEN_VOUCH_REQUEST_SIZE} bytes: C{C} (32), C{VN} (16)
    and C{V} (48). The answer C{plaintext} is what C{V} holds; the worker
    compares it with the cookie's C{EC}.
    """

    commandName = b"open-vouch"
    arguments: ClassVar[list[tuple[bytes, amp.Argument]]] = [(b"request", amp.String())]
    response: ClassVar[list[tuple[bytes, amp.Argument]]] = [(b"plaintext", amp.String())]
    errors: ClassVar[dict[type[Exception], bytes]] = _ERRORS


class SealVouch(amp.Command):
    """
    Client, vouch step: L{IHandshakeVault.seal_vouch}.

    C{request} is L{SEAL_VOUCH_REQUEST_SIZE} bytes: the client's ephemeral
    key C{EC}, then the server's long-term key C{S}, 32 bytes each. The
    answer C{vouch} is L{SEAL_VOUCH_ANSWER_SIZE} bytes: C{VN} (16), then
    C{V} (48).
    """

    commandName = b"seal-vouch"
    arguments: ClassVar[list[tuple[bytes, amp.Argument]]] = [(b"request", amp.String())]
    response: ClassVar[list[tuple[bytes, amp.Argument]]] = [(b"vouch", amp.String())]
    errors: ClassVar[dict[type[Exception], bytes]] = _ERRORS


LENGTH = Struct("!H")
"""The length before each key and value of an AMP box."""
_MAX_KEY_LENGTH = 255


class BoxReader(amp.AMP):
    """
    AMP whose boxes are read a whole box at a time, instead of through
    C{Int16StringReceiver}'s state machine (a call per key and per value):
    the same framing, the same key length limit (C{lengthLimitExceeded}),
    each box handed to C{ampBoxReceived} as it completes.
    """

    _unparsed = b""
    _broken = False

    def dataReceived(self, data: bytes) -> None:
        if self.innerProtocol is not None:
            super().dataReceived(data)  # AMP switched protocols: not ours to parse
            return
        if self._broken:
            return  # the framing broke: the connection is closing
        buffer = self._unparsed + data if self._unparsed else data
        size = len(buffer)
        start = 0
        unpack = LENGTH.unpack_from
        while start + 2 <= size:
            # One box: key, value, key, value, ..., an empty key.
            box = amp.AmpBox()
            at = start
            while at + 2 <= size:
                (length,) = unpack(buffer, at)
                if length > _MAX_KEY_LENGTH:
                    self._unparsed = b""
                    self._broken = True
                    self.lengthLimitExceeded(length)
                    return
                if length == 0:
                    at += 2
                    break
                value_at = at + 2 + length
                if value_at + 2 > size:
                    at = size + 1  # the value's length has not come yet
                    break
                (value_length,) = unpack(buffer, value_at)
                end = value_at + 2 + value_length
                if end > size:
                    at = size + 1
                    break
                box[buffer[at + 2 : value_at]] = buffer[value_at + 2 : end]
                at = end
            else:
                at = size + 1  # the next length has not come yet
            if at > size:
                break
            start = at
            self.ampBoxReceived(box)
        self._unparsed = buffer[start:] if start < size else b""
