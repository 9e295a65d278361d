"""
What one tunnel of C{twist curvetun} is, as a value: L{TunnelConfig} (its
listen endpoints, where it forwards or that it echoes, its identity, its
limits and timeouts), and the checks that turn the text an operator wrote
into its numbers.

The command line builds one L{TunnelConfig}; the tunnel service
(L{curvetun.tunnel_service}) takes a list of them, so that a file
describing several tunnels needs no other path through the code.
"""

from __future__ import annotations

import math

import attrs

from .endpoints import DEFAULT_PORT
from .transport import DEFAULT_HANDSHAKE_TIMEOUT, ConnectionLimits

DEFAULT_GRACE = 10.0
"""
Seconds open connections may take to finish when the service stops.
"""

DEFAULT_LISTEN = f"curvetun:{DEFAULT_PORT}"
"""
Where a tunnel listens when it is told nowhere.
"""

MAX_NUMBER_LENGTH = 32
"""
The longest text taken for a number. Checked before converting: Python
refuses to convert integers of more than 4,300 digits with an error of its
own, and a float of a million digits costs time to read; no sensible
count or number of seconds is longer than this.
"""


@attrs.frozen
class TunnelConfig:
    """
    One tunnel: what it listens on, what it does with each connection, and
    with which identity and bounds.

    @ivar keydir: the key directory of the tunnel's long-term key (created,
        with a fresh key, if it does not exist).
    @ivar listen: the server endpoint strings to listen on, at least one.
    @ivar forward: the client endpoint string each connection is forwarded
        to, or L{None} to echo what is received.
    @ivar registry: the registry file, or L{None} for the key directory's.
    @ivar grace: seconds open connections may take to finish on stop.
    @ivar handshake_timeout: seconds a curvetun handshake may take.
    @ivar idle_timeout: seconds a curvetun connection may receive nothing
        before it is closed, or L{None} for never.
    @ivar limits: how many connections the curvetun listen endpoints take.
    """

    keydir: str
    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    forward: str | None = None
    registry: str | None = None
    grace: float = DEFAULT_GRACE
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    idle_timeout: float | None = None
    limits: ConnectionLimits = attrs.field(factory=ConnectionLimits)

    @property
    def serving(self) -> str:
        """
        What the tunnel does with a connection, for a log message.
        """
        return "echo" if self.forward is None else f"forwarding to {self.forward}"


def parse_seconds(name: str, text: str, allow_zero: bool) -> float:
    """
    Parse a number of seconds given for C{name}.

    @raise ValueError: it is longer than L{MAX_NUMBER_LENGTH}, not a finite
        number, negative, or zero when C{allow_zero} is false (a one-line
        message naming C{name}).
    """
    value = math.nan
    if len(text) <= MAX_NUMBER_LENGTH:
        try:
            value = float(text)
        except ValueError:
            pass
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        kind = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"{name} must be {kind} number of seconds, not {_quoted(text)}")
    return value


def parse_count(name: str, text: str) -> int:
    """
    Parse a whole number (a limit) given for C{name}.

    @raise ValueError: it is not a string of at most L{MAX_NUMBER_LENGTH}
        ASCII digits (a one-line message naming C{name}).
    """
    if not (len(text) <= MAX_NUMBER_LENGTH and text.isascii() and text.isdigit()):
        raise ValueError(
            f"{name} must be a whole number of at most {MAX_NUMBER_LENGTH} digits, "
            f"not {_quoted(text)}"
        )
    return int(text)


def _quoted(text: str) -> str:
    """
    C{text} quoted for a message, cut short if long.
    """
    return repr(text[:40]) + ("..." if len(text) > 40 else "")
