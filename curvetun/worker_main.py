"""
One worker process under the supervisor of L{curvetun.workers}.

    python -m curvetun.worker_main --vault-socket PATH --adopt FD:KIND ...
        [--forward ENDPOINT] [--grace SECONDS] [--name NAME]

It adopts each inherited listening socket C{FD} (C{KIND} is C{curvetun}
or C{plain}), connects to the vault process at C{PATH} and learns the
public key from it (it never reads a key file), and runs echo or forward
over each socket. SIGTERM: stop accepting, let open connections finish
for up to the grace time, exit. SIGHUP: reload (logged).

Exit status 69 (C{EX_UNAVAILABLE}) if the vault does not answer at start,
64 for a bad option.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage
from zope.interface import implementer

log = Logger()

EX_USAGE = 64
EX_UNAVAILABLE = 69


@implementer(IStreamServerEndpoint)
class AdoptedPortEndpoint:
    """
    A server endpoint over a listening socket this process inherited:
    C{listen} adopts it (C{reactor.adoptStreamPort}), whatever its address
    family. The inherited descriptor is closed once adopted (the reactor
    keeps its own duplicate), so that stopping listening closes this
    process's last copy.
    """

    def __init__(self, reactor: Any, fd: int) -> None:
        self._reactor = reactor
        self._fd = fd

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        """
        Adopt the socket; fails if it is not a listening stream socket.
        """
        try:
            probe = socket.socket(fileno=os.dup(self._fd))
            family = probe.family
            probe.close()
            port: IListeningPort = self._reactor.adoptStreamPort(self._fd, family, protocolFactory)
            os.close(self._fd)
        except OSError as error:
            from twisted.internet.defer import fail

            return fail(error)
        return succeed(port)


def parse_adopt(value: str) -> tuple[int, str]:
    """
    Parse C{FD:KIND}.

    @raise usage.UsageError: it is not that.
    """
    fd_text, _, kind = value.partition(":")
    if not fd_text.isdigit() or kind not in ("curvetun", "plain"):
        raise usage.UsageError(f"--adopt wants FD:curvetun or FD:plain, not {value[:40]!r}")
    return int(fd_text), kind


class Options(usage.Options):
    """
    The options of a worker (the supervisor gives them).
    """

    optParameters = [
        ["vault-socket", None, None, "The vault process's UNIX socket."],
        ["forward", None, None, "Forward each connection to this endpoint (default: echo)."],
        ["grace", None, "10", "Seconds open connections may take to finish on SIGTERM."],
        ["name", None, "worker", "This worker's name in the logs."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["adopt"] = []

    def opt_adopt(self, value: str) -> None:
        """
        Adopt the inherited listening socket FD (FD:curvetun or FD:plain).
        """
        self["adopt"].append(parse_adopt(value))

    def postOptions(self) -> None:
        if not self["vault-socket"]:
            raise usage.UsageError("--vault-socket is required")
        if not self["adopt"]:
            raise usage.UsageError("at least one --adopt")
        try:
            self["grace"] = float(self["grace"])
        except ValueError:
            raise usage.UsageError("--grace must be a number of seconds") from None


async def run(reactor: Any, options: Options) -> int:
    """
    Connect to the vault, serve on every adopted socket until SIGTERM, and
    drain.
    """
    from twisted.internet.endpoints import UNIXClientEndpoint, clientFromString

    from curvetun.handshake_vault import VaultUnavailable
    from curvetun.keys import fingerprint
    from curvetun.remote_vault import RemoteVault
    from curvetun.tap import TunnelListener
    from curvetun.tunnel import EchoFactory, ForwardingFactory, TrackingFactory

    name = options["name"]
    try:
        vault = await RemoteVault.connect(
            UNIXClientEndpoint(reactor, options["vault-socket"]), reactor
        )
    except VaultUnavailable as error:
        sys.stderr.write(f"curvetun {name}: {error}\n")
        return EX_UNAVAILABLE
    log.info("{name}: vault key {key}", name=name, key=fingerprint(vault.public_key))
    listeners = []
    for fd, kind in options["adopt"]:
        factory: TrackingFactory
        if options["forward"] is None:
            factory = EchoFactory()
        else:
            forward = clientFromString(reactor, options["forward"])
            factory = ForwardingFactory(forward, options["forward"])
        endpoint: IStreamServerEndpoint = AdoptedPortEndpoint(reactor, fd)
        if kind == "curvetun":
            raise NotImplementedError("curvetun over adopted sockets")
        listener = TunnelListener(endpoint, f"fd {fd}", factory, options["grace"], reactor)
        listener.startService()
        listeners.append(listener)

    stopped: Deferred[None] = Deferred()

    def reload(number: int, frame: object) -> None:
        reactor.callFromThread(log.info, "{name}: SIGHUP: reloading", name=name)

    def terminate(number: int, frame: object) -> None:
        if not stopped.called:
            reactor.callFromThread(stopped.callback, None)

    signal.signal(signal.SIGHUP, reload)
    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, terminate)
    await stopped
    log.info("{name}: stopping", name=name)
    for listener in listeners:
        await listener.stopService()
    await vault.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    """
    Run a worker; return its exit status.
    """
    from twisted.internet import reactor as default_reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    reactor: Any = default_reactor
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as error:
        sys.stderr.write(f"curvetun worker: {error}\n")
        return EX_USAGE
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    status: list[int] = []

    async def body() -> None:
        try:
            status.append(await run(reactor, options))
        finally:
            if reactor.running:
                reactor.stop()

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(body()))
    reactor.run(installSignalHandlers=False)
    return status[0] if status else 1


if __name__ == "__main__":
    sys.exit(main())
