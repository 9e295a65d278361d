"""
Tests for L{curvetun.vault}.
"""

from __future__ import annotations

import json
import os
import resource
import stat
import struct
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from nacl.bindings import crypto_box_beforenm, crypto_box_keypair
from twisted.application.service import IService
from twisted.logger import capturedLogs
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from zope.interface.verify import verifyObject

from curvetun import keydir as layout
from curvetun import vault as vault_module
from curvetun.errors import BadPacket, KeyFileError
from curvetun.files import write_atomically
from curvetun.interfaces import IVault
from curvetun.keys import fingerprint
from curvetun.vault import (
    ALLOW_CORE_DUMPS_VARIABLE,
    COUNTER_RESERVE,
    COUNTER_STEP,
    FileVault,
    MemoryVault,
)

from ._support import PROJECT_ROOT, counter_file, counter_of, unscramble16
from ._vectors import load, unhex


def fixed_random(value: bytes) -> Callable[[int], bytes]:
    """
    A C{random_bytes} that always returns (the start of) C{value}.
    """
    return lambda n: value[:n]


HANDSHAKE = load("handshake.json")
INPUTS = HANDSHAKE["inputs"]
VOUCH = next(p for p in HANDSHAKE["packets"] if p["name"] == "vouch")


class UnscrambleTests(SynchronousTestCase):
    def test_unscramble_inverts_every_scramble_vector(self) -> None:
        """
        The test helper really is the inverse, so the counter checks below
        mean what they say.
        """
        for case in load("tea-scramble.json")["cases"]:
            self.assertEqual(
                unscramble16(unhex(case["out"]), unhex(case["key"])), unhex(case["in"])
            )


