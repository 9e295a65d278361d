"""
L{CurveTunService}: one long-term identity (vault), its cookie keys, its
registry and its replay memory, as one Twisted service, which makes the
factories (L{curvetun.factories}) that run curvetun connections with them.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from twisted.application.service import IService, MultiService
from twisted.internet.interfaces import IProtocolFactory, IReactorTime

from .admission import ConnectionLimits
from .cookies import CookieKeys
from .factories import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_HELLO_TIMEOUT,
    CurveTunClientFactory,
    CurveTunServerFactory,
)
from .interfaces import IRegistry, IVault
from .replay import ReplayGuard

if TYPE_CHECKING:
    from twisted.python.filepath import FilePath


class _Default(enum.Enum):
    token = 0


_DEFAULT = _Default.token


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

    Start it (or add it to an application) before its factories accept
    connections: the cookie keys rotate only while it runs.
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
    ) -> None:
        super().__init__()
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        assert clock is not None
        self.clock = clock
        self.vault = vault
        self.registry = registry
        self.cookie_keys = cookie_keys if cookie_keys is not None else CookieKeys(clock=clock)
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.hello_timeout = hello_timeout
        self.limits = limits
        # Kept for as long as the cookie keys could open a replayed vouch's
        # cookie, counted in key generations rather than by any clock.
        self.replay_guard = ReplayGuard(self.cookie_keys)
        for part in (vault, self.cookie_keys, registry):
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
    ) -> CurveTunService:
        """
        Load (or, with C{create}, create if missing) the key directory
        C{keydir}, and the registry at C{registry_path} (default: the file
        C{registry} in the key directory).

        @raise curvetun.errors.KeyFileError: the key directory is missing,
            damaged or unsafe.
        @raise curvetun.errors.RegistryError: the registry is malformed.
        """
        from twisted.python.filepath import FilePath

        from .keydir import SECRET_KEY_FILE
        from .registry import FileRegistry
        from .vault import FileVault

        directory = keydir if isinstance(keydir, FilePath) else FilePath(keydir)
        if create and not directory.child(SECRET_KEY_FILE).exists():
            vault = FileVault.create(directory)
        else:
            vault = FileVault(directory)
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
        )

    def server_factory(self, application_factory: IProtocolFactory) -> CurveTunServerFactory:
        """
        A factory for a listening port: it runs curvetun's server side and,
        on each authenticated connection, a protocol of
        C{application_factory}.
        """
        return CurveTunServerFactory(
            application_factory,
            self.vault,
            self.cookie_keys,
            self.registry,
            self.replay_guard.remember,
            self.clock,
            self.handshake_timeout,
            self.idle_timeout,
            self.limits,
            hello_timeout=self.hello_timeout,
        )

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
            self.vault,
            server_key,
            self.clock,
            self.handshake_timeout
            if isinstance(handshake_timeout, _Default)
            else handshake_timeout,
            self.idle_timeout,
        )
