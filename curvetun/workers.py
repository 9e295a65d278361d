"""
A supervisor for worker processes behind vault processes.

    supervisor --+-- vault process(es)  (the only holder of a secret key;
                 |                       python -m curvetun.vault_process)
                 +-- worker 1 ... worker N  (python -m curvetun.worker_main)

The supervisor binds every listening socket of every tunnel itself, then
starts one vault process per identity of the tunnels (tunnels that would
share an identity in a single process,
L{curvetun.tunnel_service.check_shared_identities}, share a vault) and
N workers, each of which runs every tunnel. Each worker inherits the
listening sockets as file descriptors (the tunnels' in order, from 3 on)
and adopts them (C{reactor.adoptStreamPort}); the kernel
hands each new connection to one of the workers waiting in C{accept}, and
the connection then stays with that worker. Workers ask each tunnel's
vault, over a UNIX socket of its own, for the long-term-key operations of
each handshake (L{curvetun.remote_vault}), the client end of a tunnel (a
curvetun C{--forward}) too; they never read a key directory.

Inherited sockets rather than C{SO_REUSEPORT}: one bind, by the
supervisor, works for every kind of inner endpoint (TCP on IPv4 or IPv6,
UNIX sockets, ports below 1024 bound before privileges are dropped), and
a worker that dies loses nothing (the socket, and its backlog, stay open
in the supervisor and the other workers). C{SO_REUSEPORT} would balance
connections more evenly across workers on Linux (each has its own accept
queue), but it needs every worker to bind, exists only for TCP and UDP,
and drops the connections waiting in a dying worker's queue.

A worker or vault that exits is started again after a back-off: 0.5
seconds, doubling after each exit up to 30 seconds, back to 0.5 once the
process had run for a minute. A vault that exits with status 64 or 78 (a
bad option, an unusable key directory) is not: the supervisor stops, and
exits with that status.

Each worker has a control channel to the supervisor
(L{curvetun.worker_control}): an AF_UNIX socket pair, one end inherited by
the worker, AMP on both. The worker says C{Ready} once every listener
listens and its signal handlers are installed; only then does the
supervisor send it commands.

SIGTERM (or SIGINT) to the supervisor: it stops listening itself, sends
SIGTERM to every worker (each stops listening and lets its open
connections finish for up to its grace time), waits for them, then stops
the vaults. SIGHUP to the supervisor: C{Reload} to every ready worker; a
worker not yet ready gets it once it says C{Ready} (it may have read the
registry before the SIGHUP). No signal is forwarded: a signal that
reaches a worker before its handler is installed would end it or be lost.
A worker whose control channel closes (the supervisor is gone) drains and
exits.

Metrics (C{--metrics}): the supervisor serves C{/metrics}, C{/status} and
C{/healthz} (L{curvetun.monitoring}) with the figures summed over the
workers, as L{SupervisorObserver} says; its health covers every vault.

A service manager (C{$NOTIFY_SOCKET}, L{curvetun.notify}) is told
C{READY=1} once every worker has said C{Ready}, C{RELOADING=1} then
C{READY=1} around a reload, and C{STOPPING=1} when the drain begins. The
workers and the vaults do not see C{$NOTIFY_SOCKET}: only the supervisor
speaks for the service.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

import attrs
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import CannotListenError, ProcessDone, ProcessExitedAlready
from twisted.internet.interfaces import IListeningPort, IProcessTransport, IStreamServerEndpoint
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from curvetun import __version__, notify
from curvetun.config import ProcessConfig, TunnelConfig
from curvetun.metrics import Figures, sum_figures
from curvetun.worker_control import ReloadFailed, SupervisorControl, adopt, channel

if TYPE_CHECKING:
    from curvetun.tunnel_service import StartupError

log = Logger()

EX_USAGE = 64
EX_CONFIG = 78

FIRST_CHILD_FD = 3
"""
The first file descriptor number of the listening sockets in a worker;
the control channel's comes after the last of them.
"""

FIGURES_INTERVAL = 1.0
"""Seconds between two requests for each worker's figures (with metrics)."""


@attrs.define
class Backoff:
    """
    How long to wait before starting a process again that exited: C{initial}
    seconds, doubling after each exit up to C{maximum}, and C{initial}
    again after a process that ran for C{reset_after} seconds.
    """

    initial: float = 0.5
    maximum: float = 30.0
    reset_after: float = 60.0
    _next: float = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self._next = self.initial

    def delay_after(self, uptime: float) -> float:
        """
        The delay before the next start, after a process that ran for
        C{uptime} seconds exited.
        """
        if uptime >= self.reset_after:
            self._next = self.initial
        delay = self._next
        self._next = min(2 * self._next, self.maximum)
        return delay


