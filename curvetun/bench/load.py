"""
A load client of C{curvetun bench --workers}: one process with one client
key directory of its own (two processes must never hand out nonces from
one counter), started by the benchmark as::

    python -m curvetun.bench.load KEYDIR

It reads one JSON command a line on stdin and answers each with one JSON
line on stdout:

  - C{{"do": "probe", "port": P, "key": HEX, "timeout": S}}: one
    handshake (connect, 100 bytes echoed, close), tried again until it
    succeeds or S seconds have passed; answers C{{"probed": ATTEMPTS}};
  - C{{"do": "handshakes", "port": P, "key": HEX, "loops": L}}: start L
    loops of handshakes, each connect, 100 bytes echoed (so the server
    accepted the vouch), close, again; answers C{{"ready": true}} once
    every loop has finished one, and keeps them going;
  - C{{"do": "bulk", "port": P, "key": HEX, "connections": C}}: open C
    connections, each writing 65503-byte chunks with backpressure and
    reading back their echo; answers C{{"ready": true}} once every one has
    had data back, and keeps them going;
  - C{{"do": "window", "seconds": S}}: counts what the running load
    completes in the next S seconds (or until its first completion after
    them, if none came within: the count is never 0); answers
    C{{"done": N, "seconds": ELAPSED, "cpu": CPU, "waited": W, "failed":
    F}}: the handshakes (or bytes echoed) completed, the window's length,
    this process's CPU seconds meanwhile and the seconds it waited for a
    CPU, and the handshakes that failed;
  - C{{"do": "stop"}}: stops the load, answers C{{"stopped": true}}.

Any error is answered C{{"error": "one line"}}. The end of stdin ends the
process.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import clientFromString, quoteStringArgument
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.stdio import StandardIO
from twisted.internet.task import deferLater
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from .client import Pump, connect_endpoint
from .figures import LOCALHOST, SMALL, STREAM_CHUNK
from .processes import run_queue_seconds
from .server import log_warnings_only, set_no_delay


def _cpu() -> float:
    """
    This process's CPU seconds so far (user and system).
    """
    times = os.times()
    return times.user + times.system


def _waited() -> float:
    """
    The seconds this process has waited for a CPU so far (0 where Linux's
    C{/proc} cannot say).
    """
    try:
        return run_queue_seconds(os.getpid())
    except OSError:
        return 0.0


class Load:
    """
    The load running now: what it has completed (handshakes, or bytes
    echoed), what failed, and a way to hear of the next completion.
    """

    def __init__(self) -> None:
        self.done = 0
        self.failed = 0
        self.stopping = False
        self.running: list[Deferred[None]] = []
        self._waiting: list[Callable[[], None]] = []
        self._stop_listeners: list[Deferred[None]] = []

    def completed(self, amount: int) -> None:
        """
        Count C{amount} more handshakes or bytes.
        """
        self.done += amount
        waiting, self._waiting = self._waiting, []
        for call in waiting:
            call()

    def next_completion(self) -> Deferred[None]:
        """
        A Deferred that fires at the next L{completed}.
        """
        fired: Deferred[None] = Deferred()
        self._waiting.append(lambda: fired.callback(None))
        return fired

    def when_stopping(self) -> Deferred[None]:
        """
        A Deferred that fires when L{stop} is called.
        """
        listener: Deferred[None] = Deferred()
        self._stop_listeners.append(listener)
        return listener

    async def stop(self) -> None:
        """
        Stop the load and wait until every loop or connection has ended.
        """
        self.stopping = True
        listeners, self._stop_listeners = self._stop_listeners, []
        for listener in listeners:
            listener.callback(None)
        await gatherResults(self.running, consumeErrors=True)


class _Echoed(Protocol):
    """
    A bulk connection's client: counts the echoed bytes into its load.
    """

    def __init__(self, load: Load) -> None:
        self.load = load
        self.first: Deferred[None] = Deferred()
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        set_no_delay(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.load.completed(len(data))
        if not self.first.called:
            self.first.callback(None)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        if not self.first.called:
            self.first.errback(reason)
        self.closed.callback(None)


class _EchoedFactory(Factory[_Echoed]):
    def __init__(self, load: Load) -> None:
        self.load = load

    def buildProtocol(self, addr: IAddress | None) -> _Echoed:
        return _Echoed(self.load)


class LoadClient(LineReceiver):
    """
    The command channel on stdin and stdout (see the module's docstring).
    """

    delimiter = b"\n"

    def __init__(self, reactor: Any, keydir: str) -> None:
        self.reactor = reactor
        self.keydir = keydir
        self.load: Load | None = None
        self._endpoints: dict[tuple[int, str], IStreamClientEndpoint] = {}

    def answer(self, message: dict[str, Any]) -> None:
        """
        Write one answer line.
        """
        self.sendLine(json.dumps(message).encode())

    def lineReceived(self, line: bytes) -> None:
        async def run() -> dict[str, Any]:
            command = json.loads(line)
            return await self.handle(command)

        def failed(failure: Failure) -> dict[str, Any]:
            return {"error": " ".join(f"{failure.getErrorMessage()}".splitlines())[:500]}

        Deferred.fromCoroutine(run()).addErrback(failed).addCallback(self.answer)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        # The benchmark is gone (or done): so is this process.
        if self.reactor.running:
            self.reactor.stop()

    def endpoint(self, port: int, key: str) -> IStreamClientEndpoint:
        """
        The client endpoint for a server on 127.0.0.1:C{port} with public
        key C{key} (hex), parsed once, as an application keeps it.
        """
        endpoint = self._endpoints.get((port, key))
        if endpoint is None:
            description = (
                f"curvetun:{LOCALHOST}:{port}:key={key}:keydir={quoteStringArgument(self.keydir)}"
            )
            endpoint = self._endpoints[port, key] = clientFromString(self.reactor, description)
        return endpoint

    async def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        """
        Carry out one command; return its answer.
        """
        do = command.get("do")
        if do == "probe":
            return await self.probe(self.endpoint(command["port"], command["key"]), command)
        if do == "window":
            return await self.window(float(command["seconds"]))
        if do == "stop":
            if self.load is not None:
                load, self.load = self.load, None
                await load.stop()
            return {"stopped": True}
        if do in ("handshakes", "bulk"):
            if self.load is not None:
                raise ValueError("a load is already running")
            self.load = Load()
            endpoint = self.endpoint(command["port"], command["key"])
            if do == "handshakes":
                await self.start_handshakes(self.load, endpoint, int(command["loops"]))
            else:
                await self.start_bulk(self.load, endpoint, int(command["connections"]))
            return {"ready": True}
        raise ValueError(f"unknown command {do!r}")

    async def probe(
        self, endpoint: IStreamClientEndpoint, command: dict[str, Any]
    ) -> dict[str, Any]:
        """
        One handshake, tried until it works or the timeout has passed.
        """
        deadline = time.monotonic() + float(command["timeout"])
        attempts = 0
        while True:
            attempts += 1
            try:
                await _handshake(endpoint)
                return {"probed": attempts}
            except Exception:
                if time.monotonic() > deadline:
                    raise
            await deferLater(self.reactor, 0.1, lambda: None)

    async def start_handshakes(
        self, load: Load, endpoint: IStreamClientEndpoint, loops: int
    ) -> None:
        """
        Start C{loops} handshake loops; return once each has done one.
        """
        firsts: list[Deferred[None]] = []

        async def loop(first: Deferred[None]) -> None:
            while not load.stopping:
                try:
                    await _handshake(endpoint)
                except Exception:
                    load.failed += 1
                    if not first.called:
                        raise
                    # Not a busy loop against a server that is gone.
                    await deferLater(self.reactor, 0.01, lambda: None)
                    continue
                load.completed(1)
                if not first.called:
                    first.callback(None)

        for _ in range(loops):
            first: Deferred[None] = Deferred()
            firsts.append(first)
            running = Deferred.fromCoroutine(loop(first))
            running.addErrback(_fail_first, first)
            load.running.append(running)
        await gatherResults(firsts, consumeErrors=True)

    async def start_bulk(
        self, load: Load, endpoint: IStreamClientEndpoint, connections: int
    ) -> None:
        """
        Open C{connections} bulk connections; return once each has had
        data echoed.
        """
        chunk = b"\xa5" * STREAM_CHUNK
        firsts = []
        for _ in range(connections):
            protocol = await endpoint.connect(_EchoedFactory(load))
            assert isinstance(protocol, _Echoed)
            transport: Any = protocol.transport
            pump = Pump(self.reactor, transport.write, chunk, 2**62, batch=16)
            transport.registerProducer(pump, True)
            pump.start().addErrback(lambda _: None)
            firsts.append(protocol.first)
            load.running.append(Deferred.fromCoroutine(_stop_bulk(load, protocol, pump)))
        await gatherResults(firsts, consumeErrors=True)

    async def window(self, seconds: float) -> dict[str, Any]:
        """
        Count what the running load completes in the next C{seconds}.
        """
        load = self.load
        if load is None:
            raise ValueError("no load is running")
        done, failed, cpu, waited = load.done, load.failed, _cpu(), _waited()
        started = time.perf_counter()
        await deferLater(self.reactor, seconds, lambda: None)
        if load.done == done:
            await load.next_completion()
        return {
            "done": load.done - done,
            "seconds": time.perf_counter() - started,
            "cpu": _cpu() - cpu,
            "waited": _waited() - waited,
            "failed": load.failed - failed,
        }


def _fail_first(failure: Failure, first: Deferred[None]) -> None:
    if not first.called:
        first.errback(failure)


async def _handshake(endpoint: IStreamClientEndpoint) -> None:
    """
    Connect, 100 bytes there and back, close.
    """
    client = await connect_endpoint(endpoint)
    await client.ping_pong(b"\x3c" * SMALL, 1)
    await client.close()


async def _stop_bulk(load: Load, protocol: _Echoed, pump: Pump) -> None:
    """
    Wait until the load stops, then stop writing and drop the connection.
    """
    await load.when_stopping()
    transport: Any = protocol.transport
    pump.stopProducing()
    transport.unregisterProducer()
    # Not a clean close: that would wait for the echo of everything in
    # flight, which nobody reads any more.
    transport.abortConnection()
    await protocol.closed


def main(argv: list[str]) -> int:
    """
    Be a load client with the key directory C{argv[0]}.
    """
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    (keydir,) = argv
    log_warnings_only()
    StandardIO(LoadClient(reactor, keydir), reactor=reactor)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
