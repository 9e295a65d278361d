"""
curvetun's benchmark: curvetun beside plain TCP and TLS 1.3 through
Twisted, on 127.0.0.1, all in one run::

    python -m curvetun.bench [--quick] [--json] [--runs N] [--only FIGURES]
                             [--transports tcp,tls,curvetun] [--duration S]
                             [--connections N] [--pin none|same|split]
                             [--profile DIR]

The figures, and how to read them, are in C{docs/performance.md}.

How it runs. The parent process is the client: it runs every client
connection on its reactor and times them with C{time.perf_counter}. Each
transport has its own server process (this module with C{--serve}), which
listens on 127.0.0.1 port 0 and reports its ports on one stdout line. The
server code is the same for every transport; only its endpoint differs:

  - C{echo}: writes back what it receives (ping-pong, handshakes, idle
    connections for the memory figure);
  - C{sink}: reads an 8-byte count, answers C{R}, counts that many bytes
    and answers C{D} (bulk and pipelined writes);
  - C{control} (always plain TCP): answers C{rss} with the server's
    resident memory and its number of open echo connections.

Runs are interleaved, run by run: for each run, for each figure, every
transport in turn, so that drift on a shared machine hits all alike. Each
timed measurement does a fixed amount of work, calibrated once before the
first run so that it takes about C{--duration} seconds.
"""

from __future__ import annotations

import cProfile
import datetime
import gc
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from functools import partial
from typing import IO, Any, NoReturn, cast

import attrs
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IListeningPort,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.basic import LineReceiver
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

from . import __version__

TRANSPORTS = ("tcp", "tls", "curvetun")
"""
The transports compared, in table order.
"""

STREAM_CHUNK = 65503
"""
Bytes per application write in the bulk figure: the most one curvetun
message carries (C{curvetun.packets.MAX_MESSAGE}).
"""

SMALL = 100
"""
Bytes per write in the ping-pong, pipelined and handshake figures.
"""

HANDSHAKE_CLIENTS = 8
"""
Concurrent clients in the concurrent-handshakes figure.
"""

MEMORY_CONCURRENCY = 16
"""
Connections opened at a time while filling the server for the memory
figure (below Twisted's default listen backlog of 50).
"""

TLS_SKIPPED = "TLS: skipped (install curvetun[bench])"
"""
What the report says when pyOpenSSL or service_identity is missing.
"""

_LOCALHOST = "127.0.0.1"
_READY_LINE = "curvetun-bench-server"


class BenchError(Exception):
    """
    The benchmark could not run: a server did not start, a measurement
    failed or took far too long. The message says which.
    """


# -- figures and targets ---------------------------------------------------------


@attrs.frozen
class Figure:
    """
    One measured figure.

    @ivar key: its name in C{--json} output.
    @ivar group: the C{--only} name that selects it.
    @ivar title: its row label.
    @ivar unit: the unit of its values.
    @ivar higher_is_better: false for costs (memory).
    @ivar columns: the transports it applies to (L{None}: all); in-process
        figures have the single column C{"pynacl"}.
    """

    key: str
    group: str
    title: str
    unit: str
    higher_is_better: bool = True
    columns: tuple[str, ...] | None = None

    @property
    def in_process(self) -> bool:
        """
        Is this a crypto-ceiling figure, measured without any network?
        """
        return self.columns == (CRYPTO_COLUMN,)

    def applies_to(self, column: str) -> bool:
        """
        Is this figure measured for C{column} (a transport, or
        C{"pynacl"})?
        """
        if self.columns is None:
            return column in TRANSPORTS
        return column in self.columns


CRYPTO_COLUMN = "pynacl"
"""
The column of the in-process crypto figures.
"""

FIGURES = (
    Figure("bulk", "bulk", "bulk one-way, 65503-byte writes", "MB/s"),
    Figure("pingpong", "pingpong", "ping-pong, 100 B, one connection", "round trips/s"),
    Figure("pipelined_stream", "pipelined", "pipelined 100 B writes, stream", "writes/s"),
    Figure(
        "pipelined_message",
        "pipelined",
        "pipelined 100 B messages (write_message)",
        "messages/s",
        columns=("curvetun",),
    ),
    Figure("handshakes", "handshakes", "handshakes, sequential", "handshakes/s"),
    Figure(
        "handshakes_concurrent",
        "handshakes",
        f"handshakes, {HANDSHAKE_CLIENTS} concurrent clients",
        "handshakes/s",
    ),
    Figure(
        "idle_memory",
        "memory",
        "server memory per idle connection",
        "KiB/conn",
        higher_is_better=False,
    ),
    Figure("box_100", "crypto", "box 100 B", "boxes/s", columns=(CRYPTO_COLUMN,)),
    Figure("open_100", "crypto", "open 100 B", "opens/s", columns=(CRYPTO_COLUMN,)),
    Figure("box_65503", "crypto", "box 65503 B", "boxes/s", columns=(CRYPTO_COLUMN,)),
    Figure("open_65503", "crypto", "open 65503 B", "opens/s", columns=(CRYPTO_COLUMN,)),
    Figure(
        "x25519",
        "crypto",
        "X25519 (crypto_box_beforenm)",
        "ops/s",
        columns=(CRYPTO_COLUMN,),
    ),
)
"""
Every figure, in the order measured and shown.
"""

GROUPS = tuple(dict.fromkeys(figure.group for figure in FIGURES))
"""
The names C{--only} accepts.
"""

FIGURES_BY_KEY = {figure.key: figure for figure in FIGURES}


@attrs.frozen
class Summary:
    """
    The runs of one figure on one column: their median, minimum and
    maximum.
    """

    median: float
    low: float
    high: float
    runs: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        """
        Summarize C{values} (at least one).
        """
        if not values:
            raise ValueError("no values to summarize")
        return cls(statistics.median(values), min(values), max(values), tuple(values))