class _ChildProtocol(ProcessProtocol):
    """
    Tells its L{_Child} when the process ends.
    """

    def __init__(self, child: _Child) -> None:
        self.child = child

    def processEnded(self, reason: Failure) -> None:
        self.child.ended(reason)


def _describe_end(reason: Failure) -> str:
    value = reason.value
    if reason.check(ProcessDone):
        return "exited with status 0"
    status = getattr(value, "exitCode", None)
    signal_number = getattr(value, "signal", None)
    if signal_number is not None:
        try:
            return f"was killed by {signal.Signals(signal_number).name}"
        except ValueError:
            return f"was killed by signal {signal_number}"
    return f"exited with status {status}"


class _Child:
    """
    One supervised process (the vault, or one worker): started, watched,
    and started again after it ends, until the supervisor stops.
    """

    def __init__(
        self,
        supervisor: Supervisor,
        name: str,
        argv: list[str],
        child_fds: dict[int, int | str],
    ) -> None:
        self.supervisor = supervisor
        self.name = name
        self.argv = argv
        self.child_fds = child_fds
        self.backoff = Backoff(**supervisor.backoff)
        self.process: IProcessTransport | None = None
        # Twisted forgets the pid once the process is reaped, before
        # processEnded: keep it for the log line that says it ended.
        self._pid = 0
        self.started_at = 0.0
        self.starts = 0
        self._restart: Any = None
        self._ended: list[Deferred[None]] = []

    @property
    def pid(self) -> int | None:
        """
        The process id while it runs.
        """
        return None if self.process is None else self._pid

    def start(self) -> None:
        self._restart = None
        reactor = self.supervisor.reactor
        self.started_at = reactor.seconds()
        self.starts += 1
        self.process = reactor.spawnProcess(
            _ChildProtocol(self),
            sys.executable,
            [sys.executable, *self.argv],
            env=self.supervisor.environment,
            childFDs=self.child_fds,
        )
        self._pid = self.process.pid or 0
        log.info("{name} started (pid {pid})", name=self.name, pid=self.pid)

    def ended(self, reason: Failure) -> None:
        pid = self._pid
        self.process = None
        self.gone()
        uptime = self.supervisor.reactor.seconds() - self.started_at
        waiting, self._ended = self._ended, []
        for d in waiting:
            d.callback(None)
        if self.supervisor.stopping:
            log.info("{name} (pid {pid}) {end}", name=self.name, pid=pid, end=_describe_end(reason))
            return
        status = getattr(reason.value, "exitCode", None)
        if self in self.supervisor.vaults and status in (EX_USAGE, EX_CONFIG):
            log.critical(
                "{name} (pid {pid}) {end}: it cannot start; stopping",
                name=self.name,
                pid=pid,
                end=_describe_end(reason),
            )
            self.supervisor.give_up(status)
            return
        delay = self.backoff.delay_after(uptime)
        log.warn(
            "{name} (pid {pid}) {end} after {uptime:.1f} s; starting it again in {delay:g} s",
            name=self.name,
            pid=pid,
            end=_describe_end(reason),
            uptime=uptime,
            delay=delay,
        )
        self._restart = self.supervisor.reactor.callLater(delay, self.start)

    def gone(self) -> None:
        """
        The process has ended (before it is started again, if it is).
        """

    def signal(self, number: int) -> None:
        """
        Send signal C{number} to the process, if it runs.
        """
        if self.process is not None:
            with contextlib.suppress(ProcessExitedAlready):
                self.process.signalProcess(number)

    def stop(self, timeout: float) -> Deferred[None]:
        """
        Do not start it again; SIGTERM it, and SIGKILL it if it has not
        ended after C{timeout} seconds.

        @return: a Deferred that fires once it has ended.
        """
        if self._restart is not None:
            self._restart.cancel()
            self._restart = None
        if self.process is None:
            return succeed(None)
        ended: Deferred[None] = Deferred()
        self._ended.append(ended)
        self.signal(signal.SIGTERM)
        killer = self.supervisor.reactor.callLater(timeout, self._kill_late, timeout)

        def cancel_killer(result: None) -> None:
            if killer.active():
                killer.cancel()

        return ended.addCallback(cancel_killer)

    def _kill_late(self, timeout: float) -> None:
        log.warn(
            "{name} (pid {pid}) still runs {timeout:g} s after SIGTERM: killing it",
            name=self.name,
            pid=self.pid,
            timeout=timeout,
        )
        self.signal(signal.SIGKILL)


