"""
C{twist curvetun --config FILE}: the TOML file of several tunnels, read
into the same L{TunnelConfig}s as the command line by the same rules;
errors that name the file, the line and the key; tunnels that share a key
directory sharing one identity; and the command run as operators run it,
with real clients.
"""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import sys
import textwrap

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import clientFromString, connectProtocol, serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from curvetun.admission import ConnectionLimits
from curvetun.config import (
    ConfigFileError,
    TunnelConfig,
    read_config_file,
)
from curvetun.errors import ServerKeyMismatch
from curvetun.keys import format_public_key
from curvetun.tap import Options
from curvetun.tunnel_service import EX_CONFIG, EX_UNAVAILABLE, EX_USAGE, Tunnels, make_service
from curvetun.vault import FileVault

from ._support import (
    SOURCE_ROOT,
    Collector,
    admit,
    listening_ports,
    make_keydir,
    parse_events,
    read_until,
    round_trip,
    run_twist,
    start_twist,
)

LOCALHOST = "interface=127.0.0.1"


def write(testcase: SynchronousTestCase, text: str, name: str = "curvetun.toml") -> str:
    """
    Write C{text} (dedented) to a config file of its own directory; its path.
    """
    directory = os.path.abspath(testcase.mktemp())
    os.makedirs(directory)
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(textwrap.dedent(text).lstrip("\n"))
    return path


def options(*argv: str) -> Options:
    parsed = Options()
    parsed.parseOptions(list(argv))
    return parsed


class ReadConfigFileTests(SynchronousTestCase):
    """
    L{read_config_file}: one L{TunnelConfig} per C{[[tunnel]]} table.
    """

    def test_each_tunnel_table_is_a_tunnel_with_the_settings_it_names(self) -> None:
        path = write(
            self,
            """
            [[tunnel]]
            name = "echo"
            listen = "curvetun:7700"
            keydir = "/srv/keys"

            [[tunnel]]
            name = "redis"
            listen = ["tcp:6380:interface=127.0.0.1", "curvetun:7701"]
            forward = "tcp:127.0.0.1:6379"
            keydir = "/srv/other"
            registry = "/srv/registry"
            grace = 3
            handshake_timeout = 2.5
            idle_timeout = 300
            max_connections = 100
            max_connections_per_address = 0
            max_handshakes = 20
            max_handshakes_per_address = 4
            send_proxy = "v2"
            """,
        )
        echo, redis = read_config_file(path)
        self.assertEqual(
            echo, TunnelConfig(keydir="/srv/keys", listen=("curvetun:7700",), name="echo")
        )
        self.assertEqual(
            redis,
            TunnelConfig(
                keydir="/srv/other",
                listen=("tcp:6380:interface=127.0.0.1", "curvetun:7701"),
                forward="tcp:127.0.0.1:6379",
                registry="/srv/registry",
                grace=3.0,
                handshake_timeout=2.5,
                idle_timeout=300.0,
                limits=ConnectionLimits(100, None, 20, 4),
                send_proxy="v2",
                name="redis",
            ),
        )

    def test_the_defaults_are_those_of_the_command_line(self) -> None:
        path = write(self, '[[tunnel]]\nlisten = "tcp:0"\n')
        home = os.path.abspath(self.mktemp())
        self.patch(os, "environ", {**os.environ, "CURVETUN_HOME": home})
        [from_file] = read_config_file(path)
        [from_options] = options("--listen", "tcp:0").tunnels
        self.assertEqual(from_file, from_options)
        self.assertIsNone(from_file.forward)  # an echo
        self.assertEqual(from_file.keydir, home)

    def test_relative_key_paths_are_taken_from_the_files_directory(self) -> None:
        path = write(self, '[[tunnel]]\nlisten = "tcp:0"\nkeydir = "keys"\nregistry = "r/reg"\n')
        [config] = read_config_file(path)
        directory = os.path.dirname(path)
        self.assertEqual(config.keydir, os.path.join(directory, "keys"))
        self.assertEqual(config.registry, os.path.join(directory, "r", "reg"))

    def test_the_example_of_the_usage_guide_reads(self) -> None:
        with open(os.path.join(SOURCE_ROOT, "docs", "usage.md")) as f:
            [example] = re.findall(r"```toml\n(.*?)```", f.read(), re.DOTALL)
        configs = read_config_file(write(self, example))
        self.assertEqual([c.name for c in configs], ["redis", "echo"])
        self.assertEqual(configs[0].send_proxy, "v2")


