"""
Every case of reject.json is refused by the pure core with L{BadPacket}.

Each case is delivered in the state it names, set up as its precondition
says, through the same functions a connection calls in that state. Which
function refuses it, by the case's C{failure_class}:

    unparseable_packet                  parse_as (unknown magic, wrong size)
    wrong_packet_type_for_state         parse_as (another packet type)
    box_verification_failed             server_open_hello, client_open_cookie,
                                        server_open_vouch, Session.open; but a
                                        hello, cookie or vouch one byte short
                                        is refused by parse_as already, since
                                        each has one fixed size
    hello_counter_not_zero              server_open_hello
    cookie_verification_failed          server_open_vouch (CookieSealer.open)
    initiate_counter_not_one            server_open_vouch
    client_key_not_in_registry          the caller's registry check of
                                        OpenedVouch.client_key (stood in for
                                        here by REGISTRY below)
    msg_counter_not_previous_plus_one   Session.open
    msg_counter_limit                   Session.open

What the connection does next (close, and tell nothing to the application)
is tested with the connection's state machine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from curvetun.errors import BadPacket
from curvetun.handshake import (
    client_hello,
    client_open_cookie,
    server_open_hello,
    server_open_vouch,
    server_verify_vouch,
)
from curvetun.packets import Cookie, Hello, Message, Vouch, parse_as
from curvetun.session import Session
from tests._vectors import (
    CLIENT_EPHEMERAL,
    TS,
    C,
    FakeCookieSealer,
    S,
    connected_sessions,
    load,
    server_vault,
    unhex,
)

CASES: list[dict[str, Any]] = load("reject.json")["cases"]


def _base_name(packet: dict[str, Any]) -> str:
    if packet["name"] != "msg":
        return str(packet["name"])
    direction = "c2s" if packet["direction"] == "client->server" else "s2c"
    return f"{direction}_{packet['counter']}"


# The unmodified packets of handshake.json, by the names reject.json uses
# ("hello", "cookie", "vouch", "c2s_2" ... "s2c_3").
BASE_PACKETS = {
    _base_name(packet): unhex(packet["payload"]) for packet in load("handshake.json")["packets"]
}

# The reason each case is refused with.
REASONS = {
    "hello.bitflip_box": "hello does not verify",
    "hello.truncated_last_byte": "hello must be 128 bytes, got 127",
    "hello.truncated_header": "hello must be 128 bytes, got 40",
    "hello.wrong_magic": "unknown packet magic",
    "hello.counter_not_zero": "hello counter must be 0",
    "cookie.bitflip_box": "cookie does not verify: wrong server key?",
    "cookie.truncated_last_byte": "cookie must be 168 bytes, got 167",
    "cookie.truncated_header": "cookie must be 168 bytes, got 20",
    "cookie.wrong_magic": "unknown packet magic",
    "vouch.bitflip_box": "vouch box does not verify",
    "vouch.truncated_last_byte": "vouch must be 224 bytes, got 223",
    "vouch.truncated_header": "vouch must be 224 bytes, got 108",
    "vouch.wrong_magic": "unknown packet magic",
    "vouch.bitflip_cookie_K": "cookie does not verify",
    "vouch.counter_not_one": "vouch counter must be 1",
    "vouch.registry_rejects_client": "client key not in registry",
    "c2s_msg.bitflip_box": "message does not verify",
    "c2s_msg.truncated_last_byte": "message does not verify",
    "c2s_msg.truncated_header": "message shorter than 32 bytes",
    "c2s_msg.wrong_magic": "unknown packet magic",
    "c2s_msg.counter_repeat_replay": "message counter 2 is not previous+1 (3)",
    "c2s_msg.counter_repeat_fresh_box": "message counter 2 is not previous+1 (3)",
    "c2s_msg.counter_skip": "message counter 4 is not previous+1 (3)",
    "c2s_msg.counter_max": "message counter limit",
    "c2s_msg.vouch_replayed_when_connected": "unexpected vouch packet, expected message",
    "c2s_msg.counter3_first": "message counter 3 is not previous+1 (2)",
    "s2c_msg.bitflip_box": "message does not verify",
    "s2c_msg.truncated_last_byte": "message does not verify",
    "s2c_msg.wrong_magic": "unknown packet magic",
    "s2c_msg.counter_repeat_replay": "message counter 2 is not previous+1 (3)",
}

PEER_HOST = "127.0.0.1"


def registry(case: dict[str, Any]) -> dict[str, bytes]:
    """
    The server's registry in C{case}: the client's key C{C} for the peer's
    address, unless the case maps it to another key.
    """
    override = case["registry_override_key_for_127_0_0_1"]
    return {PEER_HOST: C if override is None else unhex(override)}


def server_awaiting_hello(case: dict[str, Any], payload: bytes) -> None:
    """
    Deliver C{payload} to a server on a fresh connection.
    """
    server_open_hello(parse_as(payload, Hello), server_vault())


def client_awaiting_cookie(case: dict[str, Any], payload: bytes) -> None:
    """
    Deliver C{payload} to a client that sent the hello of handshake.json.
    """
    _, shared = client_hello(S, CLIENT_EPHEMERAL)
    client_open_cookie(parse_as(payload, Cookie), shared)


def server_awaiting_vouch(case: dict[str, Any], payload: bytes) -> None:
    """
    Deliver C{payload} to a server that sent the cookie of handshake.json,
    and do what the connection does with the vouch: open it, check the
    registry, verify it.
    """
    opened = server_open_vouch(parse_as(payload, Vouch), FakeCookieSealer(TS))
    if registry(case)[PEER_HOST] != opened.client_key:
        raise BadPacket("client key not in registry")
    server_verify_vouch(opened, server_vault())


def _connected(session: Session, direction: str, case: dict[str, Any], payload: bytes) -> None:
    # The messages the receiver already took, then the case's payload.
    for counter in case["prior_msg_counters_received"]:
        session.open(parse_as(BASE_PACKETS[f"{direction}_{counter}"], Message))
    session.open(parse_as(payload, Message))


def server_connected(case: dict[str, Any], payload: bytes) -> None:
    """
    Deliver C{payload} to the server after the handshake of handshake.json
    and the case's prior client messages.
    """
    _connected(connected_sessions()[1], "c2s", case, payload)


def client_connected(case: dict[str, Any], payload: bytes) -> None:
    """
    Deliver C{payload} to the client after the handshake of handshake.json
    and the case's prior server messages.
    """
    _connected(connected_sessions()[0], "s2c", case, payload)


TARGETS: dict[str, Callable[[dict[str, Any], bytes], None]] = {
    "server_awaiting_hello": server_awaiting_hello,
    "client_awaiting_cookie": client_awaiting_cookie,
    "server_awaiting_vouch": server_awaiting_vouch,
    "server_connected": server_connected,
    "client_connected": client_connected,
}


class RejectVectorTests(SynchronousTestCase):
    """
    One test per case of reject.json, named after its id; and positive
    controls showing that the same states accept the unmodified packets.
    """

    def test_every_case_has_a_reason(self) -> None:
        """
        The table of reasons covers exactly the cases of reject.json.
        """
        self.assertEqual(sorted(REASONS), sorted(case["id"] for case in CASES))

    def test_unmodified_packets_accepted(self) -> None:
        """
        Each state accepts its unmodified packet from handshake.json, and
        after message 2 the next message 3 (the state the counter cases set
        up).
        """
        control: dict[str, Any] = {
            "prior_msg_counters_received": [],
            "registry_override_key_for_127_0_0_1": None,
        }
        server_awaiting_hello(control, BASE_PACKETS["hello"])
        client_awaiting_cookie(control, BASE_PACKETS["cookie"])
        server_awaiting_vouch(control, BASE_PACKETS["vouch"])
        server_connected(control, BASE_PACKETS["c2s_2"])
        client_connected(control, BASE_PACKETS["s2c_2"])
        control["prior_msg_counters_received"] = [2]
        server_connected(control, BASE_PACKETS["c2s_3"])
        client_connected(control, BASE_PACKETS["s2c_3"])

    def test_registry_case_fails_only_the_registry(self) -> None:
        """
        In vouch.registry_rejects_client the vouch is authentic and vouches
        for C{C}; only the registry, which maps the peer to another key,
        refuses it.
        """
        (case,) = [c for c in CASES if c["failure_class"] == "client_key_not_in_registry"]
        opened = server_open_vouch(parse_as(unhex(case["payload"]), Vouch), FakeCookieSealer(TS))
        server_verify_vouch(opened, server_vault())
        self.assertEqual(opened.client_key, C)
        self.assertNotEqual(opened.client_key, registry(case)[PEER_HOST])


def _make_test(case: dict[str, Any]) -> Callable[[RejectVectorTests], None]:
    def test(self: RejectVectorTests) -> None:
        payload = unhex(case["payload"])
        self.assertEqual(len(payload), case["payload_len"])
        exc = self.assertRaises(BadPacket, TARGETS[case["target"]], case, payload)
        self.assertEqual(exc.reason, REASONS[case["id"]])

    test.__name__ = "test_" + case["id"].replace(".", "_")
    test.__doc__ = (
        f"{case['id']} ({case['failure_class']}): {case['mutation']}, delivered to"
        f" the {case['target_desc']}, is refused."
    )
    return test


for _case in CASES:
    _test = _make_test(_case)
    setattr(RejectVectorTests, _test.__name__, _test)