class _Worker(_Child):
    """
    A worker process, with its control channel (L{curvetun.worker_control}).

    @ivar control: the supervisor's end of the channel of the worker that
        runs now (or L{None}).
    @ivar ready: whether that worker has said C{Ready}.
    @ivar reload_pending: whether it is to be sent C{Reload} once ready.
    @ivar figures: its figures, as it last said (by tunnel name).
    """

    def __init__(
        self,
        supervisor: Supervisor,
        name: str,
        argv: list[str],
        child_fds: dict[int, int | str],
        control_fd: int,
    ) -> None:
        super().__init__(supervisor, name, [*argv, "--control-fd", str(control_fd)], child_fds)
        self.control_fd = control_fd
        self.control: SupervisorControl | None = None
        self.ready = False
        self.reload_pending = False
        self.figures: dict[str, Figures] = {}

    def start(self) -> None:
        self.ready = False
        # A worker that starts now reads the registry after any SIGHUP
        # before: it needs no reload of its own.
        self.reload_pending = False
        self.figures = {}
        ours, theirs = channel()
        fds = self.child_fds
        self.child_fds = {**fds, self.control_fd: theirs.fileno()}
        try:
            super().start()
        except BaseException:
            ours.close()
            raise
        finally:
            self.child_fds = fds
            # Our copy of the worker's end: once the worker exits, the
            # channel closes.
            theirs.close()
        control = SupervisorControl(lambda: self._said_ready(control))
        self.control = control
        adopt(self.supervisor.reactor, ours.detach(), control)

    def _said_ready(self, control: SupervisorControl) -> None:
        if control is not self.control:
            return  # the channel of a worker that has ended since
        self.ready = True
        log.info("{name} (pid {pid}) is ready", name=self.name, pid=self.pid)
        if self.reload_pending:
            self.reload_pending = False
            self.reload()
        self.supervisor.worker_ready()

    def reload(self) -> Deferred[None]:
        """
        Send C{Reload}; log a failure.

        @return: fires once the worker answered (or failed to).
        """
        if self.control is None:
            return succeed(None)

        def failed(failure: Failure) -> None:
            if failure.check(ReloadFailed):
                log.error("{name}: the reload failed: {error}", name=self.name, error=failure.value)
            else:
                log.info("{name} did not answer the reload: it ended", name=self.name)

        return self.control.reload().addCallbacks(lambda _: None, failed)

    def ask_figures(self) -> None:
        """
        Ask the worker for its figures, and keep them.
        """
        control = self.control
        if control is None or not self.ready:
            return

        def keep(figures: dict[str, Figures]) -> None:
            if control is self.control:
                self.figures = figures

        def failed(failure: Failure) -> None:
            if failure.check(ValueError):
                log.warn("{name} answered figures that are not", name=self.name)

        control.figures().addCallbacks(keep, failed)

    def gone(self) -> None:
        self.supervisor.worker_gone(self)
        self.ready = False
        self.control = None
        self.figures = {}


@attrs.frozen
class Listen:
    """
    One listening socket the supervisor binds and every worker adopts.

    @ivar description: the endpoint string, as given.
    @ivar endpoint: the endpoint that binds it: the inner, plain one (TCP,
        UNIX, ...) of a C{curvetun:} string, whose server side the workers
        run over it.
    @ivar kind: what the workers run on it (see
        L{curvetun.worker_main.KINDS}): C{plain}, C{curvetun} or
        C{curvetun-proxied}.
    @ivar tunnel: the index of the tunnel it belongs to.
    """

    description: str
    endpoint: IStreamServerEndpoint
    kind: str
    tunnel: int = 0


def listens_for(config: TunnelConfig, reactor: Any, tunnel: int = 0) -> list[Listen]:
    """
    The sockets to bind for C{config}'s listen endpoints, parsed without
    opening any key directory; C{tunnel} is the tunnel's index.

    @raise StartupError: a listen string is malformed (status 64), or a
        C{curvetun:} one, or a curvetun C{forward}, names another key
        directory or registry than the tunnel's (the workers have the
        tunnel's identity only: its vault's).
    """
    from twisted.internet.endpoints import serverFromString

    from curvetun.endpoints import parse_server_parts, split_description
    from curvetun.tunnel_service import EX_USAGE, StartupError, parse_endpoint

    source = config.source
    listens = []
    for description in config.listen:
        kind, _, rest = description.partition(":")
        if kind.lower() != "curvetun":
            endpoint = parse_endpoint(
                source.option("listen"),
                description,
                serverFromString,
                reactor,
                source.where("listen"),
            )
            listens.append(Listen(description, endpoint, "plain", tunnel))
            continue
        try:
            args, kwargs = split_description(rest)
            parts = parse_server_parts(reactor, *args, **kwargs)
        except ValueError as error:
            raise StartupError(
                f"{source.where('listen')}bad {source.option('listen')} endpoint "
                f"{description[:80]!r}: {error}",
                EX_USAGE,
            ) from None
        _same_identity(config, "listen", description, parts.keydir, parts.registry)
        kind = "curvetun-proxied" if parts.proxied else "curvetun"
        listens.append(Listen(description, parts.wrapped, kind, tunnel))
    forward = config.forward
    if forward is not None and forward.partition(":")[0].lower() == "curvetun":
        # The client end of a tunnel: its curvetun: string is parsed in
        # each worker, with the tunnel's identity (its vault's); a string
        # naming another key directory would have the worker load it.
        try:
            _, kwargs = split_description(forward.partition(":")[2])
        except ValueError:
            kwargs = {}  # the worker's parse says what is wrong with it
        _same_identity(config, "forward", forward, kwargs.get("keydir"), kwargs.get("registry"))
    return listens


