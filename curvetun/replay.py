"""
Replay protection for vouches (spec, "Known weaknesses of v1.0").

A recorded hello, vouch and the messages after them can be replayed on a new
TCP connection for as long as the cookie inside the vouch still opens (two
cookie-key periods). The server therefore remembers the client ephemeral key
C{EC} of every vouch it accepted for that long and refuses a repeat. Each
honest connection makes a fresh C{EC}, so a repeat is always a replay.
"""

from __future__ import annotations

from collections import deque

from twisted.internet.interfaces import IReactorTime

DEFAULT_MAX_ENTRIES = 250_000
"""
About 200 bytes an entry (a set slot, a 32-byte bytes object, a deque slot
holding a tuple and a float): some 50 MiB at most, which covers a sustained
2,000 accepted handshakes a second over the two-minute window.
"""


class ReplayGuard:
    """
    Remembers the client ephemeral keys of accepted vouches for C{lifetime}
    seconds.

    Memory is bounded by C{max_entries}. When full, it refuses new vouches
    rather than forgetting old ones: forgetting would re-open the replay
    window, and only vouches that fully verified (from keys the registry
    admits) take up room.
    """

    def __init__(
        self,
        clock: IReactorTime,
        lifetime: float,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        self._clock = clock
        self._lifetime = lifetime
        self._max_entries = max_entries
        # Every entry lives for the same lifetime, so arrival order is
        # expiry order: expire from the left of the deque.
        self._order: deque[tuple[float, bytes]] = deque()
        self._seen: set[bytes] = set()

    def __len__(self) -> int:
        return len(self._seen)

    def remember(self, client_ephemeral_key: bytes) -> bool:
        """
        Record C{client_ephemeral_key}; return False if it was seen within
        the lifetime (a replay) or if the guard is full.
        """
        now = self._clock.seconds()
        order, seen = self._order, self._seen
        while order and order[0][0] <= now:
            seen.discard(order.popleft()[1])
        if client_ephemeral_key in seen or len(seen) >= self._max_entries:
            return False
        seen.add(client_ephemeral_key)
        order.append((now + self._lifetime, client_ephemeral_key))
        return True
