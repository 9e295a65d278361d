"""
One worker process under the supervisor of L{curvetun.workers}.

    python -m curvetun.worker_main --vault-socket PATH ... --config JSON
        --adopt FD:KIND ... [--control-fd FD] [--name NAME]

C{JSON} is the list of the tunnels to run (L{config_to_json}). The worker
connects to each vault process (one C{--vault-socket PATH} per identity
of the tunnels, numbered as L{vault_numbers} says: tunnels that would
share an identity in a single process share a vault) and learns each
public key from it (it never opens a key directory's key files; it reads
the registries), builds one identity per vault, adopts each inherited
listening socket C{FD} (one per listen endpoint of each tunnel, in the
order of the tunnels and their endpoints; C{KIND} is C{plain},
C{curvetun} or C{curvetun-proxied}), and runs the tunnels on them as
C{twist curvetun} would, asking the vaults for each handshake's
long-term-key operations. A tunnel's C{curvetun:} endpoint strings (a
curvetun C{--forward}: the client end of a tunnel) use that tunnel's
identity, and so its vault. SIGTERM: stop accepting, let open connections
finish for up to the grace time, exit. SIGHUP: read every registry again.

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

Exit status 69 (C{EX_UNAVAILABLE}) if a vault does not answer at start,
64 for a bad option, 78 for an unusable registry.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import Sequence
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
from curvetun.service import CurveTunService
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


def config_to_json(configs: TunnelConfig | Sequence[TunnelConfig]) -> str:
    """
    The tunnels' configurations, for a worker's command line: a JSON list
    (of one object per tunnel, in order).
    """
    if isinstance(configs, TunnelConfig):
        configs = [configs]
    # Where it was read from (a file, the command line) stays behind: it
    # only places the supervisor's own error messages.
    return json.dumps(
        [
            attrs.asdict(config, recurse=True, filter=lambda field, _: field.name != "source")
            for config in configs
        ]
    )


def config_from_json(text: str) -> list[TunnelConfig]:
    """
    The inverse of L{config_to_json} (one object, not in a list, is one
    tunnel).

    @raise ValueError: it is not one.
    """
    document = json.loads(text)
    if isinstance(document, dict):
        document = [document]
    if not isinstance(document, list) or not document:
        raise ValueError("not a list of tunnels")
    configs = []
    for data in document:
        data["listen"] = tuple(data["listen"])
        data["limits"] = ConnectionLimits(**data["limits"])
        configs.append(TunnelConfig(**data))
    return configs


def vault_numbers(configs: Sequence[TunnelConfig]) -> list[int]:
    """
    Which vault process each tunnel's identity is in: tunnels that share an
    identity in a single process (L{check_shared_identities}: one key
    directory and registry, agreeing on the settings of the identity) share
    a vault; the vaults are numbered from 0 in the order of their first
    tunnel. The supervisor and every worker number them by this one rule.

    @raise StartupError: two tunnels cannot share the key directory they
        name (status 64).
    """
    from curvetun.tunnel_service import check_shared_identities

    numbers: dict[int, int] = {}
    return [numbers.setdefault(owner, len(numbers)) for owner in check_shared_identities(configs)]


class Options(usage.Options):
    """
    The options of a worker (the supervisor gives them). After parsing,
    C{"config"} is the list of tunnels, C{"vault-socket"} the vaults'
    sockets (one per identity, in the order of L{vault_numbers}) and
    C{"vaults"} the vault number of each tunnel.
    """

    optParameters: ClassVar[list[list[str | None]]] = [
        ["config", None, None, "The tunnels' configuration, as JSON."],
        ["name", None, "worker", "This worker's name in the logs."],
        ["control-fd", None, None, "The inherited end of the supervisor's control channel."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["adopt"] = []
        self["vault-socket"] = []

    def opt_adopt(self, value: str) -> None:
        """
        Adopt the inherited listening socket FD, one per listen endpoint of
        the configuration, in order (FD:plain, FD:curvetun or
        FD:curvetun-proxied).
        """
        self["adopt"].append(parse_adopt(value))

    def opt_vault_socket(self, path: str) -> None:
        """
        The UNIX socket of a vault process: one per identity of the
        configuration, in the order of their first tunnel.
        """
        self["vault-socket"].append(path)

    def postOptions(self) -> None:
        from curvetun.tunnel_service import StartupError

        if not self["vault-socket"] or not self["config"]:
            raise usage.UsageError("--vault-socket and --config are required")
        try:
            self["config"] = config_from_json(self["config"])
        except (ValueError, TypeError, KeyError) as error:
            raise usage.UsageError(f"--config is not a tunnel configuration: {error}") from None
        if len(self["adopt"]) != sum(len(config.listen) for config in self["config"]):
            raise usage.UsageError("one --adopt for each listen endpoint")
        try:
            self["vaults"] = vault_numbers(self["config"])
        except StartupError as error:
            raise usage.UsageError(str(error)) from None
        if len(self["vault-socket"]) != max(self["vaults"]) + 1:
            raise usage.UsageError("one --vault-socket for each identity of the configuration")
        if self["control-fd"] is not None:
            text = self["control-fd"]
            if not (text.isascii() and text.isdigit() and len(text) < 6):
                raise usage.UsageError(f"--control-fd wants a descriptor number, not {text[:40]!r}")
            self["control-fd"] = int(text)


def build_worker_identity(
    reactor: Any, config: TunnelConfig, vault: IHandshakeVault
) -> CurveTunService:
    """
    The identity of C{config} (and of the tunnels sharing it) with C{vault}
    for its long-term key: the key directory is not opened, only the
    registry is read.

    @raise StartupError: the registry is unusable (status 78).
    """
    from curvetun.errors import RegistryError
    from curvetun.keydir import REGISTRY_FILE
    from curvetun.registry import FileRegistry
    from curvetun.tunnel_service import EX_CONFIG, StartupError

    registry_path = config.registry or os.path.join(config.keydir, REGISTRY_FILE)
    try:
        registry = FileRegistry(registry_path)
    except RegistryError as error:
        where = config.source.where("registry" if config.registry else "keydir")
        raise StartupError(where + str(error), EX_CONFIG) from error
    return CurveTunService(
        vault,  # type: ignore[arg-type]
        registry,
        clock=reactor,
        handshake_timeout=config.handshake_timeout,
        idle_timeout=config.idle_timeout,
        limits=config.limits,
        revoke_sessions=not config.keep_sessions_on_revoke,
    )


def adopt_identity(identity: CurveTunService, config: TunnelConfig, default: bool) -> None:
    """
    Make C{identity} that of the C{curvetun:} endpoint strings in this
    worker that name C{config}'s key directory (and, with C{default}, of
    those that name none): a curvetun C{--forward} uses the vault's
    identity, and the pool never loads a key directory in a worker.
    """
    from curvetun.tunnel_service import Identity

    Identity(identity, config.keydir, config.registry, False).adopt(default)


def build_worker_tunnel(
    reactor: Any,
    config: TunnelConfig,
    identity: CurveTunService,
    adopted: list[tuple[int, str]],
) -> TunnelService:
    """
    One tunnel of a worker: C{identity} (L{build_worker_identity}, run by
    the worker, possibly shared with other tunnels), serving on the
    adopted sockets, one per listen endpoint of C{config}.

    @raise StartupError: the forward endpoint is unusable.
    """
    from twisted.internet.endpoints import clientFromString
    from twisted.protocols.haproxy import proxyEndpoint

    from curvetun.endpoints import CurveTunServerEndpoint
    from curvetun.listeners import OpenConnections, TunnelListener
    from curvetun.tunnel import EchoFactory, ForwardingFactory, TrackingFactory
    from curvetun.tunnel_service import parse_endpoint

    # While this tunnel's strings are parsed, those that name no key
    # directory are this tunnel's (as in a single process).
    adopt_identity(identity, config, default=True)
    forward = None
    if config.forward is not None:
        forward = parse_endpoint(
            config.source.option("forward"),
            config.forward,
            clientFromString,
            reactor,
            config.source.where("forward"),
        )
    tunnel = TunnelService(config, identity, owns_identity=False)
    for (fd, kind), description in zip(adopted, config.listen, strict=True):
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
            factory = ForwardingFactory(
                forward, config.forward or "", connections, send_proxy=config.send_proxy
            )
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


def build_worker_tunnels(
    reactor: Any,
    configs: Sequence[TunnelConfig],
    vaults: Sequence[IHandshakeVault],
    numbers: Sequence[int],
    adopted: list[tuple[int, str]],
    name: str = "worker",
) -> WorkerTunnels:
    """
    Every tunnel of a worker: one identity per vault (C{vaults[n]} for the
    tunnels whose L{vault_numbers} is C{n}), and each tunnel on its share
    of the adopted sockets (in the order of the tunnels and their listen
    endpoints).

    @raise StartupError: a registry or a forward endpoint is unusable.
    """
    identities: list[Identity] = []
    services: dict[int, CurveTunService] = {}
    for config, number in zip(configs, numbers, strict=True):
        if number not in services:
            services[number] = build_worker_identity(reactor, config, vaults[number])
            identities.append(Identity(services[number], config.keydir, config.registry, False))
            adopt_identity(services[number], config, default=False)
    tunnels = []
    first = 0
    for config, number in zip(configs, numbers, strict=True):
        mine = adopted[first : first + len(config.listen)]
        first += len(config.listen)
        tunnels.append(build_worker_tunnel(reactor, config, services[number], mine))
    # As in a single process: strings that name no key directory are the
    # first tunnel's.
    adopt_identity(services[numbers[0]], configs[0], default=True)
    return WorkerTunnels(identities, tunnels, name)


@attrs.define
class WorkerTunnels:
    """
    The tunnels of one worker and their identities, as an
    L{curvetun.metrics.Observer} observes them (their figures go to the
    supervisor, which serves the sum). The worker runs the identities: it
    starts them before the tunnels and stops them once the tunnels have
    drained.
    """

    identities: list[Identity]
    tunnels: list[TunnelService]
    name: str = "worker"

    @property
    def running(self) -> int:
        """
        Whether every tunnel runs.
        """
        return int(all(tunnel.running for tunnel in self.tunnels))

    def start(self) -> None:
        """
        Start the identities, then listen.

        @raise StartupError: a listener cannot listen (what had started is
            stopped again by its tunnel).
        """
        for identity in self.identities:
            identity.service.startService()
        for tunnel in self.tunnels:
            tunnel.privilegedStartService()
        for tunnel in self.tunnels:
            tunnel.startService()

    def when_listening(self) -> Deferred[list[list[IListeningPort]]]:
        """
        Fires once every listener of every tunnel listens.
        """
        from twisted.internet.defer import gatherResults

        return gatherResults(
            [tunnel.when_listening() for tunnel in self.tunnels], consumeErrors=True
        )

    def reload(self) -> Deferred[object]:
        """
        Read every identity's registry again, and log one line for each
        (a registry error is logged by the registry itself, and keeps the
        entries it had).

        @return: fires once every registry has been read.
        """
        return Deferred.fromCoroutine(self._reload())

    async def _reload(self) -> object:
        failed: list[Exception] = []
        for identity in self.identities:
            rereading = getattr(identity.service.registry, "reload", None)
            if rereading is not None:
                # One registry that fails does not keep the others stale.
                try:
                    change = await rereading()
                except Exception as error:
                    failed.append(error)
                    continue
                log.info(
                    "{name}: registry of {keydir} read again: {added} added, {removed} removed",
                    name=self.name,
                    keydir=identity.keydir,
                    added=len(getattr(change, "added", ())),
                    removed=len(getattr(change, "removed", ())),
                )
        if failed:
            raise failed[0]
        return None

    async def stop(self) -> None:
        """
        Drain every tunnel at once, then stop the identities.
        """
        from twisted.internet.defer import DeferredList

        await DeferredList(
            [Deferred.fromCoroutine(_stopped(tunnel)) for tunnel in self.tunnels],
            consumeErrors=True,
        )
        for identity in self.identities:
            if identity.service.running:
                await _stopped(identity.service)


async def _stopped(service: Any) -> None:
    if service.running:
        stopping = service.stopService()
        if stopping is not None:
            await stopping


async def run(reactor: Any, options: Options) -> int:
    """
    Connect to every vault, serve on every adopted socket until SIGTERM (or
    until the control channel closes), and drain.
    """
    from twisted.internet.endpoints import UNIXClientEndpoint

    from curvetun.handshake_vault import VaultUnavailable
    from curvetun.keys import fingerprint
    from curvetun.metrics import Observer
    from curvetun.remote_vault import RemoteVault
    from curvetun.tunnel_service import StartupError, announce
    from curvetun.worker_control import WorkerControl, adopt

    name = options["name"]
    vaults: list[RemoteVault] = []

    async def close_vaults() -> None:
        for vault in vaults:
            await vault.stop()

    for path in options["vault-socket"]:
        try:
            vault = await RemoteVault.connect(UNIXClientEndpoint(reactor, path), reactor)
        except VaultUnavailable as error:
            sys.stderr.write(f"curvetun {name}: {error}\n")
            await close_vaults()
            return EX_UNAVAILABLE
        vaults.append(vault)
        log.info("{name}: vault key {key}", name=name, key=fingerprint(vault.public_key))
    configs: list[TunnelConfig] = options["config"]
    try:
        tunnels = build_worker_tunnels(
            reactor, configs, vaults, options["vaults"], options["adopt"], name
        )
    except StartupError as error:
        sys.stderr.write(f"curvetun {name}: {error}\n")
        await close_vaults()
        return error.status
    # Made before the listeners start: it follows the server factories as
    # they are made.
    observer = Observer(tunnels, reactor)

    stopped: Deferred[None] = Deferred()

    def reload() -> Deferred[object]:
        log.info("{name}: SIGHUP: reloading", name=name)
        return tunnels.reload()

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
    for identity in tunnels.identities:
        announce(identity.service, identity.keydir, False)
    try:
        tunnels.start()
    except StartupError as error:
        sys.stderr.write(f"curvetun {name}: {error}\n")
        await tunnels.stop()
        await close_vaults()
        return error.status
    signal.signal(signal.SIGHUP, on_sighup)
    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, terminate)
    if control is not None and not stopped.called:
        await tunnels.when_listening()
        # Ready means: every listener listens and the handlers above are
        # installed, so whatever the supervisor sends from now on is acted on.
        control.ready().addErrback(lambda _: None)
    await stopped
    log.info("{name}: stopping", name=name)
    await tunnels.stop()
    await close_vaults()
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