def _same_identity(
    config: TunnelConfig, key: str, description: str, keydir: str | None, registry: str | None
) -> None:
    """
    Refuse a C{curvetun:} string (the tunnel's setting C{key}) that names
    another key directory or registry than the tunnel's.
    """
    from curvetun.tunnel_service import EX_USAGE, StartupError

    source = config.source
    for option, value, tunnel_value in [
        ("keydir", keydir, config.keydir),
        ("registry", registry, config.registry),
    ]:
        if option == "registry" and value == "dns" and key == "forward":
            continue  # the server's key from DNS: no file of the identity
        if value is not None and os.path.abspath(value) != os.path.abspath(tunnel_value or ""):
            raise StartupError(
                f"{source.where(key)}{source.option(key)} {description[:80]!r}: with --workers, "
                f"curvetun: endpoints use the tunnel's {option} (give it as "
                f"{source.option(option)})",
                EX_USAGE,
            )


def listens_for_tunnels(configs: Sequence[TunnelConfig], reactor: Any) -> list[Listen]:
    """
    L{listens_for} every tunnel of C{configs}, in order: the order in which
    the workers inherit the sockets.
    """
    return [
        listen
        for index, config in enumerate(configs)
        for listen in listens_for(config, reactor, index)
    ]


class _NeverAccepts(Protocol):
    pass


def _vault_argv(config: TunnelConfig, socket: str) -> list[str]:
    """
    The command line of the vault process of C{config}'s identity.
    """
    return [
        "-m",
        "curvetun.vault_process",
        "--keydir",
        config.keydir,
        "--socket",
        socket,
        "--create",
        # Its standard input is our pipe: it ends with us.
        "--supervised",
        # The vault makes every nonce: the counters' place and the
        # instance's part of the counter space are its.
        *(["--statedir", config.statedir] if config.statedir else []),
        *(["--instance", str(config.instance)] if config.instance is not None else []),
    ]


