"""
The known-answer session of C{handshake.json} and every case of
C{reject.json}, played against whole connections (machine and transport)
built with the vectors' fixed keys: the bytes a curvetun peer puts on the
wire are the bytes the Erlang original put there, and everything the
original rejects closes the connection without delivering anything.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from curvetun.connection import ClientCore, ClientMachine, ConnectionInputs, ConnectionOwner
from curvetun.cookies import CookieKeys
from curvetun.factories import CurveTunClientFactory, CurveTunServerFactory
from curvetun.handshake import EphemeralKeyPair
from curvetun.replay import ReplayGuard
from curvetun.transport import CurveTunProtocol
from curvetun.vault import MemoryVault

from ._support import CLIENT_ADDRESS, SERVER_ADDRESS, AllowList, RecordingFactory, framed
from ._vectors import load, unhex

SESSION = load("handshake.json")
INPUTS = {name: value for name, value in SESSION["inputs"].items()}
PACKETS = SESSION["packets"]
HELLO, COOKIE, VOUCH = PACKETS[0], PACKETS[1], PACKETS[2]
CLIENT_MESSAGES = [p for p in PACKETS[3:] if p["direction"].startswith("client")]
SERVER_MESSAGES = [p for p in PACKETS[3:] if p["direction"].startswith("server")]


def key(name: str) -> bytes:
    return unhex(INPUTS[name])


def fixed_random(name: str) -> Callable[[int], bytes]:
    """
    The 8 random bytes the vectors' safe nonce was made with.
    """
    value = key(name)
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
        return [m for app in self.apps.built for m in app.received]


class VectorServer(VectorPeer):
    """
    A server protocol holding the vectors' server key and cookie key, on a
    StringTransport, admitting the vectors' client from 127.0.0.1.
    """

    def __init__(self, registry_key: bytes | None = None) -> None:
        clock = Clock()
        self.vault = MemoryVault(
            key("server_longterm_secret_Ss"),
            key("server_safe_nonce_scramble_key"),
            random_bytes=fixed_random("server_safe_nonce_random8"),
        )
        allowed = key("client_longterm_public_C") if registry_key is None else registry_key
        self.apps = RecordingFactory()
        cookie_keys = CookieKeys(clock=clock, initial_key=key("cookie_minute_key_Ts"))
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
            key("client_longterm_secret_Cs"),
            key("client_safe_nonce_scramble_key"),
            random_bytes=fixed_random("client_safe_nonce_random8"),
        )
        self.apps = RecordingFactory()
        ephemeral = EphemeralKeyPair(
            key("client_ephemeral_public_EC"), key("client_ephemeral_secret_ECs")
        )
        factory = CurveTunClientFactory(
            self.apps, self.vault, key("server_longterm_public_S"), clock
        )

        def make_machine(owner: ConnectionOwner) -> ConnectionInputs:
            return ClientMachine(
                ClientCore(owner, factory.handshake_vault, factory.server_key, lambda: ephemeral)
            )

        self.protocol = CurveTunProtocol(factory, make_machine)
        self.transport = StringTransport(hostAddress=CLIENT_ADDRESS, peerAddress=SERVER_ADDRESS)
        self.protocol.makeConnection(self.transport)


class KnownAnswerSessionTests(SynchronousTestCase):
    """
    Both roles reproduce the original's session byte for byte.
    """

    def test_the_client_sends_the_vector_hello(self) -> None:
        client = VectorClient()
        self.assertEqual(client.transport.value(), unhex(HELLO["framed"]))

    def test_the_server_answers_the_vector_hello_with_the_vector_cookie(self) -> None:
        server = VectorServer()
        # The server's ephemeral key is random in real life: pin it.
        server_ephemeral = EphemeralKeyPair(
            key("server_ephemeral_public_ES"), key("server_ephemeral_secret_ESs")
        )
        self.patch(EphemeralKeyPair, "generate", classmethod(lambda cls: server_ephemeral))
        self.assertEqual(server.receive(unhex(HELLO["payload"])), unhex(COOKIE["framed"]))

    def test_the_client_answers_the_vector_cookie_with_the_vector_vouch(self) -> None:
        client = VectorClient()
        self.assertEqual(client.receive(unhex(COOKIE["payload"])), unhex(VOUCH["framed"]))

    def test_the_server_accepts_the_vouch_and_delivers_the_client_messages(self) -> None:
        server = VectorServer()
        server.receive(unhex(HELLO["payload"]))
        self.assertEqual(server.receive(unhex(VOUCH["payload"])), b"")
        [app] = server.apps.built
        self.assertEqual(server.protocol.peer_public_key, key("client_longterm_public_C"))
        for packet in CLIENT_MESSAGES:
            server.receive(unhex(packet["payload"]))
        self.assertEqual(server.delivered, [unhex(p["plaintext"]) for p in CLIENT_MESSAGES])

    def test_the_server_sends_the_vector_messages(self) -> None:
        server = VectorServer()
        server.receive(unhex(HELLO["payload"]))
        server.receive(unhex(VOUCH["payload"]))
        for packet in SERVER_MESSAGES:
            server.transport.clear()
            server.protocol.write_message(unhex(packet["plaintext"]))
            self.assertEqual(server.transport.value(), unhex(packet["framed"]))

    def test_the_client_sends_the_vector_messages_and_delivers_the_servers(self) -> None:
        client = VectorClient()
        client.receive(unhex(COOKIE["payload"]))
        for packet in CLIENT_MESSAGES:
            client.transport.clear()
            client.protocol.write_message(unhex(packet["plaintext"]))
            self.assertEqual(client.transport.value(), unhex(packet["framed"]))
        for packet in SERVER_MESSAGES:
            client.receive(unhex(packet["payload"]))
        self.assertEqual(client.delivered, [unhex(p["plaintext"]) for p in SERVER_MESSAGES])
        self.assertFalse(client.transport.disconnecting)


def _prepare(case: dict[str, Any]) -> tuple[VectorPeer, list[bytes]]:
    """
    Bring a connection into the state C{case} names; return it and what it
    has delivered legitimately so far.
    """
    target = case["target"]
    peer: VectorPeer
    if target.startswith("server"):
        override = case["registry_override_key_for_127_0_0_1"]
        peer = VectorServer(None if override is None else unhex(override))
        handshake = {"server_awaiting_vouch": [HELLO], "server_connected": [HELLO, VOUCH]}
        messages = CLIENT_MESSAGES
    else:
        peer = VectorClient()
        handshake = {"client_connected": [COOKIE]}
        messages = SERVER_MESSAGES
    for packet in handshake.get(target, []):
        peer.receive(unhex(packet["payload"]))
    expected = []
    for packet in messages:
        if packet["counter"] in case["prior_msg_counters_received"]:
            peer.receive(unhex(packet["payload"]))
            expected.append(unhex(packet["plaintext"]))
    return peer, expected


def _make_reject_test(case: dict[str, Any]) -> Callable[[SynchronousTestCase], None]:
    def test(self: SynchronousTestCase) -> None:
        peer, expected = _prepare(case)
        self.assertEqual(peer.delivered, expected, "the setup itself failed")
        self.assertFalse(peer.transport.disconnecting, "closed before the bad packet")
        answer = peer.receive(unhex(case["payload"]))
        self.assertTrue(peer.transport.disconnecting, "the connection stayed open")
        self.assertEqual(answer, b"", "the rejecting side answered")
        self.assertEqual(peer.delivered, expected, "something unverified was delivered")
        # Nothing after the bad packet is processed either.
        for packet in CLIENT_MESSAGES + SERVER_MESSAGES:
            peer.protocol.dataReceived(framed(unhex(packet["payload"])))
        self.assertEqual(peer.delivered, expected)

    test.__doc__ = f"{case['id']}: {case['mutation']} ({case['failure_class']})."
    return test


class RejectVectorTests(SynchronousTestCase):
    """
    Every packet the original rejects closes a curvetun connection in the
    same state, and nothing that did not verify reaches the application.
    """

    locals().update(
        {
            "test_" + case["id"].replace(".", "_"): _make_reject_test(case)
            for case in load("reject.json")["cases"]
        }
    )