class ConfigFileErrorTests(SynchronousTestCase):
    """
    Every mistake in a config file is one line that starts with the file
    and the line, and names the tunnel and the key.
    """

    def fails(self, text: str) -> tuple[str, str]:
        """
        The message for a file holding C{text}, and the file's path.
        """
        path = write(self, text)
        error = self.assertRaises(ConfigFileError, read_config_file, path)
        self.assertNotIn("\n", str(error))
        self.assertLess(len(str(error)), 400 + len(path))
        return str(error), path

    def test_an_unknown_key_names_the_file_the_line_and_the_key(self) -> None:
        message, path = self.fails(
            """
            [[tunnel]]
            listen = "tcp:0"

            [[tunnel]]
            # a comment
            listen = "tcp:0"
            fowrard = "tcp:127.0.0.1:6379"
            """
        )
        self.assertEqual(
            message, f"{path}:7: tunnel 2: unknown key 'fowrard' (did you mean 'forward'?)"
        )

    def test_an_unknown_top_level_key_or_table_names_its_line(self) -> None:
        message, path = self.fails('[[tunnel]]\nlisten = "tcp:0"\n\n[listener]\nport = 1\n')
        known = "(known: tunnel, metrics, workers)"
        self.assertEqual(message, f"{path}:4: unknown key 'listener' {known}")
        message, path = self.fails('grace = 3\n[[tunnel]]\nlisten = "tcp:0"\n')
        self.assertEqual(message, f"{path}:1: unknown key 'grace' {known}")

    def test_a_quoted_or_dotted_unknown_key_is_found_too(self) -> None:
        message, path = self.fails('[[tunnel]]\nlisten = "tcp:0"\n"max conns" = 3\n')
        self.assertTrue(message.startswith(f"{path}:3: tunnel 1: unknown key 'max conns'"))
        message, path = self.fails('[[tunnel]]\nlisten = "tcp:0"\nlimits.max = 3\n')
        self.assertTrue(message.startswith(f"{path}:3: tunnel 1: unknown key 'limits'"))
        message, path = self.fails('[[tunnel]]\nlisten = "tcp:0"\n\n[tunnel.limits]\nmax = 3\n')
        self.assertTrue(message.startswith(f"{path}:4: tunnel 1: unknown key 'limits'"))

    def test_a_toml_syntax_error_gives_the_line_the_decoder_gives(self) -> None:
        message, path = self.fails('[[tunnel]]\nlisten = "tcp:0"\ngrace = \n')
        self.assertEqual(message, f"{path}:3: invalid TOML: Invalid value (column 9)")
        message, path = self.fails('[[tunnel]]\nlisten = "tcp:0\n')
        self.assertTrue(message.startswith(f"{path}:2: invalid TOML: "), message)
        message, path = self.fails('[[tunnel]]\nlisten = "tcp:0"\nlisten = "tcp:1"\n')
        self.assertTrue(message.startswith(f"{path}:"), message)
        self.assertIn("invalid TOML", message)

    def test_values_are_checked_by_the_rules_of_the_command_line(self) -> None:
        # The same check, and the same words, with the file's key for the
        # option's name.
        for key, value, argv in [
            ("grace", "-1", ["--grace", "-1"]),
            ("grace", "inf", ["--grace", "inf"]),
            ("grace", "nan", ["--grace", "nan"]),
            ("handshake_timeout", "0", ["--handshake-timeout", "0"]),
            ("idle_timeout", "-3.5", ["--idle-timeout", "-3.5"]),
            ("max_connections", "-1", ["--max-connections", "-1"]),
            ("max_handshakes", "2.5", ["--max-handshakes", "2.5"]),
            ("max_handshakes_per_address", "1" * 40, ["--max-handshakes-per-address", "1" * 40]),
            ("send_proxy", '"v3"', ["--send-proxy", "v3"]),
            ("forward", '" "', ["--forward", " "]),
            ("keydir", '""', ["--keydir", ""]),
        ]:
            message, path = self.fails(f'[[tunnel]]\nlisten = "tcp:0"\n{key} = {value}\n')
            error = self.assertRaises(usage.UsageError, options, *argv)
            self.assertEqual(
                message,
                f"{path}:3: tunnel 1: " + str(error).replace(argv[0], key),
                (key, value),
            )

    def test_an_empty_listen_is_refused_as_on_the_command_line(self) -> None:
        for value in ('""', "[]", '["tcp:0", " "]'):
            message, path = self.fails(f"[[tunnel]]\nlisten = {value}\n")
            self.assertEqual(
                message, f"{path}:2: tunnel 1: listen needs an endpoint, e.g. curvetun:7700"
            )

    def test_values_of_the_wrong_type_are_refused(self) -> None:
        for line, expected in [
            ("listen = 7700", "listen must be an endpoint string or a list of them"),
            ('listen = ["tcp:0", 1]', "listen must be an endpoint string or a list of them"),
            ("forward = 6379", "forward must be a string, not an integer"),
            ("send_proxy = 2", "send_proxy must be a string, not an integer"),
            ('grace = "10"', "grace must be a number, not a string"),
            ("max_connections = true", "max_connections must be a number, not a boolean"),
            ("keydir = {path = '/x'}", "keydir must be a string, not a table"),
        ]:
            text = f"[[tunnel]]\n{line}\n" if line.startswith("listen") else None
            text = text or f'[[tunnel]]\nlisten = "tcp:0"\n{line}\n'
            message, path = self.fails(text)
            number = 2 if line.startswith("listen") else 3
            self.assertEqual(message, f"{path}:{number}: tunnel 1: {expected}")

    def test_listen_is_required(self) -> None:
        message, path = self.fails('[[tunnel]]\nlisten = "tcp:0"\n\n[[tunnel]]\nname = "x"\n')
        self.assertEqual(
            message,
            f"{path}:4: tunnel 2: listen is required (an endpoint string or a list of them)",
        )

    def test_a_file_without_tunnels_is_refused(self) -> None:
        for text in ("", "# nothing\n", "tunnel = []\n"):
            message, path = self.fails(text)
            self.assertEqual(message, f"{path}: no [[tunnel]] table: describe at least one tunnel")
        message, path = self.fails(
            '# one table, not an array of them\n[tunnel]\nlisten = "tcp:0"\n'
        )
        self.assertEqual(message, f"{path}:2: 'tunnel' must be tables written [[tunnel]]")

    def test_two_tunnels_cannot_have_one_name(self) -> None:
        message, path = self.fails(
            '[[tunnel]]\nname = "a"\nlisten = "tcp:0"\n[[tunnel]]\nname = "a"\nlisten = "tcp:0"\n'
        )
        self.assertEqual(message, f"{path}:5: tunnel 2: name 'a' is that of tunnel 1 too")

    def test_a_number_of_thousands_of_digits_is_one_short_line(self) -> None:
        message, path = self.fails(f'[[tunnel]]\nlisten = "tcp:0"\ngrace = {"9" * 5000}\n')
        self.assertEqual(message, f"{path}:3: a number of thousands of digits")

    def test_a_file_that_cannot_be_read_or_is_not_utf8_is_refused(self) -> None:
        missing = os.path.abspath(self.mktemp())
        error = self.assertRaises(ConfigFileError, read_config_file, missing)
        self.assertEqual(
            str(error), f"{missing}: cannot read the config file: No such file or directory"
        )
        path = write(self, "")
        with open(path, "wb") as f:
            f.write(b'[[tunnel]]\nname = "caf\xe9"\n')
        error = self.assertRaises(ConfigFileError, read_config_file, path)
        self.assertEqual(str(error), f"{path}:2: not UTF-8 text (TOML files are UTF-8)")

    def test_a_multiline_string_does_not_hide_or_fake_key_lines(self) -> None:
        message, path = self.fails(
            '[[tunnel]]\nlisten = "tcp:0"\nname = """\nfowrard = 1\n"""\nfowrard = 2\n'
        )
        self.assertTrue(message.startswith(f"{path}:6: tunnel 1: unknown key 'fowrard'"))


