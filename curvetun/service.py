"""
L{CurveTunService}: one long-term identity (vault), its cookie keys, its
registry and its replay memory, as one Twisted service, which makes the
factories (L{curvetun.factories}) that run curvetun connections with them,
closes the connections its registry stops admitting
(L{curvetun.revocation}), and reloads its registry and keys
(L{CurveTunService.reload}).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocolFactory, IReactorTime
from twisted.logger import Logger

from .admission import ConnectionLimits
from .cookies import CookieKeys
from .errors import KeyFileError, RegistryError
from .factories import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_HELLO_TIMEOUT,
    CurveTunClientFactory,
    CurveTunServerFactory,
)
from .handshake_vault import as_handshake_vault
from .interfaces import IRegistry, IVault
from .keys import fingerprint
from .registry import FileRegistry
from .replay import ReplayGuard
from .revocation import POLL_INTERVAL, Revocation

if TYPE_CHECKING:
    from twisted.python.filepath import FilePath


class _Default(enum.Enum):
    token = 0


_DEFAULT = _Default.token

log = Logger()


class CurveTunService(MultiService):
    """
    The parts one curvetun identity needs, under one L{MultiService}:

      - C{vault}: the long-term key (an L{IVault}; a child service when it
        is one, as L{curvetun.vault.FileVault} is);
      - C{cookie_keys}: the rotating cookie keys (a child L{CookieKeys});
      - C{registry}: who may connect, and which server keys we know (an
        L{IRegistry}; a child service when it is one);
      - C{replay_guard}: the client ephemeral keys of recently accepted
        vouches.

    C{handshake_timeout} and C{idle_timeout} (seconds, or L{None} for none)
    apply to every connection its factories make; C{hello_timeout} (the
    first packet's deadline) and C{limits} (L{ConnectionLimits}) to those of
    its server factories.

    With C{revoke_sessions} (the default), a change of the registry that no
    longer admits an established connection's client key from its address
    closes that connection (a L{Revocation}, C{revocation}; L{None}
    without); C{revocation_poll} is how often it examines a registry file
    for an edit no handshake has noticed.

    Start it (or add it to an application) before its factories accept
    connections: the cookie keys rotate only while it runs.

    @ivar server_factory_callbacks: called with each server factory it
        makes (L{server_factory}), before the factory is used: a service
        that follows the connections (metrics, a status page) appends here.
    """

    def __init__(
        self,
        vault: IVault,
        registry: IRegistry,
        clock: IReactorTime | None = None,
        cookie_keys: CookieKeys | None = None,
        handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
        idle_timeout: float | None = None,
        limits: ConnectionLimits = ConnectionLimits(),
        hello_timeout: float | None = DEFAULT_HELLO_TIMEOUT,
        revoke_sessions: bool = True,
        revocation_poll: float | None = POLL_INTERVAL,
    ) -> None:
        super().__init__()
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        assert clock is not None
        self.clock = clock
        self.vault = vault
        # What the factories' machines ask, made once (not per connection:
        # an endpoint makes a client factory for each connect).
        self.handshake_vault = as_handshake_vault(vault)
        self.registry = registry
        self.cookie_keys = cookie_keys if cookie_keys is not None else CookieKeys(clock=clock)
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.hello_timeout = hello_timeout
        self.limits = limits
        # Kept for as long as the cookie keys could open a replayed vouch's
        # cookie, counted in key generations rather than by any clock.
        self.replay_guard = ReplayGuard(self.cookie_keys)
        self.server_factory_callbacks: list[Callable[[CurveTunServerFactory], None]] = []
        self.revocation = Revocation(registry, clock, revocation_poll) if revoke_sessions else None
        for part in (vault, self.cookie_keys, registry, self.revocation):
            if IService.providedBy(part):
                IService(part).setServiceParent(self)

    @classmethod
    def from_keydir(
        cls,
        keydir: str | FilePath[str],
        registry_path: str | FilePath[str] | None = None,
        create: bool = False,
        clock: IReactorTime | None = None,
        handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
        idle_timeout: float | None = None,
        limits: ConnectionLimits = ConnectionLimits(),
        hello_timeout: float | None = DEFAULT_HELLO_TIMEOUT,
        revoke_sessions: bool = True,
        statedir: str | FilePath[str] | None = None,
        instance: int | None = None,
        change_instance: bool = False,
    ) -> CurveTunService:
        """
        Load (or, with C{create}, create if missing) the key directory
        C{keydir}, with its previous key during a rollover
        (L{curvetun.server_keys.ServerKeys}), and the registry at
        C{registry_path} (default: the file C{registry} in the key
        directory).

        @param statedir: where the counters, the lock and the instance ID
            are kept, if not in the key directory (which may then be
            read-only).
        @param instance: this host's instance ID for a key directory
            copied to several hosts (see L{curvetun.vault.KeyState}).
        @param change_instance: let C{instance} replace another one stored.
        @raise curvetun.errors.KeyFileError: the key directory is missing,
            damaged or unsafe, or its counter cannot be stored.
        @raise curvetun.errors.RegistryError: the registry is malformed.
        """
        from twisted.python.filepath import FilePath

        from .keydir import SECRET_KEY_FILE
        from .registry import FileRegistry
        from .server_keys import ServerKeys
        from .vault import FileVault

        directory = keydir if isinstance(keydir, FilePath) else FilePath(keydir)
        if create and not directory.child(SECRET_KEY_FILE).exists():
            FileVault.create(directory).close()
        vault = ServerKeys(directory, statedir, instance, change_instance)
        if registry_path is None:
            registry_path = directory.child("registry")
        return cls(
            vault,
            FileRegistry(registry_path),
            clock=clock,
            handshake_timeout=handshake_timeout,
            idle_timeout=idle_timeout,
            limits=limits,
            hello_timeout=hello_timeout,
            revoke_sessions=revoke_sessions,
        )

    def reload_keys(self) -> str:
        """
        Read the key directory again (after C{curvetun rotate}, or
        C{rotate --finish}): from now on hellos are answered with the
        directory's current key and, during a rollover, its previous one.
        Connections keep working; a key already loaded keeps its vault and
        counter.

        @return: what changed, a short phrase for the log, such as C{"keys
            unchanged"} or C{"new current key 1a2b..., previous 3c4d..."}.
        @raise curvetun.errors.KeyFileError: the directory cannot be used
            (a one-line message), or this identity's vault is not from a
            key directory; the keys stay as they were.
        """
        from .server_keys import ServerKeys

        if not isinstance(self.vault, ServerKeys):
            # A vault made in memory by the application: nothing to read.
            return "keys unchanged (not from a key directory)"
        return self.vault.reload()

    def server_factory(self, application_factory: IProtocolFactory) -> CurveTunServerFactory:
        """
        A factory for a listening port: it runs curvetun's server side and,
        on each authenticated connection, a protocol of
        C{application_factory}. Its connections are subject to
        revocation (unless the service was made without).
        """
        factory = CurveTunServerFactory(
            application_factory,
            self.handshake_vault,
            self.cookie_keys,
            self.registry,
            self.replay_guard.remember,
            self.clock,
            self.handshake_timeout,
            self.idle_timeout,
            self.limits,
            hello_timeout=self.hello_timeout,
        )
        for callback in self.server_factory_callbacks:
            callback(factory)
        if self.revocation is not None:
            self.revocation.track(factory)
        return factory

    def client_factory(
        self,
        application_factory: IProtocolFactory,
        server_key: bytes,
        handshake_timeout: float | _Default | None = _DEFAULT,
    ) -> CurveTunClientFactory:
        """
        A factory for outgoing connections to the server whose long-term
        public key is C{server_key}; C{handshake_timeout} overrides the
        service's.
        """
        return CurveTunClientFactory(
            application_factory,
            self.handshake_vault,
            server_key,
            self.clock,
            self.handshake_timeout
            if isinstance(handshake_timeout, _Default)
            else handshake_timeout,
            self.idle_timeout,
        )

    # -- reload ----------------------------------------------------------------

    def reload(self) -> Deferred[Reloaded]:
        """
        Read the registry and the key directory again (for SIGHUP), keeping
        every established connection, except those the new registry no
        longer admits (see C{revoke_sessions}).

        A registry that cannot be read or is malformed keeps the entries
        read before (the registry logs the error); a key directory that
        cannot be applied keeps the keys in use (logged here, one line).

        @return: fires with what changed; never fails for a bad file.
        """
        return Deferred.fromCoroutine(self._reload())

    async def _reload(self) -> Reloaded:
        registry = await self._reload_registry()
        try:
            keys = self.reload_keys()
        except KeyFileError as error:
            log.error(
                "curvetun did not reload the keys: {error}; still using the key {key}",
                error=str(error),
                key=fingerprint(self.vault.public_key),
            )
            keys = "keys not reloaded (see the error above)"
        return Reloaded(registry, keys)

    async def _reload_registry(self) -> str | None:
        registry = self.registry
        if not isinstance(registry, FileRegistry):
            return None  # nothing to read again
        revocation = self.revocation
        closed_before = 0 if revocation is None else revocation.closed
        try:
            change = await registry.reload()
        except RegistryError:
            # Logged by the registry, once, with the file's line.
            return (
                f"registry {registry.path.path}: not reloaded (see the error above), "
                f"still the {_count(len(registry.current.entries), 'entry', 'entries')} "
                "read before"
            )
        if not change.added and not change.removed:
            what = "unchanged"
        else:
            added = _count(len(change.added), "entry", "entries")
            what = f"{added} added, {len(change.removed)} removed"
        closed = 0 if revocation is None else revocation.closed - closed_before
        if closed:
            what += f", {_count(closed, 'connection', 'connections')} closed"
        return f"registry {registry.path.path}: {what}"


def _count(number: int, one: str, many: str) -> str:
    return f"{number} {one if number == 1 else many}"


@attrs.frozen
class Reloaded:
    """
    What a reload of one identity changed, as phrases for the log line.

    @ivar registry: C{"registry PATH: 2 entries added, 1 removed"}, or
        L{None} for a registry that is not a file.
    @ivar keys: C{"keys unchanged"}, or what L{CurveTunService.reload_keys}
        said.
    """

    registry: str | None
    keys: str

    def phrases(self, keydir: str | None = None) -> list[str]:
        """
        The phrases, the keys' prefixed with C{keydir} when given (when a
        process has several identities).
        """
        keys = self.keys if keydir is None else f"{keydir}: {self.keys}"
        return [*([] if self.registry is None else [self.registry]), keys]
