"""
C{curvetun:endpoint=...}: curvetun over any stream endpoint, from strings
and from Python. UNIX sockets, systemd's inherited sockets and HAProxy's
PROXY protocol, each over a real socket with a real handshake.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    AdoptedStreamServerEndpoint,
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    UNIXClientEndpoint,
    UNIXServerEndpoint,
    _parse,
    clientFromString,
    serverFromString,
)
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocol,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.protocols.haproxy import proxyEndpoint
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from curvetun.admission import ConnectionLimits
from curvetun.channel import MessageChannel, connect, listen
from curvetun.endpoints import (
    CurveTunClientEndpoint,
    CurveTunServerEndpoint,
    client_from_string,
    split_description,
)
from curvetun.errors import NotAuthorized, ServerKeyMismatch
from curvetun.keys import format_public_key
from curvetun.service import CurveTunService
from curvetun.vault import MemoryVault

from ._support import (
    PROXY_V2_LOCAL,
    AllowList,
    HeaderFirstEndpoint,
    KeyDirs,
    RecordingFactory,
    capture_log,
    log_formats,
    proxy_v1_header,
    proxy_v2_header,
    short_socket_dir,
)

ROOT = Path(__file__).resolve().parent.parent
_DONE = Failure(ConnectionDone())
USAGE = (ROOT / "docs" / "usage.md").read_text()


def examples(kind: str) -> list[str]:
    """
    The lines of docs/usage.md's fenced blocks marked C{kind}.
    """
    blocks = re.findall(rf"```{re.escape(kind)}\n(.*?)```", USAGE, re.DOTALL)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


class GrammarTests(SynchronousTestCase):
    """
    The inner string is escaped as in Twisted's C{tls:} parser, and
    L{split_description} reads strings as Twisted does.
    """

    def test_split_description_agrees_with_twisted(self) -> None:
        # A guard over a Twisted internal: if _parse changes, this fails.
        for description in (
            "tcp:example.com:80",
            "tcp:host=h:port=1:bindAddress=10.0.0.1",
            "curvetun:endpoint=unix\\:path\\=/run/ct.sock:key=K",
            "curvetun:endpoint=systemd\\:domain\\=INET\\:index\\=0",
            "curvetun:\\:\\:1:7700",
            "a:b=c=d:e",
            "x::y",
            "",
        ):
            self.assertEqual(split_description(description), _parse(description), description)

    def test_a_trailing_backslash_is_a_value_error(self) -> None:
        self.assertRaises(ValueError, split_description, "tcp:80\\")

    def test_the_escaped_ipv6_form_the_error_shows_parses(self) -> None:
        dirs = KeyDirs(self)
        key = format_public_key(dirs.server_key)
        error = self.assertRaises(
            ValueError, clientFromString, reactor, f"curvetun:[::1]:7700:keydir={dirs.client}"
        )
        [shown] = re.findall(r"as in (\S+)", str(error))
        endpoint = clientFromString(reactor, f"{shown}:key={key}:keydir={dirs.client}")
        self.assertEqual(endpoint._wrapped._host, "::1")
        self.assertEqual(endpoint._wrapped._port, 7700)


class ServerWrappingTests(SynchronousTestCase):
    """
    C{curvetun:endpoint=INNER} listens on the endpoint INNER describes.
    """

    def setUp(self) -> None:
        self.dirs = KeyDirs(self)

    def parse(self, description: str) -> Any:
        return serverFromString(reactor, f"{description}:keydir={self.dirs.server}")

    def test_a_unix_inner_endpoint(self) -> None:
        endpoint = self.parse("curvetun:endpoint=unix\\:/run/ct.sock\\:mode\\=660")
        self.assertIsInstance(endpoint, CurveTunServerEndpoint)
        self.assertIsInstance(endpoint._wrapped, UNIXServerEndpoint)
        self.assertEqual(endpoint._wrapped._address, "/run/ct.sock")
        self.assertEqual(endpoint._wrapped._mode, 0o660)
        self.assertFalse(endpoint._proxied)

    def test_a_systemd_inner_endpoint_adopts_the_inherited_socket(self) -> None:
        # In-process, systemd's parser reads its descriptors from a
        # ListenFDs made at import: give it one.
        from twisted.internet.endpoints import _SystemdParser
        from twisted.python.systemd import ListenFDs

        self.patch(_SystemdParser, "_sddaemon", ListenFDs([3]))
        endpoint = self.parse("curvetun:endpoint=systemd\\:domain\\=INET\\:index\\=0")
        self.assertIsInstance(endpoint._wrapped, AdoptedStreamServerEndpoint)
        self.assertEqual(endpoint._wrapped.fileno, 3)

    def test_a_haproxy_inner_endpoint_is_proxied(self) -> None:
        endpoint = self.parse("curvetun:endpoint=haproxy\\:tcp\\:7700")
        self.assertTrue(endpoint._proxied)

    def test_the_guides_server_examples_parse(self) -> None:
        from twisted.internet.endpoints import _SystemdParser
        from twisted.python.systemd import ListenFDs

        self.patch(_SystemdParser, "_sddaemon", ListenFDs([3]))
        lines = examples("endpoint-server")
        kinds = {split_description(split_description(line)[1]["endpoint"])[0][0] for line in lines}
        self.assertEqual(kinds, {"tcp", "unix", "systemd", "haproxy"})
        for line in lines:
            line = line.replace("/etc/curvetun", self.dirs.server)
            self.assertIsInstance(serverFromString(reactor, line), CurveTunServerEndpoint)


class ReadmeExampleTests(SynchronousTestCase):
    def test_the_readmes_endpoint_examples_parse(self) -> None:
        from twisted.internet.endpoints import _SystemdParser
        from twisted.python.systemd import ListenFDs

        self.patch(_SystemdParser, "_sddaemon", ListenFDs([3]))
        dirs = KeyDirs(self)
        readme = (ROOT / "README.md").read_text()
        [block] = re.findall(r"```\n(curvetun:endpoint=.*?)```", readme, re.DOTALL)
        lines = [line.split()[0] for line in block.splitlines()]
        self.assertEqual(len(lines), 4)
        for line in lines:
            if "key=" in line:
                line = line.replace("KEY", format_public_key(dirs.server_key))
                endpoint = clientFromString(reactor, f"{line}:keydir={dirs.client}")
                self.assertIsInstance(endpoint, CurveTunClientEndpoint)
            else:
                endpoint = serverFromString(reactor, f"{line}:keydir={dirs.server}")
                self.assertIsInstance(endpoint, CurveTunServerEndpoint)


class ClientWrappingTests(SynchronousTestCase):
    """
    C{curvetun:endpoint=INNER} connects through the endpoint INNER
    describes; without C{key=} a C{tcp:} inner endpoint's host names the
    server in the registry.
    """

    def setUp(self) -> None:
        self.dirs = KeyDirs(self)
        self.key = format_public_key(self.dirs.server_key)

    def parse(self, description: str) -> Any:
        return clientFromString(reactor, f"{description}:keydir={self.dirs.client}")

    def test_a_unix_inner_endpoint_with_a_key(self) -> None:
        endpoint = self.parse(f"curvetun:endpoint=unix\\:path\\=/run/ct.sock:key={self.key}")
        self.assertIsInstance(endpoint, CurveTunClientEndpoint)
        self.assertIsInstance(endpoint._wrapped, UNIXClientEndpoint)
        self.assertEqual(endpoint._wrapped._path, "/run/ct.sock")
        self.assertEqual(endpoint._server_key, self.dirs.server_key)

    def test_a_tcp_inner_endpoint_with_a_bind_address(self) -> None:
        endpoint = self.parse(
            f"curvetun:endpoint=tcp\\:example.com\\:7700\\:bindAddress\\=127.0.0.2:key={self.key}"
        )
        wrapped = endpoint._wrapped
        self.assertIsInstance(wrapped, TCP4ClientEndpoint)
        self.assertEqual((wrapped._host, wrapped._port), ("example.com", 7700))
        self.assertEqual(wrapped._bindAddress, ("127.0.0.2", 0))

    def test_a_tcp_inner_endpoints_host_finds_the_server_key(self) -> None:
        for inner in ("tcp\\:127.0.0.1\\:7700", "tcp\\:host\\=127.0.0.1\\:port\\=7700"):
            endpoint = self.parse(f"curvetun:endpoint={inner}")
            self.assertEqual(endpoint._server_key, self.dirs.server_key, inner)

    def test_timeout_is_the_handshake_timeout(self) -> None:
        endpoint = self.parse("curvetun:endpoint=tcp\\:127.0.0.1\\:7700:timeout=2.5")
        self.assertEqual(endpoint._handshake_timeout, 2.5)

    def test_the_guides_client_examples_parse(self) -> None:
        lines = examples("endpoint-client")
        kinds = {
            split_description(split_description(line)[1]["endpoint"])[0][0]
            for line in lines
            if "endpoint=" in line
        }
        self.assertEqual(kinds, {"tcp", "unix"})
        for line in lines:
            line = line.replace("KEY", self.key).replace("~/.curvetun", self.dirs.client)
            if "registry=dns" in line:
                continue  # looked up at connect: see test_dns
            self.assertIsInstance(clientFromString(reactor, line), CurveTunClientEndpoint)


class ClientFromStringTests(SynchronousTestCase):
    """
    L{client_from_string}: C{clientFromString} with a default key directory.
    """

    def setUp(self) -> None:
        self.dirs = KeyDirs(self)

    def test_a_string_without_keydir_uses_the_given_one(self) -> None:
        endpoint = client_from_string(reactor, "curvetun:127.0.0.1:7700", keydir=self.dirs.client)
        assert isinstance(endpoint, CurveTunClientEndpoint)
        self.assertEqual(endpoint._service.vault.public_key, self.dirs.client_key)
        self.assertEqual(endpoint._server_key, self.dirs.server_key)

    def test_a_keydir_that_agrees_is_accepted(self) -> None:
        endpoint = client_from_string(
            reactor,
            f"CURVETUN:127.0.0.1:7700:keydir={self.dirs.client}/.",
            keydir=self.dirs.client,
        )
        assert isinstance(endpoint, CurveTunClientEndpoint)
        self.assertEqual(endpoint._service.vault.public_key, self.dirs.client_key)

    def test_a_keydir_that_disagrees_is_a_value_error(self) -> None:
        error = self.assertRaises(
            ValueError,
            client_from_string,
            reactor,
            f"curvetun:127.0.0.1:7700:keydir={self.dirs.server}",
            keydir=self.dirs.client,
        )
        self.assertIn("disagrees with the key directory", str(error))

    def test_other_strings_are_clientFromStrings(self) -> None:
        endpoint = client_from_string(reactor, "tcp:127.0.0.1:7700", keydir=self.dirs.client)
        self.assertIsInstance(endpoint, TCP4ClientEndpoint)

    def test_the_default_cannot_be_set_from_the_string(self) -> None:
        error = self.assertRaises(
            ValueError,
            client_from_string,
            reactor,
            "curvetun:127.0.0.1:7700:default_keydir=/tmp",
            keydir=self.dirs.client,
        )
        self.assertIn("unknown keyword 'default_keydir'", str(error))


async def exchange(client: MessageChannel, accepted: Deferred[MessageChannel]) -> bytes:
    """
    Send a message from C{client} and return what the server side got.
    """
    server_side = await accepted
    await client.send(b"ping")
    return await server_side.recv()


class UNIXSocketTests(TestCase):
    """
    A peer on a UNIX socket has no IP address: only C{*} registry entries
    admit it.
    """

    async def connect_over_unix(self, dirs: KeyDirs) -> tuple[MessageChannel, Any]:
        path = os.path.join(short_socket_dir(self), "ct.sock")
        listener = await listen(
            serverFromString(reactor, f"curvetun:endpoint=unix\\:{path}:keydir={dirs.server}")
        )
        self.addCleanup(listener.close)
        key = format_public_key(dirs.server_key)
        client = await connect(
            clientFromString(
                reactor,
                f"curvetun:endpoint=unix\\:path\\={path}:key={key}:keydir={dirs.client}",
            )
        )
        self.addCleanup(client.close)
        return client, listener

    async def test_a_star_entry_admits_a_unix_peer(self) -> None:
        dirs = KeyDirs(self, admit_from="*")
        client, listener = await self.connect_over_unix(dirs)
        self.assertEqual(await exchange(client, listener.accept()), b"ping")

    async def test_an_ip_entry_does_not_admit_a_unix_peer(self) -> None:
        dirs = KeyDirs(self, admit_from="127.0.0.1")
        dirs.admit("0.0.0.0/0")
        dirs.admit("::/0")
        client, _ = await self.connect_over_unix(dirs)
        with self.assertRaises(NotAuthorized):
            await client.recv()


class HAProxyTests(TestCase):
    """
    Behind C{haproxy:}, the registry and the per-address limits use the
    client address the PROXY header gives, not the proxy's.
    """

    async def serve(self, dirs: KeyDirs) -> int:
        listener = await listen(
            serverFromString(
                reactor,
                f"curvetun:endpoint=haproxy\\:tcp\\:0\\:interface\\=127.0.0.1:keydir={dirs.server}",
            )
        )
        self.addCleanup(listener.close)
        self.listener = listener
        assert listener.port is not None
        port: int = listener.port.getHost().port  # type: ignore[attr-defined]
        return port

    def client(self, dirs: KeyDirs, port: int, header: bytes) -> CurveTunClientEndpoint:
        """
        A client built from Python (it must write the PROXY header first,
        as a load balancer would), with the client identity of C{dirs}.
        """
        return CurveTunClientEndpoint(
            HeaderFirstEndpoint(TCP4ClientEndpoint(reactor, "127.0.0.1", port), header),
            self.client_service,
            dirs.server_key,
        )

    def keydirs(self, admit_from: str) -> KeyDirs:
        dirs = KeyDirs(self, admit_from=admit_from)
        self.client_service = CurveTunService.from_keydir(dirs.client)
        self.addCleanup(self.client_service.vault.close)  # type: ignore[attr-defined]
        return dirs

    async def test_the_header_address_is_admitted_v1(self) -> None:
        dirs = self.keydirs("10.1.2.3")
        port = await self.serve(dirs)
        client = await connect(self.client(dirs, port, proxy_v1_header("10.1.2.3")))
        self.addCleanup(client.close)
        self.assertEqual(await exchange(client, self.listener.accept()), b"ping")

    async def test_the_header_address_is_admitted_v2(self) -> None:
        dirs = self.keydirs("10.1.2.3")
        port = await self.serve(dirs)
        client = await connect(self.client(dirs, port, proxy_v2_header("10.1.2.3")))
        self.addCleanup(client.close)
        self.assertEqual(await exchange(client, self.listener.accept()), b"ping")

    async def test_another_header_address_is_refused(self) -> None:
        # 127.0.0.1 (the proxy's address) is admitted too: only the header's
        # address may decide.
        dirs = self.keydirs("10.1.2.3")
        dirs.admit("127.0.0.1")
        port = await self.serve(dirs)
        for header in (proxy_v1_header("10.9.9.9"), proxy_v2_header("10.9.9.9")):
            client = await connect(self.client(dirs, port, header))
            with self.assertRaises(NotAuthorized):
                await client.recv()

    async def test_per_address_limits_count_the_header_address(self) -> None:
        dirs = self.keydirs("10.0.0.0/8")
        server = CurveTunService.from_keydir(
            dirs.server, limits=ConnectionLimits(connections_per_address=1)
        )
        server.startService()
        self.addCleanup(server.stopService)
        self.addCleanup(server.vault.close)  # type: ignore[attr-defined]
        listener = await listen(
            CurveTunServerEndpoint(
                proxyEndpoint(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")),
                server,
                proxied=True,
            )
        )
        self.addCleanup(listener.close)
        assert listener.port is not None
        port = listener.port.getHost().port  # type: ignore[attr-defined]
        first = await connect(self.client(dirs, port, proxy_v1_header("10.1.2.3")))
        self.addCleanup(first.close)
        self.assertEqual(await exchange(first, listener.accept()), b"ping")
        # A second from 10.1.2.3 is over the limit of one; the proxy's
        # own address, shared by all, is not what is counted.
        with self.assertRaises(ServerKeyMismatch):
            await connect(self.client(dirs, port, proxy_v2_header("10.1.2.3")))
        other = await connect(self.client(dirs, port, proxy_v2_header("10.1.2.4")))
        self.addCleanup(other.close)
        self.assertEqual(await exchange(other, listener.accept()), b"ping")

    async def test_a_connection_silent_after_its_header_is_closed_in_time(self) -> None:
        dirs = self.keydirs("10.1.2.3")
        server = CurveTunService.from_keydir(dirs.server, handshake_timeout=0.2)
        server.startService()
        self.addCleanup(server.stopService)
        self.addCleanup(server.vault.close)  # type: ignore[attr-defined]
        listener = await listen(
            CurveTunServerEndpoint(
                proxyEndpoint(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")),
                server,
                proxied=True,
            )
        )
        self.addCleanup(listener.close)
        assert listener.port is not None
        port = listener.port.getHost().port  # type: ignore[attr-defined]
        for header in (b"", proxy_v1_header("10.1.2.3")):
            silent = _Silent(header)
            started = reactor.seconds()
            await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(_Once(silent))
            await silent.lost  # closed by the server
            self.assertLess(reactor.seconds() - started, 5)

    async def test_a_local_health_check_is_not_a_failed_handshake(self) -> None:
        dirs = self.keydirs("10.1.2.3")
        port = await self.serve(dirs)
        events = capture_log(self)
        for header in (PROXY_V2_LOCAL, b"PROXY UNKNOWN\r\n"):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as probe:
                probe.sendall(header)
            await deferLater(reactor, 0.05, lambda: None)
        # A real handshake afterwards is still logged when it fails.
        client = await connect(self.client(dirs, port, proxy_v1_header("10.9.9.9")))
        with self.assertRaises(NotAuthorized):
            await client.recv()

        def failed() -> list[str]:
            return [f for f in log_formats(events) if "handshake with {peer} failed" in f]

        # The server logs when it sees the close; the probes closed long
        # before (this handshake took several round trips).
        for _ in range(100):
            if failed():
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(len(failed()), 1, log_formats(events))


class _Silent(Protocol):
    """
    Sends C{header}, then nothing; C{lost} fires when the connection ends.
    """

    def __init__(self, header: bytes = b"") -> None:
        self.header = header
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.header)

    def connectionLost(self, reason: Failure = _DONE) -> None:
        self.lost.callback(None)


class _Once(Factory):
    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self._protocol


class SystemdSocketTests(SynchronousTestCase):
    """
    C{twist curvetun --listen curvetun:endpoint=systemd...} serves on a
    listening socket inherited as systemd passes it: fd 3, C{LISTEN_FDS=1},
    C{LISTEN_FDNAMES} its name, C{LISTEN_PID} its own pid.
    """

    def test_twist_curvetun_serves_on_an_inherited_socket(self) -> None:
        dirs = KeyDirs(self)
        inherited = socket.socket()
        self.addCleanup(inherited.close)
        inherited.bind(("127.0.0.1", 0))
        inherited.listen(8)
        port = inherited.getsockname()[1]
        backend = socket.socket()
        self.addCleanup(backend.close)
        backend.bind(("127.0.0.1", 0))
        backend.listen(1)
        backend.settimeout(30)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "LISTEN_FDS": "1",
            "LISTEN_FDNAMES": "curvetun",
        }
        env.pop("LISTEN_PID", None)
        # The shell puts the socket at fd 3 and sets LISTEN_PID to its pid,
        # which exec gives to twist.
        script = f'export LISTEN_PID=$$; exec "$@" 3<&{inherited.fileno()}'
        twist = [sys.executable, "-m", "twisted", "--log-format", "json", "curvetun"]
        process = subprocess.Popen(
            ["/bin/sh", "-c", script, "sh", *twist,
             "--keydir", dirs.server,
             "--listen", "curvetun:endpoint=systemd\\:domain\\=INET\\:index\\=0",
             "--forward", f"tcp:127.0.0.1:{backend.getsockname()[1]}"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(inherited.fileno(),),
        )  # fmt: skip

        def kill() -> None:
            if process.poll() is None:
                process.kill()

        self.addCleanup(kill)
        inherited.close()  # the child holds it now
        output = b""
        while b"Listening on" not in output:
            line = process.stdout.readline()  # type: ignore[union-attr]
            if not line:
                self.fail(process.stderr.read().decode())  # type: ignore[union-attr]
            output += line
        self.assertIn("systemd", json.loads(output.split(b"\x1e")[-1])["endpoint"])

        # A curvetun client (another process: this test blocks on the
        # backend socket) reaches the backend through the adopted socket.
        result = subprocess.run(
            [sys.executable, "-c", _CLIENT, dirs.client, str(port)],
            check=False,
            cwd=ROOT,
            env={k: v for k, v in env.items() if not k.startswith("LISTEN_")},
            capture_output=True,
            timeout=60,
        )
        connection, _ = backend.accept()
        self.addCleanup(connection.close)
        connection.settimeout(30)
        self.assertEqual(connection.recv(100), b"through systemd", result.stderr)
        process.terminate()
        process.communicate(timeout=30)


_CLIENT = """
import sys
from twisted.internet import reactor, task
from twisted.internet.endpoints import clientFromString
from curvetun.channel import connect

