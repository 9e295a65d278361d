"""
Shared test fixtures: in-memory identities, a fake registry, a recording
application protocol, and in-memory connections (iosim); key directories
on disk, log capture and a collecting client for real connections.
Shared test fixtures: the wire's framing, in-memory identities, a fake
registry, a recording application protocol, in-memory connections (iosim),
and a curvetun server and client on the loopback interface.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

from twisted.internet import reactor, tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    clientFromString,
    connectProtocol,
)
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.protocols.policies import (
    ProtocolWrapper,
    WrappingFactory,
)
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.test.iosim import FakeTransport, IOPump, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from curvetun.channel import MessageChannel, MessageListener, connect, listen
from curvetun.cookies import CookieKeys
from curvetun.endpoints import CurveTunClientEndpoint, CurveTunServerEndpoint, service_pool
from curvetun.interfaces import ICurveTunTransport, IRegistry
from curvetun.keys import format_public_key, keys_equal
from curvetun.registry import FileRegistry
from curvetun.service import CurveTunService
from curvetun.transport import CurveTunProtocol
from curvetun.vault import FileVault, MemoryVault

SERVER_ADDRESS = IPv4Address("TCP", "127.0.0.1", 7700)
CLIENT_ADDRESS = IPv4Address("TCP", "127.0.0.1", 40000)


def tcp_port(port: IListeningPort) -> int:
    """
    The TCP port number C{port} listens on (C{getHost()} is only typed as
    an L{IAddress}, which has no port).
    """
    address = port.getHost()
    assert isinstance(address, IPv4Address | IPv6Address), address
    return address.port


def built(protocol: CurveTunProtocol | None) -> CurveTunProtocol:
    """
    The protocol a curvetun factory built, failing the test if it refused.
    """
    assert protocol is not None, "the factory refused the connection"
    return protocol


@implementer(ICurveTunTransport)
class MessageRecordingTransport(StringTransport):
    """
    A curvetun transport in memory: keeps what is written, and records each
    C{write} and C{write_message} call, apart, by its size.

    @ivar calls: (C{"write"} or C{"write_message"}, size), in order.
    """

    peer_public_key = b"k" * 32
    bytes_received = 0
    bytes_sent = 0
    established_at: float | None = 0.0
    last_received_at: float | None = None
    last_sent_at: float | None = None

    def __init__(self, peer: IPv4Address = IPv4Address("TCP", "10.0.0.1", 40000)) -> None:
        super().__init__(peerAddress=peer)
        self.calls: list[tuple[str, int]] = []

    @property
    def carried(self) -> int:
        """
        How many bytes were written in all.
        """
        return len(self.value())

    def write(self, data: bytes) -> None:
        self.calls.append(("write", len(data)))
        super().write(data)

    def write_message(self, data: bytes) -> None:
        self.calls.append(("write_message", len(data)))
        super().write(data)


class RecordingSocket(socket.socket):
    """
    A real socket that records what each of its sends (each system call)
    handed to the kernel.

    @ivar sends: the bytes each C{send} or C{sendmsg} took, in order.
    @ivar sendmsg_calls: how many of them were vectored.
    """

    def __init__(self, fileno: int) -> None:
        super().__init__(fileno=fileno)
        self.sends: list[bytes] = []
        self.sendmsg_calls = 0

    def send(self, data: Any, flags: int = 0) -> int:
        sent = super().send(data, flags)
        self.sends.append(bytes(data[:sent]))
        return sent

    def sendmsg(self, buffers: Any, *args: Any) -> int:
        sent = super().sendmsg(buffers, *args)
        self.sendmsg_calls += 1
        self.sends.append(b"".join(bytes(buffer) for buffer in buffers)[:sent])
        return sent


class SocketDescriptor(tcp.Connection):
    """
    Twisted's own TCP transport (L{tcp.Connection}: its write buffering and
    its sends) over one end of a real TCP connection on the loopback, with
    a L{MemoryReactor}, whose C{writers} say whether the transport waits for
    the reactor to send the rest; the other end is L{peer}. Nothing reads
    for it: a test drives it by hand.

    @ivar peer: the other end of the connection, a blocking socket.
    """

    def __init__(self) -> None:
        self.memory_reactor = MemoryReactor()
        with socket.create_server(("127.0.0.1", 0)) as server:
            self.peer = socket.create_connection(server.getsockname()[:2])
            accepted, _ = server.accept()
        # Room for a few whole messages at once, whatever the system's
        # defaults: a test that sends more says so (SO_SNDBUF is capped by
        # net.core.wmem_max, some 200 KiB by default, which is plenty).
        accepted.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        self.peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        super().__init__(RecordingSocket(accepted.detach()), Protocol(), self.memory_reactor)
        self.connected = 1

    @property
    def sends(self) -> list[bytes]:
        """
        Each C{send} the transport made, in order.
        """
        recording = self.socket
        assert isinstance(recording, RecordingSocket)
        return recording.sends

    def reset_by_peer(self) -> None:
        """
        Make every send from now on fail, as on a connection the peer reset.
        """
        self.peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.peer.close()
        # Let the reset arrive.
        select.select([self.socket], [], [], 5)

    def close_sockets(self) -> None:
        """
        Close both ends (the transport's own close is not driven here).
        """
        self.socket.close()
        self.peer.close()

    @property
    def waiting_for_reactor(self) -> bool:
        """
        Whether the transport is registered with its reactor to send what it
        holds when the socket is next writable.
        """
        return self in self.memory_reactor.writers

    def getPeer(self) -> IPv4Address:
        return CLIENT_ADDRESS

    def getHost(self) -> IPv4Address:
        return SERVER_ADDRESS


# -- framing (spec, "Framing") -------------------------------------------------


def framed(payload: bytes) -> bytes:
    """
    C{payload} as it travels on TCP: a 2-byte big-endian length, then the
    payload.
    """
    return struct.pack(">H", len(payload)) + payload


def split_frames(stream: bytes) -> list[bytes]:
    """
    Cut a TCP byte stream into its payloads; the stream must end at a frame
    boundary.
    """
    payloads = []
    offset = 0
    while offset < len(stream):
        (length,) = struct.unpack(">H", stream[offset : offset + 2])
        payloads.append(stream[offset + 2 : offset + 2 + length])
        offset += 2 + length
    assert offset == len(stream), "the stream ends inside a frame"
    return payloads


# -- real TCP on the loopback interface ----------------------------------------


class LoopbackTestCase(TestCase):
    """
    A curvetun server listening on 127.0.0.1 with a fresh identity, and a
    client identity it admits from 127.0.0.1.
    """

    async def start(self, admit_client: bool = True) -> None:
        self.server_vault = MemoryVault.generate()
        self.client_vault = MemoryVault.generate()
        allowed = [(self.client_vault.public_key, "127.0.0.1")] if admit_client else []
        self.server_service = CurveTunService(self.server_vault, AllowList(clients=allowed))
        self.client_service = CurveTunService(self.client_vault, AllowList())
        for service in (self.server_service, self.client_service):
            service.startService()
            self.addCleanup(service.stopService)
        self.listener: MessageListener = await listen(
            CurveTunServerEndpoint(
                TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), self.server_service
            )
        )
        self.addCleanup(self.listener.close)
        assert self.listener.port is not None
        self.port = tcp_port(self.listener.port)

    async def connect(self, server_key: bytes | None = None) -> MessageChannel:
        channel = await connect(
            CurveTunClientEndpoint(
                TCP4ClientEndpoint(reactor, "127.0.0.1", self.port),
                self.client_service,
                self.server_vault.public_key if server_key is None else server_key,
            )
        )
        self.addCleanup(channel.close)
        return channel

    async def pair(self) -> tuple[MessageChannel, MessageChannel]:
        client = await self.connect()
        server = await self.listener.accept()
        self.addCleanup(server.close)
        return client, server


@implementer(IRegistry)
class AllowList:
    """
    A registry that admits exactly the given (key, host) pairs, and knows
    the given server keys; it records the questions it was asked.
    """

    def __init__(
        self,
        clients: list[tuple[bytes, str]] | None = None,
        servers: dict[str, bytes] | None = None,
    ) -> None:
        self.clients = clients or []
        self.servers = servers or {}
        self.asked: list[tuple[bytes, str]] = []

    def is_client_allowed(self, client_key: bytes, peer_host: str) -> bool:
        self.asked.append((client_key, peer_host))
        return any(keys_equal(key, client_key) and host == peer_host for key, host in self.clients)

    def server_key_for(self, host: str) -> bytes | None:
        return self.servers.get(host)


class RecordingProtocol(Protocol):
    """
    An application protocol that records what happens to it.
    """

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.made = 0
        self.lost: list[Failure] = []

    def connectionMade(self) -> None:
        self.made += 1

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self.lost.append(reason)


class RecordingFactory(Factory):
    """
    Builds L{RecordingProtocol}s and keeps them in C{built}.
    """

    def __init__(self) -> None:
        self.built: list[RecordingProtocol] = []

    def buildProtocol(self, addr: Any) -> RecordingProtocol:
        protocol = RecordingProtocol()
        protocol.factory = self
        self.built.append(protocol)
        return protocol


class Peers:
    """
    A server identity and a client identity that trust each other (the
    client's key is allowed from 127.0.0.1), each with its own service,
    on one fake clock.
    """

    def __init__(self, handshake_timeout: float | None = 10.0, **server_options: Any) -> None:
        self.clock = Clock()
        self.server_vault = MemoryVault.generate()
        self.client_vault = MemoryVault.generate()
        self.registry = AllowList(clients=[(self.client_vault.public_key, CLIENT_ADDRESS.host)])
        self.server = CurveTunService(
            self.server_vault,
            self.registry,
            clock=self.clock,
            cookie_keys=CookieKeys(clock=self.clock, seconds=self.clock.seconds),
            handshake_timeout=handshake_timeout,
            **server_options,
        )
        self.client = CurveTunService(
            self.client_vault,
            AllowList(),
            clock=self.clock,
            handshake_timeout=handshake_timeout,
        )
        self.server_apps = RecordingFactory()
        self.client_apps = RecordingFactory()
        self.server_factory = self.server.server_factory(self.server_apps)

    def connect(
        self,
        server_key: bytes | None = None,
        greet: bool = True,
        client_address: IPv4Address = CLIENT_ADDRESS,
    ) -> tuple[CurveTunProtocol, CurveTunProtocol, IOPump]:
        """
        Connect a client to the server in memory. Returns (client, server,
        pump); with C{greet} the pump has been flushed once, so the
        handshake has run to its end.
        """
        server_factory = self.server_factory
        client_factory = self.client.client_factory(
            self.client_apps,
            self.server_vault.public_key if server_key is None else server_key,
        )
        return connectedServerAndClient(
            lambda: built(server_factory.buildProtocol(client_address)),
            lambda: built(client_factory.buildProtocol(SERVER_ADDRESS)),
            clientTransportFactory=lambda p: FakeTransport(
                p, False, hostAddress=CLIENT_ADDRESS, peerAddress=SERVER_ADDRESS
            ),
            serverTransportFactory=lambda p: FakeTransport(
                p, True, hostAddress=SERVER_ADDRESS, peerAddress=client_address
            ),
            greet=greet,
            # The pump runs the clock's due calls (coalesced writes).
            clock=self.clock,
        )


# -- key directories, logs and a collecting client (real connections) -----------
#
# Used by the tests of `twist curvetun` and by any test that runs a service
# from a key directory on disk.


def make_keydir(testcase: SynchronousTestCase) -> tuple[str, bytes]:
    """
    A new key directory in the test's temporary space; its path and public
    key. The vault is closed again, so the code under test can load it.
    """
    keydir = os.path.abspath(testcase.mktemp())
    vault = FileVault.create(keydir)
    vault.close()
    testcase.addCleanup(forget_keydir, keydir)
    return keydir, vault.public_key


def forget_keydir(keydir: str) -> None:
    """
    Drop the pool's service for C{keydir} (loaded by an endpoint string
    under test) and release its directory: the pool is process-wide.
    """
    service = service_pool.forget_keydir(keydir)
    if service is not None:
        close = getattr(service.vault, "close", None)
        if close is not None:
            close()


def admit(keydir: str, client_key: bytes, host: str = "127.0.0.1") -> None:
    """
    Let C{client_key} connect from C{host} to the server of C{keydir}.
    """
    FileRegistry(os.path.join(keydir, "registry")).add(host, client_key, "test client")


def capture_logs(testcase: SynchronousTestCase) -> list[LogEvent]:
    """
    Every log event emitted until the end of the test.
    """
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    testcase.addCleanup(globalLogPublisher.removeObserver, observer)
    return events


def events_like(events: list[LogEvent], format_start: str) -> list[LogEvent]:
    """
    The events whose format begins with C{format_start}.
    """
    return [e for e in events if (e.get("log_format") or "").startswith(format_start)]


class Collector(Protocol):
    """
    A client that keeps what it receives; C{received_enough} fires once it
    has C{expected} bytes, C{lost} when the connection ends (its reason is
    kept in C{reason}).
    """

    def __init__(self, expected: int = 0) -> None:
        self.data = b""
        self.expected = expected
        self.received_enough: Deferred[bytes] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self.reason: Failure | None = None

    def expect(self, count: int) -> Deferred[bytes]:
        """
        Wait for C{count} more bytes (those received from now on).
        """
        self.data = b""
        self.expected = count
        self.received_enough = Deferred()
        return self.received_enough

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if len(self.data) >= self.expected and not self.received_enough.called:
            self.received_enough.callback(self.data)

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        # The reason is kept, not passed: a Failure would errback.
        self.reason = reason
        self.lost.callback(None)


async def round_trip(collector: Collector, data: bytes) -> bytes:
    """
    Write C{data} and wait for as many bytes back.
    """
    waiting = collector.expect(len(data))
    assert collector.transport is not None
    collector.transport.write(data)
    return await waiting


# -- Threads run by the test (registry rereads) ---------------------------

_Result = TypeVar("_Result")


class ManualThreads:
    """
    Stands in for L{twisted.internet.threads.deferToThread}: it keeps the
    jobs it is given until the test runs them (L{run_all}), in the test's
    thread, firing each job's L{Deferred} with its result or failure.
    """

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable[[], Any], Deferred[Any]]] = []
        self.ran = 0

    def __call__(self, job: Callable[[], _Result]) -> Deferred[_Result]:
        d: Deferred[_Result] = Deferred()
        self.jobs.append((job, d))
        return d

    def run_all(self) -> int:
        """
        Run the jobs given so far and those they lead to; return how many.
        """
        count = 0
        while self.jobs:
            job, d = self.jobs.pop(0)
            count += 1
            self.ran += 1
            try:
                result = job()
            except BaseException:
                d.errback()
            else:
                d.callback(result)
        return count


# -- endpoint strings: key directories, PROXY headers, UNIX sockets, DNS ----------
#
# (Used by test_endpoints, test_endpoint_wrapping and test_dns.)


class KeyDirs:
    """
    A server key directory and a client key directory on disk; the
    server's registry admits the client from C{admit_from} (default
    127.0.0.1; L{None}: from nowhere), the client's registry knows the
    server as 127.0.0.1. Both are dropped from the process-wide endpoint
    pool at cleanup.
    """

    def __init__(self, testcase: SynchronousTestCase, admit_from: str | None = "127.0.0.1") -> None:
        base = testcase.mktemp()
        os.makedirs(base)
        self.server = os.path.abspath(os.path.join(base, "server"))
        self.client = os.path.abspath(os.path.join(base, "client"))
        self.server_key = self.create(self.server)
        self.client_key = self.create(self.client)
        if admit_from is not None:
            self.admit(admit_from)
        FileRegistry(os.path.join(self.client, "registry")).add(
            "127.0.0.1", self.server_key, "test server"
        )
        testcase.addCleanup(self.forget)

    def admit(self, address: str) -> None:
        """
        Let the client's key connect from C{address} (a registry ADDRESS).
        """
        FileRegistry(os.path.join(self.server, "registry")).add(
            address, self.client_key, "test client"
        )

    @staticmethod
    def create(keydir: str) -> bytes:
        vault = FileVault.create(keydir)
        vault.close()  # the endpoints under test load it again
        return vault.public_key

    def forget(self) -> None:
        for keydir in (self.server, self.client):
            service = service_pool.forget_keydir(keydir)
            if service is not None:
                service.vault.close()  # type: ignore[attr-defined]


def short_socket_dir(testcase: SynchronousTestCase) -> str:
    """
    A new directory for UNIX sockets, with a path short enough for
    C{sun_path} (108 bytes; the trial temporary tree can be deeper).
    """
    directory = tempfile.mkdtemp(prefix="ct-")

    def remove() -> None:
        for name in os.listdir(directory):
            os.unlink(os.path.join(directory, name))
        os.rmdir(directory)

    testcase.addCleanup(remove)
    return directory


def proxy_v1_header(source: str, source_port: int = 40000) -> bytes:
    """
    A PROXY protocol version 1 header for a TCP4 connection from C{source}.
    """
    return f"PROXY TCP4 {source} 127.0.0.1 {source_port} 7700\r\n".encode("ascii")


PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_v2_header(source: str, source_port: int = 40000) -> bytes:
    """
    A PROXY protocol version 2 header (command PROXY, TCP over IPv4) for a
    connection from C{source}.
    """
    addresses = struct.pack(
        "!4s4sHH",
        socket.inet_aton(source),
        socket.inet_aton("127.0.0.1"),
        source_port,
        7700,
    )
    return PROXY_V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(addresses)) + addresses


PROXY_V2_LOCAL = PROXY_V2_SIGNATURE + b"\x20\x00\x00\x00"
"""
A PROXY version 2 LOCAL header, as a load balancer's health check sends.
"""


class _HeaderFirst(ProtocolWrapper):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.factory.header)
        super().connectionMade()


class _HeaderFirstFactory(WrappingFactory):
    protocol = _HeaderFirst

    def __init__(self, wrapped: IProtocolFactory, header: bytes) -> None:
        super().__init__(wrapped)
        self.header = header


@implementer(IStreamClientEndpoint)
class HeaderFirstEndpoint:
    """
    A client endpoint that sends C{header} (a PROXY header, as a load
    balancer would) before anything its protocol writes.
    """

    def __init__(self, wrapped: IStreamClientEndpoint, header: bytes) -> None:
        self._wrapped = wrapped
        self._header = header

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        def unwrap(protocol: IProtocol) -> IProtocol:
            assert isinstance(protocol, _HeaderFirst)
            return protocol.wrappedProtocol

        return self._wrapped.connect(
            _HeaderFirstFactory(protocolFactory, self._header)
        ).addCallback(unwrap)


def capture_log(testcase: SynchronousTestCase) -> list[LogEvent]:
    """
    Every log event from now until the test ends.
    """
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    testcase.addCleanup(globalLogPublisher.removeObserver, observer)
    return events


def log_formats(events: list[LogEvent]) -> list[str]:
    return [str(event.get("log_format", "")) for event in events]


class Zone:
    """
    A served zone: C{port} (UDP and TCP), and C{tcp_connections}, how many
    connections came over TCP.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.tcp_connections = 0


