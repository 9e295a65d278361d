"""
A worker-like client of a vault process (for C{tests/test_vault_process.py}).

    python tests/_vault_hammer.py SOCKET nonces COUNT
    python tests/_vault_hammer.py SOCKET handshakes COUNT

C{nonces}: ask the vault for COUNT client vouches (C{SealVouch}), 32 at a
time on the one connection, and write each vouch nonce C{VN} to standard
output as 32 hex digits and a newline, one C{write} per nonce, as soon as
it arrives. Calls that fail (the vault was killed and is restarting) are
asked again, until COUNT have been answered; then it exits 0.

C{handshakes}: play the server side of COUNT whole handshakes through the
vault (hello, cookie, vouch) against clients made with the pure handshake
functions in this process, check that each completes, write C{ready} and
then wait until killed (the test reads this process's memory meanwhile).

With C{CURVETUN_HAMMER_GO=PATH} in its environment it writes C{connected}
to standard error once connected, and starts only once PATH exists: a
test starts several at once that way, whatever each took to start.

It never reads a key directory: it knows only the socket.
"""

from __future__ import annotations

import os
import sys


async def nonces(vault: object, count: int) -> None:
    from twisted.internet.defer import DeferredList
    from twisted.python.failure import Failure

    from curvetun.errors import CurveTunError
    from curvetun.remote_vault import RemoteVault
    from curvetun.vault import MemoryVault

    assert isinstance(vault, RemoteVault)
    server_key = MemoryVault.generate().public_key
    out = sys.stdout.fileno()
    answered = 0

    def write(answer: tuple[bytes, bytes]) -> None:
        nonlocal answered
        answered += 1
        os.write(out, answer[0].hex().encode("ascii") + b"\n")

    while answered < count:
        batch = [
            vault.seal_vouch(os.urandom(32), server_key).addCallback(write)
            for _ in range(min(32, count - answered))
        ]
        results = await DeferredList(batch, consumeErrors=True)
        for ok, result in results:
            if not ok:
                # A vault being killed fails calls cleanly; anything else is a bug.
                assert isinstance(result, Failure)
                result.trap(CurveTunError)


async def handshakes(vault: object, count: int) -> None:
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    from curvetun import handshake
    from curvetun.cookies import CookieKeys
    from curvetun.handshake import EphemeralKeyPair
    from curvetun.packets import Cookie, Hello, Vouch, parse_as
    from curvetun.remote_vault import RemoteVault
    from curvetun.vault import MemoryVault

    assert isinstance(vault, RemoteVault)
    cookie_key = os.urandom(32)
    cookie_keys = CookieKeys(clock=reactor, initial_key=cookie_key)
    client = MemoryVault.generate()
    for _ in range(count):
        ephemeral = EphemeralKeyPair.generate()
        hello, shared = handshake.client_hello(vault.public_key, ephemeral)
        cookie = await vault.open_hello_and_seal_cookie(
            parse_as(hello, Hello), EphemeralKeyPair.generate(), cookie_keys
        )
        server_ephemeral_key, cookie_K = handshake.client_open_cookie(
            parse_as(cookie, Cookie), shared
        )
        vouch, _ = handshake.client_vouch(
            cookie_K, server_ephemeral_key, ephemeral, vault.public_key, client
        )
        opened = handshake.server_open_vouch(parse_as(vouch, Vouch), cookie_keys)
        await vault.open_vouch(opened)
    os.write(sys.stdout.fileno(), b"ready\n")
    await Deferred()  # until killed


def main(argv: list[str]) -> None:
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from twisted.internet.endpoints import UNIXClientEndpoint
    from twisted.internet.task import deferLater, react

    from curvetun.remote_vault import RemoteVault

    socket, mode, count = argv[1], argv[2], int(argv[3])

    async def run(_: object) -> None:
        vault = await RemoteVault.connect(UNIXClientEndpoint(reactor, socket), reactor)
        go = os.environ.get("CURVETUN_HAMMER_GO")
        if go is not None:
            os.write(sys.stderr.fileno(), b"connected\n")
            while not os.path.exists(go):
                await deferLater(reactor, 0.01)
        await (nonces if mode == "nonces" else handshakes)(vault, count)
        await vault.stop()

    react(lambda r: Deferred.fromCoroutine(run(r)))


if __name__ == "__main__":
    main(sys.argv)
