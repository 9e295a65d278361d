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

from twisted.trial.unittest import SynchronousTestCase

from curvetun.handshake import EphemeralKeyPair

from ._support import framed
from ._vectors import (
    C2S,
    COOKIE_V,
    HELLO_V,
    S2C,
    SERVER_EPHEMERAL,
    VOUCH_V,
    C,
    VectorClient,
    VectorPeer,
    VectorServer,
    load,
    unhex,
)


class KnownAnswerSessionTests(SynchronousTestCase):
    """
    Both roles reproduce the original's session byte for byte.
    """

    def test_the_client_sends_the_vector_hello(self) -> None:
        client = VectorClient()
        self.assertEqual(client.transport.value(), unhex(HELLO_V["framed"]))

    def test_the_server_answers_the_vector_hello_with_the_vector_cookie(self) -> None:
        server = VectorServer()
        # The server's ephemeral key is random in real life: pin it.
        self.patch(EphemeralKeyPair, "generate", classmethod(lambda cls: SERVER_EPHEMERAL))
        self.assertEqual(server.receive(unhex(HELLO_V["payload"])), unhex(COOKIE_V["framed"]))

    def test_the_client_answers_the_vector_cookie_with_the_vector_vouch(self) -> None:
        client = VectorClient()
        self.assertEqual(client.receive(unhex(COOKIE_V["payload"])), unhex(VOUCH_V["framed"]))

    def test_the_server_accepts_the_vouch_and_delivers_the_client_messages(self) -> None:
        server = VectorServer()
        server.receive(unhex(HELLO_V["payload"]))
        self.assertEqual(server.receive(unhex(VOUCH_V["payload"])), b"")
        [app] = server.apps.built
        self.assertEqual(server.protocol.peer_public_key, C)
        for packet in C2S:
            server.receive(unhex(packet["payload"]))
        self.assertEqual(server.delivered, [unhex(p["plaintext"]) for p in C2S])

    def test_the_server_sends_the_vector_messages(self) -> None:
        server = VectorServer()
        server.receive(unhex(HELLO_V["payload"]))
        server.receive(unhex(VOUCH_V["payload"]))
        for packet in S2C:
            server.transport.clear()
            server.protocol.write_message(unhex(packet["plaintext"]))
            self.assertEqual(server.transport.value(), unhex(packet["framed"]))

    def test_the_client_sends_the_vector_messages_and_delivers_the_servers(self) -> None:
        client = VectorClient()
        client.receive(unhex(COOKIE_V["payload"]))
        for packet in C2S:
            client.transport.clear()
            client.protocol.write_message(unhex(packet["plaintext"]))
            self.assertEqual(client.transport.value(), unhex(packet["framed"]))
        for packet in S2C:
            client.receive(unhex(packet["payload"]))
        self.assertEqual(client.delivered, [unhex(p["plaintext"]) for p in S2C])
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
        handshake = {"server_awaiting_vouch": [HELLO_V], "server_connected": [HELLO_V, VOUCH_V]}
        messages = C2S
    else:
        peer = VectorClient()
        handshake = {"client_connected": [COOKIE_V]}
        messages = S2C
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
        for packet in C2S + S2C:
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
