"""
C{twist curvetun}: its options, the service it builds, echo and two-hop
tunnels over real TCP on 127.0.0.1, graceful stop, and the command itself
run as a process.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time

import attrs
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import error as internet_error
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    clientFromString,
    connectProtocol,
)
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, LoopingCall
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, LogLevel
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from curvetun.admission import ConnectionLimits
from curvetun.config import MAX_NUMBER_LENGTH, TunnelConfig
from curvetun.endpoints import service_pool
from curvetun.errors import NotAuthorized
from curvetun.keys import format_public_key
from curvetun.listeners import CannotListen, OpenConnections, TunnelListener
from curvetun.packets import MAX_MESSAGE
from curvetun.tunnel import EchoFactory, ForwardingFactory
from curvetun.tunnel_service import (
    EX_CONFIG,
    EX_UNAVAILABLE,
    EX_USAGE,
    StartupError,
    TunnelService,
    make_service,
)
from curvetun.vault import FileVault

from ._support import (
    Collector,
    FakePort,
    MessageRecordingTransport,
    Peers,
    PendingServerEndpoint,
    admit,
    capture_logs,
    events_like,
    forget_keydir,
    make_keydir,
    parse_events,
    read_until,
    round_trip,
    twist,
)
from ._tap_support import (
    ROOT,
    HashingEchoFactory,
    StreamingClient,
    buffered,
    build,
    curvetun_read_buffer,
    parse,
    port_of,
    resident_bytes,
    start_tunnel,
    tunnel_transports,
)

LOCALHOST = "interface=127.0.0.1"


class OptionsTests(SynchronousTestCase):
    """
    C{twist curvetun}'s options: defaults, repetition, and a one-line
    message for each malformed value.
    """

    def setUp(self) -> None:
        self.home = os.path.abspath(self.mktemp())
        self.addCleanup(self.restore_home, os.environ.get("CURVETUN_HOME"))
        os.environ["CURVETUN_HOME"] = self.home

    @staticmethod
    def restore_home(previous: str | None) -> None:
        if previous is None:
            os.environ.pop("CURVETUN_HOME", None)
        else:
            os.environ["CURVETUN_HOME"] = previous

    def test_defaults_are_an_echo_server_on_curvetun_7700_with_the_default_keydir(self) -> None:
        options = parse()
        self.assertEqual(options["listen"], ["curvetun:7700"])
        self.assertIsNone(options["forward"])
        self.assertEqual(options["keydir"], self.home)
        self.assertIsNone(options["registry"])
        self.assertEqual(options["grace"], 10.0)
        self.assertEqual(options["handshake-timeout"], 10.0)
        self.assertIsNone(options["idle-timeout"])
        self.assertEqual(options["limits"], ConnectionLimits())

    def test_listen_can_be_repeated_and_replaces_the_default(self) -> None:
        options = parse("--listen", "tcp:6380", "-l", "curvetun:7701", "--listen=unix:/tmp/s")
        self.assertEqual(options["listen"], ["tcp:6380", "curvetun:7701", "unix:/tmp/s"])

    def test_values_are_taken_as_given(self) -> None:
        options = parse(
            "--forward", "tcp:127.0.0.1:6379",
            "--keydir", "/srv/keys",
            "--registry", "/etc/curvetun/registry",
            "--grace", "0",
            "--handshake-timeout", "2.5",
        )  # fmt: skip
        self.assertEqual(options["forward"], "tcp:127.0.0.1:6379")
        self.assertEqual(options["keydir"], "/srv/keys")
        self.assertEqual(options["registry"], "/etc/curvetun/registry")
        self.assertEqual(options["grace"], 0.0)
        self.assertEqual(options["handshake-timeout"], 2.5)

    def test_each_malformed_value_is_refused_with_a_one_line_message(self) -> None:
        cases = [
            (["--grace", "-1"], "--grace must be a non-negative number of seconds, not '-1'"),
            (["--grace", "soon"], "--grace must be a non-negative number of seconds, not 'soon'"),
            (["--grace", "nan"], "--grace must be a non-negative number"),
            (["--grace", "inf"], "--grace must be a non-negative number"),
            (["--handshake-timeout", "0"], "--handshake-timeout must be a positive number"),
            (["--handshake-timeout", "-3"], "--handshake-timeout must be a positive number"),
            (["--listen", ""], "--listen needs an endpoint"),
            (["--forward", " "], "--forward needs an endpoint"),
            (["--keydir", ""], "--keydir needs a path"),
            (["--registry", ""], "--registry needs a path"),
            (["--idle-timeout", "-1"], "--idle-timeout must be a non-negative number"),
            (["--max-connections", "many"], "--max-connections must be a whole number"),
            (["--max-handshakes-per-address", "-2"], "must be a whole number"),
        ]
        for argv, message in cases:
            error = self.assertRaises(usage.UsageError, parse, *argv)
            self.assertIn(message, str(error), argv)
            self.assertNotIn("\n", str(error), argv)

    def test_limits_and_the_idle_timeout_can_be_set_and_zero_means_none(self) -> None:
        options = parse(
            "--idle-timeout", "300",
            "--max-connections", "100",
            "--max-connections-per-address", "0",
            "--max-handshakes", "20",
            "--max-handshakes-per-address", "4",
        )  # fmt: skip
        self.assertEqual(options["idle-timeout"], 300.0)
        self.assertEqual(options["limits"], ConnectionLimits(100, None, 20, 4))
        self.assertIsNone(parse("--idle-timeout", "0")["idle-timeout"])

    def test_the_options_describe_one_tunnel(self) -> None:
        options = parse(
            "--listen", "tcp:6380", "--listen", "curvetun:7701",
            "--forward", "tcp:127.0.0.1:6379",
            "--keydir", "/srv/keys", "--registry", "/srv/registry",
            "--grace", "3", "--handshake-timeout", "4", "--idle-timeout", "5",
            "--max-connections", "6",
        )  # fmt: skip
        self.assertEqual(
            options.tunnels,
            [
                TunnelConfig(
                    keydir="/srv/keys",
                    listen=("tcp:6380", "curvetun:7701"),
                    forward="tcp:127.0.0.1:6379",
                    registry="/srv/registry",
                    grace=3.0,
                    handshake_timeout=4.0,
                    idle_timeout=5.0,
                    limits=attrs.evolve(ConnectionLimits(), connections=6),
                )
            ],
        )

    def test_a_second_forward_is_refused_not_silently_the_last_one(self) -> None:
        for argv in (
            ["--forward", "tcp:127.0.0.1:1", "--forward", "tcp:127.0.0.1:2"],
            ["-f", "tcp:127.0.0.1:1", "--forward=tcp:127.0.0.1:1"],
        ):
            error = self.assertRaises(usage.UsageError, parse, *argv)
            self.assertIn("--forward given twice", str(error))
            self.assertNotIn("\n", str(error))

    def test_every_numeric_option_refuses_thousands_of_digits_in_one_line(self) -> None:
        # Python refuses to convert integers of more than 4,300 digits with
        # a ValueError of its own; the length is checked first.
        digits = "9" * 5000
        for option in (
            "grace",
            "handshake-timeout",
            "idle-timeout",
            "max-connections",
            "max-connections-per-address",
            "max-handshakes",
            "max-handshakes-per-address",
        ):
            error = self.assertRaises(usage.UsageError, parse, f"--{option}", digits)
            self.assertTrue(str(error).startswith(f"--{option} must be a"), str(error))
            self.assertNotIn("\n", str(error))
            self.assertLess(len(str(error)), 200)

    def test_numbers_up_to_the_length_bound_are_taken(self) -> None:
        longest = "1" + "0" * (MAX_NUMBER_LENGTH - 1)
        self.assertEqual(parse("--max-connections", longest)["limits"].connections, int(longest))
        self.assertRaises(usage.UsageError, parse, "--max-connections", longest + "0")
        self.assertEqual(parse("--grace", "0" * (MAX_NUMBER_LENGTH - 1) + "7")["grace"], 7.0)

    def test_unknown_options_and_arguments_are_refused(self) -> None:
        self.assertRaises(usage.UsageError, parse, "--colour", "blue")
        self.assertRaises(usage.UsageError, parse, "tcp:7700")
        self.assertRaises(usage.UsageError, parse, "--grace")


class BuildTunnelTests(SynchronousTestCase):
    """
    L{build_tunnel}: what it builds, and a one-line L{StartupError} with its
    exit status for every unusable input.
    """

    def make(self, *argv: str) -> TunnelService:
        tunnel = build(*argv)
        # Built but never started: release the key directory and the pool.
        self.addCleanup(tunnel.release)
        return tunnel

    def fails(self, *argv: str) -> StartupError:
        error: StartupError = self.assertRaises(StartupError, build, *argv)
        self.assertNotIn("\n", str(error))
        return error

    def test_a_missing_key_directory_is_created_with_a_fresh_key(self) -> None:
        keydir = os.path.abspath(self.mktemp())
        tunnel = self.make("--keydir", keydir, "--listen", "tcp:0")
        with open(os.path.join(keydir, "public.key")) as f:
            self.assertEqual(f.read().strip(), format_public_key(tunnel.identity.vault.public_key))
        self.assertEqual(os.stat(os.path.join(keydir, "secret.key")).st_mode & 0o777, 0o600)

    def test_limits_and_the_idle_timeout_reach_the_curvetun_service(self) -> None:
        keydir, _ = make_keydir(self)
        tunnel = self.make(
            "--keydir", keydir, "--listen", "tcp:0",
            "--idle-timeout", "60", "--max-handshakes-per-address", "3",
        )  # fmt: skip
        self.assertEqual(tunnel.identity.idle_timeout, 60.0)
        self.assertEqual(tunnel.identity.limits.handshakes_per_address, 3)

    def test_an_existing_key_directory_keeps_its_key(self) -> None:
        keydir, key = make_keydir(self)
        tunnel = self.make("--keydir", keydir, "--listen", "tcp:0")
        self.assertEqual(tunnel.identity.vault.public_key, key)

    def test_one_listener_per_listen_endpoint_each_echoing_without_forward(self) -> None:
        keydir, _ = make_keydir(self)
        tunnel = self.make("--keydir", keydir, "--listen", "tcp:0", "--listen", "curvetun:0")
        self.assertEqual(
            [listener.description for listener in tunnel.listeners], ["tcp:0", "curvetun:0"]
        )
        for listener in tunnel.listeners:
            self.assertIsInstance(listener.factory, EchoFactory)

    def test_with_forward_every_listener_forwards_there(self) -> None:
        keydir, _ = make_keydir(self)
        tunnel = self.make(
            "--keydir",
            keydir,
            "--listen",
            "tcp:0",
            "--listen",
            "tcp:0",
            "--forward",
            "tcp:127.0.0.1:1",
        )
        for listener in tunnel.listeners:
            assert isinstance(listener.factory, ForwardingFactory)
            self.assertEqual(listener.factory.description, "tcp:127.0.0.1:1")

    def test_curvetun_strings_that_name_no_keydir_use_the_tunnels_identity(self) -> None:
        keydir, _ = make_keydir(self)
        registry = os.path.join(os.path.abspath(self.mktemp()))
        tunnel = self.make("--keydir", keydir, "--registry", registry, "--listen", "curvetun:0")
        self.assertIs(service_pool.lease(None, None).service, tunnel.identity)
        # Naming the directory but not the registry gets it too (not a
        # second vault on the same directory, which its lock would refuse).
        self.assertIs(service_pool.lease(keydir, None).service, tunnel.identity)
        self.assertIs(service_pool.lease(keydir, registry).service, tunnel.identity)

    def test_a_malformed_listen_endpoint_is_a_usage_error(self) -> None:
        keydir, _ = make_keydir(self)
        for description, message in [
            ("foo:1", "bad --listen endpoint 'foo:1': Unknown endpoint type: 'foo'"),
            ("tcp:1:colour=blue", "bad --listen endpoint 'tcp:1:colour=blue'"),
            ("curvetun:seventy", "port must be a number"),
        ]:
            error = self.fails("--keydir", keydir, "--listen", description)
            self.assertIn(message, str(error))
            self.assertEqual(error.status, EX_USAGE)

    def test_a_malformed_forward_endpoint_is_a_usage_error(self) -> None:
        keydir, _ = make_keydir(self)
        for description, message in [
            ("tcp:host", "bad --forward endpoint 'tcp:host'"),
            ("curvetun:server.example:7700", "no key for server server.example"),
            ("curvetun:h:7700:key=00", "bad public key"),
        ]:
            error = self.fails("--keydir", keydir, "--listen", "tcp:0", "--forward", description)
            self.assertIn(message, str(error))
            self.assertEqual(error.status, EX_USAGE)

    def test_an_endpoint_ending_in_a_lone_backslash_is_a_usage_error(self) -> None:
        # Twisted's tokenizer raises RuntimeError on these.
        keydir, _ = make_keydir(self)
        for argv in (
            ["--listen", "curvetun:7700:interface=\\"],
            ["--listen", "tcp:0\\"],
            ["--listen", "tcp:0", "--forward", "tcp:127.0.0.1:1\\"],
        ):
            error = self.fails("--keydir", keydir, *argv)
            self.assertIn("ends with a lone backslash", str(error))
            self.assertEqual(error.status, EX_USAGE)

    def test_an_escaped_backslash_at_the_end_is_not_a_lone_one(self) -> None:
        keydir, _ = make_keydir(self)
        tunnel = self.make("--keydir", keydir, "--listen", "unix:/tmp/ct\\\\")
        self.assertEqual(tunnel.listeners[0].description, "unix:/tmp/ct\\\\")

    def test_ports_of_thousands_of_digits_in_endpoint_strings_are_usage_errors(self) -> None:
        keydir, _ = make_keydir(self)
        digits = "9" * 5000
        for argv in (
            ["--listen", f"tcp:{digits}"],
            ["--listen", f"curvetun:{digits}"],
            ["--listen", "tcp:0", "--forward", f"tcp:127.0.0.1:{digits}"],
            ["--listen", "tcp:0", "--forward", f"tcp:127.0.0.1:1:timeout={digits}"],
        ):
            error = self.fails("--keydir", keydir, *argv)
            self.assertEqual(error.status, EX_USAGE)
            self.assertLess(len(str(error)), 400)

    def test_an_unusable_key_directory_is_a_configuration_error(self) -> None:
        not_a_directory = os.path.abspath(self.mktemp())
        with open(not_a_directory, "w") as f:
            f.write("a file\n")
        error = self.fails("--keydir", not_a_directory)
        self.assertIn(f"cannot create key directory {not_a_directory}", str(error))
        self.assertEqual(error.status, EX_CONFIG)

    def test_a_key_directory_readable_by_others_is_a_configuration_error(self) -> None:
        keydir, _ = make_keydir(self)
        os.chmod(os.path.join(keydir, "secret.key"), 0o644)
        error = self.fails("--keydir", keydir)
        self.assertIn("secret.key is accessible to group or others", str(error))
        self.assertEqual(error.status, EX_CONFIG)

    def test_a_malformed_registry_is_a_configuration_error(self) -> None:
        keydir, _ = make_keydir(self)
        with open(os.path.join(keydir, "registry"), "w") as f:
            f.write("127.0.0.1 not-a-key\n")
        error = self.fails("--keydir", keydir)
        self.assertIn("registry:1", str(error))
        self.assertEqual(error.status, EX_CONFIG)

    def test_after_an_error_the_key_directory_is_free_again(self) -> None:
        keydir, key = make_keydir(self)
        self.fails("--keydir", keydir, "--listen", "foo:1")
        tunnel = self.make("--keydir", keydir, "--listen", "tcp:0")
        self.assertEqual(tunnel.identity.vault.public_key, key)

    def test_a_stopping_factory_builds_no_more_protocols(self) -> None:
        factory = EchoFactory()
        address = IPv4Address("TCP", "127.0.0.1", 1234)
        self.assertIsNotNone(factory.buildProtocol(address))
        factory.connections.accepting = False
        self.assertIsNone(factory.buildProtocol(address))


class MakeServiceTests(TestCase):
    """
    L{make_service}: the service C{twist} runs, one tunnel per
    L{TunnelConfig}, and an exit with the error's status (after releasing
    what was built) when one cannot be built.
    """

    def setUp(self) -> None:
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)

    async def test_one_tunnel_per_config_each_listening_and_stopping(self) -> None:
        first, _ = make_keydir(self)
        second, _ = make_keydir(self)
        configs = [
            TunnelConfig(keydir=first, listen=(f"tcp:0:{LOCALHOST}",)),
            TunnelConfig(keydir=second, listen=(f"tcp:0:{LOCALHOST}",) * 2, grace=0),
        ]
        service = make_service(configs, reactor, environ={})
        tunnels = service.tunnels
        self.assertEqual(len(service.identities), 2)
        self.assertEqual([tunnel.config for tunnel in tunnels], configs)
        service.startService()
        for tunnel in tunnels:
            for index in range(len(tunnel.config.listen)):
                self.assertGreater(port_of(tunnel, index), 0)
        await service.stopService()
        # Stopped tunnels have released their key directories.
        FileVault(first).close()
        FileVault(second).close()

    def test_a_config_that_cannot_be_built_exits_with_its_status_and_releases_the_rest(
        self,
    ) -> None:
        good, _ = make_keydir(self)
        other, _ = make_keydir(self)
        configs = [
            TunnelConfig(keydir=good, listen=("tcp:0",)),
            TunnelConfig(keydir=other, listen=("foo:1",)),
        ]
        error = self.assertRaises(SystemExit, make_service, configs, reactor)
        self.assertEqual(error.code, EX_USAGE)
        self.assertEqual(
            self.stderr.getvalue(),
            "twist curvetun: bad --listen endpoint 'foo:1': Unknown endpoint type: 'foo'\n",
        )
        FileVault(good).close()


@implementer(IStreamClientEndpoint)
class RecordingEndpoint:
    """
    A client endpoint whose connections the test completes by hand: it
    records each factory and hands back a Deferred that records its
    cancellation.
    """

    def __init__(self) -> None:
        self.attempts: list[tuple[IProtocolFactory, Deferred[IProtocol]]] = []
        self.cancelled = 0

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        def cancel(d: Deferred[IProtocol]) -> None:
            self.cancelled += 1

        d: Deferred[IProtocol] = Deferred(cancel)
        self.attempts.append((protocolFactory, d))
        return d

    def complete(
        self, transport: StringTransport | None = None
    ) -> tuple[Protocol, StringTransport]:
        """
        Make the last attempt's connection, on C{transport} (by default a
        new L{StringTransport}).
        """
        factory, d = self.attempts[-1]
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 6379))
        assert isinstance(protocol, Protocol)
        if transport is None:
            transport = StringTransport()
        protocol.makeConnection(transport)
        d.callback(protocol)
        return protocol, transport


@implementer(ITCPTransport)
class NoDelayRecordingTransport(StringTransport):
    """
    A TCP transport in memory that records C{setTcpNoDelay}.
    """

    no_delay = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled

    def getTcpNoDelay(self) -> bool:
        return self.no_delay

    def setTcpKeepAlive(self, enabled: bool) -> None:
        pass

    def getTcpKeepAlive(self) -> bool:
        return False

    def loseWriteConnection(self) -> None:
        self.loseConnection()


class RelayNoDelayTests(SynchronousTestCase):
    """
    Nagle's algorithm is off on both plain TCP sides of a forwarded
    connection: a relay passes each read on as it comes, and a small one
    held for an ACK (a delayed one, up to 40 ms) would stall the peer.
    """

    def test_both_plain_sides_send_small_writes_at_once(self) -> None:
        endpoint = RecordingEndpoint()
        forwarder = ForwardingFactory(endpoint, "tcp:127.0.0.1:6379").buildProtocol(None)
        assert forwarder is not None
        accepted = NoDelayRecordingTransport()
        forwarder.makeConnection(accepted)
        forward = NoDelayRecordingTransport()
        endpoint.complete(forward)
        self.assertEqual((accepted.no_delay, forward.no_delay), (True, True))


class RelayToCurveTunTests(SynchronousTestCase):
    """
    A read relayed to a curvetun side goes out as one message at once, when
    it fits in one, rather than waiting for the next reactor turn to be
    coalesced: a relay writes once per read.
    """

    def setUp(self) -> None:
        self.endpoint = RecordingEndpoint()
        self.factory = ForwardingFactory(self.endpoint, "tcp:127.0.0.1:6379")
        forwarder = self.factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 40000))
        assert forwarder is not None
        self.forwarder = forwarder

    def test_replies_to_a_curvetun_client_are_messages_when_they_fit(self) -> None:
        accepted = MessageRecordingTransport()
        self.forwarder.makeConnection(accepted)
        forward_side, _ = self.endpoint.complete()
        for size in (1, 100, MAX_MESSAGE, MAX_MESSAGE + 1, 65536):
            forward_side.dataReceived(b"r" * size)
        self.assertEqual(
            accepted.calls,
            [
                ("write_message", 1),
                ("write_message", 100),
                ("write_message", MAX_MESSAGE),
                ("write", MAX_MESSAGE + 1),
                ("write", 65536),
            ],
        )
        self.assertEqual(len(accepted.value()), 1 + 100 + MAX_MESSAGE + MAX_MESSAGE + 1 + 65536)

    def test_reads_forwarded_to_a_curvetun_server_are_messages_when_they_fit(self) -> None:
        self.forwarder.makeConnection(StringTransport())
        forward = MessageRecordingTransport()
        self.endpoint.complete(forward)
        self.forwarder.dataReceived(b"q" * 100)
        self.forwarder.dataReceived(b"q" * 65536)
        self.assertEqual(forward.calls, [("write_message", 100), ("write", 65536)])


class ForwarderTests(SynchronousTestCase):
    """
    L{Forwarder} in memory: when it reads, connects, closes and aborts.
    """

    def setUp(self) -> None:
        self.events = capture_logs(self)
        self.endpoint = RecordingEndpoint()
        self.factory = ForwardingFactory(self.endpoint, "tcp:127.0.0.1:6379")
        forwarder = self.factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 40000))
        assert forwarder is not None
        self.forwarder = forwarder
        self.accepted = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 40000))
        self.forwarder.makeConnection(self.accepted)

    def test_the_accepted_side_is_not_read_until_the_forward_connection_is_made(self) -> None:
        self.assertEqual(len(self.endpoint.attempts), 1)
        self.assertEqual(self.accepted.producerState, "paused")
        _, forward = self.endpoint.complete()
        self.assertEqual(self.accepted.producerState, "producing")
        # Each side's transport is the producer of the other's.
        self.assertIs(self.accepted.producer, forward)
        self.assertIs(forward.producer, self.accepted)

    def test_bytes_cross_both_ways_and_are_counted_in_the_closing_log(self) -> None:
        forward_side, forward = self.endpoint.complete()
        self.forwarder.dataReceived(b"request")
        forward_side.dataReceived(b"a longer reply")
        self.assertEqual(forward.value(), b"request")
        self.assertEqual(self.accepted.value(), b"a longer reply")
        forward_side.connectionLost(Failure(internet_error.ConnectionDone()))
        self.assertTrue(self.accepted.disconnecting)  # after what it was sent
        self.assertEqual(len(self.factory.connections), 1)
        self.forwarder.connectionLost(Failure(internet_error.ConnectionDone()))
        self.assertEqual(len(self.factory.connections), 0)
        [ended] = events_like(self.events, "Connection from {peer} (key {key}) to {forward} ended")
        self.assertEqual((ended["forwarded"], ended["returned"]), (7, 14))
        self.assertEqual(ended["peer"], "10.0.0.1:40000")
        self.assertIn("forward side closed", ended["why"])

    def test_closing_before_the_forward_connection_is_made_cancels_it(self) -> None:
        self.forwarder.connectionLost(Failure(internet_error.ConnectionDone()))
        self.assertEqual(self.endpoint.cancelled, 1)
        self.assertEqual(len(self.factory.connections), 0)
        self.assertEqual(events_like(self.events, "Forwarding {peer}"), [])

    def test_a_failed_forward_connection_is_logged_and_closes_the_accepted_side(self) -> None:
        _, d = self.endpoint.attempts[0]
        d.errback(internet_error.ConnectionRefusedError("nobody home"))
        self.assertTrue(self.accepted.disconnecting)
        [failed] = events_like(self.events, "Forwarding {peer} (key {key}) to {forward} failed")
        self.assertIn("nobody home", failed["why"])
        self.forwarder.connectionLost(Failure(internet_error.ConnectionDone()))
        self.assertEqual(len(self.factory.connections), 0)

    def test_a_forward_connection_made_after_the_client_closed_is_aborted(self) -> None:
        # An endpoint may build and start the protocol before the cancelled
        # connect can stop it.
        factory, _ = self.endpoint.attempts[0]
        self.forwarder.connectionLost(Failure(internet_error.ConnectionDone()))
        late = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 6379))
        assert late is not None
        transport = StringTransport()
        late.makeConnection(transport)
        self.assertTrue(transport.disconnecting)
        late.connectionLost(Failure(internet_error.ConnectionAborted()))
        # The pair is logged once, and left the open connections once.
        ended = events_like(self.events, "Connection from {peer} (key {key}) to {forward} ended")
        self.assertEqual(len(ended), 1)
        self.assertIn("client closed before the forward connection was made", ended[0]["why"])
        self.assertEqual(len(self.factory.connections), 0)
        self.assertEqual(self.accepted.value(), b"")

    def test_abort_aborts_both_sides(self) -> None:
        _, forward = self.endpoint.complete()
        self.forwarder.abort()
        self.assertTrue(self.accepted.disconnecting)
        self.assertTrue(forward.disconnecting)

    def test_abort_while_connecting_cancels_the_forward_connection(self) -> None:
        self.forwarder.abort()
        self.assertEqual(self.endpoint.cancelled, 1)
        self.assertTrue(self.accepted.disconnecting)


class Closable:
    """
    A connection for L{OpenConnections} that records being aborted and
    closes when told.
    """

    def __init__(self, connections: OpenConnections) -> None:
        self.connections = connections
        self.aborted = False
        connections.add(self)

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.connections.remove(self)


class OpenConnectionsTests(SynchronousTestCase):
    """
    L{OpenConnections.drain} on a fake clock.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.connections = OpenConnections()

    def test_with_nothing_open_draining_is_done_at_once(self) -> None:
        self.assertEqual(self.successResultOf(self.connections.drain(10, self.clock)), 0)
        self.assertFalse(self.connections.accepting)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_draining_ends_when_the_last_connection_closes_in_time(self) -> None:
        first, second = Closable(self.connections), Closable(self.connections)
        drained = self.connections.drain(10, self.clock)
        first.close()
        self.clock.advance(9)
        self.assertNoResult(drained)
        second.close()
        self.assertEqual(self.successResultOf(drained), 0)
        self.assertFalse(first.aborted or second.aborted)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connections_open_after_the_grace_time_are_aborted(self) -> None:
        early, late = Closable(self.connections), Closable(self.connections)
        drained = self.connections.drain(10, self.clock)
        early.close()
        self.clock.advance(10)
        self.assertEqual((early.aborted, late.aborted), (False, True))
        self.assertNoResult(drained)  # until the aborted one has closed
        late.close()
        self.assertEqual(self.successResultOf(drained), 1)


