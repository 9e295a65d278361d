"""
Admission of new server connections (limits per address, per network and in
all; eviction of unfinished handshakes when the server is full) and the
aggregated logging of refusals and failed handshakes.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import attrs
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from curvetun.admission import (
    FAILURE_LABELS,
    Admission,
    Candidate,
    ConnectionLimits,
    FailureLog,
    failure_label,
    peer_address_and_network,
)
from curvetun.errors import (
    BadPacket,
    HandshakeEvicted,
    HandshakeFailed,
    HandshakeTimeout,
    KeyFileError,
    NotAuthorized,
    ReplayedVouch,
    ServerKeyMismatch,
)

NO_LIMITS = ConnectionLimits(
    connections=None,
    connections_per_address=None,
    handshakes=None,
    handshakes_per_address=None,
    connections_per_network=None,
    handshakes_per_network=None,
)


def limits(**fields: int) -> ConnectionLimits:
    """
    No limits but those given.
    """
    return attrs.evolve(NO_LIMITS, **fields)


class FakeCandidate:
    """
    An unfinished handshake: records whether it was evicted and, like a
    real connection, reports its end to admission later (at the clock's
    next turn), or at once with C{ends_at_once}.
    """

    def __init__(
        self,
        admission: Admission,
        clock: MemoryReactorClock,
        hello_verified: bool = False,
        ends_at_once: bool = False,
    ) -> None:
        self.admission = admission
        self.clock = clock
        self.hello_verified = hello_verified
        self.ends_at_once = ends_at_once
        self.evicted = False

    def evict(self) -> None:
        self.evicted = True
        if self.ends_at_once:
            self.admission.ended(self)
        else:
            self.clock.callLater(0, self.admission.ended, self)


class AdmissionCase(SynchronousTestCase):
    def make(self, limits: ConnectionLimits) -> None:
        self.clock = MemoryReactorClock()
        self.admission = Admission(limits, self.clock)

    def candidate(self, hello_verified: bool = False) -> FakeCandidate:
        return FakeCandidate(self.admission, self.clock, hello_verified)

    def admit(self, host: str, hello_verified: bool = False) -> FakeCandidate:
        """
        Admit a new candidate from C{host}; fail if it is refused.
        """
        candidate = self.candidate(hello_verified)
        self.assertIsNone(self.admission.admit(host, candidate))
        return candidate

    def refused(self, host: str) -> str:
        """
        The refusal of a new candidate from C{host}; fail if it is admitted.
        """
        why = self.admission.admit(host, self.candidate())
        assert why is not None, f"a newcomer from {host} was admitted"
        return why


class AddressAndNetworkTests(SynchronousTestCase):
    """
    What a peer host counts against.
    """

    def test_an_ipv4_address_is_in_its_24(self) -> None:
        self.assertEqual(peer_address_and_network("10.1.2.3", 24, 64), ("10.1.2.3", "10.1.2.0/24"))

    def test_an_ipv6_address_is_in_its_64(self) -> None:
        self.assertEqual(
            peer_address_and_network("2001:db8:1:2:3::4", 24, 64),
            ("2001:db8:1:2:3::4", "2001:db8:1:2::/64"),
        )

    def test_the_prefixes_are_configurable(self) -> None:
        self.assertEqual(peer_address_and_network("10.1.2.3", 16, 64)[1], "10.1.0.0/16")
        self.assertEqual(peer_address_and_network("2001:db8:1:2::4", 24, 48)[1], "2001:db8:1::/48")

    def test_an_ipv4_mapped_ipv6_address_counts_as_ipv4(self) -> None:
        self.assertEqual(
            peer_address_and_network("::ffff:10.1.2.3", 24, 64), ("10.1.2.3", "10.1.2.0/24")
        )

    def test_an_ipv6_address_is_normalized(self) -> None:
        self.assertEqual(
            peer_address_and_network("2001:DB8:0:0::1", 24, 64)[0],
            peer_address_and_network("2001:db8::1", 24, 64)[0],
        )

    def test_an_ipv6_zone_is_ignored(self) -> None:
        self.assertEqual(peer_address_and_network("fe80::1%eth0", 24, 64), ("fe80::1", "fe80::/64"))

    def test_prefixes_of_zero_and_of_the_whole_address(self) -> None:
        self.assertEqual(peer_address_and_network("10.1.2.3", 0, 64)[1], "0.0.0.0/0")
        self.assertEqual(peer_address_and_network("10.1.2.3", 32, 64)[1], "10.1.2.3/32")
        self.assertEqual(peer_address_and_network("2001:db8::1", 24, 128)[1], "2001:db8::1/128")

    def test_a_peer_without_an_ip_address_is_its_own_network(self) -> None:
        self.assertEqual(peer_address_and_network("", 24, 64), ("", ""))

    def test_prefixes_out_of_range_are_refused(self) -> None:
        self.assertRaises(ValueError, ConnectionLimits, ipv4_prefix=33)
        self.assertRaises(ValueError, ConnectionLimits, ipv6_prefix=-1)
        self.assertRaises(ValueError, ConnectionLimits, handshakes=-1)


class OwnShareTests(AdmissionCase):
    """
    A newcomer is refused when its own address or network is at a limit.
    """

    def test_every_address_of_an_ipv4_network_counts_against_it(self) -> None:
        self.make(limits(handshakes_per_network=3))
        for host in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
            self.admit(host)
        self.assertEqual(self.refused("10.0.0.200"), "3 unfinished handshakes from one network")
        # The next /24 has its own share.
        self.admit("10.0.1.1")

    def test_every_address_of_an_ipv6_network_counts_against_it(self) -> None:
        self.make(limits(handshakes_per_network=3))
        for host in ("2001:db8::1", "2001:db8::2", "2001:db8::ffff:3"):
            self.admit(host)
        self.assertEqual(
            self.refused("2001:db8::abcd:1234:5678:9abc"),
            "3 unfinished handshakes from one network",
        )
        self.admit("2001:db8:0:1::1")

    def test_the_per_address_limit_holds_inside_the_network(self) -> None:
        self.make(limits(handshakes_per_address=2, handshakes_per_network=10))
        self.admit("10.0.0.1")
        self.admit("10.0.0.1")
        self.assertEqual(self.refused("10.0.0.1"), "2 unfinished handshakes from one address")
        self.admit("10.0.0.2")

    def test_an_ipv4_mapped_address_is_the_same_address(self) -> None:
        self.make(limits(handshakes_per_address=1))
        self.admit("10.0.0.1")
        self.assertEqual(
            self.refused("::ffff:10.0.0.1"), "1 unfinished handshakes from one address"
        )

    def test_peers_without_an_ip_address_are_one_address(self) -> None:
        self.make(limits(handshakes_per_address=2, handshakes_per_network=2))
        self.admit("")
        self.admit("")
        self.assertEqual(self.refused(""), "2 unfinished handshakes from one address")

    def test_connections_per_network_count_established_ones(self) -> None:
        self.make(limits(connections_per_network=2))
        for host in ("10.0.0.1", "10.0.0.2"):
            self.admission.handshake_done(self.admit(host))
        self.assertEqual(self.refused("10.0.0.3"), "2 connections from one network")

    def test_a_newcomer_at_its_own_share_does_not_evict_when_the_server_is_full(self) -> None:
        self.make(limits(handshakes=4, handshakes_per_address=2))
        mine = [self.admit("10.0.0.1"), self.admit("10.0.0.1")]
        others = [self.admit("10.0.5.1"), self.admit("10.0.5.1")]
        self.assertEqual(self.refused("10.0.0.1"), "2 unfinished handshakes from one address")
        self.assertEqual([c.evicted for c in mine + others], [False] * 4)

    def test_a_finished_handshake_frees_its_handshake_place(self) -> None:
        self.make(limits(handshakes_per_network=1, connections_per_network=2))
        self.admission.handshake_done(self.admit("10.0.0.1"))
        second = self.admit("10.0.0.2")
        self.assertEqual(self.refused("10.0.0.3"), "1 unfinished handshakes from one network")
        self.admission.handshake_done(second)
        self.assertEqual(self.refused("10.0.0.3"), "2 connections from one network")

    def test_an_ended_connection_frees_its_places(self) -> None:
        self.make(limits(handshakes_per_address=1, connections_per_address=1))
        first = self.admit("10.0.0.1")
        self.admission.ended(first)
        second = self.admit("10.0.0.1")
        self.admission.handshake_done(second)
        self.admission.ended(second)
        self.admit("10.0.0.1")

    def test_reports_about_unknown_or_ended_connections_are_ignored(self) -> None:
        self.make(limits(handshakes_per_address=1))
        first = self.admit("10.0.0.1")
        self.admission.ended(first)
        self.admission.ended(first)
        self.admission.handshake_done(first)
        self.admission.handshake_done(self.candidate())
        self.admit("10.0.0.1")
        self.assertEqual((self.admission.handshakes, self.admission.established), (1, 0))


class EvictionTests(AdmissionCase):
    """
    At the server's limit a newcomer evicts an unfinished handshake: from
    the network with the most, silent ones first, oldest first.
    """

    def test_at_the_handshake_limit_a_newcomer_evicts_the_oldest(self) -> None:
        self.make(limits(handshakes=2))
        first, second = self.admit("10.0.0.1"), self.admit("10.0.0.1")
        newcomer = self.admit("10.0.0.1")
        self.assertEqual([first.evicted, second.evicted, newcomer.evicted], [True, False, False])
        self.assertEqual(self.admission.handshakes, 2)

    def test_an_evicted_candidate_no_longer_counts_before_it_reports_its_end(self) -> None:
        self.make(limits(handshakes=1, handshakes_per_address=1))
        first = self.admit("10.0.0.1")
        self.admit("10.0.0.2")
        self.assertTrue(first.evicted)
        # Its address may connect again at once; its end, reported later,
        # changes nothing.
        self.admit("10.0.0.1")
        self.clock.advance(0)
        self.assertEqual(self.admission.handshakes, 1)
        self.assertEqual(self.refused("10.0.0.1"), "1 unfinished handshakes from one address")

    def test_an_eviction_that_reports_the_end_at_once_is_counted_once(self) -> None:
        self.make(limits(handshakes=1))
        first = FakeCandidate(self.admission, self.clock, ends_at_once=True)
        self.assertIsNone(self.admission.admit("10.0.0.1", first))
        self.admit("10.0.0.2")
        self.assertTrue(first.evicted)
        self.assertEqual(self.admission.handshakes, 1)

    def test_those_without_a_valid_hello_go_first(self) -> None:
        self.make(limits(handshakes=3))
        greeted = self.admit("10.0.0.1", hello_verified=True)
        silent = self.admit("10.0.0.2")
        later = self.admit("10.0.0.3", hello_verified=True)
        self.admit("10.0.0.4")
        self.assertEqual([greeted.evicted, silent.evicted, later.evicted], [False, True, False])

    def test_a_hello_verified_after_admission_is_taken_into_account(self) -> None:
        self.make(limits(handshakes=2))
        first, second = self.admit("10.0.0.1"), self.admit("10.0.0.2")
        first.hello_verified = True
        self.admit("10.0.0.3")
        self.assertEqual([first.evicted, second.evicted], [False, True])

    def test_without_silent_ones_the_oldest_goes(self) -> None:
        self.make(limits(handshakes=2))
        first = self.admit("10.0.0.1", hello_verified=True)
        second = self.admit("10.0.0.2", hello_verified=True)
        self.admit("10.0.0.3", hello_verified=True)
        self.assertEqual([first.evicted, second.evicted], [True, False])

    def test_the_network_with_the_most_unfinished_handshakes_loses_one(self) -> None:
        self.make(limits(handshakes=4))
        # The oldest, and silent, but alone in its network.
        honest = self.admit("192.0.2.1")
        crowd = [self.admit("10.0.0.1", hello_verified=True) for _ in range(3)]
        self.admit("198.51.100.1")
        self.assertFalse(honest.evicted)
        self.assertEqual([c.evicted for c in crowd], [True, False, False])

    def test_a_flooding_network_only_evicts_its_own(self) -> None:
        self.make(limits(handshakes=8))
        honest = [self.admit("192.0.2.1"), self.admit("198.51.100.1")]
        flood = [self.admit(f"10.0.0.{i % 250 + 1}") for i in range(200)]
        self.assertEqual([c.evicted for c in honest], [False, False])
        # The newest of the flood hold the rest of the places.
        self.assertEqual([not c.evicted for c in flood], [False] * 194 + [True] * 6)

    def test_on_a_tie_the_newcomers_network_gives_way(self) -> None:
        self.make(limits(handshakes=4))
        # Theirs came first, and is as large as mine.
        theirs = [self.admit("10.0.1.1"), self.admit("10.0.1.1")]
        mine = [self.admit("10.0.0.1"), self.admit("10.0.0.1")]
        self.admit("10.0.0.1")
        self.assertEqual([c.evicted for c in theirs + mine], [False, False, True, False])

    def test_networks_at_the_limit_are_evened_out(self) -> None:
        # The largest network gives way first, so several busy networks end
        # with equal shares, whoever came first.
        self.make(limits(handshakes=6))
        a = [self.admit("10.0.0.1") for _ in range(5)]
        b = [self.admit("10.0.1.1") for _ in range(4)]
        self.assertEqual(
            (sum(not c.evicted for c in a), sum(not c.evicted for c in b)),
            (3, 3),
        )

    def test_at_the_connection_limit_an_unfinished_handshake_is_evicted(self) -> None:
        self.make(limits(connections=2))
        established = self.admit("10.0.0.1")
        self.admission.handshake_done(established)
        unfinished = self.admit("10.0.0.2")
        self.admit("10.0.0.3")
        self.assertEqual([established.evicted, unfinished.evicted], [False, True])

    def test_established_connections_are_never_evicted(self) -> None:
        self.make(limits(connections=2))
        established = [self.admit("10.0.0.1"), self.admit("10.0.0.2")]
        for candidate in established:
            self.admission.handshake_done(candidate)
        self.assertEqual(self.refused("10.0.0.3"), "2 connections")
        self.assertEqual([c.evicted for c in established], [False, False])

    def test_a_zero_handshake_limit_refuses_everyone(self) -> None:
        self.make(limits(handshakes=0))
        self.assertEqual(self.refused("10.0.0.1"), "0 unfinished handshakes")

    def test_choosing_whom_to_evict_does_not_scan_the_handshakes(self) -> None:
        # Each candidate's hello is looked at about once over its life, not
        # once per newcomer.
        looks = Counter[str]()

        class Greeted(FakeCandidate):
            """
            A candidate that has sent a valid hello, and counts the looks.
            """

            @property
            def hello_verified(self) -> bool:
                looks["hello"] += 1
                return True

            @hello_verified.setter
            def hello_verified(self, value: bool) -> None:
                pass

        self.make(limits(handshakes=512))
        for _ in range(2000):
            self.admission.admit("10.0.0.1", Greeted(self.admission, self.clock))
        self.assertLessEqual(looks["hello"], 2 * 2000)
        self.assertEqual(self.admission.evictions, 2000 - 512)


class FiguresTests(AdmissionCase):
    """
    What admission reports for metrics.
    """

    def test_counts_of_established_connections_and_handshakes(self) -> None:
        self.make(ConnectionLimits())
        first, second, third = (self.admit(f"10.0.0.{i}") for i in (1, 2, 3))
        self.admission.handshake_done(first)
        self.admission.ended(second)
        self.assertEqual((self.admission.established, self.admission.handshakes), (1, 1))
        self.admission.handshake_done(third)
        self.assertEqual((self.admission.established, self.admission.handshakes), (2, 0))

    def test_refusals_are_counted_per_limit(self) -> None:
        self.make(limits(handshakes_per_address=1, handshakes_per_network=2))
        self.admit("10.0.0.1")
        self.admit("10.0.0.2")
        self.refused("10.0.0.1")
        self.refused("10.0.0.3")
        self.refused("10.0.0.4")
        self.assertEqual(
            self.admission.refusals,
            {"handshakes_per_address": 1, "handshakes_per_network": 2},
        )

    def test_evictions_are_counted(self) -> None:
        self.make(limits(handshakes=1))
        for i in range(5):
            self.admit(f"10.0.{i}.1")
        self.assertEqual(self.admission.evictions, 4)
        self.assertEqual(self.admission.refusals, {})


def warnings(events: Iterable[LogEvent]) -> list[LogEvent]:
    return [e for e in events if e.get("log_level") == LogLevel.warn]


class RefusalLogTests(AdmissionCase):
    """
    Refusals are logged as one warning per interval, with counts per limit.
    """

    def test_a_flood_of_refusals_is_one_line_per_interval_with_the_counts(self) -> None:
        self.make(limits(handshakes_per_address=1, handshakes_per_network=2))
        self.admit("10.0.0.1")
        self.admit("10.0.0.2")
        with capturedLogs() as events:
            for _ in range(300):
                self.refused("10.0.0.1")
            for _ in range(200):
                self.refused("10.0.0.3")
            self.assertEqual(warnings(events), [])
            self.clock.advance(10)
            self.clock.advance(100)
        [line] = warnings(events)
        self.assertEqual(
            line["counts"], {"handshakes_per_address": 300, "handshakes_per_network": 200}
        )
        self.assertEqual(
            formatEvent(line),
            "curvetun refused 500 connection(s) in the last 10 s, the last from 10.0.0.3: "
            "300 at the limit of 1 unfinished handshakes from one address, "
            "200 at the limit of 2 unfinished handshakes from one network",
        )

    def test_stop_logs_what_is_pending_and_cancels_the_timer(self) -> None:
        self.make(limits(handshakes=0))
        with capturedLogs() as events:
            self.refused("")
            self.clock.advance(3)
            self.admission.stop()
        [line] = warnings(events)
        self.assertEqual(line["counts"], {"handshakes": 1})
        self.assertIn("in the last 3 s, the last from a local socket", formatEvent(line))
        self.assertEqual(self.clock.getDelayedCalls(), [])


ALL_FAILURES: dict[str, BaseException] = {
    "not_authorized": NotAuthorized("client key ... is not allowed"),
    "bad_packet": BadPacket("hello does not verify"),
    "replay": ReplayedVouch("replayed vouch: this session was accepted before"),
    "timeout": HandshakeTimeout("the handshake did not complete in time"),
    "server_key_mismatch": ServerKeyMismatch("the server's cookie does not verify"),
    "evicted": HandshakeEvicted("evicted to make room"),
    "key_file": KeyFileError("cannot store the counter"),
    "closed": ConnectionDone("connection done"),
    "other": HandshakeFailed("something else"),
}


class FailureLabelTests(SynchronousTestCase):
    """
    Each handshake failure has a stable label (for logs and metrics).
    """

    def test_each_error_has_its_label(self) -> None:
        self.assertEqual(
            {label: failure_label(Failure(error)) for label, error in ALL_FAILURES.items()},
            {label: label for label in ALL_FAILURES},
        )

    def test_the_labels_are_listed(self) -> None:
        self.assertEqual(sorted(FAILURE_LABELS), sorted(ALL_FAILURES))

    def test_a_lost_connection_is_closed(self) -> None:
        self.assertEqual(failure_label(Failure(ConnectionLost())), "closed")

    def test_an_unexpected_error_is_other(self) -> None:
        self.assertEqual(failure_label(Failure(ZeroDivisionError())), "other")


def summaries(events: Iterable[LogEvent]) -> list[LogEvent]:
    return [e for e in events if e.get("log_level") == LogLevel.info]


def debug_lines(events: Iterable[LogEvent]) -> list[LogEvent]:
    return [e for e in events if e.get("log_level") == LogLevel.debug]


class FailureLogTests(SynchronousTestCase):
    """
    Failed handshakes are logged each at debug level, and summed up at info
    level in at most one line per interval.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.failures = FailureLog(self.clock)

    def test_each_failure_is_a_debug_event_with_peer_and_reason(self) -> None:
        with capturedLogs() as events:
            self.failures.failed("10.0.0.7:5555", Failure(NotAuthorized("key X not allowed")))
        [event] = debug_lines(events)
        self.assertEqual(
            (event["peer"], event["result"], formatEvent(event)),
            (
                "10.0.0.7:5555",
                "not_authorized",
                "curvetun handshake with 10.0.0.7:5555 failed: key X not allowed",
            ),
        )
        self.assertEqual(summaries(events), [])

    def test_a_burst_is_summed_up_when_its_interval_ends(self) -> None:
        with capturedLogs() as events:
            for _ in range(1500):
                self.failures.failed("10.0.0.1:1000", Failure(NotAuthorized("no")))
            for _ in range(32):
                self.failures.failed("10.0.0.7:5555", Failure(HandshakeTimeout("slow")))
            self.clock.advance(9.9)
            self.assertEqual(summaries(events), [])
            self.clock.advance(0.1)
        [line] = summaries(events)
        self.assertEqual(
            formatEvent(line),
            "curvetun: 1532 handshakes failed in the last 10 s: 1500 not authorized, "
            "32 timed out (last from 10.0.0.7:5555)",
        )
        self.assertEqual(line["counts"], {"not_authorized": 1500, "timeout": 32})
        self.assertEqual(len(debug_lines(events)), 1532)

    def test_a_single_failure_is_one_summary(self) -> None:
        with capturedLogs() as events:
            self.failures.failed("[2001:db8::1]:7", Failure(BadPacket("unknown packet magic")))
            self.clock.advance(10)
        [line] = summaries(events)
        self.assertEqual(
            formatEvent(line),
            "curvetun: 1 handshake failed in the last 10 s: 1 bad packet (last from [2001:db8::1]:7)",  # noqa: E501
        )

    def test_a_flood_gives_a_handful_of_lines_with_the_right_counts(self) -> None:
        reasons: Sequence[BaseException] = (
            NotAuthorized("no"),
            BadPacket("bad"),
            ConnectionDone(),
            HandshakeTimeout("slow"),
        )
        with capturedLogs() as events:
            # 10,000 failures over 60 s, then quiet for a minute.
            for i in range(10_000):
                self.failures.failed(f"10.0.{i % 200}.1:{i}", Failure(reasons[i % 4]))
                self.clock.advance(0.006)
            self.clock.advance(60)
        lines = summaries(events)
        self.assertLessEqual(len(lines), 7)
        total: Counter[str] = Counter()
        for line in lines:
            total.update(line["counts"])
        self.assertEqual(
            total, {"not_authorized": 2500, "bad_packet": 2500, "closed": 2500, "timeout": 2500}
        )
        self.assertEqual(len(debug_lines(events)), 10_000)

    def test_lines_are_at_least_an_interval_apart(self) -> None:
        times: list[float] = []
        with capturedLogs() as events:
            for _ in range(120):
                self.failures.failed("10.0.0.1:1", Failure(BadPacket("bad")))
                self.clock.advance(0.5)
                if summaries(events)[len(times) :]:
                    times.append(self.clock.seconds())
        self.assertGreater(len(times), 3)
        self.assertTrue(all(b - a >= 10 for a, b in itertools.pairwise(times)), times)

    def test_nothing_is_logged_without_failures(self) -> None:
        with capturedLogs() as events:
            self.failures.failed("10.0.0.1:1", Failure(BadPacket("bad")))
            self.clock.advance(10)
            self.clock.advance(3600)
        self.assertEqual(len(summaries(events)), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_sums_up_what_is_pending_and_cancels_the_timer(self) -> None:
        with capturedLogs() as events:
            self.failures.failed("10.0.0.1:1", Failure(ReplayedVouch("replayed")))
            self.clock.advance(2)
            self.failures.stop()
            self.clock.advance(60)
        [line] = summaries(events)
        self.assertEqual(line["counts"], {"replay": 1})
        self.assertIn("in the last 2 s", formatEvent(line))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_without_failures_logs_nothing(self) -> None:
        with capturedLogs() as events:
            self.failures.stop()
        self.assertEqual(list(events), [])


# -- the lock-out attack, simulated ----------------------------------------------


class _Admits(Protocol):
    def admit(self, peer_host: str, connection: Candidate) -> str | None: ...
    def handshake_done(self, connection: Candidate) -> None: ...
    def ended(self, connection: Candidate) -> None: ...


class RefusingAdmission:
    """
    The admission policy before eviction and per-network limits: refuse
    past any limit (connections or unfinished handshakes, in all or from
    one address), never evict.
    """

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.connections: Counter[str] = Counter()
        self.handshakes: Counter[str] = Counter()
        self.hosts: dict[Candidate, str] = {}
        self.unfinished: set[Candidate] = set()

    def admit(self, peer_host: str, connection: Candidate) -> str | None:
        limits = self.limits
        for count, limit in (
            (self.connections.total(), limits.connections),
            (self.connections[peer_host], limits.connections_per_address),
            (self.handshakes.total(), limits.handshakes),
            (self.handshakes[peer_host], limits.handshakes_per_address),
        ):
            if limit is not None and count >= limit:
                return f"{limit}"
        self.hosts[connection] = peer_host
        self.unfinished.add(connection)
        self.connections[peer_host] += 1
        self.handshakes[peer_host] += 1
        return None

    def handshake_done(self, connection: Candidate) -> None:
        self.unfinished.discard(connection)
        self.handshakes[self.hosts[connection]] -= 1

    def ended(self, connection: Candidate) -> None:
        host = self.hosts.pop(connection)
        self.connections[host] -= 1
        if connection in self.unfinished:
            self.unfinished.discard(connection)
            self.handshakes[host] -= 1


HANDSHAKE_TIMEOUT_MS = 10_000
ROUND_TRIP_MS = 20


class SimulatedConnection:
    """
    A connection in the simulation (times in whole milliseconds).
    """

    def __init__(self, lock_out: LockOut, host: str, attacker: bool) -> None:
        self.lock_out = lock_out
        self.host = host
        self.attacker = attacker
        self.hello_verified = False
        self.open = True

    def evict(self) -> None:
        # The real connection reports its end at the reactor's next turn.
        self.lock_out.clock.callLater(0, self.end, evicted=True)

    def end(self, evicted: bool = False) -> None:
        if not self.open:
            return
        self.open = False
        self.lock_out.admission.ended(self)
        if self.attacker:
            self.lock_out.attacker_lost(self.host, evicted)


class LockOut:
    """
    Attackers from C{attacker_hosts} hold as many silent connections open
    as the server takes from them, and keep trying more: each host every
    C{attempt_every_ms}, and again the moment one of its connections ends
    at its handshake timeout (the attacker knows the timeout: its next
    connection lands as the old one closes); after an eviction, which it
    cannot foresee, it reconnects one round trip later. Meanwhile a
    legitimate client from another network connects every second from
    C{first_client_ms} on, C{clients} times, and needs two round trips for
    its handshake (its hello verifies after the first). With
    C{attackers_send_hello}, the attackers' connections send a valid hello
    (a recorded one will do) and then nothing.
    """

    def __init__(
        self,
        admission: _Admits,
        clock: MemoryReactorClock,
        attacker_hosts: Sequence[str],
        attempt_every_ms: int = 5,
        first_client_ms: int = 5_000,
        clients: int = 20,
        attackers_send_hello: bool = False,
    ) -> None:
        self.admission = admission
        self.clock = clock
        self.hosts = attacker_hosts
        self.attempt_every_ms = attempt_every_ms
        self.attackers_send_hello = attackers_send_hello
        self.now = 0
        self.events: dict[int, list[Callable[[], None]]] = {}
        self.attacker_admitted = 0
        self.clients_completed = 0
        self.clients_refused = 0
        self.end_ms = first_client_ms + 1000 * clients + 1000
        for k in range(clients):
            self.at(first_client_ms + 1000 * k + 1, self.client_connects)

    def at(self, ms: int, event: Callable[[], None]) -> None:
        self.events.setdefault(ms, []).append(event)

    def run(self) -> None:
        for now in range(self.end_ms):
            self.now = now
            self.clock.advance(0.001)
            for event in self.events.pop(self.now, ()):
                event()
            if self.now % self.attempt_every_ms == 0:
                for host in self.hosts:
                    self.attacker_connects(host)

    def attacker_connects(self, host: str) -> None:
        connection = SimulatedConnection(self, host, attacker=True)
        connection.hello_verified = self.attackers_send_hello
        if self.admission.admit(host, connection) is None:
            self.attacker_admitted += 1
            self.at(self.now + HANDSHAKE_TIMEOUT_MS, connection.end)

    def attacker_lost(self, host: str, evicted: bool) -> None:
        if evicted:
            self.at(self.now + ROUND_TRIP_MS, lambda: self.attacker_connects(host))
        else:
            self.attacker_connects(host)

    def client_connects(self) -> None:
        connection = SimulatedConnection(self, "192.0.2.10", attacker=False)
        if self.admission.admit("192.0.2.10", connection) is not None:
            self.clients_refused += 1
            return

        def hello() -> None:
            connection.hello_verified = True

        def vouch() -> None:
            if connection.open:
                self.admission.handshake_done(connection)
                self.clients_completed += 1
                self.at(self.now + 500, connection.end)

        self.at(self.now + ROUND_TRIP_MS, hello)
        self.at(self.now + 2 * ROUND_TRIP_MS, vouch)


# 16 addresses, each in a /24 of its own: the 16 x 32 = 512.
ATTACKERS_V4 = [f"198.18.{i}.7" for i in range(16)]
# 16 addresses of one IPv6 /64.
ATTACKERS_V6 = [f"2001:db8:bad:1::{i:x}" for i in range(1, 17)]


class LockOutTests(SynchronousTestCase):
    """
    Silent connections from many addresses cannot lock legitimate clients
    out: over 26 simulated seconds of attack, a client connecting once a
    second completes 20 handshakes of 20. The controls run the same attack
    against the refusing policy that admission replaces (refuse past any
    limit, no per-network counts): there the client is refused every time.
    """

    def simulate(
        self,
        admission: _Admits,
        clock: MemoryReactorClock,
        hosts: list[str],
        attackers_send_hello: bool = False,
    ) -> LockOut:
        lock_out = LockOut(admission, clock, hosts, attackers_send_hello=attackers_send_hello)
        lock_out.run()
        return lock_out

    def test_silent_connections_from_16_networks_do_not_lock_clients_out(self) -> None:
        clock = MemoryReactorClock()
        admission = Admission(ConnectionLimits(), clock)
        lock_out = self.simulate(admission, clock, ATTACKERS_V4)
        self.assertEqual((lock_out.clients_completed, lock_out.clients_refused), (20, 0))
        # The attack was real: the attackers held the server full.
        self.assertGreater(lock_out.attacker_admitted, 2 * 512)
        self.assertGreater(admission.evictions, 20)
        self.assertGreater(admission.refusals["handshakes_per_address"], 10_000)

    def test_attackers_that_send_a_valid_hello_do_not_lock_clients_out(self) -> None:
        clock = MemoryReactorClock()
        admission = Admission(ConnectionLimits(), clock)
        lock_out = self.simulate(admission, clock, ATTACKERS_V4, attackers_send_hello=True)
        self.assertEqual((lock_out.clients_completed, lock_out.clients_refused), (20, 0))
        self.assertGreater(admission.evictions, 20)

    def test_control_without_eviction_clients_are_locked_out(self) -> None:
        clock = MemoryReactorClock()
        lock_out = self.simulate(RefusingAdmission(ConnectionLimits()), clock, ATTACKERS_V4)
        self.assertEqual((lock_out.clients_completed, lock_out.clients_refused), (0, 20))

    def test_one_ipv6_network_cannot_fill_the_server(self) -> None:
        clock = MemoryReactorClock()
        admission = Admission(ConnectionLimits(), clock)
        lock_out = self.simulate(admission, clock, ATTACKERS_V6)
        self.assertEqual((lock_out.clients_completed, lock_out.clients_refused), (20, 0))
        # Held to its network's share: nothing needed evicting.
        self.assertEqual(admission.evictions, 0)
        self.assertGreater(admission.refusals["handshakes_per_network"], 10_000)

    def test_control_one_ipv6_network_locks_clients_out_without_network_limits(self) -> None:
        clock = MemoryReactorClock()
        lock_out = self.simulate(RefusingAdmission(ConnectionLimits()), clock, ATTACKERS_V6)
        self.assertEqual((lock_out.clients_completed, lock_out.clients_refused), (0, 20))
