"""
The C{curvetun} command: make and show keys, edit the registry, and talk
to a curvetun server from a shell.

    curvetun keygen [--keydir DIR] [--force]
    curvetun pubkey [--keydir DIR]
    curvetun trust ADDRESS KEY [--comment TEXT] [--keydir DIR] [--registry FILE]
    curvetun untrust ADDRESS [KEY] [--keydir DIR] [--registry FILE]
    curvetun peers [--keydir DIR] [--registry FILE]
    curvetun cat ENDPOINT [--keydir DIR] [--wait SECONDS]

Exit status: 0 on success, 1 when the command failed (an unusable key
directory or registry, a refused connection, a server that is not the one
expected, a client that is not authorized, ...), 2 when the command line is
wrong. Every error is one line on standard error: C{curvetun: error: ...}.
"""

from __future__ import annotations

import getopt
import math
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn, cast
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
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

from . import __version__
from .endpoints import REGISTRY_FILE, default_keydir
from .errors import (
    CurveTunError,
    HandshakeTimeout,
    NotAuthorized,
    ServerKeyMismatch,
)
from .keys import format_public_key, parse_public_key, quoted

# Addresses are checked by the registry file's own parser, so that the
# command line accepts exactly what the file does, before FileRegistry is
# asked: its RegistryError would not tell a bad address (exit status 2)
# from a bad file (exit status 1).
from .registry import ANY, FileRegistry, Registry, parse_address
from .vault import (
    COUNTER_FILE,
    NONCE_KEY_FILE,
    PUBLIC_KEY_FILE,
    SECRET_KEY_FILE,
    FileVault,
    read_public_key,
)

DEFAULT_WAIT = 2.0
"""
Seconds C{curvetun cat} waits, after the end of its input, for more from
the server before it closes the connection.
"""


class CommandFailed(Exception):
    """
    A command could not do its work (exit status 1); the message is one
    line, for C{curvetun: error: ...}.
    """


def _error(message: str) -> None:
    # One line, always: a message that quotes user input could hold a newline.
    one_line = " ".join(message.splitlines())
    sys.stderr.write(f"curvetun: error: {one_line}\n")
    sys.stderr.flush()


# -- options -------------------------------------------------------------------


class _Options(usage.Options):
    """
    What every curvetun (sub)command's options share.
    """

    def opt_version(self) -> NoReturn:
        """
        Display curvetun's version and exit.
        """
        print(f"curvetun {__version__}")
        sys.exit(0)

    opt_h = usage.Options.opt_help


class _CommandOptions(_Options):
    """
    A command's options, which may come before, between or after its
    arguments (C{curvetun trust ADDRESS KEY --comment TEXT}).
    """

    def parseOptions(self, options: list[str] | None = None) -> None:
        # usage.Options stops at the first argument, as getopt does; GNU
        # getopt finds the options anywhere. Put them first, then "--" so
        # that the arguments stay arguments.
        try:
            found, arguments = getopt.gnu_getopt(
                sys.argv[1:] if options is None else options, self.shortOpt, self.longOpt
            )
        except getopt.GetoptError as error:
            raise usage.UsageError(str(error)) from None
        ordered: list[str] = []
        for option, value in found:
            if option.startswith("--"):
                ordered.append(f"{option}={value}" if f"{option[2:]}=" in self.longOpt else option)
            else:
                ordered.append(option + value)
        super().parseOptions([*ordered, "--", *arguments])

    def parseArgs(self, *args: str) -> None:
        # Most commands take none; those that do override this.
        _arguments(args, "no arguments", 0, 0)


class _KeydirOptions(_CommandOptions):
    """
    Options of commands that use a key directory.
    """

    optParameters = [
        [
            "keydir",
            None,
            None,
            "The key directory [default: $CURVETUN_HOME, else ~/.curvetun].",
        ],
    ]

    @property
    def keydir(self) -> str:
        """
        The key directory named, or the default one.
        """
        return os.path.expanduser(str(self["keydir"] or default_keydir()))


