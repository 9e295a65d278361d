"""
The C{curvetun} command: keys, the registry, and C{curvetun cat} against a
real server on 127.0.0.1, run both in this process and as the program a
user runs (C{python -m curvetun}), down to the newcomer's first round trip
through C{twist curvetun}.
"""

from __future__ import annotations

import base64
import io
import os
import socket
import stat
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar, cast

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorProcess,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

import curvetun
from curvetun.cli import CatSession, run
from curvetun.endpoints import CurveTunServerEndpoint
from curvetun.errors import NotAuthorized
from curvetun.keys import format_public_key
from curvetun.registry import FileRegistry, Registry
from curvetun.service import CurveTunService
from curvetun.vault import FileVault, MemoryVault

from ._support import tcp_port

T = TypeVar("T")

# The directory that holds the curvetun package, and twisted/plugins next
# to it: "python -m curvetun" run there finds both (from a checkout and
# from site-packages alike).
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(curvetun.__file__)))

OTHER_KEY = format_public_key(MemoryVault.generate().public_key)


def run_async(coroutine: Coroutine[Any, Any, T]) -> Deferred[T]:
    return Deferred.fromCoroutine(coroutine)


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
    Runs the command line in this process, with its output captured.
    """

    def call(self, *argv: str) -> Result:
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


# -- keys ----------------------------------------------------------------------


class KeygenTests(CommandTestCase):
    """
    C{curvetun keygen} makes a private key directory and prints its public
    key; it never replaces keys unless told to.
    """

    def test_creates_private_key_directory_and_prints_public_key(self) -> None:
        keydir = os.path.join(self.temp_dir(), "keys")
        result = self.call("keygen", "--keydir", keydir)
        self.assertEqual((result.code, result.err), (0, ""))
        key = result.out.strip()
        self.assertRegex(result.out, r"^[0-9a-f]{64}\n$")
        self.assertEqual(stat.S_IMODE(os.stat(keydir).st_mode), 0o700)
        for name in ("secret.key", "nonce.key", "nonce.counter"):
            self.assertEqual(stat.S_IMODE(os.stat(os.path.join(keydir, name)).st_mode), 0o600)
        with open(os.path.join(keydir, "public.key")) as f:
            self.assertEqual(f.read().strip(), key)

    def test_uses_CURVETUN_HOME_without_keydir(self) -> None:
        home = os.path.join(self.temp_dir(), "home")
        self.set_env("CURVETUN_HOME", home)
        result = self.call("keygen")
        self.assertEqual(result.code, 0)
        with open(os.path.join(home, "public.key")) as f:
            self.assertEqual(f.read(), result.out)

    def test_refuses_to_replace_keys_without_force(self) -> None:
        keydir = self.temp_dir()
        first = self.call("keygen", "--keydir", keydir).out
        result = self.call("keygen", "--keydir", keydir)
        self.assertOneLineError(result, 1, keydir, "--force")
        self.assertEqual(result.out, "")
        self.assertEqual(self.call("pubkey", "--keydir", keydir).out, first)

    def test_force_replaces_the_key_pair(self) -> None:
        keydir = self.temp_dir()
        first = self.call("keygen", "--keydir", keydir).out
        result = self.call("keygen", "--force", "--keydir", keydir)
        self.assertEqual(result.code, 0)
        self.assertNotEqual(result.out, first)
        self.assertEqual(self.call("pubkey", "--keydir", keydir).out, result.out)

    def test_releases_the_key_directory_for_a_server(self) -> None:
        keydir = self.temp_dir()
        self.call("keygen", "--keydir", keydir)
        FileVault(keydir).close()  # would fail if keygen still held the lock


class PubkeyTests(CommandTestCase):
    """
    C{curvetun pubkey} prints the key C{keygen} printed, checks the key
    directory, and works while a server uses it.
    """

    def test_prints_the_key_keygen_printed(self) -> None:
        keydir = self.temp_dir()
        made = self.call("keygen", "--keydir", keydir)
        result = self.call("pubkey", "--keydir", keydir)
        self.assertEqual((result.code, result.out, result.err), (0, made.out, ""))

    def test_works_while_another_vault_holds_the_key_directory(self) -> None:
        keydir = self.temp_dir()
        vault = FileVault.create(keydir)
        self.addCleanup(vault.close)
        result = self.call("pubkey", "--keydir", keydir)
        self.assertEqual((result.code, result.out), (0, format_public_key(vault.public_key) + "\n"))

    def test_missing_key_directory_says_how_to_make_one(self) -> None:
        keydir = os.path.join(self.temp_dir(), "nothing-here")
        result = self.call("pubkey", "--keydir", keydir)
        self.assertOneLineError(result, 1, keydir, "curvetun keygen")
        self.assertEqual(result.out, "")

    def test_damaged_secret_key_is_named(self) -> None:
        keydir = self.temp_dir()
        self.call("keygen", "--keydir", keydir)
        with open(os.path.join(keydir, "secret.key"), "w") as f:
            f.write("not a key\n")
        self.assertOneLineError(self.call("pubkey", "--keydir", keydir), 1, "secret.key", "damaged")

    def test_public_key_of_another_pair_is_refused(self) -> None:
        keydir = self.temp_dir()
        self.call("keygen", "--keydir", keydir)
        with open(os.path.join(keydir, "public.key"), "w") as f:
            f.write(OTHER_KEY + "\n")
        self.assertOneLineError(self.call("pubkey", "--keydir", keydir), 1, "does not match")


# -- the registry ----------------------------------------------------------------


class RegistryCommandTests(CommandTestCase):
    """
    C{curvetun trust}, C{untrust} and C{peers} edit and list a registry
    file, refusing malformed input with exit status 2.
    """

    def setUp(self) -> None:
        self.keydir = self.temp_dir()
        self.registry = os.path.join(self.keydir, "registry")
        self.key = format_public_key(MemoryVault.generate().public_key)

    def on_registry(self, *argv: str) -> Result:
        """
        Run a command on this test's registry file.
        """
        return self.call(*argv, "--registry", self.registry)

    def entries(self) -> list[tuple[str, bytes]]:
        with open(self.registry) as f:
            return [(e.address, e.key) for e in Registry.parse(f.read()).entries]

    def test_trust_peers_untrust_round_trip(self) -> None:
        added = self.on_registry("trust", "127.0.0.1", self.key, "--comment", "my laptop")
        self.assertEqual(added.code, 0, added)
        self.assertIn("127.0.0.1", added.out)
        self.on_registry("trust", "10.0.0.0/8", OTHER_KEY)

        listed = self.on_registry("peers")
        self.assertEqual(listed.code, 0)
        self.assertEqual(
            listed.out.splitlines(),
            [f"127.0.0.1   {self.key}  # my laptop", f"10.0.0.0/8  {OTHER_KEY}"],
        )

        removed = self.on_registry("untrust", "127.0.0.1")
        self.assertEqual(removed.code, 0, removed)
        self.assertIn("removed 1 entry", removed.out)
        self.assertEqual(self.on_registry("peers").out, f"10.0.0.0/8  {OTHER_KEY}\n")

    def test_registry_defaults_to_the_file_in_the_key_directory(self) -> None:
        self.assertEqual(self.call("trust", "::1", self.key, "--keydir", self.keydir).code, 0)
        self.assertEqual(self.entries(), [("::1", bytes.fromhex(self.key))])
        self.assertIn(self.key, self.call("peers", "--keydir", self.keydir).out)

    def test_trust_accepts_base64_and_writes_hex(self) -> None:
        key = bytes.fromhex(self.key)
        self.on_registry("trust", "192.0.2.7", base64.b64encode(key).decode())
        self.assertEqual(self.entries(), [("192.0.2.7", key)])

    def test_trusting_an_entry_twice_keeps_one(self) -> None:
        self.on_registry("trust", "127.0.0.1", self.key)
        again = self.on_registry("trust", "127.0.0.1", self.key)
        self.assertEqual(again.code, 0)
        self.assertIn("already", again.out)
        self.assertEqual(len(self.entries()), 1)

    def test_malformed_address_exits_2_naming_it(self) -> None:
        for address in ("10.0.0.1/8", "not an address", "300.1.2.3"):
            result = self.on_registry("trust", address, self.key)
            self.assertOneLineError(result, 2, "address" if "/" not in address else "CIDR")
        self.assertFalse(os.path.exists(self.registry))

    def test_malformed_key_exits_2_naming_it(self) -> None:
        zero = "00" * 32
        for key in ("abc", "g" * 64, zero):
            result = self.on_registry("trust", "127.0.0.1", key)
            self.assertOneLineError(result, 2, "bad public key")
        self.assertOneLineError(
            self.on_registry("untrust", "127.0.0.1", "abc"), 2, "bad public key"
        )
        self.assertFalse(os.path.exists(self.registry))

    def test_multi_line_comment_exits_2(self) -> None:
        result = self.on_registry("trust", "127.0.0.1", self.key, "--comment", "a\nb")
        self.assertOneLineError(result, 2, "--comment")

    def test_host_name_entry_comes_with_a_note_that_servers_admit_by_ip(self) -> None:
        result = self.on_registry("trust", "LocalHost", self.key)
        self.assertEqual(result.code, 0)
        self.assertIn("note", result.err)
        self.assertEqual(self.entries(), [("localhost", bytes.fromhex(self.key))])

    def test_untrust_of_an_absent_entry_exits_1_and_changes_nothing(self) -> None:
        self.on_registry("trust", "127.0.0.1", self.key)
        with open(self.registry) as f:
            before = f.read()
        result = self.on_registry("untrust", "127.0.0.2")
        self.assertOneLineError(result, 1, "no entry for 127.0.0.2", "nothing removed")
        with open(self.registry) as f:
            self.assertEqual(f.read(), before)

    def test_untrust_with_a_key_removes_only_that_entry(self) -> None:
        self.on_registry("trust", "127.0.0.1", self.key)
        self.on_registry("trust", "127.0.0.1", OTHER_KEY)
        self.assertEqual(self.on_registry("untrust", "127.0.0.1", OTHER_KEY).code, 0)
        self.assertEqual(self.entries(), [("127.0.0.1", bytes.fromhex(self.key))])

    def test_peers_of_a_missing_registry_lists_nothing(self) -> None:
        result = self.on_registry("peers")
        self.assertEqual((result.code, result.out), (0, ""))
        self.assertIn("no entries", result.err)

    def test_malformed_registry_is_reported_with_its_line(self) -> None:
        with open(self.registry, "w") as f:
            f.write(f"127.0.0.1 {self.key}\n10.0.0.1/8 {self.key}\n")
        for argv in (["peers"], ["trust", "::1", self.key], ["untrust", "127.0.0.1"]):
            result = self.on_registry(*argv)
            self.assertOneLineError(result, 1, f"{self.registry}:2:")


# -- the command line --------------------------------------------------------------


COMMANDS = ("keygen", "pubkey", "trust", "untrust", "peers", "cat")


class UsageTests(CommandTestCase):
    """
    Help for every command; one line and exit status 2 for anything the
    command line gets wrong.
    """

    def test_every_command_has_help(self) -> None:
        for command in COMMANDS:
            result = self.call(command, "--help")
            self.assertEqual(result.code, 0)
            self.assertTrue(result.out.startswith(f"Usage: curvetun {command} "), result.out)

    def test_help_lists_the_commands(self) -> None:
        result = self.call("--help")
        self.assertEqual(result.code, 0)
        for command in COMMANDS:
            self.assertIn(command, result.out)

    def test_version(self) -> None:
        self.assertEqual(self.call("--version").out, f"curvetun {curvetun.__version__}\n")

    def test_no_command_exits_2(self) -> None:
        self.assertOneLineError(self.call(), 2, "no command")

    def test_unknown_command_exits_2(self) -> None:
        self.assertOneLineError(self.call("frobnicate"), 2, "frobnicate")

    def test_bench_is_a_command_with_its_own_options(self) -> None:
        self.assertIn("bench", self.call("--help").out)
        result = self.call("bench", "--frobnicate")
        self.assertEqual(result.code, 2)
        self.assertIn("--frobnicate", result.err)

    def test_unknown_option_exits_2(self) -> None:
        self.assertOneLineError(self.call("keygen", "--frobnicate"), 2, "--frobnicate")

    def test_wrong_number_of_arguments_exits_2(self) -> None:
        self.assertOneLineError(self.call("trust", "127.0.0.1"), 2, "ADDRESS KEY")
        self.assertOneLineError(self.call("pubkey", "extra"), 2, "no arguments")
        self.assertOneLineError(self.call("cat"), 2, "ENDPOINT")

    def test_bad_wait_exits_2(self) -> None:
        for wait in ("-1", "soon", "inf", "nan"):
            result = self.call("cat", "--wait", wait, "tcp:localhost:1")
            self.assertOneLineError(result, 2, "--wait")


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
    Run C{python -m curvetun ARGV} without blocking the reactor. C{stdin}
    L{None} leaves standard input open.
    """
    return getProcessOutputAndValue(  # type: ignore[no-any-return]
        sys.executable,
        ["-m", "curvetun", *argv],
        env=env,
        path=PROJECT_ROOT,
        reactor=reactor,
        stdinBytes=stdin,
    )


