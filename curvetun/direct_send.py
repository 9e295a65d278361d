"""
Handing bytes to a connection's socket at once, when nothing is waiting
ahead of them: one system call, where Twisted's TCP transport makes three.

Twisted's TCP and UNIX transports never send from C{write}: they append to
a buffer, register the socket for writing (an C{epoll_ctl}), and send when
the reactor next finds it writable, then unregister it (another
C{epoll_ctl}). For a writer that answers a read, or relays one, that is
two system calls and a turn of the reactor's loop more for every message,
and a join of the parts: most of what a hop through a tunnel end costs.

L{send_at_once} sends straight to the socket when the transport is one of
Twisted's own socket transports and holds nothing unsent, and gives what
the socket does not take (all of it, for any other transport, or when
bytes are already waiting) to the transport's C{writeSequence}, which then
works as usual: the order of the bytes, flow control (a registered
producer is paused once the buffer passes its size) and errors are
Twisted's. An error of the send itself is left to Twisted too: the bytes
go to the buffer, and the reactor's own send meets the same error and
closes the connection as it always does.

This reads attributes Twisted keeps private (the two halves of its write
buffer, whether the write side was shut, and file descriptors queued to
go with the next bytes on a UNIX socket): they have not changed in many
years, and the tests run against the oldest Twisted declared.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.tcp import Connection


def send_at_once(transport: object, chunks: Sequence[bytes]) -> None:
    """
    Send C{chunks}, in order, on C{transport}: as much as the socket takes
    now in one system call if nothing is waiting to be sent before them,
    the rest through C{transport.writeSequence}.

    @param transport: any transport with a C{writeSequence}; only
        Twisted's TCP and UNIX transports are sent on directly.
    @param chunks: the bytes to send, one message's head and box for
        instance; a vectored send, so they are not joined.
    """
    if not chunks:
        return
    if _idle_socket(transport):
        assert isinstance(transport, Connection)
        try:
            if len(chunks) == 1:
                sent = transport.socket.send(chunks[0])
            else:
                sent = transport.socket.sendmsg(chunks)
        except OSError:
            # Full (EAGAIN), interrupted, or a real error: the transport's
            # own send, when the reactor finds the socket writable, retries
            # or meets the error and closes the connection.
            sent = 0
        if sent:
            chunks = _after(chunks, sent)
            if not chunks:
                return
    transport.writeSequence(chunks)  # type: ignore[attr-defined]


def _idle_socket(transport: object) -> bool:
    """
    Whether C{transport} is a connected socket transport of Twisted's
    (TCP or UNIX, not TLS) with nothing waiting to be sent, no shutdown of
    its write side begun and no file descriptors to pass: then bytes sent
    straight to its socket go out in the order they were written.
    """
    return (
        isinstance(transport, Connection)
        and bool(transport.connected)
        and not transport.disconnecting
        and not transport._writeDisconnecting
        and not transport.dataBuffer
        and transport._tempDataLen == 0
        and not getattr(transport, "TLS", False)
        and not getattr(transport, "_sendmsgQueue", None)
    )


def _after(chunks: Sequence[bytes], sent: int) -> Sequence[bytes]:
    """
    What is left of C{chunks} once their first C{sent} bytes are sent.
    """
    for index, chunk in enumerate(chunks):
        size = len(chunk)
        if sent < size:
            rest = list(chunks[index:])
            if sent:
                rest[0] = chunk[sent:]
            return rest
        sent -= size
    return ()
