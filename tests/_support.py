"""
Shared test fixtures: the wire's framing, in-memory identities, a fake
registry, a recording application protocol, in-memory connections (iosim),
and a curvetun server and client on the loopback interface.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connectedServerAndClient
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from curvetun.channel import MessageChannel, MessageListener, connect, listen
from curvetun.cookies import CookieKeys
from curvetun.endpoints import CurveTunClientEndpoint, CurveTunServerEndpoint
from curvetun.interfaces import IRegistry
from curvetun.keys import keys_equal
from curvetun.service import CurveTunService
from curvetun.transport import CurveTunProtocol
from curvetun.vault import MemoryVault

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
