"""
L{LocalHandshakeVault}: each step's answer is the one the pure handshake
functions give, it has arrived by the time the call returns, a step that
does not verify uses no nonce, and every failure is a L{BadPacket}.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from curvetun import handshake
from curvetun.cookies import CookieKeys
from curvetun.errors import BadPacket
from curvetun.handshake import EphemeralKeyPair
from curvetun.handshake_vault import (
    IHandshakeVault,
    IImmediateHandshakeVault,
    LocalHandshakeVault,
    client_vouch_key,
    client_vouch_packet,
    one_cookie_key,
)
from curvetun.packets import Cookie, Hello, Vouch, parse_as
from curvetun.vault import MemoryVault


def counting_bytes() -> object:
    """
    A deterministic source of "random" bytes, so that two vaults made from
    it hand out the same nonces.
    """
    counter = itertools.count()
    return lambda n: bytes([next(counter) % 256]) * n


def twin_vaults() -> tuple[MemoryVault, MemoryVault]:
    """
    Two vaults with one key pair, one nonce key, one counter and one
    random source: the same calls give the same bytes.
    """
    secret, nonce_key = os.urandom(32), os.urandom(32)
    return (
        MemoryVault(secret, nonce_key, random_bytes=counting_bytes()),  # type: ignore[arg-type]
        MemoryVault(secret, nonce_key, random_bytes=counting_bytes()),  # type: ignore[arg-type]
    )


def result_of(deferred: Deferred[Any]) -> object:
    """
    The result a Deferred already has (a Failure if it failed); raise if it
    has none yet.
    """
    results: list[object] = []
    deferred.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


class LocalHandshakeVaultTests(SynchronousTestCase):
    """
    The in-process vault answers each step at once, with the bytes of the
    synchronous pure functions.
    """

    def test_it_provides_the_interface(self) -> None:
        vault = LocalHandshakeVault(MemoryVault.generate())
        self.assertTrue(verifyObject(IHandshakeVault, vault))
        self.assertTrue(verifyObject(IImmediateHandshakeVault, vault))
        self.assertEqual(vault.public_key, vault.vault.public_key)

    def test_its_immediate_answers_are_its_deferred_answers(self) -> None:
        # Twin vaults make the same nonces: each step answered both ways
        # gives the same bytes, and a refusal is the same BadPacket raised.
        ours, theirs = twin_vaults()
        now, later = LocalHandshakeVault(ours), LocalHandshakeVault(theirs)
        server = MemoryVault.generate()
        client = EphemeralKeyPair.generate()
        self.assertEqual(
            now.seal_vouch_now(client.public_key, server.public_key),
            result_of(later.seal_vouch(client.public_key, server.public_key)),
        )
        hello = parse_as(handshake.client_hello(ours.public_key, client)[0], Hello)
        ephemeral = EphemeralKeyPair.generate()
        cookie_key = os.urandom(32)
        clock = Clock()
        self.assertEqual(
            now.answer_hello_now(hello, ephemeral, CookieKeys(clock=clock, initial_key=cookie_key)),
            result_of(
                later.open_hello_and_seal_cookie(
                    hello, ephemeral, CookieKeys(clock=clock, initial_key=cookie_key)
                )
            ),
        )
        stranger = parse_as(
            handshake.client_hello(server.public_key, EphemeralKeyPair.generate())[0], Hello
        )
        with self.assertRaises(BadPacket):
            now.answer_hello_now(stranger, ephemeral, CookieKeys(clock=clock))
        with self.assertRaises(BadPacket):
            now.seal_vouch_now(client.public_key, b"short")

    def test_the_hello_step_gives_the_pure_functions_cookie(self) -> None:
        ours, theirs = twin_vaults()
        cookie_key = os.urandom(32)
        clock = Clock()
        cookie_keys = CookieKeys(clock=clock, initial_key=cookie_key)
        client = EphemeralKeyPair.generate()
        hello = parse_as(handshake.client_hello(ours.public_key, client)[0], Hello)
        server = EphemeralKeyPair.generate()
        answer = result_of(
            LocalHandshakeVault(ours).open_hello_and_seal_cookie(hello, server, cookie_keys)
        )
        handshake.server_open_hello(hello, theirs)
        expected = handshake.server_cookie(
            hello.client_ephemeral_key,
            theirs,
            CookieKeys(clock=clock, initial_key=cookie_key),
            server,
        )
        self.assertEqual(answer, expected)

    def test_a_hello_that_does_not_verify_uses_no_nonce(self) -> None:
        ours, theirs = twin_vaults()
        hello = parse_as(
            handshake.client_hello(MemoryVault.generate().public_key, EphemeralKeyPair.generate())[
                0
            ],
            Hello,
        )
        answer = result_of(
            LocalHandshakeVault(ours).open_hello_and_seal_cookie(
                hello, EphemeralKeyPair.generate(), CookieKeys(clock=Clock())
            )
        )
        assert isinstance(answer, Failure)
        self.assertIsInstance(answer.value, BadPacket)
        self.assertEqual(ours.safe_nonce(), theirs.safe_nonce())

    def test_a_cookie_key_sent_to_the_vault_must_be_32_bytes(self) -> None:
        with self.assertRaises(BadPacket):
            one_cookie_key(b"short")
        self.assertEqual(one_cookie_key(bytes(32)).current_key(), bytes(32))

    def test_the_client_vouch_is_the_pure_functions_vouch(self) -> None:
        ours, theirs = twin_vaults()
        server = MemoryVault.generate()
        cookie_keys = CookieKeys(clock=Clock())
        client = EphemeralKeyPair.generate()
        _, shared = handshake.client_hello(server.public_key, client)
        cookie = handshake.server_cookie(client.public_key, server, cookie_keys)
        server_ephemeral_key, cookie_K = handshake.client_open_cookie(
            parse_as(cookie, Cookie), shared
        )
        answer = result_of(
            LocalHandshakeVault(ours).seal_vouch(client.public_key, server.public_key)
        )
        assert isinstance(answer, tuple)
        vouch, _ = client_vouch_packet(
            cookie_K, client_vouch_key(server_ephemeral_key, client), ours.public_key, *answer
        )
        expected, _ = handshake.client_vouch(
            cookie_K, server_ephemeral_key, client, server.public_key, theirs
        )
        self.assertEqual(vouch, expected)
        # And the server accepts it.
        opened = handshake.server_open_vouch(parse_as(vouch, Vouch), cookie_keys)
        handshake.server_verify_vouch(opened, server)

    def test_a_bad_server_ephemeral_key_fails_before_the_vault_is_asked(self) -> None:
        with self.assertRaises(BadPacket):
            client_vouch_key(bytes(32), EphemeralKeyPair.generate())

    def test_the_server_vouch_step_verifies_and_refuses(self) -> None:
        server = MemoryVault.generate()
        client = MemoryVault.generate()
        cookie_keys = CookieKeys(clock=Clock())
        ephemeral = EphemeralKeyPair.generate()
        _, shared = handshake.client_hello(server.public_key, ephemeral)
        cookie = handshake.server_cookie(ephemeral.public_key, server, cookie_keys)
        es, cookie_K = handshake.client_open_cookie(parse_as(cookie, Cookie), shared)
        vouch, _ = handshake.client_vouch(cookie_K, es, ephemeral, server.public_key, client)
        opened = handshake.server_open_vouch(parse_as(vouch, Vouch), cookie_keys)
        local = LocalHandshakeVault(server)
        self.assertIsNone(result_of(local.open_vouch(opened)))
        for forged in [
            attrs.evolve(opened, client_ephemeral_key=os.urandom(32)),
            attrs.evolve(opened, client_key=MemoryVault.generate().public_key),
            attrs.evolve(opened, inner_box=os.urandom(48)),
        ]:
            answer = result_of(local.open_vouch(forged))
            assert isinstance(answer, Failure)
            self.assertIsInstance(answer.value, BadPacket)
