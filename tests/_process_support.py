"""
Fixtures for the tests that run real vault, worker and supervisor
processes: starting them from this source tree, waiting for them, and
searching a process's memory for bytes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from curvetun.vault import FileVault

ROOT = Path(__file__).resolve().parent.parent
HAMMER = Path(__file__).resolve().parent / "_vault_hammer.py"
HELLO_CLIENT = Path(__file__).resolve().parent / "_hello_client.py"


def child_environment() -> dict[str, str]:
    """
    The environment of a child process: this source tree first on its path.
    """
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path}


def make_keydir(testcase: SynchronousTestCase) -> tuple[str, bytes, bytes, bytes]:
    """
    A new key directory; its path, public key, secret key and nonce key
    (the test reads them to check what the processes under test do).
    """
    keydir = os.path.abspath(testcase.mktemp())
    vault = FileVault.create(keydir)
    vault.close()
    secret = bytes.fromhex(Path(keydir, "secret.key").read_text().strip())
    nonce_key = bytes.fromhex(Path(keydir, "nonce.key").read_text().strip())
    return keydir, vault.public_key, secret, nonce_key


def socket_path(testcase: SynchronousTestCase) -> str:
    """
    A path for a vault socket, in a fresh directory that only we may enter.
    UNIX socket paths are short (108 bytes): a temporary directory of its
    own, not the test's deep one.
    """
    import tempfile

    directory = tempfile.mkdtemp(prefix="ctv-")
    testcase.addCleanup(_remove_tree, directory)
    return os.path.join(directory, "vault.sock")


def _remove_tree(directory: str) -> None:
    import shutil

    shutil.rmtree(directory, ignore_errors=True)


class Child:
    """
    A child process whose standard error goes to a file, stopped (SIGKILL)
    at the end of the test if it is still running.
    """

    def __init__(
        self,
        testcase: SynchronousTestCase,
        argv: list[str],
        name: str,
        environ: dict[str, str] | None = None,
    ) -> None:
        self.stderr_path = Path(testcase.mktemp() + f".{name}.stderr")
        self.stdout_path = Path(str(self.stderr_path)[: -len(".stderr")] + ".stdout")
        with self.stderr_path.open("wb") as err, self.stdout_path.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, *argv],
                stdout=out,
                stderr=err,
                env={**child_environment(), **(environ or {})},
            )
        testcase.addCleanup(self.kill)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text("utf-8", "replace")

    def stdout(self) -> bytes:
        return self.stdout_path.read_bytes()

    def signal(self, number: int) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, number)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def wait(self, timeout: float = 30.0) -> int:
        return self.process.wait(timeout)


def start_vault(testcase: SynchronousTestCase, keydir: str, socket: str) -> Child:
    """
    Start C{python -m curvetun.vault_process} and wait until its socket
    accepts connections.
    """
    vault = Child(
        testcase, ["-m", "curvetun.vault_process", "--keydir", keydir, "--socket", socket], "vault"
    )
    wait_for(lambda: accepts(socket) or vault.process.poll() is not None)
    if vault.process.poll() is not None:
        raise AssertionError(f"the vault did not start: {vault.stderr()}")
    return vault


def accepts(path: str) -> bool:
    """
    Does the UNIX socket at C{path} accept a connection? (Its file exists
    from the bind on, a moment before it listens.)
    """
    import socket

    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def wait_for(condition: object, timeout: float = 20.0) -> None:
    """
    Poll C{condition()} (a callable) until it is true.
    """
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.01)


def memory_holds(pid: int, needle: bytes) -> bool:
    """
    Does the memory of process C{pid} hold C{needle} anywhere it can be
    read? Reads every readable mapping of C{/proc/PID/maps} through
    C{/proc/PID/mem} (needs root, or ptrace rights over the process).
    """
    found = False
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            start, end = (int(part, 16) for part in fields[0].split("-"))
            if not fields[1].startswith("r"):
                continue
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except (OSError, OverflowError, ValueError):
                continue  # [vvar] and other mappings the kernel will not hand out
            if needle in data:
                found = True
                break
    return found


def stop(child: Child, timeout: float = 30.0) -> int:
    """
    SIGTERM C{child} and wait for it to exit.
    """
    child.signal(signal.SIGTERM)
    return child.wait(timeout)
