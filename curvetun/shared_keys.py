"""
Keeping an idle connection's Twisted transport small, by teaching the
transport classes, before their first connection, the attributes their
instances set only later.

CPython (3.11 and later) keeps the attributes of an instance in a compact
array of values whose names (keys) its class shares with all its instances.
A class's shared keys take new names only for a while: each instance made
uses up one of their free places, so once a class has made a dozen or two
instances, an instance that sets a name the class has not seen yet gets a
whole dictionary of its own instead: 832 bytes for a Twisted TCP
transport's 15 attributes.

Twisted's TCP and UNIX transports set some attributes well after they are
made: a client transport its C{realAddress}, the C{doRead} and C{doWrite}
of its connect (set, then deleted), C{connected} and C{logstr} once it is
connected; any transport C{producer} and C{streamingProducer} when a
producer is registered with it (a relay registers each side with the other
once both are connected, after a curvetun handshake and a connect), and
C{dataBuffer}, C{offset} and C{producerPaused} when the socket does not
take what is written. A listener that accepts many connections at once
(a tunnel end restarted under load, a benchmark opening 16 at a time) makes
many transports before the first of them sets any of those, and then every
transport it makes has a dictionary of its own for the life of the
process: 1.6 KiB per tunnel connection on each end, measured, over a third
of what an idle tunnel connection held.

L{share_transport_keys} sets those names once, on a specimen of each class
that is thrown away, before curvetun's first connection: every transport
made later finds them among its class's shared keys. Nothing else changes
(no transport is touched, no value is kept), and Python 3.10, where every
instance has a dictionary, is left as it is.
"""

from __future__ import annotations

import sys

from twisted.internet import tcp

# Set after a transport is made (see above); bufferSize is set by curvetun's
# relay on a plain side of a bulk transfer (curvetun.tunnel).
_CONSUMER_ATTRIBUTES = (
    "producer",
    "streamingProducer",
    "producerPaused",
    "dataBuffer",
    "offset",
    "bufferSize",
)
_CLIENT_ATTRIBUTES = ("realAddress", "doRead", "doWrite", "connected", "logstr")

_taught = False


def _transport_classes() -> list[tuple[type, tuple[str, ...]]]:
    classes: list[tuple[type, tuple[str, ...]]] = [
        (tcp.Server, _CONSUMER_ATTRIBUTES),
        (tcp.Client, _CLIENT_ATTRIBUTES + _CONSUMER_ATTRIBUTES),
    ]
    try:
        from twisted.internet import unix
    except ImportError:  # no UNIX sockets on this platform
        return classes
    classes += [
        (unix.Server, _CONSUMER_ATTRIBUTES),
        (unix.Client, _CLIENT_ATTRIBUTES + _CONSUMER_ATTRIBUTES),
    ]
    return classes


def share_transport_keys() -> None:
    """
    Teach Twisted's TCP and UNIX transport classes the attributes their
    instances set after they are made, once per process (see the module's
    docstring); later calls do nothing. Called as curvetun's factories
    start, before they make their first connection.
    """
    global _taught
    if _taught:
        return
    _taught = True
    if sys.version_info < (3, 11):
        return
    for cls, names in _transport_classes():
        # A bare instance: no __init__, no socket; dropped at once (the
        # transports define no __del__).
        specimen: object = object.__new__(cls)
        for name in names:
            setattr(specimen, name, None)
