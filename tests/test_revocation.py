"""
Revocation: an established connection whose client key the registry no
longer admits from its address is closed at once, with the reason in its
log line; on by default, off with C{revoke_sessions=False}
(C{--keep-sessions-on-revoke}).
"""

from __future__ import annotations

import os
import time

from twisted.internet.task import Clock
from twisted.test.iosim import IOPump
from twisted.trial.unittest import SynchronousTestCase

from curvetun.cookies import CookieKeys
from curvetun.keys import fingerprint, format_public_key
from curvetun.registry import FileRegistry, Registry, RegistryChange
from curvetun.revocation import POLL_INTERVAL, Revocation, Revoked
from curvetun.service import CurveTunService
from curvetun.transport import CurveTunProtocol
from curvetun.vault import MemoryVault

from ._support import ManualThreads, Peers, capture_logs, events_like


class RevocationTests(SynchronousTestCase):
    """
    A server identity whose registry is a file, with a client admitted
    from 127.0.0.1, connected in memory.
    """

    def setUp(self) -> None:
        self.logs = capture_logs(self)
        self.peers = Peers()
        self.client_key = self.peers.client_vault.public_key
        self.path = os.path.abspath(self.mktemp())
        self.threads = ManualThreads()
        self.write(f"127.0.0.1 {format_public_key(self.client_key)}\n")
        self.registry = FileRegistry(self.path, run_in_thread=self.threads)

    def write(self, text: str) -> None:
        with open(self.path, "w") as f:
            f.write(text)
        # Another version of the file, whatever the clock's granularity.
        os.utime(self.path, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))

    def serve(self, revoke_sessions: bool = True) -> CurveTunService:
        """
        Make the server identity use the registry file, and start it.
        """
        peers = self.peers
        peers.server = CurveTunService(
            peers.server_vault,
            self.registry,
            clock=peers.clock,
            cookie_keys=CookieKeys(clock=peers.clock, seconds=peers.clock.seconds),
            revoke_sessions=revoke_sessions,
        )
        peers.server_factory = peers.server.server_factory(peers.server_apps)
        peers.server.startService()
        self.addCleanup(lambda: peers.server.stopService() if peers.server.running else None)
        return peers.server

    def connect(self) -> tuple[CurveTunProtocol, IOPump]:
        _, server, pump = self.peers.connect()
        self.assertIsNotNone(server.established_at)
        self.assertFalse(server.disconnecting)
        return server, pump

    def assertRevoked(self, server: CurveTunProtocol, pump: IOPump) -> None:
        pump.flush()
        [application] = self.peers.server_apps.built
        [reason] = application.lost
        self.assertIsInstance(reason.value, Revoked)
        # The server's line (the client logs its own end too).
        [line] = [
            e
            for e in events_like(self.logs, "curvetun connection with")
            if e["key"] == fingerprint(self.client_key)
        ]
        self.assertEqual(line["why"], "revoked by the registry")
        self.assertEqual(line["peer"], "127.0.0.1:40000")

    def assertOpen(self, server: CurveTunProtocol, pump: IOPump) -> None:
        pump.flush()
        self.assertFalse(server.disconnecting)
        [application] = self.peers.server_apps.built
        self.assertEqual(application.lost, [])
        self.assertEqual(events_like(self.logs, "curvetun connection with"), [])

    def test_removing_the_entry_that_admitted_a_connection_aborts_it(self) -> None:
        self.serve()
        server, pump = self.connect()
        self.registry.remove("127.0.0.1")
        # Closed in the same turn as the change: no timer, no reread.
        self.assertTrue(server.disconnecting)
        self.assertRevoked(server, pump)
        assert self.peers.server.revocation is not None
        self.assertEqual(self.peers.server.revocation.closed, 1)

    def test_a_revoked_connection_sends_nothing_more(self) -> None:
        # An abort: what the application wrote a moment ago is not sent
        # to a peer that is no longer trusted.
        self.serve()
        server, pump = self.connect()
        [client_app] = self.peers.client_apps.built
        [server_app] = self.peers.server_apps.built
        assert server_app.transport is not None
        server_app.transport.write(b"not for a revoked peer")
        self.registry.remove("127.0.0.1")
        pump.flush()
        self.assertEqual(client_app.received, [])
        self.assertEqual(len(client_app.lost), 1)

    def test_a_connection_another_entry_still_admits_stays_open(self) -> None:
        key = format_public_key(self.client_key)
        self.write(f"127.0.0.1 {key}\n10.0.0.0/8 {key}\n* {key}\n")
        self.serve()
        server, pump = self.connect()
        self.registry.remove("127.0.0.1")
        self.assertOpen(server, pump)

    def test_removing_another_keys_entry_leaves_the_connection_open(self) -> None:
        other = MemoryVault.generate().public_key
        self.registry.add("127.0.0.1", other)
        self.serve()
        server, pump = self.connect()
        self.registry.remove("127.0.0.1", other)
        self.assertOpen(server, pump)

    def test_an_entry_for_another_address_removed_leaves_the_connection_open(self) -> None:
        self.registry.add("10.1.2.3", self.client_key)
        self.serve()
        server, pump = self.connect()
        self.registry.remove("10.1.2.3")
        self.assertOpen(server, pump)

    def test_with_revocation_off_the_connection_stays_open(self) -> None:
        service = self.serve(revoke_sessions=False)
        self.assertIsNone(service.revocation)
        server, pump = self.connect()
        self.registry.remove("127.0.0.1")
        self.assertOpen(server, pump)
        # New connections are refused all the same.
        _, refused, _ = self.peers.connect()
        self.assertIsNone(refused.established_at)

    def test_an_edit_no_handshake_notices_is_found_by_the_poll(self) -> None:
        self.serve()
        server, pump = self.connect()
        self.write("# nobody\n")
        self.peers.clock.advance(POLL_INTERVAL - 0.01)
        self.assertEqual(self.threads.run_all(), 0)
        self.assertFalse(server.disconnecting)
        self.peers.clock.advance(0.01)
        # The poll examined the file and had it read again, in a thread.
        self.assertEqual(self.threads.run_all(), 1)
        self.assertRevoked(server, pump)

    def test_the_poll_reads_nothing_while_the_file_is_unchanged(self) -> None:
        self.serve()
        server, pump = self.connect()
        self.peers.clock.advance(POLL_INTERVAL * 10)
        self.assertEqual(self.threads.run_all(), 0)
        self.assertOpen(server, pump)

    def test_a_malformed_edit_keeps_the_connections_and_is_logged_once(self) -> None:
        self.serve()
        server, pump = self.connect()
        self.write("127.0.0.1 not-a-key\n")
        for _ in range(4):
            self.peers.clock.advance(POLL_INTERVAL)
            self.threads.run_all()
        self.assertOpen(server, pump)
        errors = [e for e in self.logs if "still using the" in e.get("log_format", "")]
        self.assertEqual(len(errors), 1)

    def test_a_stopped_service_no_longer_revokes_or_polls(self) -> None:
        service = self.serve()
        server, pump = self.connect()
        service.stopService()
        self.registry.remove("127.0.0.1")
        self.assertFalse(server.disconnecting)
        self.peers.clock.advance(POLL_INTERVAL * 4)
        self.assertEqual(self.threads.run_all(), 0)
        self.assertEqual(self.peers.clock.getDelayedCalls(), [])


