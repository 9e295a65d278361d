"""
The tamper matrix: an active attacker who changes a recorded packet in any
small way gets the connection closed, and nothing that did not verify
reaches the application.

The recorded session is the known-answer session of C{handshake.json},
played against fresh connections with the vectors' fixed keys
(L{VectorServer}, L{VectorClient}) on a StringTransport: one new
connection per case, brought to the state just before the packet under
test. For every case we check that

  - the connection is closing (C{transport.disconnecting});
  - it wrote nothing in answer (a refused hello gets no cookie, a refused
    cookie no vouch);
  - the application saw exactly the messages that came before the
    tampered packet (for handshake packets: no application at all);
  - it closed for a stated reason (a L{CurveTunError});
  - the genuine packets that would have followed are ignored.

Coverage: every bit of the hello and the vouch (server side) and of the
cookie (client side); every header bit of every message and every 7th bit
of each message's box, both directions; every truncation of the handshake
packets and a sample of the messages'; extensions by one and by many
bytes; each packet under each of the other three magics; and the 2-byte
length prefix of every packet. L{SanityTests} shows that the same setup
accepts each packet unmodified, so the matrix can fail.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import attrs
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from curvetun.errors import CurveTunError
from curvetun.packets import COOKIE_MAGIC, HELLO_MAGIC, MAX_PAYLOAD, MESSAGE_MAGIC, VOUCH_MAGIC

from ._support import framed
from ._vectors import (
    C2S,
    COOKIE_V,
    HELLO_V,
    S2C,
    VOUCH_V,
    VectorClient,
    VectorServer,
    protocol_of,
    unhex,
)

Peer = VectorServer | VectorClient
F = TypeVar("F", bound=Callable[..., None])


def todo(bug: str) -> Callable[[F], F]:
    """
    Mark a test as an expected failure (trial's C{todo}) because of the
    curvetun bug C{bug}; once the bug is fixed, trial reports an unexpected
    success and the mark should go.
    """

    def mark(test: F) -> F:
        test.todo = bug  # type: ignore[attr-defined]
        return test

    return mark


HELLO_PAYLOAD = unhex(HELLO_V["payload"])
COOKIE_PAYLOAD = unhex(COOKIE_V["payload"])
VOUCH_PAYLOAD = unhex(VOUCH_V["payload"])
CLIENT_PAYLOADS = [unhex(p["payload"]) for p in C2S]
CLIENT_PLAINTEXTS = [unhex(p["plaintext"]) for p in C2S]
SERVER_PAYLOADS = [unhex(p["payload"]) for p in S2C]
SERVER_PLAINTEXTS = [unhex(p["plaintext"]) for p in S2C]


MAGICS = {
    "hello": HELLO_MAGIC,
    "cookie": COOKIE_MAGIC,
    "vouch": VOUCH_MAGIC,
    "message": MESSAGE_MAGIC,
}

MESSAGE_HEADER_BITS = 16 * 8  # magic and counter
MESSAGE_BOX_BIT_STEP = 7

# The top bit of the last byte of the hello's EC (payload bytes 8..39).
# X25519 ignores that bit, so the hello's box would still open if the
# server did not refuse non-canonical keys: see HelloKeyEncodingTests.
HELLO_EC_TOP_BIT = 39 * 8 + 7


# -- mutations ---------------------------------------------------------------

Mutation = tuple[str, bytes]
"""A description of the change, and the changed payload."""


def flip(payload: bytes, bit: int) -> bytes:
    """
    C{payload} with bit C{bit} flipped (bit 0 is the lowest bit of byte 0).
    """
    changed = bytearray(payload)
    changed[bit // 8] ^= 1 << (bit % 8)
    return bytes(changed)


def bit_flips(payload: bytes, bits: Iterable[int]) -> Iterator[Mutation]:
    for bit in bits:
        yield f"bit {bit} (byte {bit // 8}) flipped", flip(payload, bit)


def every_bit(payload: bytes) -> range:
    return range(len(payload) * 8)


def sampled_message_bits(payload: bytes) -> list[int]:
    """
    Every bit of a message's magic and counter, and every 7th bit of its
    box (authenticator and ciphertext).
    """
    box_bits = range(MESSAGE_HEADER_BITS, len(payload) * 8, MESSAGE_BOX_BIT_STEP)
    return [*range(MESSAGE_HEADER_BITS), *box_bits]


def truncations(payload: bytes, lengths: Iterable[int]) -> Iterator[Mutation]:
    for length in lengths:
        yield f"truncated to {length} bytes", payload[:length]


def sampled_message_lengths(payload: bytes) -> list[int]:
    """
    Every length up to just past the header, every 13th after that, and
    one byte short.
    """
    return sorted({*range(min(len(payload), 40)), *range(40, len(payload), 13), len(payload) - 1})


def extensions(payload: bytes) -> Iterator[Mutation]:
    for extra in (b"\x00", b"\x01", b"\xff", bytes(16), b"\xa5" * 1000):
        yield f"extended by {len(extra)} bytes of {extra[:1].hex()}", payload + extra
    room = MAX_PAYLOAD - len(payload)
    yield f"extended to the largest frame ({room} bytes more)", payload + bytes(room)


def magic_swaps(payload: bytes) -> Iterator[Mutation]:
    for name, magic in MAGICS.items():
        if magic != payload[:8]:
            yield f"magic replaced by the {name} magic", magic + payload[8:]


def every_mutation_but_bit_flips(payload: bytes, lengths: Iterable[int]) -> Iterator[Mutation]:
    yield from truncations(payload, lengths)
    yield from extensions(payload)
    yield from magic_swaps(payload)


# -- scenarios -----------------------------------------------------------------


@attrs.frozen
class Scenario:
    """
    One packet of the recorded session, and how to bring a fresh connection
    to the state just before it.

    @ivar name: what the packet is, for failure messages.
    @ivar prepare: makes a connection in that state, having received the
        genuine packets before this one.
    @ivar payload: the genuine packet.
    @ivar delivered_before: the messages the application legitimately has
        by then.
    @ivar following: the genuine packets that would come next from the
        same sender.
    """

    name: str
    prepare: Callable[[], Peer]
    payload: bytes
    delivered_before: list[bytes]
    following: list[bytes]

    def check(self, description: str, tampered: bytes) -> str | None:
        """
        Deliver C{tampered} in place of the genuine packet; return what went
        wrong, or L{None} if the connection refused it properly.
        """
        peer = self.prepare()
        if peer.transport.disconnecting or peer.delivered != self.delivered_before:
            return f"{self.name}: the setup itself failed"
        reasons: list[Failure] = []
        protocol_of(peer).factory.ended_callbacks.append(
            lambda protocol, reason: reasons.append(reason)
        )
        built_before = len(peer.apps.built)
        answer = peer.receive(tampered)
        problems = []
        if not peer.transport.disconnecting:
            problems.append("the connection stayed open")
        if answer:
            problems.append(f"it answered {len(answer)} bytes")
        if len(peer.apps.built) != built_before:
            problems.append("an application was started")
        for genuine in self.following:
            protocol_of(peer).dataReceived(framed(genuine))
        if peer.delivered != self.delivered_before:
            problems.append("unverified data was delivered")
        # TCP reports the close; the reason is what curvetun closed for.
        protocol_of(peer).connectionLost(Failure(ConnectionDone()))
        if len(reasons) != 1 or not isinstance(reasons[0].value, CurveTunError):
            problems.append(f"it closed without a curvetun reason: {reasons}")
        if problems:
            return f"{self.name}, {description}: {'; '.join(problems)}"
        return None


def server_awaiting_hello() -> Peer:
    return VectorServer()


def server_awaiting_vouch() -> Peer:
    server = VectorServer()
    server.receive(HELLO_PAYLOAD)
    return server


def client_awaiting_cookie() -> Peer:
    return VectorClient()


def server_connected(messages_before: int) -> Callable[[], Peer]:
    def prepare() -> Peer:
        server = VectorServer()
        server.receive(HELLO_PAYLOAD)
        server.receive(VOUCH_PAYLOAD)
        for payload in CLIENT_PAYLOADS[:messages_before]:
            server.receive(payload)
        return server

    return prepare


def client_connected(messages_before: int) -> Callable[[], Peer]:
    def prepare() -> Peer:
        client = VectorClient()
        client.receive(COOKIE_PAYLOAD)
        for payload in SERVER_PAYLOADS[:messages_before]:
            client.receive(payload)
        return client

    return prepare


HELLO_SCENARIO = Scenario(
    "hello at the server",
    server_awaiting_hello,
    HELLO_PAYLOAD,
    [],
    [VOUCH_PAYLOAD, *CLIENT_PAYLOADS],
)
COOKIE_SCENARIO = Scenario(
    "cookie at the client", client_awaiting_cookie, COOKIE_PAYLOAD, [], SERVER_PAYLOADS
)
VOUCH_SCENARIO = Scenario(
    "vouch at the server", server_awaiting_vouch, VOUCH_PAYLOAD, [], CLIENT_PAYLOADS
)
CLIENT_MESSAGE_SCENARIOS = [
    Scenario(
        f"client message {n} at the server",
        server_connected(n),
        payload,
        CLIENT_PLAINTEXTS[:n],
        CLIENT_PAYLOADS[n + 1 :],
    )
    for n, payload in enumerate(CLIENT_PAYLOADS)
]
SERVER_MESSAGE_SCENARIOS = [
    Scenario(
        f"server message {n} at the client",
        client_connected(n),
        payload,
        SERVER_PLAINTEXTS[:n],
        SERVER_PAYLOADS[n + 1 :],
    )
    for n, payload in enumerate(SERVER_PAYLOADS)
]
MESSAGE_SCENARIOS = CLIENT_MESSAGE_SCENARIOS + SERVER_MESSAGE_SCENARIOS
ALL_SCENARIOS = [HELLO_SCENARIO, COOKIE_SCENARIO, VOUCH_SCENARIO, *MESSAGE_SCENARIOS]


class TamperTestCase(SynchronousTestCase):
    def assert_all_refused(self, scenario: Scenario, mutations: Iterable[Mutation]) -> int:
        """
        Check every mutation of C{scenario}'s packet; fail listing every
        mutation that was not refused properly. Returns how many were
        checked.
        """
        failures = []
        count = 0
        for description, tampered in mutations:
            self.assertNotEqual(tampered, scenario.payload, description)
            count += 1
            problem = scenario.check(description, tampered)
            if problem is not None:
                failures.append(problem)
        self.assertGreater(count, 0)
        self.assertEqual(
            failures, [], f"{len(failures)} of {count} tampered packets were not refused"
        )
        return count


class SanityTests(SynchronousTestCase):
    """
    The setup the matrix uses accepts every packet unmodified: a refusal in
    the matrix is caused by the change, not by the setup.
    """

    def test_the_unmodified_hello_is_answered_with_a_cookie(self) -> None:
        server = HELLO_SCENARIO.prepare()
        answer = server.receive(HELLO_PAYLOAD)
        self.assertEqual(len(answer), 2 + len(COOKIE_PAYLOAD))
        self.assertFalse(server.transport.disconnecting)

    def test_the_unmodified_cookie_is_answered_with_the_vouch(self) -> None:
        client = COOKIE_SCENARIO.prepare()
        self.assertEqual(client.receive(COOKIE_PAYLOAD), framed(VOUCH_PAYLOAD))
        self.assertEqual(len(client.apps.built), 1)
        self.assertFalse(client.transport.disconnecting)

    def test_the_unmodified_vouch_starts_the_server_application(self) -> None:
        server = VOUCH_SCENARIO.prepare()
        server.receive(VOUCH_PAYLOAD)
        self.assertEqual(len(server.apps.built), 1)
        self.assertFalse(server.transport.disconnecting)

    def test_every_unmodified_message_is_delivered_in_the_same_setup(self) -> None:
        for scenario in MESSAGE_SCENARIOS:
            peer = scenario.prepare()
            peer.receive(scenario.payload)
            self.assertEqual(len(peer.delivered), len(scenario.delivered_before) + 1, scenario.name)
            self.assertFalse(peer.transport.disconnecting, scenario.name)

    def test_the_check_reports_a_packet_that_is_accepted(self) -> None:
        """
        L{Scenario.check} does fail when given a packet that verifies.
        """
        for scenario in ALL_SCENARIOS:
            problem = scenario.check("unmodified", scenario.payload)
            self.assertIsNotNone(problem, scenario.name)
            assert problem is not None
            self.assertIn("stayed open", problem)

    def test_the_sampled_bits_cover_every_header_bit_of_every_message(self) -> None:
        for payload in CLIENT_PAYLOADS + SERVER_PAYLOADS:
            bits = sampled_message_bits(payload)
            self.assertTrue(set(range(MESSAGE_HEADER_BITS)) <= set(bits))
            self.assertGreaterEqual(len(bits), MESSAGE_HEADER_BITS + (len(payload) - 16) * 8 // 7)


class HandshakeBitFlipTests(TamperTestCase):
    """
    Flipping any single bit of a handshake packet gets it refused.
    """

    def test_every_bit_flip_of_the_hello_is_refused(self) -> None:
        bits = list(every_bit(HELLO_PAYLOAD))
        self.assertEqual(
            self.assert_all_refused(HELLO_SCENARIO, bit_flips(HELLO_PAYLOAD, bits)), 128 * 8
        )

    def test_every_bit_flip_of_the_cookie_is_refused_by_the_client(self) -> None:
        self.assertEqual(
            self.assert_all_refused(
                COOKIE_SCENARIO, bit_flips(COOKIE_PAYLOAD, every_bit(COOKIE_PAYLOAD))
            ),
            168 * 8,
        )

    def test_every_bit_flip_of_the_vouch_is_refused(self) -> None:
        self.assertEqual(
            self.assert_all_refused(
                VOUCH_SCENARIO, bit_flips(VOUCH_PAYLOAD, every_bit(VOUCH_PAYLOAD))
            ),
            224 * 8,
        )


class HelloKeyEncodingTests(TamperTestCase):
    """
    The one bit of the hello that X25519 does not read: the top bit of
    C{EC}. Every real public key has it clear (it is a number below
    2**255 - 19); a hello with it set is another encoding of the same key.
    """

    def test_a_hello_whose_EC_has_the_top_bit_set_is_refused(self) -> None:
        self.assert_all_refused(HELLO_SCENARIO, bit_flips(HELLO_PAYLOAD, [HELLO_EC_TOP_BIT]))


class HandshakeShapeTests(TamperTestCase):
    """
    A handshake packet cut short at any length, made longer, or given
    another packet's magic is refused.
    """

    def test_the_hello_truncated_extended_or_retyped_is_refused(self) -> None:
        self.assert_all_refused(
            HELLO_SCENARIO, every_mutation_but_bit_flips(HELLO_PAYLOAD, range(len(HELLO_PAYLOAD)))
        )

    def test_the_cookie_truncated_extended_or_retyped_is_refused(self) -> None:
        self.assert_all_refused(
            COOKIE_SCENARIO,
            every_mutation_but_bit_flips(COOKIE_PAYLOAD, range(len(COOKIE_PAYLOAD))),
        )

    def test_the_vouch_truncated_extended_or_retyped_is_refused(self) -> None:
        self.assert_all_refused(
            VOUCH_SCENARIO, every_mutation_but_bit_flips(VOUCH_PAYLOAD, range(len(VOUCH_PAYLOAD)))
        )


class MessageTamperTests(TamperTestCase):
    """
    A tampered message closes the connection; the messages before it were
    delivered, nothing from it or after it is.
    """

    def test_bit_flips_in_client_messages_are_refused(self) -> None:
        for scenario in CLIENT_MESSAGE_SCENARIOS:
            self.assert_all_refused(
                scenario, bit_flips(scenario.payload, sampled_message_bits(scenario.payload))
            )

    def test_bit_flips_in_server_messages_are_refused(self) -> None:
        for scenario in SERVER_MESSAGE_SCENARIOS:
            self.assert_all_refused(
                scenario, bit_flips(scenario.payload, sampled_message_bits(scenario.payload))
            )

    def test_messages_truncated_extended_or_retyped_are_refused(self) -> None:
        for scenario in MESSAGE_SCENARIOS:
            self.assert_all_refused(
                scenario,
                every_mutation_but_bit_flips(
                    scenario.payload, sampled_message_lengths(scenario.payload)
                ),
            )


def length_prefix_flips(payload: bytes) -> Iterator[tuple[str, bytes, int]]:
    """
    The framed packet with each bit of its 2-byte length prefix flipped:
    C{(description, framed bytes, announced length)}.
    """
    genuine = framed(payload)
    for bit in range(16):
        tampered = flip(genuine, bit)
        (announced,) = struct.unpack(">H", tampered[:2])
        yield (
            f"length prefix bit {bit} flipped ({len(payload)} -> {announced})",
            tampered,
            announced,
        )


class LengthPrefixTests(SynchronousTestCase):
    """
    A changed length prefix re-frames the stream: a handshake packet of any
    other length is refused at its prefix; a shorter message is a truncated
    packet and is refused at once; a longer one waits for bytes that,
    whatever they are, make a packet that is refused. Nothing is delivered
    either way.
    """

    def check(self, scenario: Scenario) -> list[str]:
        failures = []
        for description, tampered, announced in length_prefix_flips(scenario.payload):
            peer = scenario.prepare()
            built_before = len(peer.apps.built)
            protocol_of(peer).dataReceived(tampered)
            if announced < len(scenario.payload) and not peer.transport.disconnecting:
                failures.append(f"{scenario.name}, {description}: a short frame was not refused")
            # The attacker (or the rest of the stream) supplies what the
            # longer frame is waiting for: 0xff bytes, which after that
            # frame only start another frame that never completes.
            for genuine in scenario.following:
                protocol_of(peer).dataReceived(framed(genuine))
            protocol_of(peer).dataReceived(b"\xff" * (MAX_PAYLOAD + 2))
            if not peer.transport.disconnecting:
                failures.append(f"{scenario.name}, {description}: the connection stayed open")
            if peer.delivered != scenario.delivered_before or len(peer.apps.built) != built_before:
                failures.append(f"{scenario.name}, {description}: unverified data delivered")
        return failures

    def test_a_changed_length_prefix_on_any_packet_closes_without_delivering(self) -> None:
        failures = []
        for scenario in ALL_SCENARIOS:
            failures += self.check(scenario)
        self.assertEqual(failures, [])

    def test_a_handshake_packet_that_announces_another_length_is_refused_at_its_prefix(
        self,
    ) -> None:
        """
        Each handshake packet has one size: a frame that announces any other
        length while a handshake packet is expected is refused as soon as
        its length prefix is read, without waiting for (or buffering) the
        bytes it announces.
        """
        for scenario in (HELLO_SCENARIO, VOUCH_SCENARIO, COOKIE_SCENARIO):
            for description, tampered, _ in length_prefix_flips(scenario.payload):
                peer = scenario.prepare()
                protocol_of(peer).dataReceived(tampered[:2])
                self.assertTrue(peer.transport.disconnecting, f"{scenario.name}, {description}")
                self.assertEqual(protocol_of(peer).read_buffer_size, 0)
                self.assertEqual(peer.apps.built, [])
