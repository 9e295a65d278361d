"""
The service C{twist curvetun} runs: for each L{TunnelConfig}, a
L{TunnelService} holding the tunnel's curvetun identity and one
L{TunnelListener} per listen endpoint; and L{StartupError}, with the exit
status C{twist curvetun} ends with when a tunnel cannot start.

Exit statuses (sysexits.h): 64 (C{EX_USAGE}) for a bad option or endpoint
string, 78 (C{EX_CONFIG}) for an unusable key directory or registry, 69
(C{EX_UNAVAILABLE}) when a listen endpoint cannot listen.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger

from .config import TunnelConfig
from .endpoints import service_pool
from .errors import CurveTunError, KeyFileError, RegistryError
from .keydir import REGISTRY_FILE, SECRET_KEY_FILE
from .keys import format_public_key
from .listeners import CannotListen, OpenConnections, TunnelListener
from .service import CurveTunService
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
    One tunnel: the curvetun identity of its key directory (a
    L{CurveTunService}) and one L{TunnelListener} per listen endpoint.

    On stop it stops listening everywhere at once, lets the open
    connections finish for up to the grace time, aborts the rest, and then
    stops the identity and releases the key directory: a stopped tunnel
    cannot be started again.

    @ivar config: what the tunnel is.
    @ivar identity: the L{CurveTunService} of the key directory.
    @ivar listeners: the L{TunnelListener}s, in the order of C{config.listen}.
    """

    def __init__(
        self, config: TunnelConfig, identity: CurveTunService, created: bool = False
    ) -> None:
        super().__init__()
        self.config = config
        self.identity = identity
        self.listeners: list[TunnelListener] = []
        self._created = created
        self._released = False
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
        Start the identity, say which it is, and listen.

        @raise StartupError: a listen endpoint cannot listen; what had
            started is stopped again.
        """
        if self._created:
            log.info("Created key directory {keydir} with a new key", keydir=self.keydir)
        log.info(
            "curvetun public key {public_key} (key directory {keydir})",
            public_key=format_public_key(self.identity.vault.public_key),
            keydir=self.keydir,
        )
        self._starting(super().startService)

    def _starting(self, start: Callable[[], None]) -> None:
        try:
            start()
        except CannotListen as error:
            self.stopService()
            raise StartupError(str(error), EX_UNAVAILABLE) from None

    def stopService(self) -> Deferred[None]:
        """
        Stop listening, drain, stop the identity and release the key
        directory (see the class docstring).

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
        results = await DeferredList(
            [listener.stopService() for listener in self.listeners], consumeErrors=True
        )
        for succeeded, result in results:
            if not succeeded:
                log.failure("Stopping a listener failed", result)
        stopped = self.identity.stopService()
        if stopped is not None:
            await stopped
        self.release()
        log.info("curvetun stopped")

    def release(self) -> None:
        """
        Withdraw the identity from endpoint strings and release its key
        directory (a L{curvetun.vault.FileVault} holds the directory's
        lock). Idempotent; for a tunnel built but never started, the
        whole of its cleanup.
        """
        if self._released:
            return
        self._released = True
        _release(self.identity)


def _release(identity: CurveTunService) -> None:
    service_pool.forget(identity)
    close = getattr(identity.vault, "close", None)
    if close is not None:
        close()


def build_tunnel(
    config: TunnelConfig,
    reactor: Any = None,
    clock: IReactorTime | None = None,
    default_identity: bool = True,
) -> TunnelService:
    """
    Build the service of one tunnel: load (or create) the key directory,
    make it the one of C{curvetun:} endpoint strings that name it (and,
    with C{default_identity}, of those that name none), and parse the
    endpoints.

    @param clock: times the grace period (default: C{reactor}).
    @raise StartupError: the key directory, the registry or an endpoint
        string is unusable; the message is one line.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    keydir, registry = config.keydir, config.registry
    created = not os.path.exists(os.path.join(keydir, SECRET_KEY_FILE))
    try:
        identity = CurveTunService.from_keydir(
            keydir,
            registry,
            create=True,
            clock=reactor,
            handshake_timeout=config.handshake_timeout,
            idle_timeout=config.idle_timeout,
            limits=config.limits,
        )
    except (KeyFileError, RegistryError) as error:
        raise StartupError(str(error), EX_CONFIG) from error
    # Endpoint strings that name this key directory use this identity; with
    # a registry of its own, also those that name the directory but no
    # registry (the pool would refuse them: one registry per key directory).
    service_pool.adopt(identity, keydir, registry, default=default_identity)
    if registry is not None:
        service_pool.adopt(identity, keydir, os.path.join(keydir, REGISTRY_FILE), default=False)
    try:
        forward: tuple[IStreamClientEndpoint, str] | None = None
        if config.forward is not None:
            forward = (
                parse_endpoint("--forward", config.forward, clientFromString, reactor),
                config.forward,
            )
        listens = [
            (description, parse_endpoint("--listen", description, serverFromString, reactor))
            for description in config.listen
        ]
    except StartupError:
        _release(identity)
        raise
    service = TunnelService(config, identity, created)
    for description, endpoint in listens:
        connections = OpenConnections()
        factory: TrackingFactory
        if forward is None:
            factory = EchoFactory(connections)
        else:
            factory = ForwardingFactory(*forward, connections)
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
    option: str, description: str, parse: Callable[[Any, str], _T], reactor: Any
) -> _T:
    """
    Parse an endpoint string with C{parse} (C{serverFromString} or
    C{clientFromString}).

    @raise StartupError: it is malformed (status C{EX_USAGE}); the message
        is one line.
    """
    if _ends_in_a_lone_backslash(description):
        # Twisted's tokenizer fails on it with a RuntimeError (a
        # StopIteration inside its generator); say what is wrong instead.
        raise StartupError(
            f"bad {option} endpoint {description[:80]!r}: it ends with a lone backslash "
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
        raise StartupError(f"bad {option} endpoint {description[:80]!r}: {why}", EX_USAGE) from None


def _ends_in_a_lone_backslash(description: str) -> bool:
    trailing = len(description) - len(description.rstrip("\\"))
    return trailing % 2 == 1


def make_service(configs: Sequence[TunnelConfig], reactor: Any = None) -> IService:
    """
    The service of C{twist curvetun}: one L{TunnelService} per config,
    under a parent that turns a L{StartupError} into a one-line message on
    stderr and the error's exit status (C{twist} handles only the usage
    errors raised while parsing options, and would print a traceback).
    The first config's identity is the default of C{curvetun:} endpoint
    strings that name no key directory.
    """
    parent = _ExitOnStartupError()
    built: list[TunnelService] = []
    try:
        for index, config in enumerate(configs):
            built.append(build_tunnel(config, reactor, default_identity=index == 0))
    except StartupError as error:
        for tunnel in built:
            tunnel.release()
        _exit(error)
    for tunnel in built:
        tunnel.setServiceParent(parent)
    return parent


class _ExitOnStartupError(MultiService):
    """
    The tunnels, with a L{StartupError} at start turned into an exit.
    """

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except StartupError as error:
            _exit(error)

    def startService(self) -> None:
        try:
            super().startService()
        except StartupError as error:
            _exit(error)


def _exit(error: StartupError) -> NoReturn:
    sys.stderr.write(f"twist curvetun: {error}\n")
    sys.stderr.flush()
    raise SystemExit(error.status)
