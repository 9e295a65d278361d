"""
Shared test fixtures: in-memory identities, a fake registry, a recording
application protocol, and in-memory connections (iosim); key directories
on disk, log capture and a collecting client for real connections.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, cast

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from curvetun.cookies import CookieKeys
from curvetun.endpoints import service_pool
from curvetun.interfaces import IRegistry
from curvetun.keys import keys_equal
from curvetun.registry import FileRegistry
from curvetun.service import CurveTunService
from curvetun.transport import CurveTunProtocol
from curvetun.vault import FileVault, MemoryVault

SERVER_ADDRESS = IPv4Address("TCP", "127.0.0.1", 7700)
CLIENT_ADDRESS = IPv4Address("TCP", "127.0.0.1", 40000)


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
            cookie_keys=CookieKeys(clock=self.clock),
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
            lambda: server_factory.buildProtocol(client_address),
            lambda: client_factory.buildProtocol(SERVER_ADDRESS),
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
