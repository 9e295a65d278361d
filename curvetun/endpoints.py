"""
curvetun endpoints: any stream endpoint (TCP, usually) wrapped so that what
connects or listens through it is a curvetun connection; and the
C{curvetun:} endpoint-string parsers behind
C{twisted/plugins/curvetun_plugins.py}.

Client::

    curvetun:HOST:PORT[:key=SERVERKEY][:keydir=DIR][:registry=FILE|dns][:resolver=IP\\:PORT][:timeout=SECONDS]
    curvetun:host=HOST:port=PORT[:...]
    curvetun:endpoint=INNER[:...]

Server::

    curvetun:PORT[:interface=ADDR][:backlog=N][:keydir=DIR][:registry=FILE]
    curvetun:port=PORT[:...]
    curvetun:endpoint=INNER[:keydir=DIR][:registry=FILE]

Either takes C{statedir=DIR} (the nonce counters, lock and instance ID in
a writable directory of their own, so that the key directory may be
read-only) and C{instance=ID} (a key directory copied to several hosts).

C{INNER} is any endpoint string, escaped as in Twisted's C{tls:} parser
(see L{parse_client_endpoint} and L{parse_server_endpoint}). From Python,
build L{CurveTunServerEndpoint} and L{CurveTunClientEndpoint} (or
L{curvetun.dnskeys.DNSKeyClientEndpoint}) around any endpoint;
L{client_from_string} is C{clientFromString} with a default key directory.
See docs/usage.md for the full reference.
"""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    TCP6ClientEndpoint,
    TCP6ServerEndpoint,
    clientFromString,
    serverFromString,
)
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IListeningPort,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .errors import KeyFileError, RegistryError

# Re-exported: tap.py imports them from here.
from .keydir import MAX_INSTANCE, REGISTRY_FILE, default_keydir
from .keys import parse_public_key, quoted
from .service import CurveTunService
from .transport import CurveTunProtocol

log = Logger()

DEFAULT_PORT = 7700
"""
The port C{twist curvetun} listens on by default.
"""

# -- endpoints -----------------------------------------------------------------


class _Lease:
    """
    A pooled service's use count: the pool starts the service when the
    first endpoint starts using it and stops it when the last one is done.
    Does nothing for a service run by someone else (C{twist curvetun}).
    """

    def __init__(self, service: CurveTunService, managed: bool) -> None:
        self.service = service
        self.managed = managed
        self.users = 0

    def acquire(self) -> None:
        self.users += 1
        if self.managed and self.users == 1 and not self.service.running:
            self.service.startService()

    def release(self) -> None:
        self.users -= 1
        if self.managed and self.users == 0 and self.service.running:
            self.service.stopService()

    def connection_ended(self, protocol: CurveTunProtocol, reason: Failure) -> None:
        """
        An C{ended_callbacks} entry: release the lease a connect acquired.
        """
        self.release()


@implementer(IListeningPort)
class _LeasedPort:
    """
    A listening port that releases its service's lease when it stops.
    """

    def __init__(self, port: IListeningPort, lease: _Lease) -> None:
        self._port = port
        self._lease: _Lease | None = lease

    def startListening(self) -> None:
        self._port.startListening()

    def stopListening(self) -> Deferred[None] | None:
        result = self._port.stopListening()
        lease, self._lease = self._lease, None
        if lease is not None:
            lease.release()
        return result

    def getHost(self) -> Any:
        return self._port.getHost()


_CONNECTION_DONE = Failure(ConnectionDone())


