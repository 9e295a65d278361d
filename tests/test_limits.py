"""
Resource limits on a server: how many connections and unfinished
handshakes it takes (in all and per peer address), and the idle timeout.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.trial.unittest import SynchronousTestCase

from curvetun.errors import IdleTimeout
from curvetun.transport import ConnectionLimits

from ._support import CLIENT_ADDRESS, Peers

OTHER_ADDRESS = IPv4Address("TCP", "192.0.2.7", 40001)


def unlimited(**limits: int) -> ConnectionLimits:
    fields: dict[str, int | None] = {
        "connections": None,
        "connections_per_address": None,
        "handshakes": None,
        "handshakes_per_address": None,
    }
    fields.update(limits)
    return ConnectionLimits(**fields)


class HandshakeLimitTests(SynchronousTestCase):
    """
    Unfinished handshakes past the limit are refused before any crypto;
    finished ones free their place.
    """

    def test_unfinished_handshakes_past_the_per_address_limit_are_refused(self) -> None:
        peers = Peers(limits=unlimited(handshakes_per_address=2))
        factory = peers.server_factory
        self.assertIsNotNone(factory.buildProtocol(CLIENT_ADDRESS))
        self.assertIsNotNone(factory.buildProtocol(CLIENT_ADDRESS))
        self.assertIsNone(factory.buildProtocol(CLIENT_ADDRESS))
        # Another address has its own allowance.
        self.assertIsNotNone(factory.buildProtocol(OTHER_ADDRESS))

    def test_unfinished_handshakes_past_the_server_limit_are_refused(self) -> None:
        peers = Peers(limits=unlimited(handshakes=2))
        factory = peers.server_factory
        factory.buildProtocol(CLIENT_ADDRESS)
        factory.buildProtocol(OTHER_ADDRESS)
        self.assertIsNone(factory.buildProtocol(IPv4Address("TCP", "192.0.2.8", 1)))

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
        self.assertIsNotNone(peers.server_factory.buildProtocol(CLIENT_ADDRESS))

    def test_a_silent_peer_holds_its_place_until_the_handshake_times_out(self) -> None:
        peers = Peers(handshake_timeout=5, limits=unlimited(handshakes_per_address=1))
        client, server, pump = peers.connect(greet=False)
        self.assertIsNone(peers.server_factory.buildProtocol(CLIENT_ADDRESS))
        peers.clock.advance(5)
        pump.flush()
        self.assertIsNotNone(peers.server_factory.buildProtocol(CLIENT_ADDRESS))


class ConnectionLimitTests(SynchronousTestCase):
    """
    Connections past the limit are refused; those established keep working.
    """

    def test_connections_past_the_per_address_limit_are_refused(self) -> None:
        peers = Peers(limits=unlimited(connections_per_address=2))
        peers.connect()
        peers.connect()
        self.assertIsNone(peers.server_factory.buildProtocol(CLIENT_ADDRESS))
        self.assertIsNotNone(peers.server_factory.buildProtocol(OTHER_ADDRESS))

    def test_established_connections_keep_working_at_the_limit(self) -> None:
        peers = Peers(limits=unlimited(connections=2))
        first = peers.connect()
        second = peers.connect()
        self.assertIsNone(peers.server_factory.buildProtocol(OTHER_ADDRESS))
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
        self.assertIsNotNone(peers.server_factory.buildProtocol(CLIENT_ADDRESS))

    def test_the_defaults_limit_handshakes_per_address(self) -> None:
        limits = ConnectionLimits()
        self.assertIsNotNone(limits.handshakes_per_address)
        self.assertIsNotNone(limits.connections)


class IdleTimeoutTests(SynchronousTestCase):
    """
    With an idle timeout, an established connection that receives nothing
    for that long is closed; anything received restarts the count.
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

    def test_without_an_idle_timeout_a_quiet_connection_stays_open(self) -> None:
        peers = Peers()
        client, server, pump = peers.connect()
        peers.clock.advance(3600)
        pump.flush()
        self.assertEqual(peers.server_apps.built[0].lost, [])