async def main(reactor):
    channel = await connect(clientFromString(
        reactor, f"curvetun:127.0.0.1:{sys.argv[2]}:keydir={sys.argv[1]}"))
    await channel.send(b"through systemd")
    await task.deferLater(reactor, 0.5, lambda: None)
    await channel.close()

from twisted.internet.defer import Deferred
task.react(lambda r: Deferred.fromCoroutine(main(r)))
"""


@implementer(IStreamServerEndpoint)
class _RecordingServerEndpoint:
    """
    A server endpoint that only records the factory it is asked to listen
    with.
    """

    factory: IProtocolFactory | None = None

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        self.factory = protocolFactory
        return Deferred()


class AfterHeaderTests(SynchronousTestCase):
    """
    With C{proxied=True}, each curvetun connection is built at its first
    bytes after the PROXY header, with the address the header gave.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = AllowList()
        service = CurveTunService(
            MemoryVault.generate(),
            self.registry,
            clock=self.clock,
            handshake_timeout=5,
            limits=ConnectionLimits(connections_per_address=1),
        )
        wrapped = _RecordingServerEndpoint()
        CurveTunServerEndpoint(wrapped, service, proxied=True).listen(RecordingFactory())
        assert wrapped.factory is not None
        self.factory = wrapped.factory
        self.timers_at_start = len(self.clock.getDelayedCalls())

    def accept(self, peer: str) -> tuple[IProtocol, StringTransport]:
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        assert protocol is not None
        # The transport answers getPeer() as a PROXY wrapper does once its
        # header is read.
        transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 40000))
        protocol.makeConnection(transport)
        return protocol, transport

    def test_nothing_is_built_or_counted_before_the_first_bytes(self) -> None:
        self.accept("10.1.2.3")
        _, transport = self.accept("10.1.2.3")
        # One connection per address, but neither has begun: both stand,
        # and no handshake timer runs but the header's.
        self.assertFalse(transport.disconnecting)
        self.assertEqual(len(self.clock.getDelayedCalls()), 2 + self.timers_at_start)

    def test_connections_are_counted_by_the_headers_address(self) -> None:
        # Every connection comes from the proxy, 127.0.0.1: were that
        # counted, the second would be over the limit of one.
        first, _ = self.accept("10.1.2.3")
        first.dataReceived(b"\x00")
        second, transport = self.accept("10.1.2.4")
        second.dataReceived(b"\x00")
        self.assertFalse(transport.disconnecting)

    def test_a_refused_connection_is_closed(self) -> None:
        first, _ = self.accept("10.1.2.3")
        first.dataReceived(b"\x00")
        second, transport = self.accept("10.1.2.3")
        second.dataReceived(b"\x00")
        self.assertTrue(transport.disconnecting)

    def test_a_silent_connection_is_closed_after_the_handshake_timeout(self) -> None:
        _, transport = self.accept("10.1.2.3")
        self.clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
