"""
Server keys published in DNS: a client finds the long-term public key of
server C{HOST} in the TXT records at C{_curvetun.HOST}, each holding
C{curvetun-key=} and 64 hex digits.

During a key rollover a name has several records. The client then tries
each in the order the resolver gave them: it connects with the first, and
if the handshake fails with L{ServerKeyMismatch} (the server's cookie does
not open with that key, or the server closes after the hello: no vouch, so
nothing of the client's identity has been used), it connects again with the
next, up to L{MAX_KEYS} keys.

Without DNSSEC validation, this trusts the resolver and the network path to
it: whoever can answer the query can name the key, and so be the server.
Use it with a validating resolver you reach over a trusted path, or for
names whose key you could equally take from the answer's source.

In an endpoint string::

    curvetun:HOST:PORT:registry=dns[:resolver=IP\\:PORT]
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.names import dns
from twisted.names.error import DNSNameError
from zope.interface import implementer

from .endpoints import CurveTunClientEndpoint, _Lease
from .errors import CurveTunError, ServerKeyMismatch
from .service import CurveTunService

log = Logger()

RECORD_PREFIX = "_curvetun."
"""
The label put before a host name to make the name of its key records.
"""

TXT_PREFIX = "curvetun-key="
"""
How a key record's text begins; 64 hex digits follow.
"""

MAX_KEYS = 4
"""
The most keys tried for one connection (a rollover needs two).
"""

LOOKUP_TIMEOUTS = (1, 3, 6)
"""
Seconds to wait for each try of a look-up (10 in all, rather than
twisted.names' 60), so that a dead resolver fails a connect in time.
"""

_KEY_TEXT = re.compile(r"curvetun-key=([0-9A-Fa-f]{64})")


class NoKeyInDNS(CurveTunError):
    """
    DNS has no (well-formed) curvetun key record for the server's name.
    """


def record_name(host: str) -> str:
    """
    The name of C{host}'s key records: C{_curvetun.HOST}.
    """
    return RECORD_PREFIX + host.rstrip(".")


def parse_record(strings: Sequence[bytes]) -> bytes | None:
    """
    The key in one TXT record (its character-strings joined, as a long TXT
    value is split into strings of 255 bytes), or L{None} if the record is
    not C{curvetun-key=} and 64 hex digits.
    """
    try:
        text = b"".join(strings).decode("ascii")
    except UnicodeDecodeError:
        return None
    match = _KEY_TEXT.fullmatch(text)
    return bytes.fromhex(match[1]) if match is not None else None


def parse_resolver(text: str | None) -> Any:
    """
    The resolver C{resolver=} names: L{None} means the system's (from
    C{/etc/resolv.conf}); C{IP:PORT} (C{[IPv6]:PORT} too) a DNS server.

    @return: an C{IResolver}, or L{None} for the system resolver.
    @raise ValueError: C{text} is not an IP address and a port.
    """
    if text is None:
        return None
    host, colon, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        host = ""
    if (
        not colon
        or not host
        or not (port.isascii() and port.isdigit())
        or not 0 < int(port) < 65536
    ):
        raise ValueError(f"resolver must be IP\\:PORT (the ':' escaped), not {text[:60]!r}")
    from twisted.names.client import Resolver

    # Resolver itself, not createResolver: that one also re-reads
    # /etc/resolv.conf every minute, for the life of the process.
    return Resolver(servers=[(host, int(port))])


class DNSServerKeys:
    """
    Looks servers' keys up in DNS.

    @param resolver: a C{twisted.names} C{IResolver}; L{None}: the system's.
    """

    def __init__(self, resolver: Any = None) -> None:
        if resolver is None:
            from twisted.names.client import getResolver

            resolver = getResolver()
        self._resolver = resolver

    async def keys_for(self, host: str) -> list[bytes]:
        """
        The keys DNS publishes for C{host}, in the resolver's order, at
        most L{MAX_KEYS}. Malformed records are skipped, each with a log
        line.

        @raise NoKeyInDNS: there is no well-formed record.
        """
        name = record_name(host)
        try:
            answers, _, _ = await self._resolver.lookupText(name, timeout=LOOKUP_TIMEOUTS)
        except DNSNameError:
            answers = []
        keys: list[bytes] = []
        for answer in answers:
            if answer.type != dns.TXT:
                continue  # a CNAME on the way
            key = parse_record(answer.payload.data)
            if key is None:
                log.warn(
                    "curvetun: ignoring a malformed TXT record at {name}: {text}",
                    name=name,
                    text=repr(b"".join(answer.payload.data)[:100]),
                )
            elif key not in keys:
                keys.append(key)
        if not keys:
            raise NoKeyInDNS(f"no curvetun key for {host} in DNS (TXT {name})")
        return keys[:MAX_KEYS]


@implementer(IStreamClientEndpoint)
class DNSKeyClientEndpoint:
    """
    Connects through C{wrapped} to the curvetun server C{host}, whose key
    it looks up in DNS at each connect (see the module docstring for the
    rollover rule).

    C{connect} fails with L{NoKeyInDNS}, with the resolver's error, or, if
    no key matched, with the last L{ServerKeyMismatch}; otherwise as
    L{CurveTunClientEndpoint.connect}.

    @param wrapped: the endpoint to connect through.
    @param service: the client's identity.
    @param host: the server's name, looked up as C{_curvetun.HOST}.
    @param keys: the look-up (default: the system resolver's).
    @param handshake_timeout: seconds, overriding the service's.
    @param lease: for the endpoint-string pool only.
    """

    def __init__(
        self,
        wrapped: IStreamClientEndpoint,
        service: CurveTunService,
        host: str,
        keys: DNSServerKeys | None = None,
        handshake_timeout: float | None = None,
        lease: _Lease | None = None,
    ) -> None:
        self._wrapped = wrapped
        self._service = service
        self._host = host
        self._keys = keys if keys is not None else DNSServerKeys()
        self._handshake_timeout = handshake_timeout
        self._lease = lease

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        return Deferred.fromCoroutine(self._connect(protocolFactory))

    async def _connect(self, protocolFactory: IProtocolFactory) -> IProtocol:
        keys = await self._keys.keys_for(self._host)
        mismatch: ServerKeyMismatch | None = None
        for key in keys:
            endpoint = CurveTunClientEndpoint(
                self._wrapped, self._service, key, self._handshake_timeout, self._lease
            )
            try:
                return await endpoint.connect(protocolFactory)
            except ServerKeyMismatch as error:
                # Before the vouch: nothing but a fresh ephemeral key was
                # used; the next key gets a new connection.
                mismatch = error
        assert mismatch is not None
        raise mismatch
