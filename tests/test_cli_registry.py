"""
C{curvetun trust}, C{untrust} and C{peers} (L{curvetun.cli.registry_cmds}),
run in this process.
"""

from __future__ import annotations

import base64
import os

from curvetun.keys import format_public_key
from curvetun.registry import Registry
from curvetun.vault import MemoryVault

from ._support import CommandTestCase, Result

OTHER_KEY = format_public_key(MemoryVault.generate().public_key)


class RegistryCommandTests(CommandTestCase):
    """
    C{curvetun trust}, C{untrust} and C{peers} edit and list a registry
    file, refusing malformed input with exit status 2.
    """

    def setUp(self) -> None:
        self.keydir = self.temp_dir()
        self.registry = os.path.join(self.keydir, "registry")
        self.key = format_public_key(MemoryVault.generate().public_key)

    def on_registry(self, *argv: str) -> Result:
        """
        Run a command on this test's registry file.
        """
        command, *rest = argv
        return self.call(command, "--registry", self.registry, *rest)

    def entries(self) -> list[tuple[str, bytes]]:
        with open(self.registry) as f:
            return [(e.address, e.key) for e in Registry.parse(f.read()).entries]

    def test_trust_peers_untrust_round_trip(self) -> None:
        added = self.on_registry("trust", "--comment", "my laptop", "127.0.0.1", self.key)
        self.assertEqual(added.code, 0, added)
        self.assertIn("127.0.0.1", added.out)
        self.on_registry("trust", "10.0.0.0/8", OTHER_KEY)

        listed = self.on_registry("peers")
        self.assertEqual(listed.code, 0)
        self.assertEqual(
            listed.out.splitlines(),
            [f"127.0.0.1   {self.key}  # my laptop", f"10.0.0.0/8  {OTHER_KEY}"],
        )

        removed = self.on_registry("untrust", "127.0.0.1")
        self.assertEqual(removed.code, 0, removed)
        self.assertIn("removed 1 entry", removed.out)
        self.assertEqual(self.on_registry("peers").out, f"10.0.0.0/8  {OTHER_KEY}\n")

    def test_registry_defaults_to_the_file_in_the_key_directory(self) -> None:
        self.assertEqual(self.call("trust", "--keydir", self.keydir, "::1", self.key).code, 0)
        self.assertEqual(self.entries(), [("::1", bytes.fromhex(self.key))])
        self.assertIn(self.key, self.call("peers", "--keydir", self.keydir).out)

    def test_trust_accepts_base64_and_writes_hex(self) -> None:
        key = bytes.fromhex(self.key)
        self.on_registry("trust", "192.0.2.7", base64.b64encode(key).decode())
        self.assertEqual(self.entries(), [("192.0.2.7", key)])

    def test_trusting_an_entry_twice_keeps_one(self) -> None:
        self.on_registry("trust", "127.0.0.1", self.key)
        again = self.on_registry("trust", "127.0.0.1", self.key)
        self.assertEqual(again.code, 0)
        self.assertIn("already", again.out)
        self.assertEqual(len(self.entries()), 1)

    def test_malformed_address_exits_2_naming_it(self) -> None:
        for address in ("10.0.0.1/8", "not an address", "300.1.2.3"):
            result = self.on_registry("trust", address, self.key)
            self.assertOneLineError(result, 2, "address" if "/" not in address else "CIDR")
        self.assertFalse(os.path.exists(self.registry))

    def test_malformed_key_exits_2_naming_it(self) -> None:
        zero = "00" * 32
        for key in ("abc", "g" * 64, zero):
            result = self.on_registry("trust", "127.0.0.1", key)
            self.assertOneLineError(result, 2, "bad public key")
        self.assertOneLineError(
            self.on_registry("untrust", "127.0.0.1", "abc"), 2, "bad public key"
        )
        self.assertFalse(os.path.exists(self.registry))

    def test_multi_line_comment_exits_2(self) -> None:
        result = self.on_registry("trust", "--comment", "a\nb", "127.0.0.1", self.key)
        self.assertOneLineError(result, 2, "--comment")

    def test_host_name_entry_comes_with_a_note_that_servers_admit_by_ip(self) -> None:
        result = self.on_registry("trust", "LocalHost", self.key)
        self.assertEqual(result.code, 0)
        self.assertIn("note", result.err)
        self.assertEqual(self.entries(), [("localhost", bytes.fromhex(self.key))])

    def test_untrust_of_an_absent_entry_exits_1_and_changes_nothing(self) -> None:
        self.on_registry("trust", "127.0.0.1", self.key)
        with open(self.registry) as f:
            before = f.read()
        result = self.on_registry("untrust", "127.0.0.2")
        self.assertOneLineError(result, 1, "no entry for 127.0.0.2", "nothing removed")
        with open(self.registry) as f:
            self.assertEqual(f.read(), before)

    def test_untrust_with_a_key_removes_only_that_entry(self) -> None:
        self.on_registry("trust", "127.0.0.1", self.key)
        self.on_registry("trust", "127.0.0.1", OTHER_KEY)
        self.assertEqual(self.on_registry("untrust", "127.0.0.1", OTHER_KEY).code, 0)
        self.assertEqual(self.entries(), [("127.0.0.1", bytes.fromhex(self.key))])

    def test_peers_of_a_missing_registry_lists_nothing(self) -> None:
        result = self.on_registry("peers")
        self.assertEqual((result.code, result.out), (0, ""))
        self.assertIn("no entries", result.err)

    def test_malformed_registry_is_reported_with_its_line(self) -> None:
        with open(self.registry, "w") as f:
            f.write(f"127.0.0.1 {self.key}\n10.0.0.1/8 {self.key}\n")
        for argv in (["peers"], ["trust", "::1", self.key], ["untrust", "127.0.0.1"]):
            result = self.on_registry(*argv)
            self.assertOneLineError(result, 1, f"{self.registry}:2:")
