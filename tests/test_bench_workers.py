"""
The worker scaling (C{curvetun bench --workers N}): a quick run end to
end, as a user runs it, with real C{twist curvetun --workers 1} and
C{--workers 2} servers and real client processes; and its parts: the
command line, the CPU of a process tree, the table and the JSON.

No test asserts a speed, nor that more workers are faster.
"""

from __future__ import annotations

import atexit
import functools
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from curvetun import bench
from curvetun.bench import options as bench_options
from curvetun.bench import processes, scale
from curvetun.bench.figures import SCALE_FIGURES, SCALE_FIGURES_BY_KEY

ROOT = Path(__file__).resolve().parent.parent
QUICK_TIMEOUT = 180

RATES = ("handshakes", "bulk")
"""
The figures that count work done: more than 0 in every run.
"""


@functools.cache
def _scratch() -> str:
    """
    The temporary directory of the quick runs: their processes' files,
    and so their command lines, are under it.
    """
    directory = tempfile.mkdtemp(prefix="curvetun-test-bench-workers-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    if not sys.platform.startswith("linux"):
        raise SkipTest("the server's processes are watched through Linux's /proc")
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
    return _run("--workers", "2", "--quick", "--clients", "3", "--runs", "2", "--json")


@functools.cache
def _quick_table_run() -> subprocess.CompletedProcess[str]:
    return _run("--workers", "2", "--quick", "--only", "handshakes")


class QuickWorkersRunTests(SynchronousTestCase):
    """
    C{python -m curvetun.bench --workers 2 --quick --clients 3 --runs 2
    --json}, as a user runs it.
    """

    def setUp(self) -> None:
        self.result = _quick_json_run()
        self.assertEqual(self.result.returncode, 0, self.result.stderr[-3000:])
        self.data: dict[str, Any] = json.loads(self.result.stdout)
        self.figures = {figure["key"]: figure for figure in self.data["figures"]}

    def _runs(self, key: str, column: str) -> list[float]:
        runs: list[float] = self.figures[key]["results"][column]["runs"]
        return runs

    def test_every_figure_is_there_with_one_and_with_n_workers(self) -> None:
        self.assertEqual(self.data["mode"], "workers")
        self.assertEqual(self.data["workers"], [1, 2])
        self.assertEqual(list(self.figures), [figure.key for figure in SCALE_FIGURES])
        for figure in self.data["figures"]:
            self.assertEqual(set(figure["results"]), {"1", "2"})
            for column in ("1", "2"):
                self.assertEqual(len(self._runs(figure["key"], column)), 2, figure["key"])
            self.assertTrue(figure["title"] and figure["unit"], figure["key"])

    def test_work_was_done_in_every_run_and_cpu_is_never_negative(self) -> None:
        for key in self.figures:
            for column in ("1", "2"):
                for value in self._runs(key, column):
                    if key in RATES:
                        self.assertGreater(value, 0, (key, column))
                    else:
                        self.assertGreaterEqual(value, 0, (key, column))

    def test_the_scaling_factor_is_the_ratio_of_the_medians(self) -> None:
        for key, figure in self.figures.items():
            one = figure["results"]["1"]["median"]
            many = figure["results"]["2"]["median"]
            ratio = figure["ratios"]["2/1"]
            if one:
                self.assertAlmostEqual(ratio, many / one, msg=key)
            else:
                self.assertIsNone(ratio, key)

    def test_cpu_per_unit_is_the_server_cpu_over_the_rate(self) -> None:
        for rate, per_unit, server in (
            ("handshakes", "cpu_per_handshake", "server_cpu_handshakes"),
            ("bulk", "cpu_per_mb", "server_cpu_bulk"),
        ):
            for column in ("1", "2"):
                for done, cost, cores in zip(
                    self._runs(rate, column),
                    self._runs(per_unit, column),
                    self._runs(server, column),
                    strict=True,
                ):
                    # ms per unit = (% of a core / 100) / units per second * 1000
                    self.assertAlmostEqual(cost, 10 * cores / done, places=6)

    def test_the_busiest_client_is_part_of_all_the_clients(self) -> None:
        for group in ("handshakes", "bulk"):
            for column in ("1", "2"):
                for busiest, everyone in zip(
                    self._runs(f"busiest_client_{group}", column),
                    self._runs(f"client_cpu_{group}", column),
                    strict=True,
                ):
                    self.assertLessEqual(busiest, everyone + 1e-9)

    def test_the_server_cpu_by_process_adds_up_to_the_whole(self) -> None:
        by_process = self.data["server_cpu_by_process"]
        self.assertEqual(set(by_process["1"]["handshakes"]), {"server"})
        self.assertEqual(set(by_process["2"]["handshakes"]), {"supervisor", "vault", "workers"})
        for column in ("1", "2"):
            for group, whole in (("handshakes", "cpu_per_handshake"), ("bulk", "cpu_per_mb")):
                parts = [summary["runs"] for summary in by_process[column][group].values()]
                for run, total in enumerate(self._runs(whole, column)):
                    self.assertAlmostEqual(sum(part[run] for part in parts), total, places=6)

    def test_the_busiest_worker_share_is_between_even_and_everything(self) -> None:
        shares = self.data["busiest_worker_share"]
        self.assertEqual(set(shares), {"handshakes", "bulk"})
        for group, summary in shares.items():
            for share in summary["runs"]:
                self.assertGreaterEqual(share, 50 - 1e-9, group)
                self.assertLessEqual(share, 100 + 1e-9, group)

    def test_the_load_and_the_server_processes_are_reported(self) -> None:
        self.assertEqual(
            self.data["load"],
            {
                "client_processes": 3,
                "handshake_loops_per_process": 4,
                "bulk_connections_per_process": 2,
            },
        )
        # One process; or the supervisor, the vault and two workers.
        self.assertEqual(self.data["server_processes"]["1"], 1)
        self.assertGreaterEqual(self.data["server_processes"]["2"], 4)
        self.assertEqual(set(self.data["failed_handshakes"]), {"1", "2"})

    def test_progress_goes_to_stderr(self) -> None:
        self.assertIn("handshakes with --workers 2", self.result.stderr)
        self.assertIn("bulk with --workers 1", self.result.stderr)

    def test_no_server_or_client_process_is_left_running(self) -> None:
        # Every process of the run names the run's directory on its
        # command line (a key directory, or the vault's socket, made under
        # TMPDIR): all are under this test's.
        running = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                running.append(Path(f"/proc/{pid}/cmdline").read_bytes())
            except OSError:
                continue
        mine = _scratch().encode()
        self.assertFalse([line for line in running if mine in line])
        self.assertTrue(self.figures)


class QuickWorkersTableTests(SynchronousTestCase):
    def test_the_table_has_both_columns_the_scaling_and_the_load(self) -> None:
        result = _quick_table_run()
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        lines = result.stdout.splitlines()
        self.assertTrue(lines[0].startswith("curvetun worker scaling: twist curvetun"), lines[0])
        self.assertTrue(any(line.startswith("load: 4 client processes") for line in lines))
        header = next(line for line in lines if line.startswith("figure "))
        for column in ("1 worker", "2 workers", "2/1"):
            self.assertIn(column, header)
        self.assertTrue(any(line.startswith("handshakes (connect") for line in lines))
        self.assertTrue(any(line.startswith("server CPU per handshake") for line in lines))
        self.assertFalse(any(line.startswith("bulk echoed") for line in lines))


class WorkersOptionsTests(SynchronousTestCase):
    def _settings(self, *argv: str) -> bench_options.Settings:
        options = bench_options.BenchOptions()
        options.parseOptions(list(argv))
        return bench_options.settings_from(options)

    def _error(self, *argv: str) -> str:
        """
        The one line C{argv} is refused with (exit status 2, nothing on
        stdout).
        """
        stdout, stderr = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", stdout)
        self.patch(sys, "stderr", stderr)
        self.assertEqual(bench.main(list(argv)), 2)
        self.assertEqual(stdout.getvalue(), "")
        message = stderr.getvalue()
        self.assertEqual(len(message.splitlines()), 1, message)
        self.assertTrue(message.startswith("curvetun bench: error: "), message)
        return message

    def test_workers_measures_every_scale_figure_with_twice_as_many_clients(self) -> None:
        settings = self._settings("--workers", "3")
        self.assertEqual((settings.workers, settings.clients), (3, 6))
        self.assertEqual(settings.figures, SCALE_FIGURES)
        self.assertEqual((settings.runs, settings.duration), (5, 1.0))
        self.assertFalse(settings.tunnel)

    def test_quick_windows_are_long_enough_for_cpu_ticks_unless_told(self) -> None:
        settings = self._settings("--workers", "2", "--quick")
        self.assertEqual(settings.runs, 1)
        self.assertEqual(settings.duration, bench_options.SCALE_QUICK_DURATION)
        settings = self._settings("--workers", "2", "--quick", "--duration", "0.5")
        self.assertEqual(settings.duration, 0.5)

    def test_auto_is_one_worker_per_usable_cpu_and_at_least_two(self) -> None:
        settings = self._settings("--workers", "auto")
        self.assertGreaterEqual(settings.workers, 2)
        if hasattr(os, "sched_getaffinity"):
            self.assertEqual(settings.workers, max(2, len(os.sched_getaffinity(0))))

    def test_clients_and_figures_can_be_chosen(self) -> None:
        settings = self._settings("--workers", "2", "--clients", "5", "--only", "bulk")
        self.assertEqual(settings.clients, 5)
        self.assertEqual({f.group for f in settings.figures}, {"bulk"})
        settings = self._settings("--workers", "2", "--only", "cpu_per_handshake")
        self.assertEqual([f.key for f in settings.figures], ["cpu_per_handshake"])

    def test_a_worker_count_outside_2_to_64_or_not_a_number_is_refused(self) -> None:
        self.assertIn("--workers: must be from 2 to 64", self._error("--workers", "1"))
        self.assertIn("--workers: must be from 2 to 64", self._error("--workers", "65"))
        self.assertIn("--workers: not a number or auto: 'many'", self._error("--workers", "many"))

    def test_options_of_other_modes_are_refused_with_workers(self) -> None:
        self.assertIn("not with --tunnel", self._error("--workers", "2", "--tunnel"))
        for option, value in (("--transports", "tcp"), ("--connections", "9"), ("--profile", "P")):
            self.assertIn(
                f"{option}: not with --workers", self._error("--workers", "2", option, value)
            )
        self.assertIn("--pin", self._error("--workers", "2", "--pin", "same"))
        self.assertIn(
            "--only: unknown figure group memory", self._error("--workers", "2", "--only", "memory")
        )

    def test_clients_goes_with_workers_and_must_be_a_sensible_count(self) -> None:
        self.assertIn("--clients: goes with --workers N", self._error("--clients", "3"))
        self.assertIn(
            "--clients: must be positive", self._error("--workers", "2", "--clients", "0")
        )
        self.assertIn("--clients: at most 256", self._error("--workers", "2", "--clients", "300"))

    def test_help_describes_workers(self) -> None:
        stdout = io.StringIO()
        self.patch(sys, "stdout", stdout)
        self.assertEqual(bench.main(["--help"]), 0)
        self.assertIn("--workers", stdout.getvalue())
        self.assertIn("--clients", stdout.getvalue())


class ProcessTreeTests(SynchronousTestCase):
    def setUp(self) -> None:
        if not sys.platform.startswith("linux"):
            raise SkipTest("process trees are read from Linux's /proc")

    def _grandchild(self) -> tuple[subprocess.Popen[bytes], int]:
        """
        A child process that starts a grandchild, and the grandchild's pid.
        """
        code = (
            "import subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "print(child.pid, flush=True)\n"
            "time.sleep(60)\n"
        )
        parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
        self.addCleanup(parent.wait)
        self.addCleanup(parent.kill)
        assert parent.stdout is not None
        self.addCleanup(parent.stdout.close)
        grandchild = int(parent.stdout.readline())
        self.addCleanup(os.kill, grandchild, 9)
        return parent, grandchild

    def test_the_tree_holds_children_and_their_children(self) -> None:
        parent, grandchild = self._grandchild()
        tree = processes.process_tree(parent.pid)
        self.assertEqual(tree, [parent.pid, grandchild])
        self.assertEqual(set(processes.tree_cpu(parent.pid)), {parent.pid, grandchild})

    def test_the_tree_of_this_process_counts_its_work(self) -> None:
        before = processes.tree_cpu(os.getpid())
        deadline = time.process_time() + 0.05
        while time.process_time() < deadline:
            pass
        self.assertGreater(processes.cpu_between(before, processes.tree_cpu(os.getpid())), 0)

    def test_the_time_spent_waiting_for_a_cpu_is_read_for_every_process_and_never_shrinks(
        self,
    ) -> None:
        parent, grandchild = self._grandchild()
        first = processes.tree_run_queue(parent.pid)
        self.assertEqual(set(first), {parent.pid, grandchild})
        later = processes.tree_run_queue(parent.pid)
        for pid, waited in first.items():
            self.assertGreaterEqual(waited, 0)
            self.assertGreaterEqual(later[pid], waited)

    def test_a_process_new_since_the_first_reading_counts_all_its_time(self) -> None:
        before = {1: 5.0}
        self.assertAlmostEqual(processes.cpu_between(before, {1: 5.5, 2: 0.25}), 0.75)


class ScaleReportTests(SynchronousTestCase):
    def _report(self) -> scale.ScaleReport:
        report = scale.ScaleReport(
            transports=("1", "2"),
            figures=(SCALE_FIGURES_BY_KEY["handshakes"], SCALE_FIGURES_BY_KEY["cpu_per_handshake"]),
            runs=3,
            quick=False,
            argv=["--workers", "2"],
            environment={"cpus": "2"},
            workers=2,
            clients=4,
            processes={"1": 1, "2": 4},
            failed={"1": 0, "2": 3},
        )
        for role, cost in (("workers", 0.75), ("vault", 0.25), ("supervisor", 0.0)):
            report.add_by_role("2", "handshakes", role, cost)
        report.add_by_role("1", "handshakes", "server", 1.0)
        report.busiest_worker["handshakes"] = [52.0, 50.0, 55.0]
        for column, values in (("1", [400.0, 500.0, 450.0]), ("2", [900.0, 800.0, 850.0])):
            for value in values:
                report.add(SCALE_FIGURES_BY_KEY["handshakes"], column, value)
        for column in ("1", "2"):
            report.add(SCALE_FIGURES_BY_KEY["cpu_per_handshake"], column, 1.0)
        return report

    def test_the_scaling_factor_is_n_over_one_of_the_medians(self) -> None:
        self.assertAlmostEqual(self._report().scaling("handshakes") or 0, 850 / 450)
        self.assertIsNone(self._report().scaling("bulk"))

    def test_the_table_gives_median_range_and_factor_and_says_what_failed(self) -> None:
        text = scale.format_scale_report(self._report())
        row = next(line for line in text.splitlines() if line.startswith("handshakes ("))
        self.assertIn("450 (400-500)", row)
        self.assertIn("850 (800-900)", row)
        self.assertTrue(row.endswith("1.89"), row)
        self.assertIn("server processes: --workers 1: 1; --workers 2: 4", text)
        self.assertIn("failed handshakes (not counted): --workers 2: 3", text)
        self.assertIn(
            "server CPU per handshake by process, ms (medians):\n"
            "  --workers 1: server 1.00\n"
            "  --workers 2: supervisor 0.00, vault 0.25, workers 0.75\n",
            text,
        )
        self.assertNotIn("per MB by process", text)
        self.assertIn(
            "the busiest of the 2 workers' share of their CPU (median; even: 50.0 %):"
            " handshakes 52.0 %",
            text,
        )

    def test_json_gives_every_run_and_the_factor(self) -> None:
        data = scale.scale_report_json(self._report())
        figure = data["figures"][0]
        self.assertEqual(figure["results"]["2"]["runs"], [900.0, 800.0, 850.0])
        self.assertAlmostEqual(figure["ratios"]["2/1"], 850 / 450)
        self.assertEqual(data["server_processes"], {"1": 1, "2": 4})
        self.assertEqual(data["server_cpu_by_process"]["2"]["handshakes"]["vault"]["runs"], [0.25])
        json.dumps(data)