class _RegistryOptions(_KeydirOptions):
    """
    Options of commands that use a registry file.
    """

    optParameters = [
        [
            "registry",
            None,
            None,
            f"The registry file [default: the file {REGISTRY_FILE!r} in the key directory].",
        ],
    ]

    @property
    def registry(self) -> str:
        """
        The registry file named, or the one in the key directory.
        """
        if self["registry"]:
            return os.path.expanduser(str(self["registry"]))
        return os.path.join(self.keydir, REGISTRY_FILE)


def _address(text: str) -> tuple[str, bool]:
    """
    The canonical form of a registry address, and whether it is a host
    name.

    @raise usage.UsageError: C{text} is not an address.
    """
    try:
        canonical, network = parse_address(text)
    except ValueError as error:
        raise usage.UsageError(str(error)) from None
    return canonical, network is None and canonical != ANY


def _key(text: str) -> bytes:
    """
    A public key typed on the command line.

    @raise usage.UsageError: C{text} is not one.
    """
    try:
        return parse_public_key(text)
    except ValueError as error:
        raise usage.UsageError(str(error)) from None


def _arguments(args: tuple[str, ...], names: str, least: int, most: int) -> None:
    """
    Refuse a wrong number of arguments, naming the ones expected.
    """
    if not least <= len(args) <= most:
        raise usage.UsageError(f"expected {names}, got {len(args)} argument(s)")


class KeygenOptions(_KeydirOptions):
    """
    C{curvetun keygen}'s command line.
    """

    synopsis = "[--keydir DIR] [--force]"
    optFlags = [
        ["force", None, "Replace the key pair if the key directory already has one."],
    ]
    longdesc = (
        "Create a key directory (mode 0700; secret files 0600) with a new key "
        "pair, and print its public key (64 hex digits). A directory that "
        "already holds keys is left alone (exit 1) unless --force is given: "
        "replacing a key pair replaces the identity, and every peer that "
        "trusts the old public key will refuse the new one."
    )


class PubkeyOptions(_KeydirOptions):
    """
    C{curvetun pubkey}'s command line.
    """

    synopsis = "[--keydir DIR]"
    longdesc = (
        "Print the public key (64 hex digits) of a key directory, after "
        "checking it against the secret key. It works while a server uses the "
        "directory. Exit 1 if the directory is missing or damaged."
    )


class TrustOptions(_RegistryOptions):
    """
    C{curvetun trust}'s command line; the address and key, checked.
    """

    synopsis = "ADDRESS KEY [--comment TEXT] [--keydir DIR] [--registry FILE]"
    optParameters = [
        ["comment", None, None, "A note written after the entry (one line)."],
    ]
    longdesc = (
        "Add the entry ADDRESS KEY to a registry (created if missing). On a "
        "server, ADDRESS is where a client may connect from: an IP address, "
        "a CIDR network, or '*' for anywhere. On a client, it is a server's "
        "host name or IP address, so that 'curvetun cat' and curvetun: "
        "endpoint strings find the server's key without key=. KEY is 64 hex "
        "digits or 44 base64 characters. A running server reads the change "
        "at its next connection. Adding an entry that is already there does "
        "nothing (exit 0). A malformed ADDRESS or KEY exits 2."
    )

    address: str
    is_host_name: bool
    key: bytes

    def parseArgs(self, *args: str) -> None:
        _arguments(args, "ADDRESS KEY", 2, 2)
        self.address, self.is_host_name = _address(args[0])
        self.key = _key(args[1])

    def postOptions(self) -> None:
        self["comment"] = self["comment"] or ""
        if "\n" in self["comment"] or "\r" in self["comment"]:
            raise usage.UsageError("--comment must be a single line")


class UntrustOptions(_RegistryOptions):
    """
    C{curvetun untrust}'s command line; the address and key, checked.
    """

    synopsis = "ADDRESS [KEY] [--keydir DIR] [--registry FILE]"
    longdesc = (
        "Remove from a registry the entries for ADDRESS (written in any "
        "form), or only the one with KEY. Every other line stays as it is. "
        "Exit status: 0 if an entry was removed, 1 if none matched (the file "
        "is then unchanged), 2 for a malformed ADDRESS or KEY."
    )

    address: str
    key: bytes | None

    def parseArgs(self, *args: str) -> None:
        _arguments(args, "ADDRESS [KEY]", 1, 2)
        self.address, _ = _address(args[0])
        self.key = _key(args[1]) if len(args) == 2 else None


