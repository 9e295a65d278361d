"""
L{curvetun.direct_send}: bytes handed to a Twisted socket transport's
socket at once when nothing waits ahead of them, and to its buffer
otherwise, with Twisted's order, flow control and error handling intact.
"""

from __future__ import annotations

import os
import socket
from socket import recv_fds

from twisted.internet import reactor, unix
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from curvetun.direct_send import send_at_once

from ._support import RecordingSocket, SocketDescriptor, short_socket_dir


@implementer(IPushProducer)
class Producer:
    """
    A streaming producer that records whether it was paused.
    """

    def __init__(self) -> None:
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        pass


class SendAtOnceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.transport = SocketDescriptor()
        self.addCleanup(self.transport.close_sockets)

    def small_buffers(self) -> None:
        """
        Make the connection's socket buffers small, so that 8 MB cannot fit
        in them whatever the system's settings.
        """
        self.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        self.transport.peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)

    def received(self, size: int) -> bytes:
        """
        Read exactly C{size} bytes at the other end of the connection.
        """
        data = b""
        while len(data) < size:
            chunk = self.transport.peer.recv(size - len(data))
            self.assertTrue(chunk, "the connection closed early")
            data += chunk
        return data

    def test_chunks_go_out_in_one_vectored_send_when_nothing_waits(self) -> None:
        send_at_once(self.transport, (b"head", b"box"))
        self.assertEqual(self.transport.sends, [b"headbox"])
        recording = self.transport.socket
        assert isinstance(recording, RecordingSocket)
        self.assertEqual(recording.sendmsg_calls, 1)
        self.assertFalse(self.transport.waiting_for_reactor)
        self.assertEqual(self.received(7), b"headbox")

    def test_one_chunk_is_one_plain_send(self) -> None:
        send_at_once(self.transport, (b"reply",))
        self.assertEqual(self.transport.sends, [b"reply"])
        self.assertEqual(self.received(5), b"reply")

    def test_bytes_already_buffered_go_first(self) -> None:
        self.transport.write(b"earlier ")
        send_at_once(self.transport, (b"later",))
        # Nothing sent past the buffer: both wait for the reactor, in order.
        self.assertEqual(self.transport.sends, [])
        self.assertTrue(self.transport.waiting_for_reactor)
        self.transport.doWrite()
        self.assertEqual(self.received(13), b"earlier later")

    def test_what_the_socket_does_not_take_is_buffered_in_order(self) -> None:
        self.small_buffers()
        # More than the socket buffers hold.
        chunks = [bytes([n]) * 1_000_000 for n in range(8)]
        send_at_once(self.transport, chunks)
        taken = sum(len(sent) for sent in self.transport.sends)
        self.assertGreater(taken, 0)
        self.assertLess(taken, 8_000_000)
        self.assertTrue(self.transport.waiting_for_reactor)
        # The reactor would call doWrite as the socket drains.
        received = b""
        while len(received) < 8_000_000:
            received += self.transport.peer.recv(1 << 20)
            self.transport.doWrite()
        self.assertEqual(received, b"".join(chunks))
        self.assertFalse(self.transport.waiting_for_reactor)

    def test_a_producer_is_paused_when_the_rest_fills_the_buffer(self) -> None:
        self.small_buffers()
        producer = Producer()
        self.transport.registerProducer(producer, True)
        send_at_once(self.transport, [b"x" * 1_000_000] * 8)
        self.assertTrue(producer.paused)

    def test_a_producer_is_not_paused_when_the_socket_takes_it_all(self) -> None:
        producer = Producer()
        self.transport.registerProducer(producer, True)
        send_at_once(self.transport, (b"small",))
        self.assertFalse(producer.paused)

    def test_a_failed_send_is_left_to_the_reactor_which_meets_the_error(self) -> None:
        self.transport.reset_by_peer()
        send_at_once(self.transport, (b"request",))
        self.assertTrue(self.transport.waiting_for_reactor)
        # The reactor's own send fails too, and returns why, for the
        # reactor to close the connection.
        self.assertIsInstance(self.transport.doWrite(), Exception)

    def test_a_closing_transport_is_not_sent_on(self) -> None:
        self.transport.loseConnection()
        send_at_once(self.transport, (b"late",))
        self.assertEqual(self.transport.sends, [])
        self.assertTrue(self.transport.waiting_for_reactor)

    def test_a_write_side_being_shut_is_not_sent_on(self) -> None:
        self.transport.write(b"before")
        self.transport.loseWriteConnection()
        send_at_once(self.transport, (b"after",))
        self.assertEqual(self.transport.sends, [])

    def test_nothing_to_send_sends_nothing(self) -> None:
        send_at_once(self.transport, ())
        self.assertEqual(self.transport.sends, [])
        self.assertFalse(self.transport.waiting_for_reactor)


class OtherTransportTests(SynchronousTestCase):
    def test_a_transport_that_is_not_a_socket_gets_a_write_sequence(self) -> None:
        transport = StringTransport()
        send_at_once(transport, (b"head", b"box"))
        self.assertEqual(transport.value(), b"headbox")


class UnixTransportTests(TestCase):
    """
    Twisted's UNIX transport (a subclass of its TCP one) is sent on at once
    too, except while it has file descriptors queued: those must leave with
    the next bytes, which only its own send does.
    """

    async def accepted(self) -> tuple[unix.Server, socket.socket]:
        """
        A real UNIX connection: the reactor's transport of the accepted
        side, and a blocking client socket.
        """
        path = os.path.join(short_socket_dir(self), "s")
        made: Deferred[unix.Server] = Deferred()

        class Accepted(Protocol):
            def connectionMade(self) -> None:
                assert isinstance(self.transport, unix.Server)
                made.callback(self.transport)

        port = await UNIXServerEndpoint(reactor, path).listen(Factory.forProtocol(Accepted))
        self.addCleanup(port.stopListening)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(client.close)
        client.connect(path)
        transport = await made
        self.addCleanup(transport.loseConnection)
        return transport, client

    async def test_bytes_are_sent_before_the_reactor_turns(self) -> None:
        transport, client = await self.accepted()
        send_at_once(transport, (b"head", b"box"))
        # Already in the client's socket: no reactor turn has passed.
        client.setblocking(False)
        self.assertEqual(client.recv(100), b"headbox")

    async def test_queued_file_descriptors_go_with_the_bytes_through_twisted(self) -> None:
        transport, client = await self.accepted()
        reading, writing = os.pipe()
        self.addCleanup(os.close, reading)
        self.addCleanup(os.close, writing)
        transport.sendFileDescriptor(reading)
        send_at_once(transport, (b"with a descriptor",))
        client.setblocking(False)
        with self.assertRaises(BlockingIOError):
            client.recv(100)
        # The reactor's sends, from a turn later, carry both (Twisted sends
        # a descriptor with one byte, then the rest).
        data, descriptors = b"", []
        for _ in range(500):
            await deferLater(reactor, 0.01)
            try:
                more, received, _, _ = recv_fds(client, 100, 1)
            except BlockingIOError:
                continue
            data += more
            descriptors += received
            if len(data) == len(b"with a descriptor"):
                break
        for descriptor in descriptors:
            os.close(descriptor)
        self.assertEqual(data, b"with a descriptor")
        self.assertEqual(len(descriptors), 1)
