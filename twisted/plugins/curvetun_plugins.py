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
    C{curvetun:HOST:PORT[:key=KEY][:keydir=DIR][:registry=FILE][:timeout=SECONDS]}
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
    C{curvetun:PORT[:interface=ADDR][:backlog=N][:keydir=DIR][:registry=FILE]}
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