async def serve_zone(testcase: SynchronousTestCase, origin: str, key_records: list[bytes]) -> Zone:
    """
    Serve a zone for C{origin} whose name C{_curvetun.ORIGIN} has one TXT
    record for each of C{key_records}, from a real twisted.names
    authoritative server on 127.0.0.1, over UDP and TCP on one free port.
    The zone file is a C{PySourceAuthority} one (Python source, so that the
    TXT values are quoted exactly).
    """
    from twisted.internet import reactor as _reactor
    from twisted.internet.error import CannotListenError
    from twisted.internet.interfaces import IReactorTCP, IReactorUDP
    from twisted.names import authority, dns, server
    from twisted.python.filepath import FilePath

    lines = [
        f"SOA({origin!r}, mname='ns1.{origin}', rname='admin.{origin}', serial=1,"
        " refresh=3600, retry=600, expire=86400, minimum=60, ttl=60),",
        f"NS({origin!r}, 'ns1.{origin}', ttl=60),",
        f"A('ns1.{origin}', '127.0.0.1', ttl=60),",
        *(f"TXT('_curvetun.{origin}', {text!r}, ttl=60)," for text in key_records),
    ]
    path = os.path.abspath(testcase.mktemp())
    FilePath(path).setContent(("zone = [\n" + "\n".join(lines) + "\n]\n").encode("ascii"))
    factory = server.DNSServerFactory(authorities=[authority.PySourceAuthority(path)])
    build = factory.buildProtocol

    def counting(addr: Any) -> Any:
        zone.tcp_connections += 1
        return build(addr)

    factory.buildProtocol = counting  # type: ignore[method-assign]
    zone = Zone(0)
    for _attempt in range(20):
        udp = cast(IReactorUDP, _reactor).listenUDP(
            0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1", maxPacketSize=8192
        )
        port: int = udp.getHost().port  # type: ignore[attr-defined]
        try:
            tcp = cast(IReactorTCP, _reactor).listenTCP(port, factory, interface="127.0.0.1")
        except CannotListenError:
            udp.stopListening()
            continue
        testcase.addCleanup(udp.stopListening)
        testcase.addCleanup(tcp.stopListening)
        zone.port = port
        return zone
    raise RuntimeError("no port free for both UDP and TCP")