@implementer(IStreamServerEndpoint)
class RefusingServerEndpoint:
    """
    A server endpoint that fails to listen at once, as TCP does on a port
    in use.
    """

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        return fail(internet_error.CannotListenError("127.0.0.1", 7700, OSError("in use")))


class TunnelListenerTests(SynchronousTestCase):
    """
    L{TunnelListener}: a L{StreamServerEndpointService} that reports a
    failure to listen as L{CannotListen} (never a logged traceback), and
    that drains on stop. Part of what it relies on in its base class is
    not documented (that a listen Deferred may fire with L{None} when
    stopping): these tests fail if that changes.
    """

    def setUp(self) -> None:
        self.events = capture_logs(self)
        self.clock = Clock()
        self.connections = OpenConnections()

    def listener(self, endpoint: IStreamServerEndpoint) -> TunnelListener:
        return TunnelListener(
            endpoint,
            "tcp:7700",
            EchoFactory(self.connections),
            self.connections,
            grace=5.0,
            clock=self.clock,
            serving="echo",
        )

    def test_it_is_twisteds_endpoint_service(self) -> None:
        self.assertIsInstance(self.listener(PendingServerEndpoint()), StreamServerEndpointService)

    def test_it_listens_once_when_the_privileged_start_came_first(self) -> None:
        endpoint = PendingServerEndpoint()
        listener = self.listener(endpoint)
        listener.privilegedStartService()
        listener.startService()
        self.assertEqual(len(endpoint.listens), 1)
        factory, d = endpoint.listens[0]
        self.assertIsInstance(factory, EchoFactory)
        d.callback(FakePort())
        [listening] = events_like(self.events, "Listening on {endpoint}")
        self.assertEqual((listening["address"], listening["what"]), ("127.0.0.1:7700", "echo"))

    def test_a_listen_that_fails_at_once_raises_one_line_and_logs_no_traceback(self) -> None:
        listener = self.listener(RefusingServerEndpoint())
        error = self.assertRaises(CannotListen, listener.startService)
        self.assertIn("cannot listen on tcp:7700: ", str(error))
        self.assertIn("in use", str(error))
        self.assertNotIn("\n", str(error))
        self.assertEqual(self.flushLoggedErrors(), [])
        # Stopping it afterwards is quiet, and the drain has nothing to wait for.
        self.successResultOf(listener.stopService())
        self.assertFalse(listener.running)
        self.assertEqual(events_like(self.events, "Stopped listening"), [])

    def test_a_listen_that_fails_later_is_logged_as_critical(self) -> None:
        endpoint = PendingServerEndpoint()
        listener = self.listener(endpoint)
        listener.startService()
        endpoint.listens[0][1].errback(internet_error.CannotListenError("", 7700, OSError("no")))
        [cannot] = events_like(self.events, "Cannot listen on {endpoint}")
        self.assertEqual(cannot["log_level"], LogLevel.critical)
        self.assertEqual(self.flushLoggedErrors(), [])
        self.successResultOf(listener.stopService())

    def test_stopping_while_the_listen_is_under_way_cancels_it_quietly(self) -> None:
        endpoint = PendingServerEndpoint()
        listener = self.listener(endpoint)
        listener.startService()
        self.successResultOf(listener.stopService())
        self.assertEqual(endpoint.cancelled, 1)
        self.assertEqual(events_like(self.events, "Cannot listen"), [])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_stopping_a_listener_never_started_is_quiet(self) -> None:
        listener = self.listener(PendingServerEndpoint())
        self.successResultOf(listener.stopService())
        self.assertFalse(self.connections.accepting)

    def test_stopping_stops_listening_at_once_then_drains_within_the_grace_time(self) -> None:
        endpoint = PendingServerEndpoint()
        listener = self.listener(endpoint)
        listener.startService()
        port = FakePort()
        endpoint.listens[0][1].callback(port)
        connection = Closable(self.connections)
        not_listening = listener.when_not_listening()
        stopped = listener.stopService()
        self.assertEqual(port.stopped, 1)
        self.successResultOf(not_listening)
        self.assertIsNone(listener.port)
        self.assertFalse(self.connections.accepting)
        self.clock.advance(4.9)
        self.assertNoResult(stopped)
        self.clock.advance(0.1)
        self.assertTrue(connection.aborted)
        connection.close()
        self.successResultOf(stopped)


