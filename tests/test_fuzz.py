"""
Fuzzing both roles of a connection with Hypothesis: arbitrary bytes,
arbitrary splits of the stream into TCP reads, and arbitrary sequences of
real packets (recorded from a live in-memory session) mixed with mutated
ones.

For every example:

  - nothing raises, and nothing is logged as an error;
  - the application receives exactly the messages the peer sent that
    came, in order, before the first packet out of place (a model of the
    protocol, L{expected_outcome}, says which), and nothing else;
  - the connection is closing exactly when the model says it must;
  - once TCP has closed, nothing that lives longer than a connection (the
    factory, its vault, cookie keys, registry and clock) still refers to
    the connection or its application: weak references to both are dead
    after C{gc.collect()}, and the clock has no pending call.

The number of examples comes from a Hypothesis settings profile: C{ci}
(the default, 100 examples a test) or C{long} (20,000 a test)::

    HYPOTHESIS_PROFILE=long python -m twisted.trial tests.test_fuzz
"""

from __future__ import annotations

import gc
import os
import struct
import weakref
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from curvetun.admission import FailureLog
from curvetun.connection import ClientCore, ClientMachine, ConnectionInputs, ConnectionOwner
from curvetun.factories import CurveTunClientFactory, CurveTunServerFactory
from curvetun.handshake import EphemeralKeyPair
from curvetun.packets import (
    COOKIE_MAGIC,
    COOKIE_SIZE,
    HELLO_MAGIC,
    HELLO_SIZE,
    MAX_PAYLOAD,
    MESSAGE_MAGIC,
    VOUCH_MAGIC,
    VOUCH_SIZE,
)
from curvetun.replay import ReplayGuard
from curvetun.transport import CurveTunProtocol

from ._support import CLIENT_ADDRESS, SERVER_ADDRESS, Peers, RecordingFactory, framed, split_frames

