"""
Running the library benchmark: start the server processes, calibrate,
measure run by run with every transport in turn, and write the report.

Runs are interleaved, run by run: for each run, for each figure, every
transport in turn, so that drift on a shared machine hits all alike. Each
timed measurement does a fixed amount of work, calibrated once before the
first run so that it takes about C{--duration} seconds.
"""

from __future__ import annotations

import cProfile
import datetime
import os
import platform
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import IO, Any, TypeVar, cast

import attrs
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from .client import (
    Peer,
    crypto_operations,
    crypto_rate,
    measure_bulk,
    measure_handshakes,
    measure_idle_memory,
    measure_ping_pong,
    measure_pipelined,
)
from .figures import (
    CRYPTO_COLUMN,
    HANDSHAKE_CLIENTS,
    STREAM_CHUNK,
    TLS_SKIPPED,
    BenchError,
    Figure,
    Report,
)
from .options import Settings
from .report import format_report, report_json, write_outcome
from .server import ServerProcess, raise_file_limit
from .transports import (
    ClientIdentities,
    Connector,
    KeyDirectories,
    ServerIdentity,
    make_certificate,
    tls_client_options,
)


def pin_cpus(pin: str) -> tuple[int | None, int | None]:
    """
    The CPUs the client and the servers run on for C{pin} (L{None}: not
    pinned).

    @raise BenchError: C{split} on fewer than two usable CPUs.
    """
    if pin == "none":
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    if pin == "same":
        return cpus[0], cpus[0]
    if len(cpus) < 2:
        raise BenchError("--pin split needs two CPUs")
    return cpus[0], cpus[1]


def tls_unavailable() -> str | None:
    """
    Why the TLS column cannot run (pyOpenSSL or service_identity cannot
    be imported), or L{None} if it can.
    """
    try:
        import OpenSSL  # noqa: F401
        import service_identity  # noqa: F401
    except ImportError as error:
        return f"{error}"
    return None


def perf_counter() -> float:
    return time.perf_counter()


@attrs.frozen
class Timed:
    """
    A timed figure: how to measure C{count} units of work (returning
    seconds), the first count to try, and how a count and its seconds
    make the figure's value.

    @ivar service: the server's service it goes through (the tunnel
        comparison needs to know: a tunnel leads to one).
    """

    measure: Callable[[Peer, int], Awaitable[float]]
    first_count: int
    multiple: int = 1
    value_per_unit: float = 1.0
    service: str = "echo"

    def value(self, count: int, seconds: float) -> float:
        return count * self.value_per_unit / seconds


TIMED: dict[str, Timed] = {
    "bulk": Timed(measure_bulk, 16, value_per_unit=STREAM_CHUNK / 1e6),
    "pingpong": Timed(measure_ping_pong, 100),
    "pipelined_stream": Timed(measure_pipelined, 2000),
    "pipelined_message": Timed(partial(measure_pipelined, message_api=True), 2000),
    "handshakes": Timed(measure_handshakes, 10),
    "handshakes_concurrent": Timed(
        partial(measure_handshakes, clients=HANDSHAKE_CLIENTS),
        4 * HANDSHAKE_CLIENTS,
        multiple=HANDSHAKE_CLIENTS,
    ),
}
"""
The timed network figures, by key.
"""


class Progress:
    """
    Progress on stderr: one line per step, rewritten in place on a
    terminal.
    """

    def __init__(self, total: int, stream: IO[str] | None = None) -> None:
        self.total = total
        self.done = 0
        self._stream = sys.stderr if stream is None else stream
        self._tty = self._stream.isatty()
        self._started = perf_counter()

    def step(self, what: str) -> None:
        """
        Say what is being measured now.
        """
        self.done += 1
        line = (
            f"[{self.done:>{len(str(self.total))}}/{self.total}"
            f" {perf_counter() - self._started:6.1f}s] {what}"
        )
        if self._tty:
            self._stream.write("\r\033[K" + line)
        else:
            self._stream.write(line + "\n")
        self._stream.flush()

    def finish(self) -> None:
        """
        End the progress display.
        """
        if self._tty:
            self._stream.write("\r\033[K")
            self._stream.flush()


_T = TypeVar("_T")


def with_timeout(reactor: Any, awaitable: Awaitable[_T], seconds: float, what: str) -> Deferred[_T]:
    """
    C{awaitable} as a Deferred that fails with L{BenchError} after
    C{seconds}.
    """

    async def wrapped() -> _T:
        return await awaitable

    result = Deferred.fromCoroutine(wrapped())

    def timed_out(failure: Failure) -> Failure:
        from twisted.internet.defer import TimeoutError as DeferTimeout

        if failure.check(DeferTimeout):
            return Failure(BenchError(f"{what} did not finish within {seconds:.0f} s"))
        return failure

    return result.addTimeout(seconds, reactor).addErrback(timed_out)


