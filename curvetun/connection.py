"""
The connection state machines of protocol v1.0, built with Automat.

Two machines share one set of inputs (L{ConnectionInputs}):

    server: ready -> accepting -> connected
    client: ready -> initiating -> vouched -> connected
    either: any state -> closed

They do no I/O and no parsing. The transport (L{curvetun.transport}) parses
each frame into a typed packet and feeds it in as an input; the machines
answer by calling their L{ConnectionOwner}: send a frame, deliver a message,
report the handshake complete, disconnect, report the connection lost.

Where an input's outcome depends on whether a packet verifies, the state
loops on the public input, does the (pure) verification from
L{curvetun.handshake}, and then calls one private input: C{_rejected} on
failure, or the input that moves to the next state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import attrs
from automat import TypeMachine, TypeMachineBuilder, pep614
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from . import handshake
from .errors import (
    BadPacket,
    ConnectionClosed,
    CounterExhausted,
    CurveTunError,
    HandshakeTimeout,
    NotAuthorized,
    ServerKeyMismatch,
)
from .handshake import CookieSealer, EphemeralKeyPair
from .interfaces import IRegistry, IVault
from .keys import fingerprint, keys_equal
from .packets import Cookie, Hello, Message, Vouch
from .session import Session


class ConnectionInputs(Protocol):
    """
    Everything that can happen to a connection.
    """

    def connection_made(self) -> None:
        "The TCP connection is up."

    def hello_received(self, hello: Hello) -> None:
        "A well-formed hello packet arrived."

    def cookie_received(self, cookie: Cookie) -> None:
        "A well-formed cookie packet arrived."

    def vouch_received(self, vouch: Vouch) -> None:
        "A well-formed vouch (initiate) packet arrived."

    def message_received(self, message: Message) -> None:
        "A well-formed message packet arrived."

    def bad_packet(self, error: BadPacket) -> None:
        "A frame arrived that is not a well-formed packet."

    def send(self, message: bytes) -> None:
        "The application sends one message (at most 65503 bytes)."

    def close(self) -> None:
        "The application closes the connection."

    def timed_out(self) -> None:
        "The handshake took too long."

    def connection_lost(self, reason: Failure) -> None:
        "The TCP connection is gone."

    # Private inputs: the outcomes of verification done inside a transition.

    def _rejected(self, error: CurveTunError) -> None:
        "Something did not verify, or came at the wrong time: close."

    def _hello_accepted(self, client_ephemeral_key: bytes) -> None:
        "Server: the hello verified and the cookie was sent."

    def _hello_sent(self, ephemeral: EphemeralKeyPair, shared_key: bytes) -> None:
        "Client: the hello was sent."

    def _established(self, session: Session, peer_public_key: bytes) -> None:
        "Server: the vouch verified. Client: the vouch was sent."

    def _confirmed(self, session: Session, peer_public_key: bytes) -> None:
        "Client: the server's first message verified."


class ConnectionOwner(Protocol):
    """
    What a connection machine asks of the transport that runs it.
    """

    def send_frame(self, payload: bytes) -> None:
        "Frame C{payload} and write it to TCP."

    def deliver(self, message: bytes) -> None:
        "Hand one verified message to the application."

    def handshake_complete(self, peer_public_key: bytes) -> None:
        "The peer is authenticated; the application may start."

    def sending_with(self, session: Session) -> None:
        """
        From now on the application's messages may be sealed with
        C{session} directly, without an input per message (the per-message
        fast path; L{disconnect} and L{lost} end it).
        """

    def receiving_with(self, session: Session) -> None:
        """
        From now on message packets may be opened with C{session} directly,
        without an input per message; a packet that does not open must
        still be reported as C{bad_packet}.
        """

    def disconnect(self, reason: BaseException) -> None:
        "Close TCP (after writes already made); C{reason} is why."

    def lost(self, reason: Failure) -> None:
        "TCP is closed; C{reason} says why, as the user should hear it."


@attrs.define
class ServerCore:
    """
    What a server connection needs: its long-term vault, the cookie keys,
    the registry, and who is on the other end.
    """

    owner: ConnectionOwner
    vault: IVault
    cookie_keys: CookieSealer
    registry: IRegistry
    peer_host: str
    remember_vouch: Callable[[bytes], bool]
    """
    Called with the client ephemeral key of each vouch that verified;
    returns False if that key was seen before (a replayed session).
    """


@attrs.define
class ClientCore:
    """
    What a client connection needs: its long-term vault and the server's
    long-term public key.
    """

    owner: ConnectionOwner
    vault: IVault
    server_key: bytes
    make_ephemeral: Callable[[], EphemeralKeyPair] = EphemeralKeyPair.generate
    """
    Makes the connection's ephemeral key pair (replaced only by
    known-answer tests).
    """


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


def _session_data(
    inputs: ConnectionInputs, core: object, session: Session, peer_public_key: bytes
) -> Session:
    """
    The data of the established states: the session, and nothing else (the
    handshake's ephemeral secrets are gone by now).
    """
    return session


# Transition outputs shared by both machines. They take *args because Automat
# passes the state's data (before the input's arguments) from data-bearing
# states, whatever nodata says when the new state is a plain one.


def _send(
    inputs: ConnectionInputs, core: ServerCore | ClientCore, session: Session, message: bytes
) -> None:
    """
    Seal one application message and write it; close when the session's
    counter is exhausted (spec: never send N = 2**64 - 1).
    """
    try:
        payload = session.seal(message)
    except CounterExhausted as error:
        inputs._rejected(error)
    else:
        core.owner.send_frame(payload)


def _deliver(
    inputs: ConnectionInputs, core: ServerCore | ClientCore, session: Session, message: Message
) -> None:
    """
    A message through the machine (for an owner that does not take the
    per-message fast path): verify, then deliver.
    """
    try:
        plaintext = session.open(message)
    except BadPacket as error:
        inputs._rejected(error)
    else:
        core.owner.deliver(plaintext)


def _not_yet(inputs: ConnectionInputs, core: object, *args: object) -> None:
    # The transport hands the application a transport only once the
    # handshake is done, so this is a programming error, not a peer's.
    raise ConnectionClosed("cannot send before the handshake is complete")


def _disconnect(inputs: ConnectionInputs, core: ServerCore | ClientCore, *args: object) -> None:
    """
    C{_rejected(error)} or C{bad_packet(error)}: close TCP because of
    C{error}; nothing more is delivered.
    """
    error = args[-1]
    assert isinstance(error, BaseException)
    core.owner.disconnect(error)


def _close_locally(inputs: ConnectionInputs, core: ServerCore | ClientCore, *args: object) -> None:
    core.owner.disconnect(ConnectionDone("connection closed locally"))


def _time_out(inputs: ConnectionInputs, core: ServerCore | ClientCore, *args: object) -> None:
    core.owner.disconnect(HandshakeTimeout("the handshake did not complete in time"))


def _report_lost(inputs: ConnectionInputs, core: ServerCore | ClientCore, *args: object) -> None:
    reason = args[-1]
    assert isinstance(reason, Failure)
    core.owner.lost(reason)


def _ignore(inputs: ConnectionInputs, core: object, *args: object) -> None:
    pass


def _unexpected(what: str) -> Callable[..., None]:
    """
    The output for a well-formed packet that the current state does not
    expect: close (spec, "Connection states").
    """

    def reject(inputs: ConnectionInputs, core: ServerCore | ClientCore, *args: object) -> None:
        core.owner.disconnect(BadPacket(f"unexpected {what} packet"))

    return reject


_PACKET_INPUTS: dict[str, Callable[..., None]] = {
    "hello": ConnectionInputs.hello_received,
    "cookie": ConnectionInputs.cookie_received,
    "vouch": ConnectionInputs.vouch_received,
    "message": ConnectionInputs.message_received,
}


def _upon(state: Any, input: Callable[..., None]) -> Any:
    """
    C{state.upon(input)}, with outputs that do not take the state's data.
    """
    # Data-bearing states (built with a factory) need nodata=True for an
    # output that ignores the data; plain states take no such argument.
    if hasattr(state, "factory"):
        return state.upon(input, nodata=True)
    return state.upon(input)


def _wire_common(
    handshaking: list[Any],
    established: list[Any],
    closed: Any,
    expected: dict[str, list[Any]],
) -> None:
    """
    The transitions every machine shares: closing on bad packets, rejected
    input, local close, timeout and TCP loss; unexpected packet types;
    sending once established; and a closed state that ignores everything.
    """
    for state in handshaking + established:
        _upon(state, ConnectionInputs.bad_packet).to(closed)(_disconnect)
        _upon(state, ConnectionInputs._rejected).to(closed)(_disconnect)
        _upon(state, ConnectionInputs.close).to(closed)(_close_locally)
        for what, input in _PACKET_INPUTS.items():
            if state not in expected[what]:
                _upon(state, input).to(closed)(_unexpected(what))
    for state in handshaking:
        _upon(state, ConnectionInputs.send).loop()(_not_yet)
        _upon(state, ConnectionInputs.timed_out).to(closed)(_time_out)
    for state in established:
        state.upon(ConnectionInputs.send).loop()(_send)
        _upon(state, ConnectionInputs.timed_out).loop()(_ignore)
    ignored_when_closed: list[Callable[..., None]] = [
        ConnectionInputs.connection_made,
        ConnectionInputs.bad_packet,
        ConnectionInputs.send,
        ConnectionInputs.close,
        ConnectionInputs.timed_out,
        ConnectionInputs._rejected,
        *_PACKET_INPUTS.values(),
    ]
    for input in ignored_when_closed:
        closed.upon(input).loop()(_ignore)
    # Whatever closed us, the owner has the reason on record; TCP's own
    # reason is the fallback.
    closed.upon(ConnectionInputs.connection_lost).loop()(_report_lost)


def _build_server_machine() -> TypeMachine[ConnectionInputs, ServerCore]:
    builder = TypeMachineBuilder(ConnectionInputs, ServerCore)
    ready = builder.state("ready")
    accepting = builder.state(
        "accepting",
        lambda inputs, core, client_ephemeral_key: Accepting(client_ephemeral_key),
    )
    connected = builder.state("connected", _session_data)
    closed = builder.state("closed")

    ready.upon(ConnectionInputs.connection_made).loop()(_ignore)

    @pep614(ready.upon(ConnectionInputs.hello_received).loop())
    def answer_hello(inputs: ConnectionInputs, core: ServerCore, hello: Hello) -> None:
        try:
            handshake.server_open_hello(hello, core.vault)
            cookie = handshake.server_cookie(
                hello.client_ephemeral_key, core.vault, core.cookie_keys
            )
        except CurveTunError as error:  # KeyFileError: the counter could not be stored
            inputs._rejected(error)
        else:
            core.owner.send_frame(cookie)
            inputs._hello_accepted(hello.client_ephemeral_key)

    ready.upon(ConnectionInputs._hello_accepted).to(accepting).returns(None)

    @pep614(accepting.upon(ConnectionInputs.vouch_received).loop())
    def check_vouch(
        inputs: ConnectionInputs, core: ServerCore, state: Accepting, vouch: Vouch
    ) -> None:
        try:
            opened = handshake.server_open_vouch(vouch, core.cookie_keys)
            # The wire format does not bind the cookie to this connection's
            # hello; we do (spec, "Known weaknesses of v1.0").
            if not keys_equal(opened.client_ephemeral_key, state.client_ephemeral_key):
                raise BadPacket("the vouch's cookie was issued for another hello")
            # The registry check is cheap: do it before the long-term X25519.
            if not core.registry.is_client_allowed(opened.client_key, core.peer_host):
                raise NotAuthorized(
                    f"client key {fingerprint(opened.client_key)} is not allowed "
                    f"from {core.peer_host} by the registry"
                )
            handshake.server_verify_vouch(opened, core.vault)
            if not core.remember_vouch(opened.client_ephemeral_key):
                raise BadPacket("replayed vouch: this session was accepted before")
        except CurveTunError as error:
            inputs._rejected(error)
        else:
            inputs._established(opened.session, opened.client_key)

    @pep614(accepting.upon(ConnectionInputs._established).to(connected))
    def accepted(
        inputs: ConnectionInputs,
        core: ServerCore,
        state: Accepting,
        session: Session,
        peer_public_key: bytes,
    ) -> None:
        # The per-message path runs in the owner from here: a message in
        # the connected state only ever loops (or fails, and is reported).
        core.owner.sending_with(session)
        core.owner.receiving_with(session)
        core.owner.handshake_complete(peer_public_key)

    connected.upon(ConnectionInputs.message_received).loop()(_deliver)

    for state in (ready, accepting, connected):
        _upon(state, ConnectionInputs.connection_lost).to(closed)(_report_lost)
    _wire_common(
        handshaking=[ready, accepting],
        established=[connected],
        closed=closed,
        expected={
            "hello": [ready],
            "cookie": [],
            "vouch": [accepting],
            "message": [connected],
        },
    )
    return builder.build()


def _build_client_machine() -> TypeMachine[ConnectionInputs, ClientCore]:
    builder = TypeMachineBuilder(ConnectionInputs, ClientCore)
    ready = builder.state("ready")
    initiating = builder.state(
        "initiating",
        lambda inputs, core, ephemeral, shared_key: Initiating(ephemeral, shared_key),
    )
    vouched = builder.state("vouched", _session_data)
    connected = builder.state("connected", _session_data)
    closed = builder.state("closed")

    @pep614(ready.upon(ConnectionInputs.connection_made).loop())
    def send_hello(inputs: ConnectionInputs, core: ClientCore) -> None:
        ephemeral = core.make_ephemeral()
        try:
            hello, shared_key = handshake.client_hello(core.server_key, ephemeral)
        except BadPacket as error:
            inputs._rejected(error)
        else:
            core.owner.send_frame(hello)
            inputs._hello_sent(ephemeral, shared_key)

    ready.upon(ConnectionInputs._hello_sent).to(initiating).returns(None)

    @pep614(initiating.upon(ConnectionInputs.cookie_received).loop())
    def send_vouch(
        inputs: ConnectionInputs, core: ClientCore, state: Initiating, cookie: Cookie
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
        try:
            vouch, session = handshake.client_vouch(
                cookie_K, server_ephemeral_key, state.ephemeral, core.server_key, core.vault
            )
        except BadPacket as error:
            inputs._rejected(error)
        else:
            core.owner.send_frame(vouch)
            inputs._established(session, core.server_key)

    @pep614(initiating.upon(ConnectionInputs._established).to(vouched))
    def vouch_sent(
        inputs: ConnectionInputs,
        core: ClientCore,
        state: Initiating,
        session: Session,
        peer_public_key: bytes,
    ) -> None:
        # The application may send from here: TCP delivers the vouch first,
        # and the server checks it before it reads any message.
        core.owner.sending_with(session)
        core.owner.handshake_complete(peer_public_key)

    @pep614(vouched.upon(ConnectionInputs.message_received).loop())
    def first_message(
        inputs: ConnectionInputs, core: ClientCore, session: Session, message: Message
    ) -> None:
        try:
            plaintext = session.open(message)
        except BadPacket as error:
            inputs._rejected(error)
        else:
            # Only a server that accepted our vouch can box to our EC with
            # its ES: we are connected. (Reentrant inputs from the
            # application's dataReceived run after this transition.)
            inputs._confirmed(session, core.server_key)
            core.owner.deliver(plaintext)

    @pep614(vouched.upon(ConnectionInputs._confirmed).to(connected))
    def confirmed(
        inputs: ConnectionInputs,
        core: ClientCore,
        vouched_session: Session,
        session: Session,
        peer_public_key: bytes,
    ) -> None:
        core.owner.receiving_with(session)

    connected.upon(ConnectionInputs.message_received).loop()(_deliver)

    for state in (ready, connected):
        _upon(state, ConnectionInputs.connection_lost).to(closed)(_report_lost)

    @pep614(initiating.upon(ConnectionInputs.connection_lost).to(closed))
    def closed_after_hello(
        inputs: ConnectionInputs, core: ClientCore, state: Initiating, reason: Failure
    ) -> None:
        core.owner.lost(
            Failure(
                ServerKeyMismatch(
                    "the server closed the connection after our hello: it is not "
                    "a curvetun server, or its key is not "
                    f"{fingerprint(core.server_key)}"
                )
            )
        )

    @pep614(vouched.upon(ConnectionInputs.connection_lost).to(closed))
    def closed_after_vouch(
        inputs: ConnectionInputs, core: ClientCore, session: Session, reason: Failure
    ) -> None:
        core.owner.lost(
            Failure(
                NotAuthorized(
                    "the server closed the connection after our vouch: our key "
                    f"{fingerprint(core.vault.public_key)} is probably not in the "
                    "server's registry for our address"
                )
            )
        )

    _wire_common(
        handshaking=[ready, initiating],
        established=[vouched, connected],
        closed=closed,
        expected={
            "hello": [],
            "cookie": [initiating],
            "vouch": [],
            "message": [vouched, connected],
        },
    )
    return builder.build()


ServerMachine = _build_server_machine()
"""
Make a server connection machine: C{ServerMachine(ServerCore(...))}.
"""

ClientMachine = _build_client_machine()
"""
Make a client connection machine: C{ClientMachine(ClientCore(...))}.
"""
