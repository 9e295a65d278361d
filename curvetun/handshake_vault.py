"""
The long-term-key work of a handshake, one question per step, answered
later: L{IHandshakeVault}.

A handshake needs the long-term secret key three times, and each time the
operations of one step can be asked together, so that a vault in another
process (L{curvetun.remote_vault}) or in hardware costs one round trip per
step, not one per operation:

    step            asked of the vault                       answer
    server, hello   open the hello box from C{EC};           the cookie packet
                    make C{SN}; seal C{K} with C{SN};
                    box C{ES || K} to C{EC} under C{SN}
    server, vouch   open the inner vouch box C{V} from C{C}  C{EC} from inside C{V}
    client, vouch   make C{VN}; box C{EC} to C{S} under it   C{(VN, V)}

The vault makes every safe nonce itself, inside the operation that uses it:
a caller never holds a nonce it could use twice.

The server keeps its own cookie ("minute") keys; an in-process vault seals
with them, a remote one is given the current key with each hello: the
cookie C{K} is sealed under a nonce made from C{SN} (spec section 2), and
only the vault knows C{SN} before the answer. The vault is trusted more
than the connection's process anyway; it keeps no cookie key. The server's
ephemeral pair C{(ES, ESs)} is made by the caller too, so that the vault's
work per handshake is what needs its key and nothing else.

L{LocalHandshakeVault} answers from an in-process L{IVault} with
Deferreds that have already fired: the machine's callbacks run before the
call returns, as they did when the machine called the vault itself. It
also provides L{IImmediateHandshakeVault}, the same three questions
answered by return value or exception, which the machines use when the
vault offers it: a handshake then makes no Deferred at all (a fired
Deferred and its callbacks cost about 5 microseconds a step, three steps
a handshake).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from nacl.bindings import (
    crypto_box_beforenm,
    crypto_box_easy_afternm,
    crypto_secretbox_easy,
)
from nacl.exceptions import CryptoError
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import Attribute, Interface, implementer

from curvetun import handshake
from curvetun.errors import BadPacket, CurveTunError
from curvetun.handshake import CookieSealer, EphemeralKeyPair, OpenedVouch
from curvetun.interfaces import IServerKeys, IVault
from curvetun.keys import KEY_SIZE
from curvetun.nonces import (
    MINUTE_KEY_PREFIX,
    VOUCH_INNER_PREFIX,
    VOUCH_PREFIX,
    long_term_nonce,
    short_term_nonce,
)
from curvetun.packets import Hello, Vouch
from curvetun.session import Session

SAFE_NONCE_SIZE = 16
INNER_VOUCH_SIZE = 48  # box of EC (32) + authenticator (16)


@contextmanager
def _refuse(reason: str) -> Iterator[None]:
    # As in curvetun.handshake: every PyNaCl error is a BadPacket.
    try:
        yield
    except (CryptoError, BadPacket) as exc:
        raise BadPacket(reason) from exc


class VaultUnavailable(CurveTunError):
    """
    The vault did not answer: it is not running, the call timed out, or the
    answer was malformed. The handshake that asked fails; no nonce the
    vault may have made is used.
    """


class IHandshakeVault(Interface):
    """
    The holder of one long-term key pair, asked once per handshake step.

    Each method returns a L{Deferred}. It fires with the answer, or fails
    with L{BadPacket} (the peer's box does not verify, or its key is
    unusable) or another L{CurveTunError} (L{VaultUnavailable}; the vault
    could not store its nonce counter). A caller turns any failure into a
    failed handshake, and only an answer that verified into a next step.
    """

    public_key: bytes = Attribute("The 32-byte long-term public key this vault answers for.")

    def open_hello_and_seal_cookie(
        hello: Hello, ephemeral: EphemeralKeyPair, cookie_keys: CookieSealer
    ) -> Deferred[bytes]:
        """
        Server, hello step (spec sections 1 and 2): check that C{hello}'s
        box from C{EC} holds 64 zero bytes, make a safe nonce C{SN}, and
        make the cookie packet: C{K = SN || secretbox(EC || ESs,
        "minute-k" || SN, Ts)} boxed with C{ES} to C{EC} under
        C{"CurveCPK" || SN}.

        @param ephemeral: C{(ES, ESs)}, the server's fresh pair for this
            connection.
        @param cookie_keys: the server's cookie keys: an in-process vault
            seals with them, a remote one is sent their current key C{Ts}.
        @return: a Deferred firing with the cookie payload.
        """

    def open_vouch(opened: OpenedVouch) -> Deferred[None]:
        """
        Server, vouch step (spec section 3, step 4): check that the inner
        box C{V} opens with C{(C, Ss)} under C{"CurveCPV" || VN} and holds
        the C{EC} of the cookie.

        @return: a Deferred firing with L{None} once it verified.
        """

    def seal_vouch(client_ephemeral_key: bytes, server_key: bytes) -> Deferred[tuple[bytes, bytes]]:
        """
        Client, vouch step (spec section 3): make a safe nonce C{VN} and box
        C{EC} from this vault's key to C{server_key} under
        C{"CurveCPV" || VN}.

        @return: a Deferred firing with C{(VN, V)}: the 16-byte nonce and the
            48-byte inner box.
        """


class IImmediateHandshakeVault(IHandshakeVault):
    """
    An L{IHandshakeVault} that can also answer during the call: each method
    returns the answer its L{IHandshakeVault} counterpart fires with, or
    raises the L{CurveTunError} that one fails with. A machine whose vault
    provides it asks this way (no Deferred per step); a vault in another
    process provides only L{IHandshakeVault}.
    """

    def answer_hello_now(
        hello: Hello, ephemeral: EphemeralKeyPair, cookie_keys: CookieSealer
    ) -> bytes:
        """
        See L{IHandshakeVault.open_hello_and_seal_cookie}.

        @raise CurveTunError: the hello does not verify (L{BadPacket}), or
            no safe nonce could be made.
        """

    def open_vouch_now(opened: OpenedVouch) -> None:
        """
        See L{IHandshakeVault.open_vouch}.

        @raise BadPacket: the inner box does not verify.
        """

    def seal_vouch_now(client_ephemeral_key: bytes, server_key: bytes) -> tuple[bytes, bytes]:
        """
        See L{IHandshakeVault.seal_vouch}.

        @raise CurveTunError: a key is unusable (L{BadPacket}), or no safe
            nonce could be made.
        """


# The vault's half of each step: pure functions over an IVault, used by
# the in-process vault here and by the vault process.


class _OneCookieKey:
    """
    The sealing half of L{handshake.CookieSealer} with one given key: the
    vault seals the cookie under the key the server sent with the hello.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise BadPacket("a cookie key is 32 bytes")
        self._key = key

    def current_key(self) -> bytes:
        return self._key

    def seal(
        self, safe_nonce: bytes, client_ephemeral_key: bytes, server_ephemeral_secret: bytes
    ) -> bytes:
        return crypto_secretbox_easy(
            client_ephemeral_key + server_ephemeral_secret,
            long_term_nonce(MINUTE_KEY_PREFIX, safe_nonce),
            self._key,
        )

    def open(self, cookie_K: bytes) -> tuple[bytes, bytes]:
        # The vault never opens cookies: the server does, with its own keys.
        raise BadPacket("this sealer does not open cookies")

    def __repr__(self) -> str:
        return "<_OneCookieKey>"


