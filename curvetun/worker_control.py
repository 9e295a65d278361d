"""
The control channel between the supervisor (L{curvetun.workers}) and each
worker process (L{curvetun.worker_main}): one AF_UNIX socket pair per
worker, its one end inherited by the worker as a file descriptor
(C{--control-fd}), AMP on both ends.

    worker -> supervisor   L{Ready}     every listener listens and the
                                        signal handlers are installed
    supervisor -> worker   L{Reload}    read the registry again (answers
                                        once it is read, or fails with
                                        L{ReloadFailed})
    supervisor -> worker   L{Figures}   the worker's metrics figures, by
                                        tunnel, as JSON (L{Figures.as_json})

Why a channel and not signals: a signal sent to a process that has not
yet installed its handler either kills it (SIGHUP's default action) or is
lost, and the supervisor cannot tell when a worker has installed it. A
command is only sent to a worker that said L{Ready}, so it is received by
a worker that can act on it, and its answer says it was acted on.

The channel also tells each side that the other is gone: a worker whose
channel closes has lost its supervisor, and stops (see
L{curvetun.worker_main.run}).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory
from twisted.protocols import amp
from twisted.python.failure import Failure

from curvetun.metrics import Figures as TunnelFigures

_LOST = Failure(ConnectionDone())


class ReloadFailed(Exception):
    """
    The worker could not read its registry again (it keeps the entries it
    had, and keeps running).
    """


class Ready(amp.Command):
    """
    Worker to supervisor: every listener listens, and the worker's signal
    handlers are installed; it may be sent commands from now on.
    """

    arguments: ClassVar[list[tuple[bytes, amp.Argument]]] = []
    response: ClassVar[list[tuple[bytes, amp.Argument]]] = []


class Reload(amp.Command):
    """
    Supervisor to worker: read the registry again (what SIGHUP does).
    Answered once the registry has been read.
    """

    arguments: ClassVar[list[tuple[bytes, amp.Argument]]] = []
    response: ClassVar[list[tuple[bytes, amp.Argument]]] = []
    errors: ClassVar[dict[type[Exception], bytes]] = {ReloadFailed: b"RELOAD_FAILED"}


class Figures(amp.Command):
    """
    Supervisor to worker: the worker's metrics figures now, as a JSON
    object from tunnel name to L{curvetun.metrics.Figures.as_json}.
    """

    arguments: ClassVar[list[tuple[bytes, amp.Argument]]] = []
    response: ClassVar[list[tuple[bytes, amp.Argument]]] = [(b"figures", amp.Unicode())]


class _Control(amp.AMP):
    """
    What both ends share: C{lost} fires (with L{None}) once the channel is
    closed, whoever closed it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lost: Deferred[None] = Deferred()

    def connectionLost(self, reason: Failure = _LOST) -> None:
        super().connectionLost(reason)
        if not self.lost.called:
            self.lost.callback(None)


class WorkerControl(_Control):
    """
    The worker's end: answers L{Reload} with C{reload} and L{Figures} with
    C{figures}, and says L{ready}.

    @param reload: reads the registry again; fires once done, or fails.
    @param figures: the worker's figures now, by tunnel name.
    """

    def __init__(
        self,
        reload: Callable[[], Deferred[object]],
        figures: Callable[[], Mapping[str, TunnelFigures]],
    ) -> None:
        super().__init__()
        self._reload = reload
        self._figures = figures

    def ready(self) -> Deferred[object]:
        """
        Tell the supervisor this worker is ready.
        """
        return _insulated(self.callRemote(Ready))

    @Reload.responder
    def _reload_now(self) -> Deferred[dict[str, Any]]:
        def failed(failure: Failure) -> dict[str, Any]:
            raise ReloadFailed(str(failure.value).splitlines()[0] if str(failure.value) else "")

        return self._reload().addCallbacks(lambda _: {}, failed)

    @Figures.responder
    def _figures_now(self) -> dict[str, Any]:
        document = {name: f.as_json() for name, f in self._figures().items()}
        return {"figures": json.dumps(document, separators=(",", ":"))}


class SupervisorControl(_Control):
    """
    The supervisor's end of one worker's channel: calls C{on_ready} when
    the worker says L{Ready}, and sends it L{reload} and L{figures}.
    """

    def __init__(self, on_ready: Callable[[], None]) -> None:
        super().__init__()
        self._on_ready = on_ready

    @Ready.responder
    def _ready(self) -> dict[str, Any]:
        self._on_ready()
        return {}

    def reload(self) -> Deferred[object]:
        """
        Have the worker read its registry again.

        @return: fires once it has, or fails (L{ReloadFailed}, or the
            channel's loss).
        """
        return _insulated(self.callRemote(Reload))

    def figures(self) -> Deferred[dict[str, TunnelFigures]]:
        """
        The worker's figures, by tunnel name.

        @return: fires with them, or fails (a C{ValueError} if the answer
            is not figures, or the channel's loss).
        """

        def parse(answer: dict[str, Any]) -> dict[str, TunnelFigures]:
            document = json.loads(answer["figures"])
            if not isinstance(document, dict):
                raise ValueError("figures must be a JSON object")
            return {str(name): TunnelFigures.from_json(f) for name, f in document.items()}

        answer: Deferred[dict[str, Any]] = _insulated(self.callRemote(Figures))
        return answer.addCallback(parse)


def _insulated(answer: Deferred[Any]) -> Deferred[Any]:
    """
    A new Deferred with C{answer}'s outcome. AMP puts an errback on the
    answer of each call that drops the connection when a failure reaches
    it: what the caller does with the answer (and fails doing) must not be
    that failure.
    """
    outcome: Deferred[Any] = Deferred()
    answer.chainDeferred(outcome)
    return outcome


def adopt(reactor: Any, fd: int, protocol: _Control) -> None:
    """
    Run C{protocol} over the connected AF_UNIX stream socket C{fd}, and
    close C{fd} (the reactor keeps a duplicate of its own, so that the
    channel closes when the protocol's transport does).
    """
    try:
        reactor.adoptStreamConnection(fd, socket.AF_UNIX, Factory.forProtocol(lambda: protocol))
    finally:
        os.close(fd)


def channel() -> tuple[socket.socket, socket.socket]:
    """
    A new control channel: the supervisor's end and the worker's end.
    Neither is inheritable: the worker's end is handed to exactly one
    worker, at the descriptor number its C{--control-fd} names.
    """
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
