"""
The known-answer vectors in C{tests/vectors/} (see their README), and the
two peers of C{handshake.json}: its fixed keys and nonces, and small
stand-ins for the vault and the cookie keys that reproduce its session
byte for byte.

L{FakeVault} and L{FakeCookieSealer} stand in for the real vault and cookie
keys, with fixed keys and safe nonces. L{VectorServer} and L{VectorClient}
are whole connections (machine and transport, on a StringTransport) that
hold the session's keys and so put its packets on the wire byte for byte.
"""

from __future__ import annotations

import json
from collections.abc import Callable
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
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from curvetun.connection import ClientCore, ClientMachine, ConnectionInputs, ConnectionOwner
from curvetun.cookies import CookieKeys
from curvetun.errors import BadPacket
from curvetun.factories import CurveTunClientFactory, CurveTunServerFactory
from curvetun.handshake import EphemeralKeyPair, OpenedVouch, client_vouch, server_open_vouch
from curvetun.interfaces import IVault
from curvetun.nonces import MINUTE_KEY_PREFIX
from curvetun.packets import Vouch, parse_as
from curvetun.replay import ReplayGuard
from curvetun.session import Session
from curvetun.transport import CurveTunProtocol
from curvetun.vault import MemoryVault

from ._support import CLIENT_ADDRESS, SERVER_ADDRESS, AllowList, RecordingFactory, framed


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


# -- whole connections of handshake.json ---------------------------------------


def fixed_random(name: str) -> Callable[[int], bytes]:
    """
    The 8 random bytes the vectors' safe nonce C{name} was made with.
    """
    value = INPUTS[name]
    return lambda n: value[:n]


class VectorPeer:
    """
    One end of the vectors' session: a curvetun protocol on a
    StringTransport, and the application protocols it started.
    """

    protocol: CurveTunProtocol
    transport: StringTransport
    apps: RecordingFactory

    def receive(self, payload: bytes) -> bytes:
        """
        Feed one framed payload; return what was written in answer.
        """
        self.transport.clear()
        self.protocol.dataReceived(framed(payload))
        written: bytes = self.transport.value()
        return written

    @property
    def delivered(self) -> list[bytes]:
        """
        Every message the applications received, in order.
        """
        return [m for app in self.apps.built for m in app.received]


class VectorServer(VectorPeer):
    """
    A server protocol holding the vectors' server key and cookie key, on a
    StringTransport, admitting the vectors' client from 127.0.0.1 (or the
    key C{registry_key} instead).
    """

    def __init__(self, registry_key: bytes | None = None) -> None:
        clock = Clock()
        self.vault = MemoryVault(
            SS,
            INPUTS["server_safe_nonce_scramble_key"],
            random_bytes=fixed_random("server_safe_nonce_random8"),
        )
        allowed = C if registry_key is None else registry_key
        self.apps = RecordingFactory()
        cookie_keys = CookieKeys(clock=clock, initial_key=TS)
        factory = CurveTunServerFactory(
            self.apps,
            self.vault,
            cookie_keys,
            AllowList(clients=[(allowed, CLIENT_ADDRESS.host)]),
            ReplayGuard(cookie_keys).remember,
            clock,
        )
        protocol = factory.buildProtocol(CLIENT_ADDRESS)
        assert protocol is not None
        self.protocol = protocol
        self.transport = StringTransport(hostAddress=SERVER_ADDRESS, peerAddress=CLIENT_ADDRESS)
        self.protocol.makeConnection(self.transport)


class VectorClient(VectorPeer):
    """
    A client protocol holding the vectors' client key and ephemeral key,
    on a StringTransport, expecting the vectors' server key.
    """

    def __init__(self) -> None:
        clock = Clock()
        self.vault = MemoryVault(
            CS,
            INPUTS["client_safe_nonce_scramble_key"],
            random_bytes=fixed_random("client_safe_nonce_random8"),
        )
        self.apps = RecordingFactory()
        factory = CurveTunClientFactory(self.apps, self.vault, S, clock)

        def make_machine(owner: ConnectionOwner) -> ConnectionInputs:
            return ClientMachine(
                ClientCore(
                    owner, factory.handshake_vault, factory.server_key, lambda: CLIENT_EPHEMERAL
                )
            )

        self.protocol = CurveTunProtocol(factory, make_machine)
        self.transport = StringTransport(hostAddress=CLIENT_ADDRESS, peerAddress=SERVER_ADDRESS)
        self.protocol.makeConnection(self.transport)


def protocol_of(peer: VectorPeer) -> CurveTunProtocol:
    """
    The peer's connection (its factory has no limits that could refuse it).
    """
    assert peer.protocol is not None
    return peer.protocol
