"""
Reloading on a signal: L{Coalescing} runs one reload at a time, however
often it is asked, and L{ReloadOnSignal} asks it on SIGHUP.

C{twist} has the reactor handle SIGINT and SIGTERM (it stops) and nothing
else: without a handler of its own, SIGHUP ends the process (status 129).
L{ReloadOnSignal} installs one with C{signal.signal} once the reactor runs
(after C{twist} and the reactor have installed theirs) and puts the old one
back when it stops. A Python signal handler runs in the main thread between
two bytecodes, wherever the reactor is: it only hands the request to the
reactor (C{callFromThread}, which also wakes it), and the reload runs in a
reactor turn like any other event.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType
from typing import Any, Generic, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

_T = TypeVar("_T")

log = Logger()

_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class Coalescing(Generic[_T]):
    """
    Runs C{reload} (a function returning a Deferred) one at a time: a
    request made while one runs is served by one more run after it, shared
    by every request made meanwhile. So a burst of SIGHUPs costs at most
    two reloads, and the last edit before the burst ended is always read.
    """

    def __init__(self, reload: Callable[[], Deferred[_T]]) -> None:
        self._reload = reload
        # The requests the running reload serves (None: none runs), and
        # those waiting for the next one.
        self._running: list[Deferred[_T]] | None = None
        self._queued: list[Deferred[_T]] = []

    @property
    def running(self) -> bool:
        """
        Whether a reload runs now.
        """
        return self._running is not None

    def request(self) -> Deferred[_T]:
        """
        Ask for a reload that begins after now.

        @return: fires with the result of that reload (or fails with its
            failure).
        """
        d: Deferred[_T] = Deferred()
        if self._running is None:
            self._start([d])
        else:
            self._queued.append(d)
        return d

    def _start(self, waiting: list[Deferred[_T]]) -> None:
        self._running = waiting
        try:
            started = self._reload()
        except BaseException:
            started = Deferred()
            started.errback()
        started.addBoth(self._done)

    def _done(self, result: _T | Failure) -> None:
        waiting, self._running = self._running or [], None
        for d in waiting:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)
        if self._queued:
            queued, self._queued = self._queued, []
            self._start(queued)


class ReloadOnSignal(Service):
    """
    Calls C{reload} in the reactor's thread each time the process receives
    C{signum} (SIGHUP), from when the reactor runs until the service stops.
    A reload that fails is logged.
    """

    def __init__(
        self, reload: Callable[[], Deferred[Any]], reactor: Any, signum: int = signal.SIGHUP
    ) -> None:
        self._reload = reload
        self._reactor = reactor
        self.signum = signum
        self._previous: _Handler = None
        self._installed = False

    def startService(self) -> None:
        super().startService()
        # Once the reactor runs: after twist and the reactor have set their
        # own handlers, so that none of them replaces this one.
        self._reactor.callWhenRunning(self._install)

    def _install(self) -> None:
        if not self.running or self._installed:
            return
        self._previous = signal.signal(self.signum, self._received)
        self._installed = True

    def stopService(self) -> None:
        super().stopService()
        if self._installed:
            self._installed = False
            # None: a handler not set from Python; the default is the
            # closest Python can put back.
            previous = signal.SIG_DFL if self._previous is None else self._previous
            signal.signal(self.signum, previous)

    def _received(self, signum: int, frame: FrameType | None) -> None:
        # In the main thread, between two bytecodes of whatever runs: hand
        # it to the reactor, nothing more.
        self._reactor.callFromThread(self._reload_now)

    def _reload_now(self) -> None:
        if not self.running:
            return

        def failed(failure: Failure) -> None:
            log.failure("curvetun reload failed", failure)

        self._reload().addErrback(failed)
