"""
The safe-nonce counter survives crashes: a process that hands out nonces
from a key directory is killed with SIGKILL at random points, again and
again, and no counter value is ever handed out twice.

Each run is a real process (C{tests/_nonce_worker.py}) with a real
L{FileVault}: it takes the directory's lock, stores the counter ahead of
use as the spec says, and writes every nonce it makes. The test reads the
raw nonces, unscrambles each with the directory's nonce key (64-bit TEA
decryption) to find its counter, and checks them across all runs.

The counter files are written by hand, a few hundred nonces below a
multiple of 2**20, so that kills land before, during and after the write
the vault makes at that step; other kills land while the process starts,
loads the directory or makes its first nonce (whose counter it stores
too), or at a random count.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import attrs
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from curvetun.keydir import INSTANCE_SPACE
from curvetun.vault import COUNTER_STEP, FileVault

from ._support import counter_file, counter_of

WORKER = Path(__file__).resolve().parent / "_nonce_worker.py"
ROOT = Path(__file__).resolve().parent.parent

KEYDIRS = 6
RUNS_PER_KEYDIR = 5
LINE = 33  # 32 hex digits and a newline
PLANS = ["around the step", "while starting", "around the step", "while starting", "at random"]
"""How each run of a key directory is killed, in turn."""
RUN_DEADLINE = 5.0
"""A run that has not made its nonces after this many seconds is killed anyway."""


@attrs.frozen
class Run:
    """
    One process: how it was to be killed, how it ended, and the counters
    of the nonces it wrote.
    """

    keydir: int
    plan: str
    returncode: int
    stderr: str
    counters: list[int]


def start_worker(
    keydir: FilePath[str], output: Path, instance: int | None = None
) -> subprocess.Popen[bytes]:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    extra = [] if instance is None else [str(instance)]
    with output.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, str(WORKER), keydir.path, *extra],
            stdout=out,
            stderr=subprocess.PIPE,
            env=env,
        )


def written(output: Path) -> int:
    """
    How many whole nonces the worker has written so far.
    """
    return output.stat().st_size // LINE


def kill_when(
    process: subprocess.Popen[bytes], output: Path, nonces: int | None, delay: float
) -> None:
    """
    SIGKILL C{process} once it has written C{nonces} nonces (if given) and
    C{delay} seconds have passed since it was started.
    """
    started = time.monotonic()
    while process.poll() is None and time.monotonic() - started < RUN_DEADLINE:
        if time.monotonic() - started >= delay and (nonces is None or written(output) >= nonces):
            break
        time.sleep(0.0005)
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)


def read_counters(output: Path, nonce_key: bytes) -> list[int]:
    """
    The counters of the whole nonce lines in C{output}. A last line cut
    short by the kill is ignored: its nonce was never written whole.
    """
    counters = []
    for line in output.read_bytes().split(b"\n"):
        if len(line) == 2 * 16:
            counters.append(counter_of(bytes.fromhex(line.decode("ascii")), nonce_key))
    return counters


class KilledWorkers(SynchronousTestCase):
    """
    Key directories for worker processes, and when to kill each run.
    """

    def make_keydir(self, below_step: int) -> tuple[FilePath[str], bytes]:
        keydir = FilePath(self.mktemp())
        FileVault.create(keydir).close()
        # As if the counter had been running for a while, just short of a step.
        counter_file(keydir).setContent(b"%d\n" % (COUNTER_STEP - below_step))
        nonce_key = bytes.fromhex(keydir.child("nonce.key").getContent().decode("ascii"))
        return keydir, nonce_key

    def plan(self, rng: random.Random, run: int, below_step: int) -> tuple[str, int | None, float]:
        """
        When to kill a run: C{(description, nonces, delay)}.
        """
        kind = PLANS[run % len(PLANS)]
        if kind == "around the step":
            nonces = max(0, below_step + rng.randint(-40, 40))
            return f"{kind}: after {nonces} nonces", nonces, 0.0
        if kind == "while starting":
            delay = rng.uniform(0.0, 0.6)
            return f"{kind}: {delay:.3f} s after the start", None, delay
        nonces = rng.randint(0, 3000)
        return f"{kind}: after {nonces} nonces", nonces, 0.0


class CrashSafetyTests(KilledWorkers):
    """
    However a process using a key directory dies, the next one never hands
    out a counter value that any earlier one did.
    """

    def test_no_counter_is_handed_out_twice_across_kills(self) -> None:
        seed = random.randrange(2**32)
        rng = random.Random(seed)
        started = time.monotonic()
        runs: list[Run] = []
        first_counters: list[int] = []
        for index in range(KEYDIRS):
            below_step = rng.randint(100, 1500)
            keydir, nonce_key = self.make_keydir(below_step)
            first_counters.append(COUNTER_STEP - below_step)
            for attempt in range(RUNS_PER_KEYDIR):
                description, nonces, delay = self.plan(rng, attempt, below_step)
                output = Path(self.mktemp())
                process = start_worker(keydir, output)
                kill_when(process, output, nonces, delay)
                _, stderr = process.communicate()
                runs.append(
                    Run(
                        index,
                        description,
                        process.returncode,
                        stderr.decode("utf-8", "replace"),
                        read_counters(output, nonce_key),
                    )
                )
        elapsed = time.monotonic() - started
        context = f"(seed {seed}, {len(runs)} runs in {elapsed:.1f} s)"

        for run in runs:
            # Every run was killed by us: none failed to load the directory
            # (a damaged counter file, a lock left behind).
            self.assertEqual(
                (run.returncode, run.stderr), (-signal.SIGKILL, ""), f"{run} {context}"
            )
            # The nonces unscrambled to consecutive counters: the check
            # below is about real counter values.
            if run.counters:
                start = run.counters[0]
                consecutive = list(range(start, start + len(run.counters)))
                self.assertEqual(run.counters, consecutive, f"{run.plan} {context}")

        for index in range(KEYDIRS):
            mine = [run for run in runs if run.keydir == index]
            # The first run (killed only after dozens of nonces) started from
            # the counter written by hand: the workers used these directories.
            self.assertEqual(mine[0].counters[:1], [first_counters[index]], context)
            handed_out = [c for run in mine for c in run.counters]
            self.assertEqual(
                len(handed_out), len(set(handed_out)), f"a counter was repeated {context}"
            )
            # Stronger: each run starts after everything before it.
            self.assertEqual(handed_out, sorted(handed_out), context)

        # The kills did exercise the stored step: some runs made nonces on
        # both sides of a multiple of 2**20.
        crossed = [
            run
            for run in runs
            if run.counters and run.counters[0] // COUNTER_STEP != run.counters[-1] // COUNTER_STEP
        ]
        self.assertGreater(len(crossed), 0, context)
        self.assertGreater(sum(1 for run in runs if run.counters), len(runs) // 2, context)


INSTANCES = (0, 1)
RUNS_PER_INSTANCE = 6


class FleetCrashSafetyTests(KilledWorkers):
    """
    One key directory copied to two hosts (two copies here), each started
    with its own instance ID and killed again and again: no nonce of one
    is ever a nonce of the other, or one of its own earlier runs.
    """

    def test_copies_of_one_key_directory_never_hand_out_a_nonce_twice(self) -> None:
        seed = random.randrange(2**32)
        rng = random.Random(seed)
        below_step = rng.randint(100, 1500)
        original, nonce_key = self.make_keydir(below_step)
        copies = {}
        for instance in INSTANCES:
            copies[instance] = FilePath(self.mktemp())
            shutil.copytree(original.path, copies[instance].path)
        runs: dict[int, list[Run]] = {instance: [] for instance in INSTANCES}
        # Interleaved, as hosts run side by side.
        for attempt in range(RUNS_PER_INSTANCE):
            for instance, copy in copies.items():
                description, nonces, delay = self.plan(rng, attempt, below_step)
                output = Path(self.mktemp())
                process = start_worker(copy, output, instance)
                kill_when(process, output, nonces, delay)
                _, stderr = process.communicate()
                runs[instance].append(
                    Run(
                        instance,
                        description,
                        process.returncode,
                        stderr.decode("utf-8", "replace"),
                        read_counters(output, nonce_key),
                    )
                )
        context = f"(seed {seed})"
        everything: list[int] = []
        for instance in INSTANCES:
            handed_out = [c for run in runs[instance] for c in run.counters]
            for run in runs[instance]:
                self.assertEqual(
                    (run.returncode, run.stderr), (-signal.SIGKILL, ""), f"{run} {context}"
                )
            # Each instance counts in its own part of the counter space,
            # from the copied counter on, and never back.
            self.assertTrue(handed_out, context)
            self.assertEqual({c // INSTANCE_SPACE for c in handed_out}, {instance}, context)
            self.assertEqual(handed_out[0] % INSTANCE_SPACE, COUNTER_STEP - below_step, context)
            self.assertEqual(handed_out, sorted(handed_out), context)
            everything += handed_out
        self.assertEqual(len(everything), len(set(everything)), f"a nonce repeated {context}")
