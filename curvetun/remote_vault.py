"""
L{RemoteVault}: L{IHandshakeVault} answered by a vault process
(L{curvetun.vault_process}) over AMP on a UNIX socket.

A worker never reads a key file: it learns the vault's public key over
the socket when it starts, and checks it again on every reconnection (a
vault restarted on another key directory is refused). Calls are
pipelined: many handshakes wait on the one connection at once, each
answered by its AMP tag. Each call has a timeout; a vault that is down,
restarting, slow or confused fails the handshake that asked with
L{VaultUnavailable}, or L{BadPacket} when the vault says the peer's box
does not verify. An answer is used only if it has the right shape, and
the inner vouch's plaintext is compared with the cookie's C{EC} here, in
the worker, so that no answer that did not verify (nor one meant for
another question) ever passes.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from curvetun.errors import BadPacket, CurveTunError
from curvetun.handshake import CookieSealer, EphemeralKeyPair, OpenedVouch
from curvetun.handshake_vault import (
    SAFE_NONCE_SIZE,
    IHandshakeVault,
    VaultUnavailable,
    check_inner_vouch,
)
from curvetun.keys import KEY_SIZE, fingerprint, keys_equal
from curvetun.packets import COOKIE_SIZE, Cookie, Hello, parse_as
from curvetun.vault_protocol import (
    BAD_PACKET,
    SEAL_VOUCH_ANSWER_SIZE,
    VAULT_FAILED,
    BoxReader,
    GetPublicKey,
    OpenHelloAndSealCookie,
    OpenVouch,
    SealVouch,
)
from curvetun.vault_protocol import (
    LENGTH as _LENGTH,
)

DEFAULT_CALL_TIMEOUT = 5.0
"""
Seconds a handshake waits for the vault (including a reconnection) before
it fails.
"""

FIRST_RETRY_DELAY = 0.05
"""Seconds between a failed attempt to reach the vault and the next one."""

_T = TypeVar("_T")
_LOST = Failure(ConnectionDone())


def _declared_error(code: bytes, description: str) -> Failure:
    """
    The exception a command's declared error code stands for (what
    C{callRemote} would raise).
    """
    kind = _ERROR_TYPES.get(code, amp.UnknownRemoteError)
    return Failure(kind(description))


_ERROR_TYPES: dict[bytes, type[Exception]] = {BAD_PACKET: BadPacket, VAULT_FAILED: CurveTunError}
_ASK = _LENGTH.pack(len(amp.ASK)) + amp.ASK
_REQUEST = _LENGTH.pack(len(b"request")) + b"request"


_COMMAND_KEYS: dict[type[amp.Command], bytes] = {
    command: b"".join(
        (
            _LENGTH.pack(len(amp.COMMAND)),
            amp.COMMAND,
            _LENGTH.pack(len(command.commandName)),
            command.commandName,
        )
    )
    for command in (OpenHelloAndSealCookie, OpenVouch, SealVouch)
}
"""Each step's command, as the first key and value of its box."""


class _Call(Generic[_T]):
    """
    One question to the vault, from when it is asked until it is answered,
    fails or times out (whichever comes first: C{done}).
    """

    __slots__ = ("answer", "command", "deadline", "done", "request", "result")

    def __init__(
        self,
        command: type[amp.Command],
        request: bytes,
        answer: Callable[[amp.AmpBox], _T],
        deadline: float,
    ) -> None:
        self.command = command
        self.request = request
        self.answer = answer
        self.deadline = deadline
        self.done = False
        self.result: Deferred[_T] = Deferred(self._cancel)

    def _cancel(self, result: Deferred[_T]) -> None:
        # The handshake that asked is gone: drop the answer when it comes.
        if not self.done:
            self.done = True
            result.errback(RemoteVault._unavailable(self.command, "cancelled"))


