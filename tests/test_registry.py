"""
Tests for L{curvetun.registry}.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import threading
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from typing import Any, TypeVar

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, capturedLogs
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from curvetun import registry as registry_module
from curvetun.errors import RegistryError
from curvetun.interfaces import IRegistry
from curvetun.registry import (
    ANY,
    INLINE_REREAD_LIMIT,
    Entry,
    FileRegistry,
    Registry,
    RegistryChange,
)

from ._support import ManualThreads
from ._vectors import load, unhex

_Result = TypeVar("_Result")

_INPUTS = load("handshake.json")["inputs"]
K1 = unhex(_INPUTS["client_longterm_public_C"])
K2 = unhex(_INPUTS["server_longterm_public_S"])
K3 = unhex(_INPUTS["client_ephemeral_public_EC"])
K4 = unhex(_INPUTS["server_ephemeral_public_ES"])


class ParseTests(SynchronousTestCase):
    def test_every_form(self) -> None:
        text = f"""\
# The registry of the test.
   # an indented comment

10.1.2.3 {K1.hex()}
2001:DB8::1 {K1.hex().upper()}  # our v6 host
10.0.0.0/8 {K2.hex()} office network, anything after the key is a comment
2001:db8::/32\t{base64.b64encode(K2).decode()}
Server.Example.COM. {K3.hex()}
*   {K4.hex()}   #anyone holding K4
::ffff:192.0.2.1 {K4.hex()}
"""
        self.assertEqual(
            Registry.parse(text).entries,
            (
                Entry("10.1.2.3", K1, ip_network("10.1.2.3/32")),
                Entry("2001:db8::1", K1, ip_network("2001:db8::1/128")),
                Entry("10.0.0.0/8", K2, ip_network("10.0.0.0/8")),
                Entry("2001:db8::/32", K2, ip_network("2001:db8::/32")),
                Entry("server.example.com", K3, None),
                Entry("*", K4, None),
                # An IPv4-mapped address is the IPv4 address.
                Entry("192.0.2.1", K4, ip_network("192.0.2.1/32")),
            ),
        )

    def test_empty_text_is_an_empty_registry(self) -> None:
        self.assertEqual(Registry.parse("\n  \n# nothing\n").entries, ())

    def test_malformed_lines_give_file_and_line(self) -> None:
        key = K1.hex()
        for line, problem in [
            (f"10.0.0.300 {key}", "bad address: expected an IP address"),
            (f"host_name! {key}", "bad address: expected"),
            (f"-leading-hyphen.example {key}", "bad address"),
            (f"a..b {key}", "bad address"),
            (f"{'a' * 64}.example {key}", "bad address"),
            (f"10.0.0.1/8 {key}", "bad CIDR network: 10.0.0.1/8 has host bits set"),
            (f"10.0.0.0/33 {key}", "bad CIDR network"),
            (f"::1/129 {key}", "bad CIDR network"),
            (f"example.com/24 {key}", "bad CIDR network"),
            ("10.0.0.1", "missing key after '10.0.0.1'"),
            ("10.0.0.1 # the key is in the comment", "missing key after '10.0.0.1'"),
            ("10.0.0.1 zz", "bad public key 'zz'"),
            (f"10.0.0.1 {key[:-2]}", "expected 64 hex digits"),
            (f"10.0.0.1 {'00' * 32}", "low-order"),
        ]:
            text = f"# comment\n\n{line}\n10.9.9.9 {key}\n"
            with self.assertRaises(RegistryError, msg=line) as cm:
                Registry.parse(text, source="reg.txt")
            message = str(cm.exception)
            self.assertTrue(message.startswith("reg.txt:3: "), message)
            self.assertIn(problem, message)
            self.assertNotIn("\n", message)

    def test_default_source_name(self) -> None:
        with self.assertRaises(RegistryError) as cm:
            Registry.parse("10.0.0.1")
        self.assertTrue(str(cm.exception).startswith("<string>:1: "))


SERVER_SIDE = f"""\
10.1.2.3 {K1.hex()}
10.0.0.0/8 {K2.hex()}
2001:db8::/32 {K2.hex()}
2001:db8:1::5 {K3.hex()}
localhost {K3.hex()}
10.1.2.3 {K4.hex()}
"""


class ServerSideTests(SynchronousTestCase):
    registry = Registry.parse(SERVER_SIDE)

    def test_provides_iregistry(self) -> None:
        self.assertTrue(verifyObject(IRegistry, self.registry))

    def test_exact_address(self) -> None:
        self.assertTrue(self.registry.is_client_allowed(K1, "10.1.2.3"))
        self.assertFalse(self.registry.is_client_allowed(K1, "10.1.2.4"))
        self.assertFalse(self.registry.is_client_allowed(K3, "10.1.2.3"))

    def test_any_of_several_keys_for_one_address(self) -> None:
        self.assertTrue(self.registry.is_client_allowed(K4, "10.1.2.3"))
        self.assertTrue(self.registry.is_client_allowed(K2, "10.1.2.3"))  # via 10.0.0.0/8

    def test_cidr_networks(self) -> None:
        self.assertTrue(self.registry.is_client_allowed(K2, "10.200.0.1"))
        self.assertFalse(self.registry.is_client_allowed(K2, "11.0.0.1"))
        self.assertTrue(self.registry.is_client_allowed(K2, "2001:db8:ffff::1"))
        self.assertFalse(self.registry.is_client_allowed(K2, "2001:db9::1"))
        self.assertTrue(self.registry.is_client_allowed(K3, "2001:DB8:1::5"))

    def test_ipv4_mapped_ipv6_peer_matches_ipv4_entries(self) -> None:
        self.assertTrue(self.registry.is_client_allowed(K1, "::ffff:10.1.2.3"))
        self.assertTrue(self.registry.is_client_allowed(K2, "::ffff:10.99.0.1"))
        self.assertFalse(self.registry.is_client_allowed(K1, "::ffff:10.1.2.4"))

    def test_host_names_never_match_on_the_server(self) -> None:
        self.assertFalse(self.registry.is_client_allowed(K3, "127.0.0.1"))
        self.assertFalse(self.registry.is_client_allowed(K3, "::1"))
        self.assertFalse(self.registry.is_client_allowed(K3, "localhost"))

    def test_star_allows_its_key_from_anywhere(self) -> None:
        registry = Registry.parse(f"* {K1.hex()}\n")
        for host in ["10.1.2.3", "::1", "::ffff:127.0.0.1", "not-an-address"]:
            self.assertTrue(registry.is_client_allowed(K1, host))
            self.assertFalse(registry.is_client_allowed(K2, host))

    def test_empty_registry_allows_nobody(self) -> None:
        self.assertFalse(Registry().is_client_allowed(K1, "127.0.0.1"))


class _CountingDict(dict[int, Any]):
    """
    A dict that counts the look-ups made in it.
    """

    def __init__(self, table: dict[int, Any], counter: list[int]) -> None:
        super().__init__(table)
        self._counter = counter

    def get(self, key: int, default: Any = None) -> Any:
        self._counter.append(key)
        return super().get(key, default)


def count_probes(registry: Registry) -> list[int]:
    """
    Make C{registry}'s index tables record each look-up into a list, and
    return that list.
    """
    probes: list[int] = []
    index = registry._index
    for by_length in (index.v4, index.v6):
        by_length._probes = tuple(
            (host_bits, _CountingDict(table, probes)) for host_bits, table in by_length._probes
        )
    return probes


def distinct_keys(count: int) -> list[bytes]:
    return [hashlib.sha256(str(n).encode()).digest() for n in range(count)]


def network_entries(count: int) -> list[Entry]:
    """
    C{count} IPv4 CIDR entries of every prefix length from /8 to /31 and
    IPv6 ones from /16 to /120, each its own key; none covers 192.0.2.1
    or 2001:db8::1.
    """
    entries = []
    for n, key in enumerate(distinct_keys(count)):
        if n % 4:
            length = 8 + n % 24
            address = (10 << 24 | n * 2654435761) & 0xFFFFFFFF
            address = (10 << 24) | (address & 0x00FFFFFF)
            network: IPv4Network | IPv6Network = IPv4Network((address, length), strict=False)
        else:
            length = 16 + n % 105
            network = IPv6Network(
                ((0xFD << 120) | n * 0x9E3779B97F4A7C15 << 40, length), strict=False
            )
        entries.append(Entry(str(network), key, network))
    return entries


class LookUpCostTests(SynchronousTestCase):
    """
    A look-up does not pass over the entries: its cost is bounded by the
    number of prefix lengths, whatever the number of entries.
    """

    def setUp(self) -> None:
        examined: list[Entry] = []

        def counting_allows_ip(entry: Entry, ip: object) -> bool:
            examined.append(entry)
            return False

        self.patch(Entry, "allows_ip", counting_allows_ip)
        compared: list[bytes] = []

        def counting_keys_equal(a: bytes, b: bytes) -> bool:
            compared.append(a)
            return a == b

        self.patch(registry_module, "keys_equal", counting_keys_equal)
        self.examined, self.compared = examined, compared

    def test_an_unknown_key_costs_one_probe_per_prefix_length(self) -> None:
        registry = Registry(tuple(network_entries(50_000)))
        probes = count_probes(registry)
        unknown = hashlib.sha256(b"unknown").digest()
        self.assertFalse(registry.is_client_allowed(unknown, "192.0.2.1"))
        self.assertLessEqual(len(probes), 33)
        probes.clear()
        self.assertFalse(registry.is_client_allowed(unknown, "2001:db8::1"))
        self.assertLessEqual(len(probes), 129)
        self.assertEqual((self.examined, self.compared), ([], []))

    def test_look_ups_agree_with_a_pass_over_every_entry(self) -> None:
        """
        The index gives the answers of the rules as written (any applicable
        entry admits; a client takes the first exact entry, else the first
        covering one), checked here by a plain scan.
        """
        registry = Registry(tuple(network_entries(3_000)))
        entries = registry.entries

        def covering(ip: IPv4Address | IPv6Address) -> list[Entry]:
            return [e for e in entries if e.network is not None and ip in e.network]

        for entry in entries[:300]:
            assert entry.network is not None
            for ip in (entry.network[0], entry.network[-1], entry.network[-1] + 1):
                scanned = covering(ip)
                exact = [
                    e
                    for e in scanned
                    if e.network is not None and e.network.prefixlen == ip.max_prefixlen
                ]
                expected = (exact + scanned)[0].key if scanned else None
                self.assertEqual(registry.server_key_for(str(ip)), expected, ip)
                for key in (entry.key, entries[0].key):
                    self.assertEqual(
                        registry.is_client_allowed(key, str(ip)),
                        any(e.key == key for e in scanned),
                        ip,
                    )
        self.assertEqual((self.examined, self.compared), ([], []))

    def test_many_keys_for_one_network_are_not_compared_one_by_one(self) -> None:
        keys = distinct_keys(50_000)
        network = IPv4Network("10.0.0.0/8")
        entries = [Entry(str(network), key, network) for key in keys[:25_000]]
        entries += [Entry(ANY, key, None) for key in keys[25_000:]]
        registry = Registry(tuple(entries))
        probes = count_probes(registry)
        self.assertFalse(registry.is_client_allowed(hashlib.sha256(b"x").digest(), "10.1.2.3"))
        self.assertTrue(registry.is_client_allowed(keys[24_999], "10.1.2.3"))
        self.assertTrue(registry.is_client_allowed(keys[25_000], "no-address"))
        self.assertEqual(len(probes), 2)
        self.assertEqual(self.compared, [])


class ClientSideTests(SynchronousTestCase):
    def test_host_name_ignoring_case_and_trailing_dot(self) -> None:
        registry = Registry.parse(f"Server.Example.com {K1.hex()}\n")
        for host in ["server.example.com", "SERVER.example.COM", "server.example.com."]:
            self.assertEqual(registry.server_key_for(host), K1)
        self.assertIsNone(registry.server_key_for("example.com"))
        self.assertIsNone(registry.server_key_for("other.example.com"))

    def test_ip_address(self) -> None:
        registry = Registry.parse(f"10.1.2.3 {K1.hex()}\n2001:db8::1 {K2.hex()}\n")
        self.assertEqual(registry.server_key_for("10.1.2.3"), K1)
        self.assertEqual(registry.server_key_for("::ffff:10.1.2.3"), K1)
        self.assertEqual(registry.server_key_for("2001:DB8:0::1"), K2)
        self.assertIsNone(registry.server_key_for("10.1.2.4"))

    def test_ip_address_in_a_network(self) -> None:
        registry = Registry.parse(f"10.0.0.0/8 {K1.hex()}\n")
        self.assertEqual(registry.server_key_for("10.1.2.3"), K1)
        self.assertIsNone(registry.server_key_for("11.1.2.3"))

    def test_exact_address_wins_over_a_network_listed_before_it(self) -> None:
        registry = Registry.parse(f"10.0.0.0/8 {K1.hex()}\n10.1.2.3 {K2.hex()}\n")
        self.assertEqual(registry.server_key_for("10.1.2.3"), K2)
        self.assertEqual(registry.server_key_for("10.1.2.4"), K1)

    def test_first_in_file_order_wins(self) -> None:
        registry = Registry.parse(
            f"h.example {K1.hex()}\nh.example {K2.hex()}\n"
            f"10.1.2.3 {K3.hex()}\n10.1.2.3 {K4.hex()}\n"
            f"10.0.0.0/8 {K1.hex()}\n10.1.0.0/16 {K2.hex()}\n"
        )
        self.assertEqual(registry.server_key_for("h.example"), K1)
        self.assertEqual(registry.server_key_for("10.1.2.3"), K3)
        self.assertEqual(registry.server_key_for("10.1.9.9"), K1)

    def test_star_does_not_apply_to_clients(self) -> None:
        registry = Registry.parse(f"* {K1.hex()}\n")
        for host in ["10.1.2.3", "::1", "server.example.com", "*"]:
            self.assertIsNone(registry.server_key_for(host))

    def test_names_and_addresses_do_not_stand_for_each_other(self) -> None:
        registry = Registry.parse(f"localhost {K1.hex()}\n127.0.0.1 {K2.hex()}\n")
        self.assertEqual(registry.server_key_for("localhost"), K1)
        self.assertEqual(registry.server_key_for("127.0.0.1"), K2)
        self.assertIsNone(registry.server_key_for("::1"))


class FileRegistryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = FilePath(self.mktemp())
        self.threads = ManualThreads()

    def write(self, text: str) -> None:
        self.path.setContent(text.encode("utf-8"))

    def registry(self) -> FileRegistry:
        """
        The registry at C{self.path}, reading every change in a thread
        (C{self.threads}), however small.
        """
        return FileRegistry(self.path, run_in_thread=self.threads, inline_limit=0)

    def test_provides_iregistry(self) -> None:
        self.assertTrue(verifyObject(IRegistry, self.registry()))

    def test_missing_file_is_an_empty_registry(self) -> None:
        registry = self.registry()
        self.assertFalse(registry.is_client_allowed(K1, "10.1.2.3"))
        self.assertIsNone(registry.server_key_for("10.1.2.3"))
        self.write(f"10.1.2.3 {K1.hex()}\n")
        registry.is_client_allowed(K1, "10.1.2.3")
        self.threads.run_all()
        self.assertTrue(registry.is_client_allowed(K1, "10.1.2.3"))
        self.path.remove()
        registry.is_client_allowed(K1, "10.1.2.3")
        self.threads.run_all()
        self.assertFalse(registry.is_client_allowed(K1, "10.1.2.3"))

    def test_a_change_is_read_in_a_thread_not_in_the_look_up(self) -> None:
        """
        The look-up that notices the change only starts the reread, and
        answers from the version read before; the new one is in use once
        the thread has parsed it.
        """
        self.write(f"10.1.2.3 {K1.hex()}\n")
        registry = self.registry()
        parsed: list[str] = []
        parse = Registry.parse

        def recording_parse(text: str, source: str = "<string>") -> Registry:
            parsed.append(text)
            return parse(text, source)

        self.patch(Registry, "parse", recording_parse)
        self.write(f"10.1.2.3 {K2.hex()}  # a different size\n")
        self.assertEqual(registry.server_key_for("10.1.2.3"), K1)
        self.assertEqual((parsed, len(self.threads.jobs)), ([], 1))
        self.assertEqual(self.threads.run_all(), 1)
        self.assertEqual(len(parsed), 1)
        self.assertEqual(registry.server_key_for("10.1.2.3"), K2)

    def test_look_ups_during_a_reread_use_the_last_good_registry(self) -> None:
        self.write(f"10.1.2.3 {K1.hex()}\n")
        registry = self.registry()
        self.write(f"10.1.2.3 {K2.hex()}  # changed\n")
        for _ in range(3):
            self.assertTrue(registry.is_client_allowed(K1, "10.1.2.3"))
            self.assertFalse(registry.is_client_allowed(K2, "10.1.2.3"))
        # Look-ups while a reread runs start no other.
        self.assertEqual(len(self.threads.jobs), 1)

    def test_the_new_version_is_swapped_in_whole(self) -> None:
        """
        A look-up sees one version of the file or the next, never part of
        each: the registry in use is replaced by one assignment, and the
        old one, still held by whoever took it, does not change.
        """
        self.write(f"10.1.2.3 {K1.hex()}\nh.example {K2.hex()}\n")
        registry = self.registry()
        old = registry.current
        self.write(f"10.1.2.3 {K3.hex()}\nh.example {K4.hex()}\n")
        registry.server_key_for("h.example")
        self.assertIs(registry.current, old)
        self.threads.run_all()
        new = registry.current
        self.assertIsNot(new, old)
        self.assertEqual([new.is_client_allowed(k, "10.1.2.3") for k in (K1, K3)], [False, True])
        self.assertEqual(new.server_key_for("h.example"), K4)
        self.assertEqual(
            old.entries, Registry.parse(f"10.1.2.3 {K1.hex()}\nh.example {K2.hex()}").entries
        )
        self.assertTrue(old.is_client_allowed(K1, "10.1.2.3"))

    def test_reads_the_file_again_when_it_changes(self) -> None:
        self.write(f"10.1.2.3 {K1.hex()}\n")
        registry = self.registry()
        self.assertEqual(registry.server_key_for("10.1.2.3"), K1)
        self.write(f"10.1.2.3 {K2.hex()}  # a different size\n")
        registry.server_key_for("10.1.2.3")
        self.threads.run_all()
        self.assertEqual(registry.server_key_for("10.1.2.3"), K2)

    def test_an_edit_in_place_of_the_same_size_is_seen_by_its_mtime(self) -> None:
        self.write(f"10.1.2.3 {K1.hex()}\n")
        registry = self.registry()
        inode = os.stat(self.path.path).st_ino
        with open(self.path.path, "w") as f:
            f.write(f"10.1.2.3 {K2.hex()}\n")
        os.utime(self.path.path, ns=(0, 10**18))
        self.assertEqual(os.stat(self.path.path).st_ino, inode)
        registry.server_key_for("10.1.2.3")
        self.threads.run_all()
        self.assertEqual(registry.server_key_for("10.1.2.3"), K2)

    def test_unchanged_file_is_not_read_again(self) -> None:
        self.write(f"10.1.2.3 {K1.hex()}\n")
        registry = self.registry()
        with capturedLogs() as events:
            for _ in range(3):
                registry.is_client_allowed(K1, "10.1.2.3")
            self.assertEqual(self.threads.jobs, [])
            self.write(f"10.1.2.3 {K2.hex()}  # changed\n")
            for _ in range(3):
                registry.is_client_allowed(K1, "10.1.2.3")
                self.threads.run_all()
        self.assertEqual(self.threads.ran, 1)
        self.assertEqual([e["count"] for e in events], [1])

    def test_a_change_during_a_reread_is_read_by_the_next(self) -> None:
        self.write(f"10.1.2.3 {K1.hex()}\n")
        registry = self.registry()
        self.write(f"10.1.2.3 {K2.hex()}  # first change\n")
        registry.is_client_allowed(K1, "10.1.2.3")
        [(job, d)] = self.threads.jobs
        self.threads.jobs.clear()
        result = job()  # the thread reads the first change...
        self.write(f"10.1.2.3 {K3.hex()}  # the second change\n")
        d.callback(result)  # ...and the second comes before it is in use
        self.assertEqual(registry.server_key_for("10.1.2.3"), K2)
        self.threads.run_all()
        self.assertEqual(registry.server_key_for("10.1.2.3"), K3)
        self.assertEqual(self.threads.jobs, [])

    def test_a_small_file_is_read_by_the_look_up_that_notices_the_change(self) -> None:
        """
        So that C{curvetun trust} applies to the very next connection.
        """
        self.write(f"10.1.2.3 {K1.hex()}\n")
        registry = FileRegistry(self.path, run_in_thread=self.threads)
        self.write(f"10.1.2.3 {K2.hex()}  # a different size\n")
        self.assertEqual(registry.server_key_for("10.1.2.3"), K2)
        self.assertEqual(self.threads.jobs, [])

    def test_a_file_of_the_inline_limit_is_read_in_a_thread(self) -> None:
        line = f"10.1.2.3 {K2.hex()}\n"
        padding = "#" * (INLINE_REREAD_LIMIT - len(line) - 1) + "\n"
        self.write(f"10.1.2.3 {K1.hex()}\n")
        registry = FileRegistry(self.path, run_in_thread=self.threads)
        self.write(line + padding)
        self.assertEqual(self.path.getsize(), INLINE_REREAD_LIMIT)
        self.assertEqual(registry.server_key_for("10.1.2.3"), K1)
        self.assertEqual(self.threads.run_all(), 1)
        self.assertEqual(registry.server_key_for("10.1.2.3"), K2)

    def test_malformed_file_at_first_load_is_an_error(self) -> None:
        self.write(f"10.1.2.3 {K1.hex()}\n10.1.2.300 {K2.hex()}\n")
        with self.assertRaises(RegistryError) as cm:
            self.registry()
        self.assertTrue(str(cm.exception).startswith(f"{self.path.path}:2: bad address"))

    def test_malformed_reload_keeps_the_entries_and_logs_once(self) -> None:
        self.write(f"10.1.2.3 {K1.hex()}\n")
        registry = self.registry()
        with capturedLogs() as events:
            self.write(f"10.1.2.3 {K2.hex()}\n10.1.2.4\n")
            for _ in range(3):
                self.assertEqual(registry.server_key_for("10.1.2.3"), K1)
                self.assertTrue(registry.is_client_allowed(K1, "10.1.2.3"))
                self.threads.run_all()
        self.assertEqual(self.threads.ran, 1)
        self.assertEqual(len(events), 1)
        self.assertEqual(events[0]["log_level"], LogLevel.error)
        self.assertTrue(events[0]["error"].startswith(f"{self.path.path}:2: missing key"))
        self.write(f"10.1.2.3 {K2.hex()}\n10.1.2.4 {K3.hex()}\n")
        registry.server_key_for("10.1.2.3")
        self.threads.run_all()
        self.assertEqual(registry.server_key_for("10.1.2.3"), K2)

    def test_file_that_is_not_utf8_is_an_error_naming_the_line(self) -> None:
        self.path.setContent(f"10.1.2.3 {K1.hex()}\n".encode() + b"h.example KEY \xff\n")
        with self.assertRaises(RegistryError) as cm:
            self.registry()
        self.assertEqual(str(cm.exception), f"{self.path.path}:2: not UTF-8 text")

    def test_unreadable_file_is_an_error(self) -> None:
        self.path.makedirs()  # a directory where the file should be
        with self.assertRaises(RegistryError) as cm:
            self.registry()
        self.assertIn(f"cannot read {self.path.path}", str(cm.exception))


class ReloadTests(SynchronousTestCase):
    """
    L{FileRegistry.reload} (for SIGHUP) and the change notification (for
    revocation).
    """

    def setUp(self) -> None:
        self.path = FilePath(self.mktemp())
        self.path.setContent(f"10.1.2.3 {K1.hex()}\n10.0.0.0/8 {K2.hex()}\n".encode())
        self.threads = ManualThreads()
        self.registry = FileRegistry(self.path, run_in_thread=self.threads, inline_limit=0)
        self.changes: list[RegistryChange] = []
        self.registry.changed_callbacks.append(self.changes.append)

    def entry(self, line: str) -> Entry:
        [entry] = Registry.parse(line).entries
        return entry

    def test_reload_fires_with_what_changed(self) -> None:
        self.path.setContent(
            f"h.example {K3.hex()}\n10.0.0.0/8 {K2.hex()}\n10.1.2.3 {K4.hex()}\n".encode()
        )
        d = self.registry.reload()
        self.assertNoResult(d)
        self.threads.run_all()
        change = self.successResultOf(d)
        self.assertEqual(
            change,
            RegistryChange(
                added=(self.entry(f"h.example {K3.hex()}"), self.entry(f"10.1.2.3 {K4.hex()}")),
                removed=(self.entry(f"10.1.2.3 {K1.hex()}"),),
            ),
        )
        self.assertEqual(self.changes, [change])
        self.assertTrue(self.registry.is_client_allowed(K4, "10.1.2.3"))

    def test_reload_reads_an_unchanged_file_again(self) -> None:
        before = self.registry.current
        d = self.registry.reload()
        self.assertEqual(self.threads.run_all(), 1)
        self.assertEqual(self.successResultOf(d), RegistryChange())
        self.assertIsNot(self.registry.current, before)
        self.assertEqual(self.changes, [RegistryChange()])

    def test_a_bad_reload_fails_keeps_the_entries_and_logs_once(self) -> None:
        self.path.setContent(b"10.1.2.3\n")
        with capturedLogs() as events:
            d = self.registry.reload()
            self.threads.run_all()
            # The look-ups' watcher does not report the same file again.
            self.registry.is_client_allowed(K1, "10.1.2.3")
            self.threads.run_all()
        failure = self.failureResultOf(d, RegistryError)
        self.assertTrue(str(failure.value).startswith(f"{self.path.path}:1: missing key"))
        self.assertEqual(len(events), 1)
        self.assertTrue(self.registry.is_client_allowed(K1, "10.1.2.3"))
        self.assertEqual(self.changes, [])

    def test_reloads_asked_during_a_reread_share_one_reread_after_it(self) -> None:
        first = self.registry.reload()
        self.path.setContent(f"10.1.2.3 {K3.hex()}\n".encode())
        second, third = self.registry.reload(), self.registry.reload()
        self.assertEqual(len(self.threads.jobs), 1)
        self.assertEqual(self.threads.run_all(), 2)
        # The first reread began before the second write; whether it saw it
        # depends on the thread, but the later ones did.
        self.successResultOf(first)
        change = self.successResultOf(second)
        self.assertIs(self.successResultOf(third), change)
        self.assertTrue(self.registry.is_client_allowed(K3, "10.1.2.3"))

    def test_callbacks_run_after_the_swap_and_one_failing_does_not_stop_the_others(
        self,
    ) -> None:
        seen: list[bool] = []

        def broken(change: RegistryChange) -> None:
            raise ZeroDivisionError()

        def checking(change: RegistryChange) -> None:
            seen.append(self.registry.is_client_allowed(K3, "10.1.2.3"))

        self.registry.changed_callbacks[:0] = [broken]
        self.registry.changed_callbacks.append(checking)
        self.path.setContent(f"10.1.2.3 {K3.hex()}\n".encode())
        d = self.registry.reload()
        with capturedLogs() as events:
            self.threads.run_all()
        self.successResultOf(d)
        self.assertEqual(seen, [True])
        self.assertEqual(len(self.changes), 1)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertIn("callback failed", events[0]["log_format"])

    def test_add_and_remove_apply_at_once_and_tell_the_subscribers(self) -> None:
        self.assertTrue(self.registry.add("10.9.9.9", K3))
        self.assertTrue(self.registry.is_client_allowed(K3, "10.9.9.9"))
        self.assertEqual(self.registry.remove("10.1.2.3"), 1)
        self.assertFalse(self.registry.is_client_allowed(K1, "10.1.2.3"))
        self.assertEqual(self.threads.jobs, [])
        self.assertEqual(
            self.changes,
            [
                RegistryChange(added=(self.entry(f"10.9.9.9 {K3.hex()}"),)),
                RegistryChange(removed=(self.entry(f"10.1.2.3 {K1.hex()}"),)),
            ],
        )

    def test_a_reread_overtaken_by_add_is_not_swapped_in(self) -> None:
        """
        A reread that read the file before add() wrote it may deliver after:
        it must not put back the version without the added entry.
        """
        self.path.setContent(f"10.1.2.3 {K1.hex()}\n".encode())
        d = self.registry.reload()
        [(job, done)] = self.threads.jobs
        self.threads.jobs.clear()
        result = job()
        self.registry.add("10.9.9.9", K3)
        done.callback(result)
        self.assertTrue(self.registry.is_client_allowed(K3, "10.9.9.9"))
        # Whoever asked gets a reread that began after the add.
        self.assertNoResult(d)
        self.assertEqual(self.threads.run_all(), 1)
        self.successResultOf(d)
        self.assertTrue(self.registry.is_client_allowed(K3, "10.9.9.9"))
        self.assertFalse(self.registry.is_client_allowed(K2, "10.200.0.1"))


class FileRegistryThreadTests(TestCase):
    """
    With the real reactor and its thread pool.
    """

    def setUp(self) -> None:
        self.path = FilePath(self.mktemp())
        self.path.setContent(f"10.1.2.3 {K1.hex()}\n".encode())

    async def test_the_reactor_answers_look_ups_while_a_thread_parses(self) -> None:
        started, release = threading.Event(), threading.Event()
        parsed_in: list[threading.Thread] = []

        def slow_thread(job: Callable[[], _Result]) -> Deferred[_Result]:
            def slowly() -> _Result:
                parsed_in.append(threading.current_thread())
                started.set()
                release.wait(10)
                return job()

            return deferToThread(slowly)

        self.addCleanup(release.set)
        registry = FileRegistry(self.path, run_in_thread=slow_thread, inline_limit=0)
        self.path.setContent(f"10.1.2.3 {K2.hex()}  # changed\n".encode())
        self.assertTrue(registry.is_client_allowed(K1, "10.1.2.3"))  # starts the reread
        await deferToThread(started.wait, 10)
        # The reactor runs timers and answers look-ups while the thread waits.
        answers = await deferLater(
            reactor, 0.01, lambda: [registry.is_client_allowed(k, "10.1.2.3") for k in (K1, K2)]
        )
        self.assertEqual(answers, [True, False])
        release.set()
        # A reload asked now runs after the running reread: once it fires,
        # that one has been swapped in (and this one found nothing new).
        change = await registry.reload()
        self.assertEqual(change, RegistryChange())
        self.assertEqual(
            [registry.is_client_allowed(k, "10.1.2.3") for k in (K1, K2)], [False, True]
        )
        self.assertEqual(len(parsed_in), 2)
        self.assertNotIn(threading.main_thread(), parsed_in)

    async def test_by_default_rereads_parse_in_the_reactors_thread_pool(self) -> None:
        parsed_in: list[threading.Thread] = []
        parse = Registry.parse

        def recording_parse(text: str, source: str = "<string>") -> Registry:
            parsed_in.append(threading.current_thread())
            return parse(text, source)

        registry = FileRegistry(self.path)
        self.patch(Registry, "parse", recording_parse)
        self.path.setContent(f"10.1.2.3 {K2.hex()}\n".encode())
        await registry.reload()
        self.assertTrue(registry.is_client_allowed(K2, "10.1.2.3"))
        [thread] = parsed_in
        self.assertIsNot(thread, threading.main_thread())


class FileRegistryEditTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = FilePath(self.mktemp()).child("sub").child("registry")
        self.threads = ManualThreads()
        self.registry = FileRegistry(self.path, run_in_thread=self.threads)

    def tearDown(self) -> None:
        # An edit through the registry applies without a reread.
        self.assertEqual(self.threads.jobs, [])

    def test_add_creates_the_file_and_its_directory(self) -> None:
        old_umask = os.umask(0o077)
        self.addCleanup(os.umask, old_umask)
        self.assertTrue(self.registry.add("10.1.2.3", K1, comment="laptop"))
        self.assertEqual(self.path.getContent().decode(), f"10.1.2.3 {K1.hex()}  # laptop\n")
        self.assertEqual(stat.S_IMODE(os.stat(self.path.path).st_mode), 0o644)
        self.assertTrue(self.registry.is_client_allowed(K1, "10.1.2.3"))

    def test_add_accepts_key_text_and_writes_canonical_forms(self) -> None:
        self.registry.add("Server.Example.COM.", base64.b64encode(K1).decode())
        self.registry.add("::FFFF:10.0.0.1", K2.hex().upper())
        self.assertEqual(
            self.path.getContent().decode(),
            f"server.example.com {K1.hex()}\n10.0.0.1 {K2.hex()}\n",
        )
        self.assertEqual(self.registry.server_key_for("server.example.com"), K1)

    def test_add_keeps_other_lines_and_comments(self) -> None:
        original = f"# header\n\n10.0.0.0/8 {K2.hex()} office\n   # indented\n"
        self.path.parent().makedirs()
        self.path.setContent(original.encode())
        self.registry.add("*", K3)
        self.assertEqual(self.path.getContent().decode(), original + f"* {K3.hex()}\n")

    def test_add_of_an_existing_entry_changes_nothing(self) -> None:
        self.registry.add("10.1.2.3", K1)
        before = os.stat(self.path.path)
        self.assertFalse(self.registry.add("::ffff:10.1.2.3", K1.hex(), comment="again"))
        self.assertEqual(os.stat(self.path.path).st_ino, before.st_ino)
        self.assertEqual(self.path.getContent().decode(), f"10.1.2.3 {K1.hex()}\n")

    def test_add_keeps_the_file_mode(self) -> None:
        self.registry.add("10.1.2.3", K1)
        self.path.chmod(0o600)
        self.registry.add("10.1.2.4", K1)
        self.assertEqual(stat.S_IMODE(os.stat(self.path.path).st_mode), 0o600)

    def test_add_refuses_bad_input_with_the_parser_messages(self) -> None:
        self.registry.add("10.1.2.3", K1)
        before = self.path.getContent()
        cases: list[tuple[str, bytes | str, str, str]] = [
            ("10.0.0.300", K1, "", "bad address: expected an IP address"),
            ("10.0.0.1/8", K1, "", "bad CIDR network: 10.0.0.1/8 has host bits set"),
            ("10.0.0.1", "zz", "", "bad public key 'zz'"),
            ("10.0.0.1", K1[:31], "", "bad public key"),
            ("10.0.0.1", b"\x00" * 32, "", "low-order"),
            ("10.0.0.1", K1, "two\nlines", "a comment must be a single line"),
        ]
        for address, key, comment, problem in cases:
            with self.assertRaises(RegistryError) as cm:
                self.registry.add(address, key, comment)
            self.assertIn(problem, str(cm.exception))
        self.assertEqual(self.path.getContent(), before)

    def test_add_refuses_to_rewrite_a_malformed_file(self) -> None:
        self.path.parent().makedirs()
        self.path.setContent(b"10.1.2.3\n")
        with self.assertRaises(RegistryError) as cm:
            self.registry.add("10.1.2.4", K1)
        self.assertTrue(str(cm.exception).startswith(f"{self.path.path}:1: missing key"))
        self.assertEqual(self.path.getContent(), b"10.1.2.3\n")

    def test_remove_every_key_of_an_address(self) -> None:
        self.path.parent().makedirs()
        self.path.setContent(
            f"# keep me\n10.1.2.3 {K1.hex()} one\n\n10.1.2.30 {K1.hex()}\n"
            f"10.1.2.3 {K2.hex()}\n10.0.0.0/8 {K3.hex()}\n".encode()
        )
        self.assertEqual(self.registry.remove("::ffff:10.1.2.3"), 2)
        self.assertEqual(
            self.path.getContent().decode(),
            f"# keep me\n\n10.1.2.30 {K1.hex()}\n10.0.0.0/8 {K3.hex()}\n",
        )
        self.assertFalse(self.registry.is_client_allowed(K1, "10.1.2.3"))

    def test_remove_one_key_of_an_address(self) -> None:
        self.registry.add("h.example", K1)
        self.registry.add("h.example", K2)
        self.assertEqual(self.registry.remove("H.Example", base64.b64encode(K2).decode()), 1)
        self.assertEqual(self.path.getContent().decode(), f"h.example {K1.hex()}\n")
        self.assertEqual(self.registry.remove("h.example", K3), 0)

    def test_remove_of_nothing_leaves_the_file_alone(self) -> None:
        self.assertEqual(self.registry.remove("10.1.2.3"), 0)
        self.assertFalse(self.path.exists())
        self.registry.add("10.1.2.3", K1)
        inode = os.stat(self.path.path).st_ino
        self.assertEqual(self.registry.remove("10.1.2.4"), 0)
        self.assertEqual(os.stat(self.path.path).st_ino, inode)

    def test_remove_refuses_bad_input(self) -> None:
        self.assertRaises(RegistryError, self.registry.remove, "10.0.0.300")
        self.assertRaises(RegistryError, self.registry.remove, "10.0.0.1", "zz")
