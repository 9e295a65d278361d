"""
The control channel between the supervisor and a worker: the worker says
Ready, the supervisor has it reload and asks for its figures, and each end
learns when the other is gone.
"""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.protocols import amp
from twisted.test.iosim import IOPump, connect, makeFakeClient, makeFakeServer
from twisted.trial.unittest import SynchronousTestCase, TestCase

from curvetun.errors import RegistryError
from curvetun.metrics import Figures
from curvetun.worker_control import Figures as FiguresCommand
from curvetun.worker_control import (
    ReloadFailed,
    SupervisorControl,
    WorkerControl,
    adopt,
    channel,
)


class FakeWorker:
    """
    What a worker does on the commands: count the reloads (failing them
    with C{error}, if set) and answer C{figures}.
    """

    def __init__(self) -> None:
        self.reloads = 0
        self.error: Exception | None = None
        self.figures: dict[str, Figures] = {}

    def reload(self) -> Deferred[object]:
        self.reloads += 1
        if self.error is not None:
            return fail(self.error)
        return succeed(None)

    def current_figures(self) -> dict[str, Figures]:
        return self.figures


class ConfusedWorker(amp.AMP):
    """
    A worker end that answers figures that are not.
    """

    @FiguresCommand.responder
    def figures(self) -> dict[str, str]:
        return {"figures": '{"t": {"connections": -1}}'}


def connected(
    testcase: SynchronousTestCase,
) -> tuple[FakeWorker, WorkerControl, SupervisorControl, list[str], IOPump]:
    """
    Both ends, connected in memory: the fake worker, its end, the
    supervisor's end, the list of Ready calls the supervisor saw, the pump.
    """
    worker = FakeWorker()
    readies: list[str] = []
    worker_end = WorkerControl(worker.reload, worker.current_figures)
    supervisor_end = SupervisorControl(lambda: readies.append("ready"))
    pump = connect(
        supervisor_end,
        makeFakeServer(supervisor_end),
        worker_end,
        makeFakeClient(worker_end),
    )
    return worker, worker_end, supervisor_end, readies, pump


def result_of(testcase: SynchronousTestCase, d: Deferred[object], pump: IOPump) -> object:
    pump.flush()
    return testcase.successResultOf(d)


class ControlChannelTests(SynchronousTestCase):
    """
    The commands, end to end over an in-memory connection.
    """

    def test_ready_reaches_the_supervisor(self) -> None:
        _, worker_end, _, readies, pump = connected(self)
        answered = worker_end.ready()
        self.assertEqual(readies, [])
        result_of(self, answered, pump)
        self.assertEqual(readies, ["ready"])

    def test_reload_runs_the_workers_reload_and_answers_when_done(self) -> None:
        worker, _, supervisor_end, _, pump = connected(self)
        done = supervisor_end.reload()
        result_of(self, done, pump)
        self.assertEqual(worker.reloads, 1)

    def test_a_failed_reload_is_a_reload_failed_at_the_supervisor(self) -> None:
        worker, _, supervisor_end, _, pump = connected(self)
        worker.error = RegistryError("registry /r line 3: bad key\nmore")
        done = supervisor_end.reload()
        pump.flush()
        failure = self.failureResultOf(done, ReloadFailed)
        self.assertEqual(str(failure.value), "registry /r line 3: bad key")
        # The channel stays up: the worker keeps running.
        self.assertNoResult(supervisor_end.lost)

    def test_figures_come_back_as_they_were(self) -> None:
        worker, _, supervisor_end, _, pump = connected(self)
        figures = Figures(connections=3, bytes_received=10, bytes_sent=20)
        figures.handshakes["ok"] = 7
        worker.figures = {"curvetun:7700": figures}
        answer = supervisor_end.figures()
        pump.flush()
        self.assertEqual(self.successResultOf(answer), {"curvetun:7700": figures})

    def test_figures_that_are_not_fail_with_a_value_error(self) -> None:
        supervisor_end = SupervisorControl(lambda: None)
        confused = ConfusedWorker()
        pump = connect(
            supervisor_end, makeFakeServer(supervisor_end), confused, makeFakeClient(confused)
        )
        answer = supervisor_end.figures()
        pump.flush()
        self.failureResultOf(answer, ValueError)
        self.assertNoResult(supervisor_end.lost)

    def test_each_end_learns_the_other_is_gone(self) -> None:
        _, worker_end, supervisor_end, _, pump = connected(self)
        self.assertNoResult(worker_end.lost)
        assert supervisor_end.transport is not None
        supervisor_end.transport.loseConnection()
        pump.flush()
        self.successResultOf(worker_end.lost)
        self.successResultOf(supervisor_end.lost)


class AdoptedChannelTests(TestCase):
    """
    Over a real socket pair adopted by the reactor, as the supervisor and
    the worker use it.
    """

    async def test_commands_travel_over_an_adopted_socket_pair(self) -> None:
        ours, theirs = channel()
        self.assertFalse(ours.get_inheritable())
        self.assertFalse(theirs.get_inheritable())
        worker = FakeWorker()
        readies: Deferred[None] = Deferred()
        supervisor_end = SupervisorControl(lambda: readies.callback(None))
        worker_end = WorkerControl(worker.reload, worker.current_figures)
        adopt(reactor, ours.detach(), supervisor_end)
        fd = theirs.detach()
        adopt(reactor, fd, worker_end)
        # adopt closed the descriptor it was given: the reactor has its own.
        self.assertRaises(OSError, os.fstat, fd)
        await worker_end.ready()
        await readies
        await supervisor_end.reload()
        self.assertEqual(worker.reloads, 1)
        assert supervisor_end.transport is not None
        supervisor_end.transport.loseConnection()
        await worker_end.lost
        await supervisor_end.lost

    async def test_the_worker_learns_when_the_other_end_closes(self) -> None:
        ours, theirs = channel()
        worker = FakeWorker()
        worker_end = WorkerControl(worker.reload, worker.current_figures)
        adopt(reactor, theirs.detach(), worker_end)
        # The supervisor's process ends: its end closes with it.
        ours.close()
        await worker_end.lost
        self.assertEqual(worker.reloads, 0)
