"""
The tunnel comparison (C{curvetun bench --tunnel}): a quick run end to
end, as a user runs it, with every tunnel end its own process; and its
parts: the command line, watching processes through C{/proc}, ending
them, the derived figures, the table and the JSON.

No test asserts a speed. The spiped and stunnel columns are checked
where those programs are installed (Debian: C{apt-get install spiped
stunnel4}) and skipped, saying so, elsewhere.
"""

from __future__ import annotations

import atexit
import functools
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from curvetun import bench
from curvetun.bench import options as bench_options
from curvetun.bench import processes, tunnel
from curvetun.bench.figures import TUNNEL_FIGURES, TUNNEL_FIGURES_BY_KEY, TUNNELS

ROOT = Path(__file__).resolve().parent.parent
QUICK_TIMEOUT = 180

# Short enough for the test suite, long enough to fill every figure.
QUICK_COMMAND = ["--tunnel", "--quick", "--connections", "50"]


@functools.cache
def _scratch() -> str:
    """
    The temporary directory of the quick runs: their tunnel ends' files,
    and so their command lines, are under it.
    """
    directory = tempfile.mkdtemp(prefix="curvetun-test-bench-tunnel-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["TMPDIR"] = _scratch()
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    return subprocess.run(
        [sys.executable, "-m", "curvetun.bench", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=QUICK_TIMEOUT,
        check=False,
    )


@functools.cache
def _quick_json_run() -> subprocess.CompletedProcess[str]:
    return _run(*QUICK_COMMAND, "--json")


@functools.cache
def _quick_table_run() -> subprocess.CompletedProcess[str]:
    return _run("--tunnel", "--quick", "--only", "pingpong")


def _installed(program: str) -> None:
    if program == "stunnel":
        found = shutil.which("stunnel4") or shutil.which("stunnel")
    else:
        found = shutil.which(program)
    if not found:
        raise SkipTest(
            f"{program} is not installed (Debian: apt-get install {program}"
            f"{'4' if program == 'stunnel' else ''})"
        )


class QuickTunnelRunTests(SynchronousTestCase):
    """
    C{python -m curvetun.bench --tunnel --quick --json}, as a user runs it.
    """

    def setUp(self) -> None:
        self.result = _quick_json_run()
        self.assertEqual(self.result.returncode, 0, self.result.stderr[-3000:])
        self.data: dict[str, Any] = json.loads(self.result.stdout)
        self.figures = {figure["key"]: figure for figure in self.data["figures"]}

    def test_every_figure_is_there_with_every_column(self) -> None:
        self.assertEqual(self.data["mode"], "tunnel")
        self.assertEqual(list(self.figures), [figure.key for figure in TUNNEL_FIGURES])
        for figure in self.data["figures"]:
            self.assertEqual(set(figure["results"]), set(self.data["tunnels"]))
            self.assertTrue(figure["title"] and figure["unit"], figure["key"])

    def test_direct_and_curvetun_give_every_figure_that_applies(self) -> None:
        self.assertIn("direct", self.data["tunnels"])
        self.assertIn("curvetun", self.data["tunnels"])
        self._assert_measured("curvetun")
        for key, figure in self.figures.items():
            direct = figure["results"]["direct"]
            if TUNNEL_FIGURES_BY_KEY[key].applies_to("direct"):
                self.assertGreater(direct["median"], 0, key)
            else:
                self.assertIsNone(direct, key)

    def test_the_spiped_column_is_measured_when_spiped_is_installed(self) -> None:
        _installed("spiped")
        self._assert_measured("spiped")

    def test_the_stunnel_column_and_the_ratios_when_stunnel_is_installed(self) -> None:
        _installed("stunnel")
        self._assert_measured("stunnel")
        for key, figure in self.figures.items():
            # The ratio is curvetun's median over stunnel's. (Not always
            # positive: in a run this short, the time a tunnel adds to a
            # round trip over direct can come out below zero.)
            results = figure["results"]
            self.assertAlmostEqual(
                figure["ratios"]["curvetun/stunnel"],
                results["curvetun"]["median"] / results["stunnel"]["median"],
                msg=key,
            )

    def test_a_missing_tunnel_program_is_a_one_line_note(self) -> None:
        for kind in ("spiped", "stunnel"):
            if kind not in self.data["tunnels"]:
                note = self.data["skipped"][kind]
                self.assertTrue(note.startswith(f"{kind}: skipped"), note)
                self.assertNotIn("\n", note)

    def test_the_cpu_of_both_ends_is_given_for_each_timed_figure(self) -> None:
        for key in ("bulk", "pingpong", "connections", "connections_concurrent"):
            cpu = self.figures[key]["cpu"]
            self.assertNotIn("direct", cpu)
            for column in cpu:
                for end in ("client_end", "server_end"):
                    self.assertGreaterEqual(cpu[column][end]["median"], 0, (key, column, end))
            self.assertIn("curvetun", cpu)

    def test_memory_is_given_for_each_end(self) -> None:
        memory = self.data["memory_per_end"]["curvetun"]
        self.assertEqual(set(memory), {"client_end", "server_end"})
        total = self.figures["idle_memory"]["results"]["curvetun"]["median"]
        self.assertAlmostEqual(
            total, memory["client_end"]["median"] + memory["server_end"]["median"]
        )

    def test_the_environment_names_the_tunnel_programs_found(self) -> None:
        for kind in ("spiped", "stunnel"):
            if kind in self.data["tunnels"]:
                self.assertTrue(self.data["environment"][kind], kind)

    def test_no_tunnel_end_is_left_running(self) -> None:
        # Every tunnel end's command line names the run's directory, which
        # is under this test's.
        running = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                running.append(Path(f"/proc/{pid}/cmdline").read_bytes())
            except OSError:
                continue
        mine = _scratch().encode()
        self.assertFalse([line for line in running if mine in line])
        self.assertTrue(self.data["tunnels"])

    def _assert_measured(self, column: str) -> None:
        for key, figure in self.figures.items():
            summary = figure["results"][column]
            self.assertIsNotNone(summary, f"{key} through {column}")
            self.assertEqual(len(summary["runs"]), self.data["runs"])
            if key == "pingpong_added":
                # A tunnel adds time to a round trip, but a noisy machine
                # may make one run through it faster than one without.
                continue
            if key == "cpu_per_connection":
                # CPU is read in clock ticks (10 ms): a quick run's ten
                # connections through a tunnel written in C can all fit
                # in less than one.
                self.assertGreaterEqual(summary["median"], 0, f"{key} through {column}")
                continue
            self.assertGreater(summary["median"], 0, f"{key} through {column}")


class QuickTunnelTableTests(SynchronousTestCase):
    def test_the_table_has_a_row_per_figure_and_the_cpu_of_each_end(self) -> None:
        result = _quick_table_run()
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        lines = result.stdout.splitlines()
        self.assertTrue(lines[0].startswith("curvetun tunnel comparison: 127.0.0.1"), lines[0])
        header = next(line for line in lines if line.startswith("figure "))
        for column in ("direct", "curvetun"):
            self.assertIn(column, header)
        self.assertTrue(any(line.startswith("ping-pong 100 B") for line in lines))
        self.assertTrue(any(line.startswith("time each round trip adds") for line in lines))
        self.assertTrue(any("curvetun client/server" in line for line in lines))
        self.assertIn("through curvetun", result.stderr)


class TunnelOptionsTests(SynchronousTestCase):
    def _settings(self, *argv: str) -> bench_options.Settings:
        options = bench_options.BenchOptions()
        options.parseOptions(list(argv))
        return bench_options.settings_from(options)

    def _error(self, *argv: str) -> str:
        stdout, stderr = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", stdout)
        self.patch(sys, "stderr", stderr)
        self.assertEqual(bench.main(list(argv)), 2)
        self.assertEqual(len(stderr.getvalue().splitlines()), 1)
        return stderr.getvalue()

    def test_tunnel_measures_every_tunnel_figure_through_every_column(self) -> None:
        settings = self._settings("--tunnel")
        self.assertTrue(settings.tunnel)
        self.assertEqual(settings.figures, TUNNEL_FIGURES)
        self.assertEqual(settings.transports, TUNNELS)
        self.assertEqual(settings.runs, 5)

    def test_quick_and_the_choices_of_figures_and_columns(self) -> None:
        settings = self._settings(
            "--tunnel", "--quick", "--only", "memory,pingpong", "--transports", "curvetun,direct"
        )
        self.assertEqual((settings.runs, settings.quick), (1, True))
        self.assertEqual(
            [f.key for f in settings.figures], ["pingpong", "pingpong_added", "idle_memory"]
        )
        self.assertEqual(settings.transports, ("direct", "curvetun"))

    def test_library_names_are_refused_with_tunnel_and_tunnel_names_without(self) -> None:
        self.assertIn(
            "--only: unknown figure group pipelined", self._error("--tunnel", "--only", "pipelined")
        )
        self.assertIn(
            "--transports: unknown transport tls", self._error("--tunnel", "--transports", "tls")
        )
        self.assertIn(
            "--transports: unknown transport stunnel", self._error("--transports", "stunnel")
        )
        self.assertIn(
            "--only: unknown figure group connections", self._error("--only", "connections")
        )

    def test_profile_and_pin_apply_to_the_library_figures_only(self) -> None:
        self.assertIn("py-spy", self._error("--tunnel", "--profile", "P"))
        self.assertIn("--pin", self._error("--tunnel", "--pin", "same"))

    def test_help_describes_tunnel(self) -> None:
        stdout = io.StringIO()
        self.patch(sys, "stdout", stdout)
        self.assertEqual(bench.main(["--help"]), 0)
        self.assertIn("--tunnel", stdout.getvalue())


class ProcessWatchTests(SynchronousTestCase):
    def test_cpu_time_is_read_and_grows_with_work(self) -> None:
        before = processes.cpu_seconds(os.getpid())
        deadline = time.process_time() + 0.05
        while time.process_time() < deadline:
            pass
        self.assertGreater(processes.cpu_seconds(os.getpid()), before)

    def test_resident_memory_is_read(self) -> None:
        self.assertGreater(processes.resident_bytes(os.getpid()), 1024 * 1024)

    def test_the_ports_a_process_listens_on_are_found(self) -> None:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        self.assertNotIn(port, processes.listening_ports(os.getpid()))
        listener.listen(1)
        self.assertIn(port, processes.listening_ports(os.getpid()))
        listener.close()
        self.assertNotIn(port, processes.listening_ports(os.getpid()))

    def test_a_free_port_can_be_bound(self) -> None:
        port = processes.free_port()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))


class ChildrenTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.children = processes.Children()
        self.addCleanup(self.children.stop_all)
        self.log = self.mktemp()

    def test_every_child_is_ended(self) -> None:
        started = [
            self.children.start([sys.executable, "-c", "import time; time.sleep(60)"], self.log)
            for _ in range(2)
        ]
        self.children.stop_all()
        for process in started:
            self.assertEqual(process.returncode, -signal.SIGTERM)
        self.assertEqual(self.children.processes, [])

    def test_a_child_that_ignores_sigterm_is_killed(self) -> None:
        script = (
            "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
            " print('ready', flush=True); time.sleep(60)"
        )
        process = self.children.start([sys.executable, "-c", script], self.log)
        deadline = time.monotonic() + 30
        while "ready" not in Path(self.log).read_text() and time.monotonic() < deadline:
            time.sleep(0.01)
        self.children.stop(process, timeout=0.2)
        self.assertEqual(process.returncode, -signal.SIGKILL)

    def test_a_child_runs_in_its_own_session(self) -> None:
        # A Ctrl-C in the terminal reaches the benchmark, which ends its
        # children in order, not the children directly.
        process = self.children.start(
            [sys.executable, "-c", "import time; time.sleep(60)"], self.log
        )
        self.assertEqual(os.getsid(process.pid), process.pid)


