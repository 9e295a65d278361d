"""
Slow and silent peers over real TCP on 127.0.0.1: hundreds of connections
that never finish a handshake are closed by the handshake timeout, while a
legitimate client, from another address, connects and exchanges messages
in the meantime.

The attackers connect from 127.0.0.1 and the legitimate client from
127.0.0.2 (every 127/8 address is the loopback interface on Linux), as an
attacker and a user would come from different hosts.

The first test lifts the server's connection limits, so that the handshake
timeout alone has to deal with every attacker; the second keeps the default
limits, as a server normally runs (the limits themselves are tested in
test_limits).
"""

from __future__ import annotations

import resource
import sys
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase

from curvetun.admission import ConnectionLimits
from curvetun.channel import MessageListener, connect, listen
from curvetun.endpoints import CurveTunClientEndpoint, CurveTunServerEndpoint
from curvetun.handshake import EphemeralKeyPair, client_hello
from curvetun.service import CurveTunService
from curvetun.vault import MemoryVault

from ._support import AllowList

# Long enough that a client gets through on a loaded machine while every
# attacker is still held; the test waits about this long.
HANDSHAKE_TIMEOUT = 2.0
SLACK = 4.0
"""How late after the timeout a close may come on a busy machine."""

ATTACKERS = {
    "silent": 80,  # connect and send nothing
    "hello then silent": 80,  # send a valid hello, ignore the cookie
    "half a frame": 30,  # announce a hello and send part of it
    "trickle": 10,  # send a hello one byte every 50 ms
}
FDS_NEEDED = 2 * sum(ATTACKERS.values()) + 100

# Every limit lifted, whichever the admission has (in all, per address, per
# network).
_LIFTED: dict[str, Any] = {
    field.name: None
    for field in attrs.fields(ConnectionLimits)
    if field.name.startswith(("connections", "handshakes"))
}
NO_LIMITS = attrs.evolve(ConnectionLimits(), **_LIFTED)


def now() -> float:
    seconds: float = reactor.seconds()
    return seconds


class Attacker(Protocol):
    """
    A raw TCP client that opens with C{opening} (all at once, or one byte
    at a time with C{trickle}) and then never says anything else. It
    records when it connected, what it received and when it was closed.
    """

    def __init__(self, kind: str, opening: bytes, trickle: bool = False) -> None:
        self.kind = kind
        self.opening = opening
        self.trickle = trickle
        self.received = b""
        self.connected_at = 0.0
        self.closed_at: float | None = None
        self.reason: Failure | None = None
        self.closed: Deferred[None] = Deferred()
        self._dripping: LoopingCall | None = None

    def connectionMade(self) -> None:
        self.connected_at = now()
        if not self.trickle:
            if self.opening:
                self.transport.write(self.opening)  # type: ignore[union-attr]
            return
        remaining = iter(self.opening)

        def drip() -> None:
            byte = next(remaining, None)
            if byte is not None:
                self.transport.write(bytes([byte]))  # type: ignore[union-attr]

        self._dripping = LoopingCall(drip)
        self._dripping.start(0.05)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        if self._dripping is not None and self._dripping.running:
            self._dripping.stop()
        self.closed_at = now()
        self.reason = reason
        self.closed.callback(None)


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= FDS_NEEDED:
        return
    if hard != resource.RLIM_INFINITY and hard < FDS_NEEDED:
        raise SkipTest(
            f"needs {FDS_NEEDED} file descriptors, and the hard limit (ulimit -Hn) is {hard}"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (FDS_NEEDED, hard))


