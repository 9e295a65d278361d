"""
The benchmark (curvetun.bench): a quick run end to end, in its own
processes, that yields every figure; and its parts without a network:
the server protocols, the client's byte counting and writer, the
summaries, ratios, targets and both output formats.

No test asserts a speed: the machine running the tests may be anything.
"""

from __future__ import annotations

import functools
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from curvetun import bench
from curvetun.bench import client, report, runner, server, transports
from curvetun.bench import options as bench_options
from curvetun.bench.client import Pump
from curvetun.bench.figures import (
    CRYPTO_COLUMN,
    FIGURES,
    FIGURES_BY_KEY,
    TARGETS,
    TLS_SKIPPED,
    TRANSPORTS,
    BenchError,
    Report,
    Summary,
    evaluate_targets,
)
from curvetun.bench.report import format_report, report_json
from curvetun.bench.runner import plan_transports

ROOT = Path(__file__).resolve().parent.parent
QUICK_TIMEOUT = 120


def _report(transports: tuple[str, ...] = ("tcp", "tls", "curvetun")) -> Report:
    return Report(
        transports=transports,
        figures=FIGURES,
        runs=3,
        quick=False,
        argv=[],
        environment={
            "python": "Python 3",
            "twisted": "1",
            "pynacl": "1",
            "cpus": "2",
            "date": "today",
        },
    )


def _fill(report: Report, key: str, **columns: list[float]) -> None:
    figure = FIGURES_BY_KEY[key]
    for column, values in columns.items():
        for value in values:
            report.add(figure, column, value)


