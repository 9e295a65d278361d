"""
Resource limits on a server, as its connections meet them: which
connections are admitted (in all and per peer address, by the address the
transport reports), the eviction of unfinished handshakes at the server's
limit, the first-packet deadline, and the idle timeout. (The admission's
own rules, per network and in order of eviction, are tested in
test_admission.)
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from curvetun.admission import ConnectionLimits
from curvetun.errors import HandshakeEvicted, HandshakeTimeout, IdleTimeout
from curvetun.handshake import EphemeralKeyPair, client_hello
from curvetun.transport import CurveTunProtocol

from ._support import CLIENT_ADDRESS, SERVER_ADDRESS, Peers

OTHER_ADDRESS = IPv4Address("TCP", "192.0.2.7", 40001)
PROXY_ADDRESS = IPv4Address("TCP", "10.9.9.9", 50000)


def unlimited(**limits: int) -> ConnectionLimits:
    """
    Limits that lift every limit (in all, per address, per network) but
    C{limits}.
    """
    fields: dict[str, Any] = {
        field.name: None
        for field in attrs.fields(ConnectionLimits)
        if field.name.startswith(("connections", "handshakes"))
    }
    fields.update(limits)
    return attrs.evolve(ConnectionLimits(), **fields)


class Accepted:
    """
    One TCP connection accepted by a server factory, on a StringTransport
    whose peer is C{peer} (the factory is told C{built_for}, as a proxy's
    accept would tell it the proxy's address).
    """

    def __init__(
        self,
        peers: Peers,
        peer: IPv4Address = CLIENT_ADDRESS,
        built_for: IPv4Address | None = None,
    ) -> None:
        self.peers = peers
        self.protocol: CurveTunProtocol = peers.server_factory.buildProtocol(
            peer if built_for is None else built_for
        )
        self.transport = StringTransport(hostAddress=SERVER_ADDRESS, peerAddress=peer)
        self.protocol.makeConnection(self.transport)
        self.lost: list[Failure] = []
        peers.server_factory.ended_callbacks.append(
            lambda protocol, reason: self.lost.append(reason) if protocol is self.protocol else None
        )

    @property
    def refused(self) -> bool:
        """
        Closed at once, before any answer.
        """
        return bool(self.transport.disconnecting) and self.transport.value() == b""

    def send_hello(self) -> None:
        hello, _ = client_hello(self.peers.server_vault.public_key, EphemeralKeyPair.generate())
        self.protocol.dataReceived(len(hello).to_bytes(2, "big") + hello)

    def close(self) -> None:
        """
        TCP reports the close.
        """
        self.protocol.connectionLost(Failure(ConnectionDone()))


class HandshakeLimitTests(SynchronousTestCase):
    """
    Unfinished handshakes past an address's share are refused before any
    crypto; at the server's limit a newcomer evicts an unfinished handshake;
    finished ones free their place.
    """

    def test_unfinished_handshakes_past_the_per_address_limit_are_refused(self) -> None:
        peers = Peers(limits=unlimited(handshakes_per_address=2))
        self.assertFalse(Accepted(peers).refused)
        self.assertFalse(Accepted(peers).refused)
        self.assertTrue(Accepted(peers).refused)
        # Another address has its own allowance.
        self.assertFalse(Accepted(peers, OTHER_ADDRESS).refused)

    def test_a_refused_connection_is_not_counted(self) -> None:
        peers = Peers(limits=unlimited(handshakes_per_address=1))
        first = Accepted(peers)
        refused = Accepted(peers)
        self.assertTrue(refused.refused)
        refused.close()
        self.assertTrue(Accepted(peers).refused)
        first.close()
        self.assertFalse(Accepted(peers).refused)

    def test_the_limits_count_the_address_the_transport_reports(self) -> None:
        """
        Behind a PROXY-protocol wrapper the factory builds the protocol for
        the proxy's address; the transport reports the client's, and that
        is the one that counts.
        """
        peers = Peers(limits=unlimited(handshakes_per_address=1))
        self.assertFalse(Accepted(peers, CLIENT_ADDRESS, built_for=PROXY_ADDRESS).refused)
        self.assertFalse(Accepted(peers, OTHER_ADDRESS, built_for=PROXY_ADDRESS).refused)
        self.assertTrue(Accepted(peers, CLIENT_ADDRESS, built_for=PROXY_ADDRESS).refused)

    def test_at_the_server_limit_a_newcomer_evicts_a_silent_handshake(self) -> None:
        """
        Idle sockets cannot lock new clients out: at the server's limit of
        unfinished handshakes, a newcomer is taken, and an unfinished
        handshake that has not sent a valid hello is aborted instead.
        """
        peers = Peers(limits=unlimited(handshakes=2))
        # Both of one network (the admission takes from the network with
        # the most unfinished handshakes), the newcomer of another.
        silent = Accepted(peers, IPv4Address("TCP", "192.0.2.8", 1))
        greeted = Accepted(peers, OTHER_ADDRESS)
        greeted.send_hello()
        self.assertTrue(greeted.protocol.hello_verified)
        newcomer = Accepted(peers, IPv4Address("TCP", "198.51.100.1", 1))
        self.assertFalse(newcomer.refused)
        self.assertTrue(silent.transport.disconnecting)
        self.assertFalse(greeted.transport.disconnecting)
        silent.close()
        [reason] = silent.lost
        reason.trap(HandshakeEvicted)

    def test_an_evicted_connection_reads_nothing_more(self) -> None:
        peers = Peers(limits=unlimited(handshakes=1))
        evicted = Accepted(peers)
        Accepted(peers, OTHER_ADDRESS)
        evicted.send_hello()
        self.assertEqual(evicted.transport.value(), b"")

    def test_a_completed_handshake_frees_its_place(self) -> None:
        peers = Peers(limits=unlimited(handshakes_per_address=1))
        client, server, pump = peers.connect()
        self.assertEqual(len(peers.server_apps.built), 1)
        second_client, second_server, second_pump = peers.connect()
        self.assertEqual(len(peers.server_apps.built), 2)

    def test_a_failed_handshake_frees_its_place(self) -> None:
        peers = Peers(limits=unlimited(handshakes_per_address=1))
        client, server, pump = peers.connect(greet=False)
        client.transport.loseConnection()
        pump.flush()
        self.assertFalse(Accepted(peers).refused)

    def test_a_silent_peer_holds_its_place_until_its_first_packet_is_late(self) -> None:
        peers = Peers(
            handshake_timeout=10, hello_timeout=2, limits=unlimited(handshakes_per_address=1)
        )
        client, server, pump = peers.connect(greet=False)
        self.assertTrue(Accepted(peers).refused)
        peers.clock.advance(2)
        pump.flush()
        self.assertFalse(Accepted(peers).refused)


class ConnectionLimitTests(SynchronousTestCase):
    """
    Connections past the limit are refused; those established keep working.
    """

    def test_connections_past_the_per_address_limit_are_refused(self) -> None:
        peers = Peers(limits=unlimited(connections_per_address=2))
        peers.connect()
        peers.connect()
        self.assertTrue(Accepted(peers).refused)
        self.assertFalse(Accepted(peers, OTHER_ADDRESS).refused)

    def test_established_connections_keep_working_at_the_limit(self) -> None:
        peers = Peers(limits=unlimited(connections=2))
        first = peers.connect()
        second = peers.connect()
        self.assertTrue(Accepted(peers, OTHER_ADDRESS).refused)
        for client, _server, pump in (first, second):
            client.write_message(b"still served")
            pump.flush()
        self.assertEqual(
            [app.received for app in peers.server_apps.built],
            [[b"still served"], [b"still served"]],
        )

    def test_a_closed_connection_frees_its_place(self) -> None:
        peers = Peers(limits=unlimited(connections=1))
        client, server, pump = peers.connect()
        client.loseConnection()
        pump.flush()
        self.assertFalse(Accepted(peers).refused)

    def test_the_defaults_limit_handshakes_per_address(self) -> None:
        limits = ConnectionLimits()
        self.assertIsNotNone(limits.handshakes_per_address)
        self.assertIsNotNone(limits.connections)


class FirstPacketDeadlineTests(SynchronousTestCase):
    """
    A server gives a new connection C{hello_timeout} seconds to deliver its
    first whole packet (an honest hello comes one round trip after the
    connect), and the whole handshake its C{handshake_timeout}.
    """

    def test_a_silent_connection_is_closed_at_the_first_packet_deadline(self) -> None:
        peers = Peers(handshake_timeout=10, hello_timeout=2)
        silent = Accepted(peers)
        peers.clock.advance(1.9)
        self.assertFalse(silent.transport.disconnecting)
        peers.clock.advance(0.1)
        self.assertTrue(silent.transport.disconnecting)
        silent.close()
        [reason] = silent.lost
        reason.trap(HandshakeTimeout)
        self.assertIn("first packet", reason.getErrorMessage())

    def test_half_a_hello_does_not_meet_the_deadline(self) -> None:
        peers = Peers(handshake_timeout=10, hello_timeout=2)
        slow = Accepted(peers)
        hello, _ = client_hello(peers.server_vault.public_key, EphemeralKeyPair.generate())
        slow.protocol.dataReceived((len(hello).to_bytes(2, "big") + hello)[:60])
        peers.clock.advance(2)
        self.assertTrue(slow.transport.disconnecting)

    def test_after_a_hello_in_time_the_handshake_timeout_applies(self) -> None:
        peers = Peers(handshake_timeout=10, hello_timeout=2)
        greeted = Accepted(peers)
        greeted.send_hello()
        peers.clock.advance(9.9)
        self.assertFalse(greeted.transport.disconnecting)
        peers.clock.advance(0.1)
        self.assertTrue(greeted.transport.disconnecting)

    def test_without_a_first_packet_deadline_the_handshake_timeout_applies(self) -> None:
        peers = Peers(handshake_timeout=10, hello_timeout=None)
        silent = Accepted(peers)
        peers.clock.advance(9.9)
        self.assertFalse(silent.transport.disconnecting)
        peers.clock.advance(0.1)
        self.assertTrue(silent.transport.disconnecting)

    def test_a_client_sends_its_hello_in_time(self) -> None:
        peers = Peers(handshake_timeout=10, hello_timeout=2)
        client, server, pump = peers.connect()
        self.assertEqual(len(peers.server_apps.built), 1)
        peers.clock.advance(60)
        self.assertEqual(peers.server_apps.built[0].lost, [])


class IdleTimeoutTests(SynchronousTestCase):
    """
    With an idle timeout, an established connection that receives no
    message for that long is closed; each message that opens restarts the
    count, and nothing else does.
    """

    def test_an_idle_connection_is_closed_with_the_reason(self) -> None:
        peers = Peers(idle_timeout=30)
        client, server, pump = peers.connect()
        peers.clock.advance(30)
        pump.flush()
        [server_app] = peers.server_apps.built
        [reason] = server_app.lost
        reason.trap(IdleTimeout)

    def test_traffic_keeps_a_connection_open(self) -> None:
        peers = Peers(idle_timeout=30)
        client, server, pump = peers.connect()
        for _ in range(5):
            peers.clock.advance(20)
            client.write_message(b"tick")
            pump.flush()
        [server_app] = peers.server_apps.built
        self.assertEqual(server_app.lost, [])
        self.assertEqual(len(server_app.received), 5)

    def test_a_message_trickled_a_byte_at_a_time_does_not_keep_it_open(self) -> None:
        """
        A peer that sends one byte a second of a message it never finishes
        is closed when the idle timeout has passed since its last whole
        message, however many reads it made since.
        """
        peers = Peers(idle_timeout=3)
        client, server, pump = peers.connect()
        client.write_message(b"a message never finished")
        wire = client.transport.getOutBuffer()  # type: ignore[attr-defined]
        for byte in range(len(wire) - 1):
            server.dataReceived(wire[byte : byte + 1])
            peers.clock.advance(1)
            if server.transport.disconnecting:  # type: ignore[attr-defined]
                break
        self.assertEqual(peers.clock.seconds(), 3)
        self.assertTrue(server.transport.disconnecting)  # type: ignore[attr-defined]
        pump.flush()
        [server_app] = peers.server_apps.built
        [reason] = server_app.lost
        reason.trap(IdleTimeout)

    def test_without_an_idle_timeout_a_quiet_connection_stays_open(self) -> None:
        peers = Peers()
        client, server, pump = peers.connect()
        peers.clock.advance(3600)
        pump.flush()
        self.assertEqual(peers.server_apps.built[0].lost, [])


class RecordingFailureLog:
    """
    Stands in for the server's L{curvetun.admission.FailureLog}.
    """

    def __init__(self) -> None:
        self.failed_with: list[tuple[str, Failure]] = []

    def failed(self, peer: str, reason: Failure) -> None:
        self.failed_with.append((peer, reason))

    def stop(self) -> None:
        pass


class FailedHandshakeLogTests(SynchronousTestCase):
    """
    Failed handshakes go to the server's failure log (which sums them up);
    a connection that never sent a byte (a port scan, a health check) is
    not a failed handshake, and is logged at debug level only.
    """

    def setUp(self) -> None:
        self.peers = Peers(handshake_timeout=10, hello_timeout=2)
        self.failures = RecordingFailureLog()
        self.peers.server_factory.failure_log = self.failures  # type: ignore[assignment]

    def test_a_failed_handshake_goes_to_the_failure_log(self) -> None:
        accepted = Accepted(self.peers)
        accepted.protocol.dataReceived(b"\x00\x80" + bytes(128))
        with capturedLogs() as events:
            accepted.close()
        [(peer, reason)] = self.failures.failed_with
        self.assertEqual(peer, f"{CLIENT_ADDRESS.host}:{CLIENT_ADDRESS.port}")
        self.assertIn("unknown packet magic", reason.getErrorMessage())
        self.assertEqual([e for e in events if e["log_level"] >= LogLevel.info], [])

    def test_a_connection_that_sent_nothing_is_logged_at_debug_level_only(self) -> None:
        accepted = Accepted(self.peers)
        with capturedLogs() as events:
            self.peers.clock.advance(2)
            accepted.close()
        self.assertEqual(self.failures.failed_with, [])
        self.assertEqual([e["log_level"] for e in events], [LogLevel.debug])

    def test_a_refused_connection_is_left_to_the_admission_to_log(self) -> None:
        peers = Peers(limits=unlimited(handshakes_per_address=0))
        failures = RecordingFailureLog()
        peers.server_factory.failure_log = failures  # type: ignore[assignment]
        refused = Accepted(peers)
        self.assertTrue(refused.refused)
        with capturedLogs() as events:
            refused.close()
        self.assertEqual(failures.failed_with, [])
        self.assertEqual([e for e in events if e["log_level"] >= LogLevel.info], [])
