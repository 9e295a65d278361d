"""
The server's cookie ("minute") keys (spec "Cookie keys").

The cookie C{K} carries the server's connection state through the client
and back, sealed under a key C{Ts} that only the server knows and that is
replaced every minute, so that a cookie is good for 60 to 120 seconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import nacl.utils
from nacl.bindings import crypto_secretbox_easy, crypto_secretbox_open_easy
from nacl.exceptions import CryptoError
from twisted.application.internet import TimerService
from twisted.internet.interfaces import IReactorTime

from curvetun.errors import BadPacket
from curvetun.nonces import MINUTE_KEY_PREFIX, long_term_nonce

COOKIE_KEY_SIZE = 32
_SAFE_NONCE_SIZE = 16
_EPHEMERAL_KEY_SIZE = 32  # EC and ESs
# K = SN (16) || secretbox(EC || ESs) (64 + 16)
COOKIE_K_SIZE = 96


class CookieKeys(TimerService):
    """
    The current and the previous cookie key. They live only in memory.

    Time is cut into periods of C{interval} seconds on the clock; each
    period has its own key, and a cookie opens in the period it was sealed
    in and the next one, so it lives C{interval} to twice that. Keys are
    replaced by the timer while the service runs (so an old key is
    forgotten even when no connection comes), and whenever one is used: a
    stopped service, a blocked reactor or a jump of the clock never keeps
    a cookie alive longer (the replay memory, which forgets by the same
    clock, relies on this).
    """

    def __init__(
        self,
        interval: float = 60.0,
        clock: IReactorTime | None = None,
        initial_key: bytes | None = None,
        random_bytes: Callable[[int], bytes] = nacl.utils.random,
    ) -> None:
        """
        @param interval: the length of a period, in seconds.
        @param clock: the reactor's clock, or L{None} for the global reactor.
        @param initial_key: the key of the current period (known-answer
            tests give one); a random one if L{None}.
        @param random_bytes: the source of new keys.
        """
        if initial_key is not None and len(initial_key) != COOKIE_KEY_SIZE:
            raise ValueError(f"a cookie key is {COOKIE_KEY_SIZE} bytes")
        super().__init__(interval, self._catch_up)
        self.clock = clock
        self._random_bytes = random_bytes
        # The current key first, then the previous one once there is one.
        self._keys: tuple[bytes, ...] = (
            random_bytes(COOKIE_KEY_SIZE) if initial_key is None else initial_key,
        )
        self._period = self._current_period()

    def _current_period(self) -> int:
        clock = self.clock
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        assert clock is not None
        period: int = math.floor(clock.seconds() / self.step)
        return period

    def _catch_up(self) -> None:
        """
        Bring the keys up to the current period: one new key if one period
        began since the last, two (forgetting both old ones) if more did.
        """
        period = self._current_period()
        behind = period - self._period
        if behind <= 0:
            return
        key = self._random_bytes(COOKIE_KEY_SIZE)
        self._keys = (key, self._keys[0]) if behind == 1 else (key,)
        self._period = period

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
