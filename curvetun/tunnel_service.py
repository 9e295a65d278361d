"""
The service C{twist curvetun} runs (L{Tunnels}): one curvetun identity per
key directory and registry, shared by the tunnels that name them, and for
each L{TunnelConfig} a L{TunnelService} with one L{TunnelListener} per
listen endpoint; and L{StartupError}, with the exit status C{twist
curvetun} ends with when a tunnel cannot start.

Exit statuses (sysexits.h): 64 (C{EX_USAGE}) for a bad option, config file
or endpoint string, 78 (C{EX_CONFIG}) for an unusable key directory or
registry, 69 (C{EX_UNAVAILABLE}) when a listen endpoint cannot listen.

A service manager is told (L{curvetun.notify}) when every listener of
every tunnel is up (C{READY=1}), when a reload begins and ends
(C{RELOADING=1}, then C{READY=1}) and when the drain begins
(C{STOPPING=1}).

SIGHUP (under C{twist curvetun}) reloads every identity's registry and key
directory (L{Tunnels.reload}), keeps the process and its connections, and
logs one line saying what changed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn, TypeVar

import attrs
from twisted.application.service import IService, MultiService, Service
from twisted.internet.address import UNIXAddress
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.logger import Logger

from . import notify
from .addresses import format_address
from .config import ConfigFileError, TunnelConfig, read_config
from .endpoints import service_pool
from .errors import CurveTunError, KeyFileError, RegistryError
from .keydir import REGISTRY_FILE, SECRET_KEY_FILE
from .keys import format_public_key
from .listeners import CannotListen, OpenConnections, TunnelListener
from .reloading import Coalescing, ReloadOnSignal
from .service import CurveTunService, Reloaded
from .tunnel import EchoFactory, ForwardingFactory, TrackingFactory

# sysexits.h values (the os module has them only on Unix).
EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_CONFIG = 78

log = Logger()

_T = TypeVar("_T")


class StartupError(CurveTunError):
    """
    A tunnel cannot start: a bad endpoint string, an unusable key
    directory or registry, or a port it cannot listen on.

    @ivar status: the exit status C{twist curvetun} ends with.
    """

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class TunnelService(MultiService):
    """
    One tunnel: one L{TunnelListener} per listen endpoint, with the
    curvetun identity of its key directory (a L{CurveTunService}).

    On stop it stops listening everywhere at once, lets the open
    connections finish for up to the grace time, and aborts the rest. When
    it owns its identity (built alone by L{build_tunnel}) it then stops the
    identity and releases the key directory; an identity shared by several
    tunnels (L{make_service}) is their parent's, L{Tunnels}, to stop once
    they all have. A stopped tunnel cannot be started again.

    @ivar config: what the tunnel is.
    @ivar identity: the L{CurveTunService} of the key directory.
    @ivar owns_identity: whether the identity is this tunnel's own child.
    @ivar listeners: the L{TunnelListener}s, in the order of C{config.listen}.
    """

    def __init__(
        self,
        config: TunnelConfig,
        identity: CurveTunService,
        created: bool = False,
        owns_identity: bool = True,
    ) -> None:
        super().__init__()
        self.config = config
        self.identity = identity
        self.owns_identity = owns_identity
        self.listeners: list[TunnelListener] = []
        self._created = created
        self._released = False
        if owns_identity:
            identity.setServiceParent(self)

    @property
    def keydir(self) -> str:
        """
        The tunnel's key directory.
        """
        return self.config.keydir

    def add_listener(self, listener: TunnelListener) -> None:
        """
        Listen with C{listener} while running.
        """
        self.listeners.append(listener)
        listener.setServiceParent(self)

    def privilegedStartService(self) -> None:
        """
        Listen, before privileges are shed (under C{twistd}).

        @raise StartupError: a listen endpoint cannot listen; what had
            started is stopped again.
        """
        self._starting(super().privilegedStartService)

    def startService(self) -> None:
        """
        Start the identity (if it is the tunnel's own), say which it is,
        and listen.

        @raise StartupError: a listen endpoint cannot listen; what had
            started is stopped again.
        """
        if self.owns_identity:
            announce(self.identity, self.keydir, self._created)
        self._starting(super().startService)

    def _starting(self, start: Callable[[], None]) -> None:
        try:
            start()
        except CannotListen as error:
            self.stopService()
            raise StartupError(
                self.config.source.where("listen") + str(error), EX_UNAVAILABLE
            ) from None

    def stopService(self) -> Deferred[None]:
        """
        Stop listening, drain, and (if it is the tunnel's own) stop the
        identity and release the key directory (see the class docstring).

        Under C{twist}, SIGTERM and SIGINT do this before the reactor
        stops; C{twist} then ends the process with the same signal, as it
        does for every service (so the exit status is that of a process
        killed by SIGTERM, which supervisors such as systemd count as a
        clean stop).
        """
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        # MultiService would stop the identity at the same time as the
        # listeners; it stays up until their connections are gone.
        await _stop_all(self.listeners, "Stopping a listener failed")
        if self.owns_identity:
            stopped = self.identity.stopService()
            if stopped is not None:
                await stopped
            self.release()
            log.info("curvetun stopped")

    def release(self) -> None:
        """
        Withdraw the identity from endpoint strings and release its key
        directory (a L{curvetun.vault.FileVault} holds the directory's
        lock), if the identity is the tunnel's own. Idempotent; for a
        tunnel built but never started, the whole of its cleanup.
        """
        if self._released or not self.owns_identity:
            return
        self._released = True
        _release(self.identity)

    def when_listening(self) -> Deferred[list[IListeningPort]]:
        """
        A Deferred that fires, with the ports, once every listener listens.
        """
        return _all_of([listener.when_listening() for listener in self.listeners])


async def _stop_all(services: Sequence[IService], failed: str) -> None:
    """
    Stop C{services} at once and wait for them all; log those that fail.
    """
    stopping = [Deferred.fromCoroutine(_stopped(service)) for service in services]
    results = await DeferredList(stopping, consumeErrors=True)
    for succeeded, result in results:
        if not succeeded:
            log.failure(failed, result)


async def _stopped(service: IService) -> None:
    stopped = service.stopService()
    if stopped is not None:
        await stopped


def _all_of(waiting: list[Deferred[_T]]) -> Deferred[list[_T]]:
    """
    A Deferred that fires with every result once all of C{waiting} have.
    """

    def results(outcomes: list[tuple[bool, Any]]) -> list[_T]:
        return [result for _, result in outcomes]

    return DeferredList(waiting, fireOnOneErrback=True, consumeErrors=True).addCallback(results)


def _release(identity: CurveTunService) -> None:
    service_pool.forget(identity)
    close = getattr(identity.vault, "close", None)
    if close is not None:
        close()


def announce(identity: CurveTunService, keydir: str, created: bool) -> None:
    """
    Log which identity a tunnel runs with (and that its key directory was
    just created).
    """
    if created:
        log.info("Created key directory {keydir} with a new key", keydir=keydir)
    log.info(
        "curvetun public key {public_key} (key directory {keydir})",
        public_key=format_public_key(identity.vault.public_key),
        keydir=keydir,
    )


@attrs.define
class Identity:
    """
    A curvetun identity loaded for tunnels: the service, the key directory
    it was loaded from, and whether that was created just now.
    """

    service: CurveTunService
    keydir: str
    registry: str | None
    created: bool

    def adopt(self, default: bool) -> None:
        """
        Make it the identity of C{curvetun:} endpoint strings that name its
        key directory (and, with C{default}, of those that name none).
        """
        # With a registry of its own, also of those that name the directory
        # but no registry (the pool would refuse them: one registry per key
        # directory).
        service_pool.adopt(self.service, self.keydir, self.registry, default=default)
        if self.registry is not None:
            service_pool.adopt(
                self.service, self.keydir, os.path.join(self.keydir, REGISTRY_FILE), default=False
            )


def load_identity(config: TunnelConfig, reactor: Any) -> Identity:
    """
    Load (or create) the key directory and registry of C{config}, with its
    timeouts and limits, and make it the identity of C{curvetun:} endpoint
    strings that name its key directory.

    @raise StartupError: the key directory or the registry is unusable
        (status C{EX_CONFIG}); the message is one line.
    """
    keydir, registry = config.keydir, config.registry
    created = not os.path.exists(os.path.join(keydir, SECRET_KEY_FILE))
    try:
        service = CurveTunService.from_keydir(
            keydir,
            registry,
            create=True,
            clock=reactor,
            handshake_timeout=config.handshake_timeout,
            idle_timeout=config.idle_timeout,
            limits=config.limits,
            revoke_sessions=not config.keep_sessions_on_revoke,
            statedir=config.statedir,
            instance=config.instance,
            change_instance=config.change_instance,
        )
    except KeyFileError as error:
        raise StartupError(config.source.where("keydir") + str(error), EX_CONFIG) from error
    except RegistryError as error:
        where = config.source.where("registry" if registry is not None else "keydir")
        raise StartupError(where + str(error), EX_CONFIG) from error
    identity = Identity(service, keydir, registry, created)
    identity.adopt(default=False)
    return identity


def build_tunnel(
    config: TunnelConfig,
    reactor: Any = None,
    clock: IReactorTime | None = None,
    identity: Identity | None = None,
) -> TunnelService:
    """
    Build the service of one tunnel: load (or create) the key directory,
    unless C{identity} is given, make it the identity of C{curvetun:}
    endpoint strings that name it and of those that name none, and parse
    the endpoints.

    @param clock: times the grace period (default: C{reactor}).
    @param identity: the identity to use, shared with other tunnels (whose
        parent runs it); without it the tunnel loads and owns its own.
    @raise StartupError: the key directory, the registry or an endpoint
        string is unusable; the message is one line.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    owns_identity = identity is None
    if identity is None:
        identity = load_identity(config, reactor)
    # While this tunnel's strings are parsed, those that name no key
    # directory are this tunnel's.
    identity.adopt(default=True)
    source = config.source
    try:
        forward: tuple[IStreamClientEndpoint, str] | None = None
        if config.forward is not None:
            forward = (
                parse_endpoint(
                    source.option("forward"),
                    config.forward,
                    clientFromString,
                    reactor,
                    source.where("forward"),
                ),
                config.forward,
            )
        listens = [
            (
                description,
                parse_endpoint(
                    source.option("listen"),
                    description,
                    serverFromString,
                    reactor,
                    source.where("listen"),
                ),
            )
            for description in config.listen
        ]
    except StartupError:
        if owns_identity:
            _release(identity.service)
        raise
    service = TunnelService(config, identity.service, identity.created, owns_identity)
    for description, endpoint in listens:
        connections = OpenConnections()
        factory: TrackingFactory
        if forward is None:
            factory = EchoFactory(connections)
        else:
            factory = ForwardingFactory(*forward, connections, send_proxy=config.send_proxy)
        service.add_listener(
            TunnelListener(
                endpoint,
                description,
                factory,
                connections,
                config.grace,
                clock if clock is not None else reactor,
                serving=config.serving,
            )
        )
    return service


def parse_endpoint(
    option: str,
    description: str,
    parse: Callable[[Any, str], _T],
    reactor: Any,
    where: str = "",
) -> _T:
    """
    Parse an endpoint string with C{parse} (C{serverFromString} or
    C{clientFromString}).

    @param option: the setting, as the operator spells it (C{"--listen"}).
    @param where: what the message starts with (the file and line).
    @raise StartupError: it is malformed (status C{EX_USAGE}); the message
        is one line.
    """
    if _ends_in_a_lone_backslash(description):
        # Twisted's tokenizer fails on it with a RuntimeError (a
        # StopIteration inside its generator); say what is wrong instead.
        raise StartupError(
            f"{where}bad {option} endpoint {description[:80]!r}: it ends with a lone backslash "
            "(escape a backslash as \\\\)",
            EX_USAGE,
        )
    try:
        return parse(reactor, description)
    except (ValueError, TypeError, KeyError, RuntimeError) as error:
        # TypeError: a parser given keywords it does not take (tcp:1:foo=2).
        # RuntimeError: what Twisted's tokenizer raises on input it does
        # not expect (checked above for the one case known).
        why = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise StartupError(
            f"{where}bad {option} endpoint {description[:80]!r}: {why}", EX_USAGE
        ) from None


def _ends_in_a_lone_backslash(description: str) -> bool:
    trailing = len(description) - len(description.rstrip("\\"))
    return trailing % 2 == 1


def _identity_settings(config: TunnelConfig) -> dict[str, object]:
    """
    The settings that belong to an identity (its L{CurveTunService}
    applies them to every connection), so that tunnels sharing one must
    agree on them.
    """
    settings: dict[str, object] = {
        "handshake_timeout": config.handshake_timeout,
        "idle_timeout": config.idle_timeout,
        "keep_sessions_on_revoke": config.keep_sessions_on_revoke,
        "statedir": None
        if config.statedir is None
        else os.path.realpath(os.path.expanduser(config.statedir)),
        "instance": config.instance,
    }
    for name, value in attrs.asdict(config.limits).items():
        settings[f"max_{name}"] = value
    return settings


def _identity_key(config: TunnelConfig) -> tuple[str, str]:
    keydir = os.path.realpath(os.path.expanduser(config.keydir))
    registry = config.registry or os.path.join(keydir, REGISTRY_FILE)
    return keydir, os.path.realpath(os.path.expanduser(registry))


def check_shared_identities(configs: Sequence[TunnelConfig]) -> list[int]:
    """
    Which identity each tunnel uses: tunnels that name the same key
    directory and registry share one (one vault, one nonce counter, one
    lock on the directory, as an operator expects of one directory).

    @return: for each config, the index of the first config with its
        identity.
    @raise StartupError: two tunnels name one key directory with different
        registries, or disagree on a setting that belongs to the identity
        (timeouts, limits, revocation); status C{EX_USAGE}.
    """
    first: dict[tuple[str, str], int] = {}
    by_keydir: dict[str, int] = {}
    owners = []
    for index, config in enumerate(configs):
        key = _identity_key(config)
        if key not in first and key[0] in by_keydir:
            other = by_keydir[key[0]]
            raise StartupError(
                f"{config.source.where('registry' if config.registry else 'keydir')}"
                f"key directory {config.keydir} is that of tunnel {other + 1} too, with "
                f"another registry: tunnels that share a key directory share its registry",
                EX_USAGE,
            )
        owner = first.setdefault(key, index)
        by_keydir.setdefault(key[0], index)
        ours, theirs = _identity_settings(config), _identity_settings(configs[owner])
        for setting, value in ours.items():
            if value != theirs[setting]:
                raise StartupError(
                    f"{config.source.where(setting)}{setting} is not that of tunnel "
                    f"{owner + 1}, which has the same key directory: tunnels that share a "
                    "key directory share its timeouts and limits",
                    EX_USAGE,
                )
        owners.append(owner)
    return owners


def make_service(
    configs: Sequence[TunnelConfig],
    reactor: Any = None,
    environ: Mapping[str, str] | None = None,
    metrics: str | None = None,
    metrics_where: str = "",
    reload_signal: int | None = None,
) -> Tunnels:
    """
    The service of C{twist curvetun}: one identity per key directory and
    registry (see L{check_shared_identities}), one L{TunnelService} per
    config, under a L{Tunnels} parent that turns a L{StartupError} into a
    one-line message on stderr and the error's exit status (C{twist}
    handles only the usage errors raised while parsing options, and would
    print a traceback). The first config's identity is the default of
    C{curvetun:} endpoint strings that name no key directory.

    @param environ: where to find C{NOTIFY_SOCKET} (default: the process's).
    @param metrics: the server endpoint string of the monitoring endpoint
        (L{curvetun.monitoring}), or L{None} for none; C{metrics_where}
        starts a message about it (the file and line).
    @param reload_signal: the signal that reloads (L{Tunnels.reload}) while
        the reactor runs (C{twist curvetun}: SIGHUP), or L{None} for none.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    identities: dict[int, Identity] = {}
    built: list[TunnelService] = []
    metrics_endpoint = None
    try:
        if metrics is not None:
            metrics_endpoint = parse_endpoint(
                "--metrics", metrics, serverFromString, reactor, metrics_where
            )
        owners = check_shared_identities(configs)
        for index, config in enumerate(configs):
            owner = owners[index]
            if owner not in identities:
                identities[owner] = load_identity(config, reactor)
            built.append(build_tunnel(config, reactor, identity=identities[owner]))
    except StartupError as error:
        for identity in identities.values():
            _release(identity.service)
        _exit(error)
    if configs:
        identities[0].adopt(default=True)
    tunnels = Tunnels(list(identities.values()), built, reactor, environ)
    if metrics_endpoint is not None and metrics is not None:
        from .metrics import Observer
        from .monitoring import MonitoringListener

        observer = Observer(tunnels, reactor)
        tunnels.add_monitor(
            MonitoringListener(metrics_endpoint, metrics, observer, reactor, metrics_where)
        )
    if reload_signal is not None:
        ReloadOnSignal(tunnels.reload, reactor, reload_signal).setServiceParent(tunnels)
    return tunnels


def make_service_from_file(
    path: str,
    reactor: Any = None,
    environ: Mapping[str, str] | None = None,
    metrics: str | None = None,
    reload_signal: int | None = None,
    change_instance: bool = False,
) -> Tunnels:
    """
    L{make_service} for the tunnels of a config file
    (L{curvetun.config.read_config}); a file that cannot be used exits
    with status C{EX_USAGE} and one line naming the file, the line and the
    key. C{metrics} (C{--metrics}) overrides the file's C{metrics};
    C{change_instance} (C{--change-instance}) applies to every tunnel.
    """
    try:
        process = read_config(path)
    except ConfigFileError as error:
        _exit(StartupError(str(error), EX_USAGE))
    tunnels = process.tunnels
    if change_instance:
        tunnels = [attrs.evolve(config, change_instance=True) for config in tunnels]
    if metrics is None:
        return make_service(
            tunnels,
            reactor,
            environ,
            process.metrics,
            process.metrics_where,
            reload_signal=reload_signal,
        )
    return make_service(tunnels, reactor, environ, metrics, reload_signal=reload_signal)


class Tunnels(MultiService):
    """
    The tunnels of one process, and the identities they share.

    Starting starts the identities, then the tunnels; once every listener
    of every tunnel listens, the service manager is told C{READY=1} with a
    C{STATUS} naming where (L{curvetun.notify.ready}). A L{StartupError}
    on start exits with its status after releasing the key directories.

    Stopping tells the manager C{STOPPING=1}, drains every tunnel at once,
    then stops the identities and releases their key directories.

    A reload (L{reload}; on SIGHUP under C{twist curvetun}) reads every
    identity's registry and key directory again, keeping the listeners and
    the connections, and logs one line saying what changed; the manager is
    told C{RELOADING=1} before and C{READY=1} after.

    @ivar identities: the L{Identity}s, each run once whatever the number
        of tunnels using it.
    @ivar tunnels: the L{TunnelService}s, in the order of the configs.
    @ivar ready: fires (with L{None}) once the manager has been told the
        tunnels are ready; never if a listener fails to listen.
    @ivar environ: where C{NOTIFY_SOCKET} is found (L{None}: the process's
        environment).
    @ivar monitors: services that report on the tunnels (the metrics
        endpoint): started after them, stopped once they have drained.
    """

    def __init__(
        self,
        identities: list[Identity],
        tunnels: list[TunnelService],
        reactor: Any,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.identities = identities
        self.tunnels = tunnels
        self.reactor = reactor
        self.environ = environ
        self.ready: Deferred[None] = Deferred()
        self.monitors: list[IService] = []
        self._released = False
        self._reloads: Coalescing[str] = Coalescing(lambda: Deferred.fromCoroutine(self._reload()))
        for identity in identities:
            identity.service.setServiceParent(self)
        for tunnel in tunnels:
            tunnel.setServiceParent(self)

    def add_monitor(self, monitor: IService) -> None:
        """
        Run C{monitor} with the tunnels (see L{monitors}).
        """
        self.monitors.append(monitor)
        monitor.setServiceParent(self)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except StartupError as error:
            self._abandon()
            _exit(error)

    def startService(self) -> None:
        for identity in self.identities:
            announce(identity.service, identity.keydir, identity.created)
        try:
            super().startService()
        except StartupError as error:
            self._abandon()
            _exit(error)
        # A listen that fails later is logged by its listener, and the
        # tunnels are never reported ready (the manager's start times out).
        waiting = _all_of([tunnel.when_listening() for tunnel in self.tunnels])
        # Told once the reactor runs: ready means serving, not only bound.
        waiting.addCallback(lambda _: self.reactor.callWhenRunning(self._tell_ready))

    def _tell_ready(self) -> None:
        if self.running:
            notify.ready(self.status_line(), self.environ)
            if not self.ready.called:
                self.ready.callback(None)

    def status_line(self) -> str:
        """
        What the tunnels serve, for the manager's C{STATUS}: every address
        listened on, and how many tunnels.
        """
        addresses = [
            _describe(listener.port.getHost())
            for tunnel in self.tunnels
            for listener in tunnel.listeners
            if listener.port is not None
        ]
        count = len(self.tunnels)
        return f"{count} tunnel{'s' if count != 1 else ''} listening on {', '.join(addresses)}"

    def reload(self) -> Deferred[str]:
        """
        Reload every identity's registry and key directory
        (L{CurveTunService.reload}), tell the manager (C{RELOADING=1}, then
        C{READY=1}), and log one line saying what changed::

            curvetun reloaded: registry /etc/curvetun/registry: 2 entries
            added, 1 removed; keys unchanged

        A request made while a reload runs is served by one more reload
        after it, shared by all made meanwhile (L{Coalescing}).

        @return: fires with the line logged.
        """
        return self._reloads.request()

    async def _reload(self) -> str:
        # Before the first READY=1 the manager is still waiting for the
        # start: a reload then must not tell it the service is ready.
        tell = self.ready.called
        if tell:
            notify.reloading(self.environ)
        try:
            several = len(self.identities) > 1
            phrases: list[str] = []
            for identity in self.identities:
                reloaded: Reloaded = await identity.service.reload()
                phrases += reloaded.phrases(identity.keydir if several else None)
            changes = "; ".join(phrases)
            log.info("curvetun reloaded: {changes}", changes=changes)
            return f"curvetun reloaded: {changes}"
        finally:
            if tell and self.running:
                notify.ready(self.status_line(), self.environ)

    def stopService(self) -> Deferred[None]:
        """
        Tell the manager, drain every tunnel, then stop the identities and
        release their key directories.
        """
        if not self.running:
            return succeed(None)
        notify.stopping(self.environ)
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await _stop_all(self.tunnels, "Stopping a tunnel failed")
        # The drain can be watched to its end.
        await _stop_all(self.monitors, "Stopping the metrics endpoint failed")
        await _stop_all([i.service for i in self.identities], "Stopping an identity failed")
        # The rest (the reload signal's handler): kept through the drain,
        # so that a SIGHUP then reloads rather than ends the process.
        await _stop_all(self._others(), "Stopping a service failed")
        self.release()
        log.info("curvetun stopped")

    def _others(self) -> list[IService]:
        """
        The running children that are neither a tunnel nor an identity.
        """
        mine = {id(s) for s in [*self.tunnels, *(i.service for i in self.identities)]}
        return [s for s in self if id(s) not in mine and s.running]

    def _abandon(self) -> None:
        """
        A tunnel could not start: stop what did (nothing is open yet, so
        nothing waits) and release the key directories.
        """
        Service.stopService(self)
        for service in [*self.tunnels, *(i.service for i in self.identities), *self._others()]:
            if service.running:
                service.stopService()
        self.release()

    def release(self) -> None:
        """
        Withdraw the identities from endpoint strings and release their key
        directories. Idempotent.
        """
        if self._released:
            return
        self._released = True
        for identity in self.identities:
            _release(identity.service)


def _describe(address: IAddress) -> str:
    """
    A listening address for the manager's status: C{host:port}, or a UNIX
    socket's path.
    """
    if isinstance(address, UNIXAddress) and address.name is not None:
        name = address.name
        return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
    return format_address(address)


def _exit(error: StartupError) -> NoReturn:
    sys.stderr.write(f"twist curvetun: {error}\n")
    sys.stderr.flush()
    raise SystemExit(error.status)
