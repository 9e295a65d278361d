"""
One worker process under the supervisor of L{curvetun.workers}.

    python -m curvetun.worker_main --vault-socket PATH --config JSON
        --adopt FD:KIND ... [--control-fd FD] [--name NAME]

It connects to the vault process at C{PATH} and learns the public key from
it (it never opens the key directory's key files; it reads the registry),
adopts each inherited listening socket C{FD} (one per listen endpoint of
the tunnel configuration C{JSON}; C{KIND} is C{plain}, C{curvetun} or
C{curvetun-proxied}), and runs the tunnel on them as C{twist curvetun}
would, asking the vault for each handshake's long-term-key operations.
SIGTERM: stop accepting, let open connections finish for up to the grace
time, exit. SIGHUP: read the registry again.

With C{--control-fd FD} (the supervisor always gives it) the inherited
socket C{FD} is the worker's end of its control channel
(L{curvetun.worker_control}): once every listener listens and the signal
handlers are installed the worker says C{Ready}; then the supervisor
sends it C{Reload} (instead of a SIGHUP, which could reach a worker not
yet able to handle it) and C{Figures}. SIGHUP is ignored from the first
line of L{main} until the handler is installed, so that a SIGHUP sent to
a starting worker is not its end. When the channel closes, the supervisor
is gone: the worker stops as on SIGTERM (it drains) and exits, rather
than serve on as an orphan nobody restarts or stops.

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
from curvetun.tunnel_service import Identity, TunnelService

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
        ["control-fd", None, None, "The inherited end of the supervisor's control channel."],
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
        if self["control-fd"] is not None:
            text = self["control-fd"]
            if not (text.isascii() and text.isdigit() and len(text) < 6):
                raise usage.UsageError(f"--control-fd wants a descriptor number, not {text[:40]!r}")
            self["control-fd"] = int(text)


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


@attrs.define
class WorkerTunnels:
    """
    The tunnels of one worker and their identity, as an
    L{curvetun.metrics.Observer} observes them (their figures go to the
    supervisor, which serves the sum).
    """

    identities: list[Identity]
    tunnels: list[TunnelService]

    @property
    def running(self) -> int:
        """
        Whether every tunnel runs.
        """
        return int(all(tunnel.running for tunnel in self.tunnels))


async def run(reactor: Any, options: Options) -> int:
    """
    Connect to the vault, serve on every adopted socket until SIGTERM (or
    until the control channel closes), and drain.
    """
    from twisted.internet.endpoints import UNIXClientEndpoint

    from curvetun.handshake_vault import VaultUnavailable
    from curvetun.keys import fingerprint
    from curvetun.metrics import Observer
    from curvetun.remote_vault import RemoteVault
    from curvetun.tunnel_service import StartupError
    from curvetun.worker_control import WorkerControl, adopt

    name = options["name"]
    try:
        vault = await RemoteVault.connect(
            UNIXClientEndpoint(reactor, options["vault-socket"]), reactor
        )
    except VaultUnavailable as error:
        sys.stderr.write(f"curvetun {name}: {error}\n")
        return EX_UNAVAILABLE
    log.info("{name}: vault key {key}", name=name, key=fingerprint(vault.public_key))
    config: TunnelConfig = options["config"]
    try:
        tunnel = build_worker_tunnel(reactor, config, vault, options["adopt"])
    except StartupError as error:
        sys.stderr.write(f"curvetun {name}: {error}\n")
        await vault.stop()
        return error.status
    # Made before the listeners start: it follows the server factories as
    # they are made.
    observer = Observer(
        WorkerTunnels([Identity(tunnel.identity, config.keydir, config.registry, False)], [tunnel]),
        reactor,
    )

    stopped: Deferred[None] = Deferred()

    def reload() -> Deferred[object]:
        log.info("{name}: SIGHUP: reloading", name=name)
        rereading = getattr(tunnel.identity.registry, "reload", None)
        if rereading is None:
            return succeed(None)
        # A registry error is logged by the registry itself.
        reloaded: Deferred[object] = rereading()
        return reloaded

    def on_sighup(number: int, frame: object) -> None:
        reactor.callFromThread(lambda: reload().addErrback(lambda _: None))

    def stop() -> None:
        if not stopped.called:
            stopped.callback(None)

    def terminate(number: int, frame: object) -> None:
        reactor.callFromThread(stop)

    control = None
    if options["control-fd"] is not None:
        control = WorkerControl(reload, observer.figures)
        adopt(reactor, options["control-fd"], control)

        def supervisor_gone(_: None) -> None:
            if not stopped.called:
                log.info("{name}: the supervisor is gone (control channel closed)", name=name)
            stop()

        control.lost.addCallback(supervisor_gone)
    try:
        tunnel.privilegedStartService()
        tunnel.startService()
    except StartupError as error:
        sys.stderr.write(f"curvetun {name}: {error}\n")
        await vault.stop()
        return error.status
    signal.signal(signal.SIGHUP, on_sighup)
    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, terminate)
    if control is not None and not stopped.called:
        await tunnel.when_listening()
        # Ready means: every listener listens and the handlers above are
        # installed, so whatever the supervisor sends from now on is acted on.
        control.ready().addErrback(lambda _: None)
    await stopped
    log.info("{name}: stopping", name=name)
    await tunnel.stopService()
    await vault.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    """
    Run a worker; return its exit status.
    """
    # Until run() installs its handler, a SIGHUP (an operator's, sent to a
    # worker that is still starting) must not end the process: the
    # default action of SIGHUP is to terminate.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
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
