"""
The frame decoder by itself: frames out of a byte stream however it is
split, expected lengths checked at the prefix, and the re-entrant cases (a
receiver that pauses, resumes, stops or feeds from inside a delivery).
"""

from __future__ import annotations

import gc
import random
from collections.abc import Callable

from twisted.trial.unittest import SynchronousTestCase

from curvetun.framing import FrameDecoder


def framed(payload: bytes) -> bytes:
    return len(payload).to_bytes(2, "big") + payload


class Receiver:
    """
    Records the frames and refusals a decoder delivers; C{on_frame} runs
    after each frame is recorded (for the re-entrant cases).
    """

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.refusals: list[tuple[int, int]] = []
        self.on_frame: Callable[[bytes], None] = lambda frame: None
        self.decoder = FrameDecoder(self.frame)

    def frame(self, frame: bytes) -> None:
        self.frames.append(frame)
        self.on_frame(frame)

    def refused(self, length: int, expected: int) -> None:
        self.refusals.append((length, expected))


STREAM_FRAMES = [b"one", b"", b"three" * 100, bytes(range(256)), b"x" * 65535]
STREAM = b"".join(framed(frame) for frame in STREAM_FRAMES)


class FramingTests(SynchronousTestCase):
    def test_frames_in_one_feed_are_delivered_one_by_one(self) -> None:
        receiver = Receiver()
        receiver.decoder.feed(STREAM)
        self.assertEqual(receiver.frames, STREAM_FRAMES)
        self.assertEqual(receiver.decoder.buffered, 0)

    def test_frames_fed_a_byte_at_a_time_are_delivered_whole(self) -> None:
        receiver = Receiver()
        for i in range(len(STREAM)):
            receiver.decoder.feed(STREAM[i : i + 1])
        self.assertEqual(receiver.frames, STREAM_FRAMES)

    def test_any_split_delivers_the_same_frames_and_holds_only_the_rest(self) -> None:
        frames = [*STREAM_FRAMES, b"y" * 65535, b"z", *STREAM_FRAMES]
        stream = b"".join(framed(frame) for frame in frames)
        cuts = random.Random(12)
        for _ in range(200):
            receiver = Receiver()
            offset = 0
            while offset < len(stream):
                # Cuts anywhere: inside prefixes, at frame ends, reads of
                # more than a frame (as TCP reads of 64 KiB hold several).
                step = cuts.choice([1, 2, 3, cuts.randrange(1, 200), cuts.randrange(1, 140000)])
                receiver.decoder.feed(stream[offset : offset + step])
                offset += step
                delivered = sum(2 + len(frame) for frame in receiver.frames)
                self.assertEqual(receiver.decoder.buffered, min(offset, len(stream)) - delivered)
            self.assertEqual(receiver.frames, frames)

    def test_a_partial_frame_is_held_until_it_is_whole(self) -> None:
        receiver = Receiver()
        receiver.decoder.feed(framed(b"abcdef")[:5])
        self.assertEqual(receiver.frames, [])
        self.assertEqual(receiver.decoder.buffered, 5)
        receiver.decoder.feed(b"def")
        self.assertEqual(receiver.frames, [b"abcdef"])

    def test_an_empty_feed_does_nothing(self) -> None:
        receiver = Receiver()
        receiver.decoder.feed(b"")
        self.assertEqual((receiver.frames, receiver.decoder.received), ([], 0))

    def test_received_counts_every_byte_fed(self) -> None:
        receiver = Receiver()
        receiver.decoder.feed(STREAM[:3])
        receiver.decoder.feed(STREAM[3:])
        self.assertEqual(receiver.decoder.received, len(STREAM))

    def test_a_new_receiver_gets_the_frames_that_follow(self) -> None:
        receiver = Receiver()
        later: list[bytes] = []
        receiver.on_frame = lambda frame: receiver.decoder.deliver_to(later.append)
        receiver.decoder.feed(framed(b"first") + framed(b"second") + framed(b"third"))
        self.assertEqual((receiver.frames, later), ([b"first"], [b"second", b"third"]))


