"""
The server process (C{python -m curvetun.bench --serve TRANSPORT}, started
by the benchmark) and its handle in the parent, L{ServerProcess}.

It listens on 127.0.0.1, port 0, and reports its ports on one stdout line.
The server code is the same for every transport; only its endpoint
differs:

  - C{echo}: writes back what it receives (ping-pong, handshakes, idle
    connections for the memory figure);
  - C{sink}: reads an 8-byte count, answers C{R}, counts that many bytes
    and answers C{D} (bulk and pipelined writes);
  - C{control} (always plain TCP): answers C{rss} with the server's
    resident memory and its number of open echo connections.

The tunnel benchmark uses a plain-TCP server process as the backend
behind every tunnel.
"""

from __future__ import annotations

import cProfile
import gc
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from typing import Any, cast

import attrs
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress, IListeningPort, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from .figures import LOCALHOST, READY_LINE, BenchError
from .transports import ServerIdentity, server_endpoint


def set_no_delay(transport: object) -> None:
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
        set_no_delay(self.transport)
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
        set_no_delay(self.transport)

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


def raise_file_limit() -> None:
    """
    Raise the soft limit on open files to the hard limit: the memory
    figure holds a thousand connections and more.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def log_warnings_only() -> None:
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


def serve(
    transport: str,
    identity: ServerIdentity,
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
    raise_file_limit()
    log_warnings_only()
    endpoint, server_key = server_endpoint(reactor, transport, identity)
    echo = _EchoFactory()
    listening: list[Deferred[IListeningPort]] = [
        endpoint.listen(echo),
        endpoint.listen(Factory.forProtocol(_SinkServer)),
        TCP4ServerEndpoint(reactor, 0, interface=LOCALHOST).listen(
            Factory.forProtocol(lambda: _ControlServer(echo))
        ),
    ]
    failures: list[Failure] = []

    def announce(ports: list[IListeningPort]) -> None:
        echo_port, sink_port, control_port = (cast(Any, port.getHost()).port for port in ports)
        sys.stdout.write(
            f"{READY_LINE} echo={echo_port} sink={sink_port} control={control_port}"
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


def child_environment() -> dict[str, str]:
    """
    The environment of a child process that imports this very curvetun,
    installed or not.
    """
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [package_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    return env


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
        identity: ServerIdentity,
        profile_to: str | None = None,
        cpu: int | None = None,
    ) -> ServerProcess:
        """
        Start a server process; call L{wait_ready} before using it.
        """
        command = [sys.executable, "-m", "curvetun.bench", "--serve", transport]
        arguments = {
            "--client-key": identity.client_key.hex() or None,
            "--tls-dir": identity.tls_dir,
            "--keydir": identity.keydir,
            "--registry": identity.registry,
            "--profile-to": profile_to,
            "--cpu": None if cpu is None else str(cpu),
        }
        for option, value in arguments.items():
            if value is not None:
                command += [option, value]
        process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=child_environment()
        )
        return cls(transport, process)

    def wait_ready(self) -> ServerProcess:
        """
        Read the server's ports from its first line.

        @raise BenchError: the server exited or wrote something else.
        """
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode("ascii", "replace").split()
        if not line or line[0] != READY_LINE:
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
