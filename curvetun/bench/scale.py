"""
C{curvetun bench --workers N}: how C{twist curvetun} scales with worker
processes. The same load against C{twist curvetun --workers 1} and
C{--workers N}, both started as an operator starts them (echo mode, a key
directory of their own, a registry that admits the clients), measured
run by run in turn.

The load comes from several client processes (L{curvetun.bench.load}),
each with a client key directory of its own: two processes must never
hand out nonces from one counter. The benchmark's own process only
coordinates: it starts the servers and the clients, starts each load,
reads the CPU time of every process of the server's tree (the
supervisor, the vault and the workers: C{/proc/PID/stat} of each) just
before and just after a window of C{--duration} seconds in which every
client counts what it completes, and adds up.

Each window is steady state: the load is running before the window opens
(every handshake loop has finished a handshake, every bulk connection has
had data back) and keeps running until every client has answered.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from typing import IO, Any

import attrs
from twisted.python.failure import Failure

from .figures import (
    LOCALHOST,
    SCALE_BULK_CONNECTIONS,
    SCALE_FIGURES_BY_KEY,
    SCALE_HANDSHAKE_LOOPS,
    BenchError,
    Report,
    Summary,
    summary_json,
)
from .options import Settings
from .processes import (
    Children,
    cpu_between,
    listening_ports,
    process_tree,
    tree_cpu,
    tree_run_queue,
)
from .report import format_number, format_summary, render, write_outcome
from .runner import Progress, environment, perf_counter
from .server import child_environment, raise_file_limit
from .transports import make_keydir, write_registry

_START_TIMEOUT = 60.0
"""
Seconds a server may take to listen, serve and settle (its processes
import Twisted and curvetun on a busy machine).
"""

_QUIET = 0.02
"""
CPU seconds a server process may use in 0.2 s and still count as having
settled after its start.
"""


def _answer_timeout(settings: Settings) -> float:
    return max(60.0, 30 * settings.duration)


# -- the server ---------------------------------------------------------------------


@attrs.define
class Server:
    """
    One running C{twist curvetun --workers W} and what clients need to
    reach it.
    """

    workers: int
    process: subprocess.Popen[bytes]
    log_path: str
    key: bytes
    port: int = 0

    def cpu(self) -> dict[int, float]:
        """
        The CPU seconds of each process of the server's tree so far.
        """
        return tree_cpu(self.process.pid)

    def waited(self) -> dict[int, float]:
        """
        The seconds each process of the server's tree has waited for a
        CPU so far.
        """
        return tree_run_queue(self.process.pid)

    def roles(self, pids: Iterable[int]) -> dict[int, str]:
        """
        What each of C{pids} (of the server's tree) is, by its command
        line: C{"vault"}, C{"workers"}, or C{"supervisor"} (the server
        itself, with more than one worker) or C{"server"} (with one).
        """
        roles = {}
        for pid in pids:
            if pid == self.process.pid:
                roles[pid] = "server" if self.workers == 1 else "supervisor"
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                    argv = cmdline.read().split(b"\0")
            except OSError:
                argv = []
            if b"curvetun.vault_process" in argv:
                roles[pid] = "vault"
            elif b"curvetun.worker_main" in argv:
                roles[pid] = "workers"
            else:
                roles[pid] = "other"
        return roles

    def processes(self) -> int:
        """
        How many processes the server runs now (itself included).
        """
        return len(process_tree(self.process.pid))

    def expected_processes(self) -> int:
        """
        At least how many processes a started server runs: one; or the
        supervisor, the vault and every worker.
        """
        return 1 if self.workers == 1 else self.workers + 2

    def check_running(self) -> None:
        """
        @raise BenchError: the server has exited.
        """
        if self.process.poll() is not None:
            raise BenchError(
                f"twist curvetun --workers {self.workers} exited with status"
                f" {self.process.returncode}: {_log_tail(self.log_path)}"
            )


def _log_tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, errors="replace") as log:
            return " | ".join(line.strip() for line in log.readlines()[-lines:])
    except OSError:
        return ""


def server_command(keydir: str, registry: str, workers: int) -> list[str]:
    """
    C{twist curvetun} in echo mode (no C{--forward}) on 127.0.0.1, port 0,
    with C{workers} worker processes; every other setting at its default.
    """
    return [
        *(sys.executable, "-m", "twisted", "curvetun"),
        *("--keydir", keydir, "--registry", registry),
        *("--workers", str(workers)),
        *("--listen", f"curvetun:0:interface={LOCALHOST}"),
    ]


# -- the clients ----------------------------------------------------------------------


class LoadProcess:
    """
    One load client process (L{curvetun.bench.load}) and its command
    channel: one JSON line to it, one back.
    """

    def __init__(self, name: str, process: subprocess.Popen[bytes], log_path: str) -> None:
        self.name = name
        self.process = process
        self.log_path = log_path
        self._buffer = b""

    def send(self, message: dict[str, Any]) -> None:
        """
        Write one command.
        """
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(json.dumps(message).encode() + b"\n")
            self.process.stdin.flush()
        except OSError as error:
            raise BenchError(f"{self.name} is gone: {error}") from None

    def receive(self, deadline: float) -> dict[str, Any]:
        """
        Read one answer, waiting until C{deadline} (C{time.monotonic}) at
        most.

        @raise BenchError: no answer in time, the process ended, or it
            answered with an error.
        """
        assert self.process.stdout is not None
        descriptor = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.name} did not answer in time")
            readable, _, _ = select.select([descriptor], [], [], left)
            if not readable:
                continue
            data = os.read(descriptor, 65536)
            if not data:
                raise BenchError(
                    f"{self.name} exited with status {self.process.wait()}:"
                    f" {_log_tail(self.log_path)}"
                )
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise BenchError(f"{self.name}: {answer['error']}")
        return answer


def ask_all(clients: list[LoadProcess], message: dict[str, Any], timeout: float) -> list[Any]:
    """
    Send C{message} to every client at once, then read every answer.
    """
    for client in clients:
        client.send(message)
    deadline = time.monotonic() + timeout
    return [client.receive(deadline) for client in clients]


# -- the report ---------------------------------------------------------------------


@attrs.define
class ScaleReport(Report):
    """
    What C{--workers} measured. Its columns (C{transports}) are the
    worker counts, C{"1"} and C{"N"}.

    @ivar workers: N.
    @ivar clients: the client processes.
    @ivar processes: per column, how many processes the server ran.
    @ivar failed: per column, handshakes that failed (the load goes on).
    @ivar by_role: per column, per figure group, per kind of server process
        (L{Server.roles}), each run's CPU per handshake or per MB, in ms.
    @ivar busiest_worker: per figure group, each run's share of the N
        workers' CPU that the busiest worker used, in %: how evenly the
        shared listening socket spread the connections (100 / N is even).
    """

    workers: int = 0
    clients: int = 0
    processes: dict[str, int] = attrs.field(factory=dict)
    failed: dict[str, int] = attrs.field(factory=dict)
    by_role: dict[str, dict[str, dict[str, list[float]]]] = attrs.field(factory=dict)
    busiest_worker: dict[str, list[float]] = attrs.field(factory=dict)

    def add_by_role(self, column: str, group: str, role: str, cost: float) -> None:
        """
        Record one run's server CPU per handshake (C{group} C{handshakes})
        or per MB (C{bulk}) of the server processes of one kind, in ms.
        """
        runs = self.by_role.setdefault(column, {}).setdefault(group, {})
        runs.setdefault(role, []).append(cost)

    def scaling(self, key: str) -> float | None:
        """
        The median with N workers over the median with one.
        """
        one = self.summary(key, "1")
        many = self.summary(key, str(self.workers))
        if one is None or many is None or one.median == 0:
            return None
        return many.median / one.median


def _load_line(report: ScaleReport) -> str:
    clients = report.clients
    return (
        f"load: {clients} client processes, each with its own key directory; handshakes:"
        f" {SCALE_HANDSHAKE_LOOPS} loops each ({clients * SCALE_HANDSHAKE_LOOPS} in flight);"
        f" bulk: {SCALE_BULK_CONNECTIONS} connections each"
        f" ({clients * SCALE_BULK_CONNECTIONS}), 65503-byte writes echoed back"
    )


def format_scale_report(report: ScaleReport) -> str:
    """
    The worker scaling for people: each figure with 1 and N workers, and
    the scaling factor.
    """
    env = report.environment
    many = str(report.workers)
    processes = "; ".join(
        f"--workers {column}: {report.processes.get(column, '?')}" for column in report.transports
    )
    lines = [
        f"curvetun worker scaling: twist curvetun --workers 1 and --workers {many} (echo),"
        f" 127.0.0.1, {report.runs} run{'s' if report.runs != 1 else ''} interleaved"
        + (" (--quick: smoke run, not a measurement)" if report.quick else ""),
        f"curvetun {env.get('curvetun', '')}; {env.get('python', '')};"
        f" Twisted {env.get('twisted', '')}; PyNaCl {env.get('pynacl', '')};"
        f" {env.get('cpus', '')} CPUs (shared by server and clients),"
        f" load {env.get('load', '?')} at start; {env.get('date', '')}",
        _load_line(report),
        f"server processes: {processes} (supervisor, vault and workers)",
        "values: median (min-max) of the runs; CPU in % of one core and waiting for a CPU"
        f" in % of the time, summed over the processes; {many}/1: ratio of the medians",
    ]
    failed = {column: count for column, count in report.failed.items() if count}
    if failed:
        lines.append(
            "failed handshakes (not counted): "
            + ", ".join(f"--workers {column}: {count}" for column, count in failed.items())
        )
    rows = [["figure", "unit", "1 worker", f"{many} workers", f"{many}/1"]]
    for figure in report.figures:
        ratio = report.scaling(figure.key)
        rows.append(
            [
                figure.title,
                figure.unit,
                *(format_summary(report.summary(figure.key, c)) for c in report.transports),
                "n/a" if ratio is None else f"{ratio:.2f}",
            ]
        )
    lines += ["", *render(rows)]
    for group, unit in (("handshakes", "handshake"), ("bulk", "MB")):
        parts = []
        for column in report.transports:
            roles = report.by_role.get(column, {}).get(group, {})
            if roles:
                costs = ", ".join(
                    f"{role} {format_number(Summary.of(runs).median)}"
                    for role, runs in sorted(roles.items(), key=_role_order)
                )
                parts.append(f"  --workers {column}: {costs}")
        if parts:
            lines += [f"server CPU per {unit} by process, ms (medians):", *parts]
    if report.busiest_worker:
        shares = ", ".join(
            f"{group} {format_number(Summary.of(runs).median)} %"
            for group, runs in report.busiest_worker.items()
        )
        lines.append(
            f"the busiest of the {report.workers} workers' share of their CPU (median;"
            f" even: {format_number(100 / report.workers)} %): {shares}"
        )
    lines += ["", f"({report.seconds:.1f} s)"]
    return "\n".join(lines) + "\n"


_ROLES = ("server", "supervisor", "vault", "workers", "other")


def _role_order(item: tuple[str, list[float]]) -> int:
    return _ROLES.index(item[0]) if item[0] in _ROLES else len(_ROLES)


def scale_report_json(report: ScaleReport) -> dict[str, Any]:
    """
    The worker scaling for machines (C{--workers N --json}).
    """
    many = str(report.workers)
    figures = [
        {
            "key": figure.key,
            "title": figure.title,
            "unit": figure.unit,
            "higher_is_better": figure.higher_is_better,
            "results": {c: summary_json(report.summary(figure.key, c)) for c in report.transports},
            "ratios": {f"{many}/1": report.scaling(figure.key)},
        }
        for figure in report.figures
    ]
    return {
        "mode": "workers",
        "runs": report.runs,
        "quick": report.quick,
        "argv": report.argv,
        "environment": report.environment,
        "workers": [int(column) for column in report.transports],
        "load": {
            "client_processes": report.clients,
            "handshake_loops_per_process": SCALE_HANDSHAKE_LOOPS,
            "bulk_connections_per_process": SCALE_BULK_CONNECTIONS,
        },
        "server_processes": dict(report.processes),
        "failed_handshakes": dict(report.failed),
        "busiest_worker_share": {
            group: summary_json(Summary.of(runs)) for group, runs in report.busiest_worker.items()
        },
        "server_cpu_by_process": {
            column: {
                group: {role: summary_json(Summary.of(runs)) for role, runs in roles.items()}
                for group, roles in groups.items()
            }
            for column, groups in report.by_role.items()
        },
        "seconds": report.seconds,
        "figures": figures,
    }


# -- measuring -------------------------------------------------------------------


@attrs.frozen
class Window:
    """
    One measured window of a load against one server.

    @ivar rate: what every client completed per second, summed
        (handshakes, or bytes echoed).
    @ivar server_cores: the server's CPU seconds (all its processes) per
        second of the window.
    @ivar client_cores: the clients' CPU seconds per second, summed.
    @ivar busiest_client: the busiest client's CPU seconds per second.
    @ivar server_waited: the seconds the server's processes waited for a
        CPU (ready to run, another process running) per second, summed.
    @ivar clients_waited: the same for the clients, summed.
    @ivar failed: handshakes that failed.
    @ivar server_cores_by_role: L{server_cores} by the kind of server
        process (L{Server.roles}).
    @ivar worker_cores: each worker process's CPU seconds per second.
    """

    rate: float
    server_cores: float
    client_cores: float
    busiest_client: float
    server_waited: float
    clients_waited: float
    failed: int
    server_cores_by_role: dict[str, float]
    worker_cores: tuple[float, ...] = ()


class ScaleBench:
    """
    One run of C{--workers}: the servers, the clients, the measurements,
    the report.
    """

    def __init__(
        self, settings: Settings, report: ScaleReport, workdir: str, children: Children
    ) -> None:
        self.settings = settings
        self.report = report
        self.workdir = workdir
        self.children = children
        self.servers: dict[int, Server] = {}
        self.clients: list[LoadProcess] = []

    def _path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def _environment(self) -> dict[str, str]:
        env = child_environment()
        # Nothing falls back on the user's own key directory.
        env["CURVETUN_HOME"] = self._path("no-default-keydir")
        return env

    def start(self) -> None:
        """
        Make the key directories and registries, start both servers and
        every client process, and wait until each server serves.
        """
        client_keys = []
        for number in range(1, self.settings.clients + 1):
            keydir = self._path(f"client-{number}-keys")
            client_keys.append(make_keydir(keydir))
            log_path = self._path(f"client-{number}.log")
            command = [sys.executable, "-m", "curvetun.bench.load", keydir]
            process = self.children.start_piped(command, log_path, self._environment())
            self.clients.append(LoadProcess(f"client process {number}", process, log_path))
        for workers in (1, self.settings.workers):
            keydir = self._path(f"server-{workers}-keys")
            key = make_keydir(keydir)
            registry = self._path(f"server-{workers}.registry")
            write_registry(registry, *client_keys)
            log_path = self._path(f"server-{workers}.log")
            process = self.children.start(
                server_command(keydir, registry, workers), log_path, self._environment()
            )
            self.servers[workers] = Server(workers, process, log_path, key)
        for server in self.servers.values():
            self._wait_serving(server)

    def _wait_serving(self, server: Server) -> None:
        """
        Wait until C{server} listens, completes a handshake, and every one
        of its processes has started and settled.
        """
        deadline = time.monotonic() + _START_TIMEOUT
        what = f"twist curvetun --workers {server.workers}"
        while not server.port:
            server.check_running()
            ports = listening_ports(server.process.pid)
            if ports:
                server.port = min(ports)
            elif time.monotonic() > deadline:
                raise BenchError(f"{what} did not listen within {_START_TIMEOUT:.0f} s")
            else:
                time.sleep(0.05)
        probe = {"do": "probe", "port": server.port, "key": server.key.hex(), "timeout": 30}
        ask_all(self.clients[:1], probe, _START_TIMEOUT)
        # A handshake shows that one worker serves; the others may still
        # be importing. Wait until all are there and none is busy.
        before = server.cpu()
        while True:
            time.sleep(0.2)
            server.check_running()
            after = server.cpu()
            busy = [pid for pid, used in after.items() if used - before.get(pid, 0.0) > _QUIET]
            if len(after) >= server.expected_processes() and not busy:
                break
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{what} did not settle within {_START_TIMEOUT:.0f} s"
                    f" ({len(after)} processes, {len(busy)} busy)"
                )
            before = after
        self.report.processes[str(server.workers)] = server.processes()

    def window(self, kind: str, server: Server) -> Window:
        """
        Start load C{kind} (C{handshakes} or C{bulk}) from every client
        against C{server}, measure one window, stop the load.
        """
        timeout = _answer_timeout(self.settings)
        start: dict[str, Any] = {"do": kind, "port": server.port, "key": server.key.hex()}
        if kind == "handshakes":
            start["loops"] = SCALE_HANDSHAKE_LOOPS
        else:
            start["connections"] = SCALE_BULK_CONNECTIONS
        ask_all(self.clients, start, timeout)
        try:
            before, waited_before = server.cpu(), server.waited()
            started = perf_counter()
            answers = ask_all(
                self.clients, {"do": "window", "seconds": self.settings.duration}, timeout
            )
            after = server.cpu()
            waited = cpu_between(waited_before, server.waited())
            wall = perf_counter() - started
        finally:
            ask_all(self.clients, {"do": "stop"}, timeout)
        server.check_running()
        by_role: dict[str, float] = {}
        workers = []
        for pid, role in server.roles(after).items():
            used_by = cpu_between({pid: before.get(pid, 0.0)}, {pid: after[pid]}) / wall
            by_role[role] = by_role.get(role, 0.0) + used_by
            if role == "workers":
                workers.append(used_by)
        return Window(
            rate=sum(a["done"] / a["seconds"] for a in answers),
            server_cores=cpu_between(before, after) / wall,
            client_cores=sum(a["cpu"] / a["seconds"] for a in answers),
            busiest_client=max(a["cpu"] / a["seconds"] for a in answers),
            server_waited=waited / wall,
            clients_waited=sum(a["waited"] / a["seconds"] for a in answers),
            failed=sum(a["failed"] for a in answers),
            server_cores_by_role=by_role,
            worker_cores=tuple(workers),
        )

    def measure(self, group: str, workers: int) -> None:
        """
        One run of figure group C{group} with C{workers} workers.
        """
        column = str(workers)
        measured = self.window(group, self.servers[workers])
        # What the per-unit costs are counted in: handshakes, or MB.
        units = measured.rate if group == "handshakes" else measured.rate / 1e6
        per_unit = "cpu_per_handshake" if group == "handshakes" else "cpu_per_mb"
        values = {group: units, per_unit: 1000 * measured.server_cores / units}
        for role, cores in measured.server_cores_by_role.items():
            self.report.add_by_role(column, group, role, 1000 * cores / units)
        if len(measured.worker_cores) > 1 and sum(measured.worker_cores) > 0:
            share = 100 * max(measured.worker_cores) / sum(measured.worker_cores)
            self.report.busiest_worker.setdefault(group, []).append(share)
        values[f"server_cpu_{group}"] = 100 * measured.server_cores
        values[f"client_cpu_{group}"] = 100 * measured.client_cores
        values[f"busiest_client_{group}"] = 100 * measured.busiest_client
        values[f"server_wait_{group}"] = 100 * measured.server_waited
        values[f"client_wait_{group}"] = 100 * measured.clients_waited
        self.report.failed[column] = self.report.failed.get(column, 0) + measured.failed
        for key, value in values.items():
            if any(f.key == key for f in self.report.figures):
                self.report.add(SCALE_FIGURES_BY_KEY[key], column, value)

    def groups(self) -> list[str]:
        """
        The figure groups to measure, in order.
        """
        return list(dict.fromkeys(f.group for f in self.settings.figures))

    def run(self) -> None:
        """
        Start everything, then measure run by run: each group, with one
        worker and then with N.
        """
        columns = (1, self.settings.workers)
        progress = Progress(1 + self.settings.runs * len(self.groups()) * len(columns))
        started = perf_counter()
        try:
            progress.step("starting the servers and the client processes")
            self.start()
            for run in range(1, self.settings.runs + 1):
                for group in self.groups():
                    for workers in columns:
                        progress.step(
                            f"run {run}/{self.settings.runs}: {group} with --workers {workers}"
                        )
                        self.measure(group, workers)
        finally:
            progress.finish()
            self.report.seconds = perf_counter() - started


def run_scale_benchmark(settings: Settings, argv: list[str], out: IO[str], as_json: bool) -> int:
    """
    Measure the worker scaling and write its report to C{out}.

    @return: the exit status.
    """
    columns = ("1", str(settings.workers))
    report = ScaleReport(
        transports=columns,
        figures=settings.figures,
        runs=settings.runs,
        quick=settings.quick,
        argv=list(argv),
        environment=environment(),
        workers=settings.workers,
        clients=settings.clients,
    )
    raise_file_limit()
    outcome: list[object] = []
    children = Children()
    with tempfile.TemporaryDirectory(prefix="curvetun-bench-workers-") as workdir:
        bench = ScaleBench(settings, report, workdir, children)
        try:
            bench.run()
            outcome.append(None)
        except BenchError as error:
            outcome.append(Failure(error))
        except KeyboardInterrupt:
            pass
        finally:
            children.stop_all()
    return write_outcome(outcome, report, as_json, out, scale_report_json, format_scale_report)