class BufferedTests(TestCase):
    """
    The measure of what transports hold, which the memory bounds of the
    flow-control tests rest on, reads internals of Twisted's and of
    curvetun's: it must see bytes where there are some, so that a change
    of those internals fails here rather than making those bounds pass at
    zero.
    """

    async def test_a_tcp_transport_holds_what_it_was_given_until_the_reactor_writes(
        self,
    ) -> None:
        server = Collector()
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(lambda: server)
        )
        self.addCleanup(port.stopListening)
        client = await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), Collector()
        )
        assert client.transport is not None
        self.assertEqual(buffered(client.transport), 0)
        client.transport.write(b"x" * 100_000)
        client.transport.writeSequence([b"y" * 1000, b"z" * 10])
        # Nothing is handed to the kernel before the reactor runs again.
        self.assertEqual(buffered(client.transport), 101_010)
        await server.expect(101_010)
        self.assertEqual(buffered(client.transport), 0)
        client.transport.loseConnection()
        await client.lost

    def test_a_curvetun_connection_holds_the_unfinished_frame_it_has_read(self) -> None:
        peers = Peers()
        _, server, _ = peers.connect()
        self.assertEqual(curvetun_read_buffer(server), 0)
        # The first bytes of a message frame: a length, then part of it.
        server.dataReceived(b"\x01\x00" + b"m" * 40)
        self.assertEqual(curvetun_read_buffer(server), 42)

    def test_a_transport_of_another_kind_fails_the_measure_loudly(self) -> None:
        self.assertRaises(AssertionError, buffered, StringTransport())


