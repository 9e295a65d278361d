"""
The relay of C{twist curvetun --forward} (L{curvetun.tunnel}) on its data
path: how the reads of one side become the writes of the other.
"""

from __future__ import annotations

import socket

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from curvetun.interfaces import ICurveTunTransport
from curvetun.packets import MAX_MESSAGE
from curvetun.tunnel import ForwardingFactory

from ._support import tcp_port


@implementer(ICurveTunTransport)
class MessageTransport(StringTransport):
    """
    A curvetun transport in memory that records each C{write} and
    C{write_message} call by its size.
    """

    peer_public_key = b"k" * 32
    bytes_received = 0
    bytes_sent = 0
    established_at: float | None = 0.0
    last_received_at: float | None = None
    last_sent_at: float | None = None

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "10.0.0.2", 7700))
        self.calls: list[tuple[str, int]] = []
        self.carried = 0

    def write(self, data: bytes) -> None:
        self.calls.append(("write", len(data)))
        self.carried += len(data)

    def write_message(self, data: bytes) -> None:
        self.calls.append(("write_message", len(data)))
        self.carried += len(data)


@implementer(IStreamClientEndpoint)
class ConnectsTo:
    """
    A client endpoint whose every connection is made at once on C{transport}.
    """

    def __init__(self, transport: StringTransport) -> None:
        self.transport = transport

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        protocol = protocolFactory.buildProtocol(IPv4Address("TCP", "10.0.0.2", 7700))
        assert protocol is not None
        protocol.makeConnection(self.transport)
        return Deferred.fromCoroutine(_value(protocol))


async def _value(protocol: IProtocol) -> IProtocol:
    return protocol


class ReadsRelayedToCurveTunTests(TestCase):
    """
    A plain TCP side relayed to a curvetun side is read at most one
    message's worth (65503 bytes) at a time: each read goes out as one
    message as it is, where a read of Twisted's default 64 KiB would go out
    as a full message and a 33-byte one.
    """

    async def test_a_bulk_transfer_goes_out_in_reads_that_fit_one_message(self) -> None:
        forward = MessageTransport()
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            ForwardingFactory(ConnectsTo(forward), "curvetun:10.0.0.2:7700")
        )
        self.addCleanup(port.stopListening)
        total = 8 * 65536
        with socket.create_connection(("127.0.0.1", tcp_port(port))) as client:
            client.sendall(b"b" * total)
            for _ in range(500):
                if forward.carried >= total:
                    break
                await deferLater(reactor, 0.01)
            self.addCleanup(forward.loseConnection)
        self.assertEqual(forward.carried, total)
        self.assertEqual({call for call, _ in forward.calls}, {"write_message"})
        self.assertLessEqual(max(size for _, size in forward.calls), MAX_MESSAGE)
