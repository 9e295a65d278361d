"""
C{curvetun cat} (L{curvetun.cli.cat}): as a subprocess against a real
server on 127.0.0.1, and its session logic with fakes.
"""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from curvetun.cli.cat import CatSession
from curvetun.endpoints import CurveTunServerEndpoint
from curvetun.errors import NotAuthorized
from curvetun.keys import format_public_key
from curvetun.registry import FileRegistry
from curvetun.service import CurveTunService
from curvetun.vault import FileVault, MemoryVault

from ._support import CommandTestCase, Result, closed_port, curvetun_process, subprocess_env

OTHER_KEY = format_public_key(MemoryVault.generate().public_key)


class _Echo(Protocol):
    """
    Echoes what it receives; closes once it has echoed C{factory.close_after}
    bytes, if that is set.
    """

    def __init__(self, factory: _EchoFactory) -> None:
        self.factory = factory

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.count = 0
        if self.factory.greeting:
            self.transport.write(self.factory.greeting)
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        if self.factory.silent:
            return
        self.transport.write(data)
        self.count += len(data)
        if self.factory.close_after is not None and self.count >= self.factory.close_after:
            self.transport.loseConnection()


class _EchoFactory(Factory):
    def buildProtocol(self, addr: object) -> _Echo:
        return _Echo(self)

    def __init__(
        self, close_after: int | None = None, silent: bool = False, greeting: bytes = b""
    ) -> None:
        self.close_after = close_after
        self.silent = silent
        self.greeting = greeting


class CatTests(CommandTestCase):
    """
    C{curvetun cat} as a subprocess against a curvetun server in this
    process, over TCP on 127.0.0.1.
    """

    async def start_server(self, factory: Factory | None = None, admit_client: bool = True) -> None:
        base = self.temp_dir()
        self.home = os.path.join(base, "home")
        os.makedirs(self.home)
        self.env = subprocess_env(self.home)
        self.client_keydir = os.path.join(base, "client")
        client = FileVault.create(self.client_keydir)
        client.close()  # the subprocess takes it
        self.client_key = format_public_key(client.public_key)

        service = CurveTunService.from_keydir(os.path.join(base, "server"), create=True)
        self.server_key = format_public_key(service.vault.public_key)
        if admit_client:
            assert isinstance(service.registry, FileRegistry)
            service.registry.add("127.0.0.1", client.public_key)
        service.startService()
        self.addCleanup(service.vault.close)  # type: ignore[attr-defined]
        self.addCleanup(service.stopService)
        endpoint = CurveTunServerEndpoint(
            TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), service
        )
        port: IListeningPort = await endpoint.listen(factory or _EchoFactory())
        self.addCleanup(port.stopListening)
        address = port.getHost()
        assert isinstance(address, IPv4Address)
        self.port = address.port

    def endpoint(self, key: str | None = None, port: int | None = None) -> str:
        return f"curvetun:127.0.0.1:{port or self.port}:key={key or self.server_key}"

    async def cat(self, *argv: str, stdin: bytes | None = b"") -> Result:
        argv = ("cat", "--keydir", self.client_keydir, *argv)
        out, err, code = await curvetun_process(list(argv), self.env, stdin)
        # Binary output: compare bytes through latin-1, which maps each byte.
        return Result(code, out.decode("latin-1"), err.decode())

    async def test_echoes_binary_input_larger_than_a_message(self) -> None:
        data = bytes(range(256)) * 512 + os.urandom(100_000) + b"\x00\r\n\xff"

        # The server closes once it has echoed everything: no waiting.
        await self.start_server(_EchoFactory(close_after=len(data)))
        result = await self.cat("--wait", "60", self.endpoint(), stdin=data)
        self.assertEqual((result.code, result.err), (0, ""))
        self.assertEqual(result.out.encode("latin-1"), data)

    async def test_closes_after_wait_when_the_server_stays_silent(self) -> None:
        await self.start_server(_EchoFactory(silent=True))
        result = await self.cat("--wait", "0.2", self.endpoint(), stdin=b"anyone there?")
        self.assertEqual(result, Result(0, "", ""))

    async def test_ends_when_the_server_closes_even_with_input_open(self) -> None:
        await self.start_server(_EchoFactory(greeting=b"bye\n"))
        result = await self.cat("--wait", "60", self.endpoint(), stdin=None)
        self.assertEqual(result, Result(0, "bye\n", ""))

    async def test_finds_the_server_key_in_the_client_registry(self) -> None:
        await self.start_server(_EchoFactory(close_after=5))
        self.call("trust", "--keydir", self.client_keydir, "127.0.0.1", self.server_key)
        result = await self.cat(f"curvetun:127.0.0.1:{self.port}", stdin=b"hello")
        self.assertEqual(result, Result(0, "hello", ""))

    async def test_refused_connection_exits_1(self) -> None:
        await self.start_server()
        port = closed_port()
        result = await self.cat(self.endpoint(port=port), stdin=b"hello")
        # The endpoint string, as typed, names the server.
        self.assertOneLineError(result, 1, "connection refused by", f"curvetun:127.0.0.1:{port}")

    async def test_a_keydir_in_the_endpoint_string_is_used_without_keydir(self) -> None:
        await self.start_server(_EchoFactory(close_after=5))
        endpoint = f"{self.endpoint()}:keydir={self.client_keydir}"
        out, err, code = await curvetun_process(["cat", endpoint], self.env, b"hello")
        self.assertEqual((code, out, err), (0, b"hello", b""))

    def test_a_keydir_in_the_endpoint_string_that_disagrees_with_keydir_exits_2(self) -> None:
        keydir = self.temp_dir()
        FileVault.create(keydir).close()
        endpoint = f"curvetun:127.0.0.1:1:key={OTHER_KEY}:keydir={keydir}-other"
        result = self.call("cat", "--keydir", keydir, endpoint)
        self.assertOneLineError(result, 2, "keydir=", "disagrees with the key directory")

    async def test_wrong_server_key_exits_1(self) -> None:
        await self.start_server()
        result = await self.cat(self.endpoint(key=OTHER_KEY), stdin=b"hello")
        self.assertOneLineError(result, 1, "server's key does not match")
        self.assertEqual(result.out, "")

    async def test_client_not_in_the_registry_exits_1(self) -> None:
        await self.start_server(admit_client=False)
        result = await self.cat(self.endpoint(), stdin=b"hello")
        self.assertOneLineError(result, 1, "not authorized", f"--keydir {self.client_keydir}")
        self.assertEqual(result.out, "")

    async def test_missing_client_key_directory_exits_1_saying_how_to_make_one(self) -> None:
        await self.start_server()
        self.client_keydir = os.path.join(self.home, "no-such-keydir")
        result = await self.cat(self.endpoint(), stdin=b"hello")
        self.assertOneLineError(result, 1, "curvetun keygen --keydir")

    async def test_malformed_endpoint_exits_2(self) -> None:
        await self.start_server()
        for endpoint in (
            "curvetun:127.0.0.1:notaport:key=" + self.server_key,
            f"curvetun:127.0.0.1:{self.port}:key=abc",
            f"curvetun:127.0.0.1:{self.port}:colour=blue",
            "nosuchtype:127.0.0.1:1",
            "tcp:127.0.0.1",
            "curvetun:127.0.0.1:1\\",
        ):
            result = await self.cat(endpoint, stdin=b"hello")
            self.assertOneLineError(result, 2)