class MemoryVaultTests(SynchronousTestCase):
    def test_provides_ivault(self) -> None:
        self.assertTrue(verifyObject(IVault, MemoryVault.generate()))

    def test_public_key_and_first_safe_nonce_match_the_original(self) -> None:
        """
        With the original's secret key, nonce key and random bytes, the
        first safe nonce is the one in the handshake vectors.
        """
        vault = MemoryVault(
            unhex(INPUTS["server_longterm_secret_Ss"]),
            unhex(INPUTS["server_safe_nonce_scramble_key"]),
            random_bytes=fixed_random(unhex(INPUTS["server_safe_nonce_random8"])),
        )
        self.assertEqual(vault.public_key, unhex(INPUTS["server_longterm_public_S"]))
        self.assertEqual(vault.safe_nonce(), unhex(INPUTS["server_safe_nonce_16"]))

    def test_safe_nonce_is_counter_and_random_bytes_scrambled(self) -> None:
        nonce_key = bytes(range(32))
        vault = MemoryVault(
            b"\x01" * 32, nonce_key, counter=41, random_bytes=fixed_random(b"R" * 8)
        )
        plain = [unscramble16(vault.safe_nonce(), nonce_key) for _ in range(3)]
        self.assertEqual(plain, [struct.pack(">Q", n) + b"R" * 8 for n in (41, 42, 43)])

    def test_counter_is_stored_before_the_first_nonce_and_at_each_step(self) -> None:
        events: list[object] = []

        def random_bytes(n: int) -> bytes:
            events.append("nonce")
            return b"\x00" * n

        vault = MemoryVault(
            b"\x01" * 32,
            b"\x02" * 32,
            counter=COUNTER_STEP - 2,
            random_bytes=random_bytes,
            persist=events.append,
        )
        for _ in range(4):
            vault.safe_nonce()
        self.assertEqual(
            events,
            [
                # The first nonce after a start reserves values, wherever
                # the counter starts.
                COUNTER_STEP - 2 + COUNTER_RESERVE,
                "nonce",
                "nonce",
                # The spec's rule: at a multiple of 2**20, before the nonce.
                COUNTER_STEP + COUNTER_RESERVE,
                "nonce",
                "nonce",
            ],
        )

    def test_counter_starting_at_a_step_is_stored_once(self) -> None:
        stored: list[int] = []
        vault = MemoryVault(b"\x01" * 32, b"\x02" * 32, counter=0, persist=stored.append)
        for _ in range(100):
            vault.safe_nonce()
        self.assertEqual(stored, [COUNTER_RESERVE])

    def test_no_nonce_is_handed_out_if_storing_the_counter_fails(self) -> None:
        nonce_key = b"\x02" * 32
        attempts: list[int] = []

        def persist(value: int) -> None:
            attempts.append(value)
            if len(attempts) == 1:
                raise OSError("disk full")

        vault = MemoryVault(b"\x01" * 32, nonce_key, counter=COUNTER_STEP, persist=persist)
        self.assertRaises(OSError, vault.safe_nonce)
        self.assertEqual(counter_of(vault.safe_nonce(), nonce_key), COUNTER_STEP)
        self.assertEqual(attempts, [COUNTER_STEP + COUNTER_RESERVE] * 2)

    def test_box_matches_the_original_vouch(self) -> None:
        client = MemoryVault(unhex(INPUTS["client_longterm_secret_Cs"]), b"\x00" * 32)
        box = client.box(
            unhex(VOUCH["inner_V_plaintext"]),
            unhex(VOUCH["inner_V_nonce_24"]),
            unhex(INPUTS["server_longterm_public_S"]),
        )
        self.assertEqual(box, unhex(VOUCH["inner_V"]))

    def test_box_round_trip_between_two_vaults(self) -> None:
        alice, bob = MemoryVault.generate(), MemoryVault.generate()
        nonce = b"N" * 24
        box = alice.box(b"hello", nonce, bob.public_key)
        self.assertEqual(len(box), 5 + 16)
        self.assertEqual(bob.box_open(box, nonce, alice.public_key), b"hello")

    def test_box_open_failures_are_bad_packets(self) -> None:
        alice, bob = MemoryVault.generate(), MemoryVault.generate()
        nonce = b"N" * 24
        box = alice.box(b"hello", nonce, bob.public_key)
        tampered = box[:-1] + bytes([box[-1] ^ 1])
        for ciphertext, nonce_, peer in [
            (b"garbage" * 5, nonce, alice.public_key),
            (tampered, nonce, alice.public_key),
            (box, b"M" * 24, alice.public_key),
            (box[:10], nonce, alice.public_key),
            (box, nonce[:23], alice.public_key),
            (box, nonce, bob.public_key),
        ]:
            self.assertRaises(BadPacket, bob.box_open, ciphertext, nonce_, peer)

    def test_unusable_peer_keys_are_bad_packets(self) -> None:
        vault = MemoryVault.generate()
        order_8_point = bytes.fromhex(
            "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"
        )
        for peer in [b"\x00" * 32, order_8_point, b"\x01" * 31]:
            with self.assertRaises(BadPacket) as cm:
                vault.box_open(b"x" * 32, b"N" * 24, peer)
            self.assertIn("peer public key", cm.exception.reason)
            self.assertRaises(BadPacket, vault.box, b"x", b"N" * 24, peer)

    def test_shared_key_is_computed_once_per_peer(self) -> None:
        calls: list[bytes] = []

        def counting(pk: bytes, sk: bytes) -> bytes:
            calls.append(pk)
            return crypto_box_beforenm(pk, sk)

        self.patch(vault_module, "crypto_box_beforenm", counting)
        server, client = MemoryVault.generate(), MemoryVault.generate()
        nonce = b"N" * 24
        hello = client.box(b"\x00" * 64, nonce, server.public_key)
        server.box_open(hello, nonce, client.public_key)
        server.box(b"cookie", nonce, client.public_key)
        self.assertEqual(calls, [server.public_key, client.public_key])

    def test_least_recently_used_shared_key_is_forgotten(self) -> None:
        calls: list[bytes] = []

        def counting(pk: bytes, sk: bytes) -> bytes:
            calls.append(pk)
            return crypto_box_beforenm(pk, sk)

        self.patch(vault_module, "crypto_box_beforenm", counting)
        self.patch(vault_module, "SHARED_KEY_CACHE_SIZE", 2)
        vault = MemoryVault.generate()
        a, b, c = (crypto_box_keypair()[0] for _ in range(3))
        for peer in [a, b, a, c, a, b]:  # c evicts b, the least recently used
            vault.box(b"", b"N" * 24, peer)
        self.assertEqual(calls, [a, b, c, b])

    def test_repr_shows_only_the_public_key_fingerprint(self) -> None:
        secret_key, nonce_key = b"\x11" * 32, b"\x22" * 32
        vault = MemoryVault(secret_key, nonce_key)
        vault.box(b"", b"N" * 24, MemoryVault.generate().public_key)
        for text in (repr(vault), str(vault)):
            self.assertIn(fingerprint(vault.public_key), text)
            self.assertNotIn(secret_key.hex(), text)
            self.assertNotIn(nonce_key.hex(), text)
            self.assertNotIn("1111", text)
            self.assertNotIn("2222", text)

    def test_generate_makes_distinct_keys(self) -> None:
        self.assertNotEqual(MemoryVault.generate().public_key, MemoryVault.generate().public_key)

    def test_bad_sizes_are_refused(self) -> None:
        self.assertRaises(ValueError, MemoryVault, b"\x01" * 31, b"\x02" * 32)
        self.assertRaises(ValueError, MemoryVault, b"\x01" * 32, b"\x02" * 33)
        self.assertRaises(ValueError, MemoryVault, b"\x01" * 32, b"\x02" * 32, -1)