def one_cookie_key(key: bytes) -> CookieSealer:
    """
    A sealer of cookies under the one cookie key C{key} (it opens none):
    the vault process seals under the key the server sent with the hello.

    @raise BadPacket: C{key} is not 32 bytes.
    """
    return _OneCookieKey(key)


def key_set(vault: IVault) -> Sequence[IVault]:
    """
    The keys a server answers with, current first: during a server-key
    rollover (an L{IServerKeys}), the current and the previous one;
    otherwise C{vault} alone.
    """
    if IServerKeys.providedBy(vault):
        return IServerKeys(vault).vaults()
    return (vault,)


def answer_hello(
    vault: IVault, hello: Hello, ephemeral: EphemeralKeyPair, cookie_keys: CookieSealer
) -> bytes:
    """
    The vault's half of the server's hello step: see
    L{IHandshakeVault.open_hello_and_seal_cookie}. During a rollover the
    hello may be sealed to the current or the previous key: the current one
    is tried first (its clients pay nothing), and the cookie is sealed with
    the key that opened the hello.

    @raise BadPacket: the hello does not verify, or a key is unusable.
    @raise CurveTunError: the vault could not make a safe nonce.
    """
    # The hello is opened first: a hello that does not verify uses no nonce.
    answering = handshake.server_open_hello_with(hello, key_set(vault))
    return handshake.server_cookie(hello.client_ephemeral_key, answering, cookie_keys, ephemeral)