class _FakeStdio(StringTransport):
    """
    Standard I/O for a L{CatSession}: a string transport that records the
    protocol it is connected to.
    """

    def __init__(self, protocol: Protocol) -> None:
        super().__init__()
        self.protocol = protocol
        protocol.makeConnection(self)


class CatSessionTests(SynchronousTestCase):
    """
    L{CatSession} joins standard I/O to a connection: flow control both
    ways, and an end that waits for the server and for the output.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.session = CatSession(self.clock, 2.0, self.open_stdio)
        self.network = StringTransport()
        self.session.connected(self.network)
        self.outcome: list[Failure | None] = []
        self.session.done.addBoth(self.outcome.append)

    def open_stdio(self, protocol: Protocol) -> _FakeStdio:
        self.stdio = _FakeStdio(protocol)
        return self.stdio

    def test_registers_each_side_as_the_others_producer(self) -> None:
        self.assertIs(self.network.producer, self.stdio)
        self.assertIs(self.stdio.producer, self.network)
        self.assertTrue(self.network.streaming and self.stdio.streaming)

    def test_input_is_sent_and_messages_are_written_out(self) -> None:
        self.stdio.protocol.dataReceived(b"\x00question")
        self.session.received(b"\xffanswer")
        self.assertEqual(self.network.value(), b"\x00question")
        self.assertEqual(self.stdio.value(), b"\xffanswer")

    def test_closes_when_wait_passes_after_end_of_input(self) -> None:
        self.stdio.protocol.readConnectionLost()  # type: ignore[attr-defined]
        self.assertIsNone(self.network.producer)
        self.clock.advance(1.9)
        self.assertFalse(self.network.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(self.network.disconnecting)

    def test_each_message_after_end_of_input_restarts_the_wait(self) -> None:
        self.stdio.protocol.readConnectionLost()  # type: ignore[attr-defined]
        self.clock.advance(1.5)
        self.session.received(b"more")
        self.clock.advance(1.5)
        self.assertFalse(self.network.disconnecting)
        self.clock.advance(0.5)
        self.assertTrue(self.network.disconnecting)

    def test_does_not_close_before_end_of_input(self) -> None:
        self.clock.advance(1000)
        self.assertFalse(self.network.disconnecting)

    def test_done_once_output_is_flushed_after_the_server_closes(self) -> None:
        self.session.connection_ended(Failure(ConnectionDone()))
        self.assertTrue(self.stdio.disconnecting)
        self.assertIsNone(self.stdio.producer)
        self.assertEqual(self.outcome, [])
        self.stdio.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.outcome, [None])

    def test_a_failed_connection_fails_done(self) -> None:
        self.session.connection_ended(Failure(NotAuthorized("no")))
        self.stdio.protocol.connectionLost(Failure(ConnectionDone()))
        [failure] = self.outcome
        assert isinstance(failure, Failure)
        self.assertTrue(failure.check(NotAuthorized))

    def test_lost_output_closes_the_connection(self) -> None:
        self.stdio.protocol.writeConnectionLost()  # type: ignore[attr-defined]
        self.assertTrue(self.network.disconnecting)
        self.assertEqual(self.outcome, [])
        self.session.connection_ended(Failure(ConnectionDone()))
        self.assertEqual(self.outcome, [None])
