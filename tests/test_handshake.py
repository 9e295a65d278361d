"""
Tests for L{curvetun.handshake}: the session of handshake.json, byte for
byte, from its fixed inputs, and the ways each step refuses.

The vectors' peers (L{FakeVault}, L{FakeCookieSealer} and the keys of
handshake.json) live in C{tests._vectors}.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
from nacl.bindings import (
    crypto_box_easy,
    crypto_scalarmult_base,
)
from nacl.exceptions import CryptoError
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from curvetun.errors import BadPacket
from curvetun.handshake import (
    CookieSealer,
    EphemeralKeyPair,
    client_hello,
    client_open_cookie,
    client_vouch,
    server_cookie,
    server_open_hello,
    server_open_vouch,
    server_verify_vouch,
)
from curvetun.interfaces import IVault
from curvetun.nonces import (
    HELLO_PREFIX,
    VOUCH_INNER_PREFIX,
    long_term_nonce,
    short_term_nonce,
)
from curvetun.packets import Cookie, Hello, Message, Vouch, parse_as
from curvetun.session import Session
from tests._vectors import (
    C2S,
    CLIENT_EPHEMERAL,
    CLIENT_SAFE_NONCE,
    COOKIE_K,
    COOKIE_V,
    EC,
    ECS,
    ES,
    ESS,
    HELLO_V,
    S2C,
    SERVER_EPHEMERAL,
    SERVER_SAFE_NONCE,
    SHARED_KEYS,
    SS,
    TS,
    VOUCH,
    VOUCH_V,
    C,
    FakeCookieSealer,
    FakeVault,
    S,
    client_vault,
    connected_sessions,
    open_vouch,
    server_vault,
    unhex,
)


class DoublesTests(SynchronousTestCase):
    """
    The test doubles provide what they stand in for.
    """

    def test_fake_vault_provides_ivault(self) -> None:
        """
        L{FakeVault} provides L{IVault} and has the vectors' public keys.
        """
        self.assertTrue(verifyObject(IVault, server_vault()))
        self.assertEqual(server_vault().public_key, S)
        self.assertEqual(client_vault().public_key, C)

    def test_fake_cookie_sealer_is_a_cookie_sealer(self) -> None:
        """
        L{FakeCookieSealer} seals the vectors' cookie secretbox.
        """
        sealer: CookieSealer = FakeCookieSealer(TS)
        secretbox = sealer.seal(SERVER_SAFE_NONCE, EC, ESS)
        self.assertEqual(secretbox.hex(), COOKIE_V["cookie_secretbox"])


class EphemeralKeyPairTests(SynchronousTestCase):
    """
    L{EphemeralKeyPair}.
    """

    def test_generate(self) -> None:
        """
        L{EphemeralKeyPair.generate} makes a fresh Curve25519 pair each time.
        """
        pair = EphemeralKeyPair.generate()
        self.assertEqual(len(pair.secret_key), 32)
        self.assertEqual(crypto_scalarmult_base(pair.secret_key), pair.public_key)
        self.assertNotEqual(EphemeralKeyPair.generate(), pair)

    def test_repr_hides_the_secret(self) -> None:
        """
        The repr shows the public key but not the secret key.
        """
        text = repr(CLIENT_EPHEMERAL)
        self.assertIn(repr(EC), text)
        self.assertNotIn("secret", text)
        self.assertNotIn(repr(ECS), text)


class KnownSessionTests(SynchronousTestCase):
    """
    The handshake functions reproduce the whole session of handshake.json
    from its inputs, each output feeding the next step as on the wire.
    """

    def test_full_session(self) -> None:
        """
        hello, cookie, vouch and every message, both ways, byte for byte.
        """
        # hello: client -> server
        hello, client_shared = client_hello(S, CLIENT_EPHEMERAL)
        self.assertEqual(hello.hex(), HELLO_V["payload"])
        self.assertEqual(client_shared.hex(), SHARED_KEYS["hello_S_ECs"])
        received_hello = parse_as(hello, Hello)
        server_open_hello(received_hello, server_vault())

        # cookie: server -> client
        sealer = FakeCookieSealer(TS)
        cookie = server_cookie(
            received_hello.client_ephemeral_key, server_vault(), sealer, SERVER_EPHEMERAL
        )
        self.assertEqual(cookie.hex(), COOKIE_V["payload"])
        self.assertEqual(sealer.sealed, [(SERVER_SAFE_NONCE, EC, ESS)])
        server_ephemeral_key, cookie_K = client_open_cookie(parse_as(cookie, Cookie), client_shared)
        self.assertEqual((server_ephemeral_key, cookie_K), (ES, COOKIE_K))

        # vouch: client -> server
        vouch, client = client_vouch(
            cookie_K, server_ephemeral_key, CLIENT_EPHEMERAL, S, client_vault()
        )
        self.assertEqual(vouch.hex(), VOUCH_V["payload"])
        opened = server_open_vouch(parse_as(vouch, Vouch), sealer)
        self.assertEqual(
            (opened.client_key, opened.client_ephemeral_key, opened.vouch_nonce, opened.inner_box),
            (C, EC, CLIENT_SAFE_NONCE, unhex(VOUCH_V["inner_V"])),
        )
        server_verify_vouch(opened, server_vault())
        server = opened.session

        # messages, each direction counting from 2
        for sender, receiver, vectors in ((client, server, C2S), (server, client, S2C)):
            for vector in vectors:
                plaintext = unhex(vector["plaintext"])
                payload = sender.seal(plaintext)
                self.assertEqual(payload.hex(), vector["payload"])
                self.assertEqual(receiver.open(parse_as(payload, Message)), plaintext)
        self.assertEqual([m["counter"] for m in C2S], [2, 3, 4])
        self.assertEqual([m["counter"] for m in S2C], [2, 3])

    def test_session_key_is_the_precomputed_ephemeral_key(self) -> None:
        """
        Both sessions use C{beforenm(ES, ECs)} of the vectors: they seal
        exactly what sessions made from that key seal.
        """
        key = unhex(SHARED_KEYS["initiate_and_messages_ES_ECs"])
        client, server = connected_sessions()
        message = b"same key, same bytes"
        self.assertEqual(client.seal(message), Session.for_client(key).seal(message))
        self.assertEqual(server.seal(message), Session.for_server(key).seal(message))

    def test_server_cookie_makes_a_fresh_ephemeral_key(self) -> None:
        """
        Without a given key pair, L{server_cookie} makes a fresh C{(ES, ESs)}
        for each cookie, whose secret half is sealed in C{K} only.
        """
        sealer = FakeCookieSealer(TS)
        vault = FakeVault(SS, [SERVER_SAFE_NONCE, CLIENT_SAFE_NONCE])
        _, shared = client_hello(S, CLIENT_EPHEMERAL)
        keys = []
        for _ in range(2):
            cookie = server_cookie(EC, vault, sealer)
            server_ephemeral_key, cookie_K = client_open_cookie(parse_as(cookie, Cookie), shared)
            client_ephemeral_key, server_ephemeral_secret = sealer.open(cookie_K)
            self.assertEqual(client_ephemeral_key, EC)
            self.assertEqual(crypto_scalarmult_base(server_ephemeral_secret), server_ephemeral_key)
            keys.append(server_ephemeral_key)
        self.assertNotEqual(keys[0], keys[1])
        self.assertNotIn(ES, keys)


class RefusalTests(SynchronousTestCase):
    """
    Each handshake step raises L{BadPacket}, never a PyNaCl error, when its
    packet does not verify.
    """

    def assertRefused(self, reason: str, f: Callable[..., object], *args: object) -> BadPacket:
        """
        C{f(*args)} raises L{BadPacket} for C{reason}.
        """
        exc: BadPacket = self.assertRaises(BadPacket, f, *args)
        self.assertEqual(exc.reason, reason)
        return exc

    def test_hello_counter_must_be_zero(self) -> None:
        """
        A hello with counter 1, well boxed with that counter's nonce, is
        refused for its counter.
        """
        box = crypto_box_easy(bytes(64), short_term_nonce(HELLO_PREFIX, 1), S, ECS)
        hello = Hello(EC, 1, box)
        self.assertRefused("hello counter must be 0", server_open_hello, hello, server_vault())

    def test_hello_plaintext_must_be_zeros(self) -> None:
        """
        A hello box that opens but does not hold 64 zero bytes is refused.
        """
        box = crypto_box_easy(bytes(63) + b"\x01", short_term_nonce(HELLO_PREFIX, 0), S, ECS)
        hello = Hello(EC, 0, box)
        self.assertRefused("hello does not verify", server_open_hello, hello, server_vault())

    def test_hello_for_another_server(self) -> None:
        """
        A hello boxed for another server key does not open.
        """
        payload, _ = client_hello(C, CLIENT_EPHEMERAL)
        hello = parse_as(payload, Hello)
        self.assertRefused("hello does not verify", server_open_hello, hello, server_vault())

    def test_unusable_server_key(self) -> None:
        """
        An all-zero (low-order) server key makes L{client_hello} raise
        L{BadPacket}, not PyNaCl's error.
        """
        exc = self.assertRefused(
            "server key is not a usable public key", client_hello, bytes(32), CLIENT_EPHEMERAL
        )
        self.assertIsInstance(exc.__cause__, CryptoError)

    def test_cookie_from_another_server(self) -> None:
        """
        A cookie box that does not open with the hello's key (it came from
        another server key) is refused.
        """
        _, wrong_shared = client_hello(C, CLIENT_EPHEMERAL)
        cookie = parse_as(unhex(COOKIE_V["payload"]), Cookie)
        self.assertRefused(
            "cookie does not verify: wrong server key?", client_open_cookie, cookie, wrong_shared
        )

    def test_unusable_server_ephemeral_key(self) -> None:
        """
        An all-zero C{ES} in an authentic cookie makes L{client_vouch} raise
        L{BadPacket}, before it uses up a safe nonce.
        """
        vault = client_vault()
        exc = self.assertRefused(
            "server ephemeral key is not a usable public key",
            client_vouch,
            COOKIE_K,
            bytes(32),
            CLIENT_EPHEMERAL,
            S,
            vault,
        )
        self.assertIsInstance(exc.__cause__, CryptoError)
        self.assertEqual(vault.safe_nonce(), CLIENT_SAFE_NONCE)

    def test_vouch_counter_must_be_one(self) -> None:
        """
        A vouch with counter 2 is refused for its counter.
        """
        vouch = Vouch(VOUCH.cookie, 2, VOUCH.box)
        self.assertRefused(
            "vouch counter must be 1", server_open_vouch, vouch, FakeCookieSealer(TS)
        )

    def test_vouch_cookie_under_another_minute_key(self) -> None:
        """
        A cookie C{K} that the minute keys do not open is refused.
        """
        self.assertRefused(
            "cookie does not verify", server_open_vouch, VOUCH, FakeCookieSealer(bytes(32))
        )

    def test_vouch_box_does_not_open(self) -> None:
        """
        A vouch whose outer box is damaged is refused.
        """
        damaged = Vouch(VOUCH.cookie, 1, VOUCH.box[:-1] + bytes([VOUCH.box[-1] ^ 1]))
        self.assertRefused(
            "vouch box does not verify", server_open_vouch, damaged, FakeCookieSealer(TS)
        )

    def test_vouch_cookie_with_unusable_client_key(self) -> None:
        """
        A cookie that holds an all-zero (low-order) C{EC} makes
        L{server_open_vouch} raise L{BadPacket}, not PyNaCl's error.
        """
        sealer = FakeCookieSealer(TS)
        cookie_K = SERVER_SAFE_NONCE + sealer.seal(SERVER_SAFE_NONCE, bytes(32), ESS)
        vouch = Vouch(cookie_K, 1, VOUCH.box)
        exc = self.assertRefused("vouch box does not verify", server_open_vouch, vouch, sealer)
        self.assertIsInstance(exc.__cause__, CryptoError)

    def test_vouch_for_another_ephemeral_key(self) -> None:
        """
        An inner box C{V} that holds another ephemeral key than the cookie's
        C{EC} is refused.
        """
        other = attrs.evolve(open_vouch(), client_ephemeral_key=ES)
        self.assertRefused("vouch does not verify", server_verify_vouch, other, server_vault())

    def test_vouch_made_by_another_client_key(self) -> None:
        """
        An inner box C{V} not made by the claimed client key C{C} is refused.
        """
        opened = open_vouch()
        nonce = long_term_nonce(VOUCH_INNER_PREFIX, opened.vouch_nonce)
        forged = attrs.evolve(opened, inner_box=crypto_box_easy(EC, nonce, S, ECS))
        self.assertRefused("vouch does not verify", server_verify_vouch, forged, server_vault())

    def test_opened_vouch_repr_hides_the_session(self) -> None:
        """
        The repr of an L{OpenedVouch} shows the client's key, not its
        session or the session key.
        """
        text = repr(open_vouch())
        self.assertIn(repr(C), text)
        self.assertNotIn("session", text.lower())
        key = unhex(SHARED_KEYS["initiate_and_messages_ES_ECs"])
        self.assertNotIn(key.hex(), text)
        self.assertNotIn(repr(key), text)
