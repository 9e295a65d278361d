"""
C{twist curvetun --workers N --config FILE}: every worker runs every
tunnel of the file, with one vault process per identity (key directory);
each secret key is in its own vault's memory only; SIGHUP reloads every
tunnel in every worker; a vault that cannot start stops everything with
its status. Also the option combinations and the file's C{workers}.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, clientFromString, serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from curvetun import worker_main
from curvetun.config import ConfigFileError, ProcessConfig, TunnelConfig, read_config
from curvetun.keys import format_public_key
from curvetun.tap import Options, makeService
from curvetun.tunnel import EchoFactory
from curvetun.tunnel_service import StartupError, Tunnels
from curvetun.workers import (
    FIRST_CHILD_FD,
    Supervisor,
    listens_for_tunnels,
    make_supervisor_service_from_file,
)

from ._process_support import Child, memory_holds, stop, wait_for
from ._support import Collector, KeyDirs, round_trip

# -- the supervisor's log (JSON lines on standard output under twist) ---------------------


def events(server: Child) -> list[dict[str, Any]]:
    """
    The supervisor's log events so far.
    """
    found = []
    for line in server.stdout().splitlines():
        try:
            found.append(json.loads(line.strip(b"\x1e")))
        except ValueError:
            continue  # the last line, while it is being written
    return found


def started(server: Child) -> dict[str, list[int]]:
    """
    The pids of each vault and worker, in the order they were started.
    """
    pids: dict[str, list[int]] = {}
    for event in events(server):
        if event.get("log_format") == "{name} started (pid {pid})":
            pids.setdefault(event["name"], []).append(event["pid"])
    return pids


def ready(server: Child) -> int:
    """
    How many workers have said they are ready.
    """
    return sum(1 for e in events(server) if e.get("log_format") == "{name} (pid {pid}) is ready")


def ports(server: Child) -> list[int]:
    """
    The port of each listen endpoint, in the order of the file.
    """
    return [
        int(event["address"].rpartition(":")[2])
        for event in events(server)
        if event.get("log_format") == "Listening on {endpoint} ({address}) in {workers} worker(s)"
    ]


def metrics_base(server: Child) -> str:
    """
    The URL of the supervisor's monitoring endpoint.
    """
    for event in events(server):
        listening = event.get("log_format") == "Listening on {endpoint} ({address}): {what}"
        if listening and str(event.get("what")).startswith("metrics"):
            return f"http://{event['address']}"
    raise AssertionError(server.stdout())


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


def ok_handshakes(base: str, tunnel: str) -> float:
    """
    The C{ok} handshakes of tunnel C{tunnel} in C{/metrics} at C{base}.
    """
    _, body = get(base + "/metrics")
    for line in body.decode().splitlines():
        ours = f'tunnel="{tunnel}"' in line and 'result="ok"' in line
        if line.startswith("curvetun_handshakes_total{") and ours:
            return float(line.rpartition(" ")[2])
    return 0.0


def write_config(testcase: SynchronousTestCase, text: str) -> str:
    path = os.path.abspath(str(testcase.mktemp()) + ".toml")
    Path(path).write_text(text)
    return path


def start_twist(
    testcase: SynchronousTestCase, config: str, workers: int = 2, wait: bool = True
) -> Child:
    """
    Start C{twist curvetun --workers N --config FILE}; with C{wait}, wait
    until every worker is ready.
    """
    server = Child(
        testcase,
        ["-m", "twisted", "curvetun", "--workers", str(workers), "--config", config],
        "twist",
    )
    if wait:
        wait_for(lambda: ready(server) >= workers or server.process.poll() is not None, 60)
        assert server.process.poll() is None, server.stderr()
    return server


def secret_of(keydir: str) -> bytes:
    return bytes.fromhex(Path(keydir, "secret.key").read_text().strip())


async def talk(description: str, data: bytes) -> bytes:
    """
    Connect through C{description} (a curvetun client endpoint string),
    send C{data}, and return what comes back.
    """
    client = await clientFromString(reactor, description).connect(Factory.forProtocol(Collector))
    assert isinstance(client, Collector)
    try:
        return await round_trip(client, data)
    finally:
        assert client.transport is not None
        client.transport.loseConnection()
        await client.lost


class TwoIdentitiesTests(TestCase):
    """
    A file of tunnels with different key directories under C{--workers 2}:
    one vault per key directory, and every tunnel served by the workers,
    the client end of a tunnel (a curvetun forward) too.
    """

    def setUp(self) -> None:
        self.one = KeyDirs(self)
        self.two = KeyDirs(self)
        # The far end of the client tunnel, in this process.
        self.far = KeyDirs(self)

    async def far_server(self) -> int:
        endpoint = serverFromString(
            reactor, f"curvetun:0:interface=127.0.0.1:keydir={self.far.server}"
        )
        port = await endpoint.listen(EchoFactory())
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    def config(self, far_port: int) -> str:
        key = format_public_key(self.far.server_key)
        return write_config(
            self,
            f"""
