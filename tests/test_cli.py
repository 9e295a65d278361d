"""
The C{curvetun} command line (L{curvetun.cli}): its grammar, help, exit
statuses and one-line errors, in this process and as the program a user
runs (C{python -m curvetun}), down to the newcomer's first round trip
through C{twist curvetun}. Each command group has its own module:
C{test_cli_keys}, C{test_cli_registry}, C{test_cli_cat}.
"""

from __future__ import annotations

import os
import sys

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure

import curvetun
from curvetun.keys import format_public_key
from curvetun.vault import MemoryVault

from ._support import (
    PROJECT_ROOT,
    CommandTestCase,
    Result,
    closed_port,
    curvetun_process,
    subprocess_env,
)

COMMANDS = ("keygen", "pubkey", "trust", "untrust", "peers", "cat")

KEY = format_public_key(MemoryVault.generate().public_key)


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

    def test_options_after_an_argument_exit_2_saying_options_come_first(self) -> None:
        """
        The first argument ends a command's options (usage.Options'
        grammar): an option after it is refused, naming the option and the
        command's synopsis, and never taken for an argument.
        """
        registry = os.path.join(self.temp_dir(), "registry")
        for argv, option in [
            (["trust", "127.0.0.1", KEY, "--comment", "laptop"], "--comment"),
            (["trust", "127.0.0.1", "--comment=laptop", KEY], "--comment"),
            (["untrust", "127.0.0.1", "--registry", registry], "--registry"),
            (["pubkey", "--keydir", self.temp_dir(), "extra", "-h"], "-h"),
            (["cat", "tcp:localhost:1", "--wait", "1"], "--wait"),
        ]:
            result = self.call(*argv)
            self.assertOneLineError(
                result, 2, f"option {option} after an argument", "options come first"
            )
            self.assertIn(f"curvetun {argv[0]} [", result.err)
        # Written first, the same options work.
        self.assertEqual(
            self.call("trust", "--registry", registry, "--comment", "x", "127.0.0.1", KEY).code, 0
        )

    def test_help_shows_options_before_arguments(self) -> None:
        for command, synopsis in [
            ("trust", "[--comment TEXT] [--keydir DIR] [--registry FILE] ADDRESS KEY"),
            ("untrust", "[--keydir DIR] [--registry FILE] ADDRESS [KEY]"),
            ("cat", "[--keydir DIR] [--wait SECONDS] ENDPOINT"),
        ]:
            self.assertIn(
                f"Usage: curvetun {command} {synopsis}\n", self.call(command, "--help").out
            )

    def test_bad_wait_exits_2(self) -> None:
        for wait in ("-1", "soon", "inf", "nan"):
            result = self.call("cat", "--wait", wait, "tcp:localhost:1")
            self.assertOneLineError(result, 2, "--wait")


class ProgramTests(CommandTestCase):
    """
    The installed program (C{python -m curvetun}): exit statuses and one
    line on standard error, no traceback.
    """

    async def test_usage_errors_exit_2_with_one_line(self) -> None:
        env = subprocess_env(self.temp_dir())

        for argv in (
            ["frobnicate"],
            ["keygen", "--frobnicate"],
            [],
            ["cat", "tcp:x:1", "--wait=1"],
        ):
            out, err, code = await curvetun_process(argv, env)
            self.assertOneLineError(Result(code, out.decode(), err.decode()), 2)

    async def test_help_exits_0(self) -> None:
        env = subprocess_env(self.temp_dir())

        out, err, code = await curvetun_process(["cat", "--help"], env)
        self.assertEqual((code, err), (0, b""))
        self.assertIn(b"Usage: curvetun cat [--keydir DIR] [--wait SECONDS] ENDPOINT", out)

    async def test_keygen_then_pubkey(self) -> None:
        home = self.temp_dir()
        env = subprocess_env(home)

        made, _, code = await curvetun_process(["keygen"], env)
        self.assertEqual(code, 0)
        keydir = os.path.join(home, ".curvetun")
        shown, _, code = await curvetun_process(["pubkey", "--keydir", keydir], env)
        self.assertEqual((code, shown), (0, made))


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

    async def test_twist_curvetun_and_three_commands_echo_hello(self) -> None:
        home = self.temp_dir()
        env = subprocess_env(home)
        port = closed_port()
        server = _Recorder()
        process = reactor.spawnProcess(
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

        self.addCleanup(lambda: Deferred.fromCoroutine(stop()))

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
            assert isinstance(protocol, Protocol)
            ITCPTransport(protocol.transport).abortConnection()
            return
    output = server.output.decode(errors="replace")
    raise AssertionError(f"nothing listens on port {port}:\n{output}")