class _AfterHeaderProtocol(Protocol):
    """
    Stands in for a curvetun connection behind a PROXY-protocol endpoint
    until the first bytes after the header arrive, then builds it.

    Twisted's C{proxyEndpoint} builds the wrapped protocol when it accepts
    the connection, with the proxy's address, before the header is read.
    Built here instead, the curvetun connection is admitted, counted and
    checked against the registry with C{transport.getPeer()} as the header
    gives it. A connection that ends without a byte after its header (a
    load balancer's health check, which sends a C{LOCAL} header) never
    becomes a curvetun connection, so it is not a failed handshake.
    """

    def __init__(self, factory: _AfterHeaderFactory) -> None:
        self._factory = factory
        self._built: IProtocol | None = None
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        # The handshake timeout starts when the curvetun connection is
        # built: until then, this bounds a client that never speaks.
        timeout = self._factory.header_timeout
        if timeout is not None:
            transport = self.transport
            assert transport is not None
            self._timer = self._factory.clock.callLater(timeout, transport.loseConnection)

    def dataReceived(self, data: bytes) -> None:
        built = self._built
        if built is None:
            self._cancel_timer()
            transport = self.transport
            assert transport is not None
            built = self._factory.wrapped.buildProtocol(transport.getPeer())
            if built is None:
                # Refused (a connection limit): close, as a port does.
                transport.loseConnection()
                return
            self._built = built
            built.makeConnection(transport)
        built.dataReceived(data)

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        self._cancel_timer()
        if self._built is not None:
            self._built.connectionLost(reason)
        else:
            transport = self.transport
            assert transport is not None
            log.debug(
                "curvetun: connection from {peer} closed before any byte after its PROXY header",
                peer=transport.getPeer(),
            )

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()


@implementer(IProtocolFactory)
class _AfterHeaderFactory:
    """
    Makes L{_AfterHeaderProtocol}s for C{wrapped}, a curvetun server
    factory.
    """

    def __init__(
        self, wrapped: IProtocolFactory, clock: IReactorTime, header_timeout: float | None
    ) -> None:
        self.wrapped = wrapped
        self.clock = clock
        self.header_timeout = header_timeout

    def buildProtocol(self, addr: IAddress) -> _AfterHeaderProtocol:
        return _AfterHeaderProtocol(self)

    def doStart(self) -> None:
        self.wrapped.doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()

    def logPrefix(self) -> str:
        return "curvetun (PROXY)"


@implementer(IStreamServerEndpoint)
class CurveTunServerEndpoint:
    """
    Listens on C{wrapped} and runs curvetun's server side on each
    connection; the application's protocol starts once the client is
    authenticated.

    From Python::

        from twisted.internet.endpoints import TCP4ServerEndpoint, UNIXServerEndpoint
        from twisted.protocols.haproxy import proxyEndpoint

        service = CurveTunService.from_keydir("/etc/curvetun")
        CurveTunServerEndpoint(UNIXServerEndpoint(reactor, "/run/ct.sock"), service)
        CurveTunServerEndpoint(
            proxyEndpoint(TCP4ServerEndpoint(reactor, 7700)), service, proxied=True
        )

    (start C{service}, or add it to the application, before connections
    come: see L{CurveTunService}).

    @param wrapped: the endpoint to listen on (TCP, UNIX, an adopted
        systemd socket, a PROXY-protocol endpoint...).
    @param service: the identity, registry and limits to serve with.
    @param lease: for the endpoint-string pool only.
    @param proxied: C{wrapped} reads a PROXY header before the client's
        bytes (Twisted's C{proxyEndpoint}): build each curvetun connection
        only after the header, so that the registry and the per-address
        limits see the client address it gives, not the proxy's.
    """

    def __init__(
        self,
        wrapped: IStreamServerEndpoint,
        service: CurveTunService,
        lease: _Lease | None = None,
        *,
        proxied: bool = False,
    ) -> None:
        self._wrapped = wrapped
        self._service = service
        self._lease = lease
        self._proxied = proxied

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        factory: IProtocolFactory = self._service.server_factory(protocolFactory)
        if self._proxied:
            factory = _AfterHeaderFactory(
                factory, self._service.clock, self._service.handshake_timeout
            )
        listening = self._wrapped.listen(factory)
        lease = self._lease
        if lease is None:
            return listening
        lease.acquire()

        def leased(port: IListeningPort) -> IListeningPort:
            return _LeasedPort(port, lease)

        def failed(failure: Failure) -> Failure:
            lease.release()
            return failure

        return listening.addCallbacks(leased, failed)


