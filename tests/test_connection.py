"""
The connection machines and the transport, in memory: the handshake for
both roles, messages, framing across reads, the client's error reports,
cookie-key rotation, and the handshake timeout.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener
from twisted.test.iosim import FakeTransport, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from curvetun.errors import (
    BadPacket,
    ConnectionClosed,
    CounterExhausted,
    HandshakeTimeout,
    MessageTooLong,
    NotAuthorized,
    ServerKeyMismatch,
)
from curvetun.interfaces import ICurveTunTransport
from curvetun.packets import MAX_MESSAGE
from curvetun.session import Session
from curvetun.vault import MemoryVault

from ._support import (
    CLIENT_ADDRESS,
    SERVER_ADDRESS,
    Peers,
    RecordingFactory,
    RecordingProtocol,
)


class HandshakeTests(SynchronousTestCase):
    """
    A client and a server that trust each other complete the handshake and
    hand each other's authenticated key to the application.
    """

    def test_both_applications_start_once_the_handshake_completes(self) -> None:
        peers = Peers()
        client, server, pump = peers.connect()
        [server_app] = peers.server_apps.built
        [client_app] = peers.client_apps.built
        self.assertEqual((server_app.made, client_app.made), (1, 1))
        self.assertIs(server_app.transport, server)
        self.assertIs(client_app.transport, client)

    def test_each_side_sees_the_others_long_term_key(self) -> None:
        peers = Peers()
        client, server, pump = peers.connect()
        self.assertTrue(verifyObject(ICurveTunTransport, server))
        self.assertTrue(verifyObject(ICurveTunTransport, client))
        self.assertEqual(server.peer_public_key, peers.client_vault.public_key)
        self.assertEqual(client.peer_public_key, peers.server_vault.public_key)

    def test_the_server_asks_the_registry_about_the_peer_address(self) -> None:
        peers = Peers()
        peers.connect()
        self.assertEqual(
            peers.registry.asked, [(peers.client_vault.public_key, CLIENT_ADDRESS.host)]
        )

    def test_the_client_application_starts_before_the_server_speaks(self) -> None:
        """
        The client is vouched (its application may send) as soon as the
        vouch is sent, before any answer from the server.
        """
        peers = Peers()
        client, server, pump = peers.connect(greet=False)
        pump.pump()  # hello ->
        pump.pump()  # <- cookie
        self.assertEqual(len(peers.client_apps.built), 1)
        self.assertEqual(peers.server_apps.built, [])
        early = peers.client_apps.built[0].transport
        assert early is not None
        early.write(b"early")
        pump.flush()
        self.assertEqual(peers.server_apps.built[0].received, [b"early"])


class MessageTests(SynchronousTestCase):
    """
    Once connected, one message sent is one message received, whole and in
    order, in both directions.
    """

    def setUp(self) -> None:
        self.peers = Peers()
        self.client, self.server, self.pump = self.peers.connect()
        [self.server_app] = self.peers.server_apps.built
        [self.client_app] = self.peers.client_apps.built

    def test_messages_arrive_whole_and_in_order_both_ways(self) -> None:
        for n in range(50):
            self.client.write_message(b"c%d" % n)
            self.server.write_message(b"s%d" % n)
        self.pump.flush()
        self.assertEqual(self.server_app.received, [b"c%d" % n for n in range(50)])
        self.assertEqual(self.client_app.received, [b"s%d" % n for n in range(50)])

    def test_an_empty_message_is_delivered_as_an_empty_message(self) -> None:
        self.client.write_message(b"")
        self.pump.flush()
        self.assertEqual(self.server_app.received, [b""])

    def test_an_empty_stream_write_sends_nothing(self) -> None:
        self.client.write(b"")
        self.pump.flush()
        self.assertEqual(self.server_app.received, [])

    def test_the_largest_message_fits_in_one_message(self) -> None:
        message = bytes(range(256)) * (MAX_MESSAGE // 256) + b"x" * (MAX_MESSAGE % 256)
        self.server.write_message(message)
        self.pump.flush()
        self.assertEqual(self.client_app.received, [message])

    def test_a_message_one_byte_too_long_is_refused(self) -> None:
        error = self.assertRaises(
            MessageTooLong, self.client.write_message, b"x" * (MAX_MESSAGE + 1)
        )
        self.assertIn(str(MAX_MESSAGE), str(error))

    def test_a_long_stream_write_is_split_at_the_message_limit(self) -> None:
        data = bytes(range(256)) * 1000
        self.client.write(data)
        self.pump.flush()
        self.assertEqual(b"".join(self.server_app.received), data)
        self.assertEqual(
            [len(m) for m in self.server_app.received],
            [MAX_MESSAGE] * 3 + [len(data) - 3 * MAX_MESSAGE],
        )

    def test_small_writes_in_one_reactor_turn_are_coalesced(self) -> None:
        for part in (b"a", b"b", b"c"):
            self.client.write(part)
        self.pump.flush()
        self.assertEqual(self.server_app.received, [b"abc"])

    def test_writes_in_answer_to_a_read_go_out_when_the_read_is_done(self) -> None:
        """
        An application that answers in its dataReceived is not held up until
        the next reactor iteration: its writes leave with the end of the read.
        """

        def answer(data: bytes) -> None:
            self.client.write(b"re: ")
            self.client.write(data)

        self.client_app.dataReceived = answer  # type: ignore[method-assign]
        self.server.write_message(b"question")
        wire = self.server.transport.getOutBuffer()  # type: ignore[attr-defined]
        self.client.dataReceived(wire)
        self.server.dataReceived(self.client.transport.getOutBuffer())  # type: ignore[attr-defined]
        self.assertEqual(self.server_app.received, [b"re: question"])

    def test_a_message_after_stream_writes_keeps_the_order(self) -> None:
        self.client.write(b"stream")
        self.client.write_message(b"message")
        self.client.write(b"more")
        self.pump.flush()
        self.assertEqual(self.server_app.received, [b"stream", b"message", b"more"])

    def test_abort_discards_coalesced_writes(self) -> None:
        self.client.write(b"never sent")
        self.client.abortConnection()
        self.pump.flush()
        self.assertEqual(self.server_app.received, [])

    def test_write_sequence_joins_its_parts(self) -> None:
        self.client.writeSequence([b"a", b"b", b"c"])
        self.pump.flush()
        self.assertEqual(self.server_app.received, [b"abc"])

    def test_messages_split_across_reads_are_delivered_whole(self) -> None:
        for message in (b"one", b"two" * 1000, b""):
            self.client.write_message(message)
        wire = self.client.transport.getOutBuffer()  # type: ignore[attr-defined]
        for i in range(len(wire)):
            self.server.dataReceived(wire[i : i + 1])
        self.assertEqual(self.server_app.received, [b"one", b"two" * 1000, b""])

    def test_several_messages_in_one_read_are_delivered_one_by_one(self) -> None:
        for message in (b"one", b"two", b"three"):
            self.server.write_message(message)
        wire = self.server.transport.getOutBuffer()  # type: ignore[attr-defined]
        self.client.dataReceived(wire)
        self.assertEqual(self.client_app.received, [b"one", b"two", b"three"])

    def test_a_paused_transport_holds_messages_until_resumed(self) -> None:
        self.client.pauseProducing()
        self.server.write_message(b"held")
        self.pump.flush()
        self.assertEqual(self.client_app.received, [])
        self.client.resumeProducing()
        self.pump.flush()
        self.assertEqual(self.client_app.received, [b"held"])

    def test_pausing_and_resuming_while_receiving_delivers_each_message_once(self) -> None:
        """
        An application that pauses and resumes its transport from inside
        dataReceived (as twisted.web's client does) gets each message of a
        read exactly once.
        """
        received = self.client_app.received

        def pause_and_resume(data: bytes) -> None:
            received.append(data)
            self.client.pauseProducing()
            self.client.resumeProducing()

        self.client_app.dataReceived = pause_and_resume  # type: ignore[method-assign]
        for message in (b"one", b"two", b"three"):
            self.server.write_message(message)
        self.pump.flush()
        self.assertEqual(received, [b"one", b"two", b"three"])

    def test_closing_while_receiving_delivers_nothing_more(self) -> None:
        """
        An application that closes its transport from inside dataReceived
        gets no more of the messages of that read.
        """
        received = self.client_app.received

        def close_at_once(data: bytes) -> None:
            received.append(data)
            self.client.loseConnection()

        self.client_app.dataReceived = close_at_once  # type: ignore[method-assign]
        for message in (b"one", b"two", b"three"):
            self.server.write_message(message)
        self.pump.flush()
        self.assertEqual(received, [b"one"])
        self.assertEqual(len(self.client_app.lost), 1)

    def test_pausing_while_receiving_holds_the_rest_of_the_read(self) -> None:
        received = self.client_app.received

        def pause(data: bytes) -> None:
            received.append(data)
            self.client.pauseProducing()

        self.client_app.dataReceived = pause  # type: ignore[method-assign]
        for message in (b"one", b"two"):
            self.server.write_message(message)
        self.pump.flush()
        self.assertEqual(received, [b"one"])
        self.client.resumeProducing()
        self.assertEqual(received, [b"one", b"two"])

    def test_an_exhausted_send_counter_closes_instead_of_sending(self) -> None:
        """
        Protocol v1.0 has no re-keying: when the message counter would
        reach its limit, the connection closes and nothing more is sent.
        """
        # The first message has counter 2: let 3 be the limit.
        self.patch(Session, "COUNTER_LIMIT", 3)
        self.server.write_message(b"the last one")
        self.server.write_message(b"one too many")
        self.pump.flush()
        self.assertEqual(self.client_app.received, [b"the last one"])
        [reason] = self.server_app.lost
        reason.trap(CounterExhausted)

    def test_close_delivers_messages_written_before_it(self) -> None:
        self.client.write_message(b"last words")
        self.client.loseConnection()
        self.pump.flush()
        self.assertEqual(self.server_app.received, [b"last words"])
        self.assertEqual(len(self.server_app.lost), 1)
        self.assertEqual(len(self.client_app.lost), 1)
        self.client_app.lost[0].trap(ConnectionDone)

    def test_connection_lost_reaches_the_application_exactly_once(self) -> None:
        self.client.loseConnection()
        self.client.loseConnection()
        self.client.abortConnection()
        self.pump.flush()
        self.assertEqual((len(self.client_app.lost), len(self.server_app.lost)), (1, 1))

    def test_writes_after_close_are_not_sent(self) -> None:
        self.client.loseConnection()
        self.client.write(b"too late")
        self.pump.flush()
        self.assertEqual(self.server_app.received, [])

    def test_a_tampered_message_closes_and_delivers_nothing(self) -> None:
        self.client.write_message(b"genuine")
        wire = bytearray(self.client.transport.getOutBuffer())  # type: ignore[attr-defined]
        wire[-1] ^= 1
        self.server.dataReceived(bytes(wire))
        self.pump.flush()
        self.assertEqual(self.server_app.received, [])
        [reason] = self.server_app.lost
        self.assertIsInstance(reason.value, BadPacket)


class RefusalTests(SynchronousTestCase):
    """
    A client learns why a handshake failed: the wrong server, or a key the
    server does not admit.
    """

    def test_a_wrong_server_key_fails_saying_so(self) -> None:
        peers = Peers()
        wrong_key = MemoryVault.generate().public_key
        client, server, pump = peers.connect(server_key=wrong_key, greet=False)
        established = client.when_established()
        pump.flush()
        failure = self.failureResultOf(established, ServerKeyMismatch)
        self.assertIn("closed the connection after our hello", failure.getErrorMessage())
        self.assertEqual(peers.client_apps.built, [])
        self.assertEqual(peers.server_apps.built, [])

    def test_an_unknown_client_is_refused_after_its_vouch(self) -> None:
        peers = Peers()
        peers.registry.clients.clear()
        client, server, pump = peers.connect(greet=False)
        established = client.when_established()
        pump.flush()
        # The client cannot know until the server closes: it is vouched.
        client_app = self.successResultOf(established)
        [reason] = client_app.lost  # type: ignore[attr-defined]
        reason.trap(NotAuthorized)
        self.assertIn("registry", reason.getErrorMessage())
        self.assertEqual(peers.server_apps.built, [])

    def test_a_client_refused_before_it_is_vouched_never_starts_its_application(
        self,
    ) -> None:
        peers = Peers()
        client, server, pump = peers.connect(greet=False)
        established = client.when_established()
        server.transport.loseConnection()  # the server hangs up at once
        pump.flush()
        self.failureResultOf(established, ServerKeyMismatch)
        self.assertEqual(peers.client_apps.built, [])


class CookieRotationTests(SynchronousTestCase):
    """
    A cookie made under the current cookie key is still accepted after one
    rotation, and refused after two (spec, "Cookie keys").
    """

    def handshake_with_pause(self, rotations: int) -> Peers:
        peers = Peers(handshake_timeout=None)
        peers.server.startService()
        self.addCleanup(peers.server.stopService)
        client, server, pump = peers.connect(greet=False)
        pump.pump()  # hello ->
        pump.pump()  # <- cookie; the client sends its vouch
        for _ in range(rotations):
            peers.clock.advance(60)
        pump.flush()
        return peers

    def test_a_cookie_from_the_previous_key_is_accepted(self) -> None:
        peers = self.handshake_with_pause(1)
        self.assertEqual(len(peers.server_apps.built), 1)

    def test_a_cookie_two_rotations_old_is_refused(self) -> None:
        peers = self.handshake_with_pause(2)
        self.assertEqual(peers.server_apps.built, [])
        [client_app] = peers.client_apps.built
        self.assertEqual(len(client_app.lost), 1)


class HandshakeTimeoutTests(SynchronousTestCase):
    """
    A handshake that does not complete in time is closed.
    """

    def test_a_silent_server_times_out_the_client(self) -> None:
        peers = Peers(handshake_timeout=5)
        client, server, pump = peers.connect(greet=False)
        established = client.when_established()
        peers.clock.advance(5)
        pump.flush()
        self.failureResultOf(established, HandshakeTimeout)

    def test_a_silent_client_is_closed_by_the_server(self) -> None:
        peers = Peers(handshake_timeout=5)
        client, server, pump = peers.connect(greet=False)
        peers.clock.advance(5)
        self.assertTrue(server.transport.disconnecting)  # type: ignore[attr-defined]

    def test_an_established_connection_is_not_timed_out(self) -> None:
        peers = Peers(handshake_timeout=5)
        client, server, pump = peers.connect()
        peers.clock.advance(60)
        client.write_message(b"still here")
        pump.flush()
        self.assertEqual(peers.server_apps.built[0].received, [b"still here"])

    def test_cancelling_the_handshake_aborts_the_connection(self) -> None:
        peers = Peers()
        client, server, pump = peers.connect(greet=False)
        established = client.when_established()
        established.cancel()
        self.failureResultOf(established, CancelledError)
        self.assertTrue(client.transport.disconnecting)  # type: ignore[attr-defined]
        pump.flush()
        self.assertEqual(peers.client_apps.built, [])


class SendBeforeHandshakeTests(SynchronousTestCase):
    """
    The machine refuses application data before the handshake (the
    transport never offers it, but the machine does not rely on that).
    """

    def test_send_before_the_handshake_raises(self) -> None:
        peers = Peers()
        client, server, pump = peers.connect(greet=False)
        self.assertRaises(ConnectionClosed, client.write_message, b"too early")
        self.assertRaises(ConnectionClosed, client.write, b"too early")
        self.assertRaises(ConnectionClosed, client.writeSequence, [b"too early"])


@implementer(IHandshakeListener)
class ListeningProtocol(RecordingProtocol):
    """
    An application protocol that wants to hear when the handshake is
    confirmed; it records, in order, what happened to it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def connectionMade(self) -> None:
        super().connectionMade()
        self.events.append("made")

    def handshakeCompleted(self) -> None:
        self.events.append("handshake completed")

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.events.append(f"received {data.decode()}")


class ListeningFactory(RecordingFactory):
    def buildProtocol(self, addr: Any) -> ListeningProtocol:
        protocol = ListeningProtocol()
        protocol.factory = self
        self.built.append(protocol)
        return protocol


class HandshakeListenerTests(SynchronousTestCase):
    """
    An application protocol that provides IHandshakeListener hears when the
    peer is confirmed: the server's when the vouch verifies, the client's
    when the server's first message opens (its connect() fired before,
    when the vouch was sent).
    """

    def setUp(self) -> None:
        self.peers = Peers()
        self.peers.server_factory.wrappedFactory = ListeningFactory()
        self.peers.client_apps = ListeningFactory()

    def apps(self) -> tuple[ListeningProtocol, ListeningProtocol]:
        server_apps = self.peers.server_factory.wrappedFactory
        assert isinstance(server_apps, ListeningFactory)
        [server_app] = server_apps.built
        [client_app] = self.peers.client_apps.built
        assert isinstance(server_app, ListeningProtocol)
        assert isinstance(client_app, ListeningProtocol)
        return client_app, server_app

    def test_the_server_application_hears_at_once(self) -> None:
        self.peers.connect()
        client_app, server_app = self.apps()
        self.assertEqual(server_app.events, ["made", "handshake completed"])

    def test_the_client_application_hears_with_the_servers_first_message(self) -> None:
        client, server, pump = self.peers.connect()
        client_app, server_app = self.apps()
        self.assertEqual(client_app.events, ["made"])
        server.write_message(b"one")
        server.write_message(b"two")
        pump.flush()
        self.assertEqual(
            client_app.events, ["made", "handshake completed", "received one", "received two"]
        )

    def test_a_client_the_server_refuses_never_hears(self) -> None:
        self.peers.registry.clients.clear()
        client, server, pump = self.peers.connect()
        [client_app] = self.peers.client_apps.built
        assert isinstance(client_app, ListeningProtocol)
        self.assertEqual(client_app.events, ["made"])
        [reason] = client_app.lost
        reason.trap(NotAuthorized)

    def test_an_application_without_the_interface_is_not_asked(self) -> None:
        peers = Peers()
        client, server, pump = peers.connect()
        server.write_message(b"hello")
        pump.flush()
        self.assertEqual(peers.client_apps.built[0].received, [b"hello"])


class FigureTests(SynchronousTestCase):
    """
    Each established connection's transport tells what it carried and when.
    """

    def test_bytes_and_times_each_way(self) -> None:
        peers = Peers()
        client, server, pump = peers.connect()
        self.assertEqual(server.established_at, peers.clock.seconds())
        self.assertEqual((server.bytes_received, server.last_received_at), (0, None))
        peers.clock.advance(3)
        client.write_message(b"12345")
        pump.flush()
        peers.clock.advance(4)
        server.write(b"ab")
        pump.flush()
        self.assertEqual((server.bytes_received, server.bytes_sent), (5, 2))
        self.assertEqual((client.bytes_received, client.bytes_sent), (2, 5))
        self.assertEqual((server.last_received_at, server.last_sent_at), (3, 7))

    def test_before_the_handshake_there_are_no_figures(self) -> None:
        peers = Peers()
        client, server, pump = peers.connect(greet=False)
        self.assertEqual(
            (server.established_at, server.bytes_received, server.bytes_sent), (None, 0, 0)
        )

    def test_a_service_can_follow_live_connections(self) -> None:
        peers = Peers()
        live: set[object] = set()
        peers.server_factory.established_callbacks.append(live.add)
        peers.server_factory.ended_callbacks.append(lambda protocol, reason: live.discard(protocol))
        client, server, pump = peers.connect()
        self.assertEqual(live, {server})
        client.loseConnection()
        pump.flush()
        self.assertEqual(live, set())


class ProxiedAddressTests(SynchronousTestCase):
    """
    The registry is asked about the peer address the transport reports,
    which behind a PROXY-protocol wrapper is not the one the factory was
    given when it built the protocol.
    """

    def test_the_registry_is_asked_about_the_transports_peer(self) -> None:
        peers = Peers()
        proxy = IPv4Address("TCP", "10.9.9.9", 50000)
        server_factory = peers.server_factory
        client_factory = peers.client.client_factory(
            peers.client_apps, peers.server_vault.public_key
        )
        connectedServerAndClient(
            lambda: server_factory.buildProtocol(proxy),
            lambda: client_factory.buildProtocol(SERVER_ADDRESS),
            clientTransportFactory=lambda p: FakeTransport(
                p, False, hostAddress=CLIENT_ADDRESS, peerAddress=SERVER_ADDRESS
            ),
            serverTransportFactory=lambda p: FakeTransport(
                p, True, hostAddress=SERVER_ADDRESS, peerAddress=CLIENT_ADDRESS
            ),
            clock=peers.clock,
        )
        self.assertEqual(
            peers.registry.asked, [(peers.client_vault.public_key, CLIENT_ADDRESS.host)]
        )
        self.assertEqual(len(peers.server_apps.built), 1)