class PeersOptions(_RegistryOptions):
    """
    C{curvetun peers}'s command line.
    """

    synopsis = "[--keydir DIR] [--registry FILE]"
    longdesc = (
        "List the entries of a registry, one per line in the file's own "
        "format (ADDRESS KEY  # comment), in file order. An empty or missing "
        "registry lists nothing (exit 0)."
    )


class CatOptions(_KeydirOptions):
    """
    C{curvetun cat}'s command line.
    """

    synopsis = "ENDPOINT [--keydir DIR] [--wait SECONDS]"
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
        "(the client's identity) is added to a curvetun: string as keydir= "
        "unless the string has one. Without key=, the server's key is looked "
        "up in the registry of the key directory (see 'curvetun trust'). "
        "Other endpoint strings (tcp:HOST:PORT, ...) work too, unencrypted. "
        "Exit 1 if the connection is refused, the server's key does not "
        "match, this client is not authorized, or the connection fails; exit "
        "2 for a malformed endpoint string."
    )

    endpoint: str
    wait: float

    def parseArgs(self, *args: str) -> None:
        _arguments(args, "ENDPOINT", 1, 1)
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


class BenchOptions(usage.Options):
    """
    C{curvetun bench}: its arguments go as they are to
    L{curvetun.bench.main}, which parses them (C{curvetun bench --help}).
    """

    def parseOptions(self, options: list[str] | None = None) -> None:
        self.argv = list(options or [])


class Options(_Options):
    """
    The command line of C{curvetun}.
    """

    subCommands = [
        ["keygen", None, KeygenOptions, "Create a key pair; print its public key."],
        ["pubkey", None, PubkeyOptions, "Print the public key of a key directory."],
        ["trust", None, TrustOptions, "Add a peer's address and key to a registry."],
        ["untrust", None, UntrustOptions, "Remove a peer's entries from a registry."],
        ["peers", None, PeersOptions, "List the entries of a registry."],
        ["cat", None, CatOptions, "Send standard input to a server; print what it sends."],
        ["bench", None, BenchOptions, "Measure curvetun beside TCP and TLS ('bench --help')."],
    ]
    longdesc = (
        "Run 'curvetun COMMAND --help' for a command's options. Exit status: "
        "0 on success, 1 when the command failed, 2 for a wrong command line."
    )

    def getSynopsis(self) -> str:
        # usage.Options builds a subcommand's synopsis as ours + its name +
        # its own, and would name this program after sys.argv[0], which is
        # __main__.py under "python -m curvetun".
        if self.subCommand is None:
            return "Usage: curvetun COMMAND [options] [arguments]"
        return "Usage: curvetun"

    def postOptions(self) -> None:
        if self.subCommand is None:
            names = ", ".join(_COMMANDS)
            raise usage.UsageError(f"no command given (commands: {names})")


# -- keys ----------------------------------------------------------------------


def keygen(options: KeygenOptions) -> int:
    """
    C{curvetun keygen}: create a key directory, print its public key.
    """
    keydir = options.keydir
    try:
        vault = FileVault.create(keydir, overwrite=options["force"])
    except CurveTunError as error:
        key_files = (SECRET_KEY_FILE, PUBLIC_KEY_FILE, NONCE_KEY_FILE, COUNTER_FILE)
        if not options["force"] and any(
            os.path.exists(os.path.join(keydir, name)) for name in key_files
        ):
            raise CommandFailed(
                f"{error}; to make a new identity anyway, use --force (peers that "
                "trust the old public key will refuse the new one)"
            ) from None
        raise
    # Let the key directory go at once: a server may be started on it next.
    vault.close()
    print(format_public_key(vault.public_key))
    return 0


def pubkey(options: PubkeyOptions) -> int:
    """
    C{curvetun pubkey}: print a key directory's public key.
    """
    keydir = options.keydir
    if not os.path.isdir(keydir):
        raise CommandFailed(
            f"no curvetun key directory at {keydir}: create one with "
            f"'curvetun keygen --keydir {keydir}'"
        )
    # Without the directory's lock: the server using it is the usual
    # reason to want its key.
    print(format_public_key(read_public_key(keydir)))
    return 0


# -- the registry ----------------------------------------------------------------