class ProgramTests(CommandTestCase):
    """
    The installed program (C{python -m curvetun}): exit statuses and one
    line on standard error, no traceback.
    """

    def test_usage_errors_exit_2_with_one_line(self) -> Deferred[None]:
        env = subprocess_env(self.temp_dir())

        async def go() -> None:
            for argv in (["frobnicate"], ["keygen", "--frobnicate"], []):
                out, err, code = await curvetun_process(argv, env)
                self.assertOneLineError(Result(code, out.decode(), err.decode()), 2)

        return run_async(go())

    def test_help_exits_0(self) -> Deferred[None]:
        env = subprocess_env(self.temp_dir())

        async def go() -> None:
            out, err, code = await curvetun_process(["cat", "--help"], env)
            self.assertEqual((code, err), (0, b""))
            self.assertIn(b"Usage: curvetun cat ENDPOINT", out)

        return run_async(go())

    def test_keygen_then_pubkey(self) -> Deferred[None]:
        home = self.temp_dir()
        env = subprocess_env(home)

        async def go() -> None:
            made, _, code = await curvetun_process(["keygen"], env)
            self.assertEqual(code, 0)
            keydir = os.path.join(home, ".curvetun")
            shown, _, code = await curvetun_process(["pubkey", "--keydir", keydir], env)
            self.assertEqual((code, shown), (0, made))

        return run_async(go())