class FileVaultTestsMixin:
    """
    Helpers for tests of a key directory.
    """

    mktemp: Callable[[], str]

    def make_keydir(self) -> FilePath[str]:
        keydir = FilePath(self.mktemp())
        FileVault.create(keydir).close()
        return keydir

    def nonce_key(self, keydir: FilePath[str]) -> bytes:
        return bytes.fromhex(keydir.child("nonce.key").getContent().decode())

    def stored_counter(self, keydir: FilePath[str]) -> int:
        return int(counter_file(keydir).getContent())


class FileVaultCreateTests(FileVaultTestsMixin, SynchronousTestCase):
    def test_created_files_and_modes(self) -> None:
        keydir = FilePath(self.mktemp())
        # The modes must not depend on the umask.
        old_umask = os.umask(0)
        self.addCleanup(os.umask, old_umask)
        vault = FileVault.create(keydir)

        def mode(name: str | None = None) -> int:
            path = keydir if name is None else keydir.child(name)
            return stat.S_IMODE(os.stat(path.path).st_mode)

        self.assertEqual(mode(), 0o700)
        self.assertEqual(mode("secret.key"), 0o600)
        self.assertEqual(mode("nonce.key"), 0o600)
        self.assertEqual(mode(counter_file(keydir).basename()), 0o600)
        self.assertEqual(mode("public.key"), 0o644)
        self.assertEqual(mode("lock"), 0o600)
        self.assertEqual(
            sorted(keydir.listdir()),
            sorted(
                (
                    layout.SECRET_KEY_FILE,
                    layout.PUBLIC_KEY_FILE,
                    layout.NONCE_KEY_FILE,
                    counter_file(keydir).basename(),
                    layout.LOCK_FILE,
                )
            ),
        )
        self.assertEqual(
            keydir.child("public.key").getContent(), vault.public_key.hex().encode() + b"\n"
        )
        self.assertEqual(counter_file(keydir).getContent(), b"0\n")
        for name in ("secret.key", "nonce.key"):
            content = keydir.child(name).getContent()
            self.assertEqual(len(content), 65)
            self.assertEqual(len(bytes.fromhex(content.decode())), 32)

    def test_loads_what_create_made(self) -> None:
        keydir = FilePath(self.mktemp())
        created = FileVault.create(keydir)
        created.close()
        loaded = FileVault(keydir.path)
        self.assertEqual(loaded.public_key, created.public_key)
        self.assertTrue(verifyObject(IVault, loaded))
        self.assertTrue(IService.providedBy(loaded))
        peer = MemoryVault.generate()
        nonce = b"N" * 24
        to_peer = loaded.box(b"hi", nonce, peer.public_key)
        self.assertEqual(peer.box_open(to_peer, nonce, loaded.public_key), b"hi")
        from_peer = peer.box(b"yo", nonce, loaded.public_key)
        self.assertEqual(loaded.box_open(from_peer, nonce, peer.public_key), b"yo")

    def test_a_key_directory_has_one_vault_at_a_time(self) -> None:
        """
        Two vaults on one directory would hand out the same counter values:
        the second is refused until the first is closed (or its process
        ends).
        """
        keydir = self.make_keydir()
        first = FileVault(keydir)
        with self.assertRaises(KeyFileError) as cm:
            FileVault(keydir)
        self.assertIn("in use by another curvetun process", str(cm.exception))
        self.assertRaises(KeyFileError, FileVault.create, keydir, overwrite=True)
        first.close()
        FileVault(keydir).close()

    def test_create_refuses_to_replace_keys(self) -> None:
        keydir = self.make_keydir()
        before = keydir.child("secret.key").getContent()
        with self.assertRaises(KeyFileError) as cm:
            FileVault.create(keydir)
        self.assertIn(keydir.path, str(cm.exception))
        self.assertEqual(keydir.child("secret.key").getContent(), before)

    def test_create_refuses_a_directory_with_only_some_key_files(self) -> None:
        keydir = FilePath(self.mktemp())
        keydir.makedirs()
        # A counter of older versions, and one named by a key.
        for name in ("nonce.counter", "nonce.counter.0123456789abcdef"):
            keydir.child(name).setContent(b"12345\n")
            self.assertRaises(KeyFileError, FileVault.create, keydir)
            self.assertEqual(keydir.child(name).getContent(), b"12345\n")

    def test_create_with_overwrite_makes_a_new_identity(self) -> None:
        keydir = FilePath(self.mktemp())
        old = FileVault.create(keydir)
        old.close()
        new = FileVault.create(keydir, overwrite=True)
        new.close()
        self.assertNotEqual(new.public_key, old.public_key)
        self.assertEqual(FileVault(keydir).public_key, new.public_key)

    def test_repr_and_str_hide_the_secrets(self) -> None:
        keydir = self.make_keydir()
        vault = FileVault(keydir)
        secrets = [
            keydir.child(name).getContent().strip().decode() for name in ("secret.key", "nonce.key")
        ]
        for text in (repr(vault), str(vault)):
            self.assertIn(fingerprint(vault.public_key), text)
            for secret in secrets:
                self.assertNotIn(secret, text)
                self.assertNotIn(secret[:16], text)

    def test_start_logs_the_fingerprint(self) -> None:
        vault = FileVault(self.make_keydir())
        with capturedLogs() as events:
            vault.startService()
        self.addCleanup(vault.stopService)
        self.assertTrue(vault.running)
        self.assertEqual([e["fingerprint"] for e in events], [fingerprint(vault.public_key)])


