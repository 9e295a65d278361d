"""
A real HAProxy for tests: a configuration written into the test's
temporary directory, C{haproxy -f CFG -db} started on a free port, waited
for until it listens, asked for its servers' states over its stats socket,
and stopped at cleanup.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Sequence

import attrs
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase

from ._support import closed_port, short_socket_dir

HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
"""The haproxy program (Debian puts it in /usr/sbin, often off a user's PATH), or L{None}."""

NO_HAPROXY = (
    None
    if HAPROXY is not None
    else "haproxy is not installed (the Debian package haproxy; .ci/run installs it)"
)
"""A test case's C{skip}: why the tests of a real HAProxy cannot run here, or L{None}."""


SETPRIV = shutil.which("setpriv")


def dying_with_us(argv: list[str]) -> list[str]:
    """
    C{argv}, run so that Linux stops it (SIGTERM) if this process dies
    first (util-linux's C{setpriv --pdeathsig}): a test run that is killed
    leaves no server behind. Where there is no C{setpriv}, C{argv} itself;
    the cleanup still stops the process.
    """
    return [SETPRIV, "--pdeathsig", "TERM", *argv] if SETPRIV is not None else argv


Server = tuple[str, int, str]
"""A backend server: its name, its port on 127.0.0.1, and its options (C{send-proxy check...})."""


def haproxy_config(
    frontend_port: int,
    stats_socket: str,
    servers: Sequence[Server],
    backend_options: Sequence[str] = (),
) -> str:
    """
    An HAProxy configuration: TCP mode, one frontend on 127.0.0.1 at
    C{frontend_port}, balanced round robin over C{servers}, with the lines
    C{backend_options} in the backend (C{option httpchk ...}); the stats
    socket (at C{stats_socket}) answers C{show stat}.
    """
    lines = [
        "global",
        f"    stats socket {stats_socket} mode 600 level admin",
        "defaults",
        "    mode tcp",
        "    timeout connect 2s",
        "    timeout client 30s",
        "    timeout server 30s",
        # A connection refused by a stopped server goes to another one.
        "    retries 2",
        "    option redispatch",
        "frontend curvetun",
        f"    bind 127.0.0.1:{frontend_port}",
        "    default_backend instances",
        "backend instances",
        "    balance roundrobin",
        *(f"    {line}" for line in backend_options),
        *(f"    server {name} 127.0.0.1:{port} {options}" for name, port, options in servers),
    ]
    return "\n".join(lines) + "\n"


@attrs.define
class HAProxy:
    """
    A running HAProxy: C{port} is its frontend's; C{log} the file that
    holds what it writes (its server state changes, with C{-db}).
    """

    process: subprocess.Popen[bytes]
    port: int
    stats_socket: str
    log: str

    def output(self) -> str:
        """
        What HAProxy has written so far.
        """
        with open(self.log, encoding="utf-8", errors="replace") as f:
            return f.read()

    def servers(self) -> dict[str, dict[str, str]]:
        """
        The backend's servers by name, each the row C{show stat} gives for
        it (C{status}: C{UP}, C{DOWN}...; C{check_status}: C{L4OK}...).
        """
        with socket.socket(socket.AF_UNIX) as stats:
            stats.settimeout(5)
            stats.connect(self.stats_socket)
            stats.sendall(b"show stat\n")
            answer = b""
            while chunk := stats.recv(65536):
                answer += chunk
        rows = csv.DictReader(answer.decode("ascii").lstrip("# ").splitlines())
        return {
            row["svname"]: row
            for row in rows
            if row["pxname"] == "instances" and row["svname"] not in ("FRONTEND", "BACKEND")
        }

    def stop(self) -> None:
        """
        Stop HAProxy (SIGTERM stops it at once), killing it if it lingers.
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


async def eventually(
    condition: Callable[[], bool], what: Callable[[], str], timeout: float = 15
) -> None:
    """
    Wait until C{condition()} holds, checking every 50 ms without blocking
    the reactor; fail after C{timeout} seconds with C{what()}.
    """
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"not in {timeout} s: {what()}")
        await deferLater(reactor, 0.05, lambda: None)


async def start_haproxy(
    testcase: SynchronousTestCase, servers: Sequence[Server], backend_options: Sequence[str] = ()
) -> HAProxy:
    """
    Start HAProxy in front of C{servers} (see L{haproxy_config}); it has
    answered on its stats socket, so it listens (it binds every socket
    before it serves any), and it is stopped at the test's cleanup.
    """
    assert HAPROXY is not None, NO_HAPROXY
    directory = os.path.abspath(testcase.mktemp())
    os.makedirs(directory)
    stats_socket = os.path.join(short_socket_dir(testcase), "stats")
    # The free port may be taken before HAProxy binds it: then try another.
    for attempt in range(3):
        prefix = os.path.join(directory, f"haproxy-{attempt}")
        haproxy = await _start(testcase, prefix, stats_socket, servers, backend_options)
        status = haproxy.process.poll()
        if status is None:
            return haproxy
        if "cannot bind" not in haproxy.output():
            break
    raise AssertionError(f"haproxy exited with status {status}: {haproxy.output()}")


async def _start(
    testcase: SynchronousTestCase,
    prefix: str,
    stats_socket: str,
    servers: Sequence[Server],
    backend_options: Sequence[str],
) -> HAProxy:
    """
    Start HAProxy with its configuration in C{PREFIX.cfg}, its output in
    C{PREFIX.log}; wait until it answers, or exits.
    """
    assert HAPROXY is not None, NO_HAPROXY
    port = closed_port()
    config, log = prefix + ".cfg", prefix + ".log"
    with open(config, "w") as f:
        f.write(haproxy_config(port, stats_socket, servers, backend_options))
    with open(log, "wb") as output:
        process = subprocess.Popen(
            dying_with_us([HAPROXY, "-f", config, "-db"]),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    haproxy = HAProxy(process, port, stats_socket, log)
    testcase.addCleanup(haproxy.stop)
    await eventually(
        lambda: process.poll() is not None or _answers(stats_socket),
        lambda: f"haproxy did not start: {haproxy.output()}",
    )
    return haproxy


def _answers(stats_socket: str) -> bool:
    """
    Whether a stats socket accepts a connection.
    """
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(stats_socket)
        except OSError:
            return False
    return True
