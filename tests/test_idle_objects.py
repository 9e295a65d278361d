"""
What an idle established connection keeps: the objects of its established
phase, and nothing of its handshake. Counted in objects (those the garbage
collector tracks), not bytes: the count does not depend on the machine or
on timing, and grows only when a connection keeps something more.
"""

from __future__ import annotations

import gc
from collections import Counter
from types import ModuleType
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from curvetun.admission import ConnectionLimits
from curvetun.transport import CurveTunProtocol

from ._support import Peers

CONNECTIONS = 10

# Objects that exist for the handshake only: none may outlive it.
HANDSHAKE_ONLY = {
    "Hello",
    "Cookie",
    "Vouch",
    "OpenedVouch",
    "EphemeralKeyPair",
    "Initiating",
    "Accepting",
    "Deferred",
    "DelayedCall",
    "LocalHandshakeVault",
}

# Per connection (a client and a server side, in memory): curvetun's own
# objects, at most this many of each.
CURVETUN_OBJECTS = Counter(
    {
        "CurveTunProtocol": 2,
        "FrameDecoder": 2,
        "Established": 2,
        "Session": 2,
        "Transitioner": 2,  # Automat's, one per machine
        "Typed<ServerInputs>": 1,
        "Typed<ClientInputs>": 1,
        "ServerCore": 1,
        "ClientCore": 1,
        "CurveTunClientFactory": 1,  # a client factory per connect, as endpoints make
        "_Entry": 1,  # the server's admission
    }
)

# Every tracked object a connection keeps, both sides, with the test's own
# (the in-memory transports and pump, the recording protocols): 34.2
# measured once the frame decoders kept no refused callback (a bound method
# each) after the handshake.
MOST_OBJECTS = 35


def idle_connection_objects() -> tuple[Counter[tuple[str, str]], list[Any]]:
    """
    Open one connection (so that what every connection shares exists),
    then C{CONNECTIONS} more, each established and idle after one message
    each way; return the types of the tracked objects that appeared
    meanwhile, and the connections (to keep them open).
    """
    peers = Peers(
        limits=ConnectionLimits(
            None, None, None, None, connections_per_network=None, handshakes_per_network=None
        )
    )
    held: list[Any] = []

    def open_one() -> None:
        client, server, pump = peers.connect()
        client.write(b"ping")
        pump.flush()
        server.write(b"pong")
        pump.flush()
        assert server.established_at is not None and client.wrappedProtocol is not None
        held.append((client, server, pump))

    open_one()
    gc.collect()
    before = {id(thing) for thing in gc.get_objects()}
    for _ in range(CONNECTIONS):
        open_one()
    gc.collect()
    appeared = [thing for thing in gc.get_objects() if id(thing) not in before]
    # An instance's attribute dict is part of the instance: Python 3.10
    # tracks it as an object of its own, 3.11 and later do not (until it is
    # asked for). Counted with its instance, the count is the same on each.
    attribute_dicts = {id(d) for d in map(_attribute_dict, appeared) if d is not None}
    new = Counter(_type_of(thing) for thing in appeared if id(thing) not in attribute_dicts)
    return new, held


def _attribute_dict(thing: object) -> dict[str, Any] | None:
    """
    The C{__dict__} of an instance C{thing} (not of a class or a module).
    """
    if isinstance(thing, type | ModuleType):
        return None
    try:
        attributes = object.__getattribute__(thing, "__dict__")
    except AttributeError:
        return None
    return attributes if type(attributes) is dict else None


def _type_of(thing: object) -> tuple[str, str]:
    """
    The module and name of C{thing}'s type.
    """
    module = type(thing).__dict__.get("__module__")
    return (module if isinstance(module, str) else "", type(thing).__qualname__)


class IdleConnectionObjectsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.objects, self.connections = idle_connection_objects()

    def test_an_established_connection_keeps_nothing_of_its_handshake(self) -> None:
        # The machines' state data included, which Automat keeps until a
        # state with data replaces it: the client's ephemeral secret key and
        # the key shared with the server's long-term key among them.
        kept = {name: count for (_, name), count in self.objects.items() if name in HANDSHAKE_ONLY}
        self.assertEqual(kept, {})

    def test_a_connection_keeps_only_its_established_objects(self) -> None:
        # Automat's machine types are made in curvetun.connection.
        per_connection = {
            name: count / CONNECTIONS
            for (module, name), count in self.objects.items()
            if module.startswith("curvetun.") or name == "Transitioner"
        }
        unexpected = {
            name: count
            for name, count in per_connection.items()
            if count > CURVETUN_OBJECTS.get(name, 0)
        }
        self.assertEqual(unexpected, {})

    def test_a_connection_keeps_at_most_its_count_of_objects(self) -> None:
        self.assertLessEqual(sum(self.objects.values()) / CONNECTIONS, MOST_OBJECTS)

    def test_the_connections_are_open(self) -> None:
        # What was counted is what open connections hold.
        for client, server, _ in self.connections:
            self.assertIsInstance(client, CurveTunProtocol)
            self.assertFalse(client.disconnecting or server.disconnecting)