class FileVaultCounterTests(FileVaultTestsMixin, SynchronousTestCase):
    def test_counter_never_repeats_after_a_crash(self) -> None:
        """
        A vault dropped without any shutdown, between two points where the
        counter is stored, and loaded again never hands out a counter value
        it handed out before.
        """
        keydir = self.make_keydir()
        nonce_key = self.nonce_key(keydir)
        first = FileVault(keydir)
        before = [counter_of(first.safe_nonce(), nonce_key)]
        first.close()
        vault = FileVault(keydir)
        before += [counter_of(vault.safe_nonce(), nonce_key) for _ in range(1000)]
        # The "crash": nothing is written on the way out; the process's end
        # releases the directory's lock, as close() does here.
        vault.close()
        after = FileVault(keydir)
        later = [counter_of(after.safe_nonce(), nonce_key) for _ in range(1000)]
        handed_out = before + later
        self.assertEqual(len(set(handed_out)), len(handed_out))
        self.assertGreater(min(later), max(before))
        self.assertEqual(later, list(range(later[0], later[0] + 1000)))

    def test_counter_is_stored_at_a_step_before_that_nonce_is_handed_out(self) -> None:
        keydir = self.make_keydir()
        nonce_key = self.nonce_key(keydir)
        counter_file(keydir).setContent(b"%d\n" % (COUNTER_STEP - 2))
        vault = FileVault(keydir)
        handed_out = [counter_of(vault.safe_nonce(), nonce_key) for _ in range(2)]
        self.assertEqual(handed_out, [COUNTER_STEP - 2, COUNTER_STEP - 1])
        self.assertEqual(self.stored_counter(keydir), COUNTER_STEP - 2 + COUNTER_RESERVE)
        handed_out.append(counter_of(vault.safe_nonce(), nonce_key))
        # The nonce has just been returned, and the file already says so.
        self.assertEqual(handed_out[-1], COUNTER_STEP)
        self.assertEqual(self.stored_counter(keydir), COUNTER_STEP + COUNTER_RESERVE)
        handed_out += [counter_of(vault.safe_nonce(), nonce_key) for _ in range(10)]
        vault.close()  # crash after the step
        again = counter_of(FileVault(keydir).safe_nonce(), nonce_key)
        self.assertEqual(again, COUNTER_STEP + COUNTER_RESERVE)
        self.assertNotIn(again, handed_out)

    def test_failure_to_store_the_counter_hands_out_no_nonce(self) -> None:
        keydir = self.make_keydir()
        vault = FileVault(keydir)

        def failing_replace(src: str, dst: str) -> None:
            raise OSError(28, "No space left on device")

        patch = self.patch(os, "replace", failing_replace)
        with self.assertRaises(KeyFileError) as cm:
            vault.safe_nonce()
        self.assertIn(counter_file(keydir).path, str(cm.exception))
        self.assertIn("No space left on device", str(cm.exception))
        self.assertEqual(self.stored_counter(keydir), 0)
        self.assertEqual(
            sorted(keydir.listdir()),
            sorted(
                (
                    layout.SECRET_KEY_FILE,
                    layout.PUBLIC_KEY_FILE,
                    layout.NONCE_KEY_FILE,
                    counter_file(keydir).basename(),
                    layout.LOCK_FILE,
                )
            ),
        )
        patch.restore()
        self.assertEqual(counter_of(vault.safe_nonce(), self.nonce_key(keydir)), 0)
        self.assertEqual(self.stored_counter(keydir), COUNTER_RESERVE)