[[tunnel]]
name = "one"
listen = ["curvetun:0:interface=127.0.0.1", "curvetun:0:interface=127.0.0.1"]
keydir = "{self.one.server}"

[[tunnel]]
name = "two"
listen = "curvetun:0:interface=127.0.0.1"
keydir = "{self.two.server}"

[[tunnel]]
name = "client end"
listen = "tcp:0:interface=127.0.0.1"
forward = "curvetun:127.0.0.1:{far_port}:key={key}"
keydir = "{self.far.client}"
""",
        )

    async def test_every_tunnel_serves_with_its_own_vault(self) -> None:
        server = start_twist(self, self.config(await self.far_server()))
        first, second, third, plain = ports(server)
        for port, keys in [(first, self.one), (second, self.one), (third, self.two)]:
            for number in range(4):
                data = b"hello %d" % number
                through = f"curvetun:127.0.0.1:{port}:keydir={keys.client}"
                self.assertEqual(await talk(through, data), data)
        # The client end: plain TCP in, curvetun out to the far server.
        client = await TCP4ClientEndpoint(reactor, "127.0.0.1", plain).connect(
            Factory.forProtocol(Collector)
        )
        assert isinstance(client, Collector)
        self.assertEqual(await round_trip(client, b"far away"), b"far away")
        assert client.transport is not None
        client.transport.loseConnection()
        await client.lost
        self.assertEqual(
            sorted(started(server)), ["vault 1", "vault 2", "vault 3", "worker 1", "worker 2"]
        )
        log = server.stderr()
        for keys in (self.one, self.two):
            # Each worker announces each server identity, as its vault says.
            self.assertEqual(log.count(f"public key {format_public_key(keys.server_key)}"), 2)
        self.assertEqual(stop(server), -signal.SIGTERM)

    async def test_each_secret_key_is_in_its_own_vault_only(self) -> None:
        if os.geteuid() != 0:
            self.skipTest("reading another process's memory needs root")
        server = start_twist(self, self.config(await self.far_server()))
        first, _, third, plain = ports(server)
        for _ in range(4):
            self.assertEqual(
                await talk(f"curvetun:127.0.0.1:{first}:keydir={self.one.client}", b"x"), b"x"
            )
            self.assertEqual(
                await talk(f"curvetun:127.0.0.1:{third}:keydir={self.two.client}", b"y"), b"y"
            )
        client = await TCP4ClientEndpoint(reactor, "127.0.0.1", plain).connect(
            Factory.forProtocol(Collector)
        )
        assert isinstance(client, Collector)
        self.assertEqual(await round_trip(client, b"z"), b"z")
        pids = started(server)
        secrets = {
            "vault 1": secret_of(self.one.server),
            "vault 2": secret_of(self.two.server),
            "vault 3": secret_of(self.far.client),
        }
        for name, secret in secrets.items():
            for holder in ["vault 1", "vault 2", "vault 3", "worker 1", "worker 2"]:
                self.assertEqual(
                    memory_holds(pids[holder][0], secret), holder == name, (holder, name)
                )
                if holder.startswith("worker"):
                    self.assertFalse(memory_holds(pids[holder][0], secret.hex().encode()))
            self.assertFalse(memory_holds(server.pid, secret))
        assert client.transport is not None
        client.transport.loseConnection()
        await client.lost

    async def test_sighup_reloads_every_tunnel_in_every_worker(self) -> None:
        server = start_twist(self, self.config(await self.far_server()))
        first, _, third, _ = ports(server)
        keydirs = (self.one.server, self.two.server, self.far.client)
        server.signal(signal.SIGHUP)

        def reread() -> list[str]:
            return re.findall(r"(worker \d): registry of (\S+) read again", server.stderr())

        wait_for(lambda: len(reread()) >= 6)
        self.assertEqual(
            sorted(reread()),
            sorted((worker, keydir) for worker in ("worker 1", "worker 2") for keydir in keydirs),
        )
        # Still serving every tunnel.
        for port, keys in [(first, self.one), (third, self.two)]:
            through = f"curvetun:127.0.0.1:{port}:keydir={keys.client}"
            self.assertEqual(await talk(through, b"after"), b"after")
        self.assertEqual(len(started(server)["worker 1"]), 1)
        self.assertEqual(stop(server), -signal.SIGTERM)


class FileMetricsTests(TestCase):
    """
    The file's C{workers} and C{metrics}, without C{--workers}: the
    supervisor serves each tunnel's figures summed over the workers, and
    its health covers every vault.
    """

    async def test_the_files_workers_and_metrics(self) -> None:
        one, two = KeyDirs(self), KeyDirs(self)
        config = write_config(
            self,
            f"""