@attrs.define
class Report:
    """
    Everything one benchmark run measured, and what it was run on.

    @ivar samples: per figure key, per column, the value of each run.
    @ivar transports: the transports measured.
    @ivar skipped: per transport left out, why.
    @ivar figures: the figures measured.
    @ivar environment: versions, machine and date.
    @ivar argv: the command line, as given to L{main}.
    @ivar tls: the negotiated TLS version and cipher, when TLS ran.
    """

    transports: tuple[str, ...]
    figures: tuple[Figure, ...]
    runs: int
    quick: bool
    argv: list[str]
    environment: dict[str, str]
    skipped: dict[str, str] = attrs.field(factory=dict)
    samples: dict[str, dict[str, list[float]]] = attrs.field(factory=dict)
    tls: str = ""
    seconds: float = 0.0

    def add(self, figure: Figure, column: str, value: float) -> None:
        """
        Record one run's value.
        """
        self.samples.setdefault(figure.key, {}).setdefault(column, []).append(value)

    def summary(self, key: str, column: str) -> Summary | None:
        """
        The summary of figure C{key} on C{column}, if it was measured.
        """
        values = self.samples.get(key, {}).get(column)
        return Summary.of(values) if values else None

    def ratio(self, key: str, over: str) -> float | None:
        """
        curvetun's median over C{over}'s median for figure C{key}, if both
        were measured.
        """
        mine = self.summary(key, "curvetun")
        theirs = self.summary(key, over)
        if mine is None or theirs is None or theirs.median == 0:
            return None
        return mine.median / theirs.median

    def crypto_ceiling_100(self) -> float | None:
        """
        Messages per second that PyNaCl allows at 100 bytes when the
        sender boxes in one process and the receiver opens in another (on
        another core): the slower of box and open.
        """
        box = self.summary("box_100", CRYPTO_COLUMN)
        opened = self.summary("open_100", CRYPTO_COLUMN)
        if box is None or opened is None:
            return None
        return min(box.median, opened.median)


@attrs.frozen
class Target:
    """
    A performance goal: curvetun's median of C{figure}, over a reference,
    at least (or, with C{at_most}, at most) C{goal}.

    @ivar reference: C{"tcp"} or C{"tls"} (that transport's median),
        C{"crypto"} (L{Report.crypto_ceiling_100}), or C{""} (the value
        itself).
    """

    figure: str
    reference: str
    goal: float
    label: str
    at_most: bool = False

    def measure(self, report: Report) -> float | None:
        """
        The measured ratio (or value), if everything it needs was measured.
        """
        if self.reference in TRANSPORTS:
            return report.ratio(self.figure, self.reference)
        mine = report.summary(self.figure, "curvetun")
        if mine is None:
            return None
        if self.reference == "crypto":
            ceiling = report.crypto_ceiling_100()
            return None if not ceiling else mine.median / ceiling
        return mine.median

    def met(self, measured: float) -> bool:
        """
        Does C{measured} meet the goal?
        """
        return measured <= self.goal if self.at_most else measured >= self.goal


TARGETS = (
    Target("pingpong", "tcp", 0.85, "ping-pong >= 0.85 x TCP"),
    Target("pingpong", "tls", 1.4, "ping-pong >= 1.4 x TLS"),
    Target("bulk", "tls", 1.0, "bulk >= 1.0 x TLS"),
    Target("bulk", "tcp", 0.5, "bulk >= 0.5 x TCP"),
    Target("pipelined_stream", "tls", 1.0, "pipelined stream writes >= 1.0 x TLS"),
    Target(
        "pipelined_message",
        "crypto",
        0.6,
        "pipelined messages >= 0.6 x crypto ceiling (100 B)",
    ),
    Target("handshakes", "tls", 3.0, "handshakes, sequential >= 3 x TLS"),
    Target(
        "handshakes_concurrent",
        "tls",
        3.0,
        f"handshakes, {HANDSHAKE_CLIENTS} concurrent >= 3 x TLS",
    ),
    Target("idle_memory", "", 4.0, "idle memory per connection <= 4 KiB", at_most=True),
)
"""
The goals the data path is tuned against (see C{docs/performance.md}).
"""


@attrs.frozen
class TargetResult:
    """
    One target, as measured: C{measured} and C{met} are L{None} when the
    figures it needs were not measured.
    """

    target: Target
    measured: float | None
    met: bool | None


def evaluate_targets(report: Report) -> list[TargetResult]:
    """
    Check every target against C{report}.
    """
    results = []
    for target in TARGETS:
        measured = target.measure(report)
        met = None if measured is None else target.met(measured)
        results.append(TargetResult(target, measured, met))
    return results


# -- settings ---------------------------------------------------------------------


@attrs.frozen
class Settings:
    """
    How much to measure.

    @ivar duration: seconds each timed measurement aims to take.
    @ivar connections: idle connections opened for the memory figure.
    """

    runs: int
    duration: float
    connections: int
    quick: bool
    transports: tuple[str, ...]
    figures: tuple[Figure, ...]
    profile: str | None = None
    pin: str = "none"


PINNINGS = ("none", "same", "split")
"""
Where C{--pin} puts the processes: where the system likes; client and
servers on one CPU; client on one CPU and servers on another.
"""


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


NORMAL = {"runs": 5, "duration": 1.0, "connections": 1000}
QUICK = {"runs": 1, "duration": 0.03, "connections": 200}


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


# -- the server process -------------------------------------------------------------


def _set_no_delay(transport: object) -> None:
    """
    Turn Nagle's algorithm off on the TCP connection under C{transport}
    (found through the C{transport} attributes of wrapping layers), as
    curvetun does on its own connections: every transport is compared
    with the same TCP settings.
    """
    for _ in range(4):
        if ITCPTransport.providedBy(transport):
            transport.setTcpNoDelay(True)
            return
        transport = getattr(transport, "transport", None)
        if transport is None:
            return


class _EchoServer(Protocol):
    """
    Writes back everything it receives.
    """

    factory: _EchoFactory

    def connectionMade(self) -> None:
        _set_no_delay(self.transport)
        self.factory.open += 1

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.factory.open -= 1


class _EchoFactory(Factory[_EchoServer]):
    """
    Builds L{_EchoServer}s and counts the open ones.
    """

    def __init__(self) -> None:
        self.open = 0

    def buildProtocol(self, addr: IAddress | None) -> _EchoServer:
        protocol = _EchoServer()
        protocol.factory = self
        return protocol


class _SinkServer(Protocol):
    """
    Reads an 8-byte big-endian count, answers C{R}, then counts bytes;
    once that many have arrived, answers C{D}.
    """

    _header = b""
    _expected = -1
    _received = 0

    def connectionMade(self) -> None:
        _set_no_delay(self.transport)

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        if self._expected < 0:
            self._header += data
            if len(self._header) < 8:
                return
            self._expected = int.from_bytes(self._header[:8], "big")
            data = self._header[8:]
            self._header = b""
            self.transport.write(b"R")
        received = self._received + len(data)
        if self._received < self._expected <= received:
            self.transport.write(b"D")
        self._received = received


