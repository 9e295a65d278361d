"""
The handshake state machines of protocol v1.0, built with Automat.

    server: ready -> accepting -> connected
    client: ready -> initiating -> vouched -> connected
    either: any state -> closed

They do no I/O and no parsing, and they never see a message. The transport
(L{curvetun.transport}) parses each handshake frame into the one packet type
the machine said it expects next (L{ConnectionOwner.expect_packet}) and
feeds it in; the machines answer through their L{ConnectionOwner}: send a
frame, expect a packet, hand over the established session, disconnect,
report the connection lost.

A machine's work ends at L{ConnectionOwner.established}: from there the
owner's established phase (L{curvetun.established.Established}) holds the
session and is the only thing that seals and opens messages. The machine
stays in charge of one fact only it can judge, and of closing:

  - The server is sure of its peer when the vouch verifies: it reports the
    handshake confirmed at once.
  - The client is vouched when it has sent its vouch (its application may
    send from then on, as TCP delivers the vouch first), but it knows that
    the server accepted the vouch only when a message from the server
    opens: only that server can seal to our C{EC} with its C{ES}. So the
    client machine hands its owner, with the session, a callable to report
    the first message opened (C{message_opened}); the established phase
    calls it once, before delivering that message, and the machine moves
    from C{vouched} to C{connected} and reports the handshake confirmed.

Where an input's outcome depends on a verification, the state loops on the
public input, does the (pure) checks from L{curvetun.handshake} that need no
long-term key, asks the vault (L{curvetun.handshake_vault.IHandshakeVault})
the one question of the step, and calls one private input with the answer:
C{_rejected} on failure, otherwise the input that carries the answer (the
cookie, the vouch, the session) and moves on. The frames are sent in those
private transitions, never in the public ones.

The in-process vault answers at once, during the call
(L{curvetun.handshake_vault.IImmediateHandshakeVault}: no Deferred, and
Automat runs the private input right after the public one's transition);
a vault process answers later, through a Deferred. Meanwhile the machine stays in its state, the
question is kept in the core (L{ServerCore.asking}), and the owner holds the
frames that arrive (L{ConnectionOwner.hold_frames}): the client may send its
first messages right after its vouch. Closing cancels a question still
asked, so that an answer never arrives in the closed state. (Waiting states
of their own would say the same, but Automat finds each transition by a
scan of them all: every transition added costs every input.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import attrs
from automat import TypeMachine, TypeMachineBuilder, pep614
from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure

from . import handshake
from .errors import BadPacket, CurveTunError, NotAuthorized, ReplayedVouch, ServerKeyMismatch
from .handshake import CookieSealer, EphemeralKeyPair
from .handshake_vault import (
    IHandshakeVault,
    IImmediateHandshakeVault,
    VaultUnavailable,
    client_vouch_key,
    client_vouch_packet,
)
from .interfaces import IRegistry
from .keys import fingerprint, keys_equal
from .packets import Cookie, Hello, Vouch
from .session import Session

HandshakePacket = TypeVar("HandshakePacket", Hello, Cookie, Vouch)
_Answer = TypeVar("_Answer")


class ConnectionInputs(Protocol):
    """
    What can happen to a connection of either role.
    """

    def connection_made(self) -> None:
        "The TCP connection is up (and admitted)."

    def bad_packet(self, reason: BadPacket) -> None:
        """
        A frame arrived that the connection does not accept now: the wrong
        length or type for the packet expected next, one that does not
        parse, or a message that does not open.
        """

    def close(self, reason: Exception) -> None:
        """
        We close the connection for C{reason}: the application, a timeout,
        the server's admission, a session that cannot go on.
        """

    def connection_lost(self, reason: Failure) -> None:
        "The TCP connection is gone."

    def _rejected(self, reason: CurveTunError) -> None:
        "A verification inside a transition failed: close."


class ServerInputs(ConnectionInputs, Protocol):
    """
    What can happen to a server connection.
    """

    def hello_received(self, hello: Hello) -> None:
        "The hello arrived (state ready)."

    def vouch_received(self, vouch: Vouch) -> None:
        "The vouch arrived (state accepting)."

    def _hello_answered(self, client_ephemeral_key: bytes, cookie: bytes) -> None:
        "The hello verified, and C{cookie} is the answer to send."

    def _vouch_verified(self, session: Session, client_key: bytes) -> None:
        "The vouch verified: the client holds the long-term key C{client_key}."


class ClientInputs(ConnectionInputs, Protocol):
    """
    What can happen to a client connection.
    """

    def cookie_received(self, cookie: Cookie) -> None:
        "The cookie arrived (state initiating)."

    def message_opened(self) -> None:
        "The server's first message opened (state vouched)."

    def _hello_made(self, hello: bytes, ephemeral: EphemeralKeyPair, shared_key: bytes) -> None:
        "The hello to send, and what it was made with."

    def _vouch_made(self, vouch: bytes, session: Session) -> None:
        "The cookie opened; C{vouch} is the answer, C{session} the session."


class ConnectionOwner(Protocol):
    """
    What a connection machine asks of the transport that runs it.
    """

    @property
    def peer_host(self) -> str:
        "The peer's IP address (empty if it has none), for the registry."

    def send_frame(self, payload: bytes) -> None:
        "Frame C{payload} and write it to TCP."

    def expect_packet(
        self, packet_type: type[HandshakePacket], receiver: Callable[[HandshakePacket], None]
    ) -> None:
        """
        From the next frame on, only a C{packet_type} packet is valid: give
        it to C{receiver}, and anything else to C{bad_packet}.
        """

    def hold_frames(self) -> None:
        """
        The machine waits for its vault: hold the frames that arrive (the
        client's first messages may follow its vouch at once) until
        L{expect_packet} or L{established} says where they go.
        """

    def hello_accepted(self) -> None:
        "Server: the peer sent a valid hello (it is not a silent socket)."

    def established(
        self,
        session: Session,
        peer_public_key: bytes,
        message_opened: Callable[[], None] | None,
    ) -> None:
        """
        The handshake is done as far as this side can take it: run the
        established phase with C{session}, and start the application.

        @param message_opened: to call once, when the peer's first message
            opens (before it is delivered), or L{None}.
        """

    def handshake_confirmed(self) -> None:
        "The peer is proven to hold the session: tell the application."

    def disconnect(self) -> None:
        "Close TCP after the writes already made; read nothing more."

    def lost(self, reason: Failure) -> None:
        "TCP is closed; C{reason} says why, as the user should hear it."


@attrs.define
class ServerCore:
    """
    What a server connection needs: its long-term vault, the cookie keys,
    the registry, and its owner (who knows the peer's address).

    During a server-key rollover the vault answers hellos sealed to the
    current or the previous key (L{curvetun.handshake_vault.key_set}).
    """

    owner: ConnectionOwner
    vault: IHandshakeVault
    """
    The long-term key's holder (for an in-process L{curvetun.interfaces.IVault},
    a L{curvetun.handshake_vault.LocalHandshakeVault}).
    """
    cookie_keys: CookieSealer
    registry: IRegistry
    remember_vouch: Callable[[bytes], bool]
    """
    Called with the client ephemeral key of each vouch that verified;
    returns False if that key was seen before (a replayed session).
    """
    asking: Deferred[None] | None = None
    """
    The question the vault has not answered yet, if any.
    """
    immediate: IImmediateHandshakeVault | None = attrs.field(init=False, repr=False)
    """
    C{vault}, if it answers during the call (see L{_answer_now}).
    """

    @immediate.default
    def _immediate(self) -> IImmediateHandshakeVault | None:
        return _immediate(self.vault)


@attrs.define
class ClientCore:
    """
    What a client connection needs: its long-term vault and the server's
    long-term public key.
    """

    owner: ConnectionOwner
    vault: IHandshakeVault
    """
    The long-term key's holder, as for L{ServerCore.vault}.
    """
    server_key: bytes
    make_ephemeral: Callable[[], EphemeralKeyPair] = EphemeralKeyPair.generate
    """
    Makes the connection's ephemeral key pair (replaced only by
    known-answer tests).
    """
    asking: Deferred[None] | None = None
    """
    The question the vault has not answered yet, if any.
    """
    immediate: IImmediateHandshakeVault | None = attrs.field(init=False, repr=False)
    """
    C{vault}, if it answers during the call (see L{_answer_now}).
    """

    @immediate.default
    def _immediate(self) -> IImmediateHandshakeVault | None:
        return _immediate(self.vault)


def _immediate(vault: IHandshakeVault) -> IImmediateHandshakeVault | None:
    return vault if IImmediateHandshakeVault.providedBy(vault) else None


@attrs.frozen
class Initiating:
    """
    Client state data between hello and cookie: the ephemeral key pair and
    the precomputed key shared with the server's long-term key (it opens
    the cookie, so hello and cookie cost one X25519 operation).
    """

    ephemeral: EphemeralKeyPair
    shared_key: bytes = attrs.field(repr=False)


@attrs.frozen
class Accepting:
    """
    Server state data between hello and vouch: the hello's client ephemeral
    key, which the cookie inside the vouch must carry (binding).
    """

    client_ephemeral_key: bytes


def _accepting(
    inputs: ServerInputs, core: ServerCore, client_ephemeral_key: bytes, cookie: bytes
) -> Accepting:
    """
    The data of the server's accepting state, from the hello's answer.
    """
    return Accepting(client_ephemeral_key)


def _initiating(
    inputs: ClientInputs,
    core: ClientCore,
    hello: bytes,
    ephemeral: EphemeralKeyPair,
    shared_key: bytes,
) -> Initiating:
    """
    The data of the client's initiating state, from the hello it sends.
    """
    return Initiating(ephemeral, shared_key)


# The data of the states after the handshake (server connected, client
# vouched and connected): none. Automat keeps a state's data until a state
# with data of its own replaces it, so without these an established
# connection would hold its handshake's state data for its whole life (the
# client's ephemeral secret key and the key shared with the server's
# long-term key; the server's copy of EC). The session is the established
# phase's.


def _server_connected(
    inputs: ServerInputs, core: ServerCore, session: Session, client_key: bytes
) -> None:
    return None


def _client_vouched(inputs: ClientInputs, core: ClientCore, vouch: bytes, session: Session) -> None:
    return None


def _client_connected(inputs: ClientInputs, core: ClientCore) -> None:
    return None


def _closed_for(
    inputs: ConnectionInputs, core: ServerCore | ClientCore, reason: BaseException | Failure
) -> Failure:
    """
    The data of the closed state: why it closed, as the user should hear it
    when TCP reports the close (what we closed for says more than TCP's
    "connection done").
    """
    return reason if isinstance(reason, Failure) else Failure(reason)


# Outputs shared by both machines.


def _disconnect(inputs: ConnectionInputs, core: ServerCore | ClientCore, reason: Exception) -> None:
    """
    Close TCP; nothing more is read or delivered. (C{reason} is the closed
    state's data.)
    """
    _forget_question(core)
    core.owner.disconnect()


def _report_lost(inputs: ConnectionInputs, core: ServerCore | ClientCore, reason: Failure) -> None:
    """
    TCP closed before we did: tell the owner TCP's reason.
    """
    _forget_question(core)
    core.owner.lost(reason)


def _report_closed(
    inputs: ConnectionInputs, core: ServerCore | ClientCore, closed_for: Failure, reason: Failure
) -> None:
    """
    TCP closed after we closed: tell the owner why we did.
    """
    core.owner.lost(closed_for)


def _already_closed(
    inputs: ConnectionInputs, core: ServerCore | ClientCore, reason: Exception
) -> None:
    """
    Closing a closed connection does nothing.
    """


def _ask(
    inputs: ConnectionInputs,
    core: ServerCore | ClientCore,
    question: Deferred[_Answer],
    answered: Callable[[_Answer], None],
) -> None:
    """
    Call C{answered} with the vault's answer to C{question}, or C{_rejected}
    with why it failed: now if the vault has answered already (the
    in-process vault), later otherwise, holding the frames meanwhile.
    """

    def failed(failure: Failure) -> None:
        if core.asking is not None:
            core.asking = None
        if failure.check(CancelledError):
            return  # closed meanwhile: the machine asked for nothing more
        reason = failure.value
        if not isinstance(reason, CurveTunError):
            # Never a success: anything else means the vault is unusable.
            reason = VaultUnavailable(f"the vault failed: {type(failure.value).__name__}")
        inputs._rejected(reason)

    if question.called:
        # The in-process vault: the answer is here, nothing to remember.
        question.addCallbacks(answered, failed)
        return

    def succeeded(answer: _Answer) -> None:
        core.asking = None
        answered(answer)

    core.owner.hold_frames()
    core.asking = question.addCallbacks(succeeded, failed)


def _answer_now(
    inputs: ConnectionInputs,
    question: Callable[..., _Answer],
    arguments: tuple[Any, ...],
    answered: Callable[[_Answer], None],
) -> None:
    """
    Ask a vault that answers during the call (L{IImmediateHandshakeVault}):
    call C{answered} with what C{question(*arguments)} returns, or
    C{_rejected} with the L{CurveTunError} it raises. The same outcome as
    L{_ask} with that vault's fired Deferred, without making one.
    """
    try:
        answer = question(*arguments)
    except CurveTunError as error:
        inputs._rejected(error)
        return
    answered(answer)


def _forget_question(core: ServerCore | ClientCore) -> None:
    """
    Closing: cancel the question the vault has not answered.
    """
    asking = core.asking
    if asking is not None:
        core.asking = None
        asking.cancel()


def _second_packet(kind: str) -> BadPacket:
    return BadPacket(f"a second {kind} before our answer to the first")


def _build_server_machine() -> TypeMachine[ServerInputs, ServerCore]:
    builder = TypeMachineBuilder(ServerInputs, ServerCore)
    ready = builder.state("ready")
    accepting = builder.state("accepting", _accepting)
    connected = builder.state("connected", _server_connected)
    closed = builder.state("closed", _closed_for)

    @pep614(ready.upon(ServerInputs.connection_made).loop())
    def await_hello(inputs: ServerInputs, core: ServerCore) -> None:
        core.owner.expect_packet(Hello, inputs.hello_received)

    @pep614(ready.upon(ServerInputs.hello_received).loop())
    def answer_hello(inputs: ServerInputs, core: ServerCore, hello: Hello) -> None:
        if core.asking is not None:
            # An owner that holds frames while we wait never gets here.
            inputs._rejected(_second_packet("hello"))
            return
        # One question: open the hello, make SN, seal the cookie. A failure
        # includes a nonce counter the vault could not store.
        ephemeral = EphemeralKeyPair.generate()

        def answered(cookie: bytes) -> None:
            inputs._hello_answered(hello.client_ephemeral_key, cookie)

        immediate = core.immediate
        if immediate is not None:
            _answer_now(
                inputs, immediate.answer_hello_now, (hello, ephemeral, core.cookie_keys), answered
            )
        else:
            _ask(
                inputs,
                core,
                core.vault.open_hello_and_seal_cookie(hello, ephemeral, core.cookie_keys),
                answered,
            )

    @pep614(ready.upon(ServerInputs._hello_answered).to(accepting))
    def send_cookie(
        inputs: ServerInputs, core: ServerCore, client_ephemeral_key: bytes, cookie: bytes
    ) -> None:
        core.owner.hello_accepted()
        core.owner.send_frame(cookie)
        core.owner.expect_packet(Vouch, inputs.vouch_received)

    @pep614(accepting.upon(ServerInputs.vouch_received).loop())
    def check_vouch(inputs: ServerInputs, core: ServerCore, state: Accepting, vouch: Vouch) -> None:
        if core.asking is not None:
            inputs._rejected(_second_packet("vouch"))
            return
        try:
            opened = handshake.server_open_vouch(vouch, core.cookie_keys)
            # The wire format does not bind the cookie to this connection's
            # hello; we do (spec, "Known weaknesses of v1.0").
            if not keys_equal(opened.client_ephemeral_key, state.client_ephemeral_key):
                raise BadPacket("the vouch's cookie was issued for another hello")
            # The registry check is cheap: do it before the long-term X25519.
            peer_host = core.owner.peer_host
            if not core.registry.is_client_allowed(opened.client_key, peer_host):
                raise NotAuthorized(
                    f"client key {fingerprint(opened.client_key)} is not allowed "
                    f"from {peer_host} by the registry"
                )
        except CurveTunError as error:
            inputs._rejected(error)
            return

        def verified(_: None) -> None:
            if core.remember_vouch(opened.client_ephemeral_key):
                inputs._vouch_verified(opened.session, opened.client_key)
            else:
                inputs._rejected(ReplayedVouch("replayed vouch: this session was accepted before"))

        # One question: does the inner box V from C hold EC?
        immediate = core.immediate
        if immediate is not None:
            _answer_now(inputs, immediate.open_vouch_now, (opened,), verified)
        else:
            _ask(inputs, core, core.vault.open_vouch(opened), verified)

    @pep614(accepting.upon(ServerInputs._vouch_verified).to(connected))
    def accepted(
        inputs: ServerInputs,
        core: ServerCore,
        state: Accepting,
        session: Session,
        client_key: bytes,
    ) -> None:
        # Only the holder of client_key could have made this vouch: the
        # peer is confirmed as soon as the session starts.
        core.owner.established(session, client_key, None)
        core.owner.handshake_confirmed()

    # Closing, from every state: the outputs take the input's arguments
    # only, not the state's data (accepting's; connected has none).
    ready.upon(ServerInputs.bad_packet).to(closed)(_disconnect)
    ready.upon(ServerInputs.close).to(closed)(_disconnect)
    ready.upon(ServerInputs.connection_lost).to(closed)(_report_lost)
    ready.upon(ServerInputs._rejected).to(closed)(_disconnect)
    for with_data in (accepting, connected):
        with_data.upon(ServerInputs.bad_packet, nodata=True).to(closed)(_disconnect)
        with_data.upon(ServerInputs.close, nodata=True).to(closed)(_disconnect)
        with_data.upon(ServerInputs.connection_lost, nodata=True).to(closed)(_report_lost)
    accepting.upon(ServerInputs._rejected, nodata=True).to(closed)(_disconnect)
    closed.upon(ServerInputs.close, nodata=True).loop()(_already_closed)
    closed.upon(ServerInputs.connection_lost).loop()(_report_closed)
    return builder.build()


def _build_client_machine() -> TypeMachine[ClientInputs, ClientCore]:
    builder = TypeMachineBuilder(ClientInputs, ClientCore)
    ready = builder.state("ready")
    initiating = builder.state("initiating", _initiating)
    vouched = builder.state("vouched", _client_vouched)
    connected = builder.state("connected", _client_connected)
    closed = builder.state("closed", _closed_for)

    @pep614(ready.upon(ClientInputs.connection_made).loop())
    def make_hello(inputs: ClientInputs, core: ClientCore) -> None:
        ephemeral = core.make_ephemeral()
        try:
            hello, shared_key = handshake.client_hello(core.server_key, ephemeral)
        except BadPacket as error:
            inputs._rejected(error)
        else:
            inputs._hello_made(hello, ephemeral, shared_key)

    @pep614(ready.upon(ClientInputs._hello_made).to(initiating))
    def send_hello(
        inputs: ClientInputs,
        core: ClientCore,
        hello: bytes,
        ephemeral: EphemeralKeyPair,
        shared_key: bytes,
    ) -> None:
        core.owner.send_frame(hello)
        core.owner.expect_packet(Cookie, inputs.cookie_received)

    @pep614(initiating.upon(ClientInputs.cookie_received).loop())
    def make_vouch(
        inputs: ClientInputs, core: ClientCore, state: Initiating, cookie: Cookie
    ) -> None:
        try:
            server_ephemeral_key, cookie_K = handshake.client_open_cookie(cookie, state.shared_key)
        except BadPacket as error:
            inputs._rejected(
                ServerKeyMismatch(
                    f"the server's cookie does not verify ({error.reason}): "
                    f"the server's key is not {fingerprint(core.server_key)}"
                )
            )
            return
        if core.asking is not None:
            inputs._rejected(_second_packet("cookie"))
            return
        try:
            # X25519 with the peer's ES first: a bad ES must not use up a
            # safe nonce of the vault.
            vouch_key = client_vouch_key(server_ephemeral_key, state.ephemeral)
        except BadPacket as error:
            inputs._rejected(error)
            return

        def sealed(answer: tuple[bytes, bytes]) -> None:
            try:
                vouch, session = client_vouch_packet(
                    cookie_K, vouch_key, core.vault.public_key, *answer
                )
            except BadPacket as error:
                inputs._rejected(error)
            else:
                inputs._vouch_made(vouch, session)

        # One question: make VN and box EC to the server under it.
        immediate = core.immediate
        if immediate is not None:
            _answer_now(
                inputs,
                immediate.seal_vouch_now,
                (state.ephemeral.public_key, core.server_key),
                sealed,
            )
        else:
            _ask(
                inputs,
                core,
                core.vault.seal_vouch(state.ephemeral.public_key, core.server_key),
                sealed,
            )

    @pep614(initiating.upon(ClientInputs._vouch_made).to(vouched))
    def send_vouch(
        inputs: ClientInputs, core: ClientCore, state: Initiating, vouch: bytes, session: Session
    ) -> None:
        # The application may send from here: TCP delivers the vouch first,
        # and the server checks it before it reads any message.
        core.owner.send_frame(vouch)
        core.owner.established(session, core.server_key, inputs.message_opened)

    @pep614(vouched.upon(ClientInputs.message_opened, nodata=True).to(connected))
    def confirmed(inputs: ClientInputs, core: ClientCore) -> None:
        core.owner.handshake_confirmed()

    @pep614(initiating.upon(ClientInputs.connection_lost, nodata=True).to(closed))
    def closed_after_hello(inputs: ClientInputs, core: ClientCore, reason: Failure) -> None:
        _forget_question(core)
        core.owner.lost(
            Failure(
                ServerKeyMismatch(
                    "the server closed the connection after our hello: it is not "
                    "a curvetun server, or its key is not "
                    f"{fingerprint(core.server_key)}"
                )
            )
        )

    @pep614(vouched.upon(ClientInputs.connection_lost, nodata=True).to(closed))
    def closed_after_vouch(inputs: ClientInputs, core: ClientCore, reason: Failure) -> None:
        core.owner.lost(
            Failure(
                NotAuthorized(
                    "the server closed the connection after our vouch: our key "
                    f"{fingerprint(core.vault.public_key)} is probably not in the "
                    "server's registry for our address"
                )
            )
        )

    # Closing, from every state (nothing can arrive before the hello is
    # sent, so ready has no bad_packet; connected cannot fail a check).
    ready.upon(ClientInputs.close).to(closed)(_disconnect)
    ready.upon(ClientInputs._rejected).to(closed)(_disconnect)
    ready.upon(ClientInputs.connection_lost).to(closed)(_report_lost)
    initiating.upon(ClientInputs.bad_packet, nodata=True).to(closed)(_disconnect)
    initiating.upon(ClientInputs.close, nodata=True).to(closed)(_disconnect)
    initiating.upon(ClientInputs._rejected, nodata=True).to(closed)(_disconnect)
    for with_data in (vouched, connected):
        with_data.upon(ClientInputs.bad_packet, nodata=True).to(closed)(_disconnect)
        with_data.upon(ClientInputs.close, nodata=True).to(closed)(_disconnect)
    connected.upon(ClientInputs.connection_lost, nodata=True).to(closed)(_report_lost)
    closed.upon(ClientInputs.close, nodata=True).loop()(_already_closed)
    closed.upon(ClientInputs.connection_lost).loop()(_report_closed)
    return builder.build()


ServerMachine = _build_server_machine()
"""
Make a server connection machine: C{ServerMachine(ServerCore(...))}.
"""

ClientMachine = _build_client_machine()
"""
Make a client connection machine: C{ClientMachine(ClientCore(...))}.
"""