class DerivedFigureTests(SynchronousTestCase):
    def _bench(self, *columns: str) -> tunnel.TunnelBench:
        settings = bench_options.Settings(
            runs=2,
            duration=1.0,
            connections=10,
            quick=False,
            transports=columns,
            figures=TUNNEL_FIGURES,
            tunnel=True,
        )
        report = tunnel.TunnelReport(
            transports=columns,
            figures=TUNNEL_FIGURES,
            runs=2,
            quick=False,
            argv=[],
            environment={},
        )
        return tunnel.TunnelBench(None, settings, report, self.mktemp(), processes.Children())

    def test_time_added_is_the_difference_of_round_trip_times_in_the_same_run(self) -> None:
        bench_run = self._bench("direct", "curvetun")
        pingpong = TUNNEL_FIGURES_BY_KEY["pingpong"]
        bench_run.report.add(pingpong, "direct", 10_000.0)  # 100 µs a round trip
        bench_run.report.add(pingpong, "curvetun", 4_000.0)  # 250 µs
        bench_run.add_pingpong_added(1)
        self.assertEqual(bench_run.report.samples["pingpong_added"]["curvetun"], [150.0])

    def test_no_time_added_without_the_direct_column(self) -> None:
        bench_run = self._bench("curvetun")
        bench_run.report.add(TUNNEL_FIGURES_BY_KEY["pingpong"], "curvetun", 4_000.0)
        bench_run.add_pingpong_added(1)
        self.assertNotIn("pingpong_added", bench_run.report.samples)

    def test_derived_figures_bring_the_figure_they_come_from(self) -> None:
        bench_run = self._bench("direct", "curvetun")
        bench_run.settings = bench_options.Settings(
            runs=1,
            duration=1.0,
            connections=10,
            quick=False,
            transports=("curvetun",),
            figures=(TUNNEL_FIGURES_BY_KEY["cpu_per_connection"],),
            tunnel=True,
        )
        self.assertEqual(bench_run._keys(), ["connections", "cpu_per_connection"])


