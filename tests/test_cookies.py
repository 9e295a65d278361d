"""
Tests for L{curvetun.cookies}.
"""

from __future__ import annotations

import inspect
import time
from typing import Any

from nacl.bindings import crypto_secretbox_easy
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from curvetun.cookies import CookieKeys
from curvetun.errors import BadPacket

from ._vectors import load, unhex

COOKIE = next(p for p in load("handshake.json")["packets"] if p["name"] == "cookie")

EC = b"\x0e" * 32
ESs = b"\x05" * 32
SN = b"\x5a" * 16


class CookieKeysTests(SynchronousTestCase):
    def started(self, **options: Any) -> tuple[CookieKeys, Clock]:
        """
        Start a L{CookieKeys} made with C{options} on a fake clock; it is
        stopped at cleanup.
        """
        clock = Clock()
        keys = CookieKeys(clock=clock, seconds=clock.seconds, **options)
        keys.startService()
        self.addCleanup(keys.stopService)
        return keys, clock

    def test_seal_matches_the_original_cookie(self) -> None:
        keys = CookieKeys(initial_key=unhex(COOKIE["cookie_secretbox_key_Ts"]))
        plaintext = unhex(COOKIE["cookie_secretbox_plaintext"])
        sealed = keys.seal(unhex(COOKIE["safe_nonce_16"]), plaintext[:32], plaintext[32:])
        self.assertEqual(sealed, unhex(COOKIE["cookie_secretbox"]))
        self.assertEqual(len(sealed), 80)

    def test_open_the_original_cookie(self) -> None:
        keys = CookieKeys(initial_key=unhex(COOKIE["cookie_secretbox_key_Ts"]))
        plaintext = unhex(COOKIE["cookie_secretbox_plaintext"])
        self.assertEqual(keys.open(unhex(COOKIE["cookie_K"])), (plaintext[:32], plaintext[32:]))

    def test_initial_key_is_kept_until_one_interval_after_start(self) -> None:
        keys, clock = self.started(initial_key=unhex(COOKIE["cookie_secretbox_key_Ts"]))
        clock.advance(59.9)
        plaintext = unhex(COOKIE["cookie_secretbox_plaintext"])
        sealed = keys.seal(unhex(COOKIE["safe_nonce_16"]), plaintext[:32], plaintext[32:])
        self.assertEqual(sealed, unhex(COOKIE["cookie_secretbox"]))
        clock.advance(0.1)
        sealed = keys.seal(unhex(COOKIE["safe_nonce_16"]), plaintext[:32], plaintext[32:])
        self.assertNotEqual(sealed, unhex(COOKIE["cookie_secretbox"]))

    def test_cookie_opens_with_the_current_key(self) -> None:
        keys, _ = self.started()
        self.assertEqual(keys.open(SN + keys.seal(SN, EC, ESs)), (EC, ESs))

    def test_cookie_opens_after_one_rotation(self) -> None:
        keys, clock = self.started()
        cookie = SN + keys.seal(SN, EC, ESs)
        clock.advance(60)
        self.assertEqual(keys.open(cookie), (EC, ESs))
        # And new cookies are sealed under a new key.
        self.assertNotEqual(keys.seal(SN, EC, ESs), cookie[16:])

    def test_cookie_is_refused_after_two_rotations(self) -> None:
        keys, clock = self.started()
        cookie = SN + keys.seal(SN, EC, ESs)
        clock.advance(60)
        clock.advance(60)
        with self.assertRaises(BadPacket) as cm:
            keys.open(cookie)
        self.assertEqual(cm.exception.reason, "cookie does not open: expired or forged")

    def test_interval_is_configurable(self) -> None:
        keys, clock = self.started(interval=5.0)
        cookie = SN + keys.seal(SN, EC, ESs)
        clock.advance(5)
        self.assertEqual(keys.open(cookie), (EC, ESs))
        clock.advance(5)
        self.assertRaises(BadPacket, keys.open, cookie)

    def test_a_stopped_service_still_refuses_old_cookies(self) -> None:
        """
        Keys follow the clock even when no timer runs: a cookie never
        outlives two periods (the replay memory counts on it).
        """
        clock = Clock()
        keys = CookieKeys(clock=clock, seconds=clock.seconds)
        cookie = SN + keys.seal(SN, EC, ESs)
        clock.advance(60)
        self.assertEqual(keys.open(cookie), (EC, ESs))
        clock.advance(60)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertRaises(BadPacket, keys.open, cookie)

    def test_a_clock_jump_forgets_both_keys(self) -> None:
        keys, clock = self.started()
        cookie = SN + keys.seal(SN, EC, ESs)
        # One late timer call for many periods still retires both keys.
        clock.advance(600)
        self.assertRaises(BadPacket, keys.open, cookie)

    def test_new_keys_come_from_random_bytes(self) -> None:
        new_key = b"\x07" * 32
        keys, clock = self.started(initial_key=b"\x01" * 32, random_bytes=lambda n: new_key[:n])
        clock.advance(60)
        self.assertEqual(
            keys.seal(SN, EC, ESs), crypto_secretbox_easy(EC + ESs, b"minute-k" + SN, new_key)
        )

    def test_forged_or_wrong_size_cookies_are_bad_packets(self) -> None:
        keys, _ = self.started()
        cookie = SN + keys.seal(SN, EC, ESs)
        for forged in [
            cookie[:-1] + bytes([cookie[-1] ^ 1]),
            bytes([cookie[0] ^ 1]) + cookie[1:],  # another safe nonce
            cookie[:95],
            cookie + b"\x00",
            b"",
        ]:
            self.assertRaises(BadPacket, keys.open, forged)

    def test_repr_hides_the_keys(self) -> None:
        key = b"\x42" * 32
        keys = CookieKeys(initial_key=key)
        self.assertNotIn("4242", repr(keys))
        self.assertNotIn("BBBB", repr(keys))  # b"\x42" is "B"
        self.assertIn("CookieKeys", repr(keys))

    def test_initial_key_must_be_32_bytes(self) -> None:
        self.assertRaises(ValueError, CookieKeys, initial_key=b"\x00" * 31)

    def test_periods_follow_the_monotonic_clock_not_the_reactor(self) -> None:
        """
        The reactor's clock (wall time) only schedules the timer; the keys
        rotate by the clock given as C{seconds}.
        """
        wall, monotonic = Clock(), Clock()
        keys = CookieKeys(clock=wall, seconds=monotonic.seconds)
        cookie = SN + keys.seal(SN, EC, ESs)
        wall.advance(3600)
        self.assertEqual(keys.open(cookie), (EC, ESs))
        monotonic.advance(120)
        self.assertRaises(BadPacket, keys.open, cookie)

    def test_the_default_period_clock_is_time_monotonic(self) -> None:
        """
        Not the reactor's C{seconds()}, which is C{time.time()}: the wall
        clock, which steps.
        """
        default = inspect.signature(CookieKeys).parameters["seconds"].default
        self.assertIs(default, time.monotonic)

    def test_a_clock_that_goes_back_changes_no_key(self) -> None:
        keys, clock = self.started()
        clock.advance(90)
        cookie = SN + keys.seal(SN, EC, ESs)
        clock.rightNow -= 60
        self.assertEqual(keys.seal(SN, EC, ESs), cookie[16:])
        self.assertEqual(keys.generations(), (0, 1))

    def test_generations_count_the_keys_made(self) -> None:
        keys, clock = self.started()
        self.assertEqual(keys.generations(), (0, 0))
        clock.advance(60)
        self.assertEqual(keys.generations(), (0, 1))
        clock.advance(60)
        self.assertEqual(keys.generations(), (1, 2))
        # Both keys go at once after a long pause: no old generation is held.
        clock.advance(600)
        self.assertEqual(keys.generations(), (4, 4))

    def test_the_timer_erases_keys_at_each_period_end(self) -> None:
        """
        While the service runs, the old key is replaced on time even if no
        cookie is sealed or opened; stopping the service cancels the timer.
        """
        made: list[int] = []

        def random_bytes(n: int) -> bytes:
            made.append(n)
            return b"\x07" * n

        keys, clock = self.started(initial_key=b"\x01" * 32, random_bytes=random_bytes)
        [call] = clock.getDelayedCalls()
        self.assertEqual(call.getTime(), 60)
        clock.advance(60)
        self.assertEqual(made, [32])
        [call] = clock.getDelayedCalls()
        self.assertEqual(call.getTime(), 120)
        keys.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_a_timer_fired_early_by_the_wall_clock_schedules_itself_again(self) -> None:
        """
        The reactor counts the timer's delay in wall time: a forward step
        of the wall clock fires it early. It then keeps the keys and waits
        for what remains of the period on the monotonic clock.
        """
        wall, monotonic = Clock(), Clock()
        keys = CookieKeys(clock=wall, seconds=monotonic.seconds)
        keys.startService()
        self.addCleanup(keys.stopService)
        monotonic.advance(20)
        wall.advance(3600)  # the step: the timer fires 40 s early
        self.assertEqual(keys.generations(), (0, 0))
        [call] = wall.getDelayedCalls()
        self.assertEqual(call.getTime(), 3600 + 40)