# -- key directories, safe nonces and the curvetun command ---------------------------
#
# Kept together at the end of the module (imports included), so that this
# block and other additions stay apart.

import io  # noqa: E402

import attrs  # noqa: E402
from twisted.internet.utils import getProcessOutputAndValue  # noqa: E402
from twisted.trial.unittest import TestCase  # noqa: E402

import curvetun  # noqa: E402

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(curvetun.__file__)))
"""
The directory that holds the curvetun package, and twisted/plugins next to
it: "python -m curvetun" run there finds both (from a checkout and from
site-packages alike).
"""

_MASK64 = 2**64 - 1
_DELTA = 0x9E3779B97F4A7C15


def unscramble16(block16: bytes, key32: bytes) -> bytes:
    """
    The inverse of L{curvetun.nonces.scramble16}: TEA decryption, the 32
    rounds run backwards.
    """
    v0, v1 = struct.unpack("<2Q", block16)
    k0, k1, k2, k3 = struct.unpack("<4Q", key32)
    total = (_DELTA * 32) & _MASK64
    for _ in range(32):
        v1 = (v1 - (((v0 << 16) + k2) ^ (v0 + total) ^ ((v0 >> 8) + k3))) & _MASK64
        v0 = (v0 - (((v1 << 7) + k0) ^ (v1 + total) ^ ((v1 >> 12) + k1))) & _MASK64
        total = (total - _DELTA) & _MASK64
    return struct.pack("<2Q", v0, v1)


