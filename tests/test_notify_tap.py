"""
C{twist curvetun} under a service manager: C{READY=1} on C{$NOTIFY_SOCKET}
once every listener of every tunnel accepts connections, C{STOPPING=1}
when the drain begins; against a real UNIX datagram socket, as systemd
binds it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from curvetun.config import TunnelConfig
from curvetun.listeners import OpenConnections, TunnelListener
from curvetun.tunnel import EchoFactory
from curvetun.tunnel_service import (
    EX_UNAVAILABLE,
    Tunnels,
    TunnelService,
    load_identity,
    make_service,
)

from ._support import (
    SOURCE_ROOT,
    FakePort,
    NotifySocket,
    PendingServerEndpoint,
    listening_ports,
    make_keydir,
    parse_events,
    read_until,
    run_twist,
    start_twist,
    twist,
    twist_environ,
)

LOCALHOST = "interface=127.0.0.1"


class ReadinessCommandTests(TestCase):
    """
    C{twist curvetun} started with C{NOTIFY_SOCKET}, as C{Type=notify}
    units start it.
    """

    def setUp(self) -> None:
        self.home = os.path.abspath(self.mktemp())
        self.manager = NotifySocket(self)

    def test_ready_comes_once_every_port_accepts_and_stopping_on_sigterm(self) -> None:
        keydir, _ = make_keydir(self)
        process = start_twist(
            self,
            self.home,
            "--keydir", keydir,
            "--listen", f"curvetun:0:{LOCALHOST}",
            "--listen", f"tcp:0:{LOCALHOST}",
            NOTIFY_SOCKET=self.manager.path,
        )  # fmt: skip
        ready = self.manager.receive()
        assert ready is not None, "no READY=1"
        self.assertEqual(ready["READY"], "1")
        self.assertEqual(ready["MAINPID"], str(process.pid))
        # The status names every address listened on; each accepts as soon
        # as the manager is told.
        status = ready["STATUS"]
        self.assertTrue(status.startswith("1 tunnel listening on 127.0.0.1:"), status)
        ports = [int(a.rpartition(":")[2]) for a in status.split(" on ", 1)[1].split(", ")]
        self.assertEqual(len(ports), 2)
        for port in ports:
            socket.create_connection(("127.0.0.1", port), timeout=10).close()
        output = read_until(process, b"", "Listening on", count=2)
        self.assertEqual(listening_ports(output), ports)

        process.send_signal(signal.SIGTERM)
        stopping = self.manager.receive()
        self.assertEqual(stopping, {"STOPPING": "1", "STATUS": "draining connections"})
        stdout, stderr = process.communicate(timeout=30)
        self.assertEqual(process.returncode, -signal.SIGTERM, stderr)
        # Told once each: nothing more came.
        self.assertIsNone(self.manager.receive(timeout=0))
        formats = [e["log_format"] for e in parse_events(output + stdout)]
        self.assertIn("curvetun stopped", formats)

    def test_a_tunnel_that_cannot_listen_is_never_ready(self) -> None:
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        keydir, _ = make_keydir(self)
        result = self.run_with_manager(
            "--keydir",
            keydir,
            "--listen",
            f"tcp:0:{LOCALHOST}",
            "--listen",
            f"tcp:{port}:{LOCALHOST}",
        )
        self.assertEqual(result.returncode, EX_UNAVAILABLE, result.stderr)
        self.assertIsNone(self.manager.receive(timeout=0))

    def test_without_notify_socket_it_runs_as_before(self) -> None:
        # The environment of run_twist has no NOTIFY_SOCKET: a bad option
        # fails as it always did, and nothing reaches a manager.
        result = run_twist(self.home, "--grace", "-1")
        self.assertEqual(result.returncode, 64)
        self.assertIsNone(self.manager.receive(timeout=0))

    def run_with_manager(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            twist(*argv),
            cwd=SOURCE_ROOT,
            env=twist_environ(self.home, NOTIFY_SOCKET=self.manager.path),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


class ReadinessTests(TestCase):
    """
    L{Tunnels} tells the manager only once every listener listens, and
    that it stops before draining.
    """

    async def test_ready_waits_for_a_listen_still_under_way(self) -> None:
        manager = NotifySocket(self)
        keydir, _ = make_keydir(self)
        config = TunnelConfig(keydir=keydir, listen=("tcp:0", "pending:"))
        identity = load_identity(config, reactor)
        tunnel = TunnelService(config, identity.service, owns_identity=False)
        pending = PendingServerEndpoint()
        # One listens at once, one later.
        for endpoint in (TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), pending):
            connections = OpenConnections()
            tunnel.add_listener(
                TunnelListener(
                    endpoint, "x", EchoFactory(connections), connections, 0, Clock(), "echo"
                )
            )
        tunnels = Tunnels([identity], [tunnel], reactor, {"NOTIFY_SOCKET": manager.path})
        tunnels.startService()
        self.addCleanup(lambda: tunnels.stopService() if tunnels.running else None)
        self.assertIsNone(manager.receive(timeout=0.2))
        self.assertFalse(tunnels.ready.called)
        [(_, listening)] = pending.listens
        listening.callback(FakePort())
        await tunnels.ready
        ready = manager.receive(timeout=5)
        assert ready is not None
        self.assertEqual(ready["READY"], "1")
        self.assertTrue(ready["STATUS"].endswith(", 127.0.0.1:7700"), ready["STATUS"])

        await tunnels.stopService()
        self.assertEqual(
            manager.receive(timeout=5), {"STOPPING": "1", "STATUS": "draining connections"}
        )

    async def test_the_status_names_a_unix_socket_by_its_path(self) -> None:
        manager = NotifySocket(self)
        keydir, _ = make_keydir(self)
        path = os.path.join(os.path.dirname(manager.path), "tunnel.sock")
        config = TunnelConfig(keydir=keydir, listen=(f"tcp:0:{LOCALHOST}", f"unix:{path}"))
        tunnels = make_service([config], reactor, {"NOTIFY_SOCKET": manager.path})
        tunnels.startService()
        self.addCleanup(tunnels.stopService)
        await tunnels.ready
        ready = manager.receive(timeout=5)
        assert ready is not None
        self.assertRegex(
            ready["STATUS"], rf"^1 tunnel listening on 127\.0\.0\.1:\d+, {re.escape(path)}$"
        )