class Supervisor(Service):
    """
    Runs one vault process per identity of its tunnels and C{workers}
    worker processes, each running every tunnel, and binds the sockets
    that the workers accept on.

    @ivar configs: the tunnels every worker runs.
    @ivar config: the first of them.
    @ivar vaults: the vault processes' L{_Child}s, one per identity (as
        L{curvetun.worker_main.vault_numbers} numbers them).
    @ivar vault_sockets: the UNIX socket of each vault, in that order.
    @ivar tunnel_vaults: the index in C{vaults} of each tunnel's vault.
    @ivar workers: the workers' L{_Worker}s.
    @ivar ports: the listening ports, once bound.
    @ivar exit_status: the status to exit with, once it gave up (or None).
    @ivar observer: what the monitoring endpoint reports (L{SupervisorObserver}).
    @ivar monitor: the monitoring endpoint's listener, with C{metrics}.
    @ivar told_ready: whether the service manager was told C{READY=1}.
    """

    def __init__(
        self,
        reactor: Any,
        config: TunnelConfig | Sequence[TunnelConfig],
        workers: int,
        listens: Sequence[Listen] | None = None,
        vault_socket: str | None = None,
        stop_timeout: float | None = None,
        backoff: dict[str, float] | None = None,
        on_give_up: Callable[[int], None] | None = None,
        metrics: str | None = None,
        environ: Mapping[str, str] | None = None,
        figures_interval: float = FIGURES_INTERVAL,
        metrics_where: str = "",
    ) -> None:
        """
        @param config: the tunnel, or the tunnels, every worker runs (their
            key directories are read by the vault processes only).
        @param workers: how many worker processes.
        @param listens: what to bind (default: L{listens_for_tunnels}
            C{config}).
        @param vault_socket: the first vault's UNIX socket path; by
            default, and for every other vault, one in a new private
            temporary directory, removed at the end.
        @param stop_timeout: seconds a worker may take to stop after SIGTERM
            before it is killed (default: the longest grace time and 10
            seconds).
        @param backoff: keyword arguments for each process's L{Backoff}.
        @param on_give_up: called with an exit status when a vault cannot
            start (default: stop the reactor).
        @param metrics: the server endpoint string of the monitoring
            endpoint, or L{None} for none; C{metrics_where} starts a
            message about it (the file and line).
        @param environ: the environment: the children's (without
            C{NOTIFY_SOCKET}) and where C{NOTIFY_SOCKET} is found (default:
            the process's).
        @param figures_interval: seconds between two requests for each
            worker's figures, with C{metrics}.
        @raise StartupError: a listen or metrics endpoint string is
            unusable, or two tunnels cannot share the identity they name.
        """
        from curvetun.worker_main import vault_numbers

        if workers < 1:
            raise ValueError("at least one worker")
        configs = [config] if isinstance(config, TunnelConfig) else list(config)
        if not configs:
            raise ValueError("at least one tunnel")
        self.reactor = reactor
        self.configs = configs
        self.config = configs[0]
        # The single-process rule for identities shared by tunnels, and
        # its refusals, before anything is bound or started.
        self.tunnel_vaults = vault_numbers(configs)
        self.listens = (
            list(listens) if listens is not None else listens_for_tunnels(configs, reactor)
        )
        self.worker_count = workers
        grace = max(c.grace for c in configs)
        self.stop_timeout = grace + 10 if stop_timeout is None else stop_timeout
        self.backoff = backoff or {}
        self.on_give_up = on_give_up
        self.stopping = False
        self.exit_status: int | None = None
        self.ports: list[IListeningPort] = []
        self._own_socket_directory: str | None = None
        count = max(self.tunnel_vaults) + 1
        sockets = [] if vault_socket is None else [vault_socket]
        if len(sockets) < count:
            # Private: only this user may reach the vaults through it.
            self._own_socket_directory = tempfile.mkdtemp(prefix="curvetun-vault-")
            sockets += [
                os.path.join(self._own_socket_directory, f"vault{n}.sock")
                for n in range(len(sockets) + 1, count + 1)
            ]
        self.vault_sockets = sockets
        self.vault_socket = sockets[0]
        self.notify_environ = dict(os.environ if environ is None else environ)
        # Only the supervisor speaks for the service to its manager.
        self.environment = {k: v for k, v in self.notify_environ.items() if k != "NOTIFY_SOCKET"}
        self.told_ready = False
        owners = [configs[self.tunnel_vaults.index(n)] for n in range(count)]
        self.vaults = [
            _Child(
                self,
                "vault" if count == 1 else f"vault {number + 1}",
                _vault_argv(owner, socket),
                {0: "w", 1: 1, 2: 2},
            )
            for number, (owner, socket) in enumerate(zip(owners, sockets, strict=True))
        ]
        self.vault_keydirs = [owner.keydir for owner in owners]
        self.workers: list[_Worker] = []
        self._previous_sighup: Any = None
        self.observer = SupervisorObserver(self)
        self.monitor: IService | None = None
        self._poll = LoopingCall(self._ask_figures)
        self._poll.clock = reactor
        self._figures_interval = figures_interval
        if metrics is not None:
            from twisted.internet.endpoints import serverFromString

            from curvetun.monitoring import MonitoringListener
            from curvetun.tunnel_service import parse_endpoint

            endpoint = parse_endpoint(
                "--metrics", metrics, serverFromString, reactor, metrics_where
            )
            self.monitor = MonitoringListener(
                endpoint, metrics, self.observer, reactor, metrics_where
            )

    @property
    def vault(self) -> _Child:
        """
        The first vault (the only one when every tunnel has one identity).
        """
        return self.vaults[0]

    def privilegedStartService(self) -> None:
        """
        Bind every listening socket (before privileges are dropped): the
        ports are opened here and never accept in this process. Then the
        monitoring endpoint, if any.

        @raise Exception: an endpoint cannot listen (whatever it raised;
            L{StartupError} for the monitoring endpoint).
        """
        super().privilegedStartService()
        for listen in self.listens:
            failures: list[Failure] = []
            listening = listen.endpoint.listen(Factory.forProtocol(_NeverAccepts))
            listening.addCallbacks(self.ports.append, failures.append)
            if failures:
                self._close_ports()
                failures[0].raiseException()
            # The supervisor only holds the socket: the workers accept.
            self.ports[-1].stopReading()  # type: ignore[attr-defined]
            log.info(
                "Listening on {endpoint} ({address}) in {workers} worker(s)",
                endpoint=listen.description,
                address=_address(self.ports[-1]),
                workers=self.worker_count,
            )
        if self.monitor is not None:
            try:
                self.monitor.privilegedStartService()
            except BaseException:
                self._close_ports()
                raise

    def _close_ports(self) -> None:
        ports, self.ports = self.ports, []
        for port in ports:
            port.stopListening()

    def startService(self) -> None:
        """
        Start the vaults and the workers, and reload them on SIGHUP.
        """
        if not self.ports and self.listens:
            self.privilegedStartService()
        super().startService()
        # First: a SIGHUP from now on reloads, and must not end the
        # supervisor (SIGHUP's default action) while its workers start.
        self._previous_sighup = signal.signal(signal.SIGHUP, self._sighup)
        child_fds: dict[int, int | str] = {0: "w", 1: 1, 2: 2}
        adopt: list[str] = []
        # Every tunnel's listeners, in order, from descriptor 3 on; the
        # control channel's after the last.
        for number, (port, listen) in enumerate(zip(self.ports, self.listens, strict=False)):
            fd = FIRST_CHILD_FD + number
            child_fds[fd] = port.fileno()  # type: ignore[attr-defined]
            adopt += ["--adopt", f"{fd}:{listen.kind}"]
        control_fd = FIRST_CHILD_FD + len(self.listens)
        from curvetun.worker_main import config_to_json

        config = config_to_json(self.configs)
        vaults = [argument for path in self.vault_sockets for argument in ("--vault-socket", path)]
        for number in range(1, self.worker_count + 1):
            argv = [
                "-m",
                "curvetun.worker_main",
                *vaults,
                "--config",
                config,
                "--name",
                f"worker {number}",
                *adopt,
            ]
            self.workers.append(_Worker(self, f"worker {number}", argv, child_fds, control_fd))
        for vault, keydir in zip(self.vaults, self.vault_keydirs, strict=True):
            vault.start()
            if len(self.vaults) > 1:
                log.info("{name} holds the key of {keydir}", name=vault.name, keydir=keydir)
        for worker in self.workers:
            worker.start()
        if self.monitor is not None:
            self.monitor.startService()
            self._poll.start(self._figures_interval, now=False)

    def _sighup(self, number: int, frame: object) -> None:
        # A signal handler may only hand work to the reactor.
        self.reactor.callFromThread(self.reload)

    def reload(self) -> Deferred[None]:
        """
        Have every worker read its registry again: C{Reload} to each ready
        worker now, and to each other once it says C{Ready}. The service
        manager is told C{RELOADING=1}, then C{READY=1} once the ready
        workers have answered.

        @return: fires once the ready workers have answered.
        """
        return Deferred.fromCoroutine(self._reload())

    async def _reload(self) -> None:
        log.info("SIGHUP: reloading {count} worker(s)", count=len(self.workers))
        # Before the first READY=1 the manager still waits for the start:
        # a reload then must not tell it the service is ready.
        tell = self.told_ready
        if tell:
            notify.reloading(self.notify_environ)
        answers = []
        for worker in self.workers:
            if worker.ready:
                answers.append(worker.reload())
            else:
                worker.reload_pending = True
        await DeferredList(answers)
        if tell and not self.stopping:
            notify.ready(self.status_line(), self.notify_environ)

    def worker_ready(self) -> None:
        """
        A worker said C{Ready}: once every one has, tell the service manager.
        """
        if self.told_ready or self.stopping:
            return
        if all(worker.ready for worker in self.workers):
            self.told_ready = True
            notify.ready(self.status_line(), self.notify_environ)

    def worker_gone(self, worker: _Worker) -> None:
        """
        A worker ended: keep its counters (see L{SupervisorObserver}).
        """
        self.observer.keep_counters(worker.figures)

    def _ask_figures(self) -> None:
        for worker in self.workers:
            worker.ask_figures()

    def status_line(self) -> str:
        """
        What the workers serve, for the manager's C{STATUS}.
        """
        addresses = ", ".join(_address(port) for port in self.ports)
        return f"{self.worker_count} workers listening on {addresses}"

    def give_up(self, status: int) -> None:
        """
        A vault cannot start: stop everything, and exit with C{status}.
        """
        self.exit_status = status
        if self.on_give_up is not None:
            self.on_give_up(status)
        elif self.reactor.running:
            self.reactor.stop()

    def stopService(self) -> Deferred[None]:
        """
        Stop listening, drain and stop every worker, then stop the vaults.
        """
        if self.running:
            notify.stopping(self.notify_environ)
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self.stopping = True
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        # Our copies of the sockets first: once the workers close theirs,
        # the ports are closed and clients are refused, not left waiting.
        ports, self.ports = self.ports, []
        for port in ports:
            await _maybe(port.stopListening())
        if any(worker.process is not None for worker in self.workers):
            log.info("Stopping {count} worker(s)", count=len(self.workers))
        await DeferredList([worker.stop(self.stop_timeout) for worker in self.workers])
        if self._poll.running:
            self._poll.stop()
        if self.monitor is not None and self.monitor.running:
            # Kept through the drain, so that it can be watched to its end.
            await _maybe(self.monitor.stopService())
        await DeferredList([vault.stop(self.stop_timeout) for vault in self.vaults])
        if self._own_socket_directory is not None:
            shutil.rmtree(self._own_socket_directory, ignore_errors=True)
        log.info("All workers and vaults have stopped")


