"""
curvetun endpoints: any stream endpoint (TCP, usually) wrapped so that what
connects or listens through it is a curvetun connection.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)
from zope.interface import implementer

from .service import CurveTunService
from .transport import CurveTunProtocol


@implementer(IStreamServerEndpoint)
class CurveTunServerEndpoint:
    """
    Listens on C{wrapped} and runs curvetun's server side on each
    connection; the application's protocol starts once the client is
    authenticated.
    """

    def __init__(self, wrapped: IStreamServerEndpoint, service: CurveTunService) -> None:
        self._wrapped = wrapped
        self._service = service

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self._wrapped.listen(self._service.server_factory(protocolFactory))


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
    ) -> None:
        self._wrapped = wrapped
        self._service = service
        self._server_key = server_key

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        factory = self._service.client_factory(protocolFactory, self._server_key)

        def handshake(protocol: IProtocol) -> Deferred[IProtocol]:
            assert isinstance(protocol, CurveTunProtocol)
            return protocol.when_established()

        return self._wrapped.connect(factory).addCallback(handshake)
