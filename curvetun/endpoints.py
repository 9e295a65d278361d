"""
curvetun endpoints: any stream endpoint (TCP, usually) wrapped so that what
connects or listens through it is a curvetun connection; and the
C{curvetun:} endpoint-string parsers behind
C{twisted/plugins/curvetun_plugins.py}.

Client::

    curvetun:HOST:PORT[:key=SERVERKEY][:keydir=DIR][:registry=FILE][:timeout=SECONDS]
    curvetun:host=HOST:port=PORT[:...]

Server::

    curvetun:PORT[:interface=ADDR][:backlog=N][:keydir=DIR][:registry=FILE]
    curvetun:port=PORT[:...]

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
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
)
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from .errors import KeyFileError, RegistryError
from .keys import parse_public_key, quoted
from .service import CurveTunService
from .transport import CurveTunProtocol

DEFAULT_PORT = 7700
"""
The port C{twist curvetun} listens on by default.
"""

REGISTRY_FILE = "registry"
"""
The registry's file name inside a key directory (its default place).
"""


def default_keydir() -> str:
    """
    The key directory used when none is named: C{$CURVETUN_HOME}, else
    C{~/.curvetun}.
    """
    return os.environ.get("CURVETUN_HOME") or os.path.expanduser("~/.curvetun")


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


@implementer(IStreamServerEndpoint)
class CurveTunServerEndpoint:
    """
    Listens on C{wrapped} and runs curvetun's server side on each
    connection; the application's protocol starts once the client is
    authenticated.
    """

    def __init__(
        self,
        wrapped: IStreamServerEndpoint,
        service: CurveTunService,
        lease: _Lease | None = None,
    ) -> None:
        self._wrapped = wrapped
        self._service = service
        self._lease = lease

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        listening = self._wrapped.listen(self._service.server_factory(protocolFactory))
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

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        if self._handshake_timeout is None:
            factory = self._service.client_factory(protocolFactory, self._server_key)
        else:
            factory = self._service.client_factory(
                protocolFactory, self._server_key, self._handshake_timeout
            )
        lease = self._lease
        if lease is not None:
            lease.acquire()
            # Released when the connection ends, or below if it never starts.
            factory.ended_callbacks.append(lambda protocol, reason: lease.release())

        def handshake(protocol: IProtocol) -> Deferred[IProtocol]:
            assert isinstance(protocol, CurveTunProtocol)
            return protocol.when_established()

        def never_connected(failure: Failure) -> Failure:
            if lease is not None:
                lease.release()
            return failure

        return self._wrapped.connect(factory).addCallbacks(handshake, never_connected)


# -- the service pool behind endpoint strings ------------------------------------


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

    def lease(self, keydir: str | None, registry: str | None) -> _Lease:
        """
        The lease on the service for C{keydir} (default: the adopted
        default, else L{default_keydir}) and C{registry} (default: the file
        C{registry} in the key directory), loading it if need be.

        @raise ValueError: the key directory or the registry cannot be used;
            the message says why.
        """
        if keydir is None:
            keydir = self._default_keydir or default_keydir()
        key = self._key(keydir, registry)
        lease = self._leases.get(key)
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
                service = CurveTunService.from_keydir(key.keydir, key.registry)
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


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_host(text: str) -> bool:
    return _is_ip_address(text) or (text.isascii() and _HOST_NAME.match(text) is not None)


def _option_error(kind: str, message: str) -> ValueError:
    return ValueError(f"curvetun {kind} endpoint: {message}")


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


def parse_client_endpoint(reactor: Any, *args: str, **kwargs: str) -> CurveTunClientEndpoint:
    """
    Build a client endpoint from the parts of a C{curvetun:} string (see the
    module docstring).

    @raise ValueError: the string is malformed, names an unknown keyword, a
        malformed key, a missing key directory, or no server key can be
        found; the message says which.
    """
    options = _collect(
        "client",
        ("host", "port"),
        ("host", "port", "key", "keydir", "registry", "timeout"),
        args,
        kwargs,
    )
    host = options.get("host")
    if not host:
        raise _option_error("client", "a host is required (curvetun:HOST:PORT)")
    if not _is_host(host):
        raise _option_error(
            "client", f"host must be a host name or an IP address, not {quoted(host)}"
        )
    port = _port("client", options.get("port"), allow_zero=False)
    timeout: float | None = None
    if "timeout" in options:
        try:
            timeout = float(options["timeout"])
        except ValueError:
            timeout = -1
        if not 0 < timeout < float("inf"):
            raise _option_error(
                "client",
                f"timeout must be a positive number of seconds, not {options['timeout'][:40]!r}",
            )
    lease = service_pool.lease(*_paths("client", options))
    if "key" in options:
        try:
            server_key = parse_public_key(options["key"])
        except ValueError as error:
            raise _option_error("client", f"key: {error}") from None
    else:
        found = lease.service.registry.server_key_for(host)
        if found is None:
            raise _option_error(
                "client",
                f"no key for server {host}: give key=, or add one to the registry "
                f"with 'curvetun trust {host} KEY'",
            )
        server_key = found
    wrapped = HostnameEndpoint(reactor, host, port, timeout=30 if timeout is None else timeout)
    return CurveTunClientEndpoint(wrapped, lease.service, server_key, timeout, lease)


def parse_server_endpoint(reactor: Any, *args: str, **kwargs: str) -> CurveTunServerEndpoint:
    """
    Build a server endpoint from the parts of a C{curvetun:} string (see the
    module docstring).

    @raise ValueError: the string is malformed, names an unknown keyword, or
        a missing or unusable key directory or registry.
    """
    options = _collect(
        "server",
        ("port",),
        ("port", "interface", "backlog", "keydir", "registry"),
        args,
        kwargs,
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
    lease = service_pool.lease(*_paths("server", options))
    wrapped: IStreamServerEndpoint
    if ":" in interface:
        wrapped = TCP6ServerEndpoint(reactor, port, backlog, interface)
    else:
        wrapped = TCP4ServerEndpoint(reactor, port, backlog, interface)
    return CurveTunServerEndpoint(wrapped, lease.service, lease)