class ConfigOptionTests(SynchronousTestCase):
    """
    C{--config} on the command line: nothing else that describes a tunnel
    may come with it.
    """

    def test_config_alone_leaves_the_tunnels_to_the_file(self) -> None:
        parsed = options("--config", "/etc/curvetun.toml")
        self.assertEqual(parsed["config"], "/etc/curvetun.toml")
        self.assertEqual(parsed.tunnels, [])

    def test_every_tunnel_option_is_refused_with_config(self) -> None:
        for argv in (
            ["--listen", "tcp:0"],
            ["--forward", "tcp:127.0.0.1:1"],
            ["--keydir", "/k"],
            ["--registry", "/r"],
            ["--grace", "1"],
            ["--handshake-timeout", "1"],
            ["--idle-timeout", "1"],
            ["--max-connections", "1"],
            ["--max-connections-per-address", "1"],
            ["--max-handshakes", "1"],
            ["--max-handshakes-per-address", "1"],
            ["--send-proxy", "v1"],
        ):
            error = self.assertRaises(usage.UsageError, options, "--config", "/c.toml", *argv)
            self.assertEqual(
                str(error),
                f"--config cannot be combined with {argv[0]}: "
                "set it in the config file's [[tunnel]] tables",
            )

    def test_an_empty_config_path_is_refused(self) -> None:
        error = self.assertRaises(usage.UsageError, options, "--config", "")
        self.assertEqual(str(error), "--config needs a path")