class SupervisorObserver:
    """
    The figures, status and health of a L{Supervisor}'s workers, for the
    monitoring endpoint (L{curvetun.monitoring}).

    The supervisor asks each ready worker for its figures every second or
    so (C{Figures}), rather than each worker pushing them: the workers stay
    passive (no timer of their own, nothing sent when nobody serves
    metrics), the supervisor alone sets the pace, and it asks only the
    workers it knows to be ready. A scrape is answered at once (Prometheus
    collection is synchronous) from the latest figures each worker gave,
    so it lags by up to that interval.

    The counters (handshakes, bytes, refusals) never go back: when a worker
    ends, the counters it last gave are kept, added into every later sum
    (what it counted after its last answer is lost; at most an interval's
    worth). The gauges (connections, handshakes in progress) are those of
    the workers that run.
    """

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self._names = [config.name or config.listen[0] for config in supervisor.configs]
        self.ended: dict[str, Figures] = {name: Figures() for name in self._names}

    def keep_counters(self, figures: Mapping[str, Figures]) -> None:
        """
        Add the counters of a worker that ended to the kept ones.
        """
        for name, these in figures.items():
            counters = Figures(
                handshakes=dict(these.handshakes),
                bytes_received=these.bytes_received,
                bytes_sent=these.bytes_sent,
                refused=dict(these.refused),
            )
            self.ended.setdefault(name, Figures()).add(counters)

    def figures(self) -> dict[str, Figures]:
        """
        Each tunnel's figures, summed over the workers (and those that
        ended, for the counters).
        """
        return sum_figures([self.ended, *(worker.figures for worker in self.supervisor.workers)])

    def status(self) -> dict[str, Any]:
        """
        The status document: the tunnels (without per-connection detail:
        each connection is its worker's), each worker and each vault
        (C{vault} is the first, C{vaults} every one).
        """
        supervisor = self.supervisor
        vaults = [
            {
                "name": vault.name,
                "pid": vault.pid,
                "running": vault.pid is not None,
                "keydir": keydir,
            }
            for vault, keydir in zip(supervisor.vaults, supervisor.vault_keydirs, strict=True)
        ]
        return {
            "version": __version__,
            "now": supervisor.reactor.seconds(),
            "tunnels": [
                {
                    "name": name,
                    "listen": list(config.listen),
                    "forward": config.forward,
                    "server_keys": [],
                    "connections": [],
                }
                for name, config in zip(self._names, supervisor.configs, strict=True)
            ],
            "workers": [
                {
                    "name": worker.name,
                    "pid": worker.pid,
                    "ready": worker.ready,
                    "connections": sum(f.connections for f in worker.figures.values()),
                }
                for worker in supervisor.workers
            ],
            "vault": {"pid": supervisor.vault.pid, "running": supervisor.vault.pid is not None},
            "vaults": vaults,
        }

    def health(self) -> str | None:
        """
        L{None} while every worker is ready and every vault runs; otherwise
        why not, in one line.
        """
        supervisor = self.supervisor
        if supervisor.stopping or not supervisor.running:
            return "the workers are not running"
        for vault, keydir in zip(supervisor.vaults, supervisor.vault_keydirs, strict=True):
            if vault.pid is None:
                if len(supervisor.vaults) == 1:
                    return "the vault process is not running"
                return f"the vault process of {keydir} is not running"
        ready = sum(1 for worker in supervisor.workers if worker.ready)
        if ready < supervisor.worker_count:
            return f"{ready} of {supervisor.worker_count} workers ready"
        return None


