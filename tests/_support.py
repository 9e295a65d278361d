"""
Shared test fixtures: in-memory identities, a fake registry, a recording
application protocol, and in-memory connections (iosim).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connectedServerAndClient
from zope.interface import implementer

from curvetun.cookies import CookieKeys
from curvetun.interfaces import IRegistry
from curvetun.keys import keys_equal
from curvetun.service import CurveTunService
from curvetun.transport import CurveTunProtocol
from curvetun.vault import MemoryVault

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


# -- key directories, safe nonces and the curvetun command ---------------------------
#
# Kept together at the end of the module (imports included), so that this
# block and other additions stay apart.

import io  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402

import attrs  # noqa: E402
from twisted.internet.defer import Deferred  # noqa: E402
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