workers = 2
metrics = "tcp:0:interface=127.0.0.1"

[[tunnel]]
name = "one"
listen = "curvetun:0:interface=127.0.0.1"
keydir = "{one.server}"

[[tunnel]]
name = "two"
listen = "curvetun:0:interface=127.0.0.1"
keydir = "{two.server}"
""",
        )
        server = Child(self, ["-m", "twisted", "curvetun", "--config", config], "twist")
        wait_for(lambda: ready(server) >= 2 or server.process.poll() is not None, 60)
        assert server.process.poll() is None, server.stderr()
        base = metrics_base(server)
        self.assertEqual(get(base + "/healthz"), (200, b"ok\n"))
        first, second = ports(server)
        for port, keys, count in [(first, one, 3), (second, two, 2)]:
            for _ in range(count):
                through = f"curvetun:127.0.0.1:{port}:keydir={keys.client}"
                self.assertEqual(await talk(through, b"m"), b"m")
        wait_for(lambda: (ok_handshakes(base, "one"), ok_handshakes(base, "two")) == (3, 2))
        status = json.loads(get(base + "/status")[1])
        self.assertEqual([t["name"] for t in status["tunnels"]], ["one", "two"])
        self.assertEqual(
            [(v["name"], v["keydir"]) for v in status["vaults"]],
            [("vault 1", one.server), ("vault 2", two.server)],
        )
        # A vault killed: unhealthy until it is back.
        os.kill(started(server)["vault 2"][0], signal.SIGKILL)
        wait_for(lambda: get(base + "/healthz")[0] == 503)
        wait_for(lambda: get(base + "/healthz")[0] == 200)
        self.assertEqual(len(started(server)["vault 2"]), 2)
        self.assertEqual(stop(server), -signal.SIGTERM)


class Backend(Protocol):
    """
    A backend that keeps what it receives in C{received}, shared.
    """

    def __init__(self, received: bytearray) -> None:
        self.received = received

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class BackendFactory(Factory):
    """
    Backends that keep what they receive in C{received}.
    """

    def __init__(self) -> None:
        self.received = bytearray()

    def buildProtocol(self, addr: object) -> Backend:
        return Backend(self.received)


class ForwardSettingsTests(TestCase):
    """
    A worker forwards as the single process does: with the PROXY header a
    tunnel asks for.
    """

    async def test_a_worker_sends_the_proxy_header(self) -> None:
        keys = KeyDirs(self)
        backend = BackendFactory()
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(backend)
        self.addCleanup(port.stopListening)
        config = write_config(
            self,
            f"""
[[tunnel]]
listen = "curvetun:0:interface=127.0.0.1"
forward = "tcp:127.0.0.1:{port.getHost().port}"
send_proxy = "v1"
keydir = "{keys.server}"
""",
        )
        server = start_twist(self, config)
        [listen] = ports(server)
        through = f"curvetun:127.0.0.1:{listen}:keydir={keys.client}"
        client = await clientFromString(reactor, through).connect(Factory.forProtocol(Collector))
        assert isinstance(client, Collector) and client.transport is not None
        client.transport.write(b"after the header")
        for _ in range(200):
            if backend.received.endswith(b"after the header"):
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.assertTrue(
            backend.received.startswith(b"PROXY TCP4 127.0.0.1 127.0.0.1 "), backend.received
        )
        self.assertTrue(backend.received.endswith(b"\r\nafter the header"), backend.received)
        client.transport.loseConnection()
        await client.lost
        self.assertEqual(stop(server), -signal.SIGTERM)


def _forget(keydir: str) -> None:
    from curvetun.endpoints import service_pool

    service = service_pool.forget_keydir(keydir)
    if service is not None:
        service.vault.close()  # type: ignore[attr-defined]


class BadSecondKeyDirectoryTests(SynchronousTestCase):
    """
    A vault that cannot start, for the second tunnel's key directory,
    stops everything with its status and one line naming the directory.
    """

    def test_a_bad_key_directory_in_the_second_tunnel_exits_78(self) -> None:
        one, two = KeyDirs(self), KeyDirs(self)
        # Others may write to it: they could put back an old nonce counter.
        os.chmod(two.server, 0o777)
        config = write_config(
            self,
            f"""
