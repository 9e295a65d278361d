"""
C{curvetun cat}: a netcat for curvetun. Standard input goes to a server as
messages; what the server sends is written to standard output.

The endpoint is built from the user's string by the endpoint-string
machinery (L{curvetun.endpoints.client_from_string}, which is
C{clientFromString} with C{--keydir} as the default key directory of a
C{curvetun:} string), so every kind of client string works here exactly as
it does in Python.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any, cast
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred
from twisted.internet.error import (
    ConnectError,
    ConnectionDone,
    ConnectionRefusedError,
    DNSLookupError,
)
from twisted.internet.error import (
    TimeoutError as ConnectTimeoutError,
)
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

from ..errors import (
    CurveTunError,
    HandshakeTimeout,
    NotAuthorized,
    ServerKeyMismatch,
)
from ..keys import quoted
from .base import CommandFailed, KeydirOptions, expect_arguments, print_error

DEFAULT_WAIT = 2.0
"""
Seconds C{curvetun cat} waits, after the end of its input, for more from
the server before it closes the connection.
"""


class CatOptions(KeydirOptions):
    """
    C{curvetun cat}'s command line.
    """

    synopsis = "[--keydir DIR] [--wait SECONDS] ENDPOINT"
    optParameters = [
        [
            "wait",
            None,
            str(DEFAULT_WAIT),
            "After the end of input, close once SECONDS pass with nothing received.",
        ],
    ]
    longdesc = (
        "Connect to ENDPOINT, a client endpoint string such as "
        "curvetun:HOST:PORT:key=SERVERKEY; send standard input as messages "
        "and write the messages received to standard output. After the end "
        "of input, wait until the server closes the connection or --wait "
        "seconds pass without a message, then close and exit 0. --keydir "
        "(the client's identity) is the key directory of a curvetun: string "
        "that names none with keydir= (one that names another is an error); "
        "without either, the default key directory is used. Without key=, "
        "the server's key is looked up in the registry of the key directory "
        "(see 'curvetun trust'). Other endpoint strings (tcp:HOST:PORT, ...) "
        "work too, unencrypted. Exit 1 if the connection is refused, the "
        "server's key does not match, this client is not authorized, the key "
        "directory given with --keydir is missing or unusable, or the "
        "connection fails; exit 2 for a malformed endpoint string."
    )

    endpoint: str
    wait: float

    def take_arguments(self, args: tuple[str, ...]) -> None:
        expect_arguments(args, "ENDPOINT", 1, 1)
        self.endpoint = args[0]

    def postOptions(self) -> None:
        try:
            wait = float(self["wait"])
        except ValueError:
            wait = -1.0
        if not (wait >= 0 and math.isfinite(wait)):
            raise usage.UsageError(
                f"--wait must be a number of seconds, 0 or more, not {quoted(self['wait'])}"
            )
        self.wait = wait


def _client_endpoint(reactor: Any, options: CatOptions) -> IStreamClientEndpoint:
    """
    The client endpoint of C{options.endpoint}, with C{--keydir} (if
    given) as its key directory.

    @raise usage.UsageError: the string is malformed.
    @raise CommandFailed: it names, or C{--keydir} names, a key directory
        or registry that cannot be loaded.
    """
    from ..endpoints import client_from_string

    description = options.endpoint
    # Only an explicit --keydir: without one, a keydir= in the string, else
    # the default key directory, is the endpoint parser's to choose.
    keydir = os.path.expanduser(options["keydir"]) if options["keydir"] else None
    try:
        return client_from_string(reactor, description, keydir=keydir)
    except ValueError as error:
        # The curvetun: parser reports unusable key files as ValueErrors
        # caused by the curvetun error: not the command line's fault.
        if isinstance(error.__cause__, CurveTunError):
            raise CommandFailed(str(error)) from None
        if keydir is not None and not os.path.isdir(keydir):
            raise CommandFailed(
                f"no curvetun key directory at {keydir}: create this client's key with "
                f"'curvetun keygen --keydir {keydir}'"
            ) from None
        raise usage.UsageError(f"bad endpoint: {error}") from None
    except RuntimeError:
        # Twisted's tokenizer, on a backslash with nothing after it.
        raise usage.UsageError(
            f"bad endpoint {quoted(description)}: it cannot be split into its parts "
            "(does it end with a lone backslash?)"
        ) from None
    except (TypeError, KeyError, IndexError) as error:
        # Twisted's own parsers (tcp:, unix:, ...) fail this way on
        # missing, surplus or unknown arguments.
        raise usage.UsageError(f"bad endpoint {quoted(description)}: {error!r}") from None


def describe_failure(error: BaseException, target: str, keydir: str | None = None) -> str:
    """
    One line that says why a connection to C{target} (the endpoint string,
    quoted) failed or ended badly.

    @param keydir: the client's key directory, to say how to get its key
        admitted.
    """
    if isinstance(error, ConnectionRefusedError):
        return f"connection refused by {target}: is a curvetun server listening there?"
    if isinstance(error, ServerKeyMismatch):
        return f"the server's key does not match the key expected for {target}: {error}"
    if isinstance(error, NotAuthorized):
        pubkey = "curvetun pubkey" + (f" --keydir {keydir}" if keydir else "")
        return (
            f"not authorized by the server at {target}: {error}; its operator can "
            f"admit this client with 'curvetun trust ADDRESS KEY', KEY being what "
            f"'{pubkey}' prints here"
        )
    if isinstance(error, HandshakeTimeout):
        return f"no answer from {target}: {error}"
    if isinstance(error, ConnectTimeoutError):
        return f"cannot connect to {target}: timed out"
    if isinstance(error, DNSLookupError):
        return f"cannot connect to {target}: host name not found"
    if isinstance(error, ConnectError):
        return f"cannot connect to {target}: {error}"
    if isinstance(error, CurveTunError):
        return f"{target}: {error}"
    return f"{target}: connection failed: {error}"


class _Pipe(TypingProtocol):
    """
    What L{CatSession} needs of each of its two transports (standard I/O
    and the connection): a transport that is a consumer and a producer.
    """

    def write(self, data: bytes) -> None: ...

    def loseConnection(self) -> None: ...

    def registerProducer(self, producer: Any, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...

    def stopProducing(self) -> None: ...


class CatSession:
    """
    One C{curvetun cat}: joins standard I/O to an established connection,
    with flow control both ways, and decides when it is over.

    It is over when the connection has ended and standard output is
    flushed (or gone). The connection ends when the server closes it, when
    standard output goes away, or when C{wait} seconds pass after the end
    of input without a message.

    @ivar done: fires with L{None} when it is over and the connection ended
        cleanly; fails with the reason otherwise.
    """

    def __init__(
        self,
        clock: IReactorTime,
        wait: float,
        open_stdio: Callable[[Protocol], _Pipe],
    ) -> None:
        """
        @param open_stdio: connects a protocol to standard input and output
            and returns the transport (L{twisted.internet.stdio.StandardIO};
            tests pass fakes).
        """
        self.done: Deferred[None] = Deferred()
        self._clock = clock
        self._wait = wait
        self._open_stdio = open_stdio
        self._network: _Pipe | None = None
        self._stdio: _Pipe | None = None
        self._timer: IDelayedCall | None = None
        self._input_ended = False
        self._output_finished = False
        self._ended: Failure | None = None

    # -- the connection ----------------------------------------------------------

    def connected(self, network: _Pipe) -> None:
        """
        The connection is established: start reading standard input.
        """
        self._network = network
        stdio = self._stdio = self._open_stdio(_StandardIOSide(self))
        # Flow control, as in twisted.protocols.portforward: while the
        # connection's send buffer is full, stop reading standard input;
        # while standard output's is, stop reading the connection.
        network.registerProducer(stdio, True)
        stdio.registerProducer(network, True)

    def received(self, message: bytes) -> None:
        """
        A message arrived: write it out, and wait on from now.
        """
        assert self._stdio is not None
        self._stdio.write(message)
        if self._input_ended:
            self._start_timer()

    def connection_ended(self, reason: Failure) -> None:
        """
        The connection is gone: finish writing standard output.
        """
        self._cancel_timer()
        self._ended = reason
        if self._output_finished or self._stdio is None:
            self._finish()
        else:
            # A registered producer would keep standard output open.
            self._stdio.unregisterProducer()
            self._stdio.loseConnection()

    # -- standard I/O ------------------------------------------------------------

    def input_received(self, data: bytes) -> None:
        """
        A chunk of standard input: send it.
        """
        assert self._network is not None
        self._network.write(data)

    def input_ended(self) -> None:
        """
        The end of standard input: stop producing, start waiting.
        """
        assert self._network is not None
        self._input_ended = True
        if self._ended is None:
            self._network.unregisterProducer()
            self._start_timer()

    def output_finished(self) -> None:
        """
        Standard output is flushed and closed, or its reader went away:
        nothing more can be delivered.
        """
        self._output_finished = True
        if self._ended is not None:
            self._finish()
        else:
            self._close()

    # -- internals ---------------------------------------------------------------

    def _start_timer(self) -> None:
        self._cancel_timer()
        self._timer = self._clock.callLater(self._wait, self._close)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _close(self) -> None:
        self._timer = None
        assert self._network is not None
        self._network.loseConnection()

    def _finish(self) -> None:
        if self.done.called:
            return
        assert self._ended is not None
        if self._ended.check(ConnectionDone):
            self.done.callback(None)
        else:
            self.done.errback(self._ended)


@implementer(IHalfCloseableProtocol)
class _StandardIOSide(Protocol):
    """
    Standard input and output's protocol: hands everything to the session.
    """

    def __init__(self, session: CatSession) -> None:
        self._session = session

    def dataReceived(self, data: bytes) -> None:
        self._session.input_received(data)

    def readConnectionLost(self) -> None:
        self._session.input_ended()

    def writeConnectionLost(self) -> None:
        self._session.output_finished()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._session.output_finished()


class _NetworkSide(Protocol):
    """
    The connection's application protocol: hands everything to the session.
    """

    def __init__(self, session: CatSession) -> None:
        self._session = session

    def connectionMade(self) -> None:
        # Stream transports (curvetun's, TCP's) are consumers and producers.
        self._session.connected(cast(_Pipe, self.transport))

    def dataReceived(self, data: bytes) -> None:
        self._session.received(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._session.connection_ended(reason)


def _open_standard_io(protocol: Protocol) -> _Pipe:
    from twisted.internet.stdio import StandardIO

    return StandardIO(protocol)


async def _run_cat(
    reactor: IReactorTime, endpoint: Any, wait: float, describe: Callable[[BaseException], str]
) -> None:
    """
    Connect, run one session, and turn a failure into one line (by
    C{describe}) and exit status 1.
    """
    session = CatSession(reactor, wait, _open_standard_io)
    try:
        await endpoint.connect(Factory.forProtocol(lambda: _NetworkSide(session)))
        await session.done
    except Exception as error:
        print_error(describe(error))
        raise SystemExit(1) from None


def cat(options: CatOptions) -> int:
    """
    C{curvetun cat}: a netcat for curvetun.
    """
    from twisted.internet import reactor
    from twisted.internet.task import react

    endpoint = _client_endpoint(reactor, options)
    # What the user typed is what names the server in messages.
    target = quoted(options.endpoint)
    keydir = os.path.expanduser(options["keydir"]) if options["keydir"] else None

    def describe(error: BaseException) -> str:
        return describe_failure(error, target, keydir)

    react(_run_cat, (endpoint, options.wait, describe))
