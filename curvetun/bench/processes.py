"""
Watching and ending other processes from outside, through C{/proc}: their
CPU time (of one process, or of a process and all its descendants),
resident memory and listening ports; and L{Children}, which starts
processes and makes sure every one of them ends with the benchmark.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable

from .figures import LOCALHOST

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def cpu_seconds(pid: int) -> float:
    """
    The CPU time (user and system, all threads) process C{pid} has used,
    from fields 14 and 15 of C{/proc/PID/stat}.
    """
    with open(f"/proc/{pid}/stat") as stat:
        text = stat.read()
    # The command name (field 2) is in parentheses and may hold spaces.
    fields = text[text.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _TICKS


def run_queue_seconds(pid: int) -> float:
    """
    The seconds process C{pid}'s threads have spent so far ready to run
    but waiting for a CPU (the second field of each
    C{/proc/PID/task/TID/schedstat}): how much a busy machine held it
    back.
    """
    waited = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as schedstat:
                waited += int(schedstat.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return waited / 1e9


def _parent_pids() -> dict[int, int]:
    """
    Every living process's parent, from field 4 of each C{/proc/PID/stat}.
    """
    parents = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as stat:
                text = stat.read()
        except OSError:
            # It ended while we looked.
            continue
        parents[int(name)] = int(text[text.rindex(")") + 2 :].split()[1])
    return parents


def process_tree(pid: int) -> list[int]:
    """
    Process C{pid} and all its living descendants (children, their
    children...), C{pid} first.
    """
    children: dict[int, list[int]] = {}
    for child, parent in _parent_pids().items():
        children.setdefault(parent, []).append(child)
    tree = [pid]
    for member in tree:
        tree.extend(sorted(children.get(member, ())))
    return tree


def tree_cpu(pid: int) -> dict[int, float]:
    """
    The CPU seconds used so far by process C{pid} and by each of its
    living descendants, by process id (a process's own time only: what
    its children used is theirs).
    """
    used = {}
    for member in process_tree(pid):
        try:
            used[member] = cpu_seconds(member)
        except OSError:
            continue
    return used


def tree_run_queue(pid: int) -> dict[int, float]:
    """
    L{run_queue_seconds} of process C{pid} and of each of its living
    descendants, by process id.
    """
    waited = {}
    for member in process_tree(pid):
        try:
            waited[member] = run_queue_seconds(member)
        except OSError:
            continue
    return waited


def cpu_between(before: dict[int, float], after: dict[int, float]) -> float:
    """
    The CPU seconds a process tree used between two L{tree_cpu} readings
    (or the seconds it waited, between two L{tree_run_queue} readings):
    each process's growth, and all of the time of a process that started
    in between (a restarted worker). A process that ended in between is
    lost: the kernel keeps its time only for a parent that waits for it.
    """
    return sum(seconds - before.get(member, 0.0) for member, seconds in after.items())


def resident_bytes(pid: int) -> int:
    """
    Process C{pid}'s resident set size, from C{/proc/PID/statm}.
    """
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE


def listening_ports(pid: int) -> set[int]:
    """
    The TCP ports process C{pid} listens on (IPv4 and IPv6): its socket
    inodes in C{/proc/PID/fd}, matched with the C{LISTEN} lines of
    C{/proc/net/tcp}.
    """
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return set()
    for name in names:
        try:
            target = os.readlink(os.path.join(fd_dir, name))
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as lines:
                next(lines)
                for line in lines:
                    fields = line.split()
                    # st 0A is TCP_LISTEN.
                    if fields[3] == "0A" and fields[9] in inodes:
                        ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        except OSError:
            continue
    return ports


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that nothing listens on right now, for a
    program that cannot listen on port 0 and report the port. (Another
    process may take it before the program binds it: callers retry.)
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOCALHOST, 0))
        port: int = probe.getsockname()[1]
        return port


def _die_with_parent() -> Callable[[], None] | None:
    """
    A C{preexec_fn} that makes the child get SIGTERM when the benchmark
    dies, however it dies (Linux's C{PR_SET_PDEATHSIG}); L{None}
    elsewhere.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    set_parent_death_signal = 1  # PR_SET_PDEATHSIG

    def preexec() -> None:
        libc.prctl(set_parent_death_signal, signal.SIGTERM)

    return preexec


class Children:
    """
    The processes the benchmark started, each in its own session (a
    Ctrl-C in the terminal reaches only the benchmark, which then stops
    them in order), each told to end if the benchmark dies.
    """

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(
        self, command: list[str], log_path: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """
        Start C{command}, its output (stdout and stderr) into
        C{log_path}.
        """
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                # Safe here: the tunnel comparison starts its children
                # before any thread of its own exists (it connects to
                # IP addresses, with no resolver thread).
                preexec_fn=_die_with_parent(),
            )
        self.processes.append(process)
        return process

    def start_piped(
        self, command: list[str], log_path: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """
        Start C{command} with pipes to its stdin and from its stdout (to
        talk to it), its stderr into C{log_path}.
        """
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent(),
            )
        self.processes.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes], timeout: float = 10) -> None:
        """
        End C{process}: SIGTERM, then SIGKILL if it has not exited within
        C{timeout} seconds.
        """
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                pipe.close()
        if process in self.processes:
            self.processes.remove(process)

    def stop_all(self) -> None:
        """
        End every process still running: all are sent SIGTERM at once,
        then each is waited for (and killed if it takes too long).
        """
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in list(self.processes):
            self.stop(process)
