"""
The server's cookie ("minute") keys (spec "Cookie keys").

The cookie C{K} carries the server's connection state through the client
and back, sealed under a key C{Ts} that only the server knows and that is
replaced every minute, so that a cookie is good for 60 to 120 seconds.

Periods are counted on a monotonic clock (C{time.monotonic} unless one is
given), never on the wall clock: Twisted's reactors answer C{seconds()}
with C{time.time()}, which an NTP step, a restored VM or a date set by hand
moves back or forward. On the wall clock a step back by D kept the current
key for D + 60 s more, and a step forward threw away the key of every
handshake in flight.

Each key is a I{generation}, numbered from 0 in the order keys are made;
L{CookieKeys.generations} says which ones still open cookies. The replay
memory (L{curvetun.replay}) files every vouch it accepts under the current
generation and forgets it only once that generation is discarded, so that,
whatever any clock does, no vouch is forgotten while a key that could open
its cookie is still held.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import nacl.utils
from nacl.bindings import crypto_secretbox_easy, crypto_secretbox_open_easy
from nacl.exceptions import CryptoError
from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from curvetun.errors import BadPacket
from curvetun.nonces import MINUTE_KEY_PREFIX, long_term_nonce

COOKIE_KEY_SIZE = 32
_SAFE_NONCE_SIZE = 16
_EPHEMERAL_KEY_SIZE = 32  # EC and ESs
# K = SN (16) || secretbox(EC || ESs) (64 + 16)
COOKIE_K_SIZE = 96


class CookieKeys(Service):
    """
    The current and the previous cookie key. They live only in memory.

    Time, on the monotonic clock C{seconds}, is cut into periods of
    C{interval} seconds from the moment the keys are made; each period has
    its own key, and a cookie opens in the period it was sealed in and the
    next one, so it lives C{interval} to twice that.

    Keys are replaced whenever one is used, by the monotonic clock, so a
    stopped service, a blocked reactor or a step of the wall clock never
    keeps a cookie alive longer. While the service runs, a timer also
    replaces them at each period's end, so that an old key is erased even
    when no connection comes. That timer is the reactor's (C{clock}), which
    counts in wall time: a step of the wall clock can make it fire early (it
    then only schedules itself again) or late (the key is then erased late
    from memory, but it opens nothing any more: every use catches up
    first).

    @ivar step: the length of a period, in seconds.
    """

    def __init__(
        self,
        interval: float = 60.0,
        clock: IReactorTime | None = None,
        initial_key: bytes | None = None,
        random_bytes: Callable[[int], bytes] = nacl.utils.random,
        seconds: Callable[[], float] = time.monotonic,
    ) -> None:
        """
        @param interval: the length of a period, in seconds.
        @param clock: schedules the timer that erases old keys: the
            reactor, or L{None} for the global reactor.
        @param initial_key: the key of the current period (known-answer
            tests give one); a random one if L{None}.
        @param random_bytes: the source of new keys.
        @param seconds: the monotonic clock that periods are counted on
            (tests give a fake one, often the fake reactor's C{seconds}).
        """
        if initial_key is not None and len(initial_key) != COOKIE_KEY_SIZE:
            raise ValueError(f"a cookie key is {COOKIE_KEY_SIZE} bytes")
        self.step = interval
        self.clock = clock
        self._seconds = seconds
        self._origin = seconds()
        self._random_bytes = random_bytes
        # The current key first, then the previous one once there is one.
        self._keys: tuple[bytes, ...] = (
            random_bytes(COOKIE_KEY_SIZE) if initial_key is None else initial_key,
        )
        self._generation = 0  # of the current key
        self._period = 0
        self._timer: IDelayedCall | None = None

    def _elapsed(self) -> float:
        return self._seconds() - self._origin

    def _catch_up(self) -> None:
        """
        Bring the keys up to the current period: one new key if one period
        began since the last, two (forgetting both old ones) if more did.
        A clock that went back (a fake one; a monotonic clock does not)
        changes nothing: periods never go back.
        """
        period = math.floor(self._elapsed() / self.step)
        behind = period - self._period
        if behind <= 0:
            return
        key = self._random_bytes(COOKIE_KEY_SIZE)
        self._keys = (key, self._keys[0]) if behind == 1 else (key,)
        # Two generations pass when both old keys go: the one skipped was
        # never made, so no cookie can need it.
        self._generation += min(behind, 2)
        self._period = period

    def generations(self) -> tuple[int, int]:
        """
        The generations whose keys open cookies now, after catching up:
        C{(oldest, current)}. Generations only ever grow, and a key once
        discarded never comes back.
        """
        self._catch_up()
        return self._generation - len(self._keys) + 1, self._generation

    def _get_clock(self) -> IReactorTime:
        clock = self.clock
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        assert clock is not None
        return clock

    def _tick(self) -> None:
        self._timer = None
        self._catch_up()
        self._schedule()

    def _schedule(self) -> None:
        """
        Call L{_tick} at the end of the current period, by the monotonic
        clock. The reactor counts the delay in wall time; an early call
        (the wall clock stepped forward) finds nothing to do and comes here
        again with what remains of the period.
        """
        delay = max((self._period + 1) * self.step - self._elapsed(), 0.0)
        self._timer = self._get_clock().callLater(delay, self._tick)

    def startService(self) -> None:
        super().startService()
        self._catch_up()
        self._schedule()

    def stopService(self) -> None:
        super().stopService()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def seal(
        self, safe_nonce: bytes, client_ephemeral_key: bytes, server_ephemeral_secret: bytes
    ) -> bytes:
        """
        Return the 80-byte C{secretbox(EC || ESs, "minute-k" || SN, Ts)}
        under the current key; the cookie C{K} is C{SN} followed by it.
        """
        if {len(client_ephemeral_key), len(server_ephemeral_secret)} != {_EPHEMERAL_KEY_SIZE}:
            raise ValueError("EC and ESs are 32 bytes each")
        self._catch_up()
        return crypto_secretbox_easy(
            client_ephemeral_key + server_ephemeral_secret,
            long_term_nonce(MINUTE_KEY_PREFIX, safe_nonce),
            self._keys[0],
        )

    def current_key(self) -> bytes:
        """
        The key that L{seal} uses now, for a vault that seals the cookie
        itself (in another process; see L{curvetun.handshake_vault}).
        """
        self._catch_up()
        return self._keys[0]

    def open(self, cookie_K: bytes) -> tuple[bytes, bytes]:
        """
        Open a 96-byte cookie C{K = SN || secretbox} with the current key,
        then the previous one.

        @return: C{(EC, ESs)}.
        @raise BadPacket: C{K} has the wrong size, or neither key opens it.
        """
        self._catch_up()
        if len(cookie_K) == COOKIE_K_SIZE:
            nonce = long_term_nonce(MINUTE_KEY_PREFIX, cookie_K[:_SAFE_NONCE_SIZE])
            for key in self._keys:
                try:
                    plaintext = crypto_secretbox_open_easy(cookie_K[_SAFE_NONCE_SIZE:], nonce, key)
                except CryptoError:
                    continue
                return plaintext[:_EPHEMERAL_KEY_SIZE], plaintext[_EPHEMERAL_KEY_SIZE:]
        raise BadPacket("cookie does not open: expired or forged")

    def __repr__(self) -> str:
        return f"<CookieKeys every {self.step}s, {'running' if self.running else 'stopped'}>"
