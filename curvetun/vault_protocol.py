"""
The AMP commands between a curvetun worker and its vault process: one
command per handshake step (see L{curvetun.handshake_vault}), and one to
learn the public key.

Every argument and answer is raw bytes (AMP's C{String}); the vault checks each size itself.
A step whose peer data does not verify answers the error C{BAD_PACKET}; a
vault that cannot make a nonce (its counter could not be stored) answers
C{VAULT_FAILED}; a request the vault cannot parse answers C{BAD_REQUEST}.
"""

from __future__ import annotations

from typing import ClassVar

from twisted.protocols import amp

from curvetun.errors import BadPacket, CurveTunError

BAD_PACKET = b"BAD_PACKET"
VAULT_FAILED = b"VAULT_FAILED"
BAD_REQUEST = b"BAD_REQUEST"

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

    C{hello} is the whole hello payload (128 bytes); C{ephemeral_public}
    and C{ephemeral_secret} are C{(ES, ESs)}; C{cookie_key} is C{Ts}. The
    answer is the cookie payload (168 bytes).
    """

    commandName = b"open-hello-and-seal-cookie"
    arguments: ClassVar[list[tuple[bytes, amp.Argument]]] = [
        (b"hello", amp.String()),
        (b"ephemeral_public", amp.String()),
        (b"ephemeral_secret", amp.String()),
        (b"cookie_key", amp.String()),
    ]
    response: ClassVar[list[tuple[bytes, amp.Argument]]] = [(b"cookie", amp.String())]
    errors: ClassVar[dict[type[Exception], bytes]] = _ERRORS


class OpenVouch(amp.Command):
    """
    Server, vouch step: open the inner vouch box C{V} (48 bytes) from the
    client's long-term key C{client_key} under C{"CurveCPV" || vouch_nonce}.
    The answer is its plaintext; the worker compares it with the cookie's
    C{EC}.
    """

    commandName = b"open-vouch"
    arguments: ClassVar[list[tuple[bytes, amp.Argument]]] = [
        (b"client_key", amp.String()),
        (b"vouch_nonce", amp.String()),
        (b"inner_box", amp.String()),
    ]
    response: ClassVar[list[tuple[bytes, amp.Argument]]] = [(b"plaintext", amp.String())]
    errors: ClassVar[dict[type[Exception], bytes]] = _ERRORS


class SealVouch(amp.Command):
    """
    Client, vouch step: L{IHandshakeVault.seal_vouch}. The answer is
    C{vouch_nonce} (16 bytes) and C{inner_box} (48 bytes).
    """

    commandName = b"seal-vouch"
    arguments: ClassVar[list[tuple[bytes, amp.Argument]]] = [
        (b"client_ephemeral_key", amp.String()),
        (b"server_key", amp.String()),
    ]
    response: ClassVar[list[tuple[bytes, amp.Argument]]] = [
        (b"vouch_nonce", amp.String()),
        (b"inner_box", amp.String()),
    ]
    errors: ClassVar[dict[type[Exception], bytes]] = _ERRORS
