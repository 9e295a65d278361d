"""
A fleet behind a real HAProxy: two C{twist curvetun} instances of one
identity, balanced round robin by HAProxy in TCP mode with PROXY headers
(version 1 and version 2), its health checks on.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint, clientFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from curvetun.channel import MessageChannel, connect
from curvetun.errors import NotAuthorized
from curvetun.keydir import LOCK_FILE
from curvetun.keys import format_public_key
from curvetun.registry import FileRegistry
from curvetun.vault import FileVault

from ._haproxy import HAPROXY, NO_HAPROXY, HAProxy, dying_with_us, eventually, start_haproxy
from ._support import (
    SOURCE_ROOT,
    counter_file,
    forget_keydir,
    metrics_port,
    parse_events,
    tcp_port,
    twist_environ,
)

ADMITTED = "127.0.0.2"
"""The source address the registry admits the client's key from."""

REFUSED = "127.0.0.3"
"""Another source address, with the same key: the registry admits nothing from it."""

CONNECTIONS = 4
"""New connections from each source address while both instances run."""


class _Tag(Protocol):
    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(self.factory.tag)


class TagFactory(Factory):
    """
    A backend that answers anything with C{tag}: which instance forwarded
    the connection.
    """

    protocol = _Tag

    def __init__(self, tag: bytes) -> None:
        self.tag = tag


@attrs.define
class Instance:
    """
    One running C{twist curvetun} server: its process, the file of its
    JSON log (at debug level), the port it listens on and, with
    C{--metrics}, the port of its monitoring endpoint.
    """

    process: subprocess.Popen[bytes]
    log: str
    metrics: bool = False
    port: int = 0
    metrics_port: int = 0

    def logged(self) -> bytes:
        """
        The log so far (nothing before twist opens it).
        """
        try:
            with open(self.log, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return b""

    def events(self) -> list[dict[str, Any]]:
        """
        The events logged so far.
        """
        return parse_events(self.logged())

    def events_like(self, format_start: str) -> list[dict[str, Any]]:
        """
        The events so far whose format begins with C{format_start}.
        """
        return [e for e in self.events() if e.get("log_format", "").startswith(format_start)]

    async def listening(self) -> None:
        """
        Wait until the instance listens, and learn its ports.
        """
        listeners = 2 if self.metrics else 1
        await eventually(
            lambda: (
                self.process.poll() is not None
                or len(self.events_like("Listening on")) == listeners
            ),
            lambda: f"the instance did not listen: {self.events()}",
            # A loaded machine can take long to start a Python process.
            timeout=60,
        )
        self.check_running()
        [self.port] = [
            int(event["address"].rpartition(":")[2])
            for event in self.events_like("Listening on")
            if event["endpoint"].startswith("curvetun:")
        ]
        if self.metrics:
            self.metrics_port = metrics_port(self.logged())

    def check_running(self) -> None:
        status = self.process.poll()
        assert status is None, f"the instance exited with status {status}: {self.logged()!r}"

    def stop(self) -> None:
        """
        Kill the process if it still runs, and reap it.
        """
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)


def host(address: str) -> str:
    """
    The host of a logged C{host:port}.
    """
    return address.rpartition(":")[0]


