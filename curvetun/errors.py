"""
The exceptions curvetun raises.

Every error a user can meet is a L{CurveTunError}; its C{str()} is one line
that says what went wrong and, where there is one, what to do about it.
"""

from __future__ import annotations


class CurveTunError(Exception):
    """
    Base class of every curvetun error.
    """


class BadPacket(CurveTunError):
    """
    A packet failed to parse or to verify: wrong size, unknown magic, a box
    that does not open, a counter out of sequence, or a packet that is not
    expected in the connection's current state.

    @ivar reason: a short human-readable description.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ReplayedVouch(BadPacket):
    """
    A vouch that the server accepted before, on another connection, was
    sent again.
    """


class HandshakeFailed(CurveTunError):
    """
    The handshake did not complete.
    """


class ServerKeyMismatch(HandshakeFailed):
    """
    The server closed the connection after our hello, or its cookie did not
    open: it is not a curvetun server, or its long-term key is not the one
    we expected.
    """


class NotAuthorized(HandshakeFailed):
    """
    The server closed the connection after our vouch: our long-term key is
    not allowed, from our address, by the server's registry.
    """


class HandshakeTimeout(HandshakeFailed):
    """
    The handshake did not complete in the allotted time.
    """


class HandshakeEvicted(HandshakeFailed):
    """
    The server, at its limit of connections or unfinished handshakes,
    closed this unfinished handshake to make room for a newer connection.
    """


class IdleTimeout(CurveTunError):
    """
    An established connection received nothing for longer than its idle
    timeout.
    """


class MessageTooLong(CurveTunError, ValueError):
    """
    A single message was larger than the protocol allows (65503 bytes).
    """


class ConnectionClosed(CurveTunError):
    """
    The operation cannot complete because the connection is closed.
    """


class KeyFileError(CurveTunError):
    """
    A key, nonce-key or counter file is missing, damaged, or has unsafe
    permissions.
    """


class RegistryError(CurveTunError):
    """
    A registry file could not be read or has a malformed line.
    """


class CounterExhausted(CurveTunError):
    """
    A session's message counter reached the protocol's limit; the connection
    must be closed (protocol v1.0 has no re-keying).
    """


class AdmissionRefused(HandshakeFailed):
    """
    The server closed a new connection as soon as it was accepted: the
    peer's address, its network or the server was at a connection limit.
    """