async def _maybe(result: Deferred[None] | None) -> None:
    if result is not None:
        await result


def _address(port: IListeningPort) -> str:
    host: Any = port.getHost()
    if hasattr(host, "port"):
        return f"{host.host}:{host.port}"
    return str(getattr(host, "name", host))


# -- under twist -------------------------------------------------------------------------


class _ExitOnStartupError(MultiService):
    """
    The supervisor, with a failure to start turned into a one-line message
    and an exit status, as C{twist curvetun} does for a single process.
    """

    def __init__(self, supervisor: Supervisor) -> None:
        super().__init__()
        self.supervisor = supervisor
        supervisor.setServiceParent(self)

    def privilegedStartService(self) -> None:
        from curvetun.tunnel_service import EX_UNAVAILABLE, StartupError

        try:
            super().privilegedStartService()
        except CannotListenError as error:
            _exit(StartupError(f"cannot listen: {error}", EX_UNAVAILABLE))
        except StartupError as error:
            _exit(error)


def _exit(error: StartupError) -> NoReturn:
    sys.stderr.write(f"twist curvetun: {error}\n")
    sys.stderr.flush()
    raise SystemExit(error.status)


def read_config_or_exit(path: str) -> ProcessConfig:
    """
    L{curvetun.config.read_config}; a file that cannot be used exits with
    status 64 and one line naming the file, the line and the key.
    """
    from curvetun.config import ConfigFileError, read_config

    try:
        return read_config(path)
    except ConfigFileError as error:
        exit_usage(str(error))