@implementer(IStreamClientEndpoint)
class CurveTunClientEndpoint:
    """
    Connects through C{wrapped} to the curvetun server whose long-term
    public key is C{server_key}.

    C{connect} fires with the application's protocol once the handshake has
    gone as far as the client can take it (the vouch is sent: state
    C{vouched}), and fails with the reason if it stops before that
    (L{curvetun.errors.ServerKeyMismatch},
    L{curvetun.errors.HandshakeTimeout}, a TCP error). Cancelling it
    aborts the connection.

    From Python::

        from twisted.internet.endpoints import UNIXClientEndpoint

        service = CurveTunService.from_keydir("~/.curvetun")
        CurveTunClientEndpoint(UNIXClientEndpoint(reactor, "/run/ct.sock"), service, key)

    @param wrapped: the endpoint to connect through (TCP, UNIX, ...).
    @param service: the client's identity (its vault).
    @param server_key: the server's long-term public key (32 bytes).
    @param handshake_timeout: seconds, overriding the service's.
    @param lease: for the endpoint-string pool only.
    """

    def __init__(
        self,
        wrapped: IStreamClientEndpoint,
        service: CurveTunService,
        server_key: bytes,
        handshake_timeout: float | None = None,
        lease: _Lease | None = None,
    ) -> None:
        self._wrapped = wrapped
        self._service = service
        self._server_key = server_key
        self._handshake_timeout = handshake_timeout
        self._lease = lease
        # Bound once: one bound per connect would be kept by every open
        # connection's factory.
        self._lease_ended = None if lease is None else lease.connection_ended

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        if self._handshake_timeout is None:
            factory = self._service.client_factory(protocolFactory, self._server_key)
        else:
            factory = self._service.client_factory(
                protocolFactory, self._server_key, self._handshake_timeout
            )
        lease, lease_ended = self._lease, self._lease_ended
        if lease is not None and lease_ended is not None:
            lease.acquire()
            # Released when the connection ends, or below if it never starts.
            factory.ended_callbacks.append(lease_ended)

        def handshake(protocol: IProtocol) -> Deferred[IProtocol]:
            assert isinstance(protocol, CurveTunProtocol)
            return protocol.when_established()

        def never_connected(failure: Failure) -> Failure:
            if lease is not None:
                lease.release()
            return failure

        return self._wrapped.connect(factory).addCallbacks(handshake, never_connected)


# -- the service pool behind endpoint strings ------------------------------------


def _check_state(
    service: CurveTunService, keydir: str, statedir: str | None, instance: int | None
) -> None:
    """
    Refuse a C{statedir=} or C{instance=} that disagrees with the service
    already loaded for C{keydir}.
    """
    from .server_keys import ServerKeys

    if not isinstance(service.vault, ServerKeys):
        return
    state = service.vault.state
    if statedir is not None and os.path.realpath(os.path.expanduser(statedir)) != os.path.realpath(
        state.path.path
    ):
        raise ValueError(
            f"key directory {keydir} is already in use with state directory "
            f"{state.path.path} in this process; leave statedir= out"
        )
    if instance is not None and instance != state.instance:
        raise ValueError(
            f"key directory {keydir} is already in use as instance {state.instance} "
            "in this process; leave instance= out"
        )


@attrs.frozen
class _PoolKey:
    keydir: str
    registry: str