class EchoTests(TestCase):
    """
    Without C{--forward}: an echo service.
    """

    async def test_on_its_defaults_an_authorized_curvetun_client_gets_its_bytes_echoed(
        self,
    ) -> None:
        # The defaults, but on a free port and with a key directory that
        # does not exist yet (it is created with a fresh key).
        server_dir = os.path.abspath(self.mktemp())
        tunnel = start_tunnel(self, "--keydir", server_dir, "--listen", f"curvetun:0:{LOCALHOST}")
        self.addCleanup(forget_keydir, server_dir)
        client_dir, client_key = make_keydir(self)
        # Written after the start: the registry is read again when it changes.
        admit(server_dir, client_key)
        server_key = format_public_key(tunnel.identity.vault.public_key)
        endpoint = clientFromString(
            reactor, f"curvetun:127.0.0.1:{port_of(tunnel)}:key={server_key}:keydir={client_dir}"
        )
        client = await connectProtocol(endpoint, Collector())
        data = os.urandom(300_000)  # several curvetun messages, several TCP reads
        self.assertEqual(await round_trip(client, data), data)
        assert client.transport is not None
        client.transport.loseConnection()
        await client.lost
        await tunnel.listeners[0].connections.when_empty()

    async def test_echo_stops_reading_while_its_client_does_not_read(self) -> None:
        keydir, _ = make_keydir(self)
        tunnel = start_tunnel(self, "--keydir", keydir, "--listen", f"tcp:0:{LOCALHOST}")
        total = 20 * 1024 * 1024
        # The client reads nothing for the first half second.
        client = StreamingClient(total, stall=(0, 0.5))
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port_of(tunnel)), client)
        peak = 0

        def sample() -> None:
            nonlocal peak
            peak = max(peak, sum(buffered(t) for t in tunnel_transports(tunnel)))

        sampler = LoopingCall(sample)
        sampler.start(0.01)
        try:
            client.start()
            await client.done
        finally:
            sampler.stop()
        self.assertEqual(client.received_hash.hexdigest(), client.sent_hash.hexdigest())
        # Without flow control the echo would hold what the client sends
        # while not reading: megabytes in half a second. While the client
        # does not read, the echo's write buffer fills up to the point
        # where it stops reading: a measure that saw nothing is broken.
        self.assertLess(peak, 1024 * 1024)
        self.assertGreater(peak, 0)
        assert client.transport is not None
        client.transport.loseConnection()
        await client.lost
        await tunnel.listeners[0].connections.when_empty()


