"""
Replay protection for vouches (spec, "Known weaknesses of v1.0").

A recorded hello, vouch and the messages after them can be replayed on a new
TCP connection for as long as the cookie inside the vouch still opens. The
server therefore remembers the client ephemeral key C{EC} of every vouch it
accepted for that long and refuses a repeat. Each honest connection makes a
fresh C{EC}, so a repeat is always a replay.

"For that long" is not a time: it is counted in cookie-key generations
(L{curvetun.cookies.CookieKeys.generations}). A vouch accepted while
generation C{g} is current carried a cookie of generation C{g} or C{g - 1}
(no other key opens cookies then); it is filed under C{g} and forgotten only
once generation C{g} is no longer accepted, which is never before the key
of its cookie is discarded, since keys go oldest first. No clock is read
here, so no clock step, in either direction, can make the memory forget a
vouch whose cookie still opens.
"""

from __future__ import annotations

from typing import Protocol

DEFAULT_MAX_ENTRIES = 250_000
"""
About 100 bytes an entry (a set slot and a 32-byte bytes object; measured
with tracemalloc): some 25 MiB at most, which covers a sustained 2,000
accepted handshakes a second over the two cookie periods (120 s) an entry is
kept at most while the cookie keys rotate on time.
"""


class KeyGenerations(Protocol):
    """
    The cookie keys, as far as the replay memory needs them; provided by
    L{curvetun.cookies.CookieKeys}.
    """

    def generations(self) -> tuple[int, int]:
        """
        C{(oldest, current)}: the generations whose keys open cookies now.
        """


class ReplayGuard:
    """
    Remembers the client ephemeral keys of accepted vouches for as long as
    a cookie key that could open their cookies is held by C{cookie_keys}.

    Memory is bounded by C{max_entries}. When full, it refuses new vouches
    rather than forgetting old ones: forgetting would re-open the replay
    window, and only vouches that fully verified (from keys the registry
    admits) take up room. Entries of discarded generations are let go at
    the next L{remember}.
    """

    def __init__(self, cookie_keys: KeyGenerations, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self._cookie_keys = cookie_keys
        self._max_entries = max_entries
        # Generation -> the EC of the vouches accepted while it was current.
        # At most two generations are held at once, so this holds at most
        # two or three sets.
        self._by_generation: dict[int, set[bytes]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def remember(self, client_ephemeral_key: bytes) -> bool:
        """
        Record C{client_ephemeral_key}; return False if it was seen while a
        key that could open its cookie was held (a replay), or if the guard
        is full.
        """
        oldest, current = self._cookie_keys.generations()
        by_generation = self._by_generation
        for generation in [g for g in by_generation if g < oldest]:
            self._count -= len(by_generation.pop(generation))
        if any(client_ephemeral_key in seen for seen in by_generation.values()):
            return False
        if self._count >= self._max_entries:
            return False
        by_generation.setdefault(current, set()).add(client_ephemeral_key)
        self._count += 1
        return True