def resident_memory() -> int:
    """
    This process's resident set size in bytes (from C{/proc/self/statm};
    elsewhere the peak, from C{getrusage}).
    """
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class _ControlServer(LineReceiver):
    """
    Answers the line C{rss} with C{"RSS OPEN"}: resident bytes (after a
    garbage collection) and open echo connections.
    """

    delimiter = b"\n"

    def __init__(self, echo: _EchoFactory) -> None:
        self._echo = echo

    def lineReceived(self, line: bytes) -> None:
        if line.strip() == b"rss":
            gc.collect()
            self.sendLine(f"{resident_memory()} {self._echo.open}".encode())
        else:
            self.sendLine(b"? unknown command")


class _StdinWatch(Protocol):
    """
    Stops the reactor when standard input closes: the parent closes it to
    stop a server, and a parent that dies closes it too.
    """

    def __init__(self, stop: Callable[[], None]) -> None:
        self._stop = stop

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._stop()


def _raise_file_limit() -> None:
    """
    Raise the soft limit on open files to the hard limit: the memory
    figure holds a thousand connections and more.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _log_warnings_only() -> None:
    """
    Send warnings and errors to stderr and drop the rest. (Without an
    observer Twisted would keep every event in memory until one is
    added, and one info event per closed curvetun connection would skew
    the figures.)
    """
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    observer = FilteringLogObserver(
        textFileLogObserver(sys.stderr),
        [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)],
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def _server_endpoint(
    reactor: Any, transport: str, client_key: bytes, tls_dir: str | None
) -> tuple[IStreamServerEndpoint, bytes]:
    """
    The endpoint the server process listens on for C{transport}, and its
    curvetun public key (empty for TCP and TLS).
    """
    from twisted.internet.endpoints import TCP4ServerEndpoint, serverFromString

    tcp = TCP4ServerEndpoint(reactor, 0, interface=_LOCALHOST)
    if transport == "tcp":
        return tcp, b""
    if transport == "tls":
        from twisted.internet.endpoints import quoteStringArgument

        assert tls_dir is not None
        key = quoteStringArgument(os.path.join(tls_dir, "key.pem"))
        cert = quoteStringArgument(os.path.join(tls_dir, "cert.pem"))
        description = f"ssl:0:interface={_LOCALHOST}:privateKey={key}:certKey={cert}"
        return serverFromString(reactor, description), b""
    from .endpoints import CurveTunServerEndpoint
    from .keys import format_public_key
    from .registry import Registry
    from .service import CurveTunService
    from .transport import ConnectionLimits
    from .vault import MemoryVault

    vault = MemoryVault.generate()
    registry = Registry.parse(f"{_LOCALHOST} {format_public_key(client_key)}\n")
    # The memory figure holds a thousand connections and more from one
    # address; the handshake limits stay as they are by default.
    limits = attrs.evolve(ConnectionLimits(), connections=None, connections_per_address=None)
    service = CurveTunService(vault, registry, clock=reactor, limits=limits)
    service.startService()
    return CurveTunServerEndpoint(tcp, service), vault.public_key


def serve(
    transport: str,
    client_key: bytes,
    tls_dir: str | None,
    profile_to: str | None,
    cpu: int | None = None,
) -> int:
    """
    The server process: listen on 127.0.0.1 (echo and sink through
    C{transport}, control over TCP), print one line with the ports and
    the curvetun server key, and serve until standard input closes.
    """
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    from twisted.internet import reactor as _reactor
    from twisted.internet import stdio
    from twisted.internet.endpoints import TCP4ServerEndpoint

    reactor: Any = _reactor
    _raise_file_limit()
    _log_warnings_only()
    # Port 0: each listen() is a new port.
    endpoint, server_key = _server_endpoint(reactor, transport, client_key, tls_dir)
    echo = _EchoFactory()
    listening: list[Deferred[IListeningPort]] = [
        endpoint.listen(echo),
        endpoint.listen(Factory.forProtocol(_SinkServer)),
        TCP4ServerEndpoint(reactor, 0, interface=_LOCALHOST).listen(
            Factory.forProtocol(lambda: _ControlServer(echo))
        ),
    ]
    failures: list[Failure] = []

    def announce(ports: list[IListeningPort]) -> None:
        echo_port, sink_port, control_port = (cast(Any, port.getHost()).port for port in ports)
        sys.stdout.write(
            f"{_READY_LINE} echo={echo_port} sink={sink_port} control={control_port}"
            f" key={server_key.hex() or '-'}\n"
        )
        sys.stdout.flush()
        stdio.StandardIO(_StdinWatch(stop))

    def stop() -> None:
        if reactor.running:
            reactor.stop()

    def failed(failure: Failure) -> None:
        failures.append(failure)
        stop()

    gatherResults(listening, consumeErrors=True).addCallbacks(announce, failed)
    profiler = cProfile.Profile() if profile_to else None
    if profiler is not None:
        profiler.enable()
    reactor.run()
    if profiler is not None and profile_to is not None:
        profiler.disable()
        profiler.dump_stats(profile_to)
    for failure in failures:
        sys.stderr.write(f"curvetun bench server: {failure.getErrorMessage()}\n")
    return 1 if failures else 0


def make_certificate(directory: str) -> tuple[str, str]:
    """
    Write a throwaway self-signed ECDSA P-256 certificate for
    C{localhost} and C{127.0.0.1}, valid for a day, into C{directory}.

    @return: the paths of the certificate and of its private key (PEM).
    """
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(_LOCALHOST))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = os.path.join(directory, "cert.pem")
    key_path = os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as out:
        out.write(certificate.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as out:
        out.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_path, key_path


@attrs.define
class ServerProcess:
    """
    A running server process for one transport, and the ports it reported.
    """

    transport: str
    process: subprocess.Popen[bytes]
    echo_port: int = 0
    sink_port: int = 0
    control_port: int = 0
    key: bytes = b""

    @classmethod
    def spawn(
        cls,
        transport: str,
        client_key: bytes,
        tls_dir: str | None,
        profile_to: str | None = None,
        cpu: int | None = None,
    ) -> ServerProcess:
        """
        Start a server process; call L{wait_ready} before using it.
        """
        command = [
            sys.executable,
            "-m",
            "curvetun.bench",
            "--serve",
            transport,
            "--client-key",
            client_key.hex(),
        ]
        if tls_dir is not None:
            command += ["--tls-dir", tls_dir]
        if profile_to is not None:
            command += ["--profile-to", profile_to]
        if cpu is not None:
            command += ["--cpu", str(cpu)]
        # The child imports this very curvetun, installed or not.
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [package_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        return cls(transport, process)

    def wait_ready(self) -> ServerProcess:
        """
        Read the server's ports from its first line.

        @raise BenchError: the server exited or wrote something else.
        """
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode("ascii", "replace").split()
        if not line or line[0] != _READY_LINE:
            code = self.process.poll()
            self.stop()
            raise BenchError(
                f"the {self.transport} server did not start"
                f" (exit status {code}, first line {' '.join(line)!r})"
            )
        fields = dict(field.split("=", 1) for field in line[1:])
        self.echo_port = int(fields["echo"])
        self.sink_port = int(fields["sink"])
        self.control_port = int(fields["control"])
        self.key = b"" if fields["key"] == "-" else bytes.fromhex(fields["key"])
        return self

    def stop(self) -> None:
        """
        Stop the server: close its standard input, then wait (kill it if
        it does not exit within 30 seconds).
        """
        if self.process.stdin is not None and not self.process.stdin.closed:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


# -- the client side ----------------------------------------------------------------


class _Client(Protocol):
    """
    The client protocol of every figure, on every transport. It counts
    the bytes it receives and lets one caller at a time wait for the next
    so many (L{expect}); L{ping_pong} runs round trips from
    C{dataReceived} with no Deferred per round trip.
    """

    def __init__(self) -> None:
        self.received = 0
        self.closed: Deferred[None] = Deferred()
        self._claimed = 0
        self._target = 0
        self._waiting: Deferred[None] | None = None
        self._pings_left = 0
        self._ping = b""

    def connectionMade(self) -> None:
        _set_no_delay(self.transport)

    def expect(self, count: int) -> Deferred[None]:
        """
        A Deferred that fires once C{count} more bytes have arrived than
        earlier calls claimed.
        """
        assert self._waiting is None
        self._claimed += count
        waiting: Deferred[None] = Deferred()
        if self.received >= self._claimed:
            waiting.callback(None)
        else:
            self._target = self._claimed
            self._waiting = waiting
        return waiting

    def ping_pong(self, ping: bytes, count: int) -> Deferred[None]:
        """
        Write C{ping} C{count} times, each time once the whole echo of the
        previous one is back; fire when the last echo is back.
        """
        assert self.transport is not None and count > 0
        self._ping = ping
        self._pings_left = count - 1
        done = self.expect(len(ping))
        self.transport.write(ping)
        return done

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self._waiting is None or self.received < self._target:
            return
        if self._pings_left:
            self._pings_left -= 1
            self._claimed += len(self._ping)
            self._target = self._claimed
            assert self.transport is not None
            self.transport.write(self._ping)
            return
        waiting, self._waiting = self._waiting, None
        waiting.callback(None)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.errback(reason)
        self.closed.callback(None)

    async def close(self) -> None:
        """
        Close the connection and wait until it is closed.
        """
        assert self.transport is not None
        self.transport.loseConnection()
        await self.closed


@implementer(IPushProducer)
class Pump:
    """
    Writes C{count} copies of C{piece} through C{write} as fast as the
    transport takes them: the transport pauses it when its buffer is full
    and resumes it when the buffer has drained; every C{batch} writes it
    lets the reactor run (so that TLS's write aggregation flushes and
    acknowledgements are read).

    @ivar done: fires when the last piece is written.
    """

    def __init__(
        self,
        clock: IReactorTime,
        write: Callable[[bytes], object],
        piece: bytes,
        count: int,
        batch: int,
    ) -> None:
        self.done: Deferred[None] = Deferred()
        self._clock = clock
        self._write = write
        self._piece = piece
        self._left = count
        self._batch = batch
        self._paused = False
        self._running = False
        self._stopped = False
        self._scheduled: IDelayedCall | None = None

    def start(self) -> Deferred[None]:
        """
        Start writing; returns L{done}.
        """
        self._run()
        return self.done

    def _run(self) -> None:
        self._scheduled = None
        if self._running or self._stopped:
            return
        self._running = True
        try:
            write, piece = self._write, self._piece
            batch = min(self._batch, self._left)
            written = 0
            while written < batch and not self._paused:
                write(piece)
                written += 1
            self._left -= written
        finally:
            self._running = False
        if self._left == 0:
            if not self.done.called:
                self.done.callback(None)
        elif not self._paused and not self._stopped and self._scheduled is None:
            self._scheduled = self._clock.callLater(0, self._run)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self._left and not self._running and self._scheduled is None:
            self._run()

    def stopProducing(self) -> None:
        self._stopped = True
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        self._scheduled = None
        if not self.done.called:
            self.done.errback(ConnectionDone("the transport stopped the writer"))


class _ControlClient(LineReceiver):
    """
    Asks a server's control port for its memory use.
    """

    delimiter = b"\n"

    def __init__(self) -> None:
        self._answers: list[Deferred[bytes]] = []

    def ask_rss(self) -> Deferred[tuple[int, int]]:
        """
        The server's resident bytes and its number of open echo
        connections.
        """
        answer: Deferred[bytes] = Deferred()
        self._answers.append(answer)
        self.sendLine(b"rss")

        def parse(line: bytes) -> tuple[int, int]:
            rss, open_connections = line.split()
            return int(rss), int(open_connections)

        return answer.addCallback(parse)

    def lineReceived(self, line: bytes) -> None:
        self._answers.pop(0).callback(line)


class Connector:
    """
    How the client side reaches a server process over one transport.
    """

    def __init__(
        self,
        reactor: Any,
        transport: str,
        client_service: Any = None,
        tls_options: Any = None,
    ) -> None:
        self.reactor = reactor
        self.transport = transport
        self._client_service = client_service
        self._tls_options = tls_options

    def endpoint(self, port: int, server_key: bytes) -> IStreamClientEndpoint:
        """
        A client endpoint for C{port} on 127.0.0.1 through this transport.
        """
        from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS

        tcp = TCP4ClientEndpoint(self.reactor, _LOCALHOST, port)
        if self.transport == "tcp":
            return tcp
        if self.transport == "tls":
            return wrapClientTLS(self._tls_options, tcp)
        from .endpoints import CurveTunClientEndpoint

        return CurveTunClientEndpoint(tcp, self._client_service, server_key)

    async def connect(self, port: int, server_key: bytes) -> _Client:
        """
        Connect a L{_Client} (through the whole handshake, for curvetun).
        """
        protocol = await self.endpoint(port, server_key).connect(Factory.forProtocol(_Client))
        assert isinstance(protocol, _Client)
        return protocol


def _tls_client_options(cert_path: str) -> Any:
    """
    Client TLS options that trust only the throwaway certificate, check
    the name C{localhost}, and require TLS 1.3.
    """
    from twisted.internet.ssl import Certificate, TLSVersion, optionsForClientTLS

    with open(cert_path, "rb") as pem:
        root = Certificate.loadPEM(pem.read())
    return optionsForClientTLS(
        "localhost",
        trustRoot=root,
        extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_3},
    )


@attrs.define
class Peer:
    """
    One transport as the measurements see it: how to connect, and the
    server process to connect to.
    """

    connector: Connector
    server: ServerProcess

    @property
    def name(self) -> str:
        """
        The transport's name.
        """
        return self.connector.transport

    async def connect_echo(self) -> _Client:
        """
        A connection to the echo service.
        """
        return await self.connector.connect(self.server.echo_port, self.server.key)

    async def connect_sink(self) -> _Client:
        """
        A connection to the sink service.
        """
        return await self.connector.connect(self.server.sink_port, self.server.key)


# -- the measurements ---------------------------------------------------------------


def _perf_counter() -> float:
    return time.perf_counter()


async def measure_stream(
    peer: Peer,
    piece: bytes,
    count: int,
    batch: int,
    message_api: bool = False,
) -> float:
    """
    Write C{piece} C{count} times to the sink with backpressure (through
    C{write_message} with C{message_api}, else C{write}); return the
    seconds from the first write until the sink confirms the last byte.
    """
    client = await peer.connect_sink()
    transport: Any = client.transport
    # Announce the count and wait for the answer: every handshake is over
    # (TLS finishes its own on the first write) before the clock starts.
    transport.write((len(piece) * count).to_bytes(8, "big"))
    await client.expect(1)
    confirmed = client.expect(1)
    write = transport.write_message if message_api else transport.write
    pump = Pump(peer.connector.reactor, write, piece, count, batch)
    started = _perf_counter()
    transport.registerProducer(pump, True)
    await pump.start()
    transport.unregisterProducer()
    await confirmed
    elapsed = _perf_counter() - started
    await client.close()
    return elapsed


async def measure_bulk(peer: Peer, count: int) -> float:
    """
    Bulk one-way: C{count} writes of 65503 bytes.
    """
    return await measure_stream(peer, b"\xa5" * STREAM_CHUNK, count, batch=16)


async def measure_pipelined(peer: Peer, count: int, message_api: bool = False) -> float:
    """
    Pipelined: C{count} writes (or messages) of 100 bytes.
    """
    return await measure_stream(peer, b"\x5a" * SMALL, count, batch=1000, message_api=message_api)


async def measure_ping_pong(peer: Peer, count: int) -> float:
    """
    C{count} round trips of 100 bytes on one connection (after ten
    untimed ones).
    """
    client = await peer.connect_echo()
    ping = b"\x3c" * SMALL
    await client.ping_pong(ping, 10)
    started = _perf_counter()
    await client.ping_pong(ping, count)
    elapsed = _perf_counter() - started
    await client.close()
    return elapsed


async def _handshake(peer: Peer, ping: bytes) -> None:
    """
    Connect, one round trip, close.
    """
    client = await peer.connect_echo()
    await client.ping_pong(ping, 1)
    await client.close()


async def measure_handshakes(peer: Peer, count: int, clients: int = 1) -> float:
    """
    C{count} times: connect, one 100-byte round trip, close; by
    C{clients} clients at once, each doing its share in sequence.
    """
    ping = b"\x3c" * SMALL

    async def client_loop(share: int) -> None:
        for _ in range(share):
            await _handshake(peer, ping)

    shares = [count // clients + (1 if i < count % clients else 0) for i in range(clients)]
    started = _perf_counter()
    await gatherResults(
        [Deferred.fromCoroutine(client_loop(share)) for share in shares if share],
        consumeErrors=True,
    )
    return _perf_counter() - started


async def _open_idle(peer: Peer, count: int) -> list[_Client]:
    """
    Open C{count} echo connections, L{MEMORY_CONCURRENCY} at a time, each
    established on both sides (one byte there and back).
    """
    opened: list[_Client] = []
    left = iter(range(count))

    async def opener() -> None:
        for _ in left:
            client = await peer.connect_echo()
            opened.append(client)
            await client.ping_pong(b"!", 1)

    await gatherResults(
        [Deferred.fromCoroutine(opener()) for _ in range(min(count, MEMORY_CONCURRENCY))],
        consumeErrors=True,
    )
    return opened


async def _close_all(clients: Iterable[_Client]) -> None:
    await gatherResults(
        [Deferred.fromCoroutine(client.close()) for client in clients], consumeErrors=True
    )


async def measure_idle_memory(peer: Peer, connections: int) -> float:
    """
    The growth of the (fresh) server's resident memory, in KiB per
    connection, when C{connections} idle established connections are
    added to as many already open.

    The first ones fill memory that start-up (imports, building the
    machines) touched and freed; that costs them nothing and would hide
    the cost of a connection. None is closed before the end, so no
    connection reuses what another one freed.
    """
    from twisted.internet.endpoints import TCP4ClientEndpoint

    control = await TCP4ClientEndpoint(
        peer.connector.reactor, _LOCALHOST, peer.server.control_port
    ).connect(Factory.forProtocol(_ControlClient))
    assert isinstance(control, _ControlClient)
    first = await _open_idle(peer, connections)
    before, _ = await control.ask_rss()
    clients = await _open_idle(peer, connections)
    after, open_connections = await control.ask_rss()
    await _close_all(first + clients)
    assert control.transport is not None
    control.transport.loseConnection()
    if open_connections != len(first) + connections:
        raise BenchError(
            f"the {peer.name} server counts {open_connections} open connections,"
            f" not {len(first) + connections}"
        )
    return (after - before) / connections / 1024


def crypto_rate(operation: Callable[[], object], duration: float) -> float:
    """
    Calls of C{operation} per second, over at least C{duration} seconds.
    """
    count = 0
    batch = 16
    started = _perf_counter()
    while True:
        for _ in itertools.repeat(None, batch):
            operation()
        count += batch
        elapsed = _perf_counter() - started
        if elapsed >= duration:
            return count / elapsed
        batch = min(batch * 2, 4096)


def crypto_operations() -> dict[str, Callable[[], object]]:
    """
    The in-process crypto ceiling's operations, by figure key: PyNaCl box
    and open with a precomputed key (what a session does per message),
    and X25519 (what a handshake does a few times).
    """
    from nacl.bindings import (
        crypto_box_beforenm,
        crypto_box_easy_afternm,
        crypto_box_keypair,
        crypto_box_open_easy_afternm,
    )

    public_key, secret_key = crypto_box_keypair()
    peer_public_key, _ = crypto_box_keypair()
    shared = crypto_box_beforenm(peer_public_key, secret_key)
    nonce = bytes(24)
    operations: dict[str, Callable[[], object]] = {}
    for size in (SMALL, STREAM_CHUNK):
        message = b"\x42" * size
        box = crypto_box_easy_afternm(message, nonce, shared)
        operations[f"box_{size}"] = partial(crypto_box_easy_afternm, message, nonce, shared)
        operations[f"open_{size}"] = partial(crypto_box_open_easy_afternm, box, nonce, shared)
    operations["x25519"] = partial(crypto_box_beforenm, peer_public_key, secret_key)
    return operations


# -- running it all -------------------------------------------------------------------


@attrs.frozen
class _Timed:
    """
    A timed figure: how to measure C{count} units of work (returning
    seconds), the first count to try, and how a count and its seconds
    make the figure's value.
    """

    measure: Callable[[Peer, int], Awaitable[float]]
    first_count: int
    multiple: int = 1
    value_per_unit: float = 1.0

    def value(self, count: int, seconds: float) -> float:
        return count * self.value_per_unit / seconds


TIMED: dict[str, _Timed] = {
    "bulk": _Timed(measure_bulk, 16, value_per_unit=STREAM_CHUNK / 1e6),
    "pingpong": _Timed(measure_ping_pong, 100),
    "pipelined_stream": _Timed(measure_pipelined, 2000),
    "pipelined_message": _Timed(partial(measure_pipelined, message_api=True), 2000),
    "handshakes": _Timed(measure_handshakes, 10),
    "handshakes_concurrent": _Timed(
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
        self._started = _perf_counter()

    def step(self, what: str) -> None:
        """
        Say what is being measured now.
        """
        self.done += 1
        line = (
            f"[{self.done:>{len(str(self.total))}}/{self.total}"
            f" {_perf_counter() - self._started:6.1f}s] {what}"
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


def _with_timeout(
    reactor: Any, awaitable: Awaitable[float], seconds: float, what: str
) -> Deferred[float]:
    """
    C{awaitable} as a Deferred that fails with L{BenchError} after
    C{seconds}.
    """

    async def wrapped() -> float:
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
        self._client_key = b""
        self._client_service: Any = None
        self._tls_options: Any = None
        self._tls_dir: str | None = None
        self.server_cpu: int | None = None

    # -- setting up

    def _timeout(self) -> float:
        return max(60.0, 30 * self.settings.duration)

    def start_servers(self) -> None:
        """
        Make the identities (curvetun key pairs, the TLS certificate) and
        start one server process per transport.
        """
        from .registry import Registry
        from .service import CurveTunService
        from .vault import MemoryVault

        client_vault = MemoryVault.generate()
        self._client_key = client_vault.public_key
        self._client_service = CurveTunService(client_vault, Registry(), clock=self.reactor)
        self._client_service.startService()
        if "tls" in self.settings.transports:
            self._tls_dir = os.path.join(self.workdir, "tls")
            os.mkdir(self._tls_dir)
            cert_path, _ = make_certificate(self._tls_dir)
            self._tls_options = _tls_client_options(cert_path)
        if all(figure.in_process for figure in self.settings.figures):
            return
        spawned = [self._spawn(name, profile=True) for name in self.settings.transports]
        for server in spawned:
            server.wait_ready()
            self.peers[server.transport] = Peer(self._connector(server.transport), server)

    def _spawn(self, transport: str, profile: bool = False) -> ServerProcess:
        profile_to = None
        if profile and self.settings.profile is not None:
            profile_to = os.path.join(self.settings.profile, f"server-{transport}.prof")
        server = ServerProcess.spawn(
            transport,
            self._client_key,
            self._tls_dir if transport == "tls" else None,
            profile_to,
            self.server_cpu,
        )
        self.servers.append(server)
        return server

    def _connector(self, transport: str) -> Connector:
        return Connector(self.reactor, transport, self._client_service, self._tls_options)

    def stop(self) -> None:
        """
        Stop every server process and the client's curvetun service.
        """
        for server in self.servers:
            server.stop()
        self.servers.clear()
        if self._client_service is not None and self._client_service.running:
            self._client_service.stopService()

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
            seconds = await _with_timeout(
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
            server = self._spawn(column).wait_ready()
            try:
                peer = Peer(self._connector(column), server)
                return await _with_timeout(
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
        seconds = await _with_timeout(
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
        started = _perf_counter()
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
            self.report.seconds = _perf_counter() - started


# -- output ---------------------------------------------------------------------------


def format_number(value: float) -> str:
    """
    A figure's value with a sensible number of digits: three significant
    ones, with k and M for thousands and millions from 10 000 up.
    """
    if value >= 1e6:
        return f"{value / 1e6:.3g}M"
    if value >= 1e4:
        return f"{value / 1e3:.3g}k"
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def format_summary(summary: Summary | None) -> str:
    """
    C{"median (min-max)"}, or C{"n/a"}.
    """
    if summary is None:
        return "n/a"
    if len(summary.runs) == 1:
        return format_number(summary.median)
    return (
        f"{format_number(summary.median)}"
        f" ({format_number(summary.low)}-{format_number(summary.high)})"
    )


def _render(rows: list[list[str]], left: int = 2) -> list[str]:
    """
    Align C{rows} in columns: the first C{left} left-aligned, the rest
    right-aligned.
    """
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.ljust(width) if i < left else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def format_report(report: Report) -> str:
    """
    The human-readable report: the transport table, the crypto ceiling,
    and the targets.
    """
    env = report.environment
    lines = [
        f"curvetun benchmark: 127.0.0.1, server and client in separate processes,"
        f" {report.runs} run{'s' if report.runs != 1 else ''} interleaved"
        + (" (--quick: smoke run, not a measurement)" if report.quick else ""),
        f"curvetun {env.get('curvetun', '')}; {env.get('python', '')};"
        f" Twisted {env.get('twisted', '')}; PyNaCl {env.get('pynacl', '')};"
        f" {env.get('cpus', '')} CPUs, load {env.get('load', '?')} at start; {env.get('date', '')}",
        f"processes: {env.get('pin', 'not pinned')}",
    ]
    if report.tls:
        lines.append(f"TLS: {report.tls}, {report.environment.get('openssl', '')}")
    for reason in report.skipped.values():
        lines.append(reason)
    lines.append("values: median (min-max) of the runs; ratios: of the medians")
    network = [f for f in report.figures if not f.in_process]
    crypto = [f for f in report.figures if f.in_process]
    if network:
        ratios = [
            t for t in ("tcp", "tls") if t in report.transports and "curvetun" in report.transports
        ]
        header = ["figure", "unit", *report.transports, *(f"curvetun/{t}" for t in ratios)]
        rows = [header]
        for figure in network:
            row = [figure.title, figure.unit]
            row += [format_summary(report.summary(figure.key, t)) for t in report.transports]
            for t in ratios:
                ratio = report.ratio(figure.key, t)
                row.append("n/a" if ratio is None else f"{ratio:.2f}")
            rows.append(row)
        lines += ["", *_render(rows)]
        if any(not f.higher_is_better for f in network):
            lines.append("(memory: lower is better; every other figure: higher is better)")
    if crypto:
        rows = [["in-process crypto ceiling (PyNaCl)", "unit", "value"]]
        for figure in crypto:
            rows.append(
                [
                    figure.title,
                    figure.unit,
                    format_summary(report.summary(figure.key, CRYPTO_COLUMN)),
                ]
            )
        lines += ["", *_render(rows)]
    targets = [r for r in evaluate_targets(report) if r.target.figure in report.samples]
    if targets:
        rows = [["targets", "measured", "verdict"]]
        for result in targets:
            if result.measured is None:
                rows.append([result.target.label, "-", "not measured"])
            else:
                rows.append(
                    [
                        result.target.label,
                        f"{result.measured:.2f}",
                        "met" if result.met else "NOT MET",
                    ]
                )
        lines += ["", *_render(rows, left=1)]
    lines.append("")
    lines.append(f"({report.seconds:.1f} s)")
    return "\n".join(lines) + "\n"


def report_json(report: Report) -> dict[str, Any]:
    """
    The report for machines (C{--json}).
    """
    figures = []
    for figure in report.figures:
        results: dict[str, Any] = {}
        columns = [CRYPTO_COLUMN] if figure.in_process else list(report.transports)
        for column in columns:
            summary = report.summary(figure.key, column)
            results[column] = (
                None
                if summary is None
                else {
                    "median": summary.median,
                    "min": summary.low,
                    "max": summary.high,
                    "runs": list(summary.runs),
                }
            )
        ratios = {}
        if not figure.in_process and "curvetun" in report.transports:
            for other in ("tcp", "tls"):
                if other in report.transports:
                    ratios[f"curvetun/{other}"] = report.ratio(figure.key, other)
        figures.append(
            {
                "key": figure.key,
                "title": figure.title,
                "unit": figure.unit,
                "higher_is_better": figure.higher_is_better,
                "results": results,
                "ratios": ratios,
            }
        )
    return {
        "runs": report.runs,
        "quick": report.quick,
        "argv": report.argv,
        "environment": report.environment,
        "transports": list(report.transports),
        "skipped": report.skipped,
        "tls": report.tls,
        "seconds": report.seconds,
        "figures": figures,
        "crypto_ceiling_100": report.crypto_ceiling_100(),
        "targets": [
            {
                "label": result.target.label,
                "figure": result.target.figure,
                "reference": result.target.reference or None,
                "goal": result.target.goal,
                "at_most": result.target.at_most,
                "measured": result.measured,
                "met": result.met,
            }
            for result in evaluate_targets(report)
        ],
    }


def environment() -> dict[str, str]:
    """
    What the figures were measured with.
    """
    import nacl

    import twisted

    from . import __version__

    info = {
        "curvetun": __version__ + _checkout_revision(),
        "python": f"Python {platform.python_version()}",
        "twisted": twisted.__version__,
        "pynacl": nacl.__version__,
        "platform": platform.platform(),
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


def _checkout_revision() -> str:
    """
    C{" (git abc1234)"}, with C{"+changes"} if the tree differs from that
    commit, when curvetun runs from a git checkout; else C{""}.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isdir(os.path.join(root, ".git")):
        return ""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return f" (git {commit}{'+changes' if changed else ''})" if commit else ""