def counter_file(keydir: str | FilePath[str], previous: bool = False) -> FilePath[str]:
    """
    The counter file of the current key of C{keydir} (with C{previous},
    of its previous key), named by the key's public key.
    """
    path = FilePath(keydir) if isinstance(keydir, str) else keydir
    name = ("previous." if previous else "") + "public.key"
    public_key = bytes.fromhex(path.child(name).getContent().decode("ascii"))
    return path.child("nonce.counter." + public_key[:8].hex())


def counter_of(safe_nonce: bytes, nonce_key: bytes) -> int:
    """
    The counter inside a safe nonce.
    """
    return int.from_bytes(unscramble16(safe_nonce, nonce_key)[:8], "big")


OTHER_UID = 65534
"""A user that owns nothing of ours ("nobody" on most systems)."""


@attrs.frozen
class Result:
    """
    What a command did: exit status, standard output, standard error.
    """

    code: int
    out: str
    err: str


class CommandTestCase(TestCase):
    """
    Runs the C{curvetun} command line in this process, with its output
    captured.
    """

    def call(self, *argv: str) -> Result:
        from curvetun.cli import run

        out, err = io.StringIO(), io.StringIO()
        patches = [self.patch(sys, "stdout", out), self.patch(sys, "stderr", err)]
        try:
            code = run(list(argv))
        finally:
            for patch in patches:
                patch.restore()
        return Result(code, out.getvalue(), err.getvalue())

    def temp_dir(self) -> str:
        path: str = self.mktemp()
        os.makedirs(path)
        return os.path.abspath(path)

    def set_env(self, name: str, value: str) -> None:
        old = os.environ.get(name)
        os.environ[name] = value
        self.addCleanup(
            lambda: os.environ.pop(name, None) if old is None else os.environ.update({name: old})
        )

    def assertOneLineError(self, result: Result, code: int, *words: str) -> None:
        """
        The command failed with exit status C{code}, saying so in one line
        on standard error that contains each of C{words}, and no traceback.
        """
        self.assertEqual(result.code, code, result)
        self.assertTrue(result.err.startswith("curvetun: error: "), result.err)
        self.assertEqual(result.err.count("\n"), 1, result.err)
        self.assertNotIn("Traceback", result.err)
        for word in words:
            self.assertIn(word, result.err)