class TunnelTests(TestCase):
    """
    A two-hop tunnel: plain TCP into service A, which forwards over
    curvetun to service B, which forwards over TCP to a backend.
    """

    def start_backend(
        self, stall: tuple[int, float] | None = None
    ) -> tuple[HashingEchoFactory, int]:
        backend = HashingEchoFactory(stall)
        d = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(backend)
        port = self.successResultOf(d)
        self.addCleanup(port.stopListening)
        return backend, port.getHost().port

    def start_pair(
        self, backend_port: int, admit_a: bool = True
    ) -> tuple[TunnelService, TunnelService]:
        dir_a, key_a = make_keydir(self)
        dir_b, key_b = make_keydir(self)
        if admit_a:
            admit(dir_b, key_a)
        b = start_tunnel(
            self,
            "--listen", f"curvetun:0:{LOCALHOST}",
            "--keydir", dir_b,
            "--forward", f"tcp:127.0.0.1:{backend_port}",
        )  # fmt: skip
        a = start_tunnel(
            self,
            "--listen", f"tcp:0:{LOCALHOST}",
            "--keydir", dir_a,
            "--forward",
            f"curvetun:127.0.0.1:{port_of(b)}:key={format_public_key(key_b)}:keydir={dir_a}",
        )  # fmt: skip
        return a, b

    async def test_50_mb_cross_a_two_hop_tunnel_each_way_intact_in_bounded_memory(self) -> None:
        total = 50 * 1024 * 1024
        # Each end stops reading for half a second on the way, as a slow
        # reader would: the backend after 30 MB, the client after 10 MB
        # have come back. Everything here runs on one reactor, so without
        # a stall no stage outruns another and even a tunnel without flow
        # control would keep its buffers small; during a stall, such a
        # tunnel goes on reading from the side that still sends and
        # buffers all of it.
        backend, backend_port = self.start_backend(stall=(30 * 1024 * 1024, 0.5))
        a, b = self.start_pair(backend_port)
        client = StreamingClient(total, stall=(10 * 1024 * 1024, 0.5))
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port_of(a)), client)

        # Memory: sample, every 10 ms, the bytes buffered by every transport
        # on the path (client, A's two sides, B's two sides, backend) and
        # the process's resident size. Backpressure works if the buffers
        # stay near TCP's 64 KiB high-water mark per transport, whatever
        # the amount carried. The resident size is the cruder cross-check:
        # noisy (the allocator, trial, other tests' garbage), so its bound
        # is loose, but far below the 100 MB that cross the process.
        peak = {"buffered": 0, "resident": 0}
        baseline = resident_bytes()

        def sample() -> None:
            transports = [client.transport, *tunnel_transports(a), *tunnel_transports(b)]
            transports += [p.transport for p in backend.protocols]
            peak["buffered"] = max(peak["buffered"], sum(buffered(t) for t in transports))
            peak["resident"] = max(peak["resident"], resident_bytes())

        sampler = LoopingCall(sample)
        sampler.start(0.01)
        started = time.monotonic()
        try:
            client.start()
            await client.done
        finally:
            sampler.stop()
        elapsed = time.monotonic() - started
        assert client.transport is not None
        client.transport.loseConnection()
        await client.lost

        self.assertEqual(backend.connections, 1)
        [echo] = backend.protocols
        self.assertEqual((client.sent, echo.received, client.received), (total, total, total))
        # Client to backend, and backend to client, each intact.
        self.assertEqual(echo.hash.hexdigest(), client.sent_hash.hexdigest())
        self.assertEqual(client.received_hash.hexdigest(), client.sent_hash.hexdigest())
        # Measured here: about 0.5 MiB buffered at the peak, under 2 MiB of
        # resident growth; a tunnel without flow control buffers 15 MiB or
        # more during the stalls.
        self.assertLess(peak["buffered"], 4 * 1024 * 1024)
        # The stalls fill buffers: a measure that saw nothing is broken.
        self.assertGreater(peak["buffered"], 0)
        self.assertLess(peak["resident"] - baseline, 20 * 1024 * 1024)
        Logger().info(
            "50 MB each way in {elapsed:.1f} s; peak buffered {buffered} KiB; "
            "resident growth {growth:.1f} MiB",
            elapsed=elapsed,
            buffered=peak["buffered"] // 1024,
            growth=(peak["resident"] - baseline) / 1024 / 1024,
        )

    async def test_the_close_is_logged_with_the_bytes_carried_each_way(self) -> None:
        events = capture_logs(self)
        _, backend_port = self.start_backend()
        a, b = self.start_pair(backend_port)
        client = await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port_of(a)), Collector()
        )
        await round_trip(client, b"x" * 1000)
        await round_trip(client, b"y" * 234)
        assert client.transport is not None
        client.transport.loseConnection()
        await client.lost
        await a.listeners[0].connections.when_empty()
        await b.listeners[0].connections.when_empty()
        ended = events_like(events, "Connection from {peer} (key {key}) to {forward} ended")
        self.assertEqual(len(ended), 2)  # one at A, one at B
        for event in ended:
            self.assertEqual((event["forwarded"], event["returned"]), (1234, 1234))
        at_b = [e for e in ended if e["forward"].startswith("tcp:")]
        self.assertEqual(len(at_b), 1)
        # B knows A by its key; A's client is plain TCP.
        self.assertNotEqual(at_b[0]["key"], "-")

    async def test_a_forwarded_connection_logs_one_info_line_per_end_at_its_end(self) -> None:
        # Per connection, each end says how it ended, and no more at info
        # level: no "opened" line, no factory starting and stopping.
        _, backend_port = self.start_backend()
        a, b = self.start_pair(backend_port)
        events = capture_logs(self)
        client = await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port_of(a)), Collector()
        )
        await round_trip(client, b"x" * 100)
        assert client.transport is not None
        client.transport.loseConnection()
        await client.lost
        await a.listeners[0].connections.when_empty()
        await b.listeners[0].connections.when_empty()
        tunnel_lines = [
            e["log_format"]
            for e in events
            if e.get("log_level") == LogLevel.info
            and (e.get("log_namespace") or "").split(".")[:2] == ["curvetun", "tunnel"]
        ]
        self.assertEqual(
            tunnel_lines,
            [
                "Connection from {peer} (key {key}) to {forward} ended ({why}); "
                "{forwarded} bytes forwarded, {returned} bytes returned"
            ]
            * 2,
        )

    async def test_the_backend_is_never_connected_for_a_client_that_fails_authentication(
        self,
    ) -> None:
        backend, backend_port = self.start_backend()
        _, b = self.start_pair(backend_port)
        intruder_dir, _ = make_keydir(self)
        server_key = format_public_key(b.identity.vault.public_key)
        endpoint = clientFromString(
            reactor, f"curvetun:127.0.0.1:{port_of(b)}:key={server_key}:keydir={intruder_dir}"
        )
        intruder = await connectProtocol(endpoint, Collector())
        assert intruder.transport is not None
        intruder.transport.write(b"let me in")
        await intruder.lost
        assert intruder.reason is not None
        self.assertTrue(intruder.reason.check(NotAuthorized), intruder.reason)
        self.assertEqual(backend.connections, 0)

    async def test_a_refused_tunnel_closes_its_client_and_never_reaches_the_backend(self) -> None:
        events = capture_logs(self)
        backend, backend_port = self.start_backend()
        a, _ = self.start_pair(backend_port, admit_a=False)
        client = await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port_of(a)), Collector()
        )
        assert client.transport is not None
        client.transport.write(b"hello?")
        await client.lost
        await a.listeners[0].connections.when_empty()
        self.assertEqual(backend.connections, 0)
        self.assertEqual(client.data, b"")
        [ended] = events_like(events, "Connection from {peer} (key {key}) to {forward} ended")
        self.assertIn("not in the server's registry", ended["why"])

    async def test_when_the_forward_connection_fails_the_client_is_closed_and_it_is_logged(
        self,
    ) -> None:
        events = capture_logs(self)
        # A port nobody listens on: listen, note it, stop.
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(Collector)
        )
        closed_port = port.getHost().port
        await port.stopListening()
        keydir, _ = make_keydir(self)
        tunnel = start_tunnel(
            self,
            "--listen", f"tcp:0:{LOCALHOST}",
            "--keydir", keydir,
            "--forward", f"tcp:127.0.0.1:{closed_port}",
        )  # fmt: skip
        client = await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port_of(tunnel)), Collector()
        )
        await client.lost
        await tunnel.listeners[0].connections.when_empty()
        [failed] = events_like(events, "Forwarding {peer} (key {key}) to {forward} failed")
        self.assertEqual(failed["forward"], f"tcp:127.0.0.1:{closed_port}")
        self.assertIn("refused", failed["why"].lower())