class ExpectedLengthTests(SynchronousTestCase):
    def test_a_frame_of_another_length_is_refused_at_its_prefix(self) -> None:
        receiver = Receiver()
        receiver.decoder.expect(128, receiver.refused)
        receiver.decoder.feed(b"\xff\xff")
        self.assertEqual(receiver.refusals, [(65535, 128)])
        self.assertTrue(receiver.decoder.stopped)
        self.assertEqual(receiver.decoder.buffered, 0)

    def test_a_prefix_split_across_feeds_is_checked_when_whole(self) -> None:
        receiver = Receiver()
        receiver.decoder.expect(128, receiver.refused)
        receiver.decoder.feed(b"\x00")
        self.assertEqual(receiver.refusals, [])
        receiver.decoder.feed(b"\x7f")
        self.assertEqual(receiver.refusals, [(127, 128)])

    def test_nothing_after_a_refusal_is_delivered_or_kept(self) -> None:
        receiver = Receiver()
        receiver.decoder.expect(3, receiver.refused)
        receiver.decoder.feed(framed(b"abc") + framed(b"toolong") + framed(b"xyz"))
        self.assertEqual(receiver.frames, [b"abc"])
        self.assertEqual(receiver.refusals, [(7, 3)])
        receiver.decoder.feed(framed(b"abc"))
        self.assertEqual(receiver.frames, [b"abc"])
        self.assertEqual(receiver.decoder.buffered, 0)

    def test_a_new_expectation_applies_to_the_next_frame_of_the_same_feed(self) -> None:
        """
        The receiver of a handshake packet says what comes next, and the
        frames already read with it are checked against that.
        """
        receiver = Receiver()
        receiver.decoder.expect(5, receiver.refused)
        receiver.on_frame = lambda frame: receiver.decoder.expect(None)
        receiver.decoder.feed(framed(b"hello") + framed(b"anything at all"))
        self.assertEqual(receiver.frames, [b"hello", b"anything at all"])

    def test_an_expectation_checks_a_prefix_already_read(self) -> None:
        receiver = Receiver()
        receiver.decoder.feed(b"\x01\x00")
        receiver.decoder.expect(128, receiver.refused)
        self.assertEqual(receiver.refusals, [(256, 128)])

    def test_a_refused_callback_goes_with_a_length_only(self) -> None:
        receiver = Receiver()
        with self.assertRaises(ValueError):
            receiver.decoder.expect(128)  # type: ignore[call-overload]
        with self.assertRaises(ValueError):
            receiver.decoder.expect(None, receiver.refused)  # type: ignore[call-overload]

    def test_any_length_keeps_no_refused_callback(self) -> None:
        # An established connection's decoder: nothing to refuse, nothing
        # kept for it.
        receiver = Receiver()
        receiver.decoder.expect(128, receiver.refused)
        receiver.decoder.expect(None)
        kept = [
            thing
            for thing in gc.get_referents(receiver.decoder)
            if getattr(thing, "__func__", None) is Receiver.refused
        ]
        self.assertEqual(kept, [])
        receiver.decoder.feed(framed(b"any length"))
        self.assertEqual((receiver.frames, receiver.refusals), ([b"any length"], []))


class ReentrantTests(SynchronousTestCase):
    """
    What a receiver does from inside a delivery takes effect at once, and
    every frame is still delivered exactly once, in order.
    """

    def test_pausing_inside_a_delivery_holds_the_rest(self) -> None:
        receiver = Receiver()
        receiver.on_frame = lambda frame: receiver.decoder.pause()
        receiver.decoder.feed(STREAM)
        self.assertEqual(receiver.frames, STREAM_FRAMES[:1])
        receiver.on_frame = lambda frame: None
        receiver.decoder.resume()
        self.assertEqual(receiver.frames, STREAM_FRAMES)

    def test_feeding_while_paused_delivers_nothing_until_resumed(self) -> None:
        receiver = Receiver()
        receiver.decoder.pause()
        receiver.decoder.feed(STREAM)
        self.assertEqual(receiver.frames, [])
        self.assertEqual(receiver.decoder.buffered, len(STREAM))
        receiver.decoder.resume()
        self.assertEqual(receiver.frames, STREAM_FRAMES)

    def test_pausing_and_resuming_inside_a_delivery_delivers_each_frame_once(self) -> None:
        receiver = Receiver()

        def pause_and_resume(frame: bytes) -> None:
            receiver.decoder.pause()
            receiver.decoder.resume()

        receiver.on_frame = pause_and_resume
        receiver.decoder.feed(STREAM)
        self.assertEqual(receiver.frames, STREAM_FRAMES)

    def test_resuming_from_inside_a_delivery_that_resume_started(self) -> None:
        receiver = Receiver()
        receiver.decoder.pause()
        receiver.decoder.feed(STREAM)

        def pause_then_resume(frame: bytes) -> None:
            receiver.decoder.pause()
            receiver.decoder.resume()

        receiver.on_frame = pause_then_resume
        receiver.decoder.resume()
        self.assertEqual(receiver.frames, STREAM_FRAMES)

    def test_stopping_inside_a_delivery_drops_the_rest(self) -> None:
        receiver = Receiver()
        receiver.on_frame = lambda frame: receiver.decoder.stop()
        receiver.decoder.feed(STREAM)
        self.assertEqual(receiver.frames, STREAM_FRAMES[:1])
        self.assertEqual(receiver.decoder.buffered, 0)
        receiver.decoder.resume()
        receiver.decoder.feed(STREAM)
        self.assertEqual(receiver.frames, STREAM_FRAMES[:1])

    def test_bytes_fed_inside_a_delivery_follow_the_bytes_already_read(self) -> None:
        receiver = Receiver()
        fed = [False]

        def feed_more(frame: bytes) -> None:
            if not fed[0]:
                fed[0] = True
                # The rest of a partial frame, and one more whole frame.
                receiver.decoder.feed(b"ird" + framed(b"fourth"))

        receiver.on_frame = feed_more
        receiver.decoder.feed(framed(b"first") + framed(b"second") + framed(b"third")[:4])
        self.assertEqual(receiver.frames, [b"first", b"second", b"third", b"fourth"])
        self.assertEqual(receiver.decoder.buffered, 0)

    def test_an_exception_from_a_receiver_leaves_the_decoder_usable(self) -> None:
        receiver = Receiver()

        def fail(frame: bytes) -> None:
            raise ZeroDivisionError()

        receiver.on_frame = fail
        self.assertRaises(ZeroDivisionError, receiver.decoder.feed, framed(b"a"))
        receiver.on_frame = lambda frame: None
        receiver.decoder.feed(framed(b"b"))
        self.assertEqual(receiver.frames, [b"a", b"b"])