def subprocess_env(home: str, **extra: str) -> dict[str, str]:
    """
    The environment for a curvetun subprocess: ours, with a home directory
    of the test's own, so that nothing touches the real one.
    """
    env = {k: v for k, v in os.environ.items() if k != "CURVETUN_HOME"}
    env.update(HOME=home, **extra)
    return env


def curvetun_process(
    argv: list[str], env: dict[str, str], stdin: bytes | None = b""
) -> Deferred[tuple[bytes, bytes, int]]:
    """
    Run C{python -m curvetun ARGV} in L{PROJECT_ROOT} without blocking the
    reactor. C{stdin} L{None} leaves standard input open.
    """
    from twisted.internet import reactor

    return getProcessOutputAndValue(  # type: ignore[no-any-return]
        sys.executable,
        ["-m", "curvetun", *argv],
        env=env,
        path=PROJECT_ROOT,
        reactor=reactor,
        stdinBytes=stdin,
    )


def closed_port() -> int:
    """
    A port on 127.0.0.1 that nothing listens on (it was free a moment ago).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def client_string(port: int, key: bytes, client_dir: str) -> str:
    """
    A client endpoint string to a server on 127.0.0.1:C{port} with key C{key}.
    """
    return f"curvetun:127.0.0.1:{port}:key={format_public_key(key)}:keydir={client_dir}"


async def echoes(port: int, key: bytes, client_dir: str) -> bytes:
    """
    Connect to an echo server with key C{key} as the client of C{client_dir};
    return what came back of a round trip.
    """
    collector = Collector()
    endpoint = clientFromString(reactor, client_string(port, key, client_dir))
    await connectProtocol(endpoint, collector)
    try:
        return await round_trip(collector, b"which key?")
    finally:
        assert collector.transport is not None
        collector.transport.loseConnection()
        await collector.lost


# -- `twist curvetun` as operators start it: processes, their JSON logs, a
# service manager's notify socket, and fake listen endpoints -------------------

SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def twist(*argv: str) -> list[str]:
    """
    The command line of C{twist curvetun ARGV}, logging JSON to stdout.
    """
    return [sys.executable, "-m", "twisted", "--log-format", "json", "curvetun", *argv]


def twist_environ(home: str, **extra: str) -> dict[str, str]:
    """
    The environment of a C{twist curvetun} process: the plugin is found
    from the source tree, installed or not; the default key directory is
    C{home}.
    """
    return {
        **{k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"},
        "PYTHONPATH": os.pathsep.join([SOURCE_ROOT, os.environ.get("PYTHONPATH", "")]),
        "CURVETUN_HOME": home,
        **extra,
    }


def run_twist(home: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """
    Run C{twist curvetun ARGV} to its end (for commands that fail at start).
    """
    return subprocess.run(
        twist(*argv),
        cwd=SOURCE_ROOT,
        env=twist_environ(home),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def start_twist(
    testcase: SynchronousTestCase, home: str, *argv: str, **environ: str
) -> subprocess.Popen[bytes]:
    """
    Start C{twist curvetun ARGV}; it is killed at cleanup if still running.
    """
    process = subprocess.Popen(
        twist(*argv),
        cwd=SOURCE_ROOT,
        env=twist_environ(home, **environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )

    def reap() -> None:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)

    testcase.addCleanup(reap)
    return process


def parse_events(output: bytes) -> list[dict[str, Any]]:
    """
    The complete events of twist's JSON log: each record is RS (0x1e),
    JSON, newline.
    """
    records = output.decode("utf-8", "replace").split("\x1e")
    return [json.loads(record) for record in records if record.endswith("\n")]


def read_until(
    process: subprocess.Popen[bytes], output: bytes, until: str, count: int = 1, timeout: float = 30
) -> bytes:
    """
    Read more of C{process}'s JSON log, after C{output}, until it holds
    C{count} events whose format begins with C{until}; fail after
    C{timeout} seconds.

    @return: C{output} and what was read.
    """
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    while True:
        events = parse_events(output)
        if sum(e.get("log_format", "").startswith(until) for e in events) >= count:
            return output
        remaining = deadline - time.monotonic()
        if remaining <= 0 or process.poll() is not None:
            raise AssertionError(f"no {until!r} in time; output so far: {output[-2000:]!r}")
        ready, _, _ = select.select([process.stdout], [], [], remaining)
        if ready:
            output += os.read(process.stdout.fileno(), 65536)


def listening_ports(output: bytes) -> list[int]:
    """
    The ports of the "Listening on" events of a JSON log, in order.
    """
    return [
        int(event["address"].rpartition(":")[2])
        for event in parse_events(output)
        if event.get("log_format", "").startswith("Listening on")
    ]


class NotifySocket:
    """
    A service manager's notify socket: a UNIX datagram socket bound in a
    fresh directory (short enough for a socket path), as systemd binds
    C{$NOTIFY_SOCKET}.
    """

    def __init__(self, testcase: SynchronousTestCase) -> None:
        directory = tempfile.mkdtemp(prefix="ct-notify-")
        self.path = os.path.join(directory, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        testcase.addCleanup(self.close, directory)

    def close(self, directory: str) -> None:
        self.sock.close()
        os.unlink(self.path)
        os.rmdir(directory)

    def receive(self, timeout: float = 30) -> dict[str, str] | None:
        """
        The fields of the next datagram, or L{None} if none comes within
        C{timeout} seconds.
        """
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return None
        data = self.sock.recv(65536).decode()
        return dict(line.split("=", 1) for line in data.splitlines())


@implementer(IListeningPort)
class FakePort:
    """
    A listening port that records being stopped.
    """

    def __init__(self) -> None:
        self.stopped = 0

    def startListening(self) -> None:
        pass

    def stopListening(self) -> None:
        self.stopped += 1

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 7700)


@implementer(IStreamServerEndpoint)
class PendingServerEndpoint:
    """
    A server endpoint whose listens the test completes by hand; it records
    each factory and each cancellation.
    """

    def __init__(self) -> None:
        self.listens: list[tuple[IProtocolFactory, Deferred[IListeningPort]]] = []
        self.cancelled = 0

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        def cancel(d: Deferred[IListeningPort]) -> None:
            self.cancelled += 1

        d: Deferred[IListeningPort] = Deferred(cancel)
        self.listens.append((protocolFactory, d))
        return d


# -- the monitoring endpoint (twist curvetun --metrics) ---------------------------


@attrs.frozen
class Page:
    """
    What an HTTP server answered: status, content type and body.
    """

    code: int
    content_type: str
    body: bytes


async def http_get(url: str) -> Page:
    """
    GET C{url} with Twisted's HTTP client, on the trial reactor.
    """
    from twisted.web.client import Agent, readBody

    response = await Agent(reactor).request(b"GET", url.encode("ascii"))
    body: bytes = await readBody(response)
    [content_type] = response.headers.getRawHeaders(b"content-type", [b""])
    return Page(response.code, content_type.decode("ascii"), body)


def metrics_port(output: bytes) -> int:
    """
    The port of the monitoring endpoint in a JSON log (its "Listening on"
    event says what it serves).
    """
    [port] = [
        int(event["address"].rpartition(":")[2])
        for event in parse_events(output)
        if event.get("log_format", "").startswith("Listening on")
        and event.get("what", "").startswith("metrics")
    ]
    return port