class _VaultClient(BoxReader):
    """
    The worker's end of the AMP connection. An answer to no question (the
    vault never asks) is a broken vault: log it and drop the connection.

    @ivar lost: fires when the connection is gone.
    """

    log = Logger()

    def __init__(self) -> None:
        super().__init__()
        self.lost: Deferred[None] = Deferred()
        self.asked: dict[bytes, _Call[Any]] = {}
        self.replied: Callable[[amp.AmpBox, _Call[Any]], None] = lambda box, call: None
        self._tags = itertools.count()
        self._gone = False

    def ask(self, call: _Call[Any]) -> bool:
        """
        Send C{call}'s question, unless the connection is gone: the box
        AMP's C{callRemoteString} would send, built here in one join, and
        its answer handed to C{replied} without a Deferred of AMP's. Its
        tags (C{v0}, C{v1}, ...) are not AMP's own (hex numbers), which
        asks C{GetPublicKey}.

        @return: whether it was sent.
        """
        if self._gone or self.transport is None:
            return False
        tag = b"v%x" % next(self._tags)
        self.asked[tag] = call
        request = call.request
        self.transport.write(
            b"".join(
                (
                    _COMMAND_KEYS[call.command],
                    _ASK,
                    _LENGTH.pack(len(tag)),
                    tag,
                    _REQUEST,
                    _LENGTH.pack(len(request)),
                    request,
                    b"\x00\x00",
                )
            )
        )
        return True

    def ampBoxReceived(self, box: amp.AmpBox) -> None:
        tag = box.get(amp.ANSWER, box.get(amp.ERROR))
        call = self.asked.pop(tag, None) if tag is not None else None
        if call is not None:
            self.replied(box, call)
            return
        try:
            super().ampBoxReceived(box)
        except (KeyError, amp.NoEmptyBoxes):
            self.log.warn("Vault sent a box that answers no question; reconnecting")
            if self.transport is not None:
                self.transport.loseConnection()

    def connectionLost(self, reason: Failure = _LOST) -> None:
        self._gone = True
        super().connectionLost(reason)
        self.lost.callback(None)


