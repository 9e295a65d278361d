"""
An established session: boxing and opening messages (spec section 4).

This is the per-message path, so L{Session} is a plain slotted class that
holds the precomputed C{crypto_box_beforenm} key of C{(EC, ES)} and does
one C{crypto_box_*_easy_afternm} call per message: no X25519 per message.
"""

from __future__ import annotations

from nacl.bindings import crypto_box_easy_afternm, crypto_box_open_easy_afternm
from nacl.exceptions import CryptoError

from curvetun.errors import BadPacket, CounterExhausted, MessageTooLong
from curvetun.nonces import CLIENT_MESSAGE_PREFIX, SERVER_MESSAGE_PREFIX
from curvetun.packets import MAX_MESSAGE, MESSAGE_MAGIC, MESSAGE_OVERHEAD, Message


class Session:
    """
    One side of an established session: seals outgoing messages with the
    next send counter and opens incoming ones in strict counter order.

    Each direction counts on its own. Counters 0 and 1 were used by hello
    and vouch, so the first message either way has counter 2, and a receiver
    accepts only C{previous + 1}: over TCP anything else means that a packet
    was replayed, reordered or removed.

    @ivar next_send: the counter of the next message L{seal} makes.
    @ivar last_received: the counter of the last message L{open} accepted
        (1 before the first).
    """

    __slots__ = ("_key", "_receive_prefix", "_send_prefix", "last_received", "next_send")

    COUNTER_LIMIT = 2**64 - 1
    """No message is sent or accepted with this counter or above (spec 4)."""

    def __init__(self, shared_key: bytes, send_prefix: bytes, receive_prefix: bytes) -> None:
        """
        @param shared_key: C{crypto_box_beforenm} of the peer's ephemeral
            public key and our ephemeral secret key.
        @param send_prefix: the 16-byte nonce prefix of our messages.
        @param receive_prefix: the 16-byte nonce prefix of the peer's.
        """
        self._key = shared_key
        self._send_prefix = send_prefix
        self._receive_prefix = receive_prefix
        self.next_send = 2
        self.last_received = 1

    @classmethod
    def for_client(cls, shared_key: bytes) -> Session:
        """
        The client's session: it sends C{CurveCP-client-M} nonces and
        receives C{CurveCP-server-M} ones.
        """
        return cls(shared_key, CLIENT_MESSAGE_PREFIX, SERVER_MESSAGE_PREFIX)

    @classmethod
    def for_server(cls, shared_key: bytes) -> Session:
        """
        The server's session: it sends C{CurveCP-server-M} nonces and
        receives C{CurveCP-client-M} ones.
        """
        return cls(shared_key, SERVER_MESSAGE_PREFIX, CLIENT_MESSAGE_PREFIX)

    def __repr__(self) -> str:
        # Never show the key.
        side = "client" if self._send_prefix == CLIENT_MESSAGE_PREFIX else "server"
        return f"<Session {side} next_send={self.next_send} last_received={self.last_received}>"

    def seal(self, message: bytes) -> bytes:
        """
        Box C{message} with the next send counter.

        @return: the whole message payload, C{magic || u64be(N) || box}.
        @raise MessageTooLong: C{message} is longer than 65503 bytes.
        @raise CounterExhausted: the send counter reached L{COUNTER_LIMIT};
            the connection must be closed.
        """
        header, box = self.seal_frame(message)
        return header[2:] + box

    def seal_frame(self, message: bytes) -> tuple[bytes, bytes]:
        """
        L{seal} C{message} as a whole frame in two parts, for a vectored
        write: the 18-byte head (length prefix, magic, counter) and the box.
        The per-message fast path uses it, to save copying the box.

        @raise MessageTooLong: as for L{seal}.
        @raise CounterExhausted: as for L{seal}.
        """
        if len(message) > MAX_MESSAGE:
            raise MessageTooLong(
                f"a message of {len(message)} bytes is longer than the"
                f" {MAX_MESSAGE} bytes one protocol message can carry; split it"
            )
        n = self.next_send
        if n >= self.COUNTER_LIMIT:
            raise CounterExhausted("the session's message counter is exhausted")
        # The same 8 bytes go into the nonce and the header.
        counter = n.to_bytes(8, "big")
        box: bytes = crypto_box_easy_afternm(message, self._send_prefix + counter, self._key)
        self.next_send = n + 1
        length = (MESSAGE_OVERHEAD + len(message)).to_bytes(2, "big")
        return length + MESSAGE_MAGIC + counter, box

    def open(self, message: Message) -> bytes:
        """
        Open the peer's next message.

        The counter is checked before the box is opened (as the original
        does), and only a message that opens advances L{last_received}.

        @return: the plaintext.
        @raise BadPacket: the counter is not C{last_received + 1}, is at
            the limit, or the box does not verify.
        """
        return self._open(message.counter, message.box)

    def open_payload(self, payload: bytes) -> bytes:
        """
        L{open} a whole message payload (magic included, unchecked): the
        per-message fast path, which makes no L{Message}.

        @raise BadPacket: the payload is too short, or as for L{open}.
        """
        if len(payload) < MESSAGE_OVERHEAD:
            raise BadPacket(f"message shorter than {MESSAGE_OVERHEAD} bytes")
        return self._open(int.from_bytes(payload[8:16], "big"), payload[16:])

    def _open(self, n: int, box: bytes) -> bytes:
        if n >= self.COUNTER_LIMIT:
            raise BadPacket("message counter limit")
        if n != self.last_received + 1:
            raise BadPacket(f"message counter {n} is not previous+1 ({self.last_received + 1})")
        try:
            plaintext: bytes = crypto_box_open_easy_afternm(
                box, self._receive_prefix + n.to_bytes(8, "big"), self._key
            )
        except CryptoError:
            raise BadPacket("message does not verify") from None
        self.last_received = n
        return plaintext
