"""
One worker process under the supervisor of L{curvetun.workers}.

    python -m curvetun.worker_main --vault-socket PATH --config JSON
        --adopt FD:KIND ... [--name NAME]

It connects to the vault process at C{PATH} and learns the public key from
it (it never opens the key directory's key files; it reads the registry),
adopts each inherited listening socket C{FD} (one per listen endpoint of
the tunnel configuration C{JSON}; C{KIND} is C{plain}, C{curvetun} or
C{curvetun-proxied}), and runs the tunnel on them as C{twist curvetun}
would, asking the vault for each handshake's long-term-key operations.
SIGTERM: stop accepting, let open connections finish for up to the grace
time, exit. SIGHUP: read the registry again.

Exit status 69 (C{EX_UNAVAILABLE}) if the vault does not answer at start,
64 for a bad option, 78 for an unusable registry.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from typing import Any, ClassVar

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage
from zope.interface import implementer

from curvetun.admission import ConnectionLimits
from curvetun.config import TunnelConfig
from curvetun.handshake_vault import IHandshakeVault
from curvetun.tunnel_service import TunnelService

log = Logger()

EX_USAGE = 64
EX_UNAVAILABLE = 69


@implementer(IStreamServerEndpoint)
class AdoptedPortEndpoint:
    """
    A server endpoint over a listening socket this process inherited:
    C{listen} adopts it (C{reactor.adoptStreamPort}), whatever its address
    family. The inherited descriptor is closed once adopted (the reactor
    keeps its own duplicate), so that stopping listening closes this
    process's last copy.
    """

    def __init__(self, reactor: Any, fd: int) -> None:
        self._reactor = reactor
        self._fd = fd

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        """
        Adopt the socket; fails if it is not a listening stream socket.
        """
        try:
            probe = socket.socket(fileno=os.dup(self._fd))
            family = probe.family
            probe.close()
            port: IListeningPort = self._reactor.adoptStreamPort(self._fd, family, protocolFactory)
            os.close(self._fd)
        except OSError as error:
            from twisted.internet.defer import fail

            return fail(error)
        return succeed(port)


KINDS = ("plain", "curvetun", "curvetun-proxied")
"""
What a worker runs on an adopted socket: the application alone, curvetun's
server side, or curvetun behind a PROXY header (C{haproxy:}).
"""


def parse_adopt(value: str) -> tuple[int, str]:
    """
    Parse C{FD:KIND}.

    @raise usage.UsageError: it is not that.
    """
    fd_text, _, kind = value.partition(":")
    if not (fd_text.isascii() and fd_text.isdigit() and len(fd_text) < 6) or kind not in KINDS:
        raise usage.UsageError(f"--adopt wants FD:{'|'.join(KINDS)}, not {value[:40]!r}")
    return int(fd_text), kind


def config_to_json(config: TunnelConfig) -> str:
    """
    The tunnel's configuration, for a worker's command line.
    """
    # Where it was read from (a file, the command line) stays behind: it
    # only places the supervisor's own error messages.
    return json.dumps(
        attrs.asdict(config, recurse=True, filter=lambda field, _: field.name != "source")
    )


def config_from_json(text: str) -> TunnelConfig:
    """
    The inverse of L{config_to_json}.

    @raise ValueError: it is not one.
    """
    data = json.loads(text)
    data["listen"] = tuple(data["listen"])
    data["limits"] = ConnectionLimits(**data["limits"])
    return TunnelConfig(**data)


class Options(usage.Options):
    """
    The options of a worker (the supervisor gives them).
    """

    optParameters: ClassVar[list[list[str | None]]] = [
        ["vault-socket", None, None, "The vault process's UNIX socket."],
        ["config", None, None, "The tunnel's configuration, as JSON."],
        ["name", None, "worker", "This worker's name in the logs."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["adopt"] = []

    def opt_adopt(self, value: str) -> None:
        """
        Adopt the inherited listening socket FD, one per listen endpoint of
        the configuration, in order (FD:plain, FD:curvetun or
        FD:curvetun-proxied).
        """
        self["adopt"].append(parse_adopt(value))

    def postOptions(self) -> None:
        if not self["vault-socket"] or not self["config"]:
            raise usage.UsageError("--vault-socket and --config are required")
        try:
            self["config"] = config_from_json(self["config"])
        except (ValueError, TypeError, KeyError) as error:
            raise usage.UsageError(f"--config is not a tunnel configuration: {error}") from None
        if len(self["adopt"]) != len(self["config"].listen):
            raise usage.UsageError("one --adopt for each listen endpoint")


def build_worker_tunnel(
    reactor: Any, config: TunnelConfig, vault: IHandshakeVault, adopted: list[tuple[int, str]]
) -> TunnelService:
    """
    The tunnel of one worker: the identity of C{config} with C{vault} for
    its long-term key (the key directory is not opened), serving on the
    adopted sockets.

    @raise StartupError: the registry or the forward endpoint is unusable.
    """
    import os

    from twisted.internet.endpoints import clientFromString
    from twisted.protocols.haproxy import proxyEndpoint

    from curvetun.endpoints import CurveTunServerEndpoint, service_pool
    from curvetun.errors import RegistryError
    from curvetun.keydir import REGISTRY_FILE
    from curvetun.listeners import OpenConnections, TunnelListener
    from curvetun.registry import FileRegistry
    from curvetun.service import CurveTunService
    from curvetun.tunnel import EchoFactory, ForwardingFactory, TrackingFactory
    from curvetun.tunnel_service import EX_CONFIG, StartupError, parse_endpoint

    registry_path = config.registry or os.path.join(config.keydir, REGISTRY_FILE)
    try:
        registry = FileRegistry(registry_path)
    except RegistryError as error:
        raise StartupError(str(error), EX_CONFIG) from error
    identity = CurveTunService(
        vault,  # type: ignore[arg-type]
        registry,
        clock=reactor,
        handshake_timeout=config.handshake_timeout,
        idle_timeout=config.idle_timeout,
        limits=config.limits,
    )
    # curvetun: endpoint strings in this worker (a curvetun --forward) use
    # the vault's identity too: the pool must never load the key directory.
    service_pool.adopt(identity, config.keydir, config.registry, default=True)
    if config.registry is not None:
        service_pool.adopt(
            identity, config.keydir, os.path.join(config.keydir, REGISTRY_FILE), default=False
        )
    forward = None
    if config.forward is not None:
        forward = parse_endpoint("--forward", config.forward, clientFromString, reactor)
    tunnel = TunnelService(config, identity)
    for (fd, kind), description in zip(adopted, config.listen, strict=False):
        endpoint: IStreamServerEndpoint = AdoptedPortEndpoint(reactor, fd)
        if kind == "curvetun-proxied":
            endpoint = CurveTunServerEndpoint(proxyEndpoint(endpoint), identity, proxied=True)
        elif kind == "curvetun":
            endpoint = CurveTunServerEndpoint(endpoint, identity)
        connections = OpenConnections()
        factory: TrackingFactory
        if forward is None:
            factory = EchoFactory(connections)
        else:
            factory = ForwardingFactory(forward, config.forward or "", connections)
        tunnel.add_listener(
            TunnelListener(
                endpoint,
                description,
                factory,
                connections,
                config.grace,
                reactor,
                serving=config.serving,
            )
        )
    return tunnel


async def run(reactor: Any, options: Options) -> int:
    """
    Connect to the vault, serve on every adopted socket until SIGTERM, and
    drain.
    """
    from twisted.internet.endpoints import UNIXClientEndpoint

    from curvetun.handshake_vault import VaultUnavailable
    from curvetun.keys import fingerprint
    from curvetun.remote_vault import RemoteVault
    from curvetun.tunnel_service import StartupError

    name = options["name"]
    try:
        vault = await RemoteVault.connect(
            UNIXClientEndpoint(reactor, options["vault-socket"]), reactor
        )
    except VaultUnavailable as error:
        sys.stderr.write(f"curvetun {name}: {error}\n")
        return EX_UNAVAILABLE
    log.info("{name}: vault key {key}", name=name, key=fingerprint(vault.public_key))
    try:
        tunnel = build_worker_tunnel(reactor, options["config"], vault, options["adopt"])
        tunnel.privilegedStartService()
        tunnel.startService()
    except StartupError as error:
        sys.stderr.write(f"curvetun {name}: {error}\n")
        await vault.stop()
        return error.status

    stopped: Deferred[None] = Deferred()

    def reload() -> None:
        log.info("{name}: SIGHUP: reloading", name=name)
        rereading = getattr(tunnel.identity.registry, "reload", None)
        if rereading is not None:
            # A registry error is logged by the registry itself.
            rereading().addErrback(lambda _: None)

    def on_sighup(number: int, frame: object) -> None:
        reactor.callFromThread(reload)

    def stop() -> None:
        if not stopped.called:
            stopped.callback(None)

    def terminate(number: int, frame: object) -> None:
        reactor.callFromThread(stop)

    signal.signal(signal.SIGHUP, on_sighup)
    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, terminate)
    await stopped
    log.info("{name}: stopping", name=name)
    await tunnel.stopService()
    await vault.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    """
    Run a worker; return its exit status.
    """
    from twisted.internet import reactor as default_reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    reactor: Any = default_reactor
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as error:
        sys.stderr.write(f"curvetun worker: {error}\n")
        return EX_USAGE
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    status: list[int] = []

    async def body() -> None:
        try:
            status.append(await run(reactor, options))
        finally:
            if reactor.running:
                reactor.stop()

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(body()))
    reactor.run(installSignalHandlers=False)
    return status[0] if status else 1


if __name__ == "__main__":
    sys.exit(main())