# -- cat -------------------------------------------------------------------------


class _Echo(Protocol):
    """
    Echoes what it receives; closes once it has echoed C{factory.close_after}
    bytes, if that is set.
    """

    factory: _EchoFactory

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


class _EchoFactory(Factory[_Echo]):
    protocol = _Echo

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

    async def start_server(
        self, factory: IProtocolFactory | None = None, admit_client: bool = True
    ) -> None:
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
        self.port = tcp_port(port)

    def endpoint(self, key: str | None = None, port: int | None = None) -> str:
        return f"curvetun:127.0.0.1:{port or self.port}:key={key or self.server_key}"

    async def cat(self, *argv: str, stdin: bytes | None = b"") -> Result:
        argv = ("cat", "--keydir", self.client_keydir, *argv)
        out, err, code = await curvetun_process(list(argv), self.env, stdin)
        # Binary output: compare bytes through latin-1, which maps each byte.
        return Result(code, out.decode("latin-1"), err.decode())

    def test_echoes_binary_input_larger_than_a_message(self) -> Deferred[None]:
        data = bytes(range(256)) * 512 + os.urandom(100_000) + b"\x00\r\n\xff"

        async def go() -> None:
            # The server closes once it has echoed everything: no waiting.
            await self.start_server(_EchoFactory(close_after=len(data)))
            result = await self.cat("--wait", "60", self.endpoint(), stdin=data)
            self.assertEqual((result.code, result.err), (0, ""))
            self.assertEqual(result.out.encode("latin-1"), data)

        return run_async(go())

    def test_closes_after_wait_when_the_server_stays_silent(self) -> Deferred[None]:
        async def go() -> None:
            await self.start_server(_EchoFactory(silent=True))
            result = await self.cat("--wait", "0.2", self.endpoint(), stdin=b"anyone there?")
            self.assertEqual(result, Result(0, "", ""))

        return run_async(go())

    def test_ends_when_the_server_closes_even_with_input_open(self) -> Deferred[None]:
        async def go() -> None:
            await self.start_server(_EchoFactory(greeting=b"bye\n"))
            result = await self.cat("--wait", "60", self.endpoint(), stdin=None)
            self.assertEqual(result, Result(0, "bye\n", ""))

        return run_async(go())

    def test_finds_the_server_key_in_the_client_registry(self) -> Deferred[None]:
        async def go() -> None:
            await self.start_server(_EchoFactory(close_after=5))
            self.call("trust", "127.0.0.1", self.server_key, "--keydir", self.client_keydir)
            result = await self.cat(f"curvetun:127.0.0.1:{self.port}", stdin=b"hello")
            self.assertEqual(result, Result(0, "hello", ""))

        return run_async(go())

    def test_refused_connection_exits_1(self) -> Deferred[None]:
        async def go() -> None:
            await self.start_server()
            result = await self.cat(self.endpoint(port=closed_port()), stdin=b"hello")
            self.assertOneLineError(result, 1, "connection refused")

        return run_async(go())

    def test_wrong_server_key_exits_1(self) -> Deferred[None]:
        async def go() -> None:
            await self.start_server()
            result = await self.cat(self.endpoint(key=OTHER_KEY), stdin=b"hello")
            self.assertOneLineError(result, 1, "server's key does not match")
            self.assertEqual(result.out, "")

        return run_async(go())

    def test_client_not_in_the_registry_exits_1(self) -> Deferred[None]:
        async def go() -> None:
            await self.start_server(admit_client=False)
            result = await self.cat(self.endpoint(), stdin=b"hello")
            self.assertOneLineError(result, 1, "not authorized", f"--keydir {self.client_keydir}")
            self.assertEqual(result.out, "")

        return run_async(go())

    def test_missing_client_key_directory_exits_1_saying_how_to_make_one(self) -> Deferred[None]:
        async def go() -> None:
            await self.start_server()
            self.client_keydir = os.path.join(self.home, "no-such-keydir")
            result = await self.cat(self.endpoint(), stdin=b"hello")
            self.assertOneLineError(result, 1, "curvetun keygen --keydir")

        return run_async(go())

    def test_malformed_endpoint_exits_2(self) -> Deferred[None]:
        async def go() -> None:
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

        return run_async(go())