# -- the command line -------------------------------------------------------------------


def _comma_list(choices: Sequence[str], what: str, option: str) -> Callable[[str], tuple[str, ...]]:
    """
    A parser of C{--option}'s comma-separated list of C{choices}.
    """

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(name.strip() for name in text.split(",") if name.strip())
        unknown = [name for name in names if name not in choices]
        if unknown or not names:
            raise usage.UsageError(
                f"--{option}: unknown {what} {', '.join(unknown) or '(none given)'}"
                f" (choose from {','.join(choices)})"
            )
        return names

    return parse


def _positive(kind: Callable[[str], float], option: str) -> Callable[[str], float]:
    """
    A parser of C{--option}'s number (an C{int} or C{float}, by C{kind}),
    more than 0.
    """

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise usage.UsageError(f"--{option}: not a number: {text!r}") from None
        if not value > 0:
            raise usage.UsageError(f"--{option}: must be positive: {text!r}")
        return value

    return parse


def _choice(choices: Sequence[str], option: str) -> Callable[[str], str]:
    """
    A parser of C{--option}'s value, one of C{choices}.
    """

    def parse(text: str) -> str:
        if text not in choices:
            raise usage.UsageError(
                f"--{option}: invalid choice: {text!r} (choose from {', '.join(choices)})"
            )
        return text

    return parse


