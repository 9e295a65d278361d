"""
Handshakes per second against a running curvetun echo server, from
clients in several processes (for the C{--workers} scale figure in
C{docs/deploy.md}).

    python tests/_handshake_load.py prepare DIR CLIENTS
        make DIR/server (the server's key directory, with a registry that
        admits every client from 127.0.0.1) and DIR/client-1 ... -CLIENTS

    python tests/_handshake_load.py run DIR PORT SECONDS CONCURRENCY [SERVER_PID]
        one process per client key directory, each keeping CONCURRENCY
        handshakes going for SECONDS: connect, send one byte, wait for its
        echo (the server accepted the vouch), close. Prints handshakes per
        second in all, and, given the server's pid, the CPU seconds its
        process tree used per handshake.

Each client process has a key directory of its own: two processes must
never hand out nonces from one counter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def prepare(directory: Path, clients: int) -> None:
    from curvetun.keys import format_public_key
    from curvetun.vault import FileVault

    server = FileVault.create(str(directory / "server"))
    server.close()
    lines = []
    for number in range(1, clients + 1):
        client = FileVault.create(str(directory / f"client-{number}"))
        client.close()
        lines.append(f"127.0.0.1 {format_public_key(client.public_key)} client {number}\n")
    (directory / "server" / "registry").write_text("".join(lines))
    print(format_public_key(server.public_key))


def cpu_seconds(pid: int) -> float:
    """
    User and system CPU seconds used so far by C{pid} and every living
    descendant (C{/proc/PID/stat} fields 14 and 15).
    """
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += cpu_seconds(int(child))
    except OSError:
        pass
    return total


def run(directory: Path, port: int, seconds: float, concurrency: int, server_pid: int) -> None:
    clients = sorted(directory.glob("client-*"))
    key = (directory / "server" / "public.key").read_text().strip()
    before = cpu_seconds(server_pid) if server_pid else 0.0
    started = time.monotonic()
    children = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "client",
                str(client),
                str(port),
                key,
                str(seconds),
                str(concurrency),
            ],
            stdout=subprocess.PIPE,
        )
        for client in clients
    ]
    counts = [int(child.communicate()[0].split()[0]) for child in children]
    elapsed = time.monotonic() - started
    total = sum(counts)
    line = f"{total / seconds:.0f} handshakes/s ({total} in {seconds:g} s, clients {counts})"
    if server_pid:
        used = cpu_seconds(server_pid) - before
        line += f"; server CPU {1e3 * used / max(total, 1):.2f} ms per handshake"
    print(line, f"[wall {elapsed:.1f} s]")


def client(keydir: str, port: int, key: str, seconds: float, concurrency: int) -> None:
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, DeferredList
    from twisted.internet.endpoints import clientFromString
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.task import react

    done = 0

    class OneByte(Protocol):
        def __init__(self) -> None:
            self.echoed: Deferred[None] = Deferred()

        def connectionMade(self) -> None:
            assert self.transport is not None
            self.transport.write(b"x")

        def dataReceived(self, data: bytes) -> None:
            if not self.echoed.called:
                self.echoed.callback(None)

        def connectionLost(self, reason: object = None) -> None:
            if not self.echoed.called:
                self.echoed.errback(Exception("closed"))

    endpoint = clientFromString(reactor, f"curvetun:127.0.0.1:{port}:key={key}:keydir={keydir}")

    async def loop(deadline: float) -> None:
        nonlocal done
        while time.monotonic() < deadline:
            protocol = await endpoint.connect(Factory.forProtocol(OneByte))
            await protocol.echoed
            done += 1
            assert protocol.transport is not None
            protocol.transport.loseConnection()

    async def main(_: object) -> None:
        deadline = time.monotonic() + seconds
        await DeferredList(
            [Deferred.fromCoroutine(loop(deadline)) for _ in range(concurrency)],
            consumeErrors=True,
        )
        os.write(1, f"{done}\n".encode())

    react(lambda r: Deferred.fromCoroutine(main(r)))


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    if command == "prepare":
        prepare(Path(rest[0]), int(rest[1]))
    elif command == "run":
        run(
            Path(rest[0]),
            int(rest[1]),
            float(rest[2]),
            int(rest[3]),
            int(rest[4]) if len(rest) > 4 else 0,
        )
    else:
        client(rest[0], int(rest[1]), rest[2], float(rest[3]), int(rest[4]))
