"""
The factories of curvetun connections: L{CurveTunServerFactory} for a
listening port, L{CurveTunClientFactory} for outgoing connections. Each
builds a L{CurveTunProtocol} per TCP connection, with its machine, and
keeps what outlives connections: the identity's parts, the timeouts, the
server's admission, and the log of how connections ended.

A service that tracks live connections (for metrics or a status page)
appends to C{established_callbacks} and C{ended_callbacks}; the
connections' figures are their transports' attributes (see
L{CurveTunProtocol}).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IAddress, IProtocolFactory, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .addresses import format_address
from .admission import Admission, ConnectionLimits, FailureLog
from .connection import (
    ClientCore,
    ClientMachine,
    ConnectionInputs,
    ConnectionOwner,
    ServerCore,
    ServerMachine,
)
from .errors import AdmissionRefused, CurveTunError
from .handshake import CookieSealer
from .handshake_vault import IHandshakeVault, as_handshake_vault
from .interfaces import IRegistry, IVault
from .keys import fingerprint
from .shared_keys import share_transport_keys
from .transport import CurveTunProtocol

DEFAULT_HANDSHAKE_TIMEOUT = 10.0
"""
Seconds a connection may take from TCP connect to a completed handshake.
"""

DEFAULT_HELLO_TIMEOUT = 2.0
"""
Seconds a server waits for a new connection's hello: an honest client sends
it one round trip after connecting.
"""

log = Logger()


@implementer(IProtocolFactory)
class _CurveTunFactory(Factory):
    """
    What server and client factories share: the application's factory,
    the clock and timeouts, the callbacks, and the log of each connection's
    end.

    @ivar established_callbacks: called with each connection of this
        factory when its handshake is done (the server checked the vouch;
        the client sent it), before its application starts.
    @ivar ended_callbacks: called with each connection of this factory and
        the reason, when it ends, after it is logged.
    """

    # No "Starting factory" / "Stopping factory" log lines: a client
    # factory starts and stops with every connection, and each connection's
    # end is logged already.
    noisy = False

    def __init__(
        self,
        wrappedFactory: IProtocolFactory,
        vault: IVault | IHandshakeVault,
        clock: IReactorTime,
        handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
        idle_timeout: float | None = None,
        hello_timeout: float | None = None,
    ) -> None:
        self.wrappedFactory = wrappedFactory
        self.vault = vault
        # What the machines ask: an in-process vault answers through a
        # LocalHandshakeVault, made once here.
        self.handshake_vault = as_handshake_vault(vault)
        self.clock = clock
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.hello_timeout = hello_timeout
        self.established_callbacks: list[Callable[[CurveTunProtocol], None]] = []
        self.ended_callbacks: list[Callable[[CurveTunProtocol, Failure], None]] = []

    def doStart(self) -> None:
        # Before the first connection's transport is made.
        share_transport_keys()
        self.wrappedFactory.doStart()
        super().doStart()

    def doStop(self) -> None:
        self.wrappedFactory.doStop()
        super().doStop()

    def connection_made(self, protocol: CurveTunProtocol) -> CurveTunError | None:
        """
        C{protocol}'s TCP connection is up: L{None} to go on with it, or
        why it is refused.
        """
        return None

    def handshake_completed(self, protocol: CurveTunProtocol) -> None:
        """
        C{protocol}'s handshake is done.
        """
        for callback in self.established_callbacks:
            callback(protocol)

    def connection_ended(self, protocol: CurveTunProtocol, reason: Failure) -> None:
        """
        Log how a connection ended, and tell the C{ended_callbacks}.
        """
        if protocol.established_at is None:
            self.handshake_failed(protocol, reason)
        else:
            log.info(
                "curvetun connection with {peer} (key {key}) closed after {duration:.1f} s,"
                " {received} bytes received, {sent} sent: {why}",
                peer=format_address(protocol.getPeer()),
                key=fingerprint(protocol.peer_public_key),
                duration=self.clock.seconds() - protocol.established_at,
                received=protocol.bytes_received,
                sent=protocol.bytes_sent,
                why=reason.getErrorMessage(),
            )
        for callback in self.ended_callbacks:
            callback(protocol, reason)

    def handshake_failed(self, protocol: CurveTunProtocol, reason: Failure) -> None:
        """
        Log a connection that ended before its handshake was done.
        """
        log.info(
            "curvetun handshake with {peer} failed: {why}",
            peer=format_address(protocol.getPeer()),
            why=reason.getErrorMessage(),
        )


class CurveTunServerFactory(_CurveTunFactory):
    """
    Accepts curvetun connections and runs C{wrappedFactory}'s protocols on
    the authenticated ones.

    Each connection is admitted (L{Admission}) when it is made, with the
    peer address its transport reports, and the registry is asked about
    that address too. Behind a PROXY-protocol endpoint that connects the
    protocol once the header is read, that is the address the header
    gives; C{buildProtocol} is given the proxy's. A connection that ends
    without sending a byte (a port scan, a health check) is logged at
    debug level only; other failed handshakes go to the L{FailureLog}.

    @param hello_timeout: seconds a new connection has to deliver its
        hello, or L{None}; C{handshake_timeout} bounds the whole handshake.
    @param admission: decides which connections to take (by default an
        L{Admission} of C{limits}).
    @param failure_log: where failed handshakes go (by default a
        L{FailureLog} on C{clock}).
    """

    def __init__(
        self,
        wrappedFactory: IProtocolFactory,
        vault: IVault | IHandshakeVault,
        cookie_keys: CookieSealer,
        registry: IRegistry,
        remember_vouch: Callable[[bytes], bool],
        clock: IReactorTime,
        handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
        idle_timeout: float | None = None,
        limits: ConnectionLimits = ConnectionLimits(),
        *,
        hello_timeout: float | None = DEFAULT_HELLO_TIMEOUT,
        admission: Admission | None = None,
        failure_log: FailureLog | None = None,
    ) -> None:
        super().__init__(
            wrappedFactory, vault, clock, handshake_timeout, idle_timeout, hello_timeout
        )
        self.cookie_keys = cookie_keys
        self.registry = registry
        self.remember_vouch = remember_vouch
        self.limits = limits
        self.admission = Admission(limits, clock) if admission is None else admission
        self.failure_log = FailureLog(clock) if failure_log is None else failure_log

    def doStop(self) -> None:
        # What is counted so far is logged now, not lost with the timers.
        self.admission.stop()
        self.failure_log.stop()
        super().doStop()

    def buildProtocol(self, addr: IAddress | None) -> CurveTunProtocol:
        # No admission here: behind a proxy, addr is the proxy's address.
        def make_machine(owner: ConnectionOwner) -> ConnectionInputs:
            return ServerMachine(
                ServerCore(
                    owner,
                    self.handshake_vault,
                    self.cookie_keys,
                    self.registry,
                    self.remember_vouch,
                )
            )

        return CurveTunProtocol(self, make_machine)

    def connection_made(self, protocol: CurveTunProtocol) -> CurveTunError | None:
        refusal = self.admission.admit(protocol.peer_host, protocol)
        if refusal is None:
            return None
        # The admission logs refusals, summed up.
        return AdmissionRefused(f"refused at the limit of {refusal}")

    def handshake_completed(self, protocol: CurveTunProtocol) -> None:
        self.admission.handshake_done(protocol)
        super().handshake_completed(protocol)

    def connection_ended(self, protocol: CurveTunProtocol, reason: Failure) -> None:
        self.admission.ended(protocol)
        super().connection_ended(protocol, reason)

    def handshake_failed(self, protocol: CurveTunProtocol, reason: Failure) -> None:
        if reason.check(AdmissionRefused):
            return  # the admission has logged it
        if protocol.raw_bytes_received == 0:
            # A port scan, a health check (a PROXY LOCAL header and nothing
            # after it), a client that gave up: not a failed handshake.
            log.debug(
                "curvetun connection from {peer} closed before it sent anything: {why}",
                peer=format_address(protocol.getPeer()),
                why=reason.getErrorMessage(),
            )
            return
        self.failure_log.failed(format_address(protocol.getPeer()), reason)


class CurveTunClientFactory(_CurveTunFactory):
    """
    Makes curvetun connections to a server with long-term key
    C{server_key} and runs C{wrappedFactory}'s protocol on each.

    @param hello_timeout: seconds the server has to answer the hello, or
        L{None} (the default: a loaded server may be slow to answer, and
        C{handshake_timeout} bounds the whole handshake anyway).
    """

    def __init__(
        self,
        wrappedFactory: IProtocolFactory,
        vault: IVault | IHandshakeVault,
        server_key: bytes,
        clock: IReactorTime,
        handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
        idle_timeout: float | None = None,
        *,
        hello_timeout: float | None = None,
    ) -> None:
        super().__init__(
            wrappedFactory, vault, clock, handshake_timeout, idle_timeout, hello_timeout
        )
        self.server_key = server_key

    def buildProtocol(self, addr: IAddress | None) -> CurveTunProtocol:
        def make_machine(owner: ConnectionOwner) -> ConnectionInputs:
            return ClientMachine(ClientCore(owner, self.handshake_vault, self.server_key))

        return CurveTunProtocol(self, make_machine)