def _integer(option: str) -> Callable[[str], int]:
    """
    A parser of C{--option}'s whole number.
    """

    def parse(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise usage.UsageError(f"--{option}: invalid int value: {text!r}") from None

    return parse


_SERVER_PARAMETERS: list[list[Any]] = [
    # The server process's options (internal: see ServerProcess.spawn), left
    # out of --help by BenchOptions.getUsage:
    #   --serve TRANSPORT   be the server process for TRANSPORT
    #   --client-key HEX    the benchmark client's curvetun public key
    #   --tls-dir DIR       where the TLS certificate and key are
    #   --profile-to FILE   write the server's cProfile data into FILE
    #   --cpu N             pin the server process to CPU N
    ["serve", None, None, None, _choice(TRANSPORTS, "serve")],
    ["client-key", None, None, None],
    ["tls-dir", None, None, None],
    ["profile-to", None, None, None],
    ["cpu", None, None, None, _integer("cpu")],
]


class BenchOptions(usage.Options):
    """
    The command line of C{curvetun bench} (and of C{python -m
    curvetun.bench}).

    After L{parseOptions}, C{self["only"]} and C{self["transports"]} are
    tuples of names, C{self["runs"]}, C{self["duration"]} and
    C{self["connections"]} are numbers or C{None} (the default for
    C{--quick} or not: see L{settings_from}).
    """

    synopsis = "Usage: curvetun bench [options]"
    longdesc = (
        "Measure curvetun beside plain TCP and TLS 1.3 (Twisted) on 127.0.0.1,"
        " server and client in separate processes. See docs/performance.md."
        " Exit status: 0 on success, 1 when the benchmark failed, 2 for a"
        " wrong command line."
    )

    optFlags = [
        ["quick", None, "A smoke run of a few seconds."],
        ["json", None, "Write JSON to stdout instead of the table."],
    ]
    optParameters = [
        ["runs", None, None, "Runs per figure (default 5; --quick: 1).", _positive(int, "runs")],
        [
            "only",
            None,
            None,
            f"FIGURES: measure only these figure groups ({','.join(GROUPS)}) or single"
            " figures (their JSON keys, such as pipelined_message), comma-separated"
            " (default: all).",
            _comma_list(
                tuple(dict.fromkeys(GROUPS + tuple(FIGURES_BY_KEY))), "figure group", "only"
            ),
        ],
        [
            "transports",
            None,
            None,
            "LIST: the transports to measure (default tcp,tls,curvetun).",
            _comma_list(TRANSPORTS, "transport", "transports"),
        ],
        [
            "duration",
            None,
            None,
            "Seconds each timed measurement aims to take (default 1; --quick: 0.03).",
            _positive(float, "duration"),
        ],
        [
            "connections",
            None,
            None,
            "Idle connections for the memory figure, opened after as many others"
            " (default 1000; --quick: 200).",
            _positive(int, "connections"),
        ],
        [
            "profile",
            None,
            None,
            "DIR: write cProfile data of the client (client.prof) and of each server"
            " (server-TRANSPORT.prof) into DIR.",
        ],
        [
            "pin",
            None,
            "none",
            "Pin the processes to CPUs: none, same (client and servers on one CPU),"
            " split (client on one, servers on another).",
            _choice(PINNINGS, "pin"),
        ],
        *_SERVER_PARAMETERS,
    ]

    def opt_version(self) -> NoReturn:
        """
        Display curvetun's version and exit.
        """
        print(f"curvetun {__version__}")
        sys.exit(0)

    opt_h = usage.Options.opt_help

    def parseArgs(self, *arguments: str) -> None:
        if arguments:
            raise usage.UsageError(f"unrecognized arguments: {' '.join(arguments)}")

    def postOptions(self) -> None:
        if self["only"] is None:
            self["only"] = GROUPS
        if self["transports"] is None:
            self["transports"] = TRANSPORTS
        if self["serve"] is not None and self["client-key"] is None:
            raise usage.UsageError("--serve needs --client-key")

    def getUsage(self, width: int | None = None) -> str:
        # usage.Options lists every option it parses: hide the server
        # process's while it writes the help.
        hidden = {parameter[0] for parameter in _SERVER_PARAMETERS}
        everything = self.longOpt
        self.longOpt = [name for name in everything if name.rstrip("=") not in hidden]
        try:
            return super().getUsage(width)
        finally:
            self.longOpt = everything


def settings_from(options: BenchOptions) -> Settings:
    """
    The settings the parsed command line asks for.
    """
    quick = bool(options["quick"])
    defaults = QUICK if quick else NORMAL
    only = options["only"]
    figures = tuple(f for f in FIGURES if f.group in only or f.key in only)
    return Settings(
        runs=int(options["runs"] or defaults["runs"]),
        duration=float(options["duration"] or defaults["duration"]),
        connections=int(options["connections"] or defaults["connections"]),
        quick=quick,
        transports=tuple(t for t in TRANSPORTS if t in options["transports"]),
        figures=figures,
        profile=options["profile"],
        pin=options["pin"],
    )


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
    _raise_file_limit()
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
    if not outcome:
        sys.stderr.write("curvetun bench: interrupted\n")
        return 1
    if isinstance(outcome[0], Failure):
        failure = outcome[0]
        if not failure.check(BenchError):
            failure.printTraceback(sys.stderr)
        sys.stderr.write(f"curvetun bench: error: {failure.getErrorMessage()}\n")
        return 1
    if as_json:
        json.dump(report_json(report), out, indent=2)
        out.write("\n")
    else:
        out.write(format_report(report))
    out.flush()
    return 0


def main(argv: list[str]) -> int:
    """
    C{curvetun bench}: run the benchmark (or, with the internal
    C{--serve}, be one of its server processes).

    @param argv: the arguments after the command name.
    @return: the exit status: 0 done, 1 failed, 2 bad command line.
    """
    options = BenchOptions()
    try:
        options.parseOptions(argv)
    except usage.UsageError as error:
        # One line, always, as curvetun's other commands say it.
        message = " ".join(str(error).splitlines())
        sys.stderr.write(f"curvetun bench: error: {message} (see 'curvetun bench --help')\n")
        return 2
    except SystemExit as exit:
        # --help and --version print, then exit.
        return exit.code if isinstance(exit.code, int) else 0
    if options["serve"] is not None:
        return serve(
            options["serve"],
            bytes.fromhex(options["client-key"]),
            options["tls-dir"],
            options["profile-to"],
            options["cpu"],
        )
    _log_warnings_only()
    return run_benchmark(settings_from(options), argv, sys.stdout, bool(options["json"]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
