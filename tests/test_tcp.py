"""
curvetun over real TCP on 127.0.0.1, through the message API: what fakes
cannot show (frames split by the kernel, real close, real refusal).
"""

from __future__ import annotations

from twisted.internet.defer import gatherResults
from twisted.internet.interfaces import ITCPTransport

from curvetun.errors import ConnectionClosed, MessageTooLong, NotAuthorized, ServerKeyMismatch
from curvetun.packets import MAX_MESSAGE
from curvetun.vault import MemoryVault

from ._support import LoopbackTestCase


class LoopbackMessageTests(LoopbackTestCase):
    """
    Messages over real TCP arrive whole, in order, in both directions.
    """

    async def test_a_thousand_messages_each_way_arrive_in_order(self) -> None:
        await self.start()
        client, server = await self.pair()
        expected = [b"message %d " % n * (n % 7) for n in range(1000)]
        for message in expected:
            client.send(message)
            server.send(message[::-1])
        at_server = [await server.recv() for _ in expected]
        at_client = [await client.recv() for _ in expected]
        self.assertEqual(at_server, expected)
        self.assertEqual(at_client, [m[::-1] for m in expected])

    async def test_the_largest_and_the_empty_message_cross_intact(self) -> None:
        await self.start()
        client, server = await self.pair()
        largest = bytes(range(256)) * (MAX_MESSAGE // 256) + b"!" * (MAX_MESSAGE % 256)
        for message in (largest, b"", largest[::-1]):
            await client.send(message)
        self.assertEqual(await server.recv(), largest)
        self.assertEqual(await server.recv(), b"")
        self.assertEqual(await server.recv(), largest[::-1])

    async def test_pending_receives_are_served_in_the_order_they_were_made(self) -> None:
        await self.start()
        client, server = await self.pair()
        waiting = [server.recv() for _ in range(3)]
        for message in (b"first", b"second", b"third"):
            client.send(message)
        self.assertEqual(await gatherResults(waiting), [b"first", b"second", b"third"])

    async def test_each_side_knows_the_others_key(self) -> None:
        await self.start()
        client, server = await self.pair()
        self.assertEqual(client.peer_public_key, self.server_vault.public_key)
        self.assertEqual(server.peer_public_key, self.client_vault.public_key)

    async def test_nagle_is_off_on_both_ends(self) -> None:
        """
        Each handshake step is a small packet waiting for an answer: with
        Nagle's algorithm on, each would wait for a delayed ACK.
        """
        await self.start()
        client, server = await self.pair()
        for channel in (client, server):
            self.assertTrue(ITCPTransport(channel.transport.transport).getTcpNoDelay())

    async def test_sending_too_much_in_one_message_fails_clearly(self) -> None:
        await self.start()
        client, server = await self.pair()
        with self.assertRaises(MessageTooLong):
            await client.send(b"x" * (MAX_MESSAGE + 1))

    async def test_receive_after_the_peer_closed_fails_at_once(self) -> None:
        await self.start()
        client, server = await self.pair()
        await client.send(b"bye")
        await client.close()
        self.assertEqual(await server.recv(), b"bye")
        with self.assertRaises(ConnectionClosed):
            await server.recv()
        with self.assertRaises(ConnectionClosed):
            await server.recv()

    async def test_a_pending_receive_fails_when_the_peer_closes(self) -> None:
        await self.start()
        client, server = await self.pair()
        pending = server.recv()
        await client.close()
        with self.assertRaises(ConnectionClosed):
            await pending


class LoopbackRefusalTests(LoopbackTestCase):
    """
    Over real TCP, a client hears why it was refused.
    """

    async def test_a_wrong_server_key_is_reported(self) -> None:
        await self.start()
        with self.assertRaises(ServerKeyMismatch) as raised:
            await self.connect(server_key=MemoryVault.generate().public_key)
        self.assertIn("after our hello", str(raised.exception))

    async def test_an_unknown_client_is_told_it_is_not_authorized(self) -> None:
        await self.start(admit_client=False)
        client = await self.connect()
        with self.assertRaises(NotAuthorized) as raised:
            await client.recv()
        self.assertIn("registry", str(raised.exception))