class GracefulStopTests(TestCase):
    """
    Stopping stops accepting at once, lets open connections finish within
    the grace time, and aborts those still open after it. The grace time
    runs on a fake clock; the connections are real.
    """

    GRACE = 5.0
    timeout = 30

    def start(self, *argv: str) -> TunnelService:
        keydir, _ = make_keydir(self)
        self.clock = Clock()
        return start_tunnel(
            self,
            "--listen", f"tcp:0:{LOCALHOST}",
            "--keydir", keydir,
            "--grace", str(self.GRACE),
            *argv,
            clock=self.clock,
        )  # fmt: skip

    async def connect(self, port: int) -> Collector:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        client: Collector = await connectProtocol(endpoint, Collector())
        return client

    async def test_stopping_refuses_new_connections_at_once_and_lets_open_ones_finish(self) -> None:
        tunnel = self.start()
        port = port_of(tunnel)
        client = await self.connect(port)
        self.assertEqual(await round_trip(client, b"before"), b"before")

        stopped = tunnel.stopService()
        await tunnel.listeners[0].when_not_listening()
        with self.assertRaises(internet_error.ConnectionRefusedError):
            await self.connect(port)
        # The open connection is still served, and the stop waits for it.
        self.assertEqual(await round_trip(client, b"during"), b"during")
        self.assertNoResult(stopped)

        assert client.transport is not None
        client.transport.loseConnection()
        await stopped
        # It finished on its own: the grace timer was cancelled, not run.
        self.assertEqual(self.clock.getDelayedCalls(), [])

    async def test_connections_still_open_after_the_grace_time_are_aborted(self) -> None:
        events = capture_logs(self)
        tunnel = self.start()
        client = await self.connect(port_of(tunnel))
        await round_trip(client, b"hello")

        stopped = tunnel.stopService()
        await tunnel.listeners[0].when_not_listening()
        self.clock.advance(self.GRACE - 0.1)
        self.assertNoResult(stopped)
        self.assertNoResult(client.lost)
        self.clock.advance(0.1)
        await client.lost
        await stopped
        [aborting] = events_like(events, "Aborting {count} connection(s)")
        self.assertEqual(aborting["count"], 1)

    async def test_after_the_grace_time_both_sides_of_a_forwarded_connection_are_aborted(
        self,
    ) -> None:
        backend = HashingEchoFactory()
        backend_port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(backend)
        self.addCleanup(backend_port.stopListening)
        tunnel = self.start("--forward", f"tcp:127.0.0.1:{backend_port.getHost().port}")
        client = await self.connect(port_of(tunnel))
        await round_trip(client, b"hello")
        [backend_side] = backend.protocols

        stopped = tunnel.stopService()
        await tunnel.listeners[0].when_not_listening()
        self.assertNoResult(backend_side.lost)
        self.clock.advance(self.GRACE)
        await client.lost
        await backend_side.lost
        await stopped