class ServicePool:
    """
    The L{CurveTunService}s behind C{curvetun:} endpoint strings: one per
    key directory and registry file, loaded on first use, started when the
    first endpoint using it listens or connects, stopped when the last one
    is done.

    A program that runs its own service (C{twist curvetun} does, as a child
    of its application) C{adopt}s it: strings naming its key directory, or
    naming none, then use it as it is.
    """

    def __init__(self) -> None:
        self._leases: dict[_PoolKey, _Lease] = {}
        self._default_keydir: str | None = None

    def adopt(
        self,
        service: CurveTunService,
        keydir: str,
        registry: str | None = None,
        default: bool = True,
    ) -> None:
        """
        Let endpoint strings for C{keydir} (and, with C{default}, strings
        that name no key directory) use C{service}, which the caller runs.
        """
        key = self._key(keydir, registry)
        self._leases[key] = _Lease(service, managed=False)
        if default:
            self._default_keydir = key.keydir

    def forget(self, service: CurveTunService) -> None:
        """
        Stop handing out C{service} (adopted or loaded).
        """
        for key, lease in list(self._leases.items()):
            if lease.service is service:
                del self._leases[key]
                if self._default_keydir == key.keydir:
                    self._default_keydir = None

    def forget_keydir(self, keydir: str) -> CurveTunService | None:
        """
        Stop handing out the service for C{keydir}, if any, and return it
        (tests use this to keep the process-wide pool clean).
        """
        keydir = self._key(keydir, None).keydir
        if self._default_keydir == keydir:
            self._default_keydir = None
        for key, lease in list(self._leases.items()):
            if key.keydir == keydir:
                del self._leases[key]
                return lease.service
        return None

    def lease(
        self,
        keydir: str | None,
        registry: str | None,
        statedir: str | None = None,
        instance: int | None = None,
    ) -> _Lease:
        """
        The lease on the service for C{keydir} (default: the adopted
        default, else L{default_keydir}) and C{registry} (default: the file
        C{registry} in the key directory), loading it if need be, with its
        mutable files in C{statedir} and the instance ID C{instance} (see
        L{CurveTunService.from_keydir}).

        @raise ValueError: the key directory or the registry cannot be used,
            or a service of the key directory is loaded already with
            another state directory or instance ID; the message says why.
        """
        if keydir is None:
            keydir = self._default_keydir or default_keydir()
        key = self._key(keydir, registry)
        lease = self._leases.get(key)
        if lease is not None:
            _check_state(lease.service, key.keydir, statedir, instance)
        if lease is None:
            for other in self._leases:
                # A key directory has one vault (it holds the directory's
                # lock), and a service has one registry.
                if other.keydir == key.keydir:
                    raise ValueError(
                        f"key directory {key.keydir} is already in use with registry "
                        f"{other.registry} in this process; use one registry per key directory"
                    )
            if not os.path.isdir(key.keydir):
                raise ValueError(
                    f"no curvetun key directory at {key.keydir}: create one with "
                    f"'curvetun keygen --keydir {key.keydir}', or name another with keydir="
                )
            try:
                service = CurveTunService.from_keydir(
                    key.keydir, key.registry, statedir=statedir, instance=instance
                )
            except (KeyFileError, RegistryError) as error:
                raise ValueError(str(error)) from error
            lease = self._leases[key] = _Lease(service, managed=True)
        return lease

    @staticmethod
    def _key(keydir: str, registry: str | None) -> _PoolKey:
        keydir = os.path.realpath(os.path.expanduser(keydir))
        if registry is None:
            registry = os.path.join(keydir, REGISTRY_FILE)
        return _PoolKey(keydir, os.path.realpath(os.path.expanduser(registry)))


service_pool = ServicePool()
"""
The process-wide pool behind endpoint strings.
"""


# -- endpoint-string parsing -----------------------------------------------------


_MAX_BACKLOG = 65535

# A DNS name: dot-separated labels of letters, digits, hyphens (and, as
# some resolvers allow, underscores), at most 253 characters.
_HOST_NAME = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?\Z"
)

_CLIENT_KEYWORDS = (
    "host",
    "port",
    "endpoint",
    "key",
    "keydir",
    "registry",
    "resolver",
    "timeout",
    "statedir",
    "instance",
)
_SERVER_KEYWORDS = (
    "port",
    "interface",
    "backlog",
    "endpoint",
    "keydir",
    "registry",
    "statedir",
    "instance",
)

DNS_REGISTRY = "dns"
"""
The C{registry=} value that makes a client look its server's key up in DNS
(see L{curvetun.dnskeys}).
"""


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_host(text: str) -> bool:
    return _is_ip_address(text) or (text.isascii() and _HOST_NAME.match(text) is not None)