class TunnelReportTests(SynchronousTestCase):
    def _report(self) -> tunnel.TunnelReport:
        report = tunnel.TunnelReport(
            transports=TUNNELS,
            figures=TUNNEL_FIGURES,
            runs=3,
            quick=False,
            argv=["--tunnel"],
            environment={"curvetun": "0.1.0", "stunnel": "5.68"},
        )
        for figure in TUNNEL_FIGURES:
            for column in TUNNELS:
                if figure.applies_to(column):
                    for value in (90.0, 100.0, 110.0):
                        report.add(figure, column, value * (2 if column == "stunnel" else 1))
        for end in tunnel.ENDS:
            report.add_cpu("bulk", "curvetun", end, 50.0)
            report.memory.setdefault("curvetun", {})[end] = [3.0]
        return report

    def test_the_table_gives_each_figure_and_the_ratio_to_stunnel(self) -> None:
        text = tunnel.format_tunnel_report(self._report())
        bulk = next(line for line in text.splitlines() if line.startswith("bulk through"))
        self.assertIn("100 (90.0-110)", bulk)
        self.assertEqual(bulk.split()[-1], "0.50")
        memory = next(line for line in text.splitlines() if line.startswith("memory per idle"))
        self.assertIn(" - ", memory)  # not applicable to direct
        self.assertIn("50% / 50%", text)
        self.assertIn("curvetun/stunnel", text)

    def test_json_gives_every_run_the_ratios_and_the_cpu_of_each_end(self) -> None:
        data = tunnel.tunnel_report_json(self._report())
        json.dumps(data)
        bulk = next(f for f in data["figures"] if f["key"] == "bulk")
        self.assertEqual(bulk["results"]["curvetun"]["runs"], [90.0, 100.0, 110.0])
        self.assertEqual(bulk["ratios"], {"curvetun/stunnel": 0.5})
        self.assertEqual(bulk["cpu"]["curvetun"]["server_end"]["median"], 50.0)
        memory = next(f for f in data["figures"] if f["key"] == "idle_memory")
        self.assertIsNone(memory["results"]["direct"])
        self.assertEqual(data["memory_per_end"]["curvetun"]["client_end"]["median"], 3.0)


class PlanTests(SynchronousTestCase):
    def test_a_tunnel_program_not_installed_is_skipped_with_a_note(self) -> None:
        self.patch(shutil, "which", lambda name: None)
        planned, skipped = tunnel.plan_tunnels(TUNNELS)
        self.assertEqual(planned, ("direct", "curvetun"))
        self.assertEqual(
            skipped["spiped"], "spiped: skipped (not installed; on Debian: apt-get install spiped)"
        )
        self.assertIn("apt-get install stunnel4", skipped["stunnel"])

    def test_installed_programs_are_planned(self) -> None:
        self.patch(shutil, "which", lambda name: f"/usr/bin/{name}")
        self.assertEqual(tunnel.plan_tunnels(TUNNELS)[0], TUNNELS)
