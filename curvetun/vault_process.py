"""
The vault process: the only process that reads a key directory's secret
key. It answers the handshake questions of curvetun workers
(L{curvetun.vault_protocol}) on a UNIX socket.

    python -m curvetun.vault_process --keydir DIR --socket PATH [--create] [--supervised]

With C{--create}, a key directory that holds no key yet is made, with a
new key, here: the new secret key, too, exists in this process only.
The socket is made with mode 0600 in a directory of mode 0700 (created if
missing; refused if group or others may enter it): only the user the
workers run as can ask. A stale socket left by a killed vault is replaced
(Twisted's C{wantPID} lock file tells a live vault from a dead one). The
key directory's lock is held while the process runs, so no second vault
(nor a single-process server) hands out nonces from the same counter.

With C{--supervised} (the C{--workers} supervisor gives it) the vault's
standard input is a pipe from its supervisor, and the vault stops when
that pipe ends: a supervisor killed with SIGKILL leaves no vault behind
holding the key directory's lock (the workers stop the same way, when
their control channel closes).

A request the vault cannot parse is logged in one line and answered with
an error (C{BAD_REQUEST}); a connection that breaks the AMP framing is
logged and closed; the vault goes on serving every other connection.

Exit status: 64 for a bad option, 78 (C{EX_CONFIG}) for an unusable key
directory or socket directory, 69 (C{EX_UNAVAILABLE}) when the socket
cannot be bound; 0 after SIGTERM or SIGINT.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import sys
from collections.abc import Callable
from typing import Any, ClassVar

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.error import CannotListenError, ConnectionLost
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python import usage
from twisted.python.failure import Failure

from curvetun.errors import BadPacket, CurveTunError, KeyFileError
from curvetun.handshake import EphemeralKeyPair
from curvetun.handshake_vault import (
    SAFE_NONCE_SIZE,
    answer_hello,
    one_cookie_key,
    open_inner_vouch,
    seal_inner_vouch,
)
from curvetun.interfaces import IVault
from curvetun.keys import KEY_SIZE
from curvetun.packets import HELLO_SIZE, Hello, parse_as
from curvetun.vault_protocol import (
    BAD_PACKET,
    BAD_REQUEST,
    HELLO_REQUEST_SIZE,
    LENGTH,
    OPEN_VOUCH_REQUEST_SIZE,
    SEAL_VOUCH_REQUEST_SIZE,
    VAULT_FAILED,
    BoxReader,
    GetPublicKey,
    OpenHelloAndSealCookie,
    OpenVouch,
    SealVouch,
)

EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_CONFIG = 78


class VaultProcessError(CurveTunError):
    """
    The vault process cannot start: its socket directory is unsafe or
    cannot be made.
    """


def _key(key: bytes) -> bytes:
    return LENGTH.pack(len(key)) + key


def _value(value: bytes) -> bytes:
    return LENGTH.pack(len(value)) + value


_ANSWER = _key(amp.ANSWER)


class VaultProtocol(BoxReader):
    """
    One worker's connection to the vault: answers the commands of
    L{curvetun.vault_protocol} with the vault's key.
    """

    log = Logger()

    def __init__(self, vault: IVault) -> None:
        super().__init__()
        self._vault = vault
        # The handshake steps, answered without AMP's responder machinery
        # (locating the responder, converting each argument and answer,
        # three Deferreds a call): see ampBoxReceived.
        self._steps: dict[bytes, tuple[Callable[[bytes], bytes], bytes]] = {
            OpenHelloAndSealCookie.commandName: (self._answer_hello, _key(b"cookie")),
            OpenVouch.commandName: (self._open_vouch, _key(b"plaintext")),
            SealVouch.commandName: (self._seal_vouch, _key(b"vouch")),
        }

    @GetPublicKey.responder
    def get_public_key(self) -> dict[str, bytes]:
        return {"public_key": self._vault.public_key}

    @OpenHelloAndSealCookie.responder
    def open_hello_and_seal_cookie(self, request: bytes) -> dict[str, bytes]:
        return {"cookie": self._answer_hello(request)}

    @OpenVouch.responder
    def open_vouch(self, request: bytes) -> dict[str, bytes]:
        return {"plaintext": self._open_vouch(request)}

    @SealVouch.responder
    def seal_vouch(self, request: bytes) -> dict[str, bytes]:
        return {"vouch": self._seal_vouch(request)}

    def _answer_hello(self, request: bytes) -> bytes:
        if len(request) != HELLO_REQUEST_SIZE:
            raise BadPacket(f"the hello request is {HELLO_REQUEST_SIZE} bytes")
        secret = HELLO_SIZE + KEY_SIZE
        cookie_key = secret + KEY_SIZE
        return answer_hello(
            self._vault,
            parse_as(request[:HELLO_SIZE], Hello),
            EphemeralKeyPair(request[HELLO_SIZE:secret], request[secret:cookie_key]),
            one_cookie_key(request[cookie_key:]),
        )

    def _open_vouch(self, request: bytes) -> bytes:
        if len(request) != OPEN_VOUCH_REQUEST_SIZE:
            raise BadPacket("vouch does not verify")
        nonce_end = KEY_SIZE + SAFE_NONCE_SIZE
        return open_inner_vouch(
            self._vault, request[:KEY_SIZE], request[KEY_SIZE:nonce_end], request[nonce_end:]
        )

    def _seal_vouch(self, request: bytes) -> bytes:
        if len(request) != SEAL_VOUCH_REQUEST_SIZE:
            raise BadPacket(f"the vouch request is {SEAL_VOUCH_REQUEST_SIZE} bytes")
        vouch_nonce, inner_box = seal_inner_vouch(
            self._vault, request[:KEY_SIZE], request[KEY_SIZE:]
        )
        return vouch_nonce + inner_box

    def _answer_step(
        self, box: amp.AmpBox, step: Callable[[bytes], bytes], answer_key: bytes
    ) -> None:
        # answer_key: the answer's key, with its length, as it goes on the wire.
        """
        Answer a handshake step at once, with the very boxes AMP's responder
        would send: the answer, or the error its command declares.
        """
        tag = box[amp.ASK]
        try:
            value = step(box[b"request"])
        except CurveTunError as error:
            code = BAD_PACKET if isinstance(error, BadPacket) else VAULT_FAILED
            reply = amp.AmpBox(
                {
                    amp.ERROR: tag,
                    amp.ERROR_CODE: code,
                    amp.ERROR_DESCRIPTION: str(error).encode("utf-8", "replace"),
                }
            )
        except Exception:
            self._log_bad_request(box[amp.COMMAND], Failure())
            reply = amp.AmpBox(
                {amp.ERROR: tag, amp.ERROR_CODE: BAD_REQUEST, amp.ERROR_DESCRIPTION: b"bad request"}
            )
        else:
            # The answer box, serialised in one join (as AmpBox.serialize
            # would write it: both are small, fixed-size values).
            if self.transport is not None:
                self.transport.write(
                    b"".join(
                        (
                            _ANSWER,
                            LENGTH.pack(len(tag)),
                            tag,
                            answer_key,
                            _value(value),
                            b"\x00\x00",
                        )
                    )
                )
            return
        with contextlib.suppress(amp.ProtocolSwitched, ConnectionLost):
            self.sendBox(reply)

    # Hostile or broken input: one line in the log, never a traceback.

    def dispatchCommand(self, box: amp.AmpBox) -> Deferred[Any]:
        """
        Answer a command; a request that does not parse (a missing or
        unknown argument, a responder's unexpected error) becomes the error
        answer C{BAD_REQUEST} and one log line, instead of AMP's logged
        traceback and dropped connection.
        """
        command = box.get(amp.COMMAND, b"?")

        def bad_request(failure: Failure) -> Failure:
            if failure.check(amp.RemoteAmpError):
                return failure  # a declared error (BAD_PACKET, ...) or an unknown command
            self._log_bad_request(command, failure)
            return Failure(amp.RemoteAmpError(BAD_REQUEST, "bad request"))

        result: Deferred[Any] = super().dispatchCommand(box)
        result.addErrback(bad_request)
        return result

    def _log_bad_request(self, command: bytes, failure: Failure) -> None:
        kind = failure.type.__name__ if failure.type is not None else "error"
        what = f"{kind}: {failure.getErrorMessage()}"[:200]
        self.log.warn(
            "Vault: bad {command} request: {what}",
            command=command.decode("ascii", "replace")[:40],
            what=what,
        )

    def ampBoxReceived(self, box: amp.AmpBox) -> None:
        """
        The vault only answers: a box that is not a command (an answer to a
        question it never asked, an empty box) is a broken peer.

        A handshake step asked as the worker asks it (its command, a tag and
        the one argument C{request}) is answered here at once; any other
        command goes through AMP's dispatch, which answers it the same way.
        """
        if amp.COMMAND in box:
            step = self._steps.get(box[amp.COMMAND])
            if step is not None and len(box) == 3 and amp.ASK in box and b"request" in box:
                self._answer_step(box, *step)
                return
            super().ampBoxReceived(box)
            return
        self.log.warn("Vault: a box that is not a command; closing that connection")
        if self.transport is not None:
            self.transport.loseConnection()

    def lengthLimitExceeded(self, length: int) -> None:
        """
        A key longer than AMP allows: the framing is broken.
        """
        self.log.warn("Vault: an AMP key of {length} bytes; closing that connection", length=length)
        super().lengthLimitExceeded(length)


class VaultFactory(Factory):
    """
    Makes a L{VaultProtocol} over one vault for each worker that connects.
    """

    def __init__(self, vault: IVault) -> None:
        self.vault = vault

    def buildProtocol(self, addr: Any) -> VaultProtocol:
        protocol = VaultProtocol(self.vault)
        protocol.factory = self
        return protocol


def prepare_socket_directory(socket_path: str) -> None:
    """
    Make sure the directory of C{socket_path} exists and that only its
    owner may enter it: the socket's own mode is set only after it is
    bound, and the directory keeps others out meanwhile.

    @raise VaultProcessError: it cannot be made, is not a directory, or
        group or others may enter it.
    """
    directory = os.path.dirname(os.path.abspath(socket_path))
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        info = os.stat(directory)
    except OSError as e:
        raise VaultProcessError(
            f"cannot make the socket directory {directory}: {e.strerror}"
        ) from e
    if not stat.S_ISDIR(info.st_mode):
        raise VaultProcessError(f"{directory} is not a directory")
    mode = info.st_mode & 0o777
    if mode & 0o077:
        raise VaultProcessError(
            f"{directory} is accessible to group or others (mode {mode:04o}); "
            f"run: chmod 700 {directory}"
        )


class VaultProcessService(MultiService):
    """
    The vault process as a service: a vault (a child service when it is
    one, as L{curvetun.vault.FileVault} is) and the UNIX socket that
    answers for it.

    @ivar vault: the vault.
    @ivar socket_path: where it listens.
    """

    log = Logger()

    def __init__(self, vault: IVault, socket_path: str, reactor: Any = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.vault = vault
        self.socket_path = socket_path
        if IService.providedBy(vault):
            IService(vault).setServiceParent(self)
        self._endpoint = UNIXServerEndpoint(reactor, socket_path, mode=0o600, wantPID=True)
        self._factory = VaultFactory(vault)
        self._port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        """
        Make the socket directory safe and bind the socket, raising at once
        if either fails: a vault that cannot listen must exit, so that its
        supervisor sees it, rather than log and wait.

        @raise VaultProcessError: the socket directory is unsafe.
        @raise twisted.internet.error.CannotListenError: the socket cannot
            be bound.
        """
        prepare_socket_directory(self.socket_path)
        super().privilegedStartService()
        failures: list[Failure] = []
        # A UNIX endpoint binds during listen(): the Deferred has fired.
        self._endpoint.listen(self._factory).addCallbacks(self._listening, failures.append)
        if failures:
            failures[0].raiseException()

    def _listening(self, port: IListeningPort) -> None:
        self._port = port

    def stopService(self) -> Deferred[None] | None:
        """
        Stop answering; the key directory's lock goes with the process.
        """
        super().stopService()
        port, self._port = self._port, None
        if port is None:
            return None
        stopped: Deferred[None] | None = port.stopListening()
        return stopped

    @classmethod
    def from_keydir(
        cls,
        keydir: str,
        socket_path: str,
        reactor: Any = None,
        create: bool = False,
        statedir: str | None = None,
        instance: int | None = None,
    ) -> VaultProcessService:
        """
        Load the key directory C{keydir} (holding its lock) and serve it on
        C{socket_path}.

        @param create: make the key directory, with a new key, if it holds
            no secret key yet (so that the new key is made, too, in the only
            process that may hold it).
        @param statedir: where the nonce counters live (C{--statedir}).
        @param instance: this host's part of the counter space
            (C{--instance}): the vault is the only process that makes
            nonces, so the instance is its.
        @raise KeyFileError: the key directory does not load.
        """
        from curvetun.keydir import SECRET_KEY_FILE
        from curvetun.server_keys import ServerKeys
        from curvetun.vault import FileVault

        if create and not os.path.exists(os.path.join(keydir, SECRET_KEY_FILE)):
            FileVault.create(keydir).close()
            cls.log.info("Created key directory {keydir} with a new key", keydir=keydir)
        # The current key and, during a rollover, the previous one: hellos
        # to either are answered (current first).
        return cls(ServerKeys(keydir, statedir, instance), socket_path, reactor)


class Options(usage.Options):
    """
    The options of C{python -m curvetun.vault_process}.
    """

    synopsis = (
        "--keydir DIR --socket PATH [--create] [--statedir DIR] [--instance ID] [--supervised]"
    )
    optFlags: ClassVar[list[list[str | None]]] = [
        ["create", None, "Create the key directory if it holds no key yet."],
        ["supervised", None, "Standard input is a pipe from the supervisor: stop when it ends."],
    ]
    optParameters: ClassVar[list[list[str | None]]] = [
        ["keydir", None, None, "The key directory whose secret key this process holds."],
        ["socket", None, None, "The UNIX socket to answer on (mode 0600, directory 0700)."],
        ["statedir", None, None, "The directory of the nonce counters and the lock."],
        ["instance", None, None, "This host's instance ID (0 to 65535), for a shared key."],
    ]

    def postOptions(self) -> None:
        for name in ("keydir", "socket"):
            if not self[name]:
                raise usage.UsageError(f"--{name} is required")
        if self["instance"] is not None:
            from curvetun.config import parse_count
            from curvetun.keydir import MAX_INSTANCE

            try:
                self["instance"] = parse_count("--instance", self["instance"])
            except ValueError as error:
                raise usage.UsageError(str(error)) from None
            if self["instance"] > MAX_INSTANCE:
                raise usage.UsageError(f"--instance must be from 0 to {MAX_INSTANCE}")


def main(argv: list[str] | None = None, reactor: Any = None) -> int:
    """
    Run the vault process until SIGTERM or SIGINT.

    @return: the exit status.
    """
    from twisted.logger import globalLogBeginner, textFileLogObserver

    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as error:
        sys.stderr.write(f"curvetun vault: {error}\n")
        return EX_USAGE
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    try:
        service = VaultProcessService.from_keydir(
            options["keydir"],
            options["socket"],
            reactor,
            create=bool(options["create"]),
            statedir=options["statedir"],
            instance=options["instance"],
        )
    except KeyFileError as error:
        sys.stderr.write(f"curvetun vault: {error}\n")
        return EX_CONFIG
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    # The socket accepts from privilegedStartService on, before the
    # reactor runs and installs its own handlers: a SIGTERM or SIGINT
    # meanwhile (a supervisor stopping at once) must stop it cleanly too,
    # not end it by the signal's default action.
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: reactor.callFromThread(reactor.stop))
    try:
        service.privilegedStartService()
    except VaultProcessError as error:
        sys.stderr.write(f"curvetun vault: {error}\n")
        return EX_CONFIG
    except CannotListenError as error:
        sys.stderr.write(f"curvetun vault: cannot listen on {options['socket']}: {error}\n")
        return EX_UNAVAILABLE
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    if options["supervised"]:
        from twisted.internet.stdio import StandardIO

        StandardIO(_StopWhenTheSupervisorIsGone(reactor), reactor=reactor)
    reactor.run()
    return 0


class _StopWhenTheSupervisorIsGone(Protocol):
    """
    Reads the pipe from the supervisor on standard input (nothing is sent
    on it); its end means the supervisor is gone: stop the reactor, and
    with it the vault (its socket is removed and its lock released).
    """

    log = Logger()

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._reactor.running:
            self.log.info("The supervisor is gone (its pipe closed): stopping")
            self._reactor.stop()


if __name__ == "__main__":
    sys.exit(main())