def closed_port() -> int:
    """
    A port on 127.0.0.1 that nothing listens on (it was free a moment ago).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


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


# -- the newcomer's first round trip -------------------------------------------------

NEWCOMER = """\
curvetun keygen --keydir ~/.curvetun-client
curvetun trust 127.0.0.1 "$(curvetun pubkey --keydir ~/.curvetun-client)"
echo hello | curvetun cat --keydir ~/.curvetun-client "curvetun:127.0.0.1:7700:key=$(curvetun pubkey)"
"""  # noqa: E501 (the README's commands, word for word)
"""
The README's sequence for terminal 2, word for word but for the port.
"""


class _Recorder(ProcessProtocol):
    """
    Keeps a process's output; C{ended} fires when it exits.
    """

    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)


class NewcomerTests(CommandTestCase):
    """
    From nothing to an encrypted echo: C{twist curvetun} in one process,
    the README's three commands in a shell, a fresh home directory.
    """

    def test_the_readme_gives_these_commands(self) -> None:
        with open(os.path.join(PROJECT_ROOT, "README.md"), encoding="utf-8") as f:
            self.assertIn(NEWCOMER, f.read())

    def test_twist_curvetun_and_three_commands_echo_hello(self) -> Deferred[None]:
        home = self.temp_dir()
        env = subprocess_env(home)
        port = closed_port()
        server = _Recorder()
        process = cast(IReactorProcess, reactor).spawnProcess(
            server,
            sys.executable,
            [
                sys.executable,
                "-m",
                "twisted",
                "curvetun",
                "--listen",
                f"curvetun:{port}:interface=127.0.0.1",
            ],
            env=env,
            path=PROJECT_ROOT,
        )

        async def stop() -> None:
            if not server.ended.called:
                process.signalProcess("TERM")
            await server.ended

        self.addCleanup(lambda: run_async(stop()))

        async def go() -> None:
            await wait_for_listener(port, server)
            # "curvetun" as the user's shell would find it once installed.
            script = f'curvetun() {{ "{sys.executable}" -m curvetun "$@"; }}\n' + NEWCOMER.replace(
                "7700", str(port)
            )
            out, err, code = await getProcessOutputAndValue(
                "/bin/sh", ["-c", script], env=env, path=PROJECT_ROOT, reactor=reactor
            )
            self.assertEqual(code, 0, (out, err, server.output))
            self.assertTrue(out.endswith(b"\nhello\n"), (out, err))
            self.assertTrue(os.path.exists(os.path.join(home, ".curvetun", "registry")))

        return run_async(go())


async def wait_for_listener(port: int, server: _Recorder, timeout: float = 30.0) -> None:
    """
    Wait until something accepts TCP connections on 127.0.0.1:C{port}.

    @raise AssertionError: C{server} exited, or C{timeout} passed, first.
    """
    for _ in range(int(timeout / 0.1)):
        if server.ended.called:
            raise AssertionError(f"the server exited:\n{server.output.decode(errors='replace')}")
        try:
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
            protocol = Protocol()
            await connectProtocol(endpoint, protocol)
        except Exception:
            await deferLater(reactor, 0.1, lambda: None)
        else:
            ITCPTransport(protocol.transport).abortConnection()
            return
    output = server.output.decode(errors="replace")
    raise AssertionError(f"nothing listens on port {port}:\n{output}")