class FileVaultLoadErrorTests(FileVaultTestsMixin, SynchronousTestCase):
    def assert_refused(self, keydir: FilePath[str], name: str, *fragments: str) -> str:
        """
        Loading C{keydir} fails with a one-line message naming the file
        C{name}, and leaves that file as it was.
        """
        path = keydir.child(name)
        before = path.getContent() if path.exists() else None
        with self.assertRaises(KeyFileError) as cm:
            FileVault(keydir)
        message = str(cm.exception)
        self.assertIn(path.path, message)
        self.assertNotIn("\n", message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        self.assertEqual(path.getContent() if path.exists() else None, before)
        return message

    def test_secret_files_open_to_group_or_others_are_refused(self) -> None:
        for name, mode in [("secret.key", 0o644), ("secret.key", 0o620), ("nonce.key", 0o604)]:
            keydir = self.make_keydir()
            keydir.child(name).chmod(mode)
            path = keydir.child(name).path
            self.assert_refused(keydir, name, f"(mode {mode:04o})", f"run: chmod 600 {path}")

    def test_public_key_and_counter_may_be_world_readable(self) -> None:
        keydir = self.make_keydir()
        counter_file(keydir).chmod(0o644)
        FileVault(keydir)

    def test_damaged_key_files_are_refused(self) -> None:
        for name in ("secret.key", "nonce.key", "public.key"):
            for content, fragment in [
                (None, "is missing"),
                (b"", "is empty"),
                (b"\n", "is empty"),
                (b"ab" * 20 + b"\n", "found 40 characters"),
                (b"ab" * 33 + b"\n", "found 66 characters"),
                (b"zz" * 32 + b"\n", "not hexadecimal"),
                (b"ab " * 21 + b"a\n", "not hexadecimal"),
                (b"\xff" * 64, "not text"),
            ]:
                keydir = self.make_keydir()
                path = keydir.child(name)
                if content is None:
                    path.remove()
                else:
                    path.setContent(content)
                    path.chmod(0o600)
                message = self.assert_refused(keydir, name, fragment)
                if content and content.strip():
                    # A damaged secret is still a secret: never quoted.
                    self.assertNotIn(content.strip().decode("latin-1")[:16], message)

    def test_public_key_that_does_not_match_the_secret_is_refused(self) -> None:
        keydir = self.make_keydir()
        other = MemoryVault.generate().public_key
        keydir.child("public.key").setContent(other.hex().encode() + b"\n")
        self.assert_refused(keydir, "public.key", "does not match", "secret.key")

    def test_missing_counter_is_refused_because_it_would_reuse_nonces(self) -> None:
        keydir = self.make_keydir()
        counter_file(keydir).remove()
        self.assert_refused(keydir, "nonce.counter", "is missing", "reuse nonces", "add 2**40")

    def test_damaged_counter_is_refused(self) -> None:
        too_big = b"%d\n" % (2**63 + 1)
        for content in [b"", b"abc\n", b"-1\n", b"1.5\n", b"0x10\n", b"\xd9\xa3\n", too_big]:
            keydir = self.make_keydir()
            counter_file(keydir).setContent(content)
            problem = {b"": "is empty", b"\xd9\xa3\n": "not text"}.get(
                content, "expected a decimal number"
            )
            self.assert_refused(keydir, "nonce.counter", problem, "add 2**40")

    def test_counter_file_allows_surrounding_whitespace(self) -> None:
        keydir = self.make_keydir()
        counter_file(keydir).setContent(b" 12345 \r\n")
        vault = FileVault(keydir)
        self.assertEqual(counter_of(vault.safe_nonce(), self.nonce_key(keydir)), 12345)

    def test_missing_directory_is_refused(self) -> None:
        keydir = FilePath(self.mktemp())
        self.assert_refused(keydir, "secret.key", "is missing")


class WriteAtomicallyTests(SynchronousTestCase):
    def test_replaces_the_file_with_the_given_mode(self) -> None:
        directory = FilePath(self.mktemp())
        directory.makedirs()
        path = directory.child("f")
        path.setContent(b"old")
        write_atomically(path, b"new", 0o640)
        self.assertEqual(path.getContent(), b"new")
        self.assertEqual(stat.S_IMODE(os.stat(path.path).st_mode), 0o640)
        self.assertEqual(directory.listdir(), ["f"])

    def test_failed_write_leaves_the_old_file_and_no_temporary(self) -> None:
        directory = FilePath(self.mktemp())
        directory.makedirs()
        path = directory.child("f")
        path.setContent(b"old")

        def failing_fsync(fd: int) -> None:
            raise OSError(5, "Input/output error")

        self.patch(os, "fsync", failing_fsync)
        self.assertRaises(OSError, write_atomically, path, b"new", 0o600)
        self.assertEqual(path.getContent(), b"old")
        self.assertEqual(directory.listdir(), ["f"])


# A child process that reports, as one JSON line, whether it may dump core
# (prctl(PR_GET_DUMPABLE) and RLIMIT_CORE) before and after it loads (or
# creates, or reads the public key of) a key directory; then it waits for
# its standard input to close, so that the parent can look at /proc/PID.
_CORE_DUMP_CHILD = """
import ctypes, json, resource, sys
from curvetun.vault import FileVault, read_public_key

libc = ctypes.CDLL(None, use_errno=True)
PR_GET_DUMPABLE = 3
# As if core dumps were wanted: raise the limit as far as allowed (root may
# raise the hard limit), so that only curvetun can have lowered it.
try:
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY,) * 2)
except (OSError, ValueError):
    hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
    resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))
before = [libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0), resource.getrlimit(resource.RLIMIT_CORE)]
action, keydir = sys.argv[1:]
if action == "load":
    FileVault(keydir).close()
elif action == "create":
    FileVault.create(keydir).close()
else:
    read_public_key(keydir)
after = [libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0), resource.getrlimit(resource.RLIMIT_CORE)]
print(json.dumps({"before": before, "after": after}), flush=True)
sys.stdin.read()
"""


def limit(value: int) -> str:
    """
    A resource limit as /proc/PID/limits writes it.
    """
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


class CoreDumpTests(FileVaultTestsMixin, SynchronousTestCase):
    """
    A process that loads a secret key leaves no core dump (which would
    hold the key) and, on Linux, is not "dumpable" (no ptrace or
    /proc/PID/mem for other processes of its user), unless
    CURVETUN_ALLOW_CORE_DUMPS is set for debugging.
    """

    if not sys.platform.startswith("linux"):
        skip = "PR_GET_DUMPABLE and /proc/PID are Linux's"

    def in_child(self, action: str, keydir: FilePath[str], **env: str) -> dict[str, Any]:
        """
        Run L{_CORE_DUMP_CHILD}; return its report, and the core-file limit
        that /proc/PID/limits showed while it was alive.
        """
        environ = {k: v for k, v in os.environ.items() if k != ALLOW_CORE_DUMPS_VARIABLE}
        environ.update(env, PYTHONPATH=PROJECT_ROOT)
        child = subprocess.Popen(
            [sys.executable, "-c", _CORE_DUMP_CHILD, action, keydir.path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environ,
            cwd=PROJECT_ROOT,
        )
        try:
            assert child.stdout is not None and child.stdin is not None
            line = child.stdout.readline()
            if not line:  # it failed: say how (it has closed its output)
                self.fail(child.stderr.read() if child.stderr else b"")
            report: dict[str, Any] = json.loads(line)
            with open(f"/proc/{child.pid}/limits") as f:
                [row] = [r for r in f if r.startswith("Max core file size")]
            report["proc_limits"] = row.split()[4:6]
            child.stdin.close()
        finally:
            child.wait(timeout=30)
        self.assertEqual(child.returncode, 0)
        return report

    def assert_dumps_off(self, report: dict[str, Any]) -> None:
        self.assertEqual(report["before"][0], 1, "the child should start dumpable")
        self.assertEqual(report["after"], [0, [0, 0]])
        self.assertEqual(report["proc_limits"], ["0", "0"])
        if report["before"][1] == [0, 0]:
            raise SkipTest(
                "core files are off here already (hard limit 0): "
                "that loading a key turns them off is not shown"
            )

    def test_loading_a_key_directory_turns_core_dumps_off(self) -> None:
        self.assert_dumps_off(self.in_child("load", self.make_keydir()))

    def test_creating_a_key_directory_turns_core_dumps_off(self) -> None:
        self.assert_dumps_off(self.in_child("create", FilePath(self.mktemp())))

    def test_reading_the_public_key_turns_core_dumps_off(self) -> None:
        """
        C{curvetun pubkey} reads the secret key too, to check the public
        key against it.
        """
        self.assert_dumps_off(self.in_child("pubkey", self.make_keydir()))

    def test_CURVETUN_ALLOW_CORE_DUMPS_keeps_them_on(self) -> None:
        report = self.in_child("load", self.make_keydir(), **{ALLOW_CORE_DUMPS_VARIABLE: "1"})
        self.assertEqual(report["after"], report["before"])
        self.assertEqual(report["after"][0], 1)
        soft, hard = report["after"][1]
        self.assertEqual(report["proc_limits"], [limit(soft), limit(hard)])

    def test_CURVETUN_ALLOW_CORE_DUMPS_0_does_not(self) -> None:
        self.assert_dumps_off(
            self.in_child("load", self.make_keydir(), **{ALLOW_CORE_DUMPS_VARIABLE: "0"})
        )