class Bench:
    """
    One benchmark run: its servers, its client side, its report.
    """

    def __init__(self, reactor: Any, settings: Settings, report: Report, workdir: str) -> None:
        self.reactor = reactor
        self.settings = settings
        self.report = report
        self.workdir = workdir
        self.servers: list[ServerProcess] = []
        self.peers: dict[str, Peer] = {}
        self.counts: dict[tuple[str, str], int] = {}
        self.identities: ClientIdentities | None = None
        self._server_identities: dict[str, ServerIdentity] = {}
        self._fresh_identities: dict[str, ServerIdentity] = {}
        self.server_cpu: int | None = None

    # -- setting up

    def _timeout(self) -> float:
        return max(60.0, 30 * self.settings.duration)

    def start_servers(self) -> None:
        """
        Make the identities (key directories and registries, in-memory
        key pairs, the TLS certificate) and start one server process per
        transport.
        """
        transports = self.settings.transports
        keydirs = KeyDirectories.create(self.workdir) if "curvetun" in transports else None
        tls_options = None
        tls_dir = None
        if "tls" in transports:
            tls_dir = os.path.join(self.workdir, "tls")
            os.mkdir(tls_dir)
            cert_path, _ = make_certificate(tls_dir)
            tls_options = tls_client_options(cert_path)
        self.identities = ClientIdentities(self.reactor, keydirs, tls_options)
        self._server_identities = {
            "tcp": ServerIdentity(),
            "tls": ServerIdentity(tls_dir=tls_dir),
            "curvetun-memory": ServerIdentity(client_key=self.identities.memory_key),
        }
        if keydirs is not None:
            self._server_identities["curvetun"] = ServerIdentity(
                keydir=keydirs.server_keydir, registry=keydirs.server_registry
            )
            # The memory figure's fresh servers run beside the first: one
            # key directory per process.
            keydir, registry, _ = KeyDirectories.server_for(
                self.workdir, "fresh-server", keydirs.client_key
            )
            self._fresh_identities["curvetun"] = ServerIdentity(keydir=keydir, registry=registry)
        if all(figure.in_process for figure in self.settings.figures):
            return
        spawned = [self._spawn(name) for name in transports]
        for server in spawned:
            server.wait_ready()
            self.peers[server.transport] = Peer.of(self._connector(server.transport), server)

    def _spawn(self, transport: str, fresh: bool = False) -> ServerProcess:
        """
        Start a server process for C{transport}: the one every timed figure
        uses (profiled with C{--profile}), or a C{fresh} one for the memory
        figure.
        """
        profile_to = None
        if not fresh and self.settings.profile is not None:
            profile_to = os.path.join(self.settings.profile, f"server-{transport}.prof")
        identity = self._server_identities[transport]
        if fresh:
            identity = self._fresh_identities.get(transport, identity)
        server = ServerProcess.spawn(transport, identity, profile_to, self.server_cpu)
        self.servers.append(server)
        return server

    def _connector(self, transport: str) -> Connector:
        assert self.identities is not None
        return Connector(self.reactor, transport, self.identities)

    def stop(self) -> None:
        """
        Stop every server process and the client's curvetun service.
        """
        for server in self.servers:
            server.stop()
        self.servers.clear()
        if self.identities is not None:
            self.identities.stop()

    async def probe(self) -> None:
        """
        One round trip over each transport, to fail early; note the TLS
        version and cipher negotiated.
        """
        for name, peer in self.peers.items():
            client = await peer.connect_echo()
            await client.ping_pong(b"?", 1)
            if name == "tls":
                handle = cast(Any, client.transport).getHandle()
                self.report.tls = f"{handle.get_protocol_version_name()} {handle.get_cipher_name()}"
            await client.close()

    # -- measuring

    def _steps(self) -> int:
        """
        How many progress steps the run has: calibrations, then runs.
        """
        figures = self.settings.figures
        calibrations = sum(len(self._columns(f)) for f in figures if f.key in TIMED)
        per_run = sum(len(self._columns(f)) for f in figures)
        return calibrations + per_run * self.settings.runs

    def _columns(self, figure: Figure) -> list[str]:
        if figure.in_process:
            return [CRYPTO_COLUMN]
        return [t for t in self.settings.transports if figure.applies_to(t)]

    async def calibrate(self, figure: Figure, peer: Peer, progress: Progress) -> int:
        """
        The count of work units that makes C{figure} on C{peer} take about
        the set duration: grow the count until a measurement takes a
        quarter of it, then scale.
        """
        progress.step(f"calibrating {figure.key} over {peer.name}")
        timed = TIMED[figure.key]
        target = self.settings.duration
        count = timed.first_count
        while True:
            seconds = await with_timeout(
                self.reactor,
                timed.measure(peer, count),
                self._timeout(),
                f"{figure.key} over {peer.name}",
            )
            if seconds >= target / 4 or count >= 10**8:
                break
            count = max(count * 2, min(count * 16, int(count * target / 4 / max(seconds, 1e-6))))
        scaled = max(timed.first_count, round(count * target / max(seconds, 1e-6)))
        return -(-scaled // timed.multiple) * timed.multiple

    async def measure(self, figure: Figure, column: str) -> float:
        """
        One run of C{figure} on C{column}.
        """
        duration = self.settings.duration
        if figure.in_process:
            return crypto_rate(crypto_operations()[figure.key], duration)
        if figure.key == "idle_memory":
            # A fresh server each time: memory freed by earlier
            # connections would otherwise be reused and hide the cost.
            server = self._spawn(column, fresh=True).wait_ready()
            try:
                peer = Peer.of(self._connector(column), server)
                return await with_timeout(
                    self.reactor,
                    measure_idle_memory(peer, self.settings.connections),
                    self._timeout(),
                    f"idle memory over {column}",
                )
            finally:
                server.stop()
                self.servers.remove(server)
        timed = TIMED[figure.key]
        count = self.counts[figure.key, column]
        seconds = await with_timeout(
            self.reactor,
            timed.measure(self.peers[column], count),
            self._timeout(),
            f"{figure.key} over {column}",
        )
        return timed.value(count, seconds)

    async def run(self) -> None:
        """
        Probe, calibrate, then measure every figure run by run, every
        transport in turn.
        """
        progress = Progress(self._steps())
        started = perf_counter()
        try:
            await self.probe()
            for figure in self.settings.figures:
                if figure.key in TIMED:
                    for column in self._columns(figure):
                        self.counts[figure.key, column] = await self.calibrate(
                            figure, self.peers[column], progress
                        )
            for run in range(1, self.settings.runs + 1):
                for figure in self.settings.figures:
                    for column in self._columns(figure):
                        progress.step(f"run {run}/{self.settings.runs}: {figure.key} over {column}")
                        value = await self.measure(figure, column)
                        self.report.add(figure, column, value)
        finally:
            progress.finish()
            self.report.seconds = perf_counter() - started


def environment() -> dict[str, str]:
    """
    What the figures were measured with.
    """
    import nacl

    import twisted

    from .. import __version__

    info = {
        "curvetun": __version__,
        # Which copy ran: an installed one, or a source tree.
        "curvetun_from": os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        "python": f"Python {platform.python_version()}",
        "twisted": twisted.__version__,
        "pynacl": nacl.__version__,
        # os.uname, not platform.platform(): that runs "uname -p".
        "platform": "-".join(os.uname()[i] for i in (0, 2, 4)),
        "cpus": str(os.cpu_count()),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if hasattr(os, "getloadavg"):
        # On a shared machine, other work skews the figures: say how busy
        # it was when the run started.
        info["load"] = " ".join(f"{load:.2f}" for load in os.getloadavg())
    try:
        import OpenSSL
        from OpenSSL import SSL

        info["pyopenssl"] = OpenSSL.__version__
        info["openssl"] = SSL.SSLeay_version(SSL.SSLEAY_VERSION).decode()
    except ImportError:
        pass
    return info


def plan_transports(
    wanted: Sequence[str], tls_problem: str | None
) -> tuple[tuple[str, ...], dict[str, str]]:
    """
    The transports that can run, and why any other is skipped.

    @param tls_problem: what L{tls_unavailable} said.
    """
    if "tls" in wanted and tls_problem is not None:
        return tuple(t for t in wanted if t != "tls"), {"tls": f"{TLS_SKIPPED}: {tls_problem}"}
    return tuple(wanted), {}


def run_benchmark(settings: Settings, argv: list[str], out: IO[str], as_json: bool) -> int:
    """
    Run the benchmark on the global reactor and write its report to
    C{out}.

    @return: the exit status.
    """
    transports, skipped = plan_transports(settings.transports, tls_unavailable())
    settings = attrs.evolve(settings, transports=transports)
    if settings.profile is not None:
        os.makedirs(settings.profile, exist_ok=True)
    try:
        client_cpu, server_cpu = pin_cpus(settings.pin)
    except BenchError as error:
        sys.stderr.write(f"curvetun bench: error: {error}\n")
        return 1
    if client_cpu is not None:
        os.sched_setaffinity(0, {client_cpu})
    report = Report(
        transports=transports,
        figures=settings.figures,
        runs=settings.runs,
        quick=settings.quick,
        argv=list(argv),
        environment=environment(),
        skipped=skipped,
    )
    report.environment["pin"] = (
        "not pinned"
        if client_cpu is None
        else f"client on CPU {client_cpu}, servers on CPU {server_cpu}"
    )
    raise_file_limit()
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    outcome: list[object] = []
    with tempfile.TemporaryDirectory(prefix="curvetun-bench-") as workdir:
        bench = Bench(reactor, settings, report, workdir)
        bench.server_cpu = server_cpu

        async def everything() -> None:
            bench.start_servers()
            await bench.run()

        def finished(result: object) -> None:
            outcome.append(result)
            if reactor.running:
                reactor.stop()

        def start() -> None:
            Deferred.fromCoroutine(everything()).addBoth(finished)

        profiler = cProfile.Profile() if settings.profile is not None else None
        reactor.callWhenRunning(start)
        try:
            if profiler is not None:
                profiler.enable()
            reactor.run()
        finally:
            if profiler is not None and settings.profile is not None:
                profiler.disable()
                profiler.dump_stats(os.path.join(settings.profile, "client.prof"))
            bench.stop()
    return write_outcome(outcome, report, as_json, out, report_json, format_report)
