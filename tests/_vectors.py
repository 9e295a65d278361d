"""
The known-answer vectors in C{tests/vectors/} (see their README), and the
two peers of C{handshake.json}: its fixed keys and nonces, and small
stand-ins for the vault and the cookie keys that reproduce its session
byte for byte.

L{FakeVault} and L{FakeCookieSealer} stand in for the real vault and cookie
keys, with fixed keys and safe nonces.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nacl.bindings import (
    crypto_box_easy,
    crypto_box_open_easy,
    crypto_scalarmult_base,
    crypto_secretbox_easy,
    crypto_secretbox_open_easy,
)
from nacl.exceptions import CryptoError
from zope.interface import implementer

from curvetun.errors import BadPacket
from curvetun.handshake import EphemeralKeyPair, OpenedVouch, client_vouch, server_open_vouch
from curvetun.interfaces import IVault
from curvetun.nonces import MINUTE_KEY_PREFIX
from curvetun.packets import Vouch, parse_as
from curvetun.session import Session


def load(name: str) -> dict[str, Any]:
    """
    Read the vector file C{name} (for example C{"handshake.json"}).
    """
    path = Path(__file__).parent / "vectors" / name
    with path.open(encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data


def unhex(value: str) -> bytes:
    """
    Decode a lowercase hex string from a vector file.
    """
    return bytes.fromhex(value)


# -- the session of handshake.json ---------------------------------------------

HANDSHAKE = load("handshake.json")
INPUTS = {name: unhex(value) for name, value in HANDSHAKE["inputs"].items() if "note" not in name}
SHARED_KEYS = HANDSHAKE["box_shared_keys"]
HELLO_V, COOKIE_V, VOUCH_V = HANDSHAKE["packets"][:3]
MESSAGES = [p for p in HANDSHAKE["packets"] if p["name"] == "msg"]
C2S = [p for p in MESSAGES if p["direction"] == "client->server"]
S2C = [p for p in MESSAGES if p["direction"] == "server->client"]

C = INPUTS["client_longterm_public_C"]
CS = INPUTS["client_longterm_secret_Cs"]
S = INPUTS["server_longterm_public_S"]
SS = INPUTS["server_longterm_secret_Ss"]
CLIENT_EPHEMERAL = EphemeralKeyPair(
    INPUTS["client_ephemeral_public_EC"], INPUTS["client_ephemeral_secret_ECs"]
)
SERVER_EPHEMERAL = EphemeralKeyPair(
    INPUTS["server_ephemeral_public_ES"], INPUTS["server_ephemeral_secret_ESs"]
)
EC, ECS = CLIENT_EPHEMERAL.public_key, CLIENT_EPHEMERAL.secret_key
ES, ESS = SERVER_EPHEMERAL.public_key, SERVER_EPHEMERAL.secret_key
TS = INPUTS["cookie_minute_key_Ts"]
SERVER_SAFE_NONCE = INPUTS["server_safe_nonce_16"]
CLIENT_SAFE_NONCE = INPUTS["client_safe_nonce_16"]
COOKIE_K = unhex(COOKIE_V["cookie_K"])
VOUCH = parse_as(unhex(VOUCH_V["payload"]), Vouch)


@implementer(IVault)
class FakeVault:
    """
    A vault with a fixed secret key that hands out the given safe nonces in
    order.
    """

    def __init__(self, secret_key: bytes, safe_nonces: list[bytes]) -> None:
        self._secret_key = secret_key
        self._safe_nonces = list(safe_nonces)
        self.public_key = crypto_scalarmult_base(secret_key)

    def safe_nonce(self) -> bytes:
        return self._safe_nonces.pop(0)

    def box(
        self, plaintext: bytes, nonce: bytes, peer_public_key: bytes, ephemeral_peer: bool = False
    ) -> bytes:
        return crypto_box_easy(plaintext, nonce, peer_public_key, self._secret_key)

    def box_open(
        self, ciphertext: bytes, nonce: bytes, peer_public_key: bytes, ephemeral_peer: bool = False
    ) -> bytes:
        try:
            return crypto_box_open_easy(ciphertext, nonce, peer_public_key, self._secret_key)
        except CryptoError:
            raise BadPacket("box does not verify") from None


class FakeCookieSealer:
    """
    A L{CookieSealer} with one fixed minute key C{Ts}.
    """

    def __init__(self, minute_key: bytes) -> None:
        self._minute_key = minute_key
        self.sealed: list[tuple[bytes, bytes, bytes]] = []

    def seal(
        self, safe_nonce: bytes, client_ephemeral_key: bytes, server_ephemeral_secret: bytes
    ) -> bytes:
        self.sealed.append((safe_nonce, client_ephemeral_key, server_ephemeral_secret))
        return crypto_secretbox_easy(
            client_ephemeral_key + server_ephemeral_secret,
            MINUTE_KEY_PREFIX + safe_nonce,
            self._minute_key,
        )

    def current_key(self) -> bytes:
        return self._minute_key

    def open(self, cookie_K: bytes) -> tuple[bytes, bytes]:
        try:
            plaintext = crypto_secretbox_open_easy(
                cookie_K[16:], MINUTE_KEY_PREFIX + cookie_K[:16], self._minute_key
            )
        except CryptoError:
            raise BadPacket("cookie does not verify") from None
        return plaintext[:32], plaintext[32:]


def server_vault() -> FakeVault:
    """
    The server's vault of handshake.json.
    """
    return FakeVault(SS, [SERVER_SAFE_NONCE])


def client_vault() -> FakeVault:
    """
    The client's vault of handshake.json.
    """
    return FakeVault(CS, [CLIENT_SAFE_NONCE])


def connected_sessions() -> tuple[Session, Session]:
    """
    The C{(client, server)} sessions right after the handshake of
    handshake.json, made by the handshake functions.
    """
    _, client = client_vouch(COOKIE_K, ES, CLIENT_EPHEMERAL, S, client_vault())
    return client, open_vouch().session


def open_vouch() -> OpenedVouch:
    """
    The vouch of handshake.json, opened by its server.
    """
    return server_open_vouch(VOUCH, FakeCookieSealer(TS))
