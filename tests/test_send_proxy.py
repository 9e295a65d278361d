"""
C{--send-proxy v1|v2}: every backend connection of a forwarding tunnel
starts with a PROXY protocol header giving the client's address, and
(version 2, behind a curvetun listen endpoint) the client's authenticated
public key in TLV C{0xE0}; read by Twisted's own C{haproxy:} endpoint, and
by a raw TCP backend with L{curvetun.proxy_header.client_key}.
"""

from __future__ import annotations

import os
import struct

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, connectProtocol, serverFromString
from twisted.internet.interfaces import IAddress, IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from curvetun.keys import format_public_key
from curvetun.proxy_header import V2_SIGNATURE, client_key

from ._support import (
    Collector,
    admit,
    listening_ports,
    make_keydir,
    read_until,
    round_trip,
    start_twist,
)
from ._tap_support import parse, port_of, start_tunnel

LOCALHOST = "interface=127.0.0.1"


class AddressRecorder(Protocol):
    """
    A backend that echoes, and records the addresses its transport gives
    once it has data (Twisted's C{haproxy:} endpoint starts the protocol
    before it has read the header: until then the addresses are those of
    the TCP connection).
    """

    factory: AddressRecorderFactory

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        if not self.factory.seen:
            self.factory.seen.append((self.transport.getPeer(), self.transport.getHost()))
        self.transport.write(data)


class AddressRecorderFactory(Factory[Protocol]):
    protocol = AddressRecorder

    def __init__(self) -> None:
        self.seen: list[tuple[IAddress, IAddress]] = []


class Capture(Protocol):
    """
    A raw TCP backend: keeps the first bytes of its one connection and
    fires C{factory.received} once it has C{factory.expected} of them.
    """

    factory: CaptureFactory

    def dataReceived(self, data: bytes) -> None:
        self.factory.data += data
        if len(self.factory.data) >= self.factory.expected and not self.factory.received.called:
            self.factory.received.callback(self.factory.data)


class CaptureFactory(Factory[Protocol]):
    protocol = Capture

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.data = b""
        self.received: Deferred[bytes] = Deferred()


def split_v2(data: bytes) -> tuple[bytes, bytes]:
    """
    A PROXY v2 header and what follows it.
    """
    assert data.startswith(V2_SIGNATURE), data[:16]
    (length,) = struct.unpack("!H", data[14:16])
    return data[: 16 + length], data[16 + length :]


async def listen(testcase: TestCase, description: str, factory: Factory[Protocol]) -> int:
    port: IListeningPort = await serverFromString(reactor, description).listen(factory)
    testcase.addCleanup(port.stopListening)
    return port.getHost().port  # type: ignore[attr-defined, no-any-return]


def host_and_port(value: IAddress) -> tuple[str, int]:
    assert isinstance(value, IPv4Address), value
    return value.host, value.port


class SendProxyCommandTests(TestCase):
    """
    C{twist curvetun --listen curvetun:... --forward tcp:... --send-proxy
    v2} as a process, with a real curvetun client.
    """

    def setUp(self) -> None:
        self.home = os.path.abspath(self.mktemp())
        self.server_keydir, self.server_key = make_keydir(self)
        self.client_keydir, self.client_key = make_keydir(self)
        admit(self.server_keydir, self.client_key)

    async def tunnel_to(self, backend: int) -> int:
        """
        Start the tunnel process in front of C{backend}; its port.
        """
        process = start_twist(
            self,
            self.home,
            "--keydir", self.server_keydir,
            "--listen", f"curvetun:0:{LOCALHOST}",
            "--forward", f"tcp:127.0.0.1:{backend}",
            "--send-proxy", "v2",
        )  # fmt: skip
        [port] = listening_ports(read_until(process, b"", "Listening on"))
        return port

    async def connect(self, port: int) -> Collector:
        collector = Collector()
        endpoint = (
            f"curvetun:127.0.0.1:{port}:key={format_public_key(self.server_key)}"
            f":keydir={self.client_keydir}"
        )
        await connectProtocol(clientFromString(reactor, endpoint), collector)
        self.addCleanup(self.close, collector)
        return collector

    @staticmethod
    async def close(collector: Collector) -> None:
        if collector.transport is not None and collector.reason is None:
            collector.transport.loseConnection()
            await collector.lost

    async def test_a_haproxy_backend_sees_the_clients_address_as_its_peer(self) -> None:
        recorder = AddressRecorderFactory()
        backend = await listen(self, f"haproxy:tcp:0:{LOCALHOST}", recorder)
        port = await self.tunnel_to(backend)
        client = await self.connect(port)
        self.assertEqual(await round_trip(client, b"who am I?"), b"who am I?")
        assert client.transport is not None
        [(peer, host)] = recorder.seen
        # The client's own end of its TCP connection to the tunnel, and
        # the tunnel's end of it: not the tunnel's connection to the backend.
        self.assertEqual(host_and_port(peer), host_and_port(client.transport.getHost()))
        self.assertEqual(host_and_port(host), ("127.0.0.1", port))

    async def test_a_raw_backend_reads_the_clients_key_from_the_header(self) -> None:
        # 16 bytes of head, 12 of IPv4 addresses and ports, 3 + 32 of TLV.
        capture = CaptureFactory(expected=63 + len(b"first bytes"))
        backend = await listen(self, f"tcp:0:{LOCALHOST}", capture)
        port = await self.tunnel_to(backend)
        client = await self.connect(port)
        assert client.transport is not None
        client.transport.write(b"first bytes")
        header, rest = split_v2(await capture.received)
        self.assertEqual(client_key(header), self.client_key)
        # The header comes first, then the client's bytes, unchanged.
        self.assertEqual(rest, b"first bytes")