class _Connection:
    """
    What L{Revocation} asks of a connection: its key, its address, and an
    abort that records the reason.
    """

    disconnecting = False

    def __init__(self, key: bytes, host: str) -> None:
        self.peer_public_key = key
        self.peer_host = host
        self.reason: Exception | None = None

    def abort_with(self, reason: Exception) -> None:
        self.disconnecting = True
        self.reason = reason


class OnePassTests(SynchronousTestCase):
    """
    A change checks every live connection in one synchronous pass.
    """

    def test_fifty_thousand_connections_are_checked_in_one_pass_quickly(self) -> None:
        keys = [MemoryVault.generate().public_key for _ in range(100)]
        hosts = [f"10.0.{n // 250}.{n % 250}" for n in range(500)]
        entries = "".join(f"10.0.0.0/16 {format_public_key(k)}\n" for k in keys)
        registry = Registry.parse(entries)
        # The first key loses its entry and is admitted nowhere.
        new = Registry(tuple(e for e in registry.entries if e.key != keys[0]))
        revocation = Revocation(new, Clock(), poll_interval=None)
        revocation.startService()
        connections = [
            _Connection(keys[n % len(keys)], hosts[n % len(hosts)]) for n in range(50_000)
        ]
        revocation.connections.update(connections)  # type: ignore[arg-type]
        started = time.perf_counter()
        revocation.registry_changed(RegistryChange.between(registry, new))
        elapsed = time.perf_counter() - started
        revoked = [c for c in connections if c.reason is not None]
        self.assertEqual(len(revoked), 500)
        self.assertTrue(all(c.peer_public_key == keys[0] for c in revoked))
        self.assertTrue(all(isinstance(c.reason, Revoked) for c in revoked))
        self.assertEqual(revocation.closed, 500)
        # About 10 ms here; the bound only catches a pass gone quadratic
        # or blocking.
        self.assertLess(elapsed, 1.0)

    def test_a_fleet_key_removed_closes_its_connections_from_every_address(self) -> None:
        fleet, other = (MemoryVault.generate().public_key for _ in range(2))
        old = Registry.parse(f"10.0.0.0/8 {fleet.hex()}\n* {other.hex()}\n")
        new = Registry.parse(f"* {other.hex()}\n")
        revocation = Revocation(new, Clock(), poll_interval=None)
        revocation.startService()
        fleet_connections = [_Connection(fleet, f"10.1.{n // 250}.{n % 250}") for n in range(5000)]
        kept = _Connection(other, "10.0.0.1")
        revocation.connections.update([*fleet_connections, kept])  # type: ignore[list-item]
        revocation.registry_changed(RegistryChange.between(old, new))
        self.assertTrue(all(isinstance(c.reason, Revoked) for c in fleet_connections))
        self.assertIsNone(kept.reason)
        self.assertEqual(revocation.closed, 5000)

    def test_an_addition_checks_nothing(self) -> None:
        # Entries only admit: a change that removes none revokes none.
        key = MemoryVault.generate().public_key
        revocation = Revocation(Registry(), Clock(), poll_interval=None)
        revocation.startService()
        connection = _Connection(key, "127.0.0.1")
        revocation.connections.add(connection)  # type: ignore[arg-type]
        revocation.registry_changed(RegistryChange(added=Registry.parse("* " + key.hex()).entries))
        self.assertIsNone(connection.reason)