class FleetBehindHAProxyTests(TestCase):
    """
    Two instances of one identity behind HAProxy, as docs/deploy.md
    ("Fleets") runs them:

      - the registry decides by the client address HAProxy reports in its
        PROXY header, never by HAProxy's own: a client key admitted from
        127.0.0.2 is served from there, and refused (L{NotAuthorized})
        from 127.0.0.3;
      - HAProxy balances both clients across both instances;
      - HAProxy's health checks, plain TCP ones (a close before any
        byte) and C{check-send-proxy} ones (a PROXY header, then a close),
        are never logged as failed handshakes;
      - when one instance is stopped (SIGTERM), its open connection is
        drained, the other instance's connection carries on, and every new
        connection is served by the instance left.
    """

    skip = NO_HAPROXY

    async def test_two_instances_behind_send_proxy_v1(self) -> None:
        await self.fleet("send-proxy")

    async def test_two_instances_behind_send_proxy_v2(self) -> None:
        await self.fleet("send-proxy-v2")

    async def fleet(self, send_proxy: str) -> None:
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        keydirs, client_key = self.identities(base)
        registry = os.path.join(base, "registry")
        FileRegistry(registry).add(ADMITTED, client_key, "the admitted client")
        tags = [b"instance1", b"instance2"]
        instances = []
        for name, keydir, tag in zip(("instance1", "instance2"), keydirs, tags, strict=True):
            backend = await self.backend(tag)
            instances.append(self.start_instance(base, name, keydir, registry, backend))
        for instance in instances:
            await instance.listening()
        first, second = instances

        # Health checks every 500 ms (also the time a check may take to
        # connect); two failed ones take a server out.
        # The first instance has plain TCP checks (a connection closed
        # before any byte); the second has check-send-proxy (a PROXY header
        # and a close: in version 2 a LOCAL one, in version 1 the check's
        # own addresses).
        checks = "check inter 500ms fall 2 rise 1"
        haproxy = await start_haproxy(
            self,
            [
                ("instance1", first.port, f"{send_proxy} {checks}"),
                ("instance2", second.port, f"{send_proxy} {checks} check-send-proxy"),
            ],
        )
        await eventually(
            lambda: all(s["check_status"] == "L4OK" for s in haproxy.servers().values()),
            lambda: f"the checks did not pass: {haproxy.servers()}",
        )

        served = [await self.exchange(haproxy, ADMITTED) for _ in range(CONNECTIONS)]
        self.assertEqual(set(served), set(tags), "both instances serve the admitted client")
        for _ in range(CONNECTIONS):
            channel = await self.connect(haproxy, REFUSED)
            with self.assertRaises(NotAuthorized):
                await channel.recv()

        # One open connection on each instance, then the second is stopped.
        kept: dict[bytes, MessageChannel] = {}
        while len(kept) < 2:
            channel = await self.connect(haproxy, ADMITTED)
            await channel.send(b"which?")
            tag = await channel.recv()
            if tag in kept:
                await channel.close()  # an open one would hold up the drain
            else:
                kept[tag] = channel
        second.process.send_signal(signal.SIGTERM)
        await eventually(
            lambda: bool(second.events_like("Stopped listening")),
            lambda: f"the instance did not stop listening: {second.events()}",
        )
        # Its open connection is drained, not cut; once closed, it exits.
        await kept[b"instance2"].send(b"still there?")
        self.assertEqual(await kept[b"instance2"].recv(), b"instance2")
        await kept[b"instance2"].close()
        await eventually(
            lambda: second.process.poll() is not None,
            lambda: f"the instance did not exit: {second.events()[-5:]}",
        )
        self.assertEqual(second.process.returncode, -signal.SIGTERM)

        # The other instance's connection carries on, and new connections
        # all go to it: before HAProxy's checks mark the stopped one down
        # (those that HAProxy sends there are refused, and it sends them on:
        # option redispatch), and after.
        await kept[b"instance1"].send(b"still there?")
        self.assertEqual(await kept[b"instance1"].recv(), b"instance1")
        after = [await self.exchange(haproxy, ADMITTED) for _ in range(CONNECTIONS)]
        await eventually(
            lambda: haproxy.servers()["instance2"]["status"].startswith("DOWN"),
            lambda: f"HAProxy did not mark the stopped instance down: {haproxy.output()}",
        )
        after += [await self.exchange(haproxy, ADMITTED) for _ in range(CONNECTIONS)]
        self.assertEqual(set(after), {b"instance1"})
        await kept[b"instance1"].close()

        for instance in instances:
            self.assertServedOnlyByReportedAddresses(instance)

    async def test_haproxy_takes_out_an_instance_whose_health_endpoint_fails(self) -> None:
        """
        With C{option httpchk GET /healthz} and C{check port} on the
        instance's monitoring endpoint (docs/deploy.md), HAProxy sends
        connections to an instance while C{/healthz} answers 200, and
        takes it out once it answers 503 though its port still listens.
        """
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        [keydir, _], client_key = self.identities(base)
        registry = os.path.join(base, "registry")
        FileRegistry(registry).add(ADMITTED, client_key, "the admitted client")
        backend = await self.backend(b"instance1")
        instance = self.start_instance(base, "instance1", keydir, registry, backend, metrics=True)
        await instance.listening()
        haproxy = await start_haproxy(
            self,
            [
                (
                    "instance1",
                    instance.port,
                    f"send-proxy-v2 check port {instance.metrics_port} inter 300ms fall 2 rise 1",
                )
            ],
            ["option httpchk GET /healthz"],
        )
        await eventually(
            lambda: haproxy.servers()["instance1"]["check_status"] == "L7OK",
            lambda: f"the health check did not pass: {haproxy.servers()}",
        )
        self.assertEqual(await self.exchange(haproxy, ADMITTED), b"instance1")

        # The nonce counter can no longer be stored (a directory in its
        # place makes the atomic rename fail): /healthz answers 503.
        counter = counter_file(keydir).path
        os.remove(counter)
        os.mkdir(counter)
        await eventually(
            lambda: haproxy.servers()["instance1"]["status"].startswith("DOWN"),
            lambda: f"HAProxy kept the unhealthy instance: {haproxy.servers()}",
        )
        self.assertEqual(haproxy.servers()["instance1"]["check_status"], "L7STS")
        self.assertEqual(haproxy.servers()["instance1"]["check_code"], "503")
        instance.check_running()

    def assertServedOnlyByReportedAddresses(self, instance: Instance) -> None:
        """
        C{instance} forwarded connections from the admitted address and no
        other, refused the other address, and logged no other failed
        handshake; HAProxy's health checks reached it.
        """
        forwarded = instance.events_like("Connection from {peer}")
        self.assertEqual(
            {host(e["peer"]) for e in forwarded}, {ADMITTED}, f"forwarded: {instance.log}"
        )
        failed = instance.events_like("curvetun handshake with {peer} failed")
        self.assertEqual(
            {(host(e["peer"]), e["result"]) for e in failed},
            {(REFUSED, "not_authorized")},
            f"failed handshakes: {instance.log}",
        )
        # The checks did reach it (so that the line above means something).
        checks = instance.events_like("curvetun: connection from {peer} closed before any byte")
        self.assertTrue(checks, f"no health check seen: {instance.log}")

    def identities(self, base: str) -> tuple[list[str], bytes]:
        """
        Two copies of one server key directory, and a client key directory;
        the client's public key.
        """
        identity = os.path.join(base, "identity")
        server = FileVault.create(identity)
        server.close()
        self.server_key = format_public_key(server.public_key)
        copies = []
        for name in ("instance1", "instance2"):
            # Each instance has a copy of its own, and an instance ID of its
            # own (--instance), so that the copies never use the same nonce.
            copy = os.path.join(base, name, "keys")
            shutil.copytree(identity, copy, ignore=shutil.ignore_patterns(LOCK_FILE))
            copies.append(copy)
        client = os.path.join(base, "client")
        vault = FileVault.create(client)
        vault.close()
        self.addCleanup(forget_keydir, client)
        self.client_keydir = client
        return copies, vault.public_key

    async def backend(self, tag: bytes) -> int:
        """
        Listen for an instance's forwarded connections; answer with C{tag}.
        """
        port: IListeningPort = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            TagFactory(tag)
        )
        self.addCleanup(port.stopListening)
        return tcp_port(port)

    def start_instance(
        self, base: str, name: str, keydir: str, registry: str, backend: int, metrics: bool = False
    ) -> Instance:
        """
        Start C{twist curvetun} on the key directory C{keydir}, behind a
        PROXY header on a free port, forwarding to C{backend}; with
        C{metrics}, its monitoring endpoint on another.
        """
        log = os.path.join(base, name, "log.json")
        argv = [
            sys.executable, "-m", "twisted",
            "--log-format", "json", "--log-level", "debug", "--log-file", log,
            "curvetun",
            "--keydir", keydir,
            "--registry", registry,
            "--instance", name.removeprefix("instance"),
            "--listen", "curvetun:endpoint=haproxy\\:tcp\\:0\\:interface\\=127.0.0.1",
            "--forward", f"tcp:127.0.0.1:{backend}",
            *(["--metrics", "tcp:0:interface=127.0.0.1"] if metrics else []),
        ]  # fmt: skip
        with open(os.path.join(base, name, "output"), "wb") as output:
            process = subprocess.Popen(
                dying_with_us(argv),
                cwd=SOURCE_ROOT,
                env=twist_environ(os.path.join(base, name)),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        instance = Instance(process, log, metrics)
        self.addCleanup(instance.stop)
        return instance

    async def connect(self, haproxy: HAProxy, source: str) -> MessageChannel:
        """
        A curvetun connection through HAProxy, from the address C{source}.
        """
        endpoint = clientFromString(
            reactor,
            f"curvetun:endpoint=tcp\\:127.0.0.1\\:{haproxy.port}\\:bindAddress\\={source}"
            f":key={self.server_key}:keydir={self.client_keydir}",
        )
        channel = await connect(endpoint)
        self.addCleanup(channel.close)
        return channel

    async def exchange(self, haproxy: HAProxy, source: str) -> bytes:
        """
        Connect from C{source}, send a message and close: the tag of the
        instance that answered.
        """
        channel = await self.connect(haproxy, source)
        await channel.send(b"which?")
        tag = await channel.recv()
        await channel.close()
        return tag


DEPLOY = os.path.join(SOURCE_ROOT, "docs", "deploy.md")


class DeployGuideConfigTests(SynchronousTestCase):
    """
    The HAProxy configuration docs/deploy.md gives for a fleet is one
    HAProxy accepts, without a warning.
    """

    skip = NO_HAPROXY

    def configs(self) -> list[str]:
        """
        The guide's C{haproxy} blocks as whole configurations: a block that
        is only a backend takes the place of the first block's backend.
        """
        with open(DEPLOY) as f:
            blocks = re.findall(r"^ *```haproxy\n(.*?)^ *```", f.read(), re.DOTALL | re.MULTILINE)
        blocks = [textwrap.dedent(block) for block in blocks]
        full = blocks[0]
        backend = re.search(r"(?m)^backend ", full)
        assert backend is not None, full
        head = full[: backend.start()]
        return [full] + [head + block for block in blocks[1:] if block.startswith("backend ")]

    def test_the_guides_haproxy_configurations_are_valid(self) -> None:
        configs = self.configs()
        self.assertEqual(len(configs), 2, "a whole configuration and a health-endpoint backend")
        for number, config in enumerate(configs):
            path = os.path.abspath(self.mktemp())
            with open(path, "w") as f:
                f.write(config)
            assert HAPROXY is not None
            checked = subprocess.run(
                [HAPROXY, "-c", "-f", path], capture_output=True, text=True, timeout=30, check=False
            )
            output = checked.stdout + checked.stderr
            self.assertEqual(checked.returncode, 0, f"block {number}: {output}")
            self.assertNotIn("[WARNING]", output, f"block {number}: {output}")
            self.assertNotIn("[ALERT]", output, f"block {number}: {output}")
