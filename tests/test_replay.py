"""
Replay, reordering, deletion and cross-connection splicing by an active
attacker who records what a client sends.

A session is recorded from a real in-memory connection (L{Peers}): every
byte the client writes, captured as the server reads it. The attacker then
plays it, whole or altered, to a new connection of the same server
service, from the same address, within the cookie's lifetime: exactly the
case the wire format alone cannot refuse (spec, "Known weaknesses of
v1.0"). L{ReplayControlTests} shows that without curvetun's replay memory
the replay would indeed be accepted, so the refusals below are the
defences at work and not an artefact of the setup.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import attrs
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from curvetun.cookies import CookieKeys
from curvetun.errors import BadPacket
from curvetun.factories import CurveTunServerFactory
from curvetun.handshake import EphemeralKeyPair, client_hello
from curvetun.packets import HELLO_MAGIC, MESSAGE_MAGIC, VOUCH_MAGIC
from curvetun.service import CurveTunService
from curvetun.transport import CurveTunProtocol

from ._support import CLIENT_ADDRESS, SERVER_ADDRESS, Peers, RecordingFactory, framed, split_frames

MESSAGES = [b"first", b"second: " + bytes(range(256)), b"", b"fourth", b"fifth" * 100]


@attrs.frozen
class Recording:
    """
    What a client sent in one session: its hello, its vouch and its
    messages, as payloads.
    """

    hello: bytes
    vouch: bytes
    messages: list[bytes]

    @property
    def client_ephemeral_key(self) -> bytes:
        return self.hello[8:40]

    @property
    def payloads(self) -> list[bytes]:
        return [self.hello, self.vouch, *self.messages]


def record_session(peers: Peers, messages: list[bytes] = MESSAGES) -> Recording:
    """
    Run a real session between C{peers} in memory, the client sending
    C{messages}; return every payload the client sent.
    """
    client, server, pump = peers.connect(greet=False)
    wire: list[bytes] = []
    read = server.dataReceived

    def recording(data: bytes) -> None:
        wire.append(data)
        read(data)

    server.dataReceived = recording  # type: ignore[method-assign]
    pump.flush()
    for message in messages:
        client.write_message(message)
    pump.flush()
    # The genuine session worked: the server got every message.
    app = peers.server_apps.built[-1]
    assert app.received == messages, app.received
    hello, vouch, *sent = split_frames(b"".join(wire))
    assert hello[:8] == HELLO_MAGIC and vouch[:8] == VOUCH_MAGIC
    assert all(m[:8] == MESSAGE_MAGIC for m in sent)
    return Recording(hello, vouch, sent)


@attrs.define
class ServerConnection:
    """
    A new connection to a server factory, from the client's address, on a
    StringTransport: the attacker's end is this test.
    """

    factory: CurveTunServerFactory
    apps: RecordingFactory
    protocol: CurveTunProtocol = attrs.field(init=False)
    transport: StringTransport = attrs.field(init=False)
    reasons: list[Failure] = attrs.field(init=False, factory=list)

    def __attrs_post_init__(self) -> None:
        self.factory.ended_callbacks.append(self._ended)
        protocol = self.factory.buildProtocol(CLIENT_ADDRESS)
        assert protocol is not None, "refused by the server's connection limits"
        self.protocol = protocol
        self.transport = StringTransport(hostAddress=SERVER_ADDRESS, peerAddress=CLIENT_ADDRESS)
        self.protocol.makeConnection(self.transport)

    def _ended(self, protocol: CurveTunProtocol, reason: Failure) -> None:
        if protocol is self.protocol:
            self.reasons.append(reason)

    @classmethod
    def to(cls, peers: Peers) -> ServerConnection:
        apps = RecordingFactory()
        return cls(peers.server.server_factory(apps), apps)

    def send(self, payload: bytes) -> bytes:
        """
        Deliver one payload; return what the server wrote in answer.
        """
        self.transport.clear()
        self.protocol.dataReceived(framed(payload))
        answer: bytes = self.transport.value()
        return answer

    @property
    def delivered(self) -> list[bytes]:
        return [m for app in self.apps.built for m in app.received]

    def close_reason(self) -> BaseException:
        """
        Let TCP report the close, and return why curvetun closed.
        """
        assert self.transport.disconnecting, "the connection is still open"
        self.protocol.connectionLost(Failure(ConnectionDone()))
        [reason] = self.reasons
        assert reason.value is not None
        return reason.value


class ReplayTestCase(SynchronousTestCase):
    def assert_replay_refused_at_the_vouch(
        self, connection: ServerConnection, recording: Recording, because: str
    ) -> None:
        """
        The hello is answered (a hello proves nothing and costs the server
        one cookie); the vouch closes the connection; nothing of the
        session reaches an application.
        """
        cookie = connection.send(recording.hello)
        self.assertEqual(len(cookie), 2 + 168, "the replayed hello was not answered")
        self.assertFalse(connection.transport.disconnecting)
        self.assertEqual(connection.send(recording.vouch), b"")
        self.assertTrue(connection.transport.disconnecting, "the replayed vouch was accepted")
        for message in recording.messages:
            connection.send(message)
        self.assertEqual(connection.apps.built, [])
        self.assertEqual(connection.delivered, [])
        reason = connection.close_reason()
        self.assertIsInstance(reason, BadPacket)
        self.assertIn(because, str(reason))


class ReplayControlTests(ReplayTestCase):
    """
    The attack is real: the recorded session, played to a server that
    forgets the vouches it accepted, is accepted and delivered again.
    """

    def test_without_the_replay_memory_a_replayed_session_is_delivered_again(self) -> None:
        peers = Peers()
        recording = record_session(peers)
        service = peers.server
        apps = RecordingFactory()
        forgetful = CurveTunServerFactory(
            apps,
            service.vault,
            service.cookie_keys,
            service.registry,
            lambda client_ephemeral_key: True,
            service.clock,
        )
        connection = ServerConnection(forgetful, apps)
        for payload in recording.payloads:
            connection.send(payload)
        self.assertFalse(connection.transport.disconnecting)
        self.assertEqual(connection.delivered, MESSAGES)


class ReplayTests(ReplayTestCase):
    """
    A recorded session played again to the same server service is refused
    after its vouch, for as long as its cookie could open.
    """

    def test_a_replayed_session_is_refused_after_the_vouch(self) -> None:
        peers = Peers()
        recording = record_session(peers)
        self.assert_replay_refused_at_the_vouch(
            ServerConnection.to(peers), recording, because="replayed vouch"
        )

    def test_a_replayed_session_in_one_read_delivers_nothing(self) -> None:
        peers = Peers()
        recording = record_session(peers)
        connection = ServerConnection.to(peers)
        connection.protocol.dataReceived(b"".join(framed(p) for p in recording.payloads))
        self.assertTrue(connection.transport.disconnecting)
        self.assertEqual((connection.apps.built, connection.delivered), ([], []))

    def test_every_replay_is_refused_not_only_the_first(self) -> None:
        peers = Peers()
        recording = record_session(peers)
        for _ in range(3):
            self.assert_replay_refused_at_the_vouch(
                ServerConnection.to(peers), recording, because="replayed vouch"
            )

    def test_a_replay_after_one_cookie_rotation_is_refused_by_the_replay_memory(self) -> None:
        """
        After one rotation the cookie still opens under the previous key:
        the replay memory alone refuses the session.
        """
        peers = Peers(handshake_timeout=None)
        peers.server.startService()
        self.addCleanup(peers.server.stopService)
        recording = record_session(peers)
        peers.clock.advance(peers.server.cookie_keys.step)
        self.assert_replay_refused_at_the_vouch(
            ServerConnection.to(peers), recording, because="replayed vouch"
        )

    def test_a_replay_just_before_the_memory_expires_is_refused_by_the_memory(self) -> None:
        peers = Peers(handshake_timeout=None)
        peers.server.startService()
        self.addCleanup(peers.server.stopService)
        recording = record_session(peers)
        step = peers.server.cookie_keys.step
        peers.clock.pump([step, step - 0.001])
        self.assert_replay_refused_at_the_vouch(
            ServerConnection.to(peers), recording, because="replayed vouch"
        )

    def test_a_replay_after_the_memory_expired_is_refused_by_the_cookie(self) -> None:
        """
        Two rotations later the replay memory has forgotten the session,
        and its cookie no longer opens: the cookie refuses it.
        """
        peers = Peers(handshake_timeout=None)
        peers.server.startService()
        self.addCleanup(peers.server.stopService)
        recording = record_session(peers)
        # Time passes as it does for a running reactor: each rotation on time.
        peers.clock.pump([peers.server.cookie_keys.step] * 2)
        self.assert_replay_refused_at_the_vouch(
            ServerConnection.to(peers), recording, because="cookie does not verify"
        )
        # The memory had indeed forgotten it: it takes the same key again.
        self.assertTrue(peers.server.replay_guard.remember(recording.client_ephemeral_key))

    def test_a_replay_is_refused_after_the_clock_jumps_two_cookie_periods(self) -> None:
        """
        When the clock jumps (the machine was suspended, or the reactor
        blocked) past two cookie periods at once, the cookie must not
        outlive the replay memory.
        """
        peers = Peers(handshake_timeout=None)
        peers.server.startService()
        self.addCleanup(peers.server.stopService)
        recording = record_session(peers)
        peers.clock.advance(2 * peers.server.cookie_keys.step)
        connection = ServerConnection.to(peers)
        for payload in recording.payloads:
            connection.send(payload)
        self.assertEqual(connection.delivered, [])
        self.assertTrue(connection.transport.disconnecting)

    def test_a_replay_is_refused_long_after_when_the_service_was_never_started(
        self,
    ) -> None:
        """
        A server whose service was never started (or was stopped) does not
        rotate its cookie keys, so an old cookie still opens; the replay
        memory must not forget the session before the cookie stops opening.
        """
        peers = Peers(handshake_timeout=None)
        recording = record_session(peers)
        peers.clock.advance(10 * peers.server.cookie_keys.step)
        connection = ServerConnection.to(peers)
        for payload in recording.payloads:
            connection.send(payload)
        self.assertEqual(connection.delivered, [])
        self.assertTrue(connection.transport.disconnecting)


class SteppingPeers(Peers):
    """
    L{Peers} whose server counts cookie-key periods on a monotonic clock of
    its own (C{monotonic}), while C{clock} plays the reactor's wall clock.
    Time passing moves both (L{elapse}); a step of the wall clock moves
    only C{clock}.
    """

    def __init__(self) -> None:
        super().__init__(handshake_timeout=None)
        self.monotonic = Clock()
        self.server = CurveTunService(
            self.server_vault,
            self.registry,
            clock=self.clock,
            cookie_keys=CookieKeys(clock=self.clock, seconds=self.monotonic.seconds),
            handshake_timeout=None,
        )
        self.server_factory = self.server.server_factory(self.server_apps)

    def elapse(self, seconds: float) -> None:
        self.monotonic.advance(seconds)
        self.clock.advance(seconds)


class DefaultKeysPeers(Peers):
    """
    L{Peers} whose server makes its own cookie keys, as C{twist curvetun}
    does: C{clock} is then only the reactor's (wall) clock.
    """

    def __init__(self) -> None:
        super().__init__(handshake_timeout=None)
        self.server = CurveTunService(
            self.server_vault, self.registry, clock=self.clock, handshake_timeout=None
        )
        self.server_factory = self.server.server_factory(self.server_apps)


AnyPeers = TypeVar("AnyPeers", bound=Peers)


class ClockStepTests(ReplayTestCase):
    """
    The wall clock steps (NTP, a restored VM, a date set by hand), back or
    forward. A recorded session is still refused for as long as its cookie
    could open, and honest clients are not locked out.
    """

    D = 600.0

    def started(self, peers: AnyPeers) -> AnyPeers:
        peers.server.startService()
        self.addCleanup(peers.server.stopService)
        return peers

    def test_a_replay_after_the_clock_steps_back_is_refused_by_the_memory(self) -> None:
        """
        Even when the clock the cookie keys count on steps back (as the
        wall clock did, before they counted on a monotonic one), so that
        the current key lives on: the replay memory keeps the vouch for as
        long as that key is held, not for a number of seconds.
        """
        peers = self.started(Peers(handshake_timeout=None))
        step = peers.server.cookie_keys.step
        peers.clock.pump([step] * 10 + [30])
        peers.clock.rightNow -= self.D
        recording = record_session(peers)
        peers.clock.pump([step, step, 1])
        self.assert_replay_refused_at_the_vouch(
            ServerConnection.to(peers), recording, because="replayed vouch"
        )

    def test_after_a_backward_wall_step_a_replay_is_refused_then_the_cookie_expires(
        self,
    ) -> None:
        peers = self.started(SteppingPeers())
        step = peers.server.cookie_keys.step
        peers.elapse(10 * step + 30)
        peers.clock.rightNow -= self.D
        recording = record_session(peers)
        peers.elapse(step)
        self.assert_replay_refused_at_the_vouch(
            ServerConnection.to(peers), recording, because="replayed vouch"
        )
        # Two periods after the session, as if the clock had not stepped.
        peers.elapse(step)
        self.assert_replay_refused_at_the_vouch(
            ServerConnection.to(peers), recording, because="cookie does not verify"
        )

    def test_a_backward_wall_step_does_not_keep_a_cookie_alive(self) -> None:
        peers = self.started(SteppingPeers())
        step = peers.server.cookie_keys.step
        recording = record_session(peers)
        peers.clock.rightNow -= self.D
        peers.elapse(2 * step)
        self.assert_replay_refused_at_the_vouch(
            ServerConnection.to(peers), recording, because="cookie does not verify"
        )

    def test_a_replay_after_a_forward_wall_step_is_refused_by_the_memory(self) -> None:
        peers = self.started(SteppingPeers())
        recording = record_session(peers)
        peers.clock.advance(self.D)
        self.assert_replay_refused_at_the_vouch(
            ServerConnection.to(peers), recording, because="replayed vouch"
        )

    def test_a_handshake_in_flight_across_a_forward_wall_step_completes(self) -> None:
        """
        The step does not retire the cookie keys: the vouch sent after it,
        with the cookie from before it, is accepted.
        """
        peers = self.started(SteppingPeers())
        _client, _server, pump = peers.connect(greet=False)
        pump.pump()  # hello ->
        pump.pump()  # <- cookie
        peers.clock.advance(self.D)
        pump.flush()
        self.assertEqual(len(peers.server_apps.built), 1)

    def test_a_forward_step_of_the_reactor_clock_keeps_the_cookie_keys(self) -> None:
        """
        A service's own cookie keys do not count on the reactor's clock:
        a handshake in flight across its step completes, and the recorded
        session is still refused by the memory.
        """
        peers = self.started(DefaultKeysPeers())
        recording = record_session(peers)
        _client, _server, pump = peers.connect(greet=False)
        pump.pump()
        pump.pump()
        peers.clock.advance(self.D)
        pump.flush()
        self.assertEqual(len(peers.server_apps.built), 2)
        self.assert_replay_refused_at_the_vouch(
            ServerConnection.to(peers), recording, because="replayed vouch"
        )

    def test_after_a_forward_step_of_the_period_clock_new_handshakes_complete(self) -> None:
        """
        If the clock the keys count on itself jumps forward (a fake one
        can), both keys go: the handshake in flight fails, as its cookie
        does (the documented limit: a client retries), and the next one
        completes at once.
        """
        peers = self.started(Peers(handshake_timeout=None))
        _client, _server, pump = peers.connect(greet=False)
        pump.pump()
        pump.pump()
        peers.clock.advance(self.D)
        pump.flush()
        self.assertEqual(peers.server_apps.built, [])
        peers.connect()
        self.assertEqual(len(peers.server_apps.built), 1)
        # And the memory was not flushed with the keys only to let a
        # session through: the new one is remembered.
        self.assertEqual(len(peers.server.replay_guard), 1)


def altered(payloads: list[bytes], order: list[int]) -> tuple[list[bytes], int]:
    """
    The payloads in C{order} (indexes, possibly repeated or missing), and
    how many of them a receiver may accept: the length of the prefix that
    is the genuine sequence.
    """
    prefix = 0
    while prefix < len(order) and order[prefix] == prefix:
        prefix += 1
    return [payloads[i] for i in order], prefix


ALTERATIONS: dict[str, list[int]] = {
    "second and third swapped": [0, 2, 1, 3, 4],
    "first and last swapped": [4, 1, 2, 3, 0],
    "reversed": [4, 3, 2, 1, 0],
    "first duplicated": [0, 0, 1, 2, 3, 4],
    "third duplicated": [0, 1, 2, 2, 3, 4],
    "last duplicated": [0, 1, 2, 3, 4, 4],
    "an early one replayed at the end": [0, 1, 2, 3, 4, 1],
    "first dropped": [1, 2, 3, 4],
    "third dropped": [0, 1, 3, 4],
    "one dropped and replaced by a later one": [0, 1, 4],
}


class MessageOrderTests(SynchronousTestCase):
    """
    Over TCP, a message out of sequence means the stream was altered: a
    reordered, duplicated or dropped message closes the connection, and
    nothing from the first fault on is delivered.
    """

    def check_alterations(self, sender_is_client: bool) -> None:
        failures = []
        for name, order in ALTERATIONS.items():
            peers = Peers()
            client, server, pump = peers.connect()
            sender, receiver = (client, server) if sender_is_client else (server, client)
            [app] = (peers.server_apps if sender_is_client else peers.client_apps).built
            for message in MESSAGES:
                sender.write_message(message)
            wire = sender.transport.getOutBuffer()  # type: ignore[attr-defined]
            payloads, accepted = altered(split_frames(wire), order)
            for payload in payloads:
                receiver.dataReceived(framed(payload))
            expected = [MESSAGES[i] for i in order[:accepted]]
            if app.received != expected:
                failures.append(f"{name}: delivered {app.received!r}")
            if not receiver.transport.disconnecting:  # type: ignore[attr-defined]
                failures.append(f"{name}: the connection stayed open")
            pump.flush()
            if len(app.lost) != 1 or not isinstance(app.lost[0].value, BadPacket):
                failures.append(f"{name}: closed for {app.lost}")
        self.assertEqual(failures, [])

    def test_altered_message_order_from_the_client_closes_the_connection(self) -> None:
        self.check_alterations(sender_is_client=True)

    def test_altered_message_order_from_the_server_closes_the_connection(self) -> None:
        self.check_alterations(sender_is_client=False)

    def test_the_unaltered_stream_is_delivered_in_the_same_setup(self) -> None:
        peers = Peers()
        client, server, _pump = peers.connect()
        for message in MESSAGES:
            client.write_message(message)
        wire = client.transport.getOutBuffer()  # type: ignore[attr-defined]
        for payload in split_frames(wire):
            server.dataReceived(framed(payload))
        self.assertEqual(peers.server_apps.built[0].received, MESSAGES)
        self.assertFalse(server.transport.disconnecting)  # type: ignore[attr-defined]


@attrs.frozen
class HalfDone:
    """
    A client connection that has sent its vouch, which the attacker holds
    back from the server.
    """

    client: CurveTunProtocol
    server: CurveTunProtocol
    vouch: bytes
    reasons: list[Failure]
    flush: Callable[[], None]


def vouch_held_back(peers: Peers) -> HalfDone:
    client, server, pump = peers.connect(greet=False)
    pump.pump()  # hello ->
    pump.pump()  # <- cookie; the client writes its vouch
    wire = client.transport.getOutBuffer()  # type: ignore[attr-defined]
    [vouch] = split_frames(wire)
    assert vouch[:8] == VOUCH_MAGIC
    reasons: list[Failure] = []
    server.factory.ended_callbacks.append(
        lambda protocol, reason: reasons.append(reason) if protocol is server else None
    )
    return HalfDone(client, server, vouch, reasons, pump.flush)


class BindingTests(SynchronousTestCase):
    """
    The cookie inside a vouch must have been made for the hello of the same
    connection: vouches swapped between two connections are refused.
    """

    def test_vouches_swapped_between_two_connections_are_both_refused(self) -> None:
        peers = Peers()
        first, second = vouch_held_back(peers), vouch_held_back(peers)
        first.server.dataReceived(framed(second.vouch))
        second.server.dataReceived(framed(first.vouch))
        for half in (first, second):
            half.flush()
            [reason] = half.reasons
            self.assertIsInstance(reason.value, BadPacket)
            self.assertIn("issued for another hello", str(reason.value))
        self.assertEqual(peers.server_apps.built, [])

    def test_the_same_two_vouches_unswapped_are_accepted(self) -> None:
        peers = Peers()
        first, second = vouch_held_back(peers), vouch_held_back(peers)
        first.server.dataReceived(framed(first.vouch))
        second.server.dataReceived(framed(second.vouch))
        self.assertEqual(len(peers.server_apps.built), 2)
        self.assertEqual((first.reasons, second.reasons), ([], []))

    def test_a_vouch_on_a_connection_that_sent_no_hello_is_refused(self) -> None:
        peers = Peers()
        half = vouch_held_back(peers)
        connection = ServerConnection.to(peers)
        self.assertEqual(connection.send(half.vouch), b"")
        self.assertTrue(connection.transport.disconnecting)
        self.assertIsInstance(connection.close_reason(), BadPacket)
        self.assertEqual(connection.apps.built, [])

    def test_a_vouch_after_another_clients_hello_is_refused(self) -> None:
        """
        An attacker who sends a hello of its own (or a recorded one) and
        then someone else's vouch gets nothing: the cookie is bound to the
        hello that got it.
        """
        peers = Peers()
        victim = vouch_held_back(peers)
        own_hello, _ = client_hello(peers.server_vault.public_key, EphemeralKeyPair.generate())
        connection = ServerConnection.to(peers)
        self.assertNotEqual(connection.send(own_hello), b"")
        connection.send(victim.vouch)
        self.assertIn("issued for another hello", str(connection.close_reason()))
        self.assertEqual(connection.apps.built, [])
