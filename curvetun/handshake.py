"""
The handshake's cryptography, as pure functions: bytes and keys in, packet
payloads and verified values out. No I/O and no reactor; the connection's
state machine calls these in order and turns L{BadPacket} into a close.

    client                                  server
    client_hello          --- hello -->     server_open_hello
    client_open_cookie    <-- cookie ---    server_cookie
    client_vouch          --- vouch -->     server_open_vouch
                                            (registry check by the caller)
                                            server_verify_vouch

Spec sections 1-3. Every failure, including every exception PyNaCl raises
(a box that does not open, an all-zero X25519 result from a low-order
point), comes out as L{BadPacket}.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

import attrs
from nacl.bindings import (
    crypto_box_beforenm,
    crypto_box_easy_afternm,
    crypto_box_keypair,
    crypto_box_open_easy_afternm,
)
from nacl.exceptions import CryptoError

from curvetun.errors import BadPacket
from curvetun.interfaces import IVault
from curvetun.keys import is_canonical
from curvetun.nonces import (
    COOKIE_BOX_PREFIX,
    HELLO_PREFIX,
    VOUCH_INNER_PREFIX,
    VOUCH_PREFIX,
    long_term_nonce,
    short_term_nonce,
)
from curvetun.packets import Cookie, Hello, Vouch
from curvetun.session import Session

_HELLO_ZEROS = bytes(64)


@contextmanager
def _refuse(reason: str) -> Iterator[None]:
    """
    Turn any PyNaCl error (or a vault's own L{BadPacket}) inside the block
    into C{BadPacket(reason)}.
    """
    try:
        yield
    except (CryptoError, BadPacket) as exc:
        raise BadPacket(reason) from exc


@attrs.frozen
class EphemeralKeyPair:
    """
    A short-term Curve25519 key pair (C{EC, ECs} or C{ES, ESs}), made for
    one connection.
    """

    public_key: bytes
    secret_key: bytes = attrs.field(repr=False)

    @classmethod
    def generate(cls) -> EphemeralKeyPair:
        """
        Make a fresh random key pair.
        """
        public_key, secret_key = crypto_box_keypair()
        return cls(public_key, secret_key)


class CookieSealer(Protocol):
    """
    Seals and opens the cookie C{K} under the server's current minute key
    C{Ts} (spec "Cookie keys"); implemented by L{curvetun.cookies}.
    """

    def seal(
        self, safe_nonce: bytes, client_ephemeral_key: bytes, server_ephemeral_secret: bytes
    ) -> bytes:
        """
        Return the 80-byte C{secretbox(EC || ESs, "minute-k" || SN, Ts)}
        under the current minute key (without the leading C{SN}).
        """

    def current_key(self) -> bytes:
        """
        The current minute key C{Ts}, for a vault in another process that
        seals the cookie itself (L{curvetun.handshake_vault}).
        """

    def open(self, cookie_K: bytes) -> tuple[bytes, bytes]:
        """
        Open a 96-byte C{K = SN || secretbox} with the current minute key,
        then the previous one.

        @return: C{(EC, ESs)}.
        @raise BadPacket: no recent minute key opens it.
        """


# Client side.


def client_hello(server_key: bytes, ephemeral: EphemeralKeyPair) -> tuple[bytes, bytes]:
    """
    Make the hello packet (spec section 1).

    @param server_key: C{S}, the server's long-term public key.
    @param ephemeral: C{(EC, ECs)}, this connection's client key pair.
    @return: C{(hello payload, shared key of (S, ECs))}. Keep the shared key
        for L{client_open_cookie}: the cookie box uses the same key pair, so
        one X25519 serves both.
    @raise BadPacket: C{server_key} is not a usable public key.
    """
    with _refuse("server key is not a usable public key"):
        shared = crypto_box_beforenm(server_key, ephemeral.secret_key)
        box = crypto_box_easy_afternm(_HELLO_ZEROS, short_term_nonce(HELLO_PREFIX, 0), shared)
    return Hello(ephemeral.public_key, 0, box).to_bytes(), shared


def client_open_cookie(cookie: Cookie, shared_key_with_server: bytes) -> tuple[bytes, bytes]:
    """
    Open the server's cookie packet (spec section 2).

    @param shared_key_with_server: the key L{client_hello} returned.
    @return: C{(ES, K)}: the server's ephemeral public key and the 96-byte
        cookie to send back in the vouch.
    @raise BadPacket: the box does not open (not our server, or not its key).
    """
    with _refuse("cookie does not verify: wrong server key?"):
        plaintext = crypto_box_open_easy_afternm(
            cookie.box,
            long_term_nonce(COOKIE_BOX_PREFIX, cookie.safe_nonce),
            shared_key_with_server,
        )
    return plaintext[:32], plaintext[32:]


def client_vouch(
    cookie_K: bytes,
    server_ephemeral_key: bytes,
    ephemeral: EphemeralKeyPair,
    server_key: bytes,
    vault: IVault,
) -> tuple[bytes, Session]:
    """
    Make the vouch packet (spec section 3) and the client's session.

    The client's long-term key (in C{vault}) vouches for C{EC} in the inner
    box C{V}; the outer box goes from C{ECs} to C{ES}, with the key that
    then serves the whole session.

    @return: C{(vouch payload, session)}.
    @raise BadPacket: C{server_ephemeral_key} is not a usable public key.
    """
    # X25519 with the peer's ES first: a bad ES must not use up a safe nonce.
    with _refuse("server ephemeral key is not a usable public key"):
        shared = crypto_box_beforenm(server_ephemeral_key, ephemeral.secret_key)
    vouch_nonce = vault.safe_nonce()
    inner = vault.box(
        ephemeral.public_key, long_term_nonce(VOUCH_INNER_PREFIX, vouch_nonce), server_key
    )
    box = crypto_box_easy_afternm(
        vault.public_key + vouch_nonce + inner, short_term_nonce(VOUCH_PREFIX, 1), shared
    )
    return Vouch(cookie_K, 1, box).to_bytes(), Session.for_client(shared)


# Server side.


def server_open_hello(hello: Hello, vault: IVault) -> None:
    """
    Verify a hello (spec section 1): counter 0, and a box from C{EC} to our
    long-term key that holds 64 zero bytes. The caller then answers with
    L{server_cookie} for C{hello.client_ephemeral_key}.

    @raise BadPacket: it does not verify.
    """
    if hello.counter != 0:
        raise BadPacket("hello counter must be 0")
    if not is_canonical(hello.client_ephemeral_key):
        # X25519 ignores the top bit, so a peer could send one key in two
        # spellings; honest peers (libsodium) never send a non-canonical one.
        raise BadPacket("client ephemeral key is not canonical")
    with _refuse("hello does not verify"):
        plaintext = vault.box_open(
            hello.box,
            short_term_nonce(HELLO_PREFIX, 0),
            hello.client_ephemeral_key,
            ephemeral_peer=True,
        )
    if not hmac.compare_digest(plaintext, _HELLO_ZEROS):
        raise BadPacket("hello does not verify")


def server_open_hello_with(hello: Hello, vaults: Sequence[IVault]) -> IVault:
    """
    Verify a hello sealed to any of C{vaults}' keys, trying them in order
    (during a server-key rollover: the current key, then the previous
    one), so that a hello to the first costs what it always did.

    @return: the vault whose key the hello was sealed to: the cookie and
        the vouch of this connection are that key's.
    @raise BadPacket: it verifies with none of them (the reason is the
        first key's).
    """
    first: BadPacket | None = None
    for vault in vaults:
        try:
            server_open_hello(hello, vault)
        except BadPacket as error:
            first = error if first is None else first
        else:
            return vault
    raise first if first is not None else BadPacket("hello does not verify")


def server_cookie(
    client_ephemeral_key: bytes,
    vault: IVault,
    cookie_keys: CookieSealer,
    ephemeral: EphemeralKeyPair | None = None,
) -> bytes:
    """
    Make the cookie packet (spec section 2) for a verified hello.

    The server's fresh ephemeral secret C{ESs} leaves this function only
    inside C{K}, sealed under the minute key: the server keeps no state
    until the vouch brings C{K} back.

    @param ephemeral: C{(ES, ESs)}; a fresh pair unless given (known-answer
        tests give one).
    @return: the cookie payload.
    @raise BadPacket: C{client_ephemeral_key} is not a usable public key.
    """
    if ephemeral is None:
        ephemeral = EphemeralKeyPair.generate()
    safe_nonce = vault.safe_nonce()
    # One SN serves both the cookie secretbox and the box around it, under
    # different prefixes and keys (spec section 2).
    cookie_K = safe_nonce + cookie_keys.seal(safe_nonce, client_ephemeral_key, ephemeral.secret_key)
    with _refuse("client ephemeral key is not a usable public key"):
        box = vault.box(
            ephemeral.public_key + cookie_K,
            long_term_nonce(COOKIE_BOX_PREFIX, safe_nonce),
            client_ephemeral_key,
            ephemeral_peer=True,
        )
    return Cookie(safe_nonce, box).to_bytes()


@attrs.frozen
class OpenedVouch:
    """
    A vouch whose cookie and outer box opened, not yet verified: the caller
    checks C{client_key} against its registry (cheap) and only then calls
    L{server_verify_vouch} (an X25519 with the long-term key).

    @ivar client_key: C{C}, the client's claimed long-term public key.
    @ivar client_ephemeral_key: C{EC}, from the cookie.
    @ivar vouch_nonce: C{VN}, the client's 16-byte safe nonce.
    @ivar inner_box: C{V}, the 48-byte box of C{EC} from C{Cs} to C{S}.
    @ivar session: the server's session, to use once verified.
    """

    client_key: bytes
    client_ephemeral_key: bytes
    vouch_nonce: bytes
    inner_box: bytes
    session: Session = attrs.field(repr=False)


def server_open_vouch(vouch: Vouch, cookie_keys: CookieSealer) -> OpenedVouch:
    """
    Open a vouch (spec section 3, steps 1 and 2): counter 1, the cookie
    C{K} opens under a recent minute key, and the outer box opens with
    C{(EC, ESs)} from C{K}.

    @raise BadPacket: any of these fails.
    """
    if vouch.counter != 1:
        raise BadPacket("vouch counter must be 1")
    with _refuse("cookie does not verify"):
        client_ephemeral_key, server_ephemeral_secret = cookie_keys.open(vouch.cookie)
    with _refuse("vouch box does not verify"):
        shared = crypto_box_beforenm(client_ephemeral_key, server_ephemeral_secret)
        plaintext = crypto_box_open_easy_afternm(
            vouch.box, short_term_nonce(VOUCH_PREFIX, 1), shared
        )
    return OpenedVouch(
        client_key=plaintext[:32],
        client_ephemeral_key=client_ephemeral_key,
        vouch_nonce=plaintext[32:48],
        inner_box=plaintext[48:],
        session=Session.for_server(shared),
    )


def server_verify_vouch(opened: OpenedVouch, vault: IVault) -> None:
    """
    Check that the client's long-term key vouches for its ephemeral key
    (spec section 3, step 4): C{V} opens with C{(C, Ss)} and holds C{EC}.

    @raise BadPacket: it does not.
    """
    with _refuse("vouch does not verify"):
        plaintext = vault.box_open(
            opened.inner_box,
            long_term_nonce(VOUCH_INNER_PREFIX, opened.vouch_nonce),
            opened.client_key,
        )
    if not hmac.compare_digest(plaintext, opened.client_ephemeral_key):
        raise BadPacket("vouch does not verify")