def open_inner_vouch(
    vault: IVault, client_key: bytes, vouch_nonce: bytes, inner_box: bytes
) -> bytes:
    """
    The vault's half of the server's vouch step: open C{V} from C{C}.

    @return: the plaintext, which must be the cookie's C{EC} (the caller
        compares: see L{check_inner_vouch}).
    @raise BadPacket: it does not open.
    """
    if len(vouch_nonce) != SAFE_NONCE_SIZE or len(inner_box) != INNER_VOUCH_SIZE:
        raise BadPacket("vouch does not verify")
    # During a rollover the client vouched to the key its hello was sealed
    # to: the current one is tried first, so its clients pay nothing.
    for answering in key_set(vault):
        try:
            with _refuse("vouch does not verify"):
                return answering.box_open(
                    inner_box, long_term_nonce(VOUCH_INNER_PREFIX, vouch_nonce), client_key
                )
        except BadPacket:
            continue
    raise BadPacket("vouch does not verify")


def check_inner_vouch(opened: OpenedVouch, plaintext: bytes) -> None:
    """
    The server's check of the vault's answer: the inner box held C{EC}.

    @raise BadPacket: it did not.
    """
    if not hmac.compare_digest(plaintext, opened.client_ephemeral_key):
        raise BadPacket("vouch does not verify")


def seal_inner_vouch(
    vault: IVault, client_ephemeral_key: bytes, server_key: bytes
) -> tuple[bytes, bytes]:
    """
    The vault's half of the client's vouch step: see
    L{IHandshakeVault.seal_vouch}.

    @raise BadPacket: C{server_key} or C{client_ephemeral_key} is unusable.
    """
    if len(client_ephemeral_key) != KEY_SIZE:
        raise BadPacket("client ephemeral key is 32 bytes")
    if len(server_key) != KEY_SIZE:
        raise BadPacket("server key is not a usable public key")
    vouch_nonce = vault.safe_nonce()
    with _refuse("server key is not a usable public key"):
        inner = vault.box(
            client_ephemeral_key, long_term_nonce(VOUCH_INNER_PREFIX, vouch_nonce), server_key
        )
    return vouch_nonce, inner


# The caller's half of the client's vouch step, around the vault's answer.


def client_vouch_key(server_ephemeral_key: bytes, ephemeral: EphemeralKeyPair) -> bytes:
    """
    The key of the vouch's outer box and of the session, C{(ES, ECs)}.
    Compute it before asking the vault: a bad C{ES} must not use up a
    safe nonce.

    @raise BadPacket: C{server_ephemeral_key} is not a usable public key.
    """
    with _refuse("server ephemeral key is not a usable public key"):
        shared: bytes = crypto_box_beforenm(server_ephemeral_key, ephemeral.secret_key)
    return shared


