"""
C{twist curvetun}: forward connections between endpoints, either of which
may be a curvetun endpoint, or echo them.

    twist curvetun [--listen ENDPOINT]... [--forward ENDPOINT]
                   [--keydir DIR] [--registry FILE] [--grace SECONDS]
                   [--handshake-timeout SECONDS]

The server end of a tunnel to a local service::

    twist curvetun --listen curvetun:7700 --forward tcp:127.0.0.1:6379

and its client end::

    twist curvetun --listen tcp:6380:interface=127.0.0.1 --forward curvetun:server:7700:key=KEY

Without C{--forward} each connection is echoed, so that C{twist curvetun}
alone is a curvetun server to try.

On SIGTERM (or SIGINT) it stops listening, lets open connections finish
for up to C{--grace} seconds, aborts the rest, and exits; C{twist} then
re-raises the signal, so the status is that of a process ended by it (see
L{TunnelService.stopService}). It exits before starting, with a one-line
message, with status 64 (C{EX_USAGE}) for a bad option or endpoint string,
78 (C{EX_CONFIG}) for an unusable key directory or registry, and 69
(C{EX_UNAVAILABLE}) when a listen endpoint cannot listen.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any, NoReturn

import attrs
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import (
    IListeningPort,
    IReactorTime,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from .addresses import format_address
from .admission import ConnectionLimits
from .endpoints import DEFAULT_PORT, REGISTRY_FILE, default_keydir, service_pool
from .errors import CurveTunError, KeyFileError, RegistryError
from .factories import DEFAULT_HANDSHAKE_TIMEOUT
from .keys import format_public_key
from .service import CurveTunService
from .tunnel import EchoFactory, ForwardingFactory, TrackingFactory
from .vault import SECRET_KEY_FILE

# sysexits.h values (the os module has them only on Unix).
EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_CONFIG = 78

DEFAULT_GRACE = 10.0
"""
Seconds open connections may take to finish when the service stops.
"""

DEFAULT_LISTEN = f"curvetun:{DEFAULT_PORT}"

log = Logger()


class StartupError(CurveTunError):
    """
    The service cannot start: a bad endpoint string, an unusable key
    directory or registry, or a port it cannot listen on.

    @ivar status: the exit status C{twist curvetun} ends with.
    """

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _seconds(option: str, text: str, allow_zero: bool) -> float:
    """
    Parse a number of seconds given to C{--option}.

    @raise usage.UsageError: it is not a finite number, is negative, or is
        zero when C{allow_zero} is false.
    """
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        kind = "a non-negative" if allow_zero else "a positive"
        raise usage.UsageError(f"--{option} must be {kind} number of seconds, not {text[:40]!r}")
    return value


_DEFAULT_LIMITS = ConnectionLimits()


class Options(usage.Options):
    """
    The options of C{twist curvetun}. After parsing: C{"listen"} is a
    non-empty list of endpoint strings, C{"forward"} an endpoint string or
    L{None}, C{"keydir"} a path, C{"registry"} a path or L{None} (the key
    directory's), and C{"grace"} and C{"handshake-timeout"} floats.
    """

    synopsis = (
        "[--listen ENDPOINT]... [--forward ENDPOINT] [--keydir DIR] "
        "[--registry FILE] [--grace SECONDS] [--handshake-timeout SECONDS] "
        "[--idle-timeout SECONDS] [--max-connections N] ..."
    )
    longdesc = (
        "Forward each connection accepted on a --listen endpoint to a connection "
        "opened through the --forward endpoint, both ways, once the incoming side "
        "is authenticated; either may be a curvetun: endpoint. Without --forward, "
        "echo what is received. The key directory is created, with a fresh key, "
        "if it does not exist."
    )

    optParameters = [
        [
            "forward",
            "f",
            None,
            "Endpoint to forward each connection to, e.g. tcp:127.0.0.1:6379 or "
            "curvetun:HOST:7700:key=KEY [default: echo what is received].",
        ],
        [
            "keydir",
            "k",
            None,
            "Key directory of this side's long-term key, created if missing "
            "[default: $CURVETUN_HOME, else ~/.curvetun].",
        ],
        ["registry", "r", None, "Registry file [default: the file registry in the key directory]."],
        [
            "grace",
            "g",
            str(DEFAULT_GRACE),
            "Seconds open connections may take to finish when stopping; then they are aborted.",
        ],
        [
            "handshake-timeout",
            None,
            str(DEFAULT_HANDSHAKE_TIMEOUT),
            "Seconds a curvetun handshake may take.",
        ],
        [
            "idle-timeout",
            None,
            "0",
            "Close a curvetun connection that receives nothing for this many seconds (0: never).",
        ],
        *(
            [
                f"max-{name.replace('_', '-')}",
                None,
                str(getattr(_DEFAULT_LIMITS, name)),
                f"The most {what} a curvetun listen endpoint takes at once "
                "(0: no limit); past it, new connections are closed at once.",
            ]
            for name, what in (
                ("connections", "connections"),
                ("connections_per_address", "connections from one IP address"),
                ("handshakes", "unfinished handshakes"),
                ("handshakes_per_address", "unfinished handshakes from one IP address"),
            )
        ),
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, endpoint: str) -> None:
        """
        Endpoint to listen on; repeat for several [default: curvetun:7700].
        """
        self["listen"].append(endpoint)

    opt_l = opt_listen

    def postOptions(self) -> None:
        """
        Check the values and fill in the defaults that depend on others.

        @raise usage.UsageError: a value is malformed (a one-line message).
        """
        # An empty value is a mistake (an unset shell variable, say), not a
        # request for the default.
        if any(not endpoint.strip() for endpoint in self["listen"]):
            raise usage.UsageError(f"--listen needs an endpoint, e.g. {DEFAULT_LISTEN}")
        if self["forward"] is not None and not self["forward"].strip():
            raise usage.UsageError("--forward needs an endpoint, e.g. tcp:127.0.0.1:6379")
        for option in ("keydir", "registry"):
            if self[option] is not None and not self[option].strip():
                raise usage.UsageError(f"--{option} needs a path")
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        if self["keydir"] is None:
            self["keydir"] = default_keydir()
        self["grace"] = _seconds("grace", str(self["grace"]), allow_zero=True)
        self["handshake-timeout"] = _seconds(
            "handshake-timeout", str(self["handshake-timeout"]), allow_zero=False
        )
        self["idle-timeout"] = (
            _seconds("idle-timeout", str(self["idle-timeout"]), allow_zero=True) or None
        )
        limits = {}
        for field in attrs.fields(ConnectionLimits):
            option = f"max-{field.name.replace('_', '-')}"
            text = str(self[option])
            if not (text.isascii() and text.isdigit()):
                raise usage.UsageError(f"--{option} must be a whole number, not {text[:40]!r}")
            limits[field.name] = int(text) or None
        self["limits"] = ConnectionLimits(**limits)


class TunnelListener(Service):
    """
    Listens on one endpoint with one factory while running. Stopping stops
    listening at once, then lets the open connections finish for up to
    C{grace} seconds and aborts the rest.

    @ivar port: the listening port, while listening.
    """

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        description: str,
        factory: TrackingFactory,
        grace: float,
        clock: IReactorTime,
    ) -> None:
        self.endpoint = endpoint
        self.description = description
        self.factory = factory
        self.grace = grace
        self.clock = clock
        self.port: IListeningPort | None = None
        self.listening = False
        self._listening: Deferred[None] | None = None
        self._waiting_until_not_listening: list[Deferred[None]] = []

    def privilegedStartService(self) -> None:
        """
        Listen (before privileges are shed, under C{twistd}).

        @raise StartupError: the endpoint cannot listen, and said so at once
            (TCP, curvetun and UNIX endpoints do).
        """
        super().privilegedStartService()
        failed: list[Failure] = []

        def listening(port: IListeningPort) -> None:
            self.port = port
            self.listening = True
            log.info(
                "Listening on {endpoint} ({address}): {what}",
                endpoint=self.description,
                address=format_address(port.getHost()),
                what=self._what(),
            )

        def cannot_listen(failure: Failure) -> None:
            failed.append(failure)
            if not synchronous and not failure.check(CancelledError):
                log.critical(
                    "Cannot listen on {endpoint}: {why}",
                    endpoint=self.description,
                    why=failure.getErrorMessage(),
                )

        synchronous = True
        self._listening = self.endpoint.listen(self.factory).addCallbacks(listening, cannot_listen)
        synchronous = False
        if failed:
            raise StartupError(
                f"cannot listen on {self.description}: {failed[0].getErrorMessage()}",
                EX_UNAVAILABLE,
            )

    def startService(self) -> None:
        """
        Listen, unless L{privilegedStartService} did.

        @raise StartupError: as for L{privilegedStartService}.
        """
        super().startService()
        if self._listening is None:
            self.privilegedStartService()

    def stopService(self) -> Deferred[None]:
        """
        Stop listening, then wait for the open connections to close, up to
        the grace time, and abort the rest.

        @return: a Deferred that fires when every connection is closed.
        """
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        connections = self.factory.connections
        # Refuse at once what the port accepts before it closes (and any
        # curvetun handshake that completes from now on).
        connections.accepting = False
        listening, self._listening = self._listening, None
        if listening is not None:
            listening.cancel()  # a listen still under way
            await listening
        port, self.port = self.port, None
        if port is not None:
            await _maybe_deferred(port.stopListening())
            log.info("Stopped listening on {endpoint}", endpoint=self.description)
        self.listening = False
        if len(connections):
            log.info(
                "Waiting up to {grace} seconds for {count} open connection(s) to finish",
                grace=self.grace,
                count=len(connections),
            )
        drained = connections.drain(self.grace, self.clock)
        # Told once the grace time runs, so that what they do next happens
        # within it.
        waiting, self._waiting_until_not_listening = self._waiting_until_not_listening, []
        for d in waiting:
            d.callback(None)
        await drained

    def when_not_listening(self) -> Deferred[None]:
        """
        A Deferred that fires once the service has stopped listening (while
        it may still wait for connections to finish).
        """
        if not self.listening:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting_until_not_listening.append(d)
        return d

    def _what(self) -> str:
        if isinstance(self.factory, ForwardingFactory):
            return f"forwarding to {self.factory.description}"
        return "echo"


async def _maybe_deferred(result: Deferred[None] | None) -> None:
    if result is not None:
        await result


class TunnelService(MultiService):
    """
    C{twist curvetun}'s service: the curvetun identity (a
    L{CurveTunService}) and one L{TunnelListener} per listen endpoint.

    @ivar identity: the L{CurveTunService} of the key directory.
    @ivar listeners: the L{TunnelListener}s, in the order given.
    """

    def __init__(self, identity: CurveTunService, keydir: str, created: bool = False) -> None:
        super().__init__()
        self.identity = identity
        self.keydir = keydir
        self.listeners: list[TunnelListener] = []
        self._created = created
        identity.setServiceParent(self)

    def add_listener(self, listener: TunnelListener) -> None:
        """
        Listen with C{listener} while running.
        """
        self.listeners.append(listener)
        listener.setServiceParent(self)

    def startService(self) -> None:
        """
        Start the identity, say which it is, and listen.

        @raise StartupError: a listen endpoint cannot listen; what had
            started is stopped again.
        """
        if self._created:
            log.info("Created key directory {keydir} with a new key", keydir=self.keydir)
        log.info(
            "curvetun public key {public_key} (key directory {keydir})",
            public_key=format_public_key(self.identity.vault.public_key),
            keydir=self.keydir,
        )
        try:
            super().startService()
        except StartupError:
            self.stopService()
            raise

    def stopService(self) -> Deferred[None]:
        """
        Stop listening everywhere at once, let open connections finish for
        up to the grace time, abort the rest, and then stop the identity.

        Under C{twist}, SIGTERM and SIGINT do this before the reactor
        stops; C{twist} then ends the process with the same signal, as it
        does for every service (so the exit status is that of a process
        killed by SIGTERM, which supervisors such as systemd count as a
        clean stop).

        The key directory is released at the end: a stopped service cannot
        be started again.
        """
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        # MultiService would stop the identity at the same time as the
        # listeners; it stays up until their connections are gone.
        results = await DeferredList(
            [listener.stopService() for listener in self.listeners], consumeErrors=True
        )
        for succeeded, result in results:
            if not succeeded:
                log.failure("Stopping a listener failed", result)
        await _maybe_deferred(self.identity.stopService())
        _release(self.identity)
        log.info("curvetun stopped")


def _release(identity: CurveTunService) -> None:
    """
    Withdraw C{identity} from endpoint strings and release its key
    directory (a L{curvetun.vault.FileVault} holds the directory's lock).
    """
    service_pool.forget(identity)
    close = getattr(identity.vault, "close", None)
    if close is not None:
        close()


def make_tunnel(
    options: Options,
    reactor: Any = None,
    clock: IReactorTime | None = None,
) -> TunnelService:
    """
    Build the service that C{options} describe: load (or create) the key
    directory, make it the default for C{curvetun:} endpoint strings, and
    parse the endpoints.

    @param clock: times the grace period (default: C{reactor}).
    @raise StartupError: the key directory, the registry or an endpoint
        string is unusable; the message is one line.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    keydir: str = options["keydir"]
    registry: str | None = options["registry"]
    created = not os.path.exists(os.path.join(keydir, SECRET_KEY_FILE))
    try:
        identity = CurveTunService.from_keydir(
            keydir,
            registry,
            create=True,
            clock=reactor,
            handshake_timeout=options["handshake-timeout"],
            idle_timeout=options["idle-timeout"],
            limits=options["limits"],
        )
    except (KeyFileError, RegistryError) as error:
        raise StartupError(str(error), EX_CONFIG) from error
    # Endpoint strings that name no key directory, or this one, use this
    # identity; with --registry, also those that name the directory but no
    # registry (the pool would refuse them: one registry per key directory).
    service_pool.adopt(identity, keydir, registry, default=True)
    if registry is not None:
        service_pool.adopt(identity, keydir, os.path.join(keydir, REGISTRY_FILE), default=False)
    try:
        forward: IStreamClientEndpoint | None = None
        if options["forward"] is not None:
            forward = _parse("--forward", options["forward"], clientFromString, reactor)
        listens = [
            (description, _parse("--listen", description, serverFromString, reactor))
            for description in options["listen"]
        ]
    except StartupError:
        _release(identity)
        raise
    service = TunnelService(identity, keydir, created)
    for description, endpoint in listens:
        factory: TrackingFactory
        if forward is None:
            factory = EchoFactory()
        else:
            factory = ForwardingFactory(forward, options["forward"])
        service.add_listener(
            TunnelListener(
                endpoint,
                description,
                factory,
                options["grace"],
                clock if clock is not None else reactor,
            )
        )
    return service


def _parse(option: str, description: str, parse: Any, reactor: Any) -> Any:
    """
    Parse an endpoint string with C{parse} (C{serverFromString} or
    C{clientFromString}).

    @raise StartupError: it is malformed (status C{EX_USAGE}).
    """
    try:
        return parse(reactor, description)
    except (ValueError, TypeError, KeyError) as error:
        # TypeError: a parser given keywords it does not take (tcp:1:foo=2).
        raise StartupError(
            f"bad {option} endpoint {description[:80]!r}: {error}", EX_USAGE
        ) from None


class _ExitOnStartupError(MultiService):
    """
    What C{twist} runs: the tunnel, with a L{StartupError} at start turned
    into a one-line message on stderr and an exit status (C{twist} would
    print a traceback).
    """

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except StartupError as error:
            _exit(error)

    def startService(self) -> None:
        try:
            super().startService()
        except StartupError as error:
            _exit(error)


def _exit(error: StartupError) -> NoReturn:
    sys.stderr.write(f"twist curvetun: {error}\n")
    sys.stderr.flush()
    raise SystemExit(error.status)


def makeService(options: Options) -> IService:
    """
    The L{IServiceMaker} entry point: the service C{options} describe. A
    configuration error exits with a one-line message (C{twist} only
    handles usage errors raised while parsing options).
    """
    try:
        tunnel = make_tunnel(options)
    except StartupError as error:
        _exit(error)
    service = _ExitOnStartupError()
    tunnel.setServiceParent(service)
    return service