class SharedIdentityTests(TestCase):
    """
    Tunnels that name the same key directory share one identity: one
    vault (and its lock and nonce counter), one registry, one
    L{CurveTunService}; tunnels of different directories each use their
    own, also for endpoint strings that name none.
    """

    def setUp(self) -> None:
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)

    def build(self, text: str) -> Tunnels:
        service = make_service(read_config_file(write(self, text)), reactor, environ={})
        self.addCleanup(service.release)
        return service

    def exits(self, text: str) -> tuple[int, str]:
        path = write(self, text)
        configs = read_config_file(path)
        error = self.assertRaises(SystemExit, make_service, configs, reactor, {})
        [line] = self.stderr.getvalue().splitlines()
        assert isinstance(error.code, int), error.code
        return error.code, line.replace(path, "FILE")

    async def test_tunnels_naming_one_key_directory_run_one_identity(self) -> None:
        keydir, key = make_keydir(self)
        service = self.build(
            f"""
            [[tunnel]]
            listen = "tcp:0:{LOCALHOST}"
            keydir = "{keydir}"
            [[tunnel]]
            listen = "curvetun:0:{LOCALHOST}"
            keydir = "{keydir}/"
            """
        )
        [identity] = service.identities
        self.assertEqual(identity.service.vault.public_key, key)
        self.assertEqual([t.identity for t in service.tunnels], [identity.service] * 2)
        service.startService()
        self.assertTrue(all(listener.port for t in service.tunnels for listener in t.listeners))
        await service.stopService()
        FileVault(keydir).close()  # released

    async def test_curvetun_strings_naming_no_keydir_are_their_own_tunnels(self) -> None:
        first, first_key = make_keydir(self)
        second, second_key = make_keydir(self)
        client, client_key = make_keydir(self)
        for keydir in (first, second):
            admit(keydir, client_key)
        service = self.build(
            f"""
            [[tunnel]]
            listen = "curvetun:0:{LOCALHOST}"
            keydir = "{first}"
            [[tunnel]]
            listen = "curvetun:0:{LOCALHOST}"
            keydir = "{second}"
            """
        )
        service.startService()
        self.addCleanup(service.stopService)
        ports = [t.listeners[0].port for t in service.tunnels]
        hosts = [port.getHost() for port in ports if port is not None]
        for host, key, wrong in (
            (hosts[0], first_key, second_key),
            (hosts[1], second_key, first_key),
        ):
            endpoint = f"curvetun:127.0.0.1:{host.port}:keydir={client}"  # type: ignore[attr-defined]
            collector = Collector()
            await connectProtocol(
                clientFromString(reactor, f"{endpoint}:key={format_public_key(key)}"), collector
            )
            self.assertEqual(await round_trip(collector, b"whose?"), b"whose?")
            assert collector.transport is not None
            collector.transport.loseConnection()
            await collector.lost
            failing = connectProtocol(
                clientFromString(reactor, f"{endpoint}:key={format_public_key(wrong)}"), Protocol()
            )
            await self.assertFailure(failing, ServerKeyMismatch)

    def test_one_key_directory_with_two_registries_is_refused(self) -> None:
        keydir, _ = make_keydir(self)
        status, line = self.exits(
            f"""
            [[tunnel]]
            listen = "tcp:0"
            keydir = "{keydir}"
            [[tunnel]]
            listen = "tcp:0"
            keydir = "{keydir}"
            registry = "{keydir}/other"
            """
        )
        self.assertEqual(status, EX_USAGE)
        self.assertEqual(
            line,
            f"twist curvetun: FILE:7: tunnel 2: key directory {keydir} is that of tunnel 1 too, "
            "with another registry: tunnels that share a key directory share its registry",
        )

    def test_tunnels_of_one_key_directory_must_agree_on_its_timeouts_and_limits(self) -> None:
        keydir, _ = make_keydir(self)
        status, line = self.exits(
            f"""
            [[tunnel]]
            listen = "tcp:0"
            keydir = "{keydir}"
            [[tunnel]]
            listen = "tcp:0"
            keydir = "{keydir}"
            max_handshakes = 3
            """
        )
        self.assertEqual(status, EX_USAGE)
        self.assertEqual(
            line,
            "twist curvetun: FILE:7: tunnel 2: max_handshakes is not that of tunnel 1, which has "
            "the same key directory: tunnels that share a key directory share its timeouts and "
            "limits",
        )

    def test_an_endpoint_error_names_the_file_the_line_and_the_tunnel(self) -> None:
        keydir, _ = make_keydir(self)
        status, line = self.exits(
            f'[[tunnel]]\nlisten = "tcp:0"\nkeydir = "{keydir}"\n'
            f'[[tunnel]]\nkeydir = "{keydir}"\nlisten = ["tcp:0", "foo:1"]\n'
        )
        self.assertEqual(status, EX_USAGE)
        self.assertEqual(
            line,
            "twist curvetun: FILE:6: tunnel 2: bad listen endpoint 'foo:1': "
            "Unknown endpoint type: 'foo'",
        )
        FileVault(keydir).close()  # released after the error

    def test_a_port_in_use_names_the_line_of_listen_and_releases_the_keys(self) -> None:
        keydir, _ = make_keydir(self)
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        path = write(
            self,
            f'[[tunnel]]\nkeydir = "{keydir}"\nlisten = ["tcp:0:{LOCALHOST}", "tcp:{port}:{LOCALHOST}"]\n',  # noqa: E501
        )
        service = make_service(read_config_file(path), reactor, environ={})
        error = self.assertRaises(SystemExit, service.startService)
        self.assertEqual(error.code, EX_UNAVAILABLE)
        [line] = self.stderr.getvalue().splitlines()
        self.assertTrue(
            line.startswith(f"twist curvetun: {path}:3: tunnel 1: cannot listen on tcp:{port}"),
            line,
        )
        FileVault(keydir).close()  # released

    def test_an_unusable_key_directory_names_the_line_of_keydir(self) -> None:
        not_a_directory = os.path.abspath(self.mktemp())
        with open(not_a_directory, "w") as f:
            f.write("a file\n")
        status, line = self.exits(f'[[tunnel]]\nlisten = "tcp:0"\nkeydir = "{not_a_directory}"\n')
        self.assertEqual(status, EX_CONFIG)
        self.assertTrue(
            line.startswith(
                f"twist curvetun: FILE:3: tunnel 1: cannot create key directory {not_a_directory}"
            ),
            line,
        )


