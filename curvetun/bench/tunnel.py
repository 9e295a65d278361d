"""
C{curvetun bench --tunnel}: curvetun as operators run it, two C{twist
curvetun} ends with C{--forward}, beside spiped and stunnel (when they are
installed) and beside no tunnel at all (C{direct}, the ceiling).

Every tunnel end is its own process, started as an operator starts it
(port 0 where the program can report the port it got, found in
C{/proc}; a free port otherwise), in front of one backend: the bench's
plain-TCP server process (echo and sink). The bench's own process is the
client: it connects to the tunnel's client end on 127.0.0.1, with the
library benchmark's client code and measurements. Each kind of tunnel has
two pairs of ends, one in front of the echo service and one in front of
the sink; the memory figure starts a fresh echo pair per run.

While each figure runs, the CPU time of both tunnel ends is read from
C{/proc/PID/stat} before and after; memory per idle connection is the
growth of both ends' resident sets, read from C{/proc/PID/statm}, over N
connections opened after N others.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from functools import partial
from typing import IO, Any

import attrs
from twisted.internet.defer import Deferred, FirstError, gatherResults
from twisted.internet.task import deferLater

from .client import Peer, close_all, measure_bulk, measure_handshakes, measure_ping_pong, open_idle
from .figures import (
    HANDSHAKE_CLIENTS,
    LOCALHOST,
    STREAM_CHUNK,
    TUNNEL_ENDS,
    TUNNEL_FIGURES_BY_KEY,
    BenchError,
    Report,
    Summary,
    summary_json,
)
from .options import Settings
from .processes import Children, cpu_seconds, free_port, listening_ports, resident_bytes
from .report import format_number, format_summary, render, write_outcome
from .runner import Progress, Timed, environment, perf_counter, with_timeout
from .server import ServerProcess, child_environment, raise_file_limit
from .transports import (
    Connector,
    KeyDirectories,
    ServerIdentity,
    curvetun_client_description,
    curvetun_server_description,
    make_certificate,
)

ENDS = ("client_end", "server_end")
"""
The two ends of a tunnel, in the order the report gives them: the one the
application connects to, and the one in front of the backend.
"""

_START_TIMEOUT = 30.0


# -- the tunnel ends ------------------------------------------------------------------


@attrs.define
class TunnelEnd:
    """
    One running tunnel-end process and the port it listens on.
    """

    process: subprocess.Popen[bytes]
    port: int
    log_path: str

    @property
    def pid(self) -> int:
        """
        The process's id.
        """
        return self.process.pid

    def cpu(self) -> float:
        """
        CPU seconds used so far.
        """
        return cpu_seconds(self.pid)

    def rss(self) -> int:
        """
        Resident bytes now.
        """
        return resident_bytes(self.pid)


@attrs.define
class Tunnel:
    """
    A pair of tunnel ends: connecting to C{client_end.port} reaches the
    backend through both.
    """

    kind: str
    client_end: TunnelEnd
    server_end: TunnelEnd

    def ends(self) -> dict[str, TunnelEnd]:
        """
        Both ends, by their name in the report.
        """
        return {"client_end": self.client_end, "server_end": self.server_end}


def _log_tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, errors="replace") as log:
            return " | ".join(line.strip() for line in log.readlines()[-lines:])
    except OSError:
        return ""


async def wait_listening(
    reactor: Any, process: subprocess.Popen[bytes], port: int | None, log_path: str, what: str
) -> int:
    """
    Poll C{/proc} until C{process} listens (on C{port}, or on any port if
    L{None}); return the port.

    @raise BenchError: the process exited, or did not listen within 30
        seconds.
    """
    started = perf_counter()
    while True:
        if process.poll() is not None:
            raise BenchError(
                f"{what} exited with status {process.returncode}: {_log_tail(log_path)}"
            )
        ports = listening_ports(process.pid)
        if port is None and ports:
            return min(ports)
        if port is not None and port in ports:
            return port
        if perf_counter() - started > _START_TIMEOUT:
            raise BenchError(f"{what} did not listen within {_START_TIMEOUT:.0f} s")
        await deferLater(reactor, 0.02, lambda: None)


class Launcher:
    """
    Starts pairs of tunnel ends of each kind in front of a backend port,
    with the keys, certificates and configuration files each needs (made
    once, in C{workdir}).
    """

    def __init__(self, reactor: Any, workdir: str, children: Children) -> None:
        self.reactor = reactor
        self.workdir = workdir
        self.children = children
        self._pairs = 0
        self._spiped_key: str | None = None
        self._certificates: dict[str, tuple[str, str]] = {}

    def _path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    async def start(self, kind: str, backend_port: int) -> Tunnel:
        """
        Start the server end in front of C{backend_port}, then the client
        end in front of it; return once both listen.
        """
        self._pairs += 1
        start = {"curvetun": self._curvetun, "spiped": self._spiped, "stunnel": self._stunnel}
        return await start[kind](f"{kind}-{self._pairs}", backend_port)

    async def _end(self, name: str, command: list[str], port: int | None = None) -> TunnelEnd:
        log_path = self._path(f"{name}.log")
        env = child_environment()
        # Nothing falls back on the user's own key directory.
        env["CURVETUN_HOME"] = self._path("no-default-keydir")
        process = self.children.start(command, log_path, env)
        listening = await wait_listening(self.reactor, process, port, log_path, name)
        return TunnelEnd(process, listening, log_path)

    async def _curvetun(self, name: str, backend_port: int) -> Tunnel:
        keys = KeyDirectories.create(self.workdir, f"{name}-")
        twist = [sys.executable, "-m", "twisted", "curvetun"]
        server_end = await self._end(
            f"{name}-server-end",
            [
                *twist,
                *("--keydir", keys.server_keydir, "--registry", keys.server_registry),
                # The memory figure holds thousands of connections from
                # 127.0.0.1; the handshake limits stay at their defaults.
                *("--max-connections", "0", "--max-connections-per-address", "0"),
                *("--max-connections-per-network", "0"),
                "--listen",
                curvetun_server_description(0, keys.server_keydir, keys.server_registry),
                "--forward",
                f"tcp:{LOCALHOST}:{backend_port}",
            ],
        )
        client_end = await self._end(
            f"{name}-client-end",
            [
                *twist,
                *("--keydir", keys.client_keydir, "--registry", keys.client_registry),
                "--listen",
                f"tcp:0:interface={LOCALHOST}",
                "--forward",
                curvetun_client_description(
                    server_end.port, keys.server_key, keys.client_keydir, keys.client_registry
                ),
            ],
        )
        return Tunnel("curvetun", client_end, server_end)

    def _spiped_key_file(self) -> str:
        if self._spiped_key is None:
            path = self._path("spiped.key")
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as key:
                key.write(os.urandom(32))
            self._spiped_key = path
        return self._spiped_key

    async def _spiped(self, name: str, backend_port: int) -> Tunnel:
        key = self._spiped_key_file()

        async def end(role: str, mode: str, target: int) -> TunnelEnd:
            # spiped cannot listen on port 0: try free ports until one
            # is still free when it binds.
            for attempt in range(5):
                port = free_port()
                command = ["spiped", mode, "-F", "-n", "0", "-k", key]
                command += ["-s", f"[{LOCALHOST}]:{port}", "-t", f"[{LOCALHOST}]:{target}"]
                try:
                    return await self._end(f"{name}-{role}", command, port)
                except BenchError:
                    if attempt == 4:
                        raise
            raise AssertionError("unreachable")

        server_end = await end("server-end", "-d", backend_port)
        client_end = await end("client-end", "-e", server_end.port)
        return Tunnel("spiped", client_end, server_end)

    def _certificate(self, side: str) -> tuple[str, str]:
        if side not in self._certificates:
            directory = self._path(f"stunnel-{side}")
            os.mkdir(directory)
            self._certificates[side] = make_certificate(directory)
        return self._certificates[side]

    async def _stunnel(self, name: str, backend_port: int) -> Tunnel:
        server_cert, server_key = self._certificate("server")
        client_cert, client_key = self._certificate("client")
        # TLS 1.3 only, ECDSA P-256 certificates both ways, each side
        # verifying the other's, and no session resumption: every new
        # connection is a full handshake, as every curvetun one is.
        common = [
            # In the foreground, logging to stderr (a file here), as under
            # a supervisor; without a syslog daemon, stunnel's attempts to
            # reach one would cost it several ms a connection.
            "foreground = yes",
            "syslog = no",
            "pid =",
        ]
        service = [
            "[tunnel]",
            "sslVersionMin = TLSv1.3",
            "verifyChain = yes",
            "sessionResume = no",
        ]
        server = [
            *common,
            *service,
            f"accept = {LOCALHOST}:0",
            f"connect = {LOCALHOST}:{backend_port}",
            f"cert = {server_cert}",
            f"key = {server_key}",
            f"CAfile = {client_cert}",
            "options = NO_TICKET",
        ]
        server_end = await self._end(
            f"{name}-server-end", [stunnel_program(), self._config(name, "server", server)]
        )
        client = [
            *common,
            *service,
            "client = yes",
            f"accept = {LOCALHOST}:0",
            f"connect = {LOCALHOST}:{server_end.port}",
            f"cert = {client_cert}",
            f"key = {client_key}",
            f"CAfile = {server_cert}",
            "checkHost = localhost",
        ]
        client_end = await self._end(
            f"{name}-client-end", [stunnel_program(), self._config(name, "client", client)]
        )
        return Tunnel("stunnel", client_end, server_end)

    def _config(self, name: str, side: str, lines: list[str]) -> str:
        path = self._path(f"{name}-{side}.conf")
        with open(path, "w") as config:
            config.write("\n".join(lines) + "\n")
        return path


def stunnel_program() -> str:
    """
    The stunnel program: C{stunnel4} (Debian's name) or C{stunnel}.
    """
    return shutil.which("stunnel4") or shutil.which("stunnel") or "stunnel"


def tunnel_unavailable(kind: str) -> str | None:
    """
    Why tunnel C{kind} cannot run here, as the one line the report
    gives, or L{None} if it can.
    """
    if kind == "spiped" and shutil.which("spiped") is None:
        return "spiped: skipped (not installed; on Debian: apt-get install spiped)"
    if kind == "stunnel":
        if shutil.which("stunnel4") is None and shutil.which("stunnel") is None:
            return "stunnel: skipped (not installed; on Debian: apt-get install stunnel4)"
        try:
            import cryptography  # noqa: F401
        except ImportError:
            return "stunnel: skipped (its certificates need cryptography: pip install pyopenssl)"
    if not sys.platform.startswith("linux"):
        return f"{kind}: skipped (the tunnel ends are watched through Linux's /proc)"
    return None


def versions() -> dict[str, str]:
    """
    The versions of the tunnel programs found, by name.
    """
    found = {}
    for name, command in (
        ("spiped", ["spiped", "-v"]),
        ("stunnel", [stunnel_program(), "-version"]),
    ):
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.SubprocessError):
            continue
        text = result.stdout + result.stderr
        match = re.search(rf"{name} (\S+)", text)
        if match:
            openssl = re.search(r"Compiled with (OpenSSL \S+)", text)
            found[name] = match.group(1) + (f" ({openssl.group(1)})" if openssl else "")
    return found


# -- the report ---------------------------------------------------------------------


@attrs.define
class TunnelReport(Report):
    """
    What the tunnel comparison measured.

    @ivar cpu: per figure key, per tunnel, per end (L{ENDS}), the CPU it
        used in each run, in % of one core over the measurement.
    @ivar memory: per tunnel, per end, each run's resident memory growth
        per idle connection, in KiB.
    """

    cpu: dict[str, dict[str, dict[str, list[float]]]] = attrs.field(factory=dict)
    memory: dict[str, dict[str, list[float]]] = attrs.field(factory=dict)

    def add_cpu(self, key: str, column: str, end: str, percent: float) -> None:
        """
        Record one run's CPU use of one end.
        """
        self.cpu.setdefault(key, {}).setdefault(column, {}).setdefault(end, []).append(percent)

    def cpu_summary(self, key: str, column: str, end: str) -> Summary | None:
        """
        The summary of one end's CPU use during figure C{key}, if measured.
        """
        values = self.cpu.get(key, {}).get(column, {}).get(end)
        return Summary.of(values) if values else None

    def tunnel_ratio(self, key: str) -> float | None:
        """
        curvetun's median over stunnel's.
        """
        return self.ratio(key, "stunnel")


def format_tunnel_report(report: TunnelReport) -> str:
    """
    The tunnel comparison for people: the figures, each tunnel's ratio
    to stunnel, and the CPU of each tunnel end during each figure.
    """
    env = report.environment
    tools = "; ".join(f"{name} {env[name]}" for name in ("spiped", "stunnel") if name in env)
    lines = [
        "curvetun tunnel comparison: 127.0.0.1, each tunnel end its own process, a backend"
        f" behind them, {report.runs} run{'s' if report.runs != 1 else ''} interleaved"
        + (" (--quick: smoke run, not a measurement)" if report.quick else ""),
        f"curvetun {env.get('curvetun', '')} (twist curvetun --listen/--forward); {tools}",
        f"{env.get('python', '')}; Twisted {env.get('twisted', '')}; PyNaCl"
        f" {env.get('pynacl', '')}; {env.get('cpus', '')} CPUs, load {env.get('load', '?')}"
        f" at start; {env.get('date', '')}",
    ]
    if "stunnel" in report.transports:
        lines.append(
            "stunnel: TLS 1.3, ECDSA P-256 certificates both ways with peer verification,"
            " no session resumption"
        )
    lines += list(report.skipped.values())
    lines.append("values: median (min-max) of the runs; ratios: of the medians")
    ratio = "stunnel" in report.transports and "curvetun" in report.transports
    rows = [["figure", "unit", *report.transports, *(["curvetun/stunnel"] if ratio else [])]]
    for figure in report.figures:
        row = [figure.title, figure.unit]
        row += [
            format_summary(report.summary(figure.key, column)) if figure.applies_to(column) else "-"
            for column in report.transports
        ]
        if ratio:
            value = report.tunnel_ratio(figure.key)
            row.append("n/a" if value is None else f"{value:.2f}")
        rows.append(row)
    lines += ["", *render(rows)]
    lines.append("(lower is better: time added, CPU, memory; every other figure: higher)")
    tunnels = [t for t in report.transports if t in TUNNEL_ENDS]
    cpu_rows = [["CPU of each tunnel end, % of one core", *(f"{t} client/server" for t in tunnels)]]
    for figure in report.figures:
        if figure.key not in report.cpu:
            continue
        row = [figure.title]
        for tunnel in tunnels:
            parts = [report.cpu_summary(figure.key, tunnel, end) for end in ENDS]
            row.append(" / ".join("-" if part is None else f"{part.median:.0f}%" for part in parts))
        cpu_rows.append(row)
    if len(cpu_rows) > 1 and tunnels:
        lines += ["", *render(cpu_rows, left=1)]
    if report.memory:
        memory_rows = [
            ["memory per idle connection, KiB", *(f"{t} client/server" for t in tunnels)]
        ]
        row = ["each end (median)"]
        for tunnel in tunnels:
            per_end = report.memory.get(tunnel, {})
            row.append(
                " / ".join(
                    format_number(Summary.of(per_end[end]).median) if per_end.get(end) else "-"
                    for end in ENDS
                )
            )
        memory_rows.append(row)
        lines += ["", *render(memory_rows, left=1)]
    lines += ["", f"({report.seconds:.1f} s)"]
    return "\n".join(lines) + "\n"


def tunnel_report_json(report: TunnelReport) -> dict[str, Any]:
    """
    The tunnel comparison for machines (C{--tunnel --json}).
    """
    figures = []
    for figure in report.figures:
        results = {
            column: summary_json(report.summary(figure.key, column)) for column in report.transports
        }
        ratios = {}
        if "stunnel" in report.transports and "curvetun" in report.transports:
            ratios["curvetun/stunnel"] = report.tunnel_ratio(figure.key)
        cpu = {
            column: {end: summary_json(report.cpu_summary(figure.key, column, end)) for end in ENDS}
            for column in report.cpu.get(figure.key, {})
        }
        figures.append(
            {
                "key": figure.key,
                "title": figure.title,
                "unit": figure.unit,
                "higher_is_better": figure.higher_is_better,
                "results": results,
                "ratios": ratios,
                "cpu": cpu,
            }
        )
    memory = {
        column: {end: summary_json(Summary.of(v) if v else None) for end, v in ends.items()}
        for column, ends in report.memory.items()
    }
    return {
        "mode": "tunnel",
        "runs": report.runs,
        "quick": report.quick,
        "argv": report.argv,
        "environment": report.environment,
        "tunnels": list(report.transports),
        "skipped": report.skipped,
        "seconds": report.seconds,
        "figures": figures,
        "memory_per_end": memory,
    }


# -- measuring -------------------------------------------------------------------


DERIVED = {"pingpong_added": "pingpong", "cpu_per_connection": "connections"}
"""
The figures computed from another's runs, and that other figure.
"""

TIMED: dict[str, Timed] = {
    "bulk": Timed(measure_bulk, 16, value_per_unit=STREAM_CHUNK / 1e6, service="sink"),
    "pingpong": Timed(measure_ping_pong, 100),
    "connections": Timed(measure_handshakes, 10),
    "connections_concurrent": Timed(
        partial(measure_handshakes, clients=HANDSHAKE_CLIENTS),
        4 * HANDSHAKE_CLIENTS,
        multiple=HANDSHAKE_CLIENTS,
    ),
}


class TunnelBench:
    """
    One run of the tunnel comparison: the backend, the tunnels, the
    measurements, the report.
    """

    def __init__(
        self,
        reactor: Any,
        settings: Settings,
        report: TunnelReport,
        workdir: str,
        children: Children,
    ) -> None:
        self.reactor = reactor
        self.settings = settings
        self.report = report
        self.launcher = Launcher(reactor, workdir, children)
        self.children = children
        self.backend: ServerProcess | None = None
        self.tunnels: dict[tuple[str, str], Tunnel] = {}
        self.counts: dict[tuple[str, str], int] = {}

    def _timeout(self) -> float:
        return max(60.0, 30 * self.settings.duration)

    def _keys(self) -> list[str]:
        """
        The figures to measure: those asked for, and those the derived
        ones asked for come from.
        """
        keys = {f.key for f in self.settings.figures}
        keys |= {DERIVED[key] for key in keys if key in DERIVED}
        return [key for key in TUNNEL_FIGURES_BY_KEY if key in keys]

    async def start(self) -> None:
        """
        Start the backend, then an echo pair and a sink pair of ends of
        each tunnel the figures need.
        """
        self.backend = ServerProcess.spawn("tcp", ServerIdentity()).wait_ready()
        keys = self._keys()
        services = {TIMED[k].service for k in keys if k in TIMED}
        wanted = [
            (kind, service)
            for kind in self.settings.transports
            if kind != "direct"
            for service in sorted(services)
        ]

        async def start(kind: str, service: str) -> None:
            self.tunnels[kind, service] = await self.launcher.start(
                kind, self._backend_port(service)
            )

        # All at once: twist takes a second or so to start.
        try:
            await gatherResults(
                [Deferred.fromCoroutine(start(kind, service)) for kind, service in wanted],
                consumeErrors=True,
            )
        except FirstError as error:
            error.subFailure.raiseException()

    def _backend_port(self, service: str) -> int:
        assert self.backend is not None
        return self.backend.echo_port if service == "echo" else self.backend.sink_port

    def peer(self, column: str, service: str = "echo") -> Peer:
        """
        What the client connects to for C{column}: the backend itself
        (C{direct}), or the client end of the tunnel for C{service}.
        """
        connector = Connector(self.reactor, "tcp")
        if column == "direct":
            assert self.backend is not None
            return Peer(column, connector, self.backend.echo_port, self.backend.sink_port)
        tunnel = self.tunnels[column, service]
        return Peer(column, connector, tunnel.client_end.port, tunnel.client_end.port)

    def stop(self) -> None:
        """
        Stop the backend (every tunnel end is one of the L{Children}).
        """
        if self.backend is not None:
            self.backend.stop()
            self.backend = None

    async def probe(self) -> None:
        """
        One round trip through every echo tunnel (and to the backend), to
        fail early.
        """
        for column in self.settings.transports:
            if column == "direct" or (column, "echo") in self.tunnels:
                client = await self.peer(column).connect_echo()
                await client.ping_pong(b"?", 1)
                await client.close()

    def _columns(self, key: str) -> list[str]:
        """
        The columns figure C{key} is measured through (none for a
        derived figure: it comes with another).
        """
        if key in DERIVED:
            return []
        figure = TUNNEL_FIGURES_BY_KEY[key]
        return [c for c in self.settings.transports if figure.applies_to(c)]

    async def _timed(self, key: str, column: str, count: int) -> tuple[float, dict[str, float]]:
        """
        One measurement of C{count} units: its seconds, and the CPU
        seconds each tunnel end used meanwhile (with the wall time under
        C{"wall"}).
        """
        timed = TIMED[key]
        ends = {} if column == "direct" else self.tunnels[column, timed.service].ends()
        before = {name: end.cpu() for name, end in ends.items()}
        started = perf_counter()
        seconds = await with_timeout(
            self.reactor,
            timed.measure(self.peer(column, timed.service), count),
            self._timeout(),
            f"{key} through {column}",
        )
        used = {name: end.cpu() - before[name] for name, end in ends.items()}
        used["wall"] = perf_counter() - started
        return seconds, used

    async def calibrate(self, key: str, column: str, progress: Progress) -> int:
        """
        The count of work units that makes figure C{key} through
        C{column} take about the set duration.
        """
        progress.step(f"calibrating {key} through {column}")
        timed = TIMED[key]
        target = self.settings.duration
        count = timed.first_count
        while True:
            seconds, _ = await self._timed(key, column, count)
            if seconds >= target / 4 or count >= 10**8:
                break
            count = max(count * 2, min(count * 16, int(count * target / 4 / max(seconds, 1e-6))))
        scaled = max(timed.first_count, round(count * target / max(seconds, 1e-6)))
        return -(-scaled // timed.multiple) * timed.multiple

    async def measure(self, key: str, column: str) -> None:
        """
        One run of timed figure C{key} through C{column}, with the CPU of
        each tunnel end meanwhile (and, for sequential connections, the
        CPU per connection).
        """
        count = self.counts[key, column]
        seconds, used = await self._timed(key, column, count)
        self.report.add(TUNNEL_FIGURES_BY_KEY[key], column, TIMED[key].value(count, seconds))
        wall = used.pop("wall")
        for end, cpu in used.items():
            self.report.add_cpu(key, column, end, 100 * cpu / wall)
        if key == "connections" and used:
            self.report.add(
                TUNNEL_FIGURES_BY_KEY["cpu_per_connection"],
                column,
                1000 * sum(used.values()) / count,
            )

    def add_pingpong_added(self, run: int) -> None:
        """
        Once run C{run} has measured ping-pong through every column, the
        time each tunnel adds to a round trip over direct, in µs.
        """
        rates = self.report.samples.get("pingpong", {})
        direct = rates.get("direct", [])
        if len(direct) < run:
            return
        for column, values in rates.items():
            if column != "direct" and len(values) >= run:
                added = 1e6 / values[run - 1] - 1e6 / direct[run - 1]
                self.report.add(TUNNEL_FIGURES_BY_KEY["pingpong_added"], column, added)

    async def measure_memory(self, column: str) -> None:
        """
        One run of the memory figure through C{column}: a fresh echo pair
        of ends; N idle connections, then N more; the growth of each
        end's resident memory over the second N, per connection.
        """
        figure = TUNNEL_FIGURES_BY_KEY["idle_memory"]
        tunnel = await self.launcher.start(column, self._backend_port("echo"))
        try:
            peer = Peer(column, Connector(self.reactor, "tcp"), tunnel.client_end.port, 0)
            connections = self.settings.connections

            async def fill() -> dict[str, float]:
                first = await open_idle(peer, connections)
                before = {name: end.rss() for name, end in tunnel.ends().items()}
                clients = await open_idle(peer, connections)
                growth = {
                    name: (end.rss() - before[name]) / connections / 1024
                    for name, end in tunnel.ends().items()
                }
                await close_all(first + clients)
                return growth

            growth = await with_timeout(
                self.reactor, fill(), self._timeout() * 4, f"idle memory through {column}"
            )
        finally:
            for end in tunnel.ends().values():
                self.children.stop(end.process)
        for name, kib in growth.items():
            self.report.memory.setdefault(column, {}).setdefault(name, []).append(kib)
        self.report.add(figure, column, sum(growth.values()))

    def _steps(self) -> int:
        keys = self._keys()
        timed = [k for k in TIMED if k in keys]
        calibrations = sum(len(self._columns(k)) for k in timed)
        per_run = sum(len(self._columns(k)) for k in keys)
        return calibrations + per_run * self.settings.runs

    async def run(self) -> None:
        """
        Start everything, probe, calibrate, then measure run by run, every
        column in turn.
        """
        progress = Progress(self._steps())
        started = perf_counter()
        keys = self._keys()
        try:
            await self.start()
            await self.probe()
            timed = [k for k in TIMED if k in keys]
            for key in timed:
                for column in self._columns(key):
                    self.counts[key, column] = await self.calibrate(key, column, progress)
            for run in range(1, self.settings.runs + 1):
                for key in keys:
                    for column in self._columns(key):
                        progress.step(f"run {run}/{self.settings.runs}: {key} through {column}")
                        if key == "idle_memory":
                            await self.measure_memory(column)
                        else:
                            await self.measure(key, column)
                    if key == "pingpong":
                        self.add_pingpong_added(run)
        finally:
            progress.finish()
            self.report.seconds = perf_counter() - started


def plan_tunnels(wanted: tuple[str, ...]) -> tuple[tuple[str, ...], dict[str, str]]:
    """
    The tunnels that can run here, and the one-line note for each that
    cannot.
    """
    skipped = {}
    for kind in wanted:
        if kind != "direct":
            problem = tunnel_unavailable(kind)
            if problem is not None:
                skipped[kind] = problem
    return tuple(k for k in wanted if k not in skipped), skipped


def run_tunnel_benchmark(settings: Settings, argv: list[str], out: IO[str], as_json: bool) -> int:
    """
    Run the tunnel comparison on the global reactor and write its report
    to C{out}.

    @return: the exit status.
    """
    transports, skipped = plan_tunnels(settings.transports)
    settings = attrs.evolve(settings, transports=transports)
    report = TunnelReport(
        transports=transports,
        figures=settings.figures,
        runs=settings.runs,
        quick=settings.quick,
        argv=list(argv),
        environment={**environment(), **versions()},
        skipped=skipped,
    )
    raise_file_limit()
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    outcome: list[object] = []
    children = Children()
    with tempfile.TemporaryDirectory(prefix="curvetun-bench-tunnel-") as workdir:
        bench = TunnelBench(reactor, settings, report, workdir, children)

        def finished(result: object) -> None:
            outcome.append(result)
            if reactor.running:
                reactor.stop()

        def start() -> None:
            Deferred.fromCoroutine(bench.run()).addBoth(finished)

        reactor.callWhenRunning(start)
        try:
            reactor.run()
        finally:
            children.stop_all()
            bench.stop()
    return write_outcome(outcome, report, as_json, out, tunnel_report_json, format_tunnel_report)