# trial runs in _trial_temp/, which it empties at each run: keep failing
# examples where the next run finds them (and replays them first).
EXAMPLES = DirectoryBasedExampleDatabase(
    str(Path(__file__).resolve().parent.parent / ".hypothesis" / "examples")
)
for name, examples in (("ci", 100), ("long", 20_000)):
    settings.register_profile(
        name,
        max_examples=examples,
        deadline=None,
        database=EXAMPLES,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
FUZZ = settings(settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci")), deadline=None)
"""
The settings of every test here: the profile named by
C{$HYPOTHESIS_PROFILE} (C{ci} by default), never with a deadline (shared,
noisy machines).
"""

MAGICS = [HELLO_MAGIC, COOKIE_MAGIC, VOUCH_MAGIC, MESSAGE_MAGIC]
CLIENT_MESSAGES = [b"hello", b"", b"x" * 1000, bytes(range(256))]
SERVER_MESSAGES = [b"welcome", bytes(300), b""]


def complete_frames(stream: bytes) -> int:
    """
    How many whole frames C{stream} holds.
    """
    count = offset = 0
    while offset + 2 <= len(stream):
        (length,) = struct.unpack(">H", stream[offset : offset + 2])
        if offset + 2 + length > len(stream):
            break
        count += 1
        offset += 2 + length
    return count


# -- a live session, recorded ----------------------------------------------------


@attrs.frozen
class LiveSession:
    """
    A session run in memory between two real peers, with everything each
    side sent. The client's ephemeral key is fixed, so that a new client
    connection can be made to take part in the same session again.

    @ivar peers: the identities and services (their vaults, registry and
        cookie keys serve every connection the fuzzers make).
    @ivar ephemeral: the client's ephemeral key pair.
    @ivar client_payloads: hello, vouch, then the client's messages.
    @ivar server_payloads: cookie, then the server's messages.
    """

    peers: Peers
    ephemeral: EphemeralKeyPair
    client_payloads: list[bytes]
    server_payloads: list[bytes]


def client_protocol(
    factory: CurveTunClientFactory, ephemeral: EphemeralKeyPair
) -> CurveTunProtocol:
    """
    A client connection of C{factory} that uses C{ephemeral} as its key.
    """

    def make_machine(owner: ConnectionOwner) -> ConnectionInputs:
        return ClientMachine(
            ClientCore(owner, factory.handshake_vault, factory.server_key, lambda: ephemeral)
        )

    return CurveTunProtocol(factory, make_machine)


def accepted(factory: CurveTunServerFactory) -> CurveTunProtocol:
    """
    A server connection from the client's address (never refused: the
    fuzzers end every connection, so the limits are never reached).
    """
    protocol = factory.buildProtocol(CLIENT_ADDRESS)
    assert protocol is not None
    return protocol


@cache
def live_session() -> LiveSession:
    peers = Peers(handshake_timeout=None)
    ephemeral = EphemeralKeyPair.generate()
    server_factory = peers.server.server_factory(peers.server_apps)
    client_factory = peers.client.client_factory(peers.client_apps, peers.server_vault.public_key)
    client, server, pump = connectedServerAndClient(
        lambda: accepted(server_factory),
        lambda: client_protocol(client_factory, ephemeral),
        clientTransportFactory=lambda p: FakeTransport(
            p, False, hostAddress=CLIENT_ADDRESS, peerAddress=SERVER_ADDRESS
        ),
        serverTransportFactory=lambda p: FakeTransport(
            p, True, hostAddress=SERVER_ADDRESS, peerAddress=CLIENT_ADDRESS
        ),
        greet=False,
    )
    sent_by: dict[CurveTunProtocol, list[bytes]] = {client: [], server: []}
    for receiver, sender in ((server, client), (client, server)):
        read = receiver.dataReceived

        def recording(
            data: bytes,
            read: Callable[[bytes], None] = read,
            sender: CurveTunProtocol = sender,
        ) -> None:
            sent_by[sender].append(data)
            read(data)

        receiver.dataReceived = recording  # type: ignore[method-assign]
    pump.flush()
    for message in CLIENT_MESSAGES:
        client.write_message(message)
    for message in SERVER_MESSAGES:
        server.write_message(message)
    pump.flush()
    [server_app] = peers.server_apps.built
    [client_app] = peers.client_apps.built
    assert server_app.received == CLIENT_MESSAGES and client_app.received == SERVER_MESSAGES
    return LiveSession(
        peers,
        ephemeral,
        split_frames(b"".join(sent_by[client])),
        split_frames(b"".join(sent_by[server])),
    )


# -- the connection under test ------------------------------------------------------


@attrs.define
class Role:
    """
    One side of the live session, able to make fresh connections that
    take part in it again.

    @ivar first_size: the size of the first packet this side receives (the
        only valid length of the first frame).
    @ivar genuine: the payloads this side receives in the session, in order.
    @ivar plaintexts: for each of them, the message it carries (L{None} for
        handshake packets).
    """

    name: str
    factory: CurveTunServerFactory | CurveTunClientFactory
    clock: Clock
    apps: RecordingFactory
    make_protocol: Callable[[], CurveTunProtocol]
    first_size: int
    genuine: list[bytes]
    plaintexts: list[bytes | None]
    host: IPv4Address
    peer: IPv4Address

    def connect(self) -> Connection:
        protocol = self.make_protocol()
        built = len(self.apps.built)
        transport = StringTransport(hostAddress=self.host, peerAddress=self.peer)
        protocol.makeConnection(transport)
        return Connection(protocol, transport, self.apps, built)


def server_role() -> Role:
    """
    A server of the live session's service, with a replay memory of its
    own for each connection (the fuzzers replay the session on purpose).
    """
    session = live_session()
    service = session.peers.server
    clock = Clock()
    apps = RecordingFactory()
    factory = CurveTunServerFactory(
        apps,
        service.vault,
        service.cookie_keys,
        service.registry,
        lambda key: True,
        clock,
        handshake_timeout=10,
        # Failed handshakes are summed up in the log on a clock of their
        # own: the role's clock must show only the connections' timers.
        failure_log=FailureLog(Clock()),
    )

    def make_protocol() -> CurveTunProtocol:
        factory.remember_vouch = ReplayGuard(service.cookie_keys).remember
        return accepted(factory)

    return Role(
        "server",
        factory,
        clock,
        apps,
        make_protocol,
        HELLO_SIZE,
        session.client_payloads,
        [None, None, *CLIENT_MESSAGES],
        SERVER_ADDRESS,
        CLIENT_ADDRESS,
    )


def client_role() -> Role:
    """
    A client of the live session's identity, with its ephemeral key.
    """
    session = live_session()
    clock = Clock()
    apps = RecordingFactory()
    factory = CurveTunClientFactory(
        apps,
        session.peers.client_vault,
        session.peers.server_vault.public_key,
        clock,
        handshake_timeout=10,
    )
    return Role(
        "client",
        factory,
        clock,
        apps,
        lambda: client_protocol(factory, session.ephemeral),
        COOKIE_SIZE,
        session.server_payloads,
        [None, *SERVER_MESSAGES],
        CLIENT_ADDRESS,
        SERVER_ADDRESS,
    )


@attrs.define
class Connection:
    """
    One connection under test, on a StringTransport, and the applications
    its factory built for it (those after C{built_before}).
    """

    protocol: CurveTunProtocol
    transport: StringTransport
    apps: RecordingFactory
    built_before: int

    @property
    def app(self) -> IProtocol | None:
        built = self.apps.built[self.built_before :]
        assert len(built) <= 1
        return built[0] if built else None

    @property
    def delivered(self) -> list[bytes]:
        return [m for app in self.apps.built[self.built_before :] for m in app.received]

    def feed(self, stream: bytes, cuts: list[int]) -> None:
        """
        Deliver C{stream} in reads that end at each of C{cuts}.
        """
        start = 0
        for end in sorted({*cuts, len(stream)}):
            if end > start:
                self.protocol.dataReceived(stream[start:end])
                start = end

    def end(self) -> list[weakref.ref[object]]:
        """
        Let TCP report the close (it always ends, one way or another), and
        return weak references to everything that must not outlive it.
        """
        self.protocol.connectionLost(Failure(ConnectionDone()))
        refs: list[weakref.ref[object]] = [weakref.ref(self.protocol)]
        app = self.app
        if app is not None:
            refs.append(weakref.ref(app))
        # The factory's list is the test's record; a server forgets its
        # applications with the connection.
        del self.apps.built[self.built_before :]
        return refs


class FuzzTestCase(SynchronousTestCase):
    """
    Runs a Hypothesis test against fresh connections of one role, then
    checks that none of them outlived its TCP connection.
    """

    def setUp(self) -> None:
        self.refs: list[tuple[str, weakref.ref[object]]] = []

    def finish(self, role: Role, description: str, connection: Connection) -> None:
        """
        Close the connection as TCP would, and check what every example
        must satisfy.
        """
        self.assertEqual(self.flushLoggedErrors(), [], description)
        self.refs += [(description, ref) for ref in connection.end()]
        self.assertEqual(role.clock.getDelayedCalls(), [], f"{description}: a timer outlived it")

    def assert_nothing_leaked(self, role: Role) -> None:
        """
        After the examples, with the role's factory and clock still alive,
        every connection and application is garbage.
        """
        self.assertTrue(self.refs, "no example ran")
        gc.collect()
        alive = [description for description, ref in self.refs if ref() is not None]
        self.assertEqual(alive[:5], [], f"{len(alive)} objects outlived their connection")
        # The role (factory, clock) was alive all along.
        self.assertIsNotNone(role.factory)


# -- strategies -----------------------------------------------------------------------

reads = st.lists(st.integers(min_value=0, max_value=70_000), max_size=30)
"""Where TCP cuts the stream into reads."""


@st.composite
def packet_shaped(draw: st.DrawFn) -> bytes:
    """
    A payload with a real magic and often the right size, the rest random:
    it gets past parsing into the checks of boxes and counters.
    """
    magic = draw(st.sampled_from(MAGICS))
    sizes = {HELLO_MAGIC: HELLO_SIZE, COOKIE_MAGIC: COOKIE_SIZE, VOUCH_MAGIC: VOUCH_SIZE}
    size = sizes.get(magic) or draw(st.integers(min_value=32, max_value=2000))
    if draw(st.booleans()):
        size = draw(st.integers(min_value=8, max_value=400))
    return magic + draw(st.binary(min_size=size - 8, max_size=size - 8))


def mutate(draw: st.DrawFn, payload: bytes) -> bytes:
    """
    One random change to a genuine payload (the result may, rarely, be the
    payload itself; the model compares bytes).
    """
    kind = draw(
        st.sampled_from(
            ["flip", "flips", "truncate", "extend", "magic", "counter", "overwrite", "replace"]
        )
    )
    data = bytearray(payload)
    if kind == "flip":
        bit = draw(st.integers(0, len(data) * 8 - 1))
        data[bit // 8] ^= 1 << (bit % 8)
    elif kind == "flips":
        for bit in draw(st.lists(st.integers(0, len(data) * 8 - 1), min_size=2, max_size=8)):
            data[bit // 8] ^= 1 << (bit % 8)
    elif kind == "truncate":
        del data[draw(st.integers(0, len(data) - 1)) :]
    elif kind == "extend":
        data += draw(st.binary(min_size=1, max_size=min(300, MAX_PAYLOAD - len(data))))
    elif kind == "magic":
        data[:8] = draw(st.sampled_from([m for m in MAGICS if m != payload[:8]]))
    elif kind == "counter":
        # The 8 bytes after the magic: a message's or hello's counter, a
        # cookie's or vouch's safe nonce.
        data[8:16] = draw(st.integers(0, 2**64 - 1)).to_bytes(8, "big")
    elif kind == "overwrite":
        start = draw(st.integers(0, len(data) - 1))
        chunk = draw(st.binary(min_size=1, max_size=32))
        data[start : start + len(chunk)] = chunk
    else:
        data = bytearray(draw(st.binary(max_size=300)))
    return bytes(data)


@st.composite
def sequences(draw: st.DrawFn, genuine: list[bytes]) -> list[bytes]:
    """
    A sequence of payloads for one role: mostly the next genuine packet,
    sometimes a genuine packet out of place, a mutated one, or garbage.
    """
    steps = draw(
        st.lists(
            st.sampled_from(["next", "next", "next", "other", "mutated", "garbage"]),
            max_size=len(genuine) + 4,
        )
    )
    position = 0
    payloads = []
    for step in steps:
        if step == "next" and position < len(genuine):
            payloads.append(genuine[position])
            position += 1
        elif step == "other":
            payloads.append(draw(st.sampled_from(genuine)))
        elif step == "mutated":
            payloads.append(mutate(draw, draw(st.sampled_from(genuine[: position + 1]))))
        else:
            payloads.append(draw(st.one_of(packet_shaped(), st.binary(max_size=200))))
    return payloads


@attrs.frozen
class Outcome:
    delivered: list[bytes]
    closed: bool


def expected_outcome(role: Role, payloads: list[bytes]) -> Outcome:
    """
    The protocol's answer to a sequence of payloads: each is accepted only
    if it is the next genuine one; the first that is not closes the
    connection, and nothing after it counts.
    """
    delivered: list[bytes] = []
    for position, payload in enumerate(payloads):
        if position >= len(role.genuine) or payload != role.genuine[position]:
            return Outcome(delivered, closed=True)
        plaintext = role.plaintexts[position]
        if plaintext is not None:
            delivered.append(plaintext)
    return Outcome(delivered, closed=False)


def roles() -> Iterator[Role]:
    yield server_role()
    yield client_role()


# -- the tests ----------------------------------------------------------------------


class ArbitraryBytesTests(FuzzTestCase):
    """
    Bytes that are not a curvetun session, however they are framed and
    split, never crash a connection and never start an application; the
    connection closes once a whole frame has arrived, or the length prefix
    of a first frame that is not the first packet's size, and not before.
    """

    def check(self, role: Role) -> None:
        @FUZZ
        @given(
            stream=st.one_of(
                st.binary(max_size=3000),
                st.lists(
                    st.one_of(st.binary(max_size=300), packet_shaped()).map(framed), max_size=6
                ).map(b"".join),
            ),
            cuts=reads,
        )
        def example(stream: bytes, cuts: list[int]) -> None:
            connection = role.connect()
            connection.feed(stream, cuts)
            description = f"{role.name}: {stream[:40].hex()}... ({len(stream)} bytes)"
            self.assertIsNone(connection.app, description)
            wrong_length = len(stream) >= 2 and int.from_bytes(stream[:2], "big") != role.first_size
            self.assertEqual(
                bool(connection.transport.disconnecting),
                complete_frames(stream) > 0 or wrong_length,
                description,
            )
            self.finish(role, description, connection)

        example()
        self.assert_nothing_leaked(role)

    def test_arbitrary_bytes_at_a_server(self) -> None:
        self.check(server_role())

    def test_arbitrary_bytes_at_a_client(self) -> None:
        self.check(client_role())


class SplitTests(FuzzTestCase):
    """
    However TCP splits a genuine session into reads, each side receives it
    whole and stays connected.
    """

    def check(self, role: Role) -> None:
        stream = b"".join(framed(p) for p in role.genuine)

        @FUZZ
        @given(cuts=st.lists(st.integers(min_value=0, max_value=len(stream)), max_size=40))
        def example(cuts: list[int]) -> None:
            connection = role.connect()
            connection.feed(stream, cuts)
            description = f"{role.name}: reads ending at {sorted(set(cuts))}"
            self.assertEqual(
                connection.delivered, [p for p in role.plaintexts if p is not None], description
            )
            self.assertFalse(connection.transport.disconnecting, description)
            self.finish(role, description, connection)

        example()
        self.assert_nothing_leaked(role)

    def test_a_genuine_session_split_anyhow_reaches_the_server_whole(self) -> None:
        self.check(server_role())

    def test_a_genuine_session_split_anyhow_reaches_the_client_whole(self) -> None:
        self.check(client_role())


class MixedSequenceTests(FuzzTestCase):
    """
    Genuine packets mixed with genuine ones out of place, mutated ones and
    garbage: the application gets exactly the genuine messages before the
    first packet out of place, and the connection closes at that packet.
    """

    def check(self, role: Role) -> None:
        @FUZZ
        @given(data=st.data())
        def example(data: st.DataObject) -> None:
            payloads = data.draw(sequences(role.genuine), label="payloads")
            stream = b"".join(framed(p) for p in payloads)
            cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10), label="cuts")
            connection = role.connect()
            connection.feed(stream, cuts)
            expected = expected_outcome(role, payloads)
            description = f"{role.name}: {[p[:12].hex() for p in payloads]}"
            self.assertEqual(connection.delivered, expected.delivered, description)
            self.assertEqual(bool(connection.transport.disconnecting), expected.closed, description)
            self.finish(role, description, connection)

        example()
        self.assert_nothing_leaked(role)

    def test_mixed_packets_at_a_server_deliver_exactly_the_genuine_prefix(self) -> None:
        self.check(server_role())

    def test_mixed_packets_at_a_client_deliver_exactly_the_genuine_prefix(self) -> None:
        self.check(client_role())


class ModelTests(SynchronousTestCase):
    """
    The recorded session and the model the fuzzers check against are
    right: the genuine session is accepted, and the model closes at the
    first packet out of place.
    """

    def test_the_recorded_session_has_the_expected_packets(self) -> None:
        session = live_session()
        self.assertEqual(
            [p[:8] for p in session.client_payloads],
            [HELLO_MAGIC, VOUCH_MAGIC] + [MESSAGE_MAGIC] * len(CLIENT_MESSAGES),
        )
        self.assertEqual(
            [p[:8] for p in session.server_payloads],
            [COOKIE_MAGIC] + [MESSAGE_MAGIC] * len(SERVER_MESSAGES),
        )

    def test_each_role_accepts_the_genuine_session_again_and_again(self) -> None:
        for role in roles():
            for _ in range(3):
                connection = role.connect()
                connection.feed(b"".join(framed(p) for p in role.genuine), [])
                self.assertEqual(
                    connection.delivered, [p for p in role.plaintexts if p is not None], role.name
                )
                self.assertFalse(connection.transport.disconnecting, role.name)

    def test_the_model_closes_at_the_first_packet_out_of_place(self) -> None:
        role = server_role()
        hello, vouch, first, second = role.genuine[:4]
        self.assertEqual(
            expected_outcome(role, [hello, vouch, first, first, second]),
            Outcome([CLIENT_MESSAGES[0]], closed=True),
        )
        self.assertEqual(
            expected_outcome(role, [hello, vouch, first]),
            Outcome([CLIENT_MESSAGES[0]], closed=False),
        )
        self.assertEqual(expected_outcome(role, [vouch]), Outcome([], closed=True))

    def test_a_leaked_connection_is_noticed(self) -> None:
        """
        The leak check fails when something long-lived keeps a connection.
        """
        role = server_role()
        connection = role.connect()
        keep = connection.protocol

        def keeping(protocol: CurveTunProtocol, reason: Failure) -> None:
            # A closure over the connection's protocol: what a leak looks like.
            assert keep is not None

        role.factory.ended_callbacks.append(keeping)
        case = FuzzTestCase()
        case.setUp()
        case.refs += [("kept", ref) for ref in connection.end()]
        del connection
        self.assertRaises(case.failureException, case.assert_nothing_leaked, role)
