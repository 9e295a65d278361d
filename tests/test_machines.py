"""
The connection machines by themselves, with a fake owner that records what
each machine asks of it (the pattern of magic-wormhole's test_machines):
no transport, no frames, no reactor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from curvetun import handshake
from curvetun.connection import (
    ClientCore,
    ClientInputs,
    ClientMachine,
    HandshakePacket,
    ServerCore,
    ServerInputs,
    ServerMachine,
)
from curvetun.cookies import CookieKeys
from curvetun.errors import (
    BadPacket,
    HandshakeTimeout,
    NotAuthorized,
    ReplayedVouch,
    ServerKeyMismatch,
)
from curvetun.handshake import CookieSealer, EphemeralKeyPair, OpenedVouch
from curvetun.handshake_vault import (
    IHandshakeVault,
    IImmediateHandshakeVault,
    LocalHandshakeVault,
    VaultUnavailable,
)
from curvetun.packets import Cookie, Hello, Vouch, parse_as
from curvetun.session import Session
from curvetun.vault import MemoryVault

from ._support import AllowList

PEER_HOST = "192.0.2.1"

_T = TypeVar("_T")


class RecordingOwner:
    """
    A L{curvetun.connection.ConnectionOwner} that records each request as
    a tuple, and keeps the frames sent and the receiver it was last told
    to give packets to.
    """

    peer_host = PEER_HOST

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.frames: list[bytes] = []
        self.receiver: Callable[[Any], None] | None = None
        self.session: Session | None = None
        self.message_opened: Callable[[], None] | None = None

    def send_frame(self, payload: bytes) -> None:
        self.frames.append(payload)
        self.events.append(("send_frame", payload[:8]))

    def expect_packet(
        self, packet_type: type[HandshakePacket], receiver: Callable[[HandshakePacket], None]
    ) -> None:
        self.receiver = receiver
        self.events.append(("expect_packet", packet_type))

    def hold_frames(self) -> None:
        self.events.append(("hold_frames",))

    def hello_accepted(self) -> None:
        self.events.append(("hello_accepted",))

    def established(
        self,
        session: Session,
        peer_public_key: bytes,
        message_opened: Callable[[], None] | None,
    ) -> None:
        self.session = session
        self.message_opened = message_opened
        self.events.append(("established", peer_public_key, message_opened is not None))

    def handshake_confirmed(self) -> None:
        self.events.append(("handshake_confirmed",))

    def disconnect(self) -> None:
        self.events.append(("disconnect",))

    def lost(self, reason: Failure) -> None:
        self.events.append(("lost", type(reason.value), reason.getErrorMessage()))

    def names(self) -> list[str]:
        return [event[0] for event in self.events]

    def give(self, packet_type: type[HandshakePacket], payload: bytes) -> None:
        """
        Hand the machine the packet it asked for, as the transport does.
        """
        assert self.receiver is not None
        self.receiver(parse_as(payload, packet_type))


@implementer(IHandshakeVault)
class LateVault:
    """
    An L{IHandshakeVault} that answers only when the test says so, as a
    vault in another process does: each question is computed at once by an
    in-process vault, and its answer held back until L{answer} (or replaced
    by a failure with L{fail}).
    """

    def __init__(self, vault: MemoryVault) -> None:
        self._local = LocalHandshakeVault(vault)
        self.public_key = vault.public_key
        self.pending: list[tuple[Deferred[Any], Deferred[Any]]] = []

    def _later(self, answer: Deferred[_T]) -> Deferred[_T]:
        later: Deferred[_T] = Deferred()
        self.pending.append((answer, later))
        return later

    def open_hello_and_seal_cookie(
        self, hello: Hello, ephemeral: EphemeralKeyPair, cookie_keys: CookieSealer
    ) -> Deferred[bytes]:
        return self._later(self._local.open_hello_and_seal_cookie(hello, ephemeral, cookie_keys))

    def open_vouch(self, opened: OpenedVouch) -> Deferred[None]:
        return self._later(self._local.open_vouch(opened))

    def seal_vouch(
        self, client_ephemeral_key: bytes, server_key: bytes
    ) -> Deferred[tuple[bytes, bytes]]:
        return self._later(self._local.seal_vouch(client_ephemeral_key, server_key))

    def answer(self) -> None:
        """
        Give the oldest question its answer.
        """
        answer, later = self.pending.pop(0)
        answer.chainDeferred(later)

    def fail(self, error: Exception) -> None:
        """
        Fail the oldest question with C{error} instead.
        """
        answer, later = self.pending.pop(0)
        answer.addErrback(lambda _: None)
        later.errback(error)


@implementer(IImmediateHandshakeVault)
class _ImmediateOnly:
    """
    An L{IImmediateHandshakeVault} whose Deferred methods must not be used.
    """

    def __init__(self, local: LocalHandshakeVault) -> None:
        self._local = local
        self.public_key = local.public_key

    def open_hello_and_seal_cookie(self, *args: object) -> Deferred[bytes]:
        raise AssertionError("asked through a Deferred")

    def open_vouch(self, *args: object) -> Deferred[None]:
        raise AssertionError("asked through a Deferred")

    def seal_vouch(self, *args: object) -> Deferred[tuple[bytes, bytes]]:
        raise AssertionError("asked through a Deferred")

    def answer_hello_now(
        self, hello: Hello, ephemeral: EphemeralKeyPair, cookie_keys: CookieSealer
    ) -> bytes:
        return self._local.answer_hello_now(hello, ephemeral, cookie_keys)

    def open_vouch_now(self, opened: OpenedVouch) -> None:
        self._local.open_vouch_now(opened)

    def seal_vouch_now(self, client_ephemeral_key: bytes, server_key: bytes) -> tuple[bytes, bytes]:
        return self._local.seal_vouch_now(client_ephemeral_key, server_key)


def _local(vault: MemoryVault, immediate_only: bool) -> IHandshakeVault:
    local = LocalHandshakeVault(vault)
    return _ImmediateOnly(local) if immediate_only else local


class Handshake:
    """
    A server and a client machine, each with a recording owner, and the
    identities they use. Frames go from one owner to the other machine only
    when a test passes them.
    """

    def __init__(
        self,
        registered: bool = True,
        remember: bool = True,
        late_server: bool = False,
        late_client: bool = False,
        immediate_only: bool = False,
    ) -> None:
        self.server_vault = MemoryVault.generate()
        self.client_vault = MemoryVault.generate()
        self.late_server = LateVault(self.server_vault)
        self.late_client = LateVault(self.client_vault)
        self.registry = AllowList(
            clients=[(self.client_vault.public_key, PEER_HOST)] if registered else []
        )
        self.server_owner = RecordingOwner()
        self.client_owner = RecordingOwner()
        self.server: ServerInputs = ServerMachine(
            ServerCore(
                self.server_owner,
                self.late_server if late_server else _local(self.server_vault, immediate_only),
                CookieKeys(),
                self.registry,
                lambda key: remember,
            )
        )
        self.client: ClientInputs = ClientMachine(
            ClientCore(
                self.client_owner,
                self.late_client if late_client else _local(self.client_vault, immediate_only),
                self.server_vault.public_key,
            )
        )

    def up_to_vouch(self) -> None:
        self.server.connection_made()
        self.client.connection_made()
        self.server_owner.give(Hello, self.client_owner.frames[-1])
        self.client_owner.give(Cookie, self.server_owner.frames[-1])

    def complete(self) -> None:
        self.up_to_vouch()
        self.server_owner.give(Vouch, self.client_owner.frames[-1])


class ServerMachineTests(SynchronousTestCase):
    def test_it_expects_a_hello_once_connected(self) -> None:
        peers = Handshake()
        peers.server.connection_made()
        self.assertEqual(peers.server_owner.events, [("expect_packet", Hello)])

    def test_a_verified_hello_is_answered_with_a_cookie_and_a_vouch_expected(self) -> None:
        peers = Handshake()
        peers.server.connection_made()
        peers.client.connection_made()
        peers.server_owner.give(Hello, peers.client_owner.frames[-1])
        self.assertEqual(
            peers.server_owner.names(),
            ["expect_packet", "hello_accepted", "send_frame", "expect_packet"],
        )
        self.assertEqual(peers.server_owner.events[-1], ("expect_packet", Vouch))

    def test_a_verified_vouch_establishes_and_confirms_at_once(self) -> None:
        peers = Handshake()
        peers.complete()
        self.assertEqual(
            peers.server_owner.events[-2:],
            [
                ("established", peers.client_vault.public_key, False),
                ("handshake_confirmed",),
            ],
        )
        self.assertEqual(peers.registry.asked, [(peers.client_vault.public_key, PEER_HOST)])

    def test_the_sessions_of_both_machines_match(self) -> None:
        peers = Handshake()
        peers.complete()
        client_session, server_session = peers.client_owner.session, peers.server_owner.session
        assert client_session is not None and server_session is not None
        self.assertEqual(server_session.open_payload(client_session.seal(b"hi")), b"hi")
        self.assertEqual(client_session.open_payload(server_session.seal(b"ho")), b"ho")

    def test_a_hello_that_does_not_verify_closes_without_an_answer(self) -> None:
        peers = Handshake()
        peers.server.connection_made()
        hello, _ = handshake.client_hello(
            MemoryVault.generate().public_key, EphemeralKeyPair.generate()
        )
        peers.server_owner.give(Hello, hello)
        self.assertEqual(peers.server_owner.names(), ["expect_packet", "disconnect"])
        peers.server.connection_lost(Failure(ConnectionDone()))
        self.assertEqual(peers.server_owner.events[-1][:2], ("lost", BadPacket))

    def test_a_client_the_registry_does_not_know_is_refused(self) -> None:
        peers = Handshake(registered=False)
        peers.complete()
        self.assertNotIn("established", peers.server_owner.names())
        self.assertEqual(peers.server_owner.names()[-1], "disconnect")
        peers.server.connection_lost(Failure(ConnectionDone()))
        self.assertEqual(peers.server_owner.events[-1][:2], ("lost", NotAuthorized))

    def test_a_replayed_vouch_is_refused(self) -> None:
        peers = Handshake(remember=False)
        peers.complete()
        self.assertNotIn("established", peers.server_owner.names())
        peers.server.connection_lost(Failure(ConnectionDone()))
        self.assertEqual(peers.server_owner.events[-1][:2], ("lost", ReplayedVouch))

    def test_a_bad_packet_closes_from_every_state(self) -> None:
        for steps in (0, 1, 2):
            peers = Handshake()
            peers.server.connection_made()
            peers.client.connection_made()
            if steps >= 1:
                peers.server_owner.give(Hello, peers.client_owner.frames[-1])
            if steps >= 2:
                peers.client_owner.give(Cookie, peers.server_owner.frames[-1])
                peers.server_owner.give(Vouch, peers.client_owner.frames[-1])
            peers.server.bad_packet(BadPacket("garbage"))
            self.assertEqual(peers.server_owner.names()[-1], "disconnect", steps)
            peers.server.connection_lost(Failure(ConnectionDone()))
            self.assertEqual(peers.server_owner.events[-1], ("lost", BadPacket, "garbage"))

    def test_the_reason_we_closed_for_is_reported_once_tcp_is_gone(self) -> None:
        peers = Handshake()
        peers.server.connection_made()
        peers.server.close(HandshakeTimeout("too slow"))
        peers.server.close(ConnectionDone("closed locally"))
        self.assertEqual(peers.server_owner.names(), ["expect_packet", "disconnect"])
        peers.server.connection_lost(Failure(ConnectionLost()))
        self.assertEqual(peers.server_owner.events[-1], ("lost", HandshakeTimeout, "too slow"))

    def test_tcp_closing_first_reports_tcps_reason(self) -> None:
        peers = Handshake()
        peers.complete()
        peers.server.connection_lost(Failure(ConnectionLost("gone")))
        self.assertEqual(peers.server_owner.events[-1][:2], ("lost", ConnectionLost))
        self.assertNotIn("disconnect", peers.server_owner.names())


class ClientMachineTests(SynchronousTestCase):
    def test_it_sends_its_hello_and_expects_a_cookie_once_connected(self) -> None:
        peers = Handshake()
        peers.client.connection_made()
        self.assertEqual(
            peers.client_owner.events,
            [("send_frame", peers.client_owner.frames[0][:8]), ("expect_packet", Cookie)],
        )
        parse_as(peers.client_owner.frames[0], Hello)

    def test_the_cookie_is_answered_with_the_vouch_and_the_session_starts(self) -> None:
        peers = Handshake()
        peers.up_to_vouch()
        self.assertEqual(
            peers.client_owner.names(), ["send_frame", "expect_packet", "send_frame", "established"]
        )
        parse_as(peers.client_owner.frames[-1], Vouch)
        # Vouched, not confirmed: the owner is to report the first message.
        self.assertEqual(
            peers.client_owner.events[-1], ("established", peers.server_vault.public_key, True)
        )

    def test_the_first_message_opened_confirms_the_handshake_once(self) -> None:
        peers = Handshake()
        peers.complete()
        message_opened = peers.client_owner.message_opened
        assert message_opened is not None
        message_opened()
        self.assertEqual(peers.client_owner.names()[-1], "handshake_confirmed")
        peers.client.connection_lost(Failure(ConnectionLost()))
        self.assertEqual(peers.client_owner.events[-1][:2], ("lost", ConnectionLost))

    def test_a_cookie_from_another_key_says_the_server_key_is_wrong(self) -> None:
        peers = Handshake()
        peers.client.connection_made()
        impostor = MemoryVault.generate()
        cookie = handshake.server_cookie(
            parse_as(peers.client_owner.frames[0], Hello).client_ephemeral_key,
            impostor,
            CookieKeys(),
        )
        peers.client_owner.give(Cookie, cookie)
        self.assertEqual(peers.client_owner.names()[-1], "disconnect")
        peers.client.connection_lost(Failure(ConnectionDone()))
        self.assertEqual(peers.client_owner.events[-1][:2], ("lost", ServerKeyMismatch))

    def test_a_close_after_the_hello_says_the_server_key_may_be_wrong(self) -> None:
        peers = Handshake()
        peers.client.connection_made()
        peers.client.connection_lost(Failure(ConnectionDone()))
        event = peers.client_owner.events[-1]
        self.assertEqual(event[:2], ("lost", ServerKeyMismatch))
        self.assertIn("after our hello", event[2])

    def test_a_close_after_the_vouch_says_we_are_probably_not_registered(self) -> None:
        peers = Handshake()
        peers.up_to_vouch()
        peers.client.connection_lost(Failure(ConnectionDone()))
        event = peers.client_owner.events[-1]
        self.assertEqual(event[:2], ("lost", NotAuthorized))
        self.assertIn("registry", event[2])

    def test_a_bad_packet_after_the_vouch_closes(self) -> None:
        peers = Handshake()
        peers.up_to_vouch()
        peers.client.bad_packet(BadPacket("message does not verify"))
        self.assertEqual(peers.client_owner.names()[-1], "disconnect")
        peers.client.connection_lost(Failure(ConnectionDone()))
        self.assertEqual(peers.client_owner.events[-1][:2], ("lost", BadPacket))

    def test_a_close_while_vouched_reports_why_we_closed(self) -> None:
        peers = Handshake()
        peers.up_to_vouch()
        peers.client.close(ConnectionDone("closed locally"))
        peers.client.connection_lost(Failure(ConnectionLost()))
        event = peers.client_owner.events[-1]
        self.assertEqual(event[:2], ("lost", ConnectionDone))
        self.assertIn("closed locally", event[2])

    def test_a_server_key_that_is_not_a_public_key_closes_before_sending(self) -> None:
        owner = RecordingOwner()
        client = ClientMachine(
            ClientCore(owner, LocalHandshakeVault(MemoryVault.generate()), b"\x00" * 32)
        )
        client.connection_made()
        self.assertEqual(owner.names(), ["disconnect"])
        client.connection_lost(Failure(ConnectionDone()))
        self.assertEqual(owner.events[-1][:2], ("lost", BadPacket))


class LateVaultTests(SynchronousTestCase):
    """
    With a vault that answers later (a vault process), each machine waits
    for the answer in a state of its own, sends nothing meanwhile, refuses
    a packet that comes before the answer, drops an answer that comes after
    the close, and never takes a failed answer for a verified one.
    """

    def test_the_server_sends_its_cookie_when_the_vault_answers(self) -> None:
        peers = Handshake(late_server=True)
        peers.server.connection_made()
        peers.client.connection_made()
        peers.server_owner.give(Hello, peers.client_owner.frames[-1])
        # Frames that come meanwhile wait for the answer.
        self.assertEqual(peers.server_owner.names(), ["expect_packet", "hold_frames"])
        self.assertEqual(len(peers.late_server.pending), 1)
        peers.late_server.answer()
        self.assertEqual(
            peers.server_owner.names(),
            ["expect_packet", "hold_frames", "hello_accepted", "send_frame", "expect_packet"],
        )

    def test_an_in_process_vault_holds_no_frames(self) -> None:
        peers = Handshake()
        peers.complete()
        self.assertNotIn("hold_frames", peers.server_owner.names())
        self.assertNotIn("hold_frames", peers.client_owner.names())

    def test_an_in_process_vault_is_asked_without_deferreds(self) -> None:
        # The machines ask a vault that answers during the call through
        # IImmediateHandshakeVault; its Deferred methods are never called.
        peers = Handshake(immediate_only=True)
        peers.complete()
        self.assertEqual(peers.server_owner.names()[-2:], ["established", "handshake_confirmed"])
        self.assertEqual(peers.client_owner.names()[-1], "established")

    def test_an_immediate_vault_that_refuses_rejects_the_step(self) -> None:
        peers = Handshake(immediate_only=True)
        peers.server.connection_made()
        # A hello sealed to another server key does not verify: no cookie.
        stranger = MemoryVault.generate().public_key
        peers.server_owner.give(
            Hello, handshake.client_hello(stranger, EphemeralKeyPair.generate())[0]
        )
        self.assertEqual(peers.server_owner.names(), ["expect_packet", "disconnect"])

    def test_the_server_establishes_when_the_vault_has_opened_the_vouch(self) -> None:
        peers = Handshake(late_server=True)
        peers.server.connection_made()
        peers.client.connection_made()
        peers.server_owner.give(Hello, peers.client_owner.frames[-1])
        peers.late_server.answer()
        peers.client_owner.give(Cookie, peers.server_owner.frames[-1])
        peers.server_owner.give(Vouch, peers.client_owner.frames[-1])
        self.assertNotIn("established", peers.server_owner.names())
        self.assertEqual(peers.server_owner.names()[-1], "hold_frames")
        peers.late_server.answer()
        self.assertEqual(
            peers.server_owner.events[-2:],
            [("established", peers.client_vault.public_key, False), ("handshake_confirmed",)],
        )

    def test_a_second_hello_before_the_cookie_closes(self) -> None:
        peers = Handshake(late_server=True)
        peers.server.connection_made()
        peers.client.connection_made()
        hello = peers.client_owner.frames[-1]
        peers.server_owner.give(Hello, hello)
        peers.server_owner.give(Hello, hello)
        self.assertEqual(peers.server_owner.names(), ["expect_packet", "hold_frames", "disconnect"])
        # The vault's answer to the first comes too late: nothing is sent.
        peers.late_server.answer()
        self.assertEqual(peers.server_owner.names(), ["expect_packet", "hold_frames", "disconnect"])
        peers.server.connection_lost(Failure(ConnectionDone()))
        self.assertEqual(peers.server_owner.events[-1][:2], ("lost", BadPacket))

    def test_a_second_vouch_before_the_answer_closes(self) -> None:
        peers = Handshake(late_server=True)
        peers.server.connection_made()
        peers.client.connection_made()
        peers.server_owner.give(Hello, peers.client_owner.frames[-1])
        peers.late_server.answer()
        peers.client_owner.give(Cookie, peers.server_owner.frames[-1])
        vouch = peers.client_owner.frames[-1]
        peers.server_owner.give(Vouch, vouch)
        peers.server_owner.give(Vouch, vouch)
        self.assertEqual(peers.server_owner.names()[-1], "disconnect")
        peers.late_server.answer()
        self.assertNotIn("established", peers.server_owner.names())

    def test_an_answer_after_a_timeout_is_dropped(self) -> None:
        peers = Handshake(late_server=True)
        peers.server.connection_made()
        peers.client.connection_made()
        peers.server_owner.give(Hello, peers.client_owner.frames[-1])
        peers.server.close(HandshakeTimeout("the handshake took too long"))
        peers.late_server.answer()
        self.assertEqual(peers.server_owner.names(), ["expect_packet", "hold_frames", "disconnect"])
        self.assertEqual(peers.server_owner.frames, [])
        peers.server.connection_lost(Failure(ConnectionDone()))
        self.assertEqual(peers.server_owner.events[-1][:2], ("lost", HandshakeTimeout))

    def test_a_vault_that_does_not_answer_closes_the_handshake(self) -> None:
        peers = Handshake(late_server=True)
        peers.server.connection_made()
        peers.client.connection_made()
        peers.server_owner.give(Hello, peers.client_owner.frames[-1])
        peers.late_server.fail(VaultUnavailable("no answer within 5 seconds"))
        self.assertEqual(peers.server_owner.names(), ["expect_packet", "hold_frames", "disconnect"])
        peers.server.connection_lost(Failure(ConnectionDone()))
        self.assertEqual(peers.server_owner.events[-1][:2], ("lost", VaultUnavailable))

    def test_a_vouch_the_vault_refuses_is_never_accepted(self) -> None:
        for error in [BadPacket("vouch does not verify"), VaultUnavailable("gone"), OSError()]:
            peers = Handshake(late_server=True)
            peers.server.connection_made()
            peers.client.connection_made()
            peers.server_owner.give(Hello, peers.client_owner.frames[-1])
            peers.late_server.answer()
            peers.client_owner.give(Cookie, peers.server_owner.frames[-1])
            peers.server_owner.give(Vouch, peers.client_owner.frames[-1])
            peers.late_server.fail(error)
            self.assertNotIn("established", peers.server_owner.names(), error)
            self.assertEqual(peers.server_owner.names()[-1], "disconnect", error)

    def test_the_client_sends_its_vouch_when_its_vault_answers(self) -> None:
        peers = Handshake(late_client=True)
        peers.up_to_vouch()
        self.assertEqual(peers.client_owner.names(), ["send_frame", "expect_packet", "hold_frames"])
        peers.late_client.answer()
        self.assertEqual(
            peers.client_owner.names(),
            ["send_frame", "expect_packet", "hold_frames", "send_frame", "established"],
        )
        peers.server_owner.give(Vouch, peers.client_owner.frames[-1])
        self.assertIn("established", peers.server_owner.names())

    def test_a_client_whose_vault_fails_sends_no_vouch(self) -> None:
        peers = Handshake(late_client=True)
        peers.up_to_vouch()
        peers.late_client.fail(VaultUnavailable("gone"))
        self.assertEqual(
            peers.client_owner.names(), ["send_frame", "expect_packet", "hold_frames", "disconnect"]
        )
        self.assertEqual(len(peers.client_owner.frames), 1)