class SilentPeerTests(TestCase):
    """
    Connections that never finish their handshake hold nothing for longer
    than the handshake timeout, and do not keep a legitimate client out.
    """

    timeout = 60  # trial's own bound, far above what the test waits for

    def setUp(self) -> None:
        if not sys.platform.startswith("linux"):
            raise SkipTest("uses 127.0.0.2, which only Linux routes to loopback by default")
        raise_fd_limit()

    async def start_server(self, limits: ConnectionLimits) -> None:
        self.server_vault = MemoryVault.generate()
        self.client_vault = MemoryVault.generate()
        self.server_service = CurveTunService(
            self.server_vault,
            AllowList(clients=[(self.client_vault.public_key, "127.0.0.2")]),
            handshake_timeout=HANDSHAKE_TIMEOUT,
            # The whole handshake's timeout is what this shows (the first
            # packet's own timeout would close the silent ones too).
            hello_timeout=None,
            limits=limits,
        )
        self.client_service = CurveTunService(self.client_vault, AllowList())
        for service in (self.server_service, self.client_service):
            service.startService()
            self.addCleanup(service.stopService)
        # A backlog for every attacker at once: a full accept queue would
        # make the kernel drop SYNs, and the retries take a second.
        self.listener: MessageListener = await listen(
            CurveTunServerEndpoint(
                TCP4ServerEndpoint(reactor, 0, backlog=1024, interface="127.0.0.1"),
                self.server_service,
            )
        )
        self.addCleanup(self.listener.close)
        assert self.listener.port is not None
        address = self.listener.port.getHost()
        assert isinstance(address, IPv4Address)
        self.port = address.port

    def make_attackers(self) -> list[Attacker]:
        server_key = self.server_vault.public_key
        attackers = []
        for kind, count in ATTACKERS.items():
            for _ in range(count):
                hello, _ = client_hello(server_key, EphemeralKeyPair.generate())
                framed_hello = len(hello).to_bytes(2, "big") + hello
                opening = {
                    "silent": b"",
                    "hello then silent": framed_hello,
                    "half a frame": framed_hello[:60],
                    "trickle": framed_hello,
                }[kind]
                attackers.append(Attacker(kind, opening, trickle=kind == "trickle"))
        return attackers

    async def exchange_messages(self) -> None:
        """
        Connect from 127.0.0.2 and exchange twenty messages each way.
        """
        client = await connect(
            CurveTunClientEndpoint(
                TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, bindAddress=("127.0.0.2", 0)),
                self.client_service,
                self.server_vault.public_key,
            )
        )
        self.addCleanup(client.close)
        server = await self.listener.accept()
        self.addCleanup(server.close)
        for n in range(20):
            client.send(b"ping %d" % n)
            self.assertEqual(await server.recv(), b"ping %d" % n)
            server.send(b"pong %d" % n)
            self.assertEqual(await client.recv(), b"pong %d" % n)

    async def attack(self) -> tuple[list[Attacker], float]:
        """
        Connect every attacker; return them and when the last was connected.
        """
        attackers = self.make_attackers()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)
        await gatherResults([connectProtocol(endpoint, a) for a in attackers])
        return attackers, now()

    async def all_closed(self, attackers: list[Attacker]) -> None:
        everyone_closed = gatherResults([a.closed for a in attackers])
        everyone_closed.addTimeout(HANDSHAKE_TIMEOUT + SLACK, reactor)
        await everyone_closed

    async def test_silent_and_slow_peers_are_closed_by_the_timeout_while_a_client_gets_through(
        self,
    ) -> None:
        await self.start_server(NO_LIMITS)
        # The server cannot have accepted any of them before this.
        began = now()
        attackers, all_connected = await self.attack()

        await self.exchange_messages()
        exchanged = now()
        early = [a.kind for a in attackers if a.closed_at is not None]
        self.assertEqual(early, [], "attackers were closed before the client got through")
        self.assertLess(exchanged - all_connected, HANDSHAKE_TIMEOUT)

        await self.all_closed(attackers)
        for attacker in attackers:
            assert attacker.closed_at is not None and attacker.reason is not None
            lifetime = attacker.closed_at - attacker.connected_at
            self.assertLess(lifetime, HANDSHAKE_TIMEOUT + SLACK, attacker.kind)
            # The server closed it, cleanly, when the time was up: not
            # before the timeout had run from the earliest accept. (From
            # the attacker's own connectionMade, which a loaded reactor may
            # run late, it can look shorter.)
            self.assertGreaterEqual(
                attacker.closed_at - began, HANDSHAKE_TIMEOUT * 0.99, attacker.kind
            )
            self.assertTrue(attacker.reason.check(ConnectionDone), attacker.reason)
        # Each valid hello was answered with a cookie, and only those.
        answers = {a.kind: len(a.received) for a in attackers}
        self.assertEqual(
            answers,
            {"silent": 0, "hello then silent": 170, "half a frame": 0, "trickle": 0},
        )

    async def test_with_the_default_limits_a_flood_does_not_keep_a_client_out(
        self,
    ) -> None:
        limits = ConnectionLimits()
        await self.start_server(limits)
        attackers, all_connected = await self.attack()
        await self.exchange_messages()
        self.assertLess(now() - all_connected, HANDSHAKE_TIMEOUT)
        await self.all_closed(attackers)
        # Those past the limit were refused at once; the others were
        # held no longer than the handshake timeout.
        held = [
            a
            for a in attackers
            if a.closed_at is not None and a.closed_at - a.connected_at > HANDSHAKE_TIMEOUT / 2
        ]
        assert limits.handshakes_per_address is not None
        self.assertLessEqual(len(held), limits.handshakes_per_address)
        self.assertGreater(len(held), 0)