def exit_usage(message: str) -> NoReturn:
    """
    Exit with status 64 (C{EX_USAGE}) and the one line C{message}.
    """
    from curvetun.tunnel_service import StartupError

    _exit(StartupError(message, EX_USAGE))


def make_supervisor_service(
    config: TunnelConfig | Sequence[TunnelConfig],
    workers: int,
    reactor: Any = None,
    metrics: str | None = None,
    metrics_where: str = "",
) -> IService:
    """
    What C{twist curvetun --workers N} runs: a L{Supervisor} of C{workers}
    processes running the tunnel (or tunnels) C{config}, with the
    monitoring endpoint C{metrics} (an endpoint string; C{metrics_where}
    places a message about it) if given. A vault that cannot start ends
    the process with its status (64 or 78) once everything stopped.
    """
    from curvetun.tunnel_service import StartupError

    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor

    def give_up(status: int) -> None:
        # twist would exit with 0 once the reactor stops: end with the
        # vault's status instead, after every service has stopped.
        def exit_now() -> None:
            sys.stderr.flush()
            os._exit(status)

        reactor.addSystemEventTrigger("after", "shutdown", exit_now)
        reactor.stop()

    try:
        supervisor = Supervisor(
            reactor,
            config,
            workers,
            on_give_up=give_up,
            metrics=metrics,
            metrics_where=metrics_where,
        )
    except StartupError as error:
        _exit(error)
    return _ExitOnStartupError(supervisor)


def make_supervisor_service_from_file(
    process: ProcessConfig, workers: int, reactor: Any = None, metrics: str | None = None
) -> IService:
    """
    L{make_supervisor_service} for the tunnels of a config file (as
    L{curvetun.config.read_config} read it): every worker runs every
    tunnel; C{metrics} (C{--metrics}) overrides the file's C{metrics}.
    """
    if metrics is None:
        return make_supervisor_service(
            process.tunnels, workers, reactor, process.metrics, process.metrics_where
        )
    return make_supervisor_service(process.tunnels, workers, reactor, metrics)


# -- a command line of its own ---------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """
    C{python -m curvetun.workers --keydir DIR --workers N --listen ENDPOINT
    ... [--forward ENDPOINT] [--grace SECONDS] [--metrics ENDPOINT]}: run a
    supervisor in the foreground until SIGTERM or SIGINT, without C{twist}
    (C{twist curvetun --workers N} is the way to run one).
    """
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver
    from twisted.python import usage

    from curvetun.tunnel_service import StartupError

    class Options(usage.Options):
        optParameters: ClassVar[list[list[str | None]]] = [
            ["keydir", None, None, "The key directory (read by the vault process only)."],
            ["workers", None, "2", "How many worker processes."],
            ["forward", None, None, "Forward each connection here (default: echo)."],
            ["grace", None, "10", "Seconds open connections may take to finish."],
            ["metrics", None, None, "Serve /metrics, /status and /healthz on this endpoint."],
        ]

        def __init__(self) -> None:
            super().__init__()
            self["listen"] = []

        def opt_listen(self, description: str) -> None:
            self["listen"].append(description)

    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
        if not options["keydir"] or not options["listen"]:
            raise usage.UsageError("--keydir and at least one --listen are required")
        config = TunnelConfig(
            keydir=options["keydir"],
            listen=tuple(options["listen"]),
            forward=options["forward"],
            grace=float(options["grace"]),
        )
        supervisor = Supervisor(
            reactor, config, int(options["workers"]), metrics=options["metrics"]
        )
    except (usage.UsageError, ValueError, StartupError) as error:
        sys.stderr.write(f"curvetun workers: {error}\n")
        return getattr(error, "status", EX_USAGE)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    supervisor.privilegedStartService()
    supervisor.startService()
    reactor.addSystemEventTrigger("before", "shutdown", supervisor.stopService)
    reactor.run()
    return supervisor.exit_status or 0


if __name__ == "__main__":
    sys.exit(main())