# -- the command ----------------------------------------------------------------


class CommandTests(SynchronousTestCase):
    """
    C{twist curvetun} run as a process: errors are one line and a non-zero
    status, never a traceback; it starts, says its key, and stops on
    SIGTERM.
    """

    def setUp(self) -> None:
        self.home = os.path.abspath(self.mktemp())
        # The plugin is found from the source tree, installed or not; the
        # default key directory is the test's.
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
            "CURVETUN_HOME": self.home,
        }

    def run_twist(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            twist(*argv),
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def assertOneLineError(
        self, result: subprocess.CompletedProcess[str], status: int, text: str
    ) -> None:
        output = result.stdout + result.stderr
        self.assertNotIn("Traceback", output)
        self.assertEqual(result.returncode, status, output)
        first = result.stderr.splitlines()[0]
        self.assertIn(text, first)

    def test_help_describes_the_options_and_exits_0(self) -> None:
        result = self.run_twist("--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        for option in ("--listen", "--forward", "--keydir", "--registry", "--grace"):
            self.assertIn(option, result.stdout)

    def test_a_malformed_option_is_one_line_and_status_64(self) -> None:
        result = self.run_twist("--grace", "-1")
        self.assertOneLineError(result, EX_USAGE, "Error: --grace must be a non-negative number")

    def test_a_malformed_endpoint_is_one_line_and_status_64(self) -> None:
        result = self.run_twist("--listen", "foo:1")
        self.assertOneLineError(result, EX_USAGE, "twist curvetun: bad --listen endpoint 'foo:1'")
        self.assertEqual(len(result.stderr.splitlines()), 1)

    def test_an_unusable_key_directory_is_one_line_and_status_78(self) -> None:
        bad = os.path.abspath(self.mktemp())
        with open(bad, "w") as f:
            f.write("not a directory\n")
        result = self.run_twist("--keydir", bad)
        self.assertOneLineError(
            result, EX_CONFIG, f"twist curvetun: cannot create key directory {bad}"
        )
        self.assertEqual(len(result.stderr.splitlines()), 1)

    def test_a_port_in_use_is_one_line_and_status_69(self) -> None:
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = self.run_twist("--keydir", self.home, "--listen", f"tcp:{port}:{LOCALHOST}")
        self.assertOneLineError(
            result, EX_UNAVAILABLE, f"twist curvetun: cannot listen on tcp:{port}"
        )
        self.assertEqual(len(result.stderr.splitlines()), 1)

    def assertExactlyOneLine(
        self, result: subprocess.CompletedProcess[str], status: int, text: str
    ) -> None:
        self.assertOneLineError(result, status, text)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)

    def assertUsageError(self, result: subprocess.CompletedProcess[str], text: str) -> None:
        """
        A bad option's value: one line saying why, then (as for every usage
        error of C{twist}) a blank line and the usage.
        """
        self.assertOneLineError(result, EX_USAGE, f"Error: {text}")
        lines = result.stderr.splitlines()
        self.assertEqual(lines[1], "", result.stderr[:500])
        self.assertTrue(lines[2].startswith("Usage:"), result.stderr[:500])

    def test_a_listen_endpoint_ending_in_a_backslash_is_one_line_and_status_64(self) -> None:
        result = self.run_twist("--listen", "curvetun:7700:interface=\\")
        self.assertExactlyOneLine(
            result, EX_USAGE, "twist curvetun: bad --listen endpoint 'curvetun:7700:interface=\\\\'"
        )
        self.assertIn("lone backslash", result.stderr)

    def test_a_forward_endpoint_ending_in_a_backslash_is_one_line_and_status_64(self) -> None:
        result = self.run_twist("--listen", f"tcp:0:{LOCALHOST}", "--forward", "tcp:127.0.0.1:1\\")
        self.assertExactlyOneLine(
            result, EX_USAGE, "twist curvetun: bad --forward endpoint 'tcp:127.0.0.1:1\\\\'"
        )

    def test_a_limit_of_thousands_of_digits_is_a_usage_error_without_a_traceback(self) -> None:
        result = self.run_twist("--max-handshakes", "9" * 5000)
        self.assertUsageError(result, "--max-handshakes must be a whole number of at most")
        self.assertLess(len(result.stderr.splitlines()[0]), 200)

    def test_a_port_of_thousands_of_digits_is_one_line_and_status_64(self) -> None:
        result = self.run_twist("--listen", "tcp:" + "9" * 5000)
        self.assertExactlyOneLine(result, EX_USAGE, "twist curvetun: bad --listen endpoint 'tcp:99")
        self.assertLess(len(result.stderr), 400)

    def test_a_second_forward_is_a_usage_error(self) -> None:
        result = self.run_twist(
            "--forward", "tcp:127.0.0.1:6379", "--forward", "tcp:127.0.0.1:6380"
        )
        self.assertUsageError(result, "--forward given twice")

    def test_it_starts_logs_its_key_and_on_sigterm_lets_open_connections_finish(self) -> None:
        keydir = os.path.join(self.home, "keys")
        process = subprocess.Popen(
            twist(
                "--keydir", keydir,
                "--listen", f"curvetun:0:{LOCALHOST}",
                "--listen", f"tcp:0:{LOCALHOST}",
                "--grace", "30",
            ),
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        self.addCleanup(lambda: None if process.poll() is not None else process.kill())
        output = read_until(process, b"", "Listening on", count=2)
        events = parse_events(output)
        [announced] = [e for e in events if e["log_format"].startswith("curvetun public key")]
        with open(os.path.join(keydir, "public.key")) as f:
            self.assertEqual(announced["public_key"], f.read().strip())
        listening = [e for e in events if e["log_format"].startswith("Listening on")]
        self.assertEqual(
            [e["endpoint"] for e in listening], [f"curvetun:0:{LOCALHOST}", f"tcp:0:{LOCALHOST}"]
        )

        # An echo through the plain TCP listener: the reactor is running
        # (so SIGTERM reaches its handler), and the connection stays open.
        port = int(listening[1]["address"].rpartition(":")[2])
        connection = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.addCleanup(connection.close)
        connection.sendall(b"ping")
        self.assertEqual(connection.recv(100), b"ping")

        process.send_signal(signal.SIGTERM)
        output = read_until(process, output, "Waiting up to {grace} seconds")
        # It no longer listens, but serves the open connection until it closes.
        self.assertRaises(ConnectionRefusedError, socket.create_connection, ("127.0.0.1", port), 30)
        connection.sendall(b"still there?")
        self.assertEqual(connection.recv(100), b"still there?")
        self.assertIsNone(process.poll())
        connection.close()

        stdout, stderr = process.communicate(timeout=30)
        stdout = output + stdout
        events = parse_events(stdout)
        formats = [e["log_format"] for e in events]
        self.assertIn("curvetun stopped", formats)
        self.assertNotIn("Aborting {count} connection(s) still open after {grace} seconds", formats)
        self.assertNotIn(b"Traceback", stdout + stderr)
        # twist ends a process stopped by a signal with that signal, once
        # the services have stopped (Twisted's choice; systemd counts it as
        # a clean stop).
        self.assertEqual(process.returncode, -signal.SIGTERM, stderr)
        # No secret is ever logged.
        for secret in ("secret.key", "nonce.key"):
            with open(os.path.join(keydir, secret)) as f:
                self.assertNotIn(f.read().strip().encode(), stdout + stderr)