def _tcp_client(reactor: Any, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    """
    The TCP endpoint of C{host}: an IP address is connected to as it is; a
    host name goes to L{HostnameEndpoint}, which resolves it (in a thread,
    for every connection) and tries each address it gets.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return HostnameEndpoint(reactor, host, port, timeout=timeout)
    if address.version == 4:
        return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    # An IPv6 literal is connected to without a resolver thread too.
    return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)


def _option_error(kind: str, message: str) -> ValueError:
    return ValueError(f"curvetun {kind} endpoint: {message}")


def split_description(description: str) -> tuple[list[str], dict[str, str]]:
    """
    Split an endpoint string as Twisted's C{clientFromString} and
    C{serverFromString} do: fields separated by C{:}, a field with an C{=}
    is a keyword (its value may hold more C{=}), a backslash takes the next
    character as it is. C{"tcp:example.com:80:bindAddress=10.0.0.1"} is
    C{(["tcp", "example.com", "80"], {"bindAddress": "10.0.0.1"})}; the
    first field is the endpoint type. A keyword given twice keeps its last
    value, as in Twisted.

    @raise ValueError: the string ends with a lone backslash.
    """
    args: list[str] = []
    kwargs: dict[str, str] = {}
    field: list[str] = []
    current: list[str] = []
    # After a field's first "=", only ":" separates (the value may hold "=").
    separators = ":="
    chars = iter(description)
    for char in chars:
        if char in separators:
            field.append("".join(current))
            current = []
            if char == ":":
                _add_field(field, args, kwargs)
                field = []
                separators = ":="
            else:
                separators = ":"
        elif char == "\\":
            escaped = next(chars, None)
            if escaped is None:
                raise ValueError(
                    f"endpoint string {quoted(description)} ends with a lone backslash"
                )
            current.append(escaped)
        else:
            current.append(char)
    field.append("".join(current))
    _add_field(field, args, kwargs)
    return args, kwargs


def _add_field(field: list[str], args: list[str], kwargs: dict[str, str]) -> None:
    if len(field) == 1:
        args.append(field[0])
    else:
        kwargs[field[0]] = field[1]


def _refuse_brackets(kind: str, args: tuple[str, ...], kwargs: dict[str, str]) -> None:
    """
    Refuse C{[::1]}-style addresses, saying how to write them: Twisted's
    grammar has no brackets, a C{:} inside a value is escaped.
    """
    if not any("[" in value or "]" in value for value in (*args, *kwargs.values())):
        return
    if kind == "client":
        match = re.fullmatch(r"\[([0-9A-Fa-f:.]*)\](?::([0-9]*))?", ":".join(args))
        if match is not None:
            example = "curvetun:" + match[1].replace(":", "\\:") + ":" + (match[2] or "PORT")
        else:
            example = "curvetun:\\:\\:1:7700"
    else:
        example = "curvetun:7700:interface=\\:\\:1"
    raise _option_error(
        kind,
        "IPv6 addresses take no brackets in endpoint strings; escape each ':' "
        f"with a backslash instead, as in {example}",
    )


def _collect(
    kind: str,
    positional_names: tuple[str, ...],
    known: tuple[str, ...],
    args: tuple[str, ...],
    kwargs: dict[str, str],
) -> dict[str, str]:
    """
    Merge positional and keyword arguments into one dict, refusing
    unknown, repeated and surplus arguments.
    """
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise _option_error(
            kind, f"unknown keyword {quoted(unknown[0])} (known: {', '.join(known)})"
        )
    if len(args) > len(positional_names):
        raise _option_error(
            kind,
            "too many positional arguments"
            f" (expected {':'.join(n.upper() for n in positional_names)})",
        )
    options = dict(kwargs)
    for name, value in zip(positional_names, args, strict=False):
        if name in options:
            raise _option_error(kind, f"{name} given twice")
        options[name] = value
    return options


def _paths(kind: str, options: dict[str, str]) -> tuple[str | None, str | None]:
    """
    The C{keydir} and C{registry} options, refused if they cannot be paths.
    """
    paths = []
    for option in ("keydir", "registry"):
        value = options.get(option)
        if value is not None and (not value or "\x00" in value):
            raise _option_error(kind, f"{option} must be a path, not {quoted(value)}")
        paths.append(value)
    return paths[0], paths[1]


def _state(kind: str, options: dict[str, str]) -> tuple[str | None, int | None]:
    """
    The C{statedir} and C{instance} options, checked.
    """
    statedir = options.get("statedir")
    if statedir is not None and (not statedir or "\x00" in statedir):
        raise _option_error(kind, f"statedir must be a path, not {quoted(statedir)}")
    instance = None
    if "instance" in options:
        instance = _decimal(options["instance"])
        if instance is None or instance > MAX_INSTANCE:
            raise _option_error(
                kind,
                f"instance must be a number from 0 to {MAX_INSTANCE}, "
                f"not {quoted(options['instance'])}",
            )
    return statedir, instance


def _decimal(value: str) -> int | None:
    """
    C{value} as a number if it is plain ASCII digits (int() would also take
    "8_0", " 80", "+80" and other scripts' digits), else L{None}.
    """
    if value.isascii() and value.isdigit() and len(value) <= 10:
        return int(value)
    return None


def _port(kind: str, value: str | None, allow_zero: bool) -> int:
    if not value:
        raise _option_error(kind, "a port is required")
    port = _decimal(value)
    if port is None:
        raise _option_error(kind, f"port must be a number, not {quoted(value)}")
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise _option_error(
            kind, f"port must be between {0 if allow_zero else 1} and 65535, not {port}"
        )
    return port


def _timeout(options: dict[str, str]) -> float | None:
    if "timeout" not in options:
        return None
    try:
        timeout = float(options["timeout"])
    except ValueError:
        timeout = -1
    if not 0 < timeout < float("inf"):
        raise _option_error(
            "client",
            f"timeout must be a positive number of seconds, not {options['timeout'][:40]!r}",
        )
    return timeout


def _excluded_by_endpoint(kind: str, options: dict[str, str], names: tuple[str, ...]) -> None:
    for name in names:
        if name in options:
            raise _option_error(
                kind,
                f"endpoint= and {name} exclude each other: the inner endpoint says "
                f"where to {'connect' if kind == 'client' else 'listen'}",
            )


def _inner_endpoint(kind: str, reactor: Any, description: str) -> Any:
    """
    The endpoint the C{endpoint=} string describes, its errors made one
    clear C{ValueError}.
    """
    parse = clientFromString if kind == "client" else serverFromString
    try:
        return parse(reactor, description)
    except IndexError:
        # The systemd parser, asked for a socket the process did not inherit.
        raise _option_error(
            kind,
            f"endpoint={quoted(description)}: no such inherited socket "
            "(is the process started by systemd socket activation?)",
        ) from None
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise _option_error(kind, f"endpoint={quoted(description)}: {error}") from None


def _inner_host(description: str) -> str | None:
    """
    The host a C{tcp:} client string connects to (C{tcp:HOST:PORT} or
    C{tcp:host=HOST:port=PORT}): the name a server key is looked up by.
    L{None} for other kinds (C{unix:} has no host).
    """
    args, kwargs = split_description(description)
    if not args or args[0].lower() != "tcp":
        return None
    if "host" in kwargs:
        return kwargs["host"] or None
    return args[1] if len(args) > 1 and args[1] else None


def _agreeing_keydir(named: str | None, default: str | None) -> str | None:
    if default is None or named is None:
        return named if named is not None else default
    if os.path.realpath(os.path.expanduser(named)) != os.path.realpath(os.path.expanduser(default)):
        raise _option_error(
            "client",
            f"keydir={quoted(named)} disagrees with the key directory {quoted(default)} "
            "this program uses; leave keydir= out",
        )
    return named


def parse_client_endpoint(reactor: Any, *args: str, **kwargs: str) -> IStreamClientEndpoint:
    """
    Build a client endpoint from the parts of a C{curvetun:} string::

        curvetun:HOST:PORT[:OPTIONS]
        curvetun:host=HOST:port=PORT[:OPTIONS]
        curvetun:endpoint=INNER[:OPTIONS]

    OPTIONS are C{key=SERVERKEY} (64 hex digits or base64),
    C{keydir=DIR} (the client's identity), C{registry=FILE} (where the
    server's key is looked up when there is no C{key=}) or C{registry=dns}
    with an optional C{resolver=IP\\:PORT} (look it up in DNS, see
    L{curvetun.dnskeys}), and C{timeout=SECONDS} (the handshake's; with
    HOST:PORT the TCP connect's too).

    C{endpoint=} connects through any client endpoint string, escaped as in
    Twisted's C{tls:} parser (each C{:} and C{=} of the inner string
    preceded by a backslash), for example
    C{curvetun:endpoint=unix\\:path\\=/run/ct.sock:key=KEY} or
    C{curvetun:endpoint=tcp\\:HOST\\:7700\\:bindAddress\\=10.0.0.2:key=KEY}.
    It excludes HOST and PORT. Without C{key=}, the server key is looked up
    by the host of a C{tcp:} inner endpoint; other inner endpoints (C{unix:})
    have no host, and need C{key=}.

    An IPv6 address is written without brackets, each C{:} escaped:
    C{curvetun:\\:\\:1:7700}.

    @raise ValueError: the string is malformed, names an unknown keyword, a
        malformed key, a missing key directory, or no server key can be
        found; the message says which.
    """
    return _client_endpoint(reactor, args, kwargs, None)


def _client_endpoint(
    reactor: Any, args: tuple[str, ...], kwargs: dict[str, str], default_keydir: str | None
) -> IStreamClientEndpoint:
    # Python keywords of this function stay out of the string's keyword
    # space: a string cannot set default_keydir.
    _refuse_brackets("client", args, kwargs)
    options = _collect("client", ("host", "port"), _CLIENT_KEYWORDS, args, kwargs)
    timeout = _timeout(options)
    use_dns = options.get("registry") == DNS_REGISTRY
    if "resolver" in options and not use_dns:
        raise _option_error("client", "resolver= goes with registry=dns")
    if use_dns and "key" in options:
        raise _option_error(
            "client", "key= and registry=dns exclude each other: the key is given or looked up"
        )
    wrapped: IStreamClientEndpoint
    host: str | None
    if "endpoint" in options:
        _excluded_by_endpoint("client", options, ("host", "port"))
        inner = options["endpoint"]
        host = _inner_host(inner)
        wrapped = _inner_endpoint("client", reactor, inner)
    else:
        host = options.get("host")
        if not host:
            raise _option_error("client", "a host is required (curvetun:HOST:PORT, or endpoint=)")
        if not _is_host(host):
            raise _option_error(
                "client", f"host must be a host name or an IP address, not {quoted(host)}"
            )
        port = _port("client", options.get("port"), allow_zero=False)
        wrapped = _tcp_client(reactor, host, port, 30 if timeout is None else timeout)
    resolver = None
    if use_dns:
        from .dnskeys import parse_resolver

        try:
            resolver = parse_resolver(options.get("resolver"))
        except ValueError as error:
            raise _option_error("client", str(error)) from None
    keydir, registry = _paths("client", options)
    keydir = _agreeing_keydir(keydir, default_keydir)
    lease = service_pool.lease(keydir, None if use_dns else registry, *_state("client", options))
    if "key" in options:
        try:
            server_key = parse_public_key(options["key"])
        except ValueError as error:
            raise _option_error("client", f"key: {error}") from None
        return CurveTunClientEndpoint(wrapped, lease.service, server_key, timeout, lease)
    if host is None:
        raise _option_error(
            "client",
            f"endpoint={quoted(options['endpoint'])} has no host to look the server's key "
            "up by: give key=",
        )
    if use_dns:
        from .dnskeys import DNSKeyClientEndpoint, DNSServerKeys

        return DNSKeyClientEndpoint(
            wrapped, lease.service, host, DNSServerKeys(resolver), timeout, lease
        )
    found = lease.service.registry.server_key_for(host)
    if found is None:
        raise _option_error(
            "client",
            f"no key for server {host}: give key=, or add one to the registry "
            f"with 'curvetun trust {host} KEY'",
        )
    return CurveTunClientEndpoint(wrapped, lease.service, found, timeout, lease)


def client_from_string(
    reactor: Any, description: str, *, keydir: str | None = None
) -> IStreamClientEndpoint:
    """
    C{clientFromString}, with C{keydir} as the key directory of a
    C{curvetun:} client string that names none (a C{curvetun:} string with
    a C{keydir=} that disagrees is a C{ValueError}). Other strings go to
    Twisted's C{clientFromString} as they are.

    @raise ValueError: the string is malformed or cannot be used; the
        message says why.
    """
    args, kwargs = split_description(description)
    if keydir is None or not args or args[0].lower() != "curvetun":
        endpoint: IStreamClientEndpoint = clientFromString(reactor, description)
        return endpoint
    return _client_endpoint(reactor, tuple(args[1:]), kwargs, keydir)


def parse_server_endpoint(reactor: Any, *args: str, **kwargs: str) -> CurveTunServerEndpoint:
    """
    Build a server endpoint from the parts of a C{curvetun:} string::

        curvetun:PORT[:interface=ADDR][:backlog=N][:OPTIONS]
        curvetun:port=PORT[:...]
        curvetun:endpoint=INNER[:OPTIONS]

    OPTIONS are C{keydir=DIR} (the server's identity),
    C{registry=FILE} (who may connect; default: the file C{registry} in the
    key directory), C{statedir=DIR} (where the nonce counters, the lock
    and the instance ID are kept, so that the key directory may be
    read-only) and C{instance=ID} (0 to 65535: this host's part of the
    counter space, for a key directory copied to several hosts).

    C{endpoint=} listens on any server endpoint string, escaped as in
    Twisted's C{tls:} parser (each C{:} and C{=} of the inner string
    preceded by a backslash): C{curvetun:endpoint=unix\\:/run/ct.sock},
    C{curvetun:endpoint=systemd\\:domain\\=INET\\:index\\=0},
    C{curvetun:endpoint=haproxy\\:tcp\\:7700}. It excludes PORT, interface=
    and backlog=. A peer on a UNIX socket has no IP address: only C{*}
    registry entries admit it. Behind C{haproxy:}, the registry and the
    per-address limits see the client address the PROXY header gives.

    @raise ValueError: the string is malformed, names an unknown keyword, or
        a missing or unusable key directory or registry.
    """
    parts = parse_server_parts(reactor, *args, **kwargs)
    lease = service_pool.lease(parts.keydir, parts.registry, parts.statedir, parts.instance)
    return CurveTunServerEndpoint(parts.wrapped, lease.service, lease, proxied=parts.proxied)


@attrs.frozen
class ServerEndpointParts:
    """
    What a C{curvetun:} server string says, before any identity is loaded.

    @ivar wrapped: the endpoint to listen on, under curvetun.
    @ivar proxied: C{wrapped} reads a PROXY header first (C{haproxy:}).
    @ivar keydir: the C{keydir=} option, or L{None}.
    @ivar registry: the C{registry=} option, or L{None}.
    @ivar statedir: the C{statedir=} option, or L{None}.
    @ivar instance: the C{instance=} option, or L{None}.
    """

    wrapped: IStreamServerEndpoint
    proxied: bool
    keydir: str | None
    registry: str | None
    statedir: str | None = None
    instance: int | None = None


def parse_server_parts(reactor: Any, *args: str, **kwargs: str) -> ServerEndpointParts:
    """
    Parse the parts of a C{curvetun:} server string (see
    L{parse_server_endpoint}) without loading its key directory: a
    supervisor of worker processes binds C{wrapped} itself and must never
    read a key.

    @raise ValueError: as for L{parse_server_endpoint}, but the key
        directory and registry are not opened.
    """
    _refuse_brackets("server", args, kwargs)
    options = _collect("server", ("port",), _SERVER_KEYWORDS, args, kwargs)
    if options.get("registry") == DNS_REGISTRY:
        raise _option_error(
            "server",
            "registry=dns is for clients (a server's registry is a file; "
            "write registry=./dns for a file of that name)",
        )
    if "endpoint" in options:
        _excluded_by_endpoint("server", options, ("port", "interface", "backlog"))
        inner = options["endpoint"]
        inner_args, _ = split_description(inner)
        proxied = bool(inner_args) and inner_args[0].lower() == "haproxy"
        endpoint = _inner_endpoint("server", reactor, inner)
        return ServerEndpointParts(
            endpoint, proxied, *_paths("server", options), *_state("server", options)
        )
    port = _port("server", options.get("port"), allow_zero=True)
    interface = options.get("interface", "")
    if interface and not _is_ip_address(interface):
        raise _option_error("server", f"interface must be an IP address, not {quoted(interface)}")
    backlog = _decimal(options.get("backlog", "50"))
    if backlog is None or not 1 <= backlog <= _MAX_BACKLOG:
        raise _option_error(
            "server",
            f"backlog must be a number from 1 to {_MAX_BACKLOG}, not {quoted(options['backlog'])}",
        )
    paths = (*_paths("server", options), *_state("server", options))
    wrapped: IStreamServerEndpoint
    if ":" in interface:
        wrapped = TCP6ServerEndpoint(reactor, port, backlog, interface)
    else:
        wrapped = TCP4ServerEndpoint(reactor, port, backlog, interface)
    return ServerEndpointParts(wrapped, False, *paths)