def client_vouch_packet(
    cookie_K: bytes,
    shared_key: bytes,
    client_key: bytes,
    vouch_nonce: bytes,
    inner_box: bytes,
) -> tuple[bytes, Session]:
    """
    Make the vouch packet (spec section 3) from the vault's C{(VN, V)}, and
    the client's session; the same bytes L{handshake.client_vouch} makes.

    @raise BadPacket: the vault's answer has the wrong shape.
    """
    if len(vouch_nonce) != SAFE_NONCE_SIZE or len(inner_box) != INNER_VOUCH_SIZE:
        raise BadPacket("the vault's vouch has the wrong size")
    box = crypto_box_easy_afternm(
        client_key + vouch_nonce + inner_box, short_term_nonce(VOUCH_PREFIX, 1), shared_key
    )
    return Vouch(cookie_K, 1, box).to_bytes(), Session.for_client(shared_key)


@implementer(IImmediateHandshakeVault)
class LocalHandshakeVault:
    """
    L{IHandshakeVault} over an in-process L{IVault} (a
    L{curvetun.vault.MemoryVault} or L{curvetun.vault.FileVault}): each
    answer is computed during the call and returned in a Deferred that has
    already fired, so callbacks added to it run at once; or, through
    L{IImmediateHandshakeVault}, returned as it is.

    @ivar vault: the in-process vault.
    """

    __slots__ = ("vault",)

    def __init__(self, vault: IVault) -> None:
        self.vault = vault

    @property
    def public_key(self) -> bytes:
        """
        The vault's (current) public key, read live: a reload after a
        rollover changes it.
        """
        return self.vault.public_key

    def open_hello_and_seal_cookie(
        self, hello: Hello, ephemeral: EphemeralKeyPair, cookie_keys: CookieSealer
    ) -> Deferred[bytes]:
        """
        See L{IHandshakeVault.open_hello_and_seal_cookie}.
        """
        try:
            return succeed(self.answer_hello_now(hello, ephemeral, cookie_keys))
        except CurveTunError:
            return fail()

    def open_vouch(self, opened: OpenedVouch) -> Deferred[None]:
        """
        See L{IHandshakeVault.open_vouch}.
        """
        try:
            self.open_vouch_now(opened)
        except CurveTunError:
            return fail()
        return succeed(None)

    def seal_vouch(
        self, client_ephemeral_key: bytes, server_key: bytes
    ) -> Deferred[tuple[bytes, bytes]]:
        """
        See L{IHandshakeVault.seal_vouch}.
        """
        try:
            return succeed(self.seal_vouch_now(client_ephemeral_key, server_key))
        except CurveTunError:
            return fail()

    def answer_hello_now(
        self, hello: Hello, ephemeral: EphemeralKeyPair, cookie_keys: CookieSealer
    ) -> bytes:
        """
        See L{IImmediateHandshakeVault.answer_hello_now}.
        """
        return answer_hello(self.vault, hello, ephemeral, cookie_keys)

    def open_vouch_now(self, opened: OpenedVouch) -> None:
        """
        See L{IImmediateHandshakeVault.open_vouch_now}.
        """
        check_inner_vouch(
            opened,
            open_inner_vouch(self.vault, opened.client_key, opened.vouch_nonce, opened.inner_box),
        )

    def seal_vouch_now(self, client_ephemeral_key: bytes, server_key: bytes) -> tuple[bytes, bytes]:
        """
        See L{IImmediateHandshakeVault.seal_vouch_now}.
        """
        return seal_inner_vouch(self.vault, client_ephemeral_key, server_key)

    def __repr__(self) -> str:
        return f"<LocalHandshakeVault {self.vault!r}>"


def as_handshake_vault(vault: IVault | IHandshakeVault) -> IHandshakeVault:
    """
    C{vault} if it is an L{IHandshakeVault}; an in-process L{IVault}
    answered through a L{LocalHandshakeVault}.
    """
    if IHandshakeVault.providedBy(vault):
        return vault
    return LocalHandshakeVault(vault)
