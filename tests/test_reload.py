"""
Reload: SIGHUP makes C{twist curvetun} read every registry and key
directory again, keeping the process and its connections, with one log
line saying what changed and C{RELOADING=1}/C{READY=1} for the service
manager; a registry edit (SIGHUP or not) closes the connections it no
longer admits, unless C{--keep-sessions-on-revoke}.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.task import deferLater
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from curvetun.config import ConfigFileError, TunnelConfig, read_config_file
from curvetun.keys import fingerprint, format_public_key
from curvetun.registry import FileRegistry
from curvetun.reloading import Coalescing, ReloadOnSignal
from curvetun.tap import Options
from curvetun.tunnel_service import (
    StartupError,
    Tunnels,
    check_shared_identities,
    load_identity,
    make_service,
)
from curvetun.vault import FileVault

from ._support import (
    SOURCE_ROOT,
    Collector,
    KeyDirs,
    NotifySocket,
    capture_logs,
    events_like,
    forget_keydir,
    parse_events,
    read_until,
    round_trip,
    start_twist,
    subprocess_env,
)

LOCALHOST = "interface=127.0.0.1"


def curvetun_port(output: bytes) -> int:
    [event] = [
        e for e in parse_events(output) if e.get("log_format", "").startswith("Listening on")
    ]
    return int(event["address"].rpartition(":")[2])


class SighupCommandTests(TestCase):
    """
    C{twist curvetun} as a service manager runs it, with a real curvetun
    client connected over TCP.
    """

    def setUp(self) -> None:
        self.home = os.path.abspath(self.mktemp())
        self.keys = KeyDirs(self)
        self.manager = NotifySocket(self)

    async def start(self, *options: str) -> tuple[subprocess.Popen[bytes], Collector, bytes]:
        process = start_twist(
            self,
            self.home,
            "--keydir", self.keys.server,
            "--listen", f"curvetun:0:{LOCALHOST}",
            *options,
            NOTIFY_SOCKET=self.manager.path,
        )  # fmt: skip
        ready = self.manager.receive()
        assert ready is not None and ready["READY"] == "1", ready
        output = read_until(process, b"", "Listening on")
        endpoint = clientFromString(
            reactor,
            f"curvetun:127.0.0.1:{curvetun_port(output)}:"
            f"key={format_public_key(self.keys.server_key)}:keydir={self.keys.client}",
        )
        client = await connectProtocol(endpoint, Collector())
        self.assertEqual(await round_trip(client, b"before"), b"before")
        return process, client, output

    def revoke(self) -> None:
        # As an operator does it.
        untrust = ["untrust", "--keydir", self.keys.server, "127.0.0.1"]
        subprocess.run(
            [sys.executable, "-m", "curvetun", *untrust],
            cwd=SOURCE_ROOT,
            env=subprocess_env(self.home),
            check=True,
            capture_output=True,
            timeout=60,
        )
        registry = FileRegistry(os.path.join(self.keys.server, "registry"))
        self.assertEqual(registry.current.entries, ())

    async def closed_within(self, client: Collector, seconds: float) -> float:
        # The registry is polled every 0.5 s (SIGHUP: at once); a loaded
        # machine may run the server late, hence the margin the callers
        # give. Without a revocation the connection would stay open.
        started = time.monotonic()
        lost = client.lost.addTimeout(10, reactor)
        await lost
        elapsed = time.monotonic() - started
        self.assertLess(elapsed, seconds)
        return elapsed

    def revoked_line(self, process: subprocess.Popen[bytes], output: bytes) -> dict[str, Any]:
        output = read_until(process, output, "curvetun connection with")
        [line] = events_like(parse_events(output), "curvetun connection with")
        return dict(line)

    async def test_sighup_reloads_keeps_the_connection_and_tells_the_manager(self) -> None:
        process, client, output = await self.start()
        process.send_signal(signal.SIGHUP)
        reloading = self.manager.receive(timeout=10)
        assert reloading is not None
        self.assertEqual(reloading["RELOADING"], "1")
        self.assertIn("MONOTONIC_USEC", reloading)
        ready = self.manager.receive(timeout=10)
        assert ready is not None
        self.assertEqual(ready["READY"], "1")
        self.assertTrue(ready["STATUS"].startswith("1 tunnel listening on 127.0.0.1:"))
        output = read_until(process, output, "curvetun reloaded")
        [line] = events_like(parse_events(output), "curvetun reloaded")
        registry = os.path.join(self.keys.server, "registry")
        self.assertEqual(line["changes"], f"registry {registry}: unchanged; keys unchanged")
        # The process and the connection are still there.
        self.assertIsNone(process.poll())
        self.assertEqual(await round_trip(client, b"after"), b"after")
        # A second SIGHUP, the same.
        process.send_signal(signal.SIGHUP)
        read_until(process, output, "curvetun reloaded", count=2)
        self.assertEqual(await round_trip(client, b"again"), b"again")
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
        self.assertEqual(process.returncode, -signal.SIGTERM)

    async def test_untrust_and_sighup_close_the_connection_at_once(self) -> None:
        process, client, output = await self.start()
        self.revoke()
        process.send_signal(signal.SIGHUP)
        await self.closed_within(client, 3.0)
        line = self.revoked_line(process, output)
        self.assertEqual(line["why"], "revoked by the registry")
        self.assertEqual(line["key"], fingerprint(self.keys.client_key))
        self.assertIsNone(process.poll())

    async def test_an_edit_alone_closes_the_connection_at_the_next_poll(self) -> None:
        # No SIGHUP and no handshake: the revocation's poll finds the edit.
        process, client, output = await self.start()
        self.revoke()
        await self.closed_within(client, 3.0)
        self.assertEqual(self.revoked_line(process, output)["why"], "revoked by the registry")
        self.assertIsNone(process.poll())

    async def test_with_keep_sessions_on_revoke_the_connection_stays(self) -> None:
        process, client, output = await self.start("--keep-sessions-on-revoke")
        self.revoke()
        process.send_signal(signal.SIGHUP)
        output = read_until(process, output, "curvetun reloaded")
        [line] = events_like(parse_events(output), "curvetun reloaded")
        self.assertIn("0 entries added, 1 removed", line["changes"])
        self.assertEqual(await round_trip(client, b"still here"), b"still here")
        self.assertFalse(client.lost.called)
        self.assertEqual(
            events_like(parse_events(output), "curvetun connection with"),
            [],
        )


class ReloadSummaryTests(TestCase):
    """
    L{Tunnels.reload}: one line saying what changed, for each identity.
    """

    def setUp(self) -> None:
        self.logs = capture_logs(self)
        self.keys = KeyDirs(self)
        self.registry = os.path.join(self.keys.server, "registry")

    def tunnels(self, *configs: TunnelConfig, environ: dict[str, str] | None = None) -> Tunnels:
        tunnels = make_service(
            configs or [TunnelConfig(keydir=self.keys.server, listen=(f"tcp:0:{LOCALHOST}",))],
            reactor,
            environ or {},
        )
        tunnels.startService()
        self.addCleanup(tunnels.stopService)
        return tunnels

    def lines(self) -> list[str]:
        return [e["changes"] for e in events_like(self.logs, "curvetun reloaded")]

    async def test_entries_added_and_removed_are_counted_in_one_line(self) -> None:
        tunnels = self.tunnels()
        others = [FileVault.create(os.path.abspath(self.mktemp())) for _ in range(2)]
        for vault in others:
            vault.close()
        with open(self.registry, "w") as f:  # an editor's rewrite, not trust/untrust
            f.write("".join(f"10.0.0.{n} {format_public_key(v.public_key)}\n"
                            for n, v in enumerate(others)))  # fmt: skip
        line = await tunnels.reload()
        expected = f"registry {self.registry}: 2 entries added, 1 removed; keys unchanged"
        self.assertEqual(line, f"curvetun reloaded: {expected}")
        self.assertEqual(self.lines(), [expected])

    async def test_nothing_changed_says_so(self) -> None:
        tunnels = self.tunnels()
        await tunnels.reload()
        self.assertEqual(self.lines(), [f"registry {self.registry}: unchanged; keys unchanged"])

    async def test_a_revoked_connection_is_counted(self) -> None:
        tunnels = self.tunnels(
            TunnelConfig(keydir=self.keys.server, listen=(f"curvetun:0:{LOCALHOST}",))
        )
        [port] = await tunnels.tunnels[0].when_listening()
        endpoint = clientFromString(
            reactor,
            f"curvetun:127.0.0.1:{port.getHost().port}:"  # type: ignore[attr-defined]
            f"key={format_public_key(self.keys.server_key)}:keydir={self.keys.client}",
        )
        client = await connectProtocol(endpoint, Collector())
        self.assertEqual(await round_trip(client, b"x"), b"x")
        with open(self.registry, "w") as f:
            f.write("# nobody\n")
        await tunnels.reload()
        self.assertEqual(
            self.lines(),
            [f"registry {self.registry}: 0 entries added, 1 removed, 1 connection closed; "
             "keys unchanged"],
        )  # fmt: skip
        await client.lost

    async def test_a_malformed_registry_keeps_the_last_good_one_with_one_error(self) -> None:
        tunnels = self.tunnels()
        with open(self.registry, "a") as f:
            f.write("10.0.0.1 not-a-key\n")
        await tunnels.reload()
        errors = [e for e in self.logs if e.get("log_level") is not None
                  and e["log_level"].name == "error"]  # fmt: skip
        self.assertEqual(len(errors), 1, errors)
        self.assertEqual(
            self.lines(),
            [f"registry {self.registry}: not reloaded (see the error above), still the 1 entry "
             "read before; keys unchanged"],
        )  # fmt: skip
        service = tunnels.identities[0].service
        self.assertTrue(service.registry.is_client_allowed(self.keys.client_key, "127.0.0.1"))

    async def test_a_key_written_over_the_directory_without_its_counter_is_refused(self) -> None:
        """
        Key files replaced by hand (not by C{curvetun rotate}) bring no
        counter for the new key: starting it at 0 could reuse nonces, so
        the reload refuses it, in one line, and the key in use stays.
        """
        tunnels = self.tunnels()
        service = tunnels.identities[0].service
        in_use = service.vault.public_key
        # Another key pair written over the directory's (the lock is ours).
        replacement = os.path.abspath(self.mktemp())
        FileVault.create(replacement).close()
        for name in ("public.key", "secret.key"):
            with open(os.path.join(replacement, name), "rb") as f:
                data = f.read()
            path = os.path.join(self.keys.server, name)
            os.chmod(path, 0o600)
            with open(path, "wb") as f:
                f.write(data)
        await tunnels.reload()
        [error] = [e for e in self.logs if "did not reload the keys" in e.get("log_format", "")]
        self.assertIn("is missing; restore it from a backup", error["error"])
        self.assertEqual(
            self.lines(), [f"registry {self.registry}: unchanged; keys not reloaded (see the "
                           "error above)"]
        )  # fmt: skip
        self.assertEqual(service.vault.public_key, in_use)

    async def test_several_identities_each_say_what_changed(self) -> None:
        other = KeyDirs(self)
        tunnels = self.tunnels(
            TunnelConfig(keydir=self.keys.server, listen=(f"tcp:0:{LOCALHOST}",)),
            TunnelConfig(keydir=other.server, listen=(f"tcp:0:{LOCALHOST}",)),
        )
        await tunnels.reload()
        other_registry = os.path.join(other.server, "registry")
        self.assertEqual(
            self.lines(),
            [f"registry {self.registry}: unchanged; {self.keys.server}: keys unchanged; "
             f"registry {other_registry}: unchanged; {other.server}: keys unchanged"],
        )  # fmt: skip

    async def test_the_manager_hears_reloading_then_ready(self) -> None:
        manager = NotifySocket(self)
        tunnels = self.tunnels(environ={"NOTIFY_SOCKET": manager.path})
        await tunnels.ready
        manager.receive(timeout=5)  # the first READY=1
        await tunnels.reload()
        reloading = manager.receive(timeout=5)
        assert reloading is not None
        self.assertEqual(reloading["RELOADING"], "1")
        ready = manager.receive(timeout=5)
        assert ready is not None
        self.assertEqual(ready["READY"], "1")
        self.assertEqual(ready["STATUS"], tunnels.status_line())

    async def test_a_reload_before_the_service_is_ready_tells_the_manager_nothing(self) -> None:
        manager = NotifySocket(self)
        tunnels = self.tunnels(environ={"NOTIFY_SOCKET": manager.path})
        self.assertFalse(tunnels.ready.called)
        reloaded = tunnels.reload()
        await tunnels.ready
        await reloaded
        ready = manager.receive(timeout=5)
        assert ready is not None
        self.assertEqual(ready["READY"], "1")
        self.assertIsNone(manager.receive(timeout=0.2))


class CoalescingTests(SynchronousTestCase):
    """
    L{Coalescing}: one reload at a time; requests made meanwhile share one
    more.
    """

    def setUp(self) -> None:
        self.runs: list[Deferred[int]] = []

        def reload() -> Deferred[int]:
            d: Deferred[int] = Deferred()
            self.runs.append(d)
            return d

        self.reloads = Coalescing(reload)

    def test_requests_during_a_reload_share_one_more_after_it(self) -> None:
        first = self.reloads.request()
        during = [self.reloads.request() for _ in range(5)]
        self.assertEqual(len(self.runs), 1)
        self.runs[0].callback(1)
        self.assertEqual(self.successResultOf(first), 1)
        # The next one begins at once, for all five.
        self.assertEqual(len(self.runs), 2)
        self.assertEqual([d.called for d in during], [False] * 5)
        self.runs[1].callback(2)
        self.assertEqual([self.successResultOf(d) for d in during], [2] * 5)
        self.assertFalse(self.reloads.running)

    def test_a_request_after_a_reload_runs_a_new_one(self) -> None:
        self.reloads.request()
        self.runs[0].callback(1)
        later = self.reloads.request()
        self.assertEqual(len(self.runs), 2)
        self.runs[1].callback(2)
        self.assertEqual(self.successResultOf(later), 2)

    def test_a_failed_reload_fails_its_requests_and_the_next_one_runs(self) -> None:
        first = self.reloads.request()
        second = self.reloads.request()
        self.runs[0].errback(ValueError("bad"))
        self.failureResultOf(first, ValueError)
        self.runs[1].callback(2)
        self.assertEqual(self.successResultOf(second), 2)


class _ImmediateReactor:
    """
    The reactor calls L{ReloadOnSignal} makes: run at once.
    """

    def callWhenRunning(self, f: Any) -> None:
        f()

    def callFromThread(self, f: Any) -> None:
        f()


class ReloadOnSignalTests(TestCase):
    """
    L{ReloadOnSignal}: a handler installed once the reactor runs, that
    hands each signal to the reactor; the old handler is back once it
    stops.
    """

    def test_signals_during_a_reload_coalesce_into_one_more(self) -> None:
        runs: list[Deferred[None]] = []

        def reload() -> Deferred[None]:
            d: Deferred[None] = Deferred()
            runs.append(d)
            return d

        reloads = Coalescing(reload)
        service = ReloadOnSignal(reloads.request, _ImmediateReactor(), signal.SIGUSR1)
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        handler = signal.getsignal(signal.SIGUSR1)
        assert callable(handler)
        for _ in range(3):
            handler(signal.SIGUSR1, None)
        self.assertEqual(len(runs), 1)
        runs[0].callback(None)
        self.assertEqual(len(runs), 2)
        runs[1].callback(None)
        self.assertEqual(len(runs), 2)

    async def test_a_real_signal_reloads_and_stopping_restores_the_handler(self) -> None:
        before = signal.getsignal(signal.SIGUSR1)
        reloaded: Deferred[None] = Deferred()

        def reload() -> Deferred[None]:
            if not reloaded.called:
                reloaded.callback(None)
            return succeed(None)

        # Started while the reactor runs, as under twist once it has started.
        await deferLater(reactor, 0, lambda: None)
        service = ReloadOnSignal(reload, reactor, signal.SIGUSR1)
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        self.assertNotEqual(signal.getsignal(signal.SIGUSR1), before)
        os.kill(os.getpid(), signal.SIGUSR1)
        await reloaded.addTimeout(10, reactor)
        service.stopService()
        self.assertEqual(signal.getsignal(signal.SIGUSR1), before)


class KeepSessionsSettingTests(SynchronousTestCase):
    """
    C{--keep-sessions-on-revoke} and C{keep_sessions_on_revoke} in a
    C{[[tunnel]]} table.
    """

    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(list(argv))
        return options

    def write(self, text: str) -> str:
        path: str = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_the_option_turns_revocation_off_and_by_default_it_is_on(self) -> None:
        [config] = self.parse("--keydir", "/k", "--keep-sessions-on-revoke").tunnels
        self.assertTrue(config.keep_sessions_on_revoke)
        [config] = self.parse("--keydir", "/k").tunnels
        self.assertFalse(config.keep_sessions_on_revoke)

    def test_the_option_is_a_tunnel_setting_refused_with_config(self) -> None:
        error = self.assertRaises(
            UsageError, self.parse, "--config", "x.toml", "--keep-sessions-on-revoke"
        )
        self.assertIn("--keep-sessions-on-revoke", str(error))

    def test_the_file_key_is_a_boolean(self) -> None:
        path = self.write('[[tunnel]]\nlisten = "tcp:0"\nkeep_sessions_on_revoke = true\n')
        [config] = read_config_file(path)
        self.assertTrue(config.keep_sessions_on_revoke)
        path = self.write('[[tunnel]]\nlisten = "tcp:0"\nkeep_sessions_on_revoke = "yes"\n')
        error = self.assertRaises(ConfigFileError, read_config_file, path)
        self.assertEqual(
            str(error),
            f"{path}:3: tunnel 1: keep_sessions_on_revoke must be true or false, not a string",
        )

    def test_tunnels_of_one_key_directory_must_agree_on_it(self) -> None:
        path = self.write(
            '[[tunnel]]\nlisten = "tcp:0"\nkeydir = "k"\n'
            '[[tunnel]]\nlisten = "tcp:1"\nkeydir = "k"\nkeep_sessions_on_revoke = true\n'
        )
        error = self.assertRaises(StartupError, check_shared_identities, read_config_file(path))
        self.assertTrue(
            str(error).startswith(f"{path}:7: tunnel 2: keep_sessions_on_revoke is not that of"),
            str(error),
        )

    def test_the_identity_of_a_tunnel_that_keeps_sessions_has_no_revocation(self) -> None:
        keydir = os.path.abspath(self.mktemp())
        identity = load_identity(TunnelConfig(keydir=keydir, keep_sessions_on_revoke=True), reactor)
        self.addCleanup(forget_keydir, keydir)
        self.assertIsNone(identity.service.revocation)
        other = os.path.abspath(self.mktemp())
        identity = load_identity(TunnelConfig(keydir=other), reactor)
        self.addCleanup(forget_keydir, other)
        self.assertIsNotNone(identity.service.revocation)