def trust(options: TrustOptions) -> int:
    """
    C{curvetun trust}: add a registry entry.
    """
    path = options.registry
    line = f"{options.address} {format_public_key(options.key)}"
    if FileRegistry(path).add(options.address, options.key, options["comment"]):
        print(f"added to {path}: {line}")
    else:
        print(f"already in {path}: {line}")
    if options.is_host_name:
        # A newcomer who writes "localhost" would otherwise be refused by
        # the server without a clue.
        sys.stderr.write(
            "curvetun: note: a server admits clients by IP address or network only; "
            "a host-name entry tells a client its server's key\n"
        )
    return 0


def untrust(options: UntrustOptions) -> int:
    """
    C{curvetun untrust}: remove registry entries.
    """
    path = options.registry
    removed = FileRegistry(path).remove(options.address, options.key)
    which = options.address
    if options.key is not None:
        which += f" with key {format_public_key(options.key)}"
    if not removed:
        raise CommandFailed(f"no entry for {which} in {path}; nothing removed")
    print(f"removed {removed} {'entry' if removed == 1 else 'entries'} for {which} from {path}")
    return 0


def peers(options: PeersOptions) -> int:
    """
    C{curvetun peers}: list registry entries.
    """
    path = options.registry
    # Loading checks the whole file first, so that a malformed line is
    # reported with its number instead of being skipped below.
    FileRegistry(path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        lines = []
    except (OSError, UnicodeDecodeError) as error:
        raise CommandFailed(f"cannot read {path}: {error}") from None
    listed = []
    for line in lines:
        for entry in Registry.parse(line, path).entries:
            # Anything after the key is a comment, "#" or not.
            fields = line.split(None, 2)
            comment = fields[2].lstrip("#").strip() if len(fields) == 3 else ""
            listed.append((entry.address, format_public_key(entry.key), comment))
    if not listed:
        sys.stderr.write(f"curvetun: no entries in {path}\n")
    width = max((len(address) for address, _, _ in listed), default=0)
    for address, key, comment in listed:
        print(f"{address:<{width}}  {key}" + (f"  # {comment}" if comment else ""))
    return 0


# -- cat -------------------------------------------------------------------------


def _segments(description: str) -> list[str]:
    """
    Split an endpoint string at its unescaped colons, keeping the escapes
    (Twisted's grammar: a backslash makes the next character literal).

    @raise usage.UsageError: the string ends with a lone backslash.
    """
    segments = [""]
    characters = iter(description)
    for character in characters:
        if character == "\\":
            escaped = next(characters, None)
            if escaped is None:
                raise usage.UsageError(
                    f"bad endpoint {quoted(description)}: it ends with a lone backslash"
                )
            segments[-1] += character + escaped
        elif character == ":":
            segments.append("")
        else:
            segments[-1] += character
    return segments


def _unescape(segment: str) -> str:
    out = []
    characters = iter(segment)
    for character in characters:
        out.append(next(characters, "") if character == "\\" else character)
    return "".join(out)


def _escape(value: str) -> str:
    return "".join("\\" + c if c in "\\:=" else c for c in value)


def _keyword(segments: list[str], name: str) -> str | None:
    """
    The value of the keyword argument C{name} in an endpoint string's
    segments, unescaped; L{None} if it is not there.
    """
    for segment in segments[1:]:
        if segment.startswith(f"{name}="):
            return _unescape(segment[len(name) + 1 :])
    return None


def _target(segments: list[str]) -> str:
    """
    What a client endpoint string connects to, for messages: C{HOST:PORT}
    when it says so plainly, else the string.
    """
    positional = [_unescape(s) for s in segments[1:] if "=" not in s]
    host = _keyword(segments, "host") or (positional.pop(0) if positional else None)
    port = _keyword(segments, "port") or (positional.pop(0) if positional else None)
    if host is None or port is None:
        return ":".join(segments)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _client_description(options: CatOptions) -> tuple[str, str | None]:
    """
    The endpoint string to connect with: C{options.endpoint}, with the key
    directory added as C{keydir=} if it is a C{curvetun:} string that names
    none; and the key directory it uses (L{None} if not a C{curvetun:}
    string).

    @raise usage.UsageError: the string is malformed, or names a key
        directory that --keydir contradicts.
    @raise CommandFailed: there is no key directory to use.
    """
    description = options.endpoint
    segments = _segments(description)
    if _unescape(segments[0]).lower() != "curvetun":
        return description, None
    named = _keyword(segments, "keydir")
    keydir = options.keydir
    if named is not None:
        if options["keydir"] and os.path.expanduser(named) != keydir:
            raise usage.UsageError(
                f"--keydir {keydir} and keydir={named} in the endpoint disagree; give one"
            )
        keydir = os.path.expanduser(named)
    if not os.path.isdir(keydir):
        raise CommandFailed(
            f"no curvetun key directory at {keydir}: create this client's key with "
            f"'curvetun keygen --keydir {keydir}'"
        )
    if named is not None:
        return description, keydir
    return f"{description}:keydir={_escape(keydir)}", keydir


def _client_endpoint(description: str) -> Any:
    """
    Parse a client endpoint string.

    @raise usage.UsageError: it is malformed.
    @raise CommandFailed: it names a key directory or registry that cannot
        be loaded.
    """
    from twisted.internet import reactor
    from twisted.internet.endpoints import clientFromString

    try:
        return clientFromString(reactor, description)
    except ValueError as error:
        # The curvetun: parser reports unusable key files as ValueErrors
        # caused by the curvetun error: not the command line's fault.
        if isinstance(error.__cause__, CurveTunError):
            raise CommandFailed(str(error)) from None
        raise usage.UsageError(f"bad endpoint: {error}") from None
    except (TypeError, KeyError, IndexError, RuntimeError) as error:
        # Twisted's own parsers (tcp:, unix:, ...) fail this way on
        # missing, surplus or unknown arguments.
        raise usage.UsageError(f"bad endpoint {quoted(description)}: {error!r}") from None


def describe_failure(error: BaseException, target: str, keydir: str | None = None) -> str:
    """
    One line that says why a connection to C{target} failed or ended badly.

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
        _error(describe(error))
        raise SystemExit(1) from None


def cat(options: CatOptions) -> int:
    """
    C{curvetun cat}: a netcat for curvetun.
    """
    from twisted.internet.task import react

    description, keydir = _client_description(options)
    endpoint = _client_endpoint(description)
    target = _target(_segments(description))

    def describe(error: BaseException) -> str:
        return describe_failure(error, target, keydir)

    react(_run_cat, (endpoint, options.wait, describe))


# -- main ------------------------------------------------------------------------

_COMMANDS: dict[str, Callable[[Any], int]] = {
    "keygen": keygen,
    "pubkey": pubkey,
    "trust": trust,
    "untrust": untrust,
    "peers": peers,
    "cat": cat,
    "bench": lambda options: _bench(options.argv),
}


def _bench(argv: list[str]) -> int:
    from . import bench

    return bench.main(argv)


def run(argv: list[str]) -> int:
    """
    Run the command line C{argv} (without the program name).

    @return: the exit status.
    """
    options = Options()
    try:
        options.parseOptions(argv)
    except usage.UsageError as error:
        command = getattr(options, "subCommand", None)
        helper = f"curvetun {command} --help" if command else "curvetun --help"
        _error(f"{error} (see '{helper}')")
        return 2
    except SystemExit as exit:
        # --help and --version print, then exit.
        return exit.code if isinstance(exit.code, int) else 0
    command = options.subCommand
    assert command is not None  # postOptions refuses a missing command
    try:
        return _COMMANDS[command](options.subOptions)
    except usage.UsageError as error:
        _error(f"{error} (see 'curvetun {options.subCommand} --help')")
        return 2
    except (CommandFailed, CurveTunError) as error:
        _error(str(error))
        return 1
    except BrokenPipeError:
        raise  # for main
    except OSError as error:
        where = f"{error.filename}: " if error.filename else ""
        _error(f"{where}{error.strerror or error}")
        return 1


def main() -> NoReturn:
    """
    The C{curvetun} console script.
    """
    try:
        status = run(sys.argv[1:])
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader of our output went away (curvetun peers | head -1):
        # nothing to report. Python would still fail to flush standard
        # output at exit, so point it at /dev/null (the signal module
        # documentation's recipe).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = 1
    sys.exit(status)
