"""
Listening as a service, with a bounded drain on stop: L{TunnelListener}, a
L{StreamServerEndpointService} that, when stopped, stops listening at once,
lets the connections it accepted finish for a grace time and aborts the
rest; and L{OpenConnections}, the set of those connections.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol as TypingProtocol

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .addresses import format_address
from .errors import CurveTunError

log = Logger()


class Abortable(TypingProtocol):
    """
    A connection that L{OpenConnections} can close at once.
    """

    def abort(self) -> None:
        """
        Close the connection now, dropping whatever has not been sent.
        """


class OpenConnections:
    """
    The open connections of one listener, so that stopping can wait for
    them to finish and abort those that take too long.

    @ivar accepting: false once L{drain} has begun; factories then refuse
        new connections.
    """

    def __init__(self) -> None:
        self.accepting = True
        self._open: set[Abortable] = set()
        self._waiting: list[Deferred[None]] = []

    def __len__(self) -> int:
        return len(self._open)

    def __iter__(self) -> Iterator[Abortable]:
        return iter(list(self._open))

    def add(self, connection: Abortable) -> None:
        """
        C{connection} has opened.
        """
        self._open.add(connection)

    def remove(self, connection: Abortable) -> None:
        """
        C{connection} has closed (idempotent).
        """
        self._open.discard(connection)
        if not self._open:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    def when_empty(self) -> Deferred[None]:
        """
        A Deferred that fires once no connection is open (at once if none
        is).
        """
        if not self._open:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d

    def drain(self, grace: float, clock: IReactorTime) -> Deferred[int]:
        """
        Refuse new connections, wait up to C{grace} seconds for the open ones
        to close, then abort the rest.

        @return: a Deferred that fires, once every connection is closed,
            with the number of connections that had to be aborted.
        """
        self.accepting = False
        done: Deferred[int] = Deferred()

        def closed_in_time(_: None) -> None:
            if timer.active():
                timer.cancel()
                done.callback(0)

        def abort_the_rest() -> None:
            late = list(self._open)
            log.info(
                "Aborting {count} connection(s) still open after {grace} seconds",
                count=len(late),
                grace=grace,
            )
            for connection in late:
                connection.abort()
            self.when_empty().addCallback(lambda _: done.callback(len(late)))

        timer = clock.callLater(grace, abort_the_rest)
        self.when_empty().addCallback(closed_in_time)
        return done


class CannotListen(CurveTunError):
    """
    A listen endpoint failed to listen as the service started.
    """


@implementer(IStreamServerEndpoint)
class _ReportingEndpoint:
    """
    An endpoint that listens through another and reports the outcome to
    the listener before L{StreamServerEndpointService} sees it: the port,
    or the failure, which becomes C{None} so that the base class neither
    logs it as an unhandled error (a traceback in the log) nor re-raises
    it.
    """

    def __init__(self, endpoint: IStreamServerEndpoint, listener: TunnelListener) -> None:
        self.endpoint = endpoint
        self.listener = listener

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        listening = self.endpoint.listen(protocolFactory)
        listening.addCallbacks(self.listener.listening, self.listener.cannot_listen)
        return listening


class TunnelListener(StreamServerEndpointService):
    """
    Listens on one endpoint with one factory while running; on stop, stops
    listening, lets the connections the factory made (C{connections})
    finish for up to C{grace} seconds, and aborts the rest.

    Starting fails with L{CannotListen} when the endpoint fails to listen
    at once (TCP, UNIX and curvetun endpoints do); a failure that comes
    later is logged at critical level.

    The base class learns of the outcome only after this class has, through
    the endpoint it is given (a L{_ReportingEndpoint} around the real one,
    so C{endpoint} is that wrapper): its private C{_raiseSynchronously}
    switch is left alone. What is relied on beyond its documentation (that
    a listen that fired with L{None} stops quietly; that C{startService}
    after C{privilegedStartService} does not listen again) is pinned by
    C{tests.test_tap.TunnelListenerTests}.

    @ivar description: the endpoint as given (for log messages).
    @ivar serving: what the factory does with a connection (for the log).
    @ivar port: the listening port, while listening.
    """

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        description: str,
        factory: IProtocolFactory,
        connections: OpenConnections,
        grace: float,
        clock: IReactorTime,
        serving: str = "",
    ) -> None:
        super().__init__(_ReportingEndpoint(endpoint, self), factory)
        self.description = description
        self.connections = connections
        self.grace = grace
        self.clock = clock
        self.serving = serving
        self.port: IListeningPort | None = None
        self._started_listening = False
        self._starting = False
        self._failed: Failure | None = None
        self._waiting_until_not_listening: list[Deferred[None]] = []
        self._waiting_until_listening: list[Deferred[IListeningPort]] = []

    def privilegedStartService(self) -> None:
        """
        Listen (before privileges are shed, under C{twistd}).

        @raise CannotListen: the endpoint failed to listen at once.
        """
        self._started_listening = True
        self._starting = True
        try:
            super().privilegedStartService()
        finally:
            self._starting = False
        failed, self._failed = self._failed, None
        if failed is not None:
            raise CannotListen(f"cannot listen on {self.description}: {failed.getErrorMessage()}")

    def listening(self, port: IListeningPort) -> IListeningPort:
        """
        The endpoint listens on C{port}: log where.
        """
        self.port = port
        waiting, self._waiting_until_listening = self._waiting_until_listening, []
        for d in waiting:
            d.callback(port)
        log.info(
            "Listening on {endpoint} ({address}): {what}",
            endpoint=self.description,
            address=format_address(port.getHost()),
            what=self.serving,
        )
        return port

    def cannot_listen(self, failure: Failure) -> None:
        """
        The endpoint failed to listen, or the attempt was cancelled by a
        stop: keep the failure for L{privilegedStartService} to raise, or
        log it if it came later.
        """
        if failure.check(CancelledError):
            return
        if self._starting:
            self._failed = failure
        else:
            log.critical(
                "Cannot listen on {endpoint}: {why}",
                endpoint=self.description,
                why=failure.getErrorMessage(),
            )
        return

    def stopService(self) -> Deferred[None]:
        """
        Stop listening, then wait for the open connections to close, up to
        the grace time, and abort the rest.

        @return: a Deferred that fires when every connection is closed.
        """
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        # Refuse at once what the port accepts before it closes (and any
        # curvetun handshake that completes from now on).
        self.connections.accepting = False
        if self._started_listening:
            # Cancels a listen still under way, or stops listening.
            await super().stopService()
        else:
            Service.stopService(self)
        port, self.port = self.port, None
        if port is not None:
            log.info("Stopped listening on {endpoint}", endpoint=self.description)
        if len(self.connections):
            log.info(
                "Waiting up to {grace} seconds for {count} open connection(s) to finish",
                grace=self.grace,
                count=len(self.connections),
            )
        drained = self.connections.drain(self.grace, self.clock)
        # Told once the grace time runs, so that what they do next happens
        # within it.
        waiting, self._waiting_until_not_listening = self._waiting_until_not_listening, []
        for d in waiting:
            d.callback(None)
        await drained

    def when_listening(self) -> Deferred[IListeningPort]:
        """
        A Deferred that fires with the port once the endpoint listens (at
        once if it does). It does not fire if listening fails.
        """
        if self.port is not None:
            return succeed(self.port)
        d: Deferred[IListeningPort] = Deferred()
        self._waiting_until_listening.append(d)
        return d

    def when_not_listening(self) -> Deferred[None]:
        """
        A Deferred that fires once the service has stopped listening (while
        it may still wait for connections to finish).
        """
        if self.port is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting_until_not_listening.append(d)
        return d
