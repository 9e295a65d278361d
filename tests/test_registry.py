"""
Tests for L{curvetun.registry}.
"""

from __future__ import annotations

import base64
import os
import stat
from ipaddress import ip_network

from twisted.logger import LogLevel, capturedLogs
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from curvetun import registry as registry_module
from curvetun.errors import RegistryError
from curvetun.interfaces import IRegistry
from curvetun.registry import Entry, FileRegistry, Registry

from ._vectors import load, unhex

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

    def test_a_large_registry_compares_only_the_entries_that_apply(self) -> None:
        """
        A handshake does not pass over every line: single addresses are
        looked up, and only networks and "*" are scanned.
        """
        lines = [f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255} {K2.hex()}" for n in range(20_000)]
        lines += [f"10.0.0.7 {K1.hex()}", f"192.168.0.0/16 {K3.hex()}", f"* {K4.hex()}"]
        registry = Registry.parse("\n".join(lines))
        compared: list[bytes] = []

        def counting_keys_equal(a: bytes, b: bytes) -> bool:
            compared.append(a)
            return a == b

        self.patch(registry_module, "keys_equal", counting_keys_equal)
        self.assertTrue(registry.is_client_allowed(K1, "10.0.0.7"))
        # Both keys for 10.0.0.7, and the "*" entry: the network does not apply.
        self.assertEqual(sorted(compared), sorted([K2, K1, K4]))
        self.assertTrue(registry.is_client_allowed(K3, "192.168.3.4"))
        self.assertFalse(registry.is_client_allowed(K1, "10.0.0.8"))


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

    def write(self, text: str) -> None:
        self.path.setContent(text.encode("utf-8"))

    def test_provides_iregistry(self) -> None:
        self.assertTrue(verifyObject(IRegistry, FileRegistry(self.path)))

    def test_missing_file_is_an_empty_registry(self) -> None:
        registry = FileRegistry(self.path.path)
        self.assertFalse(registry.is_client_allowed(K1, "10.1.2.3"))
        self.assertIsNone(registry.server_key_for("10.1.2.3"))
        self.write(f"10.1.2.3 {K1.hex()}\n")
        self.assertTrue(registry.is_client_allowed(K1, "10.1.2.3"))
        self.path.remove()
        self.assertFalse(registry.is_client_allowed(K1, "10.1.2.3"))

    def test_reads_the_file_again_when_it_changes(self) -> None:
        self.write(f"10.1.2.3 {K1.hex()}\n")
        registry = FileRegistry(self.path)
        self.assertEqual(registry.server_key_for("10.1.2.3"), K1)
        self.write(f"10.1.2.3 {K2.hex()}  # a different size\n")
        self.assertEqual(registry.server_key_for("10.1.2.3"), K2)

    def test_an_edit_in_place_of_the_same_size_is_seen_by_its_mtime(self) -> None:
        self.write(f"10.1.2.3 {K1.hex()}\n")
        registry = FileRegistry(self.path)
        inode = os.stat(self.path.path).st_ino
        with open(self.path.path, "w") as f:
            f.write(f"10.1.2.3 {K2.hex()}\n")
        os.utime(self.path.path, ns=(0, 10**18))
        self.assertEqual(os.stat(self.path.path).st_ino, inode)
        self.assertEqual(registry.server_key_for("10.1.2.3"), K2)

    def test_unchanged_file_is_not_read_again(self) -> None:
        self.write(f"10.1.2.3 {K1.hex()}\n")
        registry = FileRegistry(self.path)
        with capturedLogs() as events:
            for _ in range(3):
                registry.is_client_allowed(K1, "10.1.2.3")
            self.write(f"10.1.2.3 {K2.hex()}  # changed\n")
            for _ in range(3):
                registry.is_client_allowed(K1, "10.1.2.3")
        self.assertEqual([e["count"] for e in events], [1])

    def test_malformed_file_at_first_load_is_an_error(self) -> None:
        self.write(f"10.1.2.3 {K1.hex()}\n10.1.2.300 {K2.hex()}\n")
        with self.assertRaises(RegistryError) as cm:
            FileRegistry(self.path)
        self.assertTrue(str(cm.exception).startswith(f"{self.path.path}:2: bad address"))

    def test_malformed_reload_keeps_the_entries_and_logs_once(self) -> None:
        self.write(f"10.1.2.3 {K1.hex()}\n")
        registry = FileRegistry(self.path)
        with capturedLogs() as events:
            self.write(f"10.1.2.3 {K2.hex()}\n10.1.2.4\n")
            for _ in range(3):
                self.assertEqual(registry.server_key_for("10.1.2.3"), K1)
                self.assertTrue(registry.is_client_allowed(K1, "10.1.2.3"))
        self.assertEqual(len(events), 1)
        self.assertEqual(events[0]["log_level"], LogLevel.error)
        self.assertTrue(events[0]["error"].startswith(f"{self.path.path}:2: missing key"))
        self.write(f"10.1.2.3 {K2.hex()}\n10.1.2.4 {K3.hex()}\n")
        self.assertEqual(registry.server_key_for("10.1.2.3"), K2)

    def test_file_that_is_not_utf8_is_an_error_naming_the_line(self) -> None:
        self.path.setContent(f"10.1.2.3 {K1.hex()}\n".encode() + b"h.example KEY \xff\n")
        with self.assertRaises(RegistryError) as cm:
            FileRegistry(self.path)
        self.assertEqual(str(cm.exception), f"{self.path.path}:2: not UTF-8 text")

    def test_unreadable_file_is_an_error(self) -> None:
        self.path.makedirs()  # a directory where the file should be
        with self.assertRaises(RegistryError) as cm:
            FileRegistry(self.path)
        self.assertIn(f"cannot read {self.path.path}", str(cm.exception))


class FileRegistryEditTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = FilePath(self.mktemp()).child("sub").child("registry")
        self.registry = FileRegistry(self.path)

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