[[tunnel]]
listen = "curvetun:0:interface=127.0.0.1"
keydir = "{one.server}"

[[tunnel]]
listen = "curvetun:0:interface=127.0.0.1"
keydir = "{two.server}"
""",
        )
        server = start_twist(self, config, wait=False)
        self.assertEqual(server.wait(60), 78)
        lines = [line for line in server.stderr().splitlines() if "curvetun vault:" in line]
        self.assertTrue(lines, server.stderr())
        self.assertTrue(all(two.server in line for line in lines), lines)
        self.assertNotIn(one.server, "\n".join(lines))
        self.assertNotIn("Traceback", server.stderr())
        gave_up = [e for e in events(server) if "it cannot start; stopping" in e["log_format"]]
        self.assertEqual([e["name"] for e in gave_up], ["vault 2"])


# -- the options and the supervisor's plan, without processes ----------------------------


def tunnel(keydir: str, *listen: str, **settings: Any) -> TunnelConfig:
    return TunnelConfig(keydir=keydir, listen=listen or ("tcp:0",), **settings)


class OptionsTests(SynchronousTestCase):
    """
    C{--workers} goes with C{--config}, overriding the file's C{workers}.
    """

    def test_workers_goes_with_config(self) -> None:
        options = Options()
        options.parseOptions(["--config", "/etc/curvetun.toml", "--workers", "3"])
        self.assertEqual((options["config"], options["workers"]), ("/etc/curvetun.toml", 3))

    def test_without_workers_the_file_decides(self) -> None:
        options = Options()
        options.parseOptions(["--config", "/etc/curvetun.toml"])
        self.assertIsNone(options["workers"])

    def test_without_config_one_worker_is_the_default(self) -> None:
        options = Options()
        options.parseOptions([])
        self.assertEqual(options["workers"], 1)

    def test_workers_and_metrics_go_with_config(self) -> None:
        options = Options()
        options.parseOptions(["--config", "f.toml", "--workers", "2", "--metrics", "tcp:0"])
        self.assertEqual((options["workers"], options["metrics"]), (2, "tcp:0"))

    def test_a_tunnel_option_is_still_refused_with_config(self) -> None:
        options = Options()
        error = self.assertRaises(
            UsageError, options.parseOptions, ["--config", "f.toml", "--workers", "2", "-k", "/k"]
        )
        self.assertIn("--config cannot be combined with --keydir", str(error))

    def test_change_instance_is_refused_with_workers(self) -> None:
        options = Options()
        error = self.assertRaises(
            UsageError,
            options.parseOptions,
            ["--workers", "2", "--instance", "3", "--change-instance"],
        )
        self.assertIn("--change-instance is not taken with --workers", str(error))

    def test_workers_out_of_range_is_refused_with_config(self) -> None:
        options = Options()
        self.assertRaises(
            UsageError, options.parseOptions, ["--config", "f.toml", "--workers", "65"]
        )


class FileWorkersTests(SynchronousTestCase):
    """
    The file's top-level C{workers}.
    """

    def test_the_file_may_say_how_many_workers(self) -> None:
        path = write_config(self, 'workers = 4\n[[tunnel]]\nlisten = "tcp:0"\n')
        self.assertEqual(read_config(path).workers, 4)

    def test_without_it_the_file_says_nothing(self) -> None:
        path = write_config(self, '[[tunnel]]\nlisten = "tcp:0"\n')
        self.assertIsNone(read_config(path).workers)

    def test_a_bad_number_of_workers_names_its_line(self) -> None:
        for value, shown in [("0", "0"), ("65", "65"), ('"2"', "a string"), ("true", "a boolean")]:
            path = write_config(
                self, f'metrics = "tcp:0"\nworkers = {value}\n[[tunnel]]\nlisten = "tcp:0"\n'
            )
            error = self.assertRaises(ConfigFileError, read_config, path)
            self.assertEqual(
                str(error), f"{path}:2: workers must be a whole number from 1 to 64, not {shown}"
            )


class MakeServiceTests(SynchronousTestCase):
    """
    C{twist curvetun --config FILE}: the file's C{workers} decides how many
    processes, unless C{--workers} says.
    """

    def path(self) -> str:
        keydir = os.path.abspath(self.mktemp())
        return write_config(
            self, f'workers = 3\n[[tunnel]]\nlisten = "tcp:0"\nkeydir = "{keydir}"\n'
        )

    def service(self, *argv: str) -> Any:
        options = Options()
        options.parseOptions(list(argv))
        return makeService(options)

    def test_the_files_workers(self) -> None:
        self.assertEqual(self.service("--config", self.path()).supervisor.worker_count, 3)

    def test_the_command_line_overrides_the_files_workers(self) -> None:
        path = self.path()
        self.assertEqual(
            self.service("--config", path, "--workers", "2").supervisor.worker_count, 2
        )
        single = self.service("--config", path, "--workers", "1")
        self.addCleanup(single.release)
        self.assertIsInstance(single, Tunnels)

    def test_change_instance_with_the_files_workers_exits_64(self) -> None:
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        error = self.assertRaises(
            SystemExit, self.service, "--config", self.path(), "--change-instance"
        )
        self.assertEqual(error.code, 64)
        self.assertIn("--change-instance is not taken with --workers", stderr.getvalue())


class FileServiceTests(SynchronousTestCase):
    """
    The supervisor of a file's tunnels: the command line's C{--metrics}
    overrides the file's.
    """

    def process(self) -> ProcessConfig:
        path = write_config(
            self, 'metrics = "tcp:9100"\n[[tunnel]]\nlisten = "tcp:0"\nkeydir = "/a"\n'
        )
        return read_config(path)

    def test_the_files_metrics_is_served(self) -> None:
        service = make_supervisor_service_from_file(self.process(), 2, Clock())
        supervisor = service.supervisor  # type: ignore[attr-defined]
        self.assertEqual(supervisor.monitor.description, "tcp:9100")

    def test_the_command_lines_metrics_overrides_the_files(self) -> None:
        service = make_supervisor_service_from_file(self.process(), 2, Clock(), "tcp:9200")
        supervisor = service.supervisor  # type: ignore[attr-defined]
        self.assertEqual(supervisor.monitor.description, "tcp:9200")
        self.assertEqual(supervisor.configs, self.process().tunnels)


class SupervisorPlanTests(SynchronousTestCase):
    """
    What the supervisor of several tunnels starts: one vault per identity
    (by the single-process rule of shared identities), every worker
    connected to every vault, the listeners of every tunnel in order.
    """

    def test_one_vault_per_key_directory(self) -> None:
        configs = [tunnel("/a"), tunnel("/b", statedir="/s", instance=3), tunnel("/a")]
        supervisor = Supervisor(Clock(), configs, 2, listens=[])
        self.assertEqual(supervisor.tunnel_vaults, [0, 1, 0])
        self.assertEqual([v.name for v in supervisor.vaults], ["vault 1", "vault 2"])
        argvs = [vault.argv for vault in supervisor.vaults]
        self.assertEqual([argv[argv.index("--keydir") + 1] for argv in argvs], ["/a", "/b"])
        self.assertNotIn("--statedir", argvs[0])
        self.assertEqual(argvs[1][argvs[1].index("--statedir") + 1], "/s")
        self.assertEqual(argvs[1][argvs[1].index("--instance") + 1], "3")
        sockets = [argv[argv.index("--socket") + 1] for argv in argvs]
        self.assertEqual(sockets, supervisor.vault_sockets)
        self.assertEqual(len(set(sockets)), 2)
        self.assertEqual({os.path.dirname(path) for path in sockets}, {os.path.dirname(sockets[0])})
        self.assertEqual(os.stat(os.path.dirname(sockets[0])).st_mode & 0o777, 0o700)

    def test_one_identity_keeps_one_vault_named_vault(self) -> None:
        supervisor = Supervisor(Clock(), [tunnel("/a"), tunnel("/a")], 2, listens=[])
        self.assertEqual([v.name for v in supervisor.vaults], ["vault"])

    def test_tunnels_that_cannot_share_a_key_directory_are_refused(self) -> None:
        configs = [tunnel("/a"), tunnel("/a", handshake_timeout=3.0)]
        error = self.assertRaises(StartupError, Supervisor, Clock(), configs, 2, listens=[])
        self.assertEqual(error.status, 64)
        self.assertIn("handshake_timeout is not that of tunnel 1", str(error))

    def test_the_listeners_of_every_tunnel_in_order(self) -> None:
        configs = [tunnel("/a", "tcp:0", "curvetun:0"), tunnel("/b", "curvetun:0")]
        listens = listens_for_tunnels(configs, Clock())
        self.assertEqual(
            [(listen.tunnel, listen.kind) for listen in listens],
            [(0, "plain"), (0, "curvetun"), (1, "curvetun")],
        )
        # The fds the workers adopt them as, and the control channel's after.
        self.assertEqual(FIRST_CHILD_FD, 3)

    def test_a_listen_naming_another_key_directory_is_refused(self) -> None:
        configs = [tunnel("/a"), tunnel("/b", "curvetun:0:keydir=/a")]
        error = self.assertRaises(StartupError, listens_for_tunnels, configs, Clock())
        self.assertEqual(error.status, 64)

    def test_a_curvetun_forward_naming_another_key_directory_is_refused(self) -> None:
        # The worker would load that directory's secret key itself.
        config = tunnel("/a", forward="curvetun:h:1:keydir=/elsewhere:key=" + "00" * 32)
        error = self.assertRaises(StartupError, listens_for_tunnels, [config], Clock())
        self.assertEqual(error.status, 64)
        self.assertIn("use the tunnel's keydir", str(error))

    def test_a_curvetun_forward_of_the_tunnels_own_key_directory_is_taken(self) -> None:
        config = tunnel("/a", forward="curvetun:h:1:keydir=/a:key=" + "00" * 32)
        self.assertEqual(len(listens_for_tunnels([config], Clock())), 1)

    def test_every_vault_is_watched_by_the_health_check(self) -> None:
        supervisor = Supervisor(Clock(), [tunnel("/a"), tunnel("/b")], 1, listens=[])
        supervisor.running = 1

        class Running:
            pid = 4242

        supervisor.vaults[0].process = Running()  # type: ignore[assignment]
        self.assertEqual(supervisor.observer.health(), "the vault process of /b is not running")
        status = supervisor.observer.status()
        self.assertEqual([v["running"] for v in status["vaults"]], [True, False])
        self.assertEqual([t["name"] for t in status["tunnels"]], ["tcp:0", "tcp:0"])


class WorkerOptionsTests(SynchronousTestCase):
    """
    A worker takes one C{--vault-socket} per identity of its tunnels.
    """

    def argv(self, *sockets: str) -> list[str]:
        configs = [tunnel("/a", "tcp:0"), tunnel("/b", "tcp:0", "tcp:0"), tunnel("/a", "tcp:0")]
        argv = ["--config", worker_main.config_to_json(configs)]
        for path in sockets:
            argv += ["--vault-socket", path]
        for fd in range(FIRST_CHILD_FD, FIRST_CHILD_FD + 4):
            argv += ["--adopt", f"{fd}:plain"]
        return argv

    def test_each_tunnel_gets_its_vault(self) -> None:
        options = worker_main.Options()
        options.parseOptions(self.argv("/s/1", "/s/2"))
        self.assertEqual(options["vault-socket"], ["/s/1", "/s/2"])
        self.assertEqual(options["vaults"], [0, 1, 0])
        self.assertEqual([c.keydir for c in options["config"]], ["/a", "/b", "/a"])

    def test_a_missing_vault_socket_is_refused(self) -> None:
        options = worker_main.Options()
        error = self.assertRaises(UsageError, options.parseOptions, self.argv("/s/1"))
        self.assertIn("one --vault-socket for each identity", str(error))

    def test_one_tunnel_as_an_object_is_still_taken(self) -> None:
        text = json.dumps(json.loads(worker_main.config_to_json(tunnel("/a")))[0])
        self.assertEqual(worker_main.config_from_json(text), [tunnel("/a")])
