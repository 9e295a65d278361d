"""
The monitoring endpoint of C{twist curvetun --metrics ENDPOINT}
(L{curvetun.metrics}, L{curvetun.monitoring}): as operators start it, with
real clients over TCP; and its parts in memory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from curvetun.admission import FAILURE_LABELS
from curvetun.config import ConfigFileError, read_config
from curvetun.errors import AdmissionRefused, NotAuthorized
from curvetun.keys import fingerprint
from curvetun.metrics import (
    HANDSHAKE_RESULTS,
    REFUSAL_LIMITS,
    CurveTunCollector,
    Figures,
    ListenerFigures,
    server_keys,
    sum_figures,
)
from curvetun.service import CurveTunService
from curvetun.status import render
from curvetun.tap import Options
from curvetun.tunnel_service import EX_UNAVAILABLE, EX_USAGE
from curvetun.vault import FileVault, MemoryVault

from ._support import (
    AllowList,
    Collector,
    Peers,
    admit,
    counter_file,
    curvetun_process,
    http_get,
    make_keydir,
    metrics_port,
    parse_events,
    read_until,
    round_trip,
    run_twist,
    start_twist,
    subprocess_env,
)

LOCALHOST = "interface=127.0.0.1"


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """
    The samples of a Prometheus text page, by name and labels (without
    the C{tunnel} label).
    """
    found = {}
    for family in text_string_to_metric_families(text.decode("utf-8")):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "tunnel"))
            found[sample.name, labels] = sample.value
    return found


def handshakes(text: bytes, result: str) -> float:
    return samples(text)["curvetun_handshakes_total", (("result", result),)]


def figure(text: bytes, name: str) -> float:
    return samples(text)[name, ()]


class MonitoringCommandTests(TestCase):
    """
    C{twist curvetun --metrics tcp:0:interface=127.0.0.1} as a process,
    with real curvetun clients.
    """

    def setUp(self) -> None:
        self.home = os.path.abspath(self.mktemp())

    async def test_metrics_status_health_and_the_status_command(self) -> None:
        server_keydir, server_key = make_keydir(self)
        client_keydir, client_key = make_keydir(self)
        stranger_keydir, _ = make_keydir(self)
        admit(server_keydir, client_key)
        process = start_twist(
            self,
            self.home,
            "--listen",
            f"curvetun:0:{LOCALHOST}",
            "--keydir",
            server_keydir,
            "--metrics",
            f"tcp:0:{LOCALHOST}",
        )
        output = read_until(process, b"", "Listening on", count=2)
        [tunnel_port] = [
            int(event["address"].rpartition(":")[2])
            for event in parse_events(output)
            if event.get("endpoint", "").startswith("curvetun:")
        ]
        base = f"http://127.0.0.1:{metrics_port(output)}"

        before = await http_get(base + "/metrics")
        self.assertEqual(before.code, 200)
        self.assertTrue(before.content_type.startswith("text/plain"), before.content_type)
        self.assertEqual(handshakes(before.body, "ok"), 0)

        # A client that is let in, and exchanges bytes through the echo.
        client = Collector()
        endpoint = f"curvetun:127.0.0.1:{tunnel_port}:key={server_key.hex()}:keydir="
        await connectProtocol(clientFromString(reactor, endpoint + client_keydir), client)
        self.assertEqual(await round_trip(client, b"ping!"), b"ping!")
        # A client that is not in the registry.
        stranger = Collector()
        await connectProtocol(clientFromString(reactor, endpoint + stranger_keydir), stranger)
        await stranger.lost
        assert stranger.reason is not None
        self.assertIsNotNone(stranger.reason.check(NotAuthorized), stranger.reason)

        page = (await http_get(base + "/metrics")).body
        self.assertEqual(handshakes(page, "ok"), 1)
        self.assertEqual(handshakes(page, "not_authorized"), 1)
        self.assertEqual(figure(page, "curvetun_connections"), 1)
        self.assertEqual(figure(page, "curvetun_handshakes_in_progress"), 0)
        self.assertEqual(figure(page, "curvetun_bytes_received_total"), 5)
        self.assertEqual(figure(page, "curvetun_bytes_sent_total"), 5)
        self.assertEqual(
            samples(page)[
                "curvetun_connections_refused_total", (("limit", "connections_per_address"),)
            ],
            0,
        )

        status = await http_get(base + "/status")
        self.assertEqual(status.code, 200)
        self.assertEqual(status.content_type, "application/json")
        document = json.loads(status.body)
        [tunnel] = document["tunnels"]
        self.assertEqual(tunnel["server_keys"], [{"key": server_key.hex(), "role": "current"}])
        [connection] = tunnel["connections"]
        self.assertEqual(connection["peer_key"], client_key.hex())
        assert client.transport is not None
        local = client.transport.getHost()
        self.assertEqual(connection["address"], f"127.0.0.1:{local.port}")  # type: ignore[attr-defined]
        self.assertEqual((connection["bytes_received"], connection["bytes_sent"]), (5, 5))
        self.assertLessEqual(connection["started"], connection["last_message"])
        self.assertLessEqual(connection["last_message"], document["now"])

        out, err, code = await curvetun_process(["status", base], subprocess_env(self.home))
        self.assertEqual((code, err), (0, b""))
        text = out.decode()
        self.assertIn(f"peer: {fingerprint(client_key)}\n  key: {client_key.hex()}\n", text)
        self.assertIn("  transfer: 5 B received, 5 B sent\n", text)
        out, err, code = await curvetun_process(
            ["status", "--json", base + "/status"], subprocess_env(self.home)
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(
            json.loads(out)["tunnels"][0]["connections"][0]["peer_key"], client_key.hex()
        )

        # The connection ends: the gauge goes down, the counters stay.
        client.transport.loseConnection()
        await client.lost
        output = read_until(process, output, "curvetun connection with")
        [closed] = [
            e
            for e in parse_events(output)
            if e["log_format"].startswith("curvetun connection with")
        ]
        self.assertEqual(closed["key"], fingerprint(client_key))
        self.assertEqual((closed["received"], closed["sent"]), (5, 5))
        self.assertEqual(closed["peer"], f"127.0.0.1:{local.port}")  # type: ignore[attr-defined]
        self.assertGreaterEqual(closed["duration"], 0)
        page = (await http_get(base + "/metrics")).body
        self.assertEqual(figure(page, "curvetun_connections"), 0)
        self.assertEqual(figure(page, "curvetun_bytes_received_total"), 5)
        self.assertEqual(figure(page, "curvetun_bytes_sent_total"), 5)
        self.assertEqual(handshakes(page, "ok"), 1)

        health = await http_get(base + "/healthz")
        self.assertEqual((health.code, health.body), (200, b"ok\n"))
        # The counter can no longer be stored: a directory in its place
        # makes the atomic rename fail (root ignores file modes).
        counter = counter_file(server_keydir).path
        os.remove(counter)
        os.mkdir(counter)
        health = await http_get(base + "/healthz")
        self.assertEqual(health.code, 503)
        self.assertEqual(health.body.count(b"\n"), 1, health.body)
        self.assertIn(os.path.basename(counter).encode(), health.body)

        missing = await http_get(base + "/nothing")
        self.assertEqual(missing.code, 404)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
        self.assertNotIn(b"Traceback", output + stdout + stderr)

    def test_a_metrics_endpoint_that_cannot_listen_is_status_69_in_one_line(self) -> None:
        keydir, _ = make_keydir(self)
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            result = run_twist(
                self.home,
                "--listen",
                f"curvetun:0:{LOCALHOST}",
                "--keydir",
                keydir,
                "--metrics",
                f"tcp:{port}:{LOCALHOST}",
            )
        self.assertEqual(result.returncode, EX_UNAVAILABLE, result.stderr)
        [line] = result.stderr.splitlines()
        self.assertTrue(
            line.startswith(f"twist curvetun: metrics endpoint: cannot listen on tcp:{port}:"),
            line,
        )

    def test_a_malformed_metrics_endpoint_is_status_64_in_one_line(self) -> None:
        result = run_twist(self.home, "--metrics", "nonsense:1")
        self.assertEqual(result.returncode, EX_USAGE, result.stderr)
        [line] = result.stderr.splitlines()
        self.assertTrue(
            line.startswith("twist curvetun: bad --metrics endpoint 'nonsense:1'"), line
        )


class MetricsSettingTests(SynchronousTestCase):
    """
    C{--metrics} and the config file's C{metrics}.
    """

    def test_metrics_goes_with_config(self) -> None:
        options = Options()
        options.parseOptions(["--config", "tunnels.toml", "--metrics", "tcp:9100"])
        self.assertEqual(options["metrics"], "tcp:9100")

    def test_an_empty_metrics_option_is_a_usage_error(self) -> None:
        from twisted.python import usage

        error = self.assertRaises(usage.UsageError, Options().parseOptions, ["--metrics", " "])
        self.assertIn("--metrics needs an endpoint", str(error))

    def test_the_file_names_the_metrics_endpoint_at_the_top(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('metrics = "tcp:9100:interface=127.0.0.1"\n\n[[tunnel]]\nlisten = "tcp:0"\n')
        config = read_config(path)
        self.assertEqual(config.metrics, "tcp:9100:interface=127.0.0.1")
        self.assertEqual(config.metrics_where, f"{path}:1: ")
        self.assertEqual(len(config.tunnels), 1)

    def test_metrics_in_a_tunnel_table_is_an_unknown_key(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('[[tunnel]]\nlisten = "tcp:0"\nmetrics = "tcp:9100"\n')
        error = self.assertRaises(ConfigFileError, read_config, path)
        self.assertTrue(str(error).startswith(f"{path}:3: tunnel 1: unknown key 'metrics'"))

    def test_a_metrics_that_is_not_a_string_is_refused_with_its_line(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('[[tunnel]]\nlisten = "tcp:0"\n')
        with open(path, "r+") as f:
            text = f.read()
            f.seek(0)
            f.write("\nmetrics = 9100\n" + text)
        error = self.assertRaises(ConfigFileError, read_config, path)
        self.assertTrue(str(error).startswith(f"{path}:2: metrics must be"), str(error))


class ListenerFiguresTests(SynchronousTestCase):
    """
    L{ListenerFigures} follows a server factory's connections, in memory.
    """

    def test_established_connection_counts_and_bytes_outlive_it(self) -> None:
        peers = Peers()
        figures = ListenerFigures(peers.server_factory)
        client, server, pump = peers.connect()
        [client_app] = peers.client_apps.built
        [server_app] = peers.server_apps.built
        assert client_app.transport is not None and server_app.transport is not None
        client_app.transport.write(b"hello")
        pump.flush()
        server_app.transport.write(b"hey")
        pump.flush()
        now = figures.figures()
        self.assertEqual(now.handshakes["ok"], 1)
        self.assertEqual((now.connections, now.handshakes_in_progress), (1, 0))
        self.assertEqual((now.bytes_received, now.bytes_sent), (5, 3))
        self.assertEqual(list(figures.live), [server])
        client.loseConnection()
        pump.flush()
        later = figures.figures()
        self.assertEqual((later.connections, later.bytes_received, later.bytes_sent), (0, 5, 3))
        self.assertEqual(later.handshakes["ok"], 1)
        self.assertEqual(figures.live, {})

    def test_a_client_not_in_the_registry_is_counted_by_reason(self) -> None:
        peers = Peers()
        figures = ListenerFigures(peers.server_factory)
        peers.client = CurveTunService(MemoryVault.generate(), AllowList(), clock=peers.clock)
        peers.connect()
        counted = figures.figures()
        self.assertEqual(counted.handshakes["not_authorized"], 1)
        self.assertEqual(counted.handshakes["ok"], 0)
        self.assertEqual(counted.connections, 0)

    def test_a_refusal_at_a_limit_is_not_a_handshake(self) -> None:
        peers = Peers()
        figures = ListenerFigures(peers.server_factory)
        client, server, pump = peers.connect(greet=False)
        figures._ended(server, Failure(AdmissionRefused("refused at the limit")))
        self.assertEqual(sum(figures.figures().handshakes.values()), 0)


class FiguresTests(SynchronousTestCase):
    """
    L{Figures} as the collector reports them, summed and through JSON.
    """

    def test_every_result_and_limit_is_reported_from_the_start(self) -> None:
        figures = Figures()
        self.assertEqual(list(figures.handshakes), ["ok", *FAILURE_LABELS])
        self.assertEqual(set(figures.refused), set(REFUSAL_LIMITS))
        self.assertEqual(HANDSHAKE_RESULTS[0], "ok")

    def test_figures_of_workers_add_up_per_tunnel(self) -> None:
        one = Figures(connections=2, bytes_received=10, bytes_sent=1)
        one.handshakes["ok"] = 3
        two = Figures(connections=1, handshakes_in_progress=4, bytes_received=5)
        two.refused["handshakes"] = 7
        total = sum_figures([{"a": one}, {"a": two, "b": Figures(connections=9)}])
        self.assertEqual(list(total), ["a", "b"])
        self.assertEqual((total["a"].connections, total["a"].bytes_received), (3, 15))
        self.assertEqual(total["a"].handshakes["ok"], 3)
        self.assertEqual(total["a"].refused["handshakes"], 7)
        self.assertEqual(total["a"].handshakes_in_progress, 4)
        self.assertEqual(total["b"].connections, 9)

    def test_figures_go_through_json(self) -> None:
        figures = Figures(connections=2, bytes_sent=8)
        figures.handshakes["timeout"] = 4
        again = Figures.from_json(json.loads(json.dumps(figures.as_json())))
        self.assertEqual(again, figures)
        self.assertRaises(ValueError, Figures.from_json, {"connections": -1})
        self.assertRaises(ValueError, Figures.from_json, {"handshakes": {"ok": "1"}})
        self.assertRaises(ValueError, Figures.from_json, [])

    def test_the_collector_reads_the_figures_at_each_collection(self) -> None:
        current: dict[str, Figures] = {"web": Figures(connections=1)}
        registry = CollectorRegistry(auto_describe=False)
        registry.register(CurveTunCollector(lambda: current))
        first = generate_latest(registry)
        current["web"] = Figures(connections=4, bytes_received=100)
        current["web"].handshakes["ok"] = 5
        second = generate_latest(registry)
        self.assertIn(b'curvetun_connections{tunnel="web"} 1.0\n', first)
        self.assertIn(b'curvetun_connections{tunnel="web"} 4.0\n', second)
        self.assertIn(b'curvetun_handshakes_total{result="ok",tunnel="web"} 5.0\n', second)
        self.assertIn(b"# TYPE curvetun_bytes_received_total counter\n", second)
        self.assertIn(b'curvetun_bytes_received_total{tunnel="web"} 100.0\n', second)
        self.assertIn(b"# TYPE curvetun_handshakes_in_progress gauge\n", second)
        self.assertIn(
            b'curvetun_connections_refused_total{limit="handshakes_per_network",tunnel="web"} 0.0',
            second,
        )


class ServerKeysTests(SynchronousTestCase):
    """
    L{server_keys}: the keys a server answers to, for the status document.
    """

    def test_one_key(self) -> None:
        vault = MemoryVault.generate()
        self.assertEqual(server_keys(vault), [{"key": vault.public_key.hex(), "role": "current"}])

    def test_a_previous_key_during_a_rollover(self) -> None:
        class Rolling:
            public_key = b"\x01" * 32
            previous_public_key = b"\x02" * 32

        self.assertEqual(
            server_keys(Rolling()),
            [{"key": "01" * 32, "role": "current"}, {"key": "02" * 32, "role": "previous"}],
        )

    def test_keys_listed_current_first(self) -> None:
        class Listing:
            public_keys = [b"\x03" * 32, b"\x04" * 32]

        self.assertEqual([k["role"] for k in server_keys(Listing())], ["current", "previous"])


class CounterCheckTests(SynchronousTestCase):
    """
    L{FileVault.check_counter}: what C{/healthz} asks the vault.
    """

    def test_a_counter_that_can_be_stored_passes_and_is_unchanged(self) -> None:
        keydir, _ = make_keydir(self)
        vault = FileVault(keydir)
        self.addCleanup(vault.close)
        path = counter_file(keydir).path
        with open(path) as f:
            before = f.read()
        vault.check_counter()
        with open(path) as f:
            self.assertEqual(f.read(), before)

    def test_a_counter_that_cannot_be_stored_fails_with_its_path(self) -> None:
        from curvetun.errors import KeyFileError

        keydir, _ = make_keydir(self)
        vault = FileVault(keydir)
        self.addCleanup(vault.close)
        path = counter_file(keydir).path
        os.remove(path)
        os.mkdir(path)
        self.addCleanup(shutil.rmtree, path, True)
        error = self.assertRaises(KeyFileError, vault.check_counter)
        self.assertIn(os.path.basename(path), str(error))


class StatusRenderingTests(SynchronousTestCase):
    """
    The status document's extra fields leave L{render} as it was.
    """

    def test_render_reads_a_document_with_the_extensions(self) -> None:
        key = b"\x05" * 32
        document: dict[str, Any] = {
            "version": "0.1.0",
            "now": 100.0,
            "tunnels": [
                {
                    "name": "web",
                    "listen": ["curvetun:7700"],
                    "forward": None,
                    "server_keys": [{"key": key.hex(), "role": "current"}],
                    "connections": [
                        {
                            "peer_key": key.hex(),
                            "address": "127.0.0.1:4000",
                            "started": 90.0,
                            "bytes_received": 2048,
                            "bytes_sent": 10,
                            "last_message": 97.0,
                            "last_received": 97.0,
                            "last_sent": None,
                        }
                    ],
                }
            ],
        }
        text = render(document)
        self.assertIn("  latest message: 3 seconds ago\n", text)
        self.assertIn("  transfer: 2.00 KiB received, 10 B sent\n", text)


class ObserverTests(TestCase):
    """
    L{curvetun.metrics.Observer} over the real service of two tunnels that
    share one identity, in this process, with a real client.
    """

    async def test_connections_are_reported_under_their_tunnel(self) -> None:
        from curvetun.config import TunnelConfig
        from curvetun.monitoring import MonitoringListener
        from curvetun.tunnel_service import make_service

        server_keydir, server_key = make_keydir(self)
        client_keydir, client_key = make_keydir(self)
        admit(server_keydir, client_key)
        configs = [
            TunnelConfig(keydir=server_keydir, listen=(f"curvetun:0:{LOCALHOST}",), name=name)
            for name in ("first", "second")
        ]
        tunnels = make_service(configs, reactor, {}, metrics=f"tcp:0:{LOCALHOST}")
        [monitor] = tunnels.monitors
        assert isinstance(monitor, MonitoringListener)
        observer = monitor.observer
        self.assertEqual(observer.health(), "the tunnels are not running")
        tunnels.startService()
        self.addCleanup(tunnels.stopService)
        await tunnels.ready
        self.assertIsNone(observer.health())
        second = tunnels.tunnels[1].listeners[0].port
        assert second is not None
        client = Collector()
        endpoint = (
            f"curvetun:127.0.0.1:{second.getHost().port}:key={server_key.hex()}"  # type: ignore[attr-defined]
            f":keydir={client_keydir}"
        )
        await connectProtocol(clientFromString(reactor, endpoint), client)
        self.assertEqual(await round_trip(client, b"abc"), b"abc")

        figures = observer.figures()
        self.assertEqual(list(figures), ["first", "second"])
        self.assertEqual((figures["first"].connections, figures["second"].connections), (0, 1))
        self.assertEqual(figures["second"].bytes_received, 3)
        document = observer.status()
        self.assertEqual([t["name"] for t in document["tunnels"]], ["first", "second"])
        self.assertEqual(document["tunnels"][0]["connections"], [])
        [connection] = document["tunnels"][1]["connections"]
        self.assertEqual(connection["peer_key"], client_key.hex())
        self.assertIn(f"peer: {fingerprint(client_key)}", render(json.loads(json.dumps(document))))

        assert client.transport is not None
        client.transport.loseConnection()
        await client.lost
        await tunnels.stopService()
        self.assertEqual(observer.health(), "the tunnels are not running")
        self.assertIsNone(monitor.port)
        # What was counted stays after the stop.
        self.assertEqual(observer.figures()["second"].handshakes["ok"], 1)
