"""
Shared test fixtures: in-memory identities, a fake registry, a recording
application protocol, and in-memory connections (iosim).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IListeningPort
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