@implementer(IHandshakeVault)
class RemoteVault:
    """
    A vault process, reached through C{endpoint} (a UNIX client endpoint
    to its socket). Make one with L{RemoteVault.connect}.

    While started it keeps one connection to the vault, and reconnects
    when it is lost, waiting L{FIRST_RETRY_DELAY} after a failed attempt
    and twice as long after each further one, up to C{max_retry_delay}.
    (Twisted's C{ClientService} would do the reconnecting, but a
    connection that its C{prepareConnection} rejects, as this one rejects a
    vault with another key, stays open there and breaks its state machine
    when it closes.)

    @ivar public_key: the vault's long-term public key, as it said when
        this worker first connected.
    @ivar timeout: seconds each call may take.
    """

    log = Logger()

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        clock: IReactorTime,
        timeout: float = DEFAULT_CALL_TIMEOUT,
        max_retry_delay: float = 1.0,
    ) -> None:
        """
        Do not use it before L{start} has fired; L{connect} does both.

        @param max_retry_delay: the longest wait between two attempts to
            reach a vault that is down.
        """
        self.public_key = b""
        self.timeout = timeout
        self._endpoint = endpoint
        self._clock = clock
        self._max_retry_delay = max_retry_delay
        self._running = False
        self._connected: _VaultClient | None = None
        self._waiting: list[Deferred[_VaultClient]] = []
        self._pending: Deferred[Any] | None = None
        self._loop: Deferred[None] | None = None
        self._calls: deque[_Call[Any]] = deque()
        self._unsent: list[_Call[Any]] = []
        self._timer: IDelayedCall | None = None

    @classmethod
    async def connect(
        cls,
        endpoint: IStreamClientEndpoint,
        clock: IReactorTime,
        timeout: float = DEFAULT_CALL_TIMEOUT,
        start_timeout: float = 30.0,
    ) -> RemoteVault:
        """
        Connect to the vault and learn its public key.

        @param start_timeout: how long to wait for a vault that is not up
            yet (a worker may start before the vault has bound its socket).
        @raise VaultUnavailable: no vault answered in time.
        """
        vault = cls(endpoint, clock, timeout)
        await vault.start(start_timeout)
        return vault

    async def start(self, start_timeout: float = 30.0) -> None:
        """
        Start connecting, and wait until the vault has said its public key.

        @raise VaultUnavailable: no vault answered within C{start_timeout}.
        """
        self._running = True
        self._loop = Deferred.fromCoroutine(self._keep_connected())
        waiting = self._when_connected()
        waiting.addTimeout(start_timeout, self._clock)
        try:
            await waiting
        except TimeoutError:
            await self.stop()
            raise VaultUnavailable(f"no vault answered within {start_timeout:g} seconds") from None

    async def stop(self) -> None:
        """
        Close the connection to the vault and stop reconnecting; calls still
        waiting fail with L{VaultUnavailable}.
        """
        self._running = False
        self._fail_all("stopped")
        if self._pending is not None:
            self._pending.cancel()
        connected = self._connected
        if connected is not None and connected.transport is not None:
            connected.transport.loseConnection()
        if self._loop is not None:
            await self._loop
        waiting, self._waiting = self._waiting, []
        for each in waiting:
            each.cancel()

    def _when_connected(self) -> Deferred[_VaultClient]:
        if self._connected is not None:
            return succeed(self._connected)

        def forget(waiter: Deferred[_VaultClient]) -> None:
            if waiter in self._waiting:
                self._waiting.remove(waiter)

        waiter: Deferred[_VaultClient] = Deferred(forget)
        self._waiting.append(waiter)
        return waiter

    async def _keep_connected(self) -> None:
        delay = FIRST_RETRY_DELAY
        while self._running:
            client: _VaultClient | None
            try:
                connecting: Deferred[Any] = self._endpoint.connect(
                    Factory.forProtocol(_VaultClient)
                )
                client = await self._wait_on(connecting)
            except Exception:
                client = None
            if client is not None:
                client.replied = self._replied
            if client is not None and await self._accept(client):
                delay = FIRST_RETRY_DELAY
                self._connected = client
                waiting, self._waiting = self._waiting, []
                for each in waiting:
                    each.callback(client)
                unsent, self._unsent = self._unsent, []
                for call in unsent:
                    if not call.done:
                        self._send(call)
                await client.lost
                self._connected = None
                # The vault went away (it is restarting): the calls it did
                # not answer ask the next one, within their timeouts. Asking
                # again is safe: each question makes its own nonce, and no
                # answer on the lost connection can come any more.
                self._unsent.extend(call for call in client.asked.values() if not call.done)
                client.asked.clear()
                continue
            if client is not None and client.transport is not None:
                client.transport.loseConnection()
            if not self._running:
                break
            with contextlib.suppress(CancelledError):
                await self._wait_on(deferLater(self._clock, delay, lambda: None))
            delay = min(2 * delay, self._max_retry_delay)

    def _wait_on(self, pending: Deferred[_T]) -> Deferred[_T]:
        # Remember what the loop waits on, so that stop() can cancel it.
        self._pending = pending

        def done(result: _T | Failure) -> _T | Failure:
            self._pending = None
            return result

        return pending.addBoth(done)

    async def _accept(self, client: _VaultClient) -> bool:
        """
        Before any question on a new connection: the vault must hold the key
        this worker has served since it started.
        """
        asking = client.callRemote(GetPublicKey)
        asking.addTimeout(self.timeout, self._clock)
        try:
            answer = await asking
        except Exception:
            return False
        public_key = answer["public_key"]
        if not self.public_key:
            if len(public_key) != KEY_SIZE:
                self.log.error("The vault's public key has the wrong size: refusing it")
                return False
            self.public_key = public_key
            return True
        if not keys_equal(public_key, self.public_key):
            self.log.error(
                "The vault now holds key {new}, not {old}: refusing it",
                new=fingerprint(public_key),
                old=fingerprint(self.public_key),
            )
            return False
        return True

    def _call(
        self,
        command: type[amp.Command],
        request: bytes,
        answer: Callable[[amp.AmpBox], _T],
    ) -> Deferred[_T]:
        """
        Ask the vault C{command} with C{request}, waiting for a connection
        if there is none, and fire with C{answer(the vault's answer)}; fail
        with L{BadPacket} if the vault or C{answer} says so, otherwise with
        L{VaultUnavailable}.
        """
        call: _Call[_T] = _Call(command, request, answer, self._clock.seconds() + self.timeout)
        self._calls.append(call)
        if self._timer is None:
            self._timer = self._clock.callLater(self.timeout, self._expire)
        self._send(call)
        return call.result

    def _send(self, call: _Call[Any]) -> None:
        client = self._connected
        if client is None or not client.ask(call):
            self._unsent.append(call)

    def _replied(self, box: amp.AmpBox, call: _Call[Any]) -> None:
        if call.done:
            return  # timed out or cancelled: the late answer is dropped
        call.done = True
        self._forget_answered()
        if amp.ANSWER not in box:
            description = box.get(amp.ERROR_DESCRIPTION, b"").decode("utf-8", "replace")
            failure = _declared_error(box.get(amp.ERROR_CODE, b""), description)
            call.result.errback(self._as_handshake_failure(failure, call.command))
            return
        try:
            value = call.answer(box)
        except Exception:
            call.result.errback(self._as_handshake_failure(Failure(), call.command))
            return
        call.result.callback(value)

    def _forget_answered(self) -> None:
        # The vault answers in turn, so the oldest call is usually the one
        # just answered: drop the answered ones from the front at once, and
        # the list holds only the calls still waiting.
        calls = self._calls
        while calls and calls[0].done:
            calls.popleft()

    def _expire(self) -> None:
        """
        Fail every call whose time is up. Every call waits the same
        C{timeout}, so the calls expire in the order they were made: one
        timer, set for the oldest waiting call, serves them all (rather
        than one timer made and cancelled per call).
        """
        self._timer = None
        now = self._clock.seconds()
        calls = self._calls
        expired = []
        while calls and (calls[0].done or calls[0].deadline <= now):
            call = calls.popleft()
            if not call.done:
                call.done = True
                expired.append(call)
        if calls:
            self._timer = self._clock.callLater(max(0.0, calls[0].deadline - now), self._expire)
        # Fail them only now: a failure's callbacks may ask again at once,
        # and find the timer set.
        reason = f"no answer within {self.timeout:g} seconds"
        for call in expired:
            call.result.errback(self._unavailable(call.command, reason))

    def _fail_all(self, reason: str) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        calls, self._calls = self._calls, deque()
        self._unsent = []
        for call in calls:
            if not call.done:
                call.done = True
                call.result.errback(self._unavailable(call.command, reason))

    def _as_handshake_failure(self, failure: Failure, command: type[amp.Command]) -> Failure:
        if failure.check(BadPacket):
            return failure
        if failure.check(CurveTunError):
            reason = f"the vault failed: {failure.getErrorMessage()}"[:200]
        else:
            reason = f"{failure.type.__name__ if failure.type else 'error'}"
        return self._unavailable(command, reason)

    @staticmethod
    def _unavailable(command: type[amp.Command], reason: str) -> Failure:
        return Failure(VaultUnavailable(f"vault {command.commandName.decode()}: {reason}"))

    def open_hello_and_seal_cookie(
        self, hello: Hello, ephemeral: EphemeralKeyPair, cookie_keys: CookieSealer
    ) -> Deferred[bytes]:
        """
        See L{IHandshakeVault.open_hello_and_seal_cookie}.
        """

        def cookie(answer: amp.AmpBox) -> bytes:
            payload: bytes = answer[b"cookie"]
            if len(payload) != COOKIE_SIZE:
                raise VaultUnavailable("the vault's cookie has the wrong size")
            try:
                parse_as(payload, Cookie)
            except BadPacket:
                raise VaultUnavailable("the vault's cookie is not a cookie packet") from None
            return payload

        request = b"".join(
            (
                hello.to_bytes(),
                ephemeral.public_key,
                ephemeral.secret_key,
                cookie_keys.current_key(),
            )
        )
        return self._call(OpenHelloAndSealCookie, request, cookie)

    def open_vouch(self, opened: OpenedVouch) -> Deferred[None]:
        """
        See L{IHandshakeVault.open_vouch}.
        """

        def verified(answer: amp.AmpBox) -> None:
            check_inner_vouch(opened, answer[b"plaintext"])

        request = opened.client_key + opened.vouch_nonce + opened.inner_box
        return self._call(OpenVouch, request, verified)

    def seal_vouch(
        self, client_ephemeral_key: bytes, server_key: bytes
    ) -> Deferred[tuple[bytes, bytes]]:
        """
        See L{IHandshakeVault.seal_vouch}.
        """

        def sealed(answer: amp.AmpBox) -> tuple[bytes, bytes]:
            vouch: bytes = answer[b"vouch"]
            if len(vouch) != SEAL_VOUCH_ANSWER_SIZE:
                raise VaultUnavailable("the vault's vouch has the wrong size")
            return vouch[:SAFE_NONCE_SIZE], vouch[SAFE_NONCE_SIZE:]

        return self._call(SealVouch, client_ephemeral_key + server_key, sealed)

    def __repr__(self) -> str:
        who = fingerprint(self.public_key) if self.public_key else "(not connected)"
        return f"<RemoteVault {who}>"
