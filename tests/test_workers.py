"""
The supervisor of worker processes, on real processes and sockets: the
workers accept on the sockets it binds, a worker that dies is started
again, SIGTERM drains every worker before the vault stops, SIGHUP reaches
every worker, and a vault that cannot start stops the supervisor.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import time

from twisted.internet import reactor
from twisted.internet.endpoints import clientFromString
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.python.filepath import FilePath
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from curvetun.config import TunnelConfig
from curvetun.keys import format_public_key
from curvetun.metrics import Figures
from curvetun.tap import Options
from curvetun.vault import FileVault
from curvetun.workers import Backoff, Supervisor

from ._process_support import HELLO_CLIENT, Child, make_keydir, memory_holds, stop, wait_for
from ._support import Collector, KeyDirs, counter_of, round_trip


class BackoffTests(SynchronousTestCase):
    """
    A process that keeps dying waits longer each time, up to a limit, and
    one that ran for a while starts over from the shortest wait.
    """

    def test_the_delay_doubles_up_to_the_maximum(self) -> None:
        backoff = Backoff(initial=0.5, maximum=30.0, reset_after=60.0)
        delays = [backoff.delay_after(uptime=1.0) for _ in range(9)]
        self.assertEqual(delays, [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0])

    def test_a_minute_of_uptime_resets_the_delay(self) -> None:
        backoff = Backoff(initial=0.5, maximum=30.0, reset_after=60.0)
        for _ in range(5):
            backoff.delay_after(uptime=1.0)
        self.assertEqual(backoff.delay_after(uptime=60.0), 0.5)
        self.assertEqual(backoff.delay_after(uptime=59.0), 1.0)


def start_supervisor_process(
    testcase: SynchronousTestCase,
    keydir: str,
    workers: int = 2,
    grace: float = 5.0,
    extra: tuple[str, ...] = (),
    listen: str = "tcp:0:interface=127.0.0.1",
    environ: dict[str, str] | None = None,
) -> Child:
    """
    Start C{python -m curvetun.workers} echoing on a free port on
    127.0.0.1, and return at once.
    """
    return Child(
        testcase,
        [
            "-m",
            "curvetun.workers",
            "--keydir",
            keydir,
            "--workers",
            str(workers),
            "--grace",
            str(grace),
            "--listen",
            listen,
            *extra,
        ],
        "supervisor",
        environ,
    )


def start_supervisor(
    testcase: SynchronousTestCase,
    keydir: str,
    workers: int = 2,
    grace: float = 5.0,
    extra: tuple[str, ...] = (),
    listen: str = "tcp:0:interface=127.0.0.1",
) -> tuple[Child, int]:
    """
    Start C{python -m curvetun.workers} echoing on a free port on
    127.0.0.1; wait until every worker is ready. Return it and the port.
    """
    supervisor = start_supervisor_process(testcase, keydir, workers, grace, extra, listen)
    wait_for(lambda: ready_count(supervisor) >= workers or supervisor.process.poll() is not None)
    match = re.search(r"\(127\.0\.0\.1:(\d+)\) in \d+ worker", supervisor.stderr())
    assert match is not None, supervisor.stderr()
    return supervisor, int(match.group(1))


def ready_count(supervisor: Child) -> int:
    """
    How many workers have said they are ready, so far.
    """
    return len(re.findall(r"worker \d+ \(pid \d+\) is ready", supervisor.stderr()))


def worker_pids(log: str) -> dict[str, list[int]]:
    """
    Each worker's pids, in the order they were started.
    """
    pids: dict[str, list[int]] = {}
    for name, pid in re.findall(r"(worker \d+) started \(pid (\d+)\)", log):
        pids.setdefault(name, []).append(int(pid))
    return pids


def echo(port: int, data: bytes = b"ping") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(data)
        received = b""
        while len(received) < len(data) and (chunk := connection.recv(4096)):
            received += chunk
        return received


class SupervisorTests(SynchronousTestCase):
    """
    The supervisor's workers serve on its sockets and are kept running.
    """

    def test_workers_serve_on_the_supervisors_socket(self) -> None:
        keydir, _, _, _ = make_keydir(self)
        supervisor, port = start_supervisor(self, keydir)
        self.assertEqual(
            [echo(port, b"x%d" % n) for n in range(20)], [b"x%d" % n for n in range(20)]
        )
        self.assertEqual(sorted(worker_pids(supervisor.stderr())), ["worker 1", "worker 2"])
        self.assertEqual(stop(supervisor), 0)

    def test_a_killed_worker_is_started_again(self) -> None:
        keydir, _, _, _ = make_keydir(self)
        supervisor, port = start_supervisor(self, keydir)
        first = worker_pids(supervisor.stderr())["worker 1"][0]
        signal_pid(first, signal.SIGKILL)
        wait_for(lambda: len(worker_pids(supervisor.stderr())["worker 1"]) == 2)
        log = supervisor.stderr()
        self.assertIn(f"worker 1 (pid {first}) was killed by SIGKILL", log)
        self.assertIn("starting it again in 0.5 s", log)
        second = worker_pids(log)["worker 1"][1]
        self.assertNotEqual(second, first)
        wait_for(lambda: supervisor.stderr().count("): echo") >= 3)
        # Serving meanwhile, and after: the other worker and the new one.
        self.assertEqual(echo(port), b"ping")
        signal_pid(worker_pids(supervisor.stderr())["worker 2"][0], signal.SIGKILL)
        self.assertEqual(echo(port), b"ping")
        self.assertEqual(stop(supervisor), 0)

    def test_sigterm_drains_every_worker_then_stops_the_vault(self) -> None:
        keydir, _, _, _ = make_keydir(self)
        supervisor, port = start_supervisor(self, keydir, grace=20.0)
        # One open connection per worker, most likely; at least one.
        open_connections = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        for connection in open_connections:
            connection.sendall(b"before")
            self.assertEqual(connection.recv(100), b"before")
        supervisor.signal(signal.SIGTERM)
        wait_for(lambda: "Stopping 2 worker(s)" in supervisor.stderr())
        time.sleep(0.5)
        # Open connections still work, and new ones are refused.
        for connection in open_connections:
            connection.sendall(b"during")
            self.assertEqual(connection.recv(100), b"during")
        wait_for(lambda: _refused(port))
        self.assertIsNone(supervisor.process.poll())
        self.assertNotIn("vault (pid", supervisor.stderr().split("Stopping 2 worker(s)")[1])
        for connection in open_connections:
            connection.close()
        self.assertEqual(supervisor.wait(30), 0)
        log = supervisor.stderr()
        ends = [m.group(1) for m in re.finditer(r"(worker \d|vault) \(pid \d+\) exited", log)]
        self.assertEqual(sorted(ends[:2]), ["worker 1", "worker 2"])
        self.assertEqual(ends[2:], ["vault"])
        self.assertNotIn("Traceback", log)

    def test_sighup_reaches_every_worker(self) -> None:
        keydir, _, _, _ = make_keydir(self)
        supervisor, _ = start_supervisor(self, keydir)
        supervisor.signal(signal.SIGHUP)
        wait_for(lambda: supervisor.stderr().count("SIGHUP: reloading") >= 3)
        log = supervisor.stderr()
        self.assertIn("SIGHUP: reloading 2 worker(s)", log)
        self.assertIn("worker 1: SIGHUP: reloading", log)
        self.assertIn("worker 2: SIGHUP: reloading", log)
        self.assertIsNone(supervisor.process.poll())
        self.assertEqual(stop(supervisor), 0)

    def test_sighup_before_the_workers_are_ready_reaches_each_once(self) -> None:
        keydir, _, _, _ = make_keydir(self)
        supervisor = start_supervisor_process(self, keydir)
        # The workers are spawned, and still starting Python: none is ready.
        wait_for(lambda: "worker 2 started" in supervisor.stderr())
        supervisor.signal(signal.SIGHUP)
        wait_for(lambda: ready_count(supervisor) >= 2)
        wait_for(lambda: supervisor.stderr().count(": SIGHUP: reloading") >= 2)
        time.sleep(0.5)  # time for a second, wrong, reload to show
        self.assertEqual(stop(supervisor), 0)
        log = supervisor.stderr()
        self.assertEqual(log.count("worker 1: SIGHUP: reloading"), 1, log)
        self.assertEqual(log.count("worker 2: SIGHUP: reloading"), 1, log)
        self.assertNotIn("killed by", log)
        self.assertEqual([len(pids) for pids in worker_pids(log).values()], [1, 1])

    def test_sighup_reaches_a_worker_just_started_again(self) -> None:
        keydir, _, _, _ = make_keydir(self)
        supervisor, _ = start_supervisor(self, keydir)
        signal_pid(worker_pids(supervisor.stderr())["worker 1"][0], signal.SIGKILL)
        wait_for(lambda: len(worker_pids(supervisor.stderr())["worker 1"]) == 2)
        # The new worker 1 has been spawned and is not ready yet.
        supervisor.signal(signal.SIGHUP)
        wait_for(lambda: ready_count(supervisor) >= 3)
        wait_for(lambda: supervisor.stderr().count(": SIGHUP: reloading") >= 2)
        time.sleep(0.5)
        self.assertEqual(stop(supervisor), 0)
        log = supervisor.stderr()
        self.assertEqual(log.count("worker 1: SIGHUP: reloading"), 1, log)
        self.assertEqual(log.count("worker 2: SIGHUP: reloading"), 1, log)
        self.assertNotIn("killed by SIGHUP", log)
        self.assertEqual(len(worker_pids(log)["worker 1"]), 2)

    def test_an_operator_may_sighup_one_worker(self) -> None:
        keydir, _, _, _ = make_keydir(self)
        supervisor, port = start_supervisor(self, keydir)
        signal_pid(worker_pids(supervisor.stderr())["worker 2"][0], signal.SIGHUP)
        wait_for(lambda: "worker 2: SIGHUP: reloading" in supervisor.stderr())
        self.assertNotIn("worker 1: SIGHUP", supervisor.stderr())
        self.assertEqual(echo(port), b"ping")
        self.assertEqual(stop(supervisor), 0)
        self.assertEqual(len(worker_pids(supervisor.stderr())["worker 2"]), 1)

    def test_workers_and_the_vault_exit_when_the_supervisor_dies(self) -> None:
        keydir, _, _, _ = make_keydir(self)
        supervisor, _ = start_supervisor(self, keydir)
        pids = [started[0] for started in worker_pids(supervisor.stderr()).values()]
        vault = int(re.findall(r"vault started \(pid (\d+)\)", supervisor.stderr())[0])
        # Should it outlive the supervisor, it must not outlive the test.
        self.addCleanup(_kill_quietly, vault)
        supervisor.signal(signal.SIGKILL)
        supervisor.wait()
        wait_for(lambda: not any(_alive(pid) for pid in [*pids, vault]))
        log = supervisor.stderr()
        self.assertEqual(log.count("the supervisor is gone"), 2)
        self.assertIn("The supervisor is gone (its pipe closed): stopping", log)
        # It let go of the key directory: a single-process server may start.
        FileVault(keydir).close()

    def test_a_vault_that_cannot_start_stops_the_supervisor(self) -> None:
        keydir, _, _, _ = make_keydir(self)
        # Others may write to it: they could put back an old nonce counter.
        os.chmod(keydir, 0o777)
        supervisor = Child(
            self,
            [
                "-m",
                "curvetun.workers",
                "--keydir",
                keydir,
                "--listen",
                "tcp:0:interface=127.0.0.1",
            ],
            "supervisor",
        )
        self.assertEqual(supervisor.wait(30), 78)
        log = supervisor.stderr()
        self.assertIn("it cannot start; stopping", log)
        self.assertNotIn("Traceback", log)


def signal_pid(pid: int, number: int) -> None:
    os.kill(pid, number)


def _alive(pid: int) -> bool:
    """
    Does process C{pid} run (a zombie, exited and not yet reaped, does not)?
    """
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


# -- twist curvetun --workers, with curvetun end to end -----------------------------------


def start_twist(testcase: SynchronousTestCase, keydir: str, workers: int = 2) -> tuple[Child, int]:
    """
    Start C{twist curvetun --workers N} as a curvetun echo server on a free
    port of 127.0.0.1; wait until every worker listens. Return it and the
    port.
    """
    server = Child(
        testcase,
        [
            "-m",
            "twisted",
            "curvetun",
            "--workers",
            str(workers),
            "--keydir",
            keydir,
            "--listen",
            "curvetun:0:interface=127.0.0.1",
        ],
        "twist",
    )
    wait_for(
        lambda: server.stderr().count("): echo") >= workers or server.process.poll() is not None
    )
    assert server.process.poll() is None, server.stderr()
    match = re.search(rb'"address": "127\.0\.0\.1:(\d+)"', server.stdout())
    assert match is not None, server.stdout()
    return server, int(match.group(1))


def started(server: Child) -> dict[str, list[int]]:
    """
    The pids of the vault and of each worker, in the order they were
    started, from the supervisor's log (JSON lines on standard output).
    """
    pids: dict[str, list[int]] = {}
    for line in server.stdout().splitlines():
        try:
            event = json.loads(line.strip(b"\x1e"))
        except ValueError:
            continue  # the last line, while it is being written
        if event.get("log_format") == "{name} started (pid {pid})":
            pids.setdefault(event["name"], []).append(event["pid"])
    return pids


class TwistWorkersTests(TestCase):
    """
    C{twist curvetun --workers 2}: clients complete curvetun handshakes
    through the workers, whose memory never holds the secret key.
    """

    async def test_handshakes_through_two_workers_complete_end_to_end(self) -> None:
        keys = KeyDirs(self)
        server, port = start_twist(self, keys.server)
        await _handshakes_through(self, port, keys.client, 10)
        self.assertEqual(sorted(started(server)), ["vault", "worker 1", "worker 2"])
        self.assertEqual(stop(server), -signal.SIGTERM)

    async def test_the_secret_key_is_in_the_vault_process_only(self) -> None:
        if os.geteuid() != 0:
            self.skipTest("reading another process's memory needs root")
        keys = KeyDirs(self)
        secret = bytes.fromhex(FilePath(keys.server).child("secret.key").getContent().decode())
        server, port = start_twist(self, keys.server)
        endpoint = clientFromString(reactor, f"curvetun:127.0.0.1:{port}:keydir={keys.client}")
        # Enough connections that both workers serve some, most likely.
        clients = [await endpoint.connect(Factory.forProtocol(Collector)) for _ in range(8)]
        for client in clients:
            assert isinstance(client, Collector)
            self.assertEqual(await round_trip(client, b"x"), b"x")
        pids = started(server)
        # The search can fail: it finds the key in the vault process.
        self.assertTrue(memory_holds(pids["vault"][0], secret))
        for name in ("worker 1", "worker 2"):
            self.assertFalse(memory_holds(pids[name][0], secret), name)
            self.assertFalse(memory_holds(pids[name][0], secret.hex().encode("ascii")), name)
        self.assertFalse(memory_holds(server.pid, secret))
        for client in clients:
            assert client.transport is not None
            client.transport.loseConnection()


class TwistWorkersNonceTests(SynchronousTestCase):
    """
    No safe nonce repeats across two workers and a vault killed under them
    (the crash-safety test, for N workers).
    """

    def test_no_cookie_nonce_repeats_across_workers_and_vault_kills(self) -> None:
        keydir, public_key, _, nonce_key = make_keydir(self)
        server, port = start_twist(self, keydir)
        clients = [
            Child(self, [str(HELLO_CLIENT), str(port), public_key.hex(), "1500"], f"hello{n}")
            for n in range(2)
        ]
        for _ in range(2):
            wanted = sum(len(c.stdout()) for c in clients) + 33 * 300
            wait_for(lambda wanted=wanted: sum(len(c.stdout()) for c in clients) > wanted, 60)
            vault = started(server)["vault"][-1]
            os.kill(vault, signal.SIGKILL)
            lives = len(started(server)["vault"])
            wait_for(lambda lives=lives: len(started(server)["vault"]) > lives, 30)
        for client in clients:
            self.assertEqual(client.wait(120), 0, client.stderr())
        nonces = [
            bytes.fromhex(line.decode("ascii"))
            for client in clients
            for line in client.stdout().split(b"\n")
            if len(line) == 32
        ]
        self.assertEqual(len(nonces), 3000)
        counters = [counter_of(nonce, nonce_key) for nonce in nonces]
        self.assertEqual(len(set(counters)), len(counters), "a safe nonce counter repeated")
        # Three vault lives, each starting past everything the last stored.
        self.assertGreaterEqual(len({c >> 21 for c in counters}), 3)
        self.assertEqual(len(started(server)["vault"]), 3)
        # The workers served with the key the vault told them.
        self.assertEqual(server.stderr().count(f"public key {format_public_key(public_key)}"), 2)


class VaultCommandLineTests(SynchronousTestCase):
    """
    The vault process makes every nonce of a worker pool: it is the one that
    gets the state directory and the instance ID.
    """

    def test_the_vault_gets_the_statedir_and_the_instance(self) -> None:
        config = TunnelConfig(keydir="/k", listen=("tcp:0",), statedir="/var/lib/ct", instance=7)
        supervisor = Supervisor(Clock(), config, 2, listens=[])
        argv = supervisor.vault.argv
        self.assertEqual(argv[argv.index("--statedir") + 1], "/var/lib/ct")
        self.assertEqual(argv[argv.index("--instance") + 1], "7")

    def test_without_them_the_vault_uses_the_key_directory(self) -> None:
        config = TunnelConfig(keydir="/k", listen=("tcp:0",))
        supervisor = Supervisor(Clock(), config, 2, listens=[])
        self.assertNotIn("--statedir", supervisor.vault.argv)
        self.assertNotIn("--instance", supervisor.vault.argv)

    def test_metrics_with_several_workers_is_accepted(self) -> None:
        options = Options()
        options.parseOptions(["--workers", "2", "--metrics", "tcp:0"])
        self.assertEqual((options["workers"], options["metrics"]), (2, "tcp:0"))

    def test_a_bad_metrics_endpoint_is_a_startup_error(self) -> None:
        from curvetun.tunnel_service import StartupError

        config = TunnelConfig(keydir="/k", listen=("tcp:0",))
        error = self.assertRaises(
            StartupError, Supervisor, Clock(), config, 2, listens=[], metrics="nonsense:1"
        )
        self.assertEqual(error.status, 64)

    def test_the_workers_do_not_see_the_notify_socket(self) -> None:
        config = TunnelConfig(keydir="/k", listen=("tcp:0",))
        environ = {"NOTIFY_SOCKET": "/run/n", "PATH": "/bin"}
        supervisor = Supervisor(Clock(), config, 2, listens=[], environ=environ)
        self.assertEqual(supervisor.environment, {"PATH": "/bin"})
        self.assertEqual(supervisor.notify_environ, environ)

    def test_the_vault_process_refuses_an_instance_out_of_range(self) -> None:
        from curvetun import vault_process

        options = vault_process.Options()
        self.assertRaises(
            UsageError,
            options.parseOptions,
            ["--keydir", "/k", "--socket", "/s", "--instance", "70000"],
        )


# -- metrics summed over the workers ------------------------------------------------------


class FakeProcess:
    """
    Stands for a running process: the observer only asks whether one runs.
    """

    pid = 4242


def observed_supervisor(workers: int = 2) -> Supervisor:
    """
    A supervisor of C{workers} workers that are never started, running as
    far as its observer can tell, with its vault "running".
    """
    from curvetun.workers import _Worker

    config = TunnelConfig(keydir="/k", listen=("curvetun:7700",))
    supervisor = Supervisor(Clock(), config, workers, listens=[])
    supervisor.running = 1
    supervisor.vault.process = FakeProcess()  # type: ignore[assignment]
    supervisor.workers = [
        _Worker(supervisor, f"worker {n}", [], {}, 3) for n in range(1, workers + 1)
    ]
    return supervisor


def figures(ok: int, connections: int, received: int) -> Figures:
    these = Figures(connections=connections, bytes_received=received)
    these.handshakes["ok"] = ok
    return these


class SupervisorObserverTests(SynchronousTestCase):
    """
    The supervisor serves the sum of its workers' figures; its counters
    never go back when a worker ends; it is healthy only with every worker
    ready and the vault running.
    """

    def test_the_figures_are_summed_over_the_workers(self) -> None:
        supervisor = observed_supervisor()
        first, second = supervisor.workers
        first.figures = {"curvetun:7700": figures(ok=3, connections=1, received=10)}
        second.figures = {"curvetun:7700": figures(ok=4, connections=2, received=5)}
        total = supervisor.observer.figures()["curvetun:7700"]
        self.assertEqual(
            (total.handshakes["ok"], total.connections, total.bytes_received), (7, 3, 15)
        )

    def test_the_counters_of_a_worker_that_ended_are_kept(self) -> None:
        supervisor = observed_supervisor()
        first, second = supervisor.workers
        first.figures = {"curvetun:7700": figures(ok=3, connections=1, received=10)}
        second.figures = {"curvetun:7700": figures(ok=4, connections=2, received=5)}
        first.gone()
        total = supervisor.observer.figures()["curvetun:7700"]
        # Its counters stay in; its connections are gone with it.
        self.assertEqual(
            (total.handshakes["ok"], total.connections, total.bytes_received), (7, 2, 15)
        )
        # Started again, it counts from 0: the sum goes on from there.
        first.figures = {"curvetun:7700": figures(ok=1, connections=1, received=1)}
        total = supervisor.observer.figures()["curvetun:7700"]
        self.assertEqual(
            (total.handshakes["ok"], total.connections, total.bytes_received), (8, 3, 16)
        )

    def test_every_tunnel_is_reported_before_any_worker_answered(self) -> None:
        supervisor = observed_supervisor()
        self.assertEqual(supervisor.observer.figures(), {"curvetun:7700": Figures()})

    def test_healthy_only_with_every_worker_ready_and_the_vault_running(self) -> None:
        supervisor = observed_supervisor()
        first, second = supervisor.workers
        self.assertEqual(supervisor.observer.health(), "0 of 2 workers ready")
        first.ready = True
        self.assertEqual(supervisor.observer.health(), "1 of 2 workers ready")
        second.ready = True
        self.assertIsNone(supervisor.observer.health())
        supervisor.vault.process = None
        self.assertEqual(supervisor.observer.health(), "the vault process is not running")

    def test_the_status_lists_each_worker(self) -> None:
        supervisor = observed_supervisor()
        first, second = supervisor.workers
        first.ready = True
        first.figures = {"curvetun:7700": figures(ok=3, connections=2, received=10)}
        status = supervisor.observer.status()
        self.assertEqual(
            [(w["name"], w["ready"], w["connections"]) for w in status["workers"]],
            [("worker 1", True, 2), ("worker 2", False, 0)],
        )
        self.assertEqual([t["name"] for t in status["tunnels"]], ["curvetun:7700"])


def get(url: str) -> tuple[int, bytes]:
    """
    GET C{url}, blocking: the status and the body.
    """
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def ok_handshakes(base: str) -> float:
    """
    The C{ok} handshakes of C{/metrics} at C{base}.
    """
    _, body = get(base + "/metrics")
    match = re.search(rb'curvetun_handshakes_total\{[^}]*result="ok"[^}]*\} (\S+)', body)
    assert match is not None, body
    return float(match.group(1))


class SupervisorMetricsTests(TestCase):
    """
    C{--metrics} with workers, on real processes: the supervisor serves the
    figures summed over them, lists them in /status, and /healthz says
    whether every worker is ready.
    """

    async def test_the_supervisor_serves_the_sum_over_its_workers(self) -> None:
        keys = KeyDirs(self)
        supervisor, port = start_supervisor(
            self,
            keys.server,
            listen="curvetun:0:interface=127.0.0.1",
            extra=("--metrics", "tcp:0:interface=127.0.0.1"),
        )
        match = re.search(r"\(127\.0\.0\.1:(\d+)\): metrics", supervisor.stderr())
        assert match is not None, supervisor.stderr()
        base = f"http://127.0.0.1:{match.group(1)}"
        self.assertEqual(get(base + "/healthz"), (200, b"ok\n"))
        await _handshakes_through(self, port, keys.client, 10)
        wait_for(lambda: ok_handshakes(base) == 10)
        code, body = get(base + "/status")
        status = json.loads(body)
        pids = worker_pids(supervisor.stderr())
        self.assertEqual(
            [(w["name"], w["pid"], w["ready"]) for w in status["workers"]],
            [("worker 1", pids["worker 1"][0], True), ("worker 2", pids["worker 2"][0], True)],
        )
        # A worker killed: unhealthy until it is back, and the counter
        # does not go back.
        signal_pid(pids["worker 1"][0], signal.SIGKILL)
        wait_for(lambda: get(base + "/healthz")[0] == 503)
        self.assertEqual(get(base + "/healthz")[1], b"1 of 2 workers ready\n")
        wait_for(lambda: get(base + "/healthz")[0] == 200)
        self.assertEqual(ok_handshakes(base), 10)
        self.assertEqual(stop(supervisor), 0)


# -- readiness for a service manager ------------------------------------------------------


class NotifySocket:
    """
    A UNIX datagram socket bound where C{$NOTIFY_SOCKET} names it, as a
    service manager's: what it received, one dict of fields per datagram.
    """

    def __init__(self, testcase: SynchronousTestCase) -> None:
        from ._process_support import socket_path

        self.path = socket_path(testcase)
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(self.path)
        self.socket.setblocking(False)
        testcase.addCleanup(self.socket.close)
        self.received: list[dict[str, str]] = []

    def read(self) -> list[dict[str, str]]:
        """
        Everything received so far.
        """
        while True:
            try:
                datagram = self.socket.recv(4096)
            except BlockingIOError:
                return self.received
            fields = dict(line.split("=", 1) for line in datagram.decode().splitlines() if line)
            self.received.append(fields)

    def kinds(self) -> list[str]:
        """
        What each datagram said: READY, RELOADING or STOPPING.
        """
        return [
            next(kind for kind in ("READY", "RELOADING", "STOPPING") if kind in fields)
            for fields in self.read()
        ]


class SupervisorNotifyTests(SynchronousTestCase):
    """
    With C{$NOTIFY_SOCKET}, the supervisor (and it alone) tells the manager
    READY=1 once every worker is ready, RELOADING=1 and READY=1 around a
    reload, and STOPPING=1 on SIGTERM.
    """

    def test_ready_reloading_and_stopping_come_from_the_supervisor(self) -> None:
        keydir, _, _, _ = make_keydir(self)
        manager = NotifySocket(self)
        supervisor = start_supervisor_process(self, keydir, environ={"NOTIFY_SOCKET": manager.path})
        wait_for(lambda: manager.kinds() == ["READY"])
        # Not before every worker said it was ready.
        self.assertEqual(ready_count(supervisor), 2)
        ready = manager.read()[0]
        self.assertEqual(ready["MAINPID"], str(supervisor.pid))
        self.assertIn("2 workers listening on 127.0.0.1:", ready["STATUS"])
        supervisor.signal(signal.SIGHUP)
        wait_for(lambda: manager.kinds() == ["READY", "RELOADING", "READY"])
        # READY=1 once both workers have reloaded.
        self.assertEqual(supervisor.stderr().count(": SIGHUP: reloading"), 2)
        self.assertEqual(stop(supervisor), 0)
        self.assertEqual(manager.kinds(), ["READY", "RELOADING", "READY", "STOPPING"])
        self.assertEqual(
            {fields.get("MAINPID") for fields in manager.read()} - {None}, {str(supervisor.pid)}
        )

    def test_a_sighup_before_ready_tells_no_ready_early(self) -> None:
        keydir, _, _, _ = make_keydir(self)
        manager = NotifySocket(self)
        supervisor = start_supervisor_process(self, keydir, environ={"NOTIFY_SOCKET": manager.path})
        wait_for(lambda: "worker 2 started" in supervisor.stderr())
        supervisor.signal(signal.SIGHUP)
        wait_for(lambda: supervisor.stderr().count(": SIGHUP: reloading") == 2)
        wait_for(lambda: manager.kinds() == ["READY"])
        self.assertEqual(ready_count(supervisor), 2)
        self.assertEqual(stop(supervisor), 0)
        self.assertEqual(manager.kinds(), ["READY", "STOPPING"])


async def _handshakes_through(
    testcase: SynchronousTestCase, port: int, client_keydir: str, count: int
) -> None:
    """
    C{count} whole curvetun handshakes to 127.0.0.1:C{port}, one after
    another, each shown by one message echoed, then closed.
    """
    endpoint = clientFromString(reactor, f"curvetun:127.0.0.1:{port}:keydir={client_keydir}")
    for number in range(count):
        client = await endpoint.connect(Factory.forProtocol(Collector))
        assert isinstance(client, Collector)
        testcase.assertEqual(await round_trip(client, b"hello %d" % number), b"hello %d" % number)
        assert client.transport is not None
        client.transport.loseConnection()
        await client.lost
