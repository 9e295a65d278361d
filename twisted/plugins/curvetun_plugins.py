"""
Twisted plugins for curvetun: the C{twist curvetun} service maker and the
C{curvetun:} client and server endpoint-string parsers.

This module only makes instances; the work is imported lazily from
L{curvetun}, so that scanning plugins stays cheap.
"""

from __future__ import annotations

from twisted.application.service import ServiceMaker
from twisted.internet.interfaces import (
    IReactorCore,
    IStreamClientEndpoint,
    IStreamClientEndpointStringParserWithReactor,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.plugin import IPlugin
from zope.interface import implementer

curvetunServiceMaker = ServiceMaker(
    "curvetun curve_tun tunnel",
    "curvetun.tap",
    "Encrypted, mutually authenticated tunnels (curve_tun protocol v1.0).",
    "curvetun",
)


@implementer(IPlugin, IStreamClientEndpointStringParserWithReactor)
class _CurveTunClientParser:
    """
    The C{curvetun:} client string::

        curvetun:HOST:PORT[:key=KEY][:keydir=DIR][:registry=FILE][:timeout=SECONDS]
        curvetun:host=HOST:port=PORT[:...]
        curvetun:endpoint=INNER[:key=KEY][:keydir=DIR][:registry=FILE][:timeout=SECONDS]
        curvetun:HOST:PORT:registry=dns[:resolver=IP\\:PORT][:...]

    C{INNER} is any client endpoint string with each C{:} and C{=} escaped
    by a backslash, as in Twisted's C{tls:} (C{endpoint=unix\\:path\\=/run/ct.sock},
    C{endpoint=tcp\\:HOST\\:7700\\:bindAddress\\=ADDR}); an IPv6 HOST is
    written C{\\:\\:1}. See L{curvetun.endpoints.parse_client_endpoint}.
    """

    prefix = "curvetun"

    def parseStreamClient(
        self, reactor: IReactorCore, *args: object, **kwargs: object
    ) -> IStreamClientEndpoint:
        from curvetun.endpoints import parse_client_endpoint

        return parse_client_endpoint(
            reactor, *map(str, args), **{k: str(v) for k, v in kwargs.items()}
        )


@implementer(IPlugin, IStreamServerEndpointStringParser)
class _CurveTunServerParser:
    """
    The C{curvetun:} server string::

        curvetun:PORT[:interface=ADDR][:backlog=N][:keydir=DIR][:registry=FILE]
        curvetun:port=PORT[:...]
        curvetun:endpoint=INNER[:keydir=DIR][:registry=FILE]

    C{INNER} is any server endpoint string with each C{:} and C{=} escaped
    by a backslash (C{endpoint=unix\\:/run/ct.sock},
    C{endpoint=systemd\\:domain\\=INET\\:index\\=0},
    C{endpoint=haproxy\\:tcp\\:7700}). See
    L{curvetun.endpoints.parse_server_endpoint}.
    """

    prefix = "curvetun"

    def parseStreamServer(
        self, reactor: IReactorCore, *args: object, **kwargs: object
    ) -> IStreamServerEndpoint:
        from curvetun.endpoints import parse_server_endpoint

        return parse_server_endpoint(
            reactor, *map(str, args), **{k: str(v) for k, v in kwargs.items()}
        )


curvetunClientParser = _CurveTunClientParser()
curvetunServerParser = _CurveTunServerParser()