class SendProxyTunnelTests(TestCase):
    """
    The header from a tunnel whose listen side is plain TCP (no key is
    known), version 1, and no header without the option.
    """

    def setUp(self) -> None:
        self.keydir, _ = make_keydir(self)

    async def plain_client(self, tunnel_port: int, data: bytes) -> Collector:
        collector = Collector()
        await connectProtocol(clientFromString(reactor, f"tcp:127.0.0.1:{tunnel_port}"), collector)
        assert collector.transport is not None
        collector.transport.write(data)
        self.addCleanup(collector.transport.loseConnection)
        return collector

    def tunnel(self, backend: int, *argv: str) -> int:
        tunnel = start_tunnel(
            self,
            "--keydir", self.keydir,
            "--listen", f"tcp:0:{LOCALHOST}",
            "--forward", f"tcp:127.0.0.1:{backend}",
            *argv,
        )  # fmt: skip
        return port_of(tunnel)

    async def test_v1_gives_a_haproxy_backend_the_clients_address(self) -> None:
        recorder = AddressRecorderFactory()
        backend = await listen(self, f"haproxy:tcp:0:{LOCALHOST}", recorder)
        port = self.tunnel(backend, "--send-proxy", "v1")
        client = await self.plain_client(port, b"")
        self.assertEqual(await round_trip(client, b"v1"), b"v1")
        assert client.transport is not None
        [(peer, host)] = recorder.seen
        self.assertEqual(host_and_port(peer), host_and_port(client.transport.getHost()))
        self.assertEqual(host_and_port(host), ("127.0.0.1", port))

    async def test_v1_is_one_text_line_before_the_clients_bytes(self) -> None:
        # The header's length depends on the ports: known once connected,
        # before the client's bytes can have arrived (the header may come
        # first, in a read of its own).
        capture = CaptureFactory(expected=2**32)
        backend = await listen(self, f"tcp:0:{LOCALHOST}", capture)
        port = self.tunnel(backend, "--send-proxy", "v1")
        client = await self.plain_client(port, b"data")
        assert client.transport is not None
        client_port = host_and_port(client.transport.getHost())[1]
        expected = f"PROXY TCP4 127.0.0.1 127.0.0.1 {client_port} {port}\r\ndata".encode()
        capture.expected = len(expected)
        self.assertEqual(await capture.received, expected)

    async def test_v2_behind_a_plain_tcp_listener_carries_no_key(self) -> None:
        capture = CaptureFactory(expected=28 + 4)
        backend = await listen(self, f"tcp:0:{LOCALHOST}", capture)
        port = self.tunnel(backend, "--send-proxy", "v2")
        await self.plain_client(port, b"data")
        header, rest = split_v2(await capture.received)
        self.assertIsNone(client_key(header))
        self.assertEqual(len(header), 16 + 12)
        self.assertEqual(rest, b"data")

    async def test_without_the_option_the_backend_gets_only_the_clients_bytes(self) -> None:
        capture = CaptureFactory(expected=4)
        backend = await listen(self, f"tcp:0:{LOCALHOST}", capture)
        port = self.tunnel(backend)
        await self.plain_client(port, b"data")
        self.assertEqual(await capture.received, b"data")


class SendProxyOptionTests(SynchronousTestCase):
    def test_v1_and_v2_are_taken(self) -> None:
        for version in ("v1", "v2"):
            [config] = parse("--forward", "tcp:127.0.0.1:1", "--send-proxy", version).tunnels
            self.assertEqual(config.send_proxy, version)
        [config] = parse("--forward", "tcp:127.0.0.1:1").tunnels
        self.assertIsNone(config.send_proxy)

    def test_another_version_is_refused(self) -> None:
        error = self.assertRaises(
            usage.UsageError, parse, "--forward", "tcp:127.0.0.1:1", "--send-proxy", "2"
        )
        self.assertEqual(str(error), "--send-proxy must be v1 or v2, not '2'")

    def test_an_echo_has_no_backend_to_send_a_header_to(self) -> None:
        error = self.assertRaises(usage.UsageError, parse, "--send-proxy", "v2")
        self.assertEqual(
            str(error),
            "--send-proxy needs --forward: an echo has no backend to send the header to",
        )