@functools.cache
def _quick_run() -> subprocess.CompletedProcess[str]:
    """
    Run C{python -m curvetun.bench --quick --json} once for all the tests
    that look at it.
    """
    env = dict(os.environ)
    paths = [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return subprocess.run(
        [sys.executable, "-m", "curvetun.bench", "--quick", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=QUICK_TIMEOUT,
        check=False,
    )


class QuickRunTests(SynchronousTestCase):
    """
    C{python -m curvetun.bench --quick --json}, as a user runs it.
    """

    def setUp(self) -> None:
        self.result = _quick_run()
        self.assertEqual(self.result.returncode, 0, self.result.stderr[-3000:])
        self.data: dict[str, Any] = json.loads(self.result.stdout)

    def test_every_figure_is_present_and_positive_for_every_transport_that_ran(self) -> None:
        figures = {figure["key"]: figure for figure in self.data["figures"]}
        self.assertEqual(set(figures), {figure.key for figure in FIGURES})
        transports = self.data["transports"]
        self.assertIn("tcp", transports)
        self.assertIn("curvetun", transports)
        for figure in FIGURES:
            results = figures[figure.key]["results"]
            columns = [CRYPTO_COLUMN] if figure.in_process else transports
            for column in columns:
                if not figure.applies_to(column):
                    continue
                summary = results[column]
                self.assertIsNotNone(summary, f"{figure.key} over {column}")
                self.assertGreater(summary["median"], 0, f"{figure.key} over {column}")
                self.assertGreater(summary["min"], 0, f"{figure.key} over {column}")
                self.assertEqual(len(summary["runs"]), self.data["runs"])

    def test_the_message_api_row_is_not_applicable_to_tcp_and_tls(self) -> None:
        figure = next(f for f in self.data["figures"] if f["key"] == "pipelined_message")
        self.assertIsNone(figure["results"]["tcp"])
        self.assertIsNone(figure["ratios"]["curvetun/tcp"])

    def test_tls_ran_as_tls_1_3_or_is_said_to_be_skipped(self) -> None:
        if "tls" in self.data["transports"]:
            self.assertTrue(self.data["tls"].startswith("TLSv1.3 "), self.data["tls"])
            self.assertEqual(self.data["skipped"], {})
        else:
            self.assertIn(TLS_SKIPPED, self.data["skipped"]["tls"])

    def test_ratios_to_every_other_transport_that_ran_are_given(self) -> None:
        others = [t for t in ("tcp", "tls") if t in self.data["transports"]]
        bulk = next(f for f in self.data["figures"] if f["key"] == "bulk")
        self.assertEqual(sorted(bulk["ratios"]), sorted(f"curvetun/{t}" for t in others))
        for ratio in bulk["ratios"].values():
            self.assertGreater(ratio, 0)

    def test_every_target_is_reported_with_a_verdict(self) -> None:
        self.assertEqual(len(self.data["targets"]), len(TARGETS))
        for target in self.data["targets"]:
            if target["reference"] == "tls" and "tls" not in self.data["transports"]:
                self.assertIsNone(target["met"])
            else:
                self.assertIsInstance(target["met"], bool, target["label"])

    def test_curvetun_runs_with_key_directories_and_in_memory_side_by_side(self) -> None:
        self.assertIn("curvetun-memory", self.data["transports"])
        bulk = next(f for f in self.data["figures"] if f["key"] == "bulk")
        self.assertGreater(bulk["results"]["curvetun-memory"]["median"], 0)
        self.assertNotIn("git", self.data["environment"]["curvetun"])

    def test_progress_goes_to_stderr(self) -> None:
        self.assertIn("run 1/1: bulk over curvetun", self.result.stderr)


class SummaryAndRatioTests(SynchronousTestCase):
    def test_a_summary_is_the_median_and_the_range(self) -> None:
        summary = Summary.of([3.0, 1.0, 2.0, 10.0, 4.0])
        self.assertEqual((summary.median, summary.low, summary.high), (3.0, 1.0, 10.0))
        self.assertEqual(summary.runs, (3.0, 1.0, 2.0, 10.0, 4.0))

    def test_nothing_to_summarize_is_an_error(self) -> None:
        self.assertRaises(ValueError, Summary.of, [])

    def test_ratios_are_of_medians(self) -> None:
        report = _report()
        _fill(report, "bulk", tcp=[100.0, 200.0, 300.0], curvetun=[50.0, 60.0, 1000.0])
        self.assertEqual(report.ratio("bulk", "tcp"), 0.3)
        self.assertIsNone(report.ratio("bulk", "tls"))

    def test_the_crypto_ceiling_is_the_slower_of_box_and_open(self) -> None:
        report = _report()
        _fill(report, "box_100", pynacl=[500.0])
        self.assertIsNone(report.crypto_ceiling_100())
        _fill(report, "open_100", pynacl=[400.0])
        self.assertEqual(report.crypto_ceiling_100(), 400.0)


class TargetTests(SynchronousTestCase):
    def _verdicts(self, report: Report) -> dict[str, bool | None]:
        return {result.target.label: result.met for result in evaluate_targets(report)}

    def test_a_ratio_target_is_met_at_or_above_its_goal(self) -> None:
        report = _report()
        _fill(report, "pingpong", tcp=[100.0], tls=[100.0], curvetun=[140.0])
        verdicts = self._verdicts(report)
        self.assertTrue(verdicts["ping-pong >= 0.85 x TCP"])
        self.assertTrue(verdicts["ping-pong >= 1.4 x TLS"])
        _fill(report, "pingpong", curvetun=[130.0])  # median now 135
        self.assertFalse(self._verdicts(report)["ping-pong >= 1.4 x TLS"])

    def test_the_memory_target_is_a_ceiling(self) -> None:
        report = _report()
        _fill(report, "idle_memory", curvetun=[4.0])
        self.assertTrue(self._verdicts(report)["idle memory per connection <= 4 KiB"])
        report = _report()
        _fill(report, "idle_memory", curvetun=[4.5])
        self.assertFalse(self._verdicts(report)["idle memory per connection <= 4 KiB"])

    def test_messages_are_compared_with_the_crypto_ceiling(self) -> None:
        report = _report()
        _fill(report, "pipelined_message", curvetun=[300.0])
        _fill(report, "box_100", pynacl=[600.0])
        _fill(report, "open_100", pynacl=[500.0])
        result = next(r for r in evaluate_targets(report) if r.target.figure == "pipelined_message")
        self.assertEqual(result.measured, 0.6)
        self.assertTrue(result.met)

    def test_a_target_without_its_figures_has_no_verdict(self) -> None:
        report = _report(("tcp", "curvetun"))
        _fill(report, "bulk", tcp=[10.0], curvetun=[10.0])
        verdicts = self._verdicts(report)
        self.assertIsNone(verdicts["bulk >= 1.0 x TLS"])
        self.assertTrue(verdicts["bulk >= 0.5 x TCP"])


class OutputTests(SynchronousTestCase):
    def _measured(self) -> Report:
        report = _report()
        for figure in FIGURES:
            columns = [CRYPTO_COLUMN] if figure.in_process else ["tcp", "tls", "curvetun"]
            for column in columns:
                if figure.applies_to(column):
                    for value in (900.0, 1000.0, 1100.0):
                        report.add(figure, column, value)
        return report

    def test_the_table_shows_median_range_ratios_and_verdicts(self) -> None:
        text = format_report(self._measured())
        bulk = next(line for line in text.splitlines() if line.startswith("bulk one-way"))
        self.assertIn("1,000 (900-1,100)", bulk)
        self.assertEqual(report.format_number(1_654_098), "1.65M")
        self.assertEqual(report.format_number(12_649), "12.6k")
        self.assertEqual(report.format_number(4.186), "4.19")
        self.assertEqual(bulk.split()[-2:], ["1.00", "1.00"])
        self.assertIn("ping-pong >= 1.4 x TLS", text)
        self.assertIn("NOT MET", text)
        self.assertIn("X25519", text)

    def test_the_message_api_row_says_n_a_for_tcp_and_tls(self) -> None:
        text = format_report(self._measured())
        row = next(line for line in text.splitlines() if "write_message" in line)
        self.assertEqual(row.split().count("n/a"), 4)  # tcp, tls, and both ratios

    def test_the_table_says_tls_was_skipped(self) -> None:
        report = _report(("tcp", "curvetun"))
        report.skipped = {"tls": f"{TLS_SKIPPED}: No module named 'OpenSSL'"}
        _fill(report, "bulk", tcp=[10.0], curvetun=[5.0])
        text = format_report(report)
        self.assertIn("TLS: skipped (install curvetun[bench])", text)
        self.assertNotIn("curvetun/tls", text)

    def test_json_gives_every_run_and_null_where_not_applicable(self) -> None:
        data = report_json(self._measured())
        json.dumps(data)  # serializable
        figure = next(f for f in data["figures"] if f["key"] == "pipelined_message")
        self.assertIsNone(figure["results"]["tcp"])
        self.assertEqual(figure["results"]["curvetun"]["runs"], [900.0, 1000.0, 1100.0])
        self.assertEqual(data["crypto_ceiling_100"], 1000.0)


class PlanTests(SynchronousTestCase):
    def test_tls_is_skipped_and_said_so_when_its_libraries_are_missing(self) -> None:
        transports, skipped = plan_transports(
            ("tcp", "tls", "curvetun"), "No module named 'OpenSSL'"
        )
        self.assertEqual(transports, ("tcp", "curvetun"))
        self.assertEqual(skipped, {"tls": f"{TLS_SKIPPED}: No module named 'OpenSSL'"})

    def test_nothing_is_skipped_when_tls_is_available(self) -> None:
        self.assertEqual(plan_transports(("tls", "curvetun"), None), (("tls", "curvetun"), {}))

    def test_missing_pyopenssl_is_detected(self) -> None:
        saved = sys.modules.get("OpenSSL")
        sys.modules["OpenSSL"] = None  # type: ignore[assignment]
        try:
            problem = runner.tls_unavailable()
        finally:
            if saved is None:
                del sys.modules["OpenSSL"]
            else:
                sys.modules["OpenSSL"] = saved
        self.assertIsNotNone(problem)
        self.assertIn("OpenSSL", str(problem))


class CommandLineTests(SynchronousTestCase):
    def _main(self, *argv: str) -> tuple[int, str, str]:
        stdout, stderr = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", stdout)
        self.patch(sys, "stderr", stderr)
        return bench.main(list(argv)), stdout.getvalue(), stderr.getvalue()

    def _options(self, *argv: str) -> bench_options.BenchOptions:
        options = bench_options.BenchOptions()
        options.parseOptions(list(argv))
        return options

    def _assert_usage_error(self, argv: tuple[str, ...], expected: str) -> None:
        """
        C{argv} is refused with exit status 2 and one line on standard
        error that says C{expected} and where the help is.
        """
        status, out, message = self._main(*argv)
        self.assertEqual(status, 2)
        self.assertEqual(out, "")
        self.assertIn(expected, message)
        self.assertTrue(message.startswith("curvetun bench: error: "), message)
        self.assertIn("'curvetun bench --help'", message)
        self.assertEqual(len(message.splitlines()), 1, message)

    def test_an_unknown_figure_group_is_a_usage_error(self) -> None:
        self._assert_usage_error(("--only", "bulk,speed"), "--only: unknown figure group speed")

    def test_an_unknown_transport_is_a_usage_error(self) -> None:
        self._assert_usage_error(
            ("--transports", "tcp,quic"), "--transports: unknown transport quic"
        )

    def test_runs_must_be_positive(self) -> None:
        self._assert_usage_error(("--runs", "0"), "--runs: must be positive: '0'")

    def test_numbers_must_be_numbers(self) -> None:
        self._assert_usage_error(("--duration", "soon"), "--duration: not a number: 'soon'")
        self._assert_usage_error(("--connections", "1.5"), "--connections: not a number: '1.5'")

    def test_an_unknown_pinning_is_a_usage_error(self) -> None:
        self._assert_usage_error(("--pin", "left"), "--pin: invalid choice: 'left'")

    def test_unknown_options_and_arguments_are_usage_errors(self) -> None:
        self._assert_usage_error(("--fast",), "--fast")
        self._assert_usage_error(("--quick", "now"), "unrecognized arguments: now")

    def test_serve_needs_the_client_key(self) -> None:
        self._assert_usage_error(
            ("--serve", "curvetun-memory"), "--serve curvetun-memory needs --client-key"
        )

    def test_serving_curvetun_needs_a_key_directory_and_a_registry(self) -> None:
        self._assert_usage_error(("--serve", "curvetun"), "--serve curvetun needs --keydir")
        self._assert_usage_error(
            ("--serve", "curvetun", "--keydir", "K"), "--serve curvetun needs --registry"
        )

    def test_help_names_the_command_and_hides_the_server_options(self) -> None:
        status, out, message = self._main("--help")
        self.assertEqual((status, message), (0, ""))
        self.assertTrue(out.startswith("Usage: curvetun bench [options]\n"), out)
        for option in ("--runs", "--quick", "--json", "--only", "--transports", "--duration"):
            self.assertIn(option, out)
        for option in ("--connections", "--profile", "--pin"):
            self.assertIn(option, out)
        for option in ("--serve", "--client-key", "--tls-dir", "--profile-to", "--cpu", "--keydir"):
            self.assertNotIn(option, out)

    def test_the_server_options_are_parsed(self) -> None:
        options = self._options(
            *("--serve", "curvetun", "--client-key", "ab", "--tls-dir", "T"),
            *("--profile-to", "P", "--cpu", "3", "--keydir", "K", "--registry", "R"),
        )
        names = ("serve", "client-key", "tls-dir", "profile-to", "cpu", "keydir", "registry")
        self.assertEqual(
            [options[name] for name in names], ["curvetun", "ab", "T", "P", 3, "K", "R"]
        )

    def test_quick_is_one_short_run_and_options_override_it(self) -> None:
        settings = bench_options.settings_from(
            self._options("--quick", "--runs", "2", "--only", "crypto,bulk")
        )
        self.assertEqual(settings.runs, 2)
        self.assertTrue(settings.quick)
        self.assertEqual(settings.duration, bench_options.QUICK["duration"])
        self.assertEqual(settings.figures[0].key, "bulk")
        self.assertEqual({f.group for f in settings.figures}, {"bulk", "crypto"})

    def test_single_figures_can_be_chosen_by_their_key(self) -> None:
        settings = bench_options.settings_from(self._options("--only", "pipelined_message,x25519"))
        self.assertEqual([f.key for f in settings.figures], ["pipelined_message", "x25519"])

    def test_the_defaults_are_five_runs_of_every_figure_on_every_transport(self) -> None:
        settings = bench_options.settings_from(self._options())
        self.assertEqual(settings.runs, 5)
        self.assertFalse(settings.quick)
        self.assertEqual(settings.transports, ("tcp", "tls", "curvetun", "curvetun-memory"))
        self.assertEqual(settings.transports, TRANSPORTS)
        self.assertFalse(settings.tunnel)
        self.assertEqual(settings.figures, FIGURES)
        self.assertGreaterEqual(settings.connections, 1000)
        self.assertEqual((settings.profile, settings.pin), (None, "none"))


class PinTests(SynchronousTestCase):
    def setUp(self) -> None:
        if not hasattr(os, "sched_getaffinity"):
            raise SkipTest("no CPU affinity on this platform")

    def test_no_pinning_pins_nothing(self) -> None:
        self.assertEqual(runner.pin_cpus("none"), (None, None))

    def test_same_puts_client_and_servers_on_one_usable_cpu(self) -> None:
        client, server = runner.pin_cpus("same")
        self.assertEqual(client, server)
        self.assertIn(client, os.sched_getaffinity(0))

    def test_split_puts_them_on_two_cpus_or_says_it_cannot(self) -> None:
        if len(os.sched_getaffinity(0)) < 2:
            self.assertRaises(BenchError, runner.pin_cpus, "split")
            return
        client, server = runner.pin_cpus("split")
        self.assertNotEqual(client, server)
        self.assertLessEqual({client, server}, os.sched_getaffinity(0))


class ServerProtocolTests(SynchronousTestCase):
    def _connect(self, protocol: Any) -> StringTransport:
        transport = StringTransport()
        protocol.makeConnection(transport)
        return transport

    def test_the_sink_answers_the_count_then_the_end_even_if_the_header_is_split(self) -> None:
        sink = server._SinkServer()
        transport = self._connect(sink)
        sink.dataReceived((250).to_bytes(8, "big")[:3])
        self.assertEqual(transport.value(), b"")
        sink.dataReceived((250).to_bytes(8, "big")[3:] + b"x" * 100)
        self.assertEqual(transport.value(), b"R")
        sink.dataReceived(b"x" * 149)
        self.assertEqual(transport.value(), b"R")
        sink.dataReceived(b"x")
        self.assertEqual(transport.value(), b"RD")
        sink.dataReceived(b"x")
        self.assertEqual(transport.value(), b"RD")

    def test_the_echo_server_writes_back_and_counts_open_connections(self) -> None:
        factory = server._EchoFactory()
        echo = factory.buildProtocol(None)
        transport = self._connect(echo)
        self.assertEqual(factory.open, 1)
        echo.dataReceived(b"ping")
        self.assertEqual(transport.value(), b"ping")
        echo.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(factory.open, 0)

    def test_the_control_port_reports_resident_memory_and_open_connections(self) -> None:
        factory = server._EchoFactory()
        factory.open = 7
        control = server._ControlServer(factory)
        transport = self._connect(control)
        control.dataReceived(b"rss\n")
        rss, open_connections = transport.value().split()
        self.assertGreater(int(rss), 1024 * 1024)
        self.assertEqual(int(open_connections), 7)


class ClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.client = client._Client()
        self.transport = StringTransport()
        self.client.makeConnection(self.transport)

    def test_ping_pong_sends_the_next_ping_only_when_the_whole_echo_is_back(self) -> None:
        done = self.client.ping_pong(b"p" * 10, 3)
        self.assertEqual(self.transport.value(), b"p" * 10)
        self.client.dataReceived(b"p" * 6)
        self.assertEqual(len(self.transport.value()), 10)
        self.client.dataReceived(b"p" * 4)
        self.assertEqual(len(self.transport.value()), 20)
        self.client.dataReceived(b"p" * 10)
        self.assertNoResult(done)
        self.assertEqual(len(self.transport.value()), 30)
        self.client.dataReceived(b"p" * 10)
        self.successResultOf(done)
        self.assertEqual(len(self.transport.value()), 30)

    def test_expect_waits_for_bytes_not_yet_claimed(self) -> None:
        self.client.dataReceived(b"R")
        self.successResultOf(self.client.expect(1))
        waiting = self.client.expect(1)
        self.assertNoResult(waiting)
        self.client.dataReceived(b"D")
        self.successResultOf(waiting)

    def test_a_lost_connection_fails_the_wait(self) -> None:
        waiting = self.client.expect(1)
        self.client.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(waiting, ConnectionDone)
        self.successResultOf(self.client.closed)


class PumpTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.written: list[bytes] = []

    def test_it_writes_in_batches_and_lets_the_reactor_run_between_them(self) -> None:
        pump = Pump(self.clock, self.written.append, b"x", 5, batch=2)
        done = pump.start()
        self.assertEqual(len(self.written), 2)
        self.assertEqual([call.getTime() for call in self.clock.getDelayedCalls()], [0])
        self.assertNoResult(done)
        self.clock.advance(0)
        self.assertEqual(len(self.written), 5)
        self.successResultOf(done)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_it_stops_when_paused_and_carries_on_when_resumed(self) -> None:
        pump: Pump

        def write(piece: bytes) -> None:
            self.written.append(piece)
            if len(self.written) == 3:
                pump.pauseProducing()  # as a transport does when its buffer fills

        pump = Pump(self.clock, write, b"x", 10, batch=100)
        done = pump.start()
        self.assertEqual(len(self.written), 3)
        self.clock.advance(0)
        self.assertEqual(len(self.written), 3)
        pump.resumeProducing()
        self.assertEqual(len(self.written), 10)
        self.successResultOf(done)

    def test_stopping_it_fails_the_wait(self) -> None:
        pump = Pump(self.clock, self.written.append, b"x", 10, batch=2)
        done = pump.start()
        pump.stopProducing()
        self.clock.advance(0)
        self.assertEqual(len(self.written), 2)
        self.failureResultOf(done, ConnectionDone)


class CryptoCeilingTests(SynchronousTestCase):
    def test_every_crypto_figure_has_an_operation_that_works(self) -> None:
        operations = client.crypto_operations()
        crypto = {f.key for f in FIGURES if f.in_process}
        self.assertEqual(set(operations), crypto)
        for operation in operations.values():
            self.assertIsInstance(operation(), bytes)

    def test_a_rate_counts_calls_over_at_least_the_duration(self) -> None:
        calls: list[None] = []
        rate = client.crypto_rate(lambda: calls.append(None), 0.01)
        self.assertGreater(rate, 0)
        self.assertGreaterEqual(len(calls), 16)


class CertificateTests(SynchronousTestCase):
    def test_the_throwaway_certificate_names_localhost_and_loads_in_twisted(self) -> None:
        if runner.tls_unavailable() is not None:
            raise SkipTest("pyOpenSSL is not installed (it comes with the bench extra)")
        from twisted.internet.ssl import PrivateCertificate

        with tempfile.TemporaryDirectory() as directory:
            cert_path, key_path = transports.make_certificate(directory)
            pem = Path(key_path).read_bytes() + Path(cert_path).read_bytes()
            certificate = PrivateCertificate.loadPEM(pem)
        self.assertEqual(certificate.getSubject().commonName, b"localhost")


class KeyDirectoryTests(SynchronousTestCase):
    """
    The C{curvetun} column runs as applications run curvetun: a key
    directory and a registry file on each side, endpoint strings.
    """

    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.keys = transports.KeyDirectories.create(self.directory)

    def test_each_side_has_a_key_directory_and_a_registry_naming_the_other(self) -> None:
        from curvetun.registry import Registry
        from curvetun.vault import read_public_key

        keys = self.keys
        self.assertEqual(read_public_key(keys.server_keydir), keys.server_key)
        self.assertEqual(read_public_key(keys.client_keydir), keys.client_key)
        server_registry = Registry.parse(Path(keys.server_registry).read_text())
        client_registry = Registry.parse(Path(keys.client_registry).read_text())
        self.assertEqual(client_registry.server_key_for("127.0.0.1"), keys.server_key)
        self.assertEqual(
            [entry.key for entry in server_registry.entries if entry.address == "127.0.0.1"],
            [keys.client_key],
        )

    def test_the_client_connects_through_an_endpoint_string_with_its_key_directory(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        from curvetun.endpoints import CurveTunClientEndpoint, service_pool

        self.addCleanup(service_pool.forget_keydir, self.keys.client_keydir)
        identities = transports.ClientIdentities(MemoryReactorClock(), self.keys)
        self.addCleanup(identities.stop)
        connector = transports.Connector(MemoryReactorClock(), "curvetun", identities)
        endpoint = connector.endpoint(7701, self.keys.server_key)
        self.assertIsInstance(endpoint, CurveTunClientEndpoint)
        # Parsed once per port, as an application keeps its endpoint.
        self.assertIs(connector.endpoint(7701, self.keys.server_key), endpoint)
        description = transports.curvetun_client_description(
            7701, self.keys.server_key, self.keys.client_keydir, self.keys.client_registry
        )
        self.assertIn(f"keydir={self.keys.client_keydir}", description)
        self.assertIn(f"registry={self.keys.client_registry}", description)

    def test_another_server_key_directory_admits_the_same_client(self) -> None:
        keydir, registry, key = transports.KeyDirectories.server_for(
            self.directory, "fresh", self.keys.client_key
        )
        self.assertNotEqual(keydir, self.keys.server_keydir)
        self.assertNotEqual(key, self.keys.server_key)
        self.assertIn(self.keys.client_key.hex(), Path(registry).read_text().lower() + "")


class EnvironmentTests(SynchronousTestCase):
    def test_the_version_is_the_package_version_with_no_git_lookup(self) -> None:
        from curvetun import __version__

        ran: list[object] = []
        self.patch(subprocess, "run", lambda *a, **k: ran.append(a))
        self.patch(subprocess, "Popen", lambda *a, **k: ran.append(a))
        info = runner.environment()
        self.assertEqual(info["curvetun"], __version__)
        self.assertEqual(ran, [])


class PackagingTests(SynchronousTestCase):
    def test_the_bench_package_is_installed_with_curvetun(self) -> None:
        # setup.cfg names its packages one by one: a subpackage left out
        # would be missing from every installed copy.
        import configparser

        config = configparser.ConfigParser()
        config.read(ROOT / "setup.cfg")
        packages = config["options"]["packages"].split()
        self.assertIn("curvetun.bench", packages)
        self.assertTrue((ROOT / "curvetun" / "bench" / "__init__.py").exists())
        self.assertTrue((ROOT / "curvetun" / "bench" / "__main__.py").exists())
