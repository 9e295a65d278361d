"""
Open connections through a curvetun tunnel many at once, in a fresh
process, and count the Twisted transports that have an instance dictionary
of their own (for C{tests/test_shared_keys.py}).

    python tests/_shared_keys_census.py DIRECTORY CONNECTIONS [--untaught]

In one process, as the two ends of C{twist curvetun} run it: a plain TCP
listener forwarding to a curvetun client endpoint, a curvetun listener
(endpoint strings with key directories made in DIRECTORY) forwarding to a
TCP echo. CONNECTIONS connections are opened all at once to the plain
listener, each one byte there and back. Then, for Twisted's C{tcp.Server}
and C{tcp.Client}, it writes one JSON object to standard output: the
number of instances, and how many of them have a dictionary of their own.

With C{--untaught}, curvetun does not teach the transport classes their
later attributes (L{curvetun.shared_keys.share_transport_keys} is made to
believe it has run), to show what that changes.
"""

from __future__ import annotations

import gc
import json
import sys
from typing import Any


def _has_own_dictionary(instance: object) -> bool:
    # Asking for __dict__ would make one: look at what the collector sees
    # (the attribute values, or the dictionary that holds them). No
    # attribute of a Twisted transport is itself a dictionary.
    return any(type(referent) is dict for referent in gc.get_referents(instance))


def census() -> dict[str, list[int]]:
    from twisted.internet import tcp

    counts: dict[str, list[int]] = {"tcp.Server": [0, 0], "tcp.Client": [0, 0]}
    for instance in gc.get_objects():
        kind = type(instance)
        if kind is tcp.Server or kind is tcp.Client:
            entry = counts[f"tcp.{kind.__name__}"]
            entry[0] += 1
            entry[1] += _has_own_dictionary(instance)
    return counts


async def run(reactor: Any, directory: str, connections: int) -> dict[str, list[int]]:
    from twisted.internet.defer import Deferred, gatherResults
    from twisted.internet.endpoints import (
        TCP4ClientEndpoint,
        TCP4ServerEndpoint,
        clientFromString,
        connectProtocol,
        serverFromString,
    )
    from twisted.internet.protocol import Protocol

    from curvetun.bench.transports import (
        KeyDirectories,
        curvetun_client_description,
        curvetun_server_description,
    )
    from curvetun.tunnel import EchoFactory, ForwardingFactory

    keys = KeyDirectories.create(directory)
    backend = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(EchoFactory())
    backend_address = f"tcp:127.0.0.1:{backend.getHost().port}"
    server_end = await serverFromString(
        reactor, curvetun_server_description(0, keys.server_keydir, keys.server_registry)
    ).listen(ForwardingFactory(clientFromString(reactor, backend_address), backend_address))
    forward = curvetun_client_description(
        server_end.getHost().port, keys.server_key, keys.client_keydir, keys.client_registry
    )
    client_end = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        ForwardingFactory(clientFromString(reactor, forward), "curvetun")
    )

    class OneByte(Protocol):
        def __init__(self) -> None:
            self.echoed: Deferred[None] = Deferred()

        def connectionMade(self) -> None:
            assert self.transport is not None
            self.transport.write(b"!")

        def dataReceived(self, data: bytes) -> None:
            self.echoed.callback(None)

    async def one() -> OneByte:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", client_end.getHost().port)
        protocol = OneByte()
        await connectProtocol(endpoint, protocol)
        await protocol.echoed
        return protocol

    opened = await gatherResults([Deferred.fromCoroutine(one()) for _ in range(connections)])
    result = census()
    for protocol in opened:
        assert protocol.transport is not None
        protocol.transport.loseConnection()
    return result


def main(argv: list[str]) -> int:
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    import curvetun.shared_keys

    if "--untaught" in argv:
        curvetun.shared_keys._taught = True
    results: list[object] = []

    def finish(outcome: object) -> None:
        results.append(outcome)
        reactor.stop()

    Deferred.fromCoroutine(run(reactor, argv[1], int(argv[2]))).addBoth(finish)
    reactor.run()
    outcome = results[0]
    if not isinstance(outcome, dict):
        sys.stderr.write(f"{outcome}\n")
        return 1
    sys.stdout.write(json.dumps(outcome) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
