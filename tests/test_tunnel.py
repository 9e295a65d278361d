"""
The relay of C{twist curvetun --forward} (L{curvetun.tunnel}) on its data
path: how the reads of one side become the writes of the other.
"""

from __future__ import annotations

import socket

from twisted.internet import reactor
from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from curvetun.packets import MAX_MESSAGE
from curvetun.tunnel import Forwarder, ForwardingFactory

from ._support import MessageRecordingTransport, SocketDescriptor, tcp_port


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
    message's worth (65503 bytes) at a time once it has read more: each
    read goes out as one message as it is, where a read of Twisted's
    default 64 KiB would go out as a full message and a 33-byte one. An
    idle or small connection keeps Twisted's default (the setting costs
    memory per connection).
    """

    def relayed(self) -> tuple[Forwarder, SocketDescriptor]:
        """
        A forwarder on an accepted plain TCP side, forwarding to a curvetun
        side in memory.
        """
        forward = MessageRecordingTransport(IPv4Address("TCP", "10.0.0.2", 7700))
        forwarder = ForwardingFactory(ConnectsTo(forward), "curvetun:10.0.0.2:7700").buildProtocol(
            None
        )
        assert forwarder is not None
        accepted = SocketDescriptor()
        self.addCleanup(accepted.close_sockets)
        forwarder.makeConnection(accepted)
        return forwarder, accepted

    def test_small_reads_keep_twisteds_read_size(self) -> None:
        forwarder, accepted = self.relayed()
        for size in (1, 100, MAX_MESSAGE):
            forwarder.dataReceived(b"s" * size)
        self.assertEqual(accepted.bufferSize, FileDescriptor.bufferSize)

    def test_after_a_read_larger_than_a_message_reads_fit_one(self) -> None:
        forwarder, accepted = self.relayed()
        forwarder.dataReceived(b"b" * 65536)
        self.assertEqual(accepted.bufferSize, MAX_MESSAGE)

    async def test_a_bulk_transfer_goes_out_in_reads_that_fit_one_message(self) -> None:
        forward = MessageRecordingTransport(IPv4Address("TCP", "10.0.0.2", 7700))
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
        # Only the first full read was more than a message; every read after
        # it went out as one message.
        calls = [call for call, _ in forward.calls]
        self.assertLessEqual(calls.count("write"), 1)
        after = forward.calls[calls.index("write") + 1 :] if "write" in calls else forward.calls
        self.assertEqual({call for call, _ in after}, {"write_message"})
        self.assertLessEqual(max(size for _, size in after), MAX_MESSAGE)


class RelayedReadsSentAtOnceTests(SynchronousTestCase):
    """
    A relayed read is handed to the other side's socket as it is relayed,
    not a reactor turn later (Twisted's transports send from the reactor):
    a relay has nothing to add before its next read, and every hop of a
    round trip through a tunnel would wait a turn of the loop.
    """

    def setUp(self) -> None:
        self.endpoint = ConnectsLater()
        forwarder = ForwardingFactory(self.endpoint, "tcp:127.0.0.1:6379").buildProtocol(None)
        assert forwarder is not None
        self.forwarder = forwarder
        self.accepted = SocketDescriptor()
        self.addCleanup(self.accepted.close_sockets)
        self.forwarder.makeConnection(self.accepted)
        self.forward = SocketDescriptor()
        self.addCleanup(self.forward.close_sockets)
        self.forward_side = self.endpoint.complete(self.forward)

    def test_a_read_of_the_client_is_sent_to_the_forward_side_at_once(self) -> None:
        self.forwarder.dataReceived(b"request")
        self.assertEqual(self.forward.sends, [b"request"])
        self.assertFalse(self.forward.waiting_for_reactor)

    def test_a_read_of_the_forward_side_is_sent_to_the_client_at_once(self) -> None:
        self.forward_side.dataReceived(b"reply")
        self.assertEqual(self.accepted.sends, [b"reply"])
        self.assertFalse(self.accepted.waiting_for_reactor)

    def test_what_the_socket_does_not_take_is_left_to_the_reactor(self) -> None:
        self.forward.reset_by_peer()
        self.forwarder.dataReceived(b"request")
        # The reactor's own doWrite meets the failure, and closes.
        self.assertTrue(self.forward.waiting_for_reactor)

    def test_nothing_is_sent_early_by_a_closing_side(self) -> None:
        self.forward.loseConnection()
        self.forwarder.dataReceived(b"late")
        # The reactor sends what is left and then closes: not this relay.
        self.assertEqual(self.forward.sends, [])
        self.assertTrue(self.forward.waiting_for_reactor)


@implementer(IStreamClientEndpoint)
class ConnectsLater:
    """
    A client endpoint whose one connection the test makes by hand.
    """

    def __init__(self) -> None:
        self.factory: IProtocolFactory | None = None
        self.connecting: Deferred[IProtocol] = Deferred()

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        self.factory = protocolFactory
        return self.connecting

    def complete(self, transport: SocketDescriptor) -> IProtocol:
        """
        Make the connection on C{transport}.
        """
        assert self.factory is not None
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 6379))
        assert protocol is not None
        protocol.makeConnection(transport)
        self.connecting.callback(protocol)
        return protocol
