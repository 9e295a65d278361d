"""
C{curvetun keygen} and C{curvetun pubkey} (L{curvetun.cli.keys}), run in
this process.
"""

from __future__ import annotations

import os
import stat

from curvetun.keys import format_public_key
from curvetun.vault import FileVault, MemoryVault

from ._support import CommandTestCase, counter_file

OTHER_KEY = format_public_key(MemoryVault.generate().public_key)


class KeygenTests(CommandTestCase):
    """
    C{curvetun keygen} makes a private key directory and prints its public
    key; it never replaces keys unless told to.
    """

    def test_creates_private_key_directory_and_prints_public_key(self) -> None:
        keydir = os.path.join(self.temp_dir(), "keys")
        result = self.call("keygen", "--keydir", keydir)
        self.assertEqual((result.code, result.err), (0, ""))
        key = result.out.strip()
        self.assertRegex(result.out, r"^[0-9a-f]{64}\n$")
        self.assertEqual(stat.S_IMODE(os.stat(keydir).st_mode), 0o700)
        for name in ("secret.key", "nonce.key", counter_file(keydir).basename()):
            self.assertEqual(stat.S_IMODE(os.stat(os.path.join(keydir, name)).st_mode), 0o600)
        with open(os.path.join(keydir, "public.key")) as f:
            self.assertEqual(f.read().strip(), key)

    def test_uses_CURVETUN_HOME_without_keydir(self) -> None:
        home = os.path.join(self.temp_dir(), "home")
        self.set_env("CURVETUN_HOME", home)
        result = self.call("keygen")
        self.assertEqual(result.code, 0)
        with open(os.path.join(home, "public.key")) as f:
            self.assertEqual(f.read(), result.out)

    def test_refuses_to_replace_keys_without_force(self) -> None:
        keydir = self.temp_dir()
        first = self.call("keygen", "--keydir", keydir).out
        result = self.call("keygen", "--keydir", keydir)
        self.assertOneLineError(result, 1, keydir, "--force")
        self.assertEqual(result.out, "")
        self.assertEqual(self.call("pubkey", "--keydir", keydir).out, first)

    def test_force_replaces_the_key_pair(self) -> None:
        keydir = self.temp_dir()
        first = self.call("keygen", "--keydir", keydir).out
        result = self.call("keygen", "--force", "--keydir", keydir)
        self.assertEqual(result.code, 0)
        self.assertNotEqual(result.out, first)
        self.assertEqual(self.call("pubkey", "--keydir", keydir).out, result.out)

    def test_releases_the_key_directory_for_a_server(self) -> None:
        keydir = self.temp_dir()
        self.call("keygen", "--keydir", keydir)
        FileVault(keydir).close()  # would fail if keygen still held the lock


class PubkeyTests(CommandTestCase):
    """
    C{curvetun pubkey} prints the key C{keygen} printed, checks the key
    directory, and works while a server uses it.
    """

    def test_prints_the_key_keygen_printed(self) -> None:
        keydir = self.temp_dir()
        made = self.call("keygen", "--keydir", keydir)
        result = self.call("pubkey", "--keydir", keydir)
        self.assertEqual((result.code, result.out, result.err), (0, made.out, ""))

    def test_works_while_another_vault_holds_the_key_directory(self) -> None:
        keydir = self.temp_dir()
        vault = FileVault.create(keydir)
        self.addCleanup(vault.close)
        result = self.call("pubkey", "--keydir", keydir)
        self.assertEqual((result.code, result.out), (0, format_public_key(vault.public_key) + "\n"))

    def test_missing_key_directory_says_how_to_make_one(self) -> None:
        keydir = os.path.join(self.temp_dir(), "nothing-here")
        result = self.call("pubkey", "--keydir", keydir)
        self.assertOneLineError(result, 1, keydir, "curvetun keygen")
        self.assertEqual(result.out, "")

    def test_damaged_secret_key_is_named(self) -> None:
        keydir = self.temp_dir()
        self.call("keygen", "--keydir", keydir)
        with open(os.path.join(keydir, "secret.key"), "w") as f:
            f.write("not a key\n")
        self.assertOneLineError(self.call("pubkey", "--keydir", keydir), 1, "secret.key", "damaged")

    def test_public_key_of_another_pair_is_refused(self) -> None:
        keydir = self.temp_dir()
        self.call("keygen", "--keydir", keydir)
        with open(os.path.join(keydir, "public.key"), "w") as f:
            f.write(OTHER_KEY + "\n")
        self.assertOneLineError(self.call("pubkey", "--keydir", keydir), 1, "does not match")

    def test_a_key_directory_that_others_could_change_is_refused(self) -> None:
        parent = self.temp_dir()
        keydir = os.path.join(parent, "keys")
        self.call("keygen", "--keydir", keydir)
        os.chmod(parent, 0o777)
        self.addCleanup(os.chmod, parent, 0o755)
        result = self.call("pubkey", "--keydir", keydir)
        self.assertOneLineError(result, 1, f"its parent {parent} is writable", "chmod go-w")
        self.assertEqual(result.out, "")
