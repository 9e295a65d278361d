"""
Framing (spec "Framing"): a byte stream cut into frames, each a 2-byte
big-endian length and that many bytes of payload.

L{FrameDecoder} is sans-I/O: it is fed bytes and hands each whole payload
to a receiver, one at a time, until it is paused or stopped. It is safe
against re-entrance: the receiver may pause, resume, stop or feed it from
inside a delivery, and each frame is still delivered exactly once, in order.

    decoder = FrameDecoder(receiver.frame_received)
    decoder.expect(128, receiver.frame_refused)  # only a 128-byte frame next
    decoder.feed(data)     # from dataReceived
"""

from __future__ import annotations

from collections.abc import Callable
from typing import overload

LENGTH_SIZE = 2
"""The size of a frame's length prefix."""


class FrameDecoder:
    """
    Cuts a byte stream into frames.

    Bytes are buffered only as far as they are needed: a partial frame is
    kept as the chunks it arrived in and joined once it is whole, so a
    65535-byte frame that arrives a byte at a time costs linear time; each
    frame's payload is copied once (out of the chunk that holds it, or
    joined from those it spans), and the bytes after it are not copied.

    When a length is expected (L{expect}), a frame that announces another
    length is refused as soon as its 2-byte prefix is in: the decoder stops
    and calls the C{refused(length, expected)} given with the length,
    without waiting for the payload.

    @ivar received: how many bytes were fed in all.
    """

    __slots__ = (
        "_chunks",
        "_deliver",
        "_delivering",
        "_expected",
        "_offset",
        "_paused",
        "_refused",
        "_size",
        "_stopped",
        "_wanted",
        "received",
    )

    def __init__(self, deliver: Callable[[bytes], object]) -> None:
        """
        @param deliver: called with each whole payload (without its prefix).
        """
        self._deliver = deliver
        # Only while a length is expected: an established connection's
        # decoder, which takes any length, keeps no callback for it.
        self._refused: Callable[[int, int], object] | None = None
        # The unprocessed bytes, in the order they came (from _offset on in
        # the first chunk), and their total.
        self._chunks: list[bytes] = []
        self._offset = 0
        self._size = 0
        # How many unprocessed bytes there must be before anything can be
        # done: a length prefix, or the whole frame it announces.
        self._wanted = LENGTH_SIZE
        self._expected: int | None = None
        self._paused = False
        self._stopped = False
        self._delivering = False
        self.received = 0

    def deliver_to(self, deliver: Callable[[bytes], object]) -> None:
        """
        Hand the frames that follow to C{deliver} instead (from inside a
        delivery too: the next frame goes to the new receiver).
        """
        self._deliver = deliver

    @overload
    def expect(self, length: int, refused: Callable[[int, int], object]) -> None: ...

    @overload
    def expect(self, length: None) -> None: ...

    def expect(
        self, length: int | None, refused: Callable[[int, int], object] | None = None
    ) -> None:
        """
        From the next frame on, only frames of C{length} bytes are valid
        (L{None}: any length). Checked as each frame's prefix is read.

        @param refused: with a length, called with the announced length of
            a frame that is not of that length, and that length; the
            decoder is stopped by then.
        """
        if (length is None) != (refused is None):
            raise ValueError("a refused callback goes with an expected length, and only then")
        self._expected = length
        self._refused = refused
        if length is not None and not self._delivering:
            # A prefix already read is checked now, not when its frame ends.
            self._process()

    @property
    def buffered(self) -> int:
        """
        How many bytes are held: of frames not yet whole, or not yet
        delivered because delivery is paused.
        """
        return self._size

    @property
    def stopped(self) -> bool:
        """
        Whether L{stop} was called: nothing will be delivered any more.
        """
        return self._stopped

    def feed(self, data: bytes) -> None:
        """
        Add bytes from the stream, and deliver the frames now whole (unless
        paused, or when called from inside a delivery: the running delivery
        goes on with them).
        """
        if self._stopped or not data:
            return
        self.received += len(data)
        # The same list while a delivery runs: it goes on with these bytes.
        self._chunks.append(data)
        self._size += len(data)
        if self._size >= self._wanted:
            self._process()

    def pause(self) -> None:
        """
        Deliver nothing more until L{resume}; the frame being delivered, if
        any, is the last.
        """
        self._paused = True

    def resume(self) -> None:
        """
        Deliver again: the frames already whole are delivered now (or by the
        running delivery, when called from inside one).
        """
        if self._stopped or not self._paused:
            return
        self._paused = False
        self._process()

    def stop(self) -> None:
        """
        Deliver nothing more, ever, and drop what is buffered; later feeds
        are ignored.
        """
        self._stopped = True
        self._chunks = []
        self._offset = 0
        self._size = 0

    def _refuse(self, length: int, expected: int) -> None:
        refused = self._refused
        assert refused is not None  # given with the expected length
        self.stop()
        refused(length, expected)

    def _process(self) -> None:
        if self._delivering or self._paused or self._stopped or not self._chunks:
            return
        self._delivering = True
        try:
            self._deliver_frames()
        finally:
            self._delivering = False

    def _deliver_frames(self) -> None:
        # Each frame is copied once: sliced out of the chunk it lies in, or
        # joined from views of the chunks it spans; the bytes after it stay
        # where they are (chunks[0] from offset on), never joined with the
        # next read. A delivery may feed (the list grows, and _size with
        # it), pause, resume, stop or expect: the loops read them again.
        chunks = self._chunks  # what feed appends to; stop replaces it
        offset = self._offset
        start = offset
        try:
            while True:
                chunk = chunks[0]
                size = len(chunk)
                # The frames that lie in this chunk: locals only, the hot loop.
                while not self._paused:
                    if size - offset < LENGTH_SIZE:
                        break
                    length = (chunk[offset] << 8) | chunk[offset + 1]
                    expected = self._expected
                    if expected is not None and length != expected:
                        self._refuse(length, expected)
                        return
                    end = offset + LENGTH_SIZE + length
                    if end > size:
                        break
                    frame = chunk[offset + LENGTH_SIZE : end]
                    offset = end
                    self._deliver(frame)
                    if self._stopped:
                        return
                self._size -= offset - start
                start = offset
                if offset == size:
                    del chunks[0]
                    offset = start = 0
                    if not chunks:
                        self._wanted = LENGTH_SIZE
                        break
                    continue
                if self._paused:
                    break
                # The next frame, or its prefix, goes on in the chunks after.
                available = self._size
                if available < LENGTH_SIZE:
                    self._wanted = LENGTH_SIZE
                    break
                if size - offset >= LENGTH_SIZE:
                    length = (chunk[offset] << 8) | chunk[offset + 1]
                else:
                    length = (chunk[offset] << 8) | chunks[1][0]
                expected = self._expected
                if expected is not None and length != expected:
                    self._refuse(length, expected)
                    return
                if available < LENGTH_SIZE + length:
                    self._wanted = LENGTH_SIZE + length
                    break
                self._size = available - LENGTH_SIZE - length
                frame, offset = _take(chunks, offset + LENGTH_SIZE, length)
                start = offset
                self._deliver(frame)
                if self._stopped:
                    return
                if not chunks:
                    self._wanted = LENGTH_SIZE
                    break
        finally:
            # Also when a receiver raised: what was delivered stays delivered.
            if not self._stopped:
                self._size -= offset - start
                self._offset = offset


def _take(chunks: list[bytes], offset: int, count: int) -> tuple[bytes, int]:
    """
    The C{count} bytes that start at C{offset} in C{chunks[0]} (or past its
    end, in the chunks after it) and end past it, joined in one copy. The
    chunks they use up are dropped from C{chunks}.

    @return: the bytes, and the offset in the new C{chunks[0]} of the byte
        after them.
    """
    while chunks and offset >= len(chunks[0]):
        # The length prefix used up the first chunk.
        offset -= len(chunks[0])
        del chunks[0]
    pieces: list[bytes | memoryview] = []
    while count:
        chunk = chunks[0]
        available = len(chunk) - offset
        if available > count:
            pieces.append(memoryview(chunk)[offset : offset + count])
            return b"".join(pieces), offset + count
        pieces.append(memoryview(chunk)[offset:] if offset else chunk)
        count -= available
        offset = 0
        del chunks[0]
    return b"".join(pieces), offset