class Backend(Protocol):
    """
    A TCP backend that answers every read with C{backend:} and the bytes.
    """

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(b"backend:" + data)


class ConfigCommandTests(TestCase):
    """
    C{twist curvetun --config FILE} run as a process, with real clients.
    """

    def setUp(self) -> None:
        self.home = os.path.abspath(self.mktemp())

    async def test_two_tunnels_an_echo_and_a_forward_serve_real_clients(self) -> None:
        server_keydir, _ = make_keydir(self)
        client_keydir, client_key = make_keydir(self)
        admit(server_keydir, client_key)
        backend_port = await serverFromString(reactor, f"tcp:0:{LOCALHOST}").listen(
            Factory.forProtocol(Backend)
        )
        self.addCleanup(backend_port.stopListening)
        address = backend_port.getHost()
        assert isinstance(address, IPv4Address), address
        backend = address.port
        # Both tunnels name one key directory: one identity, one key.
        path = write(
            self,
            f"""
            [[tunnel]]
            name = "echo"
            listen = "curvetun:0:{LOCALHOST}"
            keydir = "{server_keydir}"

            [[tunnel]]
            name = "backend"
            listen = ["curvetun:0:{LOCALHOST}", "tcp:0:{LOCALHOST}"]
            forward = "tcp:127.0.0.1:{backend}"
            keydir = "{server_keydir}"
            """,
        )
        process = start_twist(self, self.home, "--config", path)
        output = read_until(process, b"", "Listening on", count=3)
        events = parse_events(output)
        [announced] = [e for e in events if e["log_format"].startswith("curvetun public key")]
        server_key = announced["public_key"]
        echo_port, forward_port, tcp_port = listening_ports(output)

        async def through(port: int, data: bytes, expected: bytes) -> None:
            collector = Collector()
            endpoint = f"curvetun:127.0.0.1:{port}:key={server_key}:keydir={client_keydir}"
            await connectProtocol(clientFromString(reactor, endpoint), collector)
            self.assertEqual(await round_trip(collector, data), expected)
            assert collector.transport is not None
            collector.transport.loseConnection()
            await collector.lost

        await through(echo_port, b"ping", b"ping")
        await through(forward_port, b"ping", b"backend:ping")
        plain = Collector()
        await connectProtocol(clientFromString(reactor, f"tcp:127.0.0.1:{tcp_port}"), plain)
        self.assertEqual(await round_trip(plain, b"hi"), b"backend:hi")
        assert plain.transport is not None
        plain.transport.loseConnection()
        await plain.lost

        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
        formats = [e["log_format"] for e in parse_events(output + stdout)]
        self.assertEqual(formats.count("curvetun stopped"), 1)
        self.assertNotIn(b"Traceback", output + stdout + stderr)
        self.assertEqual(process.returncode, -signal.SIGTERM)

    def test_a_mistake_in_the_file_is_one_line_and_status_64(self) -> None:
        path = write(self, '[[tunnel]]\nlisten = "tcp:0"\nfowrard = "tcp:127.0.0.1:1"\n')
        result = run_twist(self.home, "--config", path)
        self.assertEqual(result.returncode, EX_USAGE, result.stderr)
        self.assertEqual(
            result.stderr,
            f"twist curvetun: {path}:3: tunnel 1: unknown key 'fowrard' (did you mean 'forward'?)\n",  # noqa: E501
        )

    def test_a_toml_syntax_error_is_one_line_with_its_line_and_status_64(self) -> None:
        path = write(self, '[[tunnel]]\nlisten = "tcp:0"\n\ngrace = = 3\n')
        result = run_twist(self.home, "--config", path)
        self.assertEqual(result.returncode, EX_USAGE, result.stderr)
        self.assertEqual(
            result.stderr, f"twist curvetun: {path}:4: invalid TOML: Invalid value (column 9)\n"
        )

    def test_a_tunnel_option_with_config_is_a_usage_error(self) -> None:
        path = write(self, '[[tunnel]]\nlisten = "tcp:0"\n')
        result = run_twist(self.home, "--config", path, "--listen", "tcp:1")
        self.assertEqual(result.returncode, EX_USAGE, result.stderr)
        self.assertEqual(
            result.stderr.splitlines()[0],
            "Error: --config cannot be combined with --listen: "
            "set it in the config file's [[tunnel]] tables",
        )
        self.assertNotIn("Traceback", result.stderr)

    def test_an_unusable_key_directory_in_the_file_is_status_78(self) -> None:
        keydir, _ = make_keydir(self)
        os.chmod(os.path.join(keydir, "secret.key"), 0o644)
        path = write(self, f'[[tunnel]]\nlisten = "tcp:0"\n\nkeydir = "{keydir}"\n')
        result = run_twist(self.home, "--config", path)
        self.assertEqual(result.returncode, EX_CONFIG, result.stderr)
        [line] = result.stderr.splitlines()
        self.assertTrue(line.startswith(f"twist curvetun: {path}:4: tunnel 1: "), line)
        self.assertIn("secret.key is accessible to group or others", line)
