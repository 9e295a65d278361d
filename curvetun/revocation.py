"""
Revocation: an established connection whose client key the registry no
longer admits from the client's address is closed (L{Revocation}), as
WireGuard drops a peer's session the moment the peer is removed.

The registry changes by a reload (SIGHUP), by an edit that a look-up
notices, or by C{curvetun trust}/C{untrust} in this process; each swap
calls the registry's C{changed_callbacks}, and L{Revocation} is one of
them. An edit made while no handshake happens would go unnoticed until the
next one, so L{Revocation} also examines the registry file every
L{POLL_INTERVAL} seconds (one C{stat}) and has it read again when it has
changed: a revoked key loses its session within a second of the edit.

The close is an abort, not a graceful close: the peer is no longer
trusted, so nothing more is sent to it (not even what the application
wrote a moment ago) and nothing more it sends is delivered; and a graceful
close waits for the peer to read what is pending, which a revoked peer
that stops reading would put off for ever.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from .errors import CurveTunError, RegistryError
from .factories import CurveTunServerFactory
from .interfaces import IRegistry
from .registry import FileRegistry, Registry, RegistryChange
from .transport import CurveTunProtocol

POLL_INTERVAL = 0.5
"""
Seconds between two examinations of the registry file: at most this long
after an edit, plus a reread, a revoked key's connections are closed.
"""

log = Logger()


class Revoked(CurveTunError):
    """
    The registry no longer admits the connection's client key from its
    address: the connection was closed.
    """

    def __init__(self) -> None:
        super().__init__("revoked by the registry")


def _file_version(path: str) -> tuple[int, ...]:
    """
    What identifies a version of the file at C{path}, as the registry
    tells versions apart: C{(mtime_ns, size, inode)}, C{()} if there is no
    file, C{(errno,)} if it cannot be examined.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return ()
    except OSError as error:
        return (error.errno or 0,)
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class Revocation(Service):
    """
    The established server connections of one identity, closed when a
    change of its registry stops admitting them.

    It keeps the connections of the factories given to L{track} from the
    end of their handshake to their end. While it runs, each change of the
    registry checks them (L{registry_changed}), and a L{FileRegistry}'s
    file is examined every C{poll_interval} seconds.

    @ivar connections: the live connections tracked.
    @ivar closed: how many connections it has closed so far.
    """

    def __init__(
        self,
        registry: IRegistry,
        clock: IReactorTime,
        poll_interval: float | None = POLL_INTERVAL,
    ) -> None:
        """
        @param poll_interval: seconds between examinations of the registry
            file, or L{None} for none (changes are then seen only when a
            look-up or a reload reads the file).
        """
        self.registry = registry
        self.clock = clock
        self.poll_interval = poll_interval
        self.connections: set[CurveTunProtocol] = set()
        self.closed = 0
        self._poll: LoopingCall | None = None
        self._version: tuple[int, ...] = ()
        self._reloading = False

    def track(self, factory: CurveTunServerFactory) -> None:
        """
        Keep the connections of C{factory} from the end of their handshake
        to their end.
        """
        factory.established_callbacks.append(self.connections.add)
        factory.ended_callbacks.append(lambda protocol, reason: self.connections.discard(protocol))

    def startService(self) -> None:
        """
        Hear of every change of the registry, and examine its file.
        """
        super().startService()
        callbacks = getattr(self.registry, "changed_callbacks", None)
        if callbacks is not None:
            callbacks.append(self.registry_changed)
        if isinstance(self.registry, FileRegistry) and self.poll_interval is not None:
            self._version = _file_version(self.registry.path.path)
            self._poll = LoopingCall(self._examine)
            self._poll.clock = self.clock
            self._poll.start(self.poll_interval, now=False)

    def stopService(self) -> None:
        """
        Stop hearing of changes; the connections are left to the drain.
        """
        super().stopService()
        callbacks = getattr(self.registry, "changed_callbacks", None)
        if callbacks is not None and self.registry_changed in callbacks:
            callbacks.remove(self.registry_changed)
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        self._poll = None

    def _examine(self) -> None:
        """
        Have the registry read its file again if it has changed since it
        was last examined here (a reload, in a thread, that the look-ups
        do not wait for).
        """
        assert isinstance(self.registry, FileRegistry)
        version = _file_version(self.registry.path.path)
        if version == self._version or self._reloading:
            return
        self._version = version
        self._reloading = True

        def done(result: RegistryChange | Failure) -> None:
            self._reloading = False
            # A malformed file is logged by the registry, once, and the
            # entries read before are kept: nothing to add here.
            if isinstance(result, Failure) and not result.check(RegistryError):
                log.failure("Reading the registry again failed", result)

        self.registry.reload().addBoth(done)

    def registry_changed(self, change: RegistryChange) -> None:
        """
        The registry changed: close the connections it no longer admits.

        Entries only ever admit (a client is admitted if I{any} entry that
        applies to its address has its key), so only a removed entry can
        take admission away, and only from a connection with that entry's
        key: the other connections are passed over with one set look-up
        each, and those with a removed key are asked of the registry in
        use, whole, once each. No Deferred, no reactor turn per connection:
        tens of thousands are checked in one pass.
        """
        if not self.running or not change.removed:
            return
        removed = {entry.key for entry in change.removed}
        suspects = [c for c in self.connections if c.peer_public_key in removed]
        if suspects:
            self.close_revoked(suspects)

    def close_revoked(self, connections: Iterable[CurveTunProtocol]) -> int:
        """
        Close those of C{connections} that the registry in use does not
        admit from their address (each is logged as it ends, with the
        reason L{Revoked}).

        @return: how many were closed.
        """
        registry: IRegistry = self.registry
        if isinstance(registry, FileRegistry):
            # The version in use, whole: no stat of the file per connection,
            # and no reread begun halfway through the pass.
            registry = registry.current
        # Keys with no entry left are admitted nowhere: their connections
        # need no look-up (a fleet key removed from the registry, say).
        registered: frozenset[bytes] | None = None
        if isinstance(registry, Registry):
            registered = frozenset(entry.key for entry in registry.entries)
        verdicts: dict[tuple[bytes, str], bool] = {}
        count = 0
        for connection in connections:
            if connection.disconnecting:
                continue
            peer = (connection.peer_public_key, connection.peer_host)
            allowed = verdicts.get(peer)
            if allowed is None:
                if registered is not None and peer[0] not in registered:
                    allowed = False
                else:
                    allowed = verdicts[peer] = registry.is_client_allowed(*peer)
            if not allowed:
                connection.abort_with(Revoked())
                count += 1
        self.closed += count
        return count
