"""
Mutable files out of the key directory (C{--statedir}), read-only key
directories, and instance IDs for a key directory copied to several hosts
(C{--instance}).

Read-only is tested as it happens in production, on a read-only mount: the
tests run as root, who ignores permission bits, so a C{chmod} would prove
nothing. A directory is bind-mounted onto itself and the bind remounted
read-only (Linux; the tests are skipped where that is not allowed).
"""

from __future__ import annotations

import os
import subprocess

from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from curvetun.endpoints import service_pool
from curvetun.errors import KeyFileError
from curvetun.keydir import INSTANCE_SPACE, SHARED_FILE
from curvetun.keys import format_public_key
from curvetun.server_keys import ServerKeys
from curvetun.vault import FileVault

from ._support import (
    CommandTestCase,
    admit,
    counter_file,
    counter_of,
    echoes,
    forget_keydir,
    make_keydir,
    run_twist,
)
from ._tap_support import port_of, start_tunnel


def read_only(testcase: SynchronousTestCase, directory: str) -> None:
    """
    Make C{directory} read-only for everyone, root included: bind-mount it
    onto itself and remount the bind read-only; unmounted at cleanup.
    """
    if os.geteuid() != 0:
        raise SkipTest("a read-only bind mount needs root")
    done = subprocess.run(["mount", "--bind", directory, directory], capture_output=True)
    if done.returncode != 0:
        raise SkipTest(f"mount --bind is not allowed here: {done.stderr!r}")
    # Lazily: a vault the test left open holds the directory (its lock).
    testcase.addCleanup(subprocess.run, ["umount", "-l", directory], check=True)
    subprocess.run(["mount", "-o", "remount,ro,bind", directory], check=True)
    # The mount is real: not even root can write now.
    with testcase.assertRaises(OSError):
        open(os.path.join(directory, "probe"), "wb").close()


def nonce_key(keydir: str) -> bytes:
    return bytes.fromhex(FilePath(keydir).child("nonce.key").getContent().decode("ascii"))


class ReadOnlyKeyDirectoryTests(TestCase):
    """
    A key directory on a read-only mount: refused at start without a
    state directory, served with one.
    """

    def test_twist_refuses_it_at_start_with_one_line_naming_the_path_and_statedir(
        self,
    ) -> None:
        keydir, _ = make_keydir(self)
        read_only(self, keydir)
        home = os.path.abspath(self.mktemp())
        os.makedirs(home)
        done = run_twist(home, "--keydir", keydir, "--listen", "curvetun:0:interface=127.0.0.1")
        self.assertEqual(done.returncode, 78, done)
        self.assertEqual(done.stderr.count("\n"), 1, done.stderr)
        self.assertIn(f"cannot store the nonce counter in {keydir}", done.stderr)
        self.assertIn("--statedir", done.stderr)
        self.assertNotIn("Listening on", done.stdout)

    async def test_with_a_statedir_it_serves_and_counts_there_by_key(self) -> None:
        keydir, server_key = make_keydir(self)
        client_dir, client_key = make_keydir(self)
        admit(keydir, client_key)
        read_only(self, keydir)
        statedir = os.path.abspath(self.mktemp())
        tunnel = start_tunnel(
            self,
            "--keydir",
            keydir,
            "--statedir",
            statedir,
            "--listen",
            "curvetun:0:interface=127.0.0.1",
        )
        self.assertEqual(await echoes(port_of(tunnel), server_key, client_dir), b"which key?")
        # The counter went where it could be stored, named by the key;
        # it continues from the one the key directory started with.
        stored = (
            counter_file(statedir)
            if False
            else FilePath(statedir).child(counter_file(keydir).basename())
        )
        self.assertGreater(int(stored.getContent()), 0)
        self.assertEqual(counter_file(keydir).getContent(), b"0\n")
        self.assertEqual(sorted(os.listdir(statedir)), sorted([stored.basename(), "lock"]))

    def test_an_endpoint_string_takes_statedir(self) -> None:
        keydir, _ = make_keydir(self)
        read_only(self, keydir)
        with self.assertRaises(ValueError) as cm:
            serverFromString(reactor, f"curvetun:0:interface=127.0.0.1:keydir={keydir}")
        self.assertIn("statedir", str(cm.exception))
        statedir = os.path.abspath(self.mktemp())
        serverFromString(
            reactor, f"curvetun:0:interface=127.0.0.1:keydir={keydir}:statedir={statedir}"
        )
        # The pool's identity for the directory keeps its counter there.
        service = service_pool.lease(keydir, None).service
        self.assertIsInstance(service.vault, ServerKeys)
        assert isinstance(service.vault, ServerKeys)
        self.assertEqual(service.vault.state.path.path, statedir)

    def test_the_health_check_fails_when_the_state_becomes_read_only(self) -> None:
        keydir, _ = make_keydir(self)
        forget_keydir(keydir)
        statedir = os.path.abspath(self.mktemp())
        keys = ServerKeys(keydir, statedir)
        self.addCleanup(keys.close)
        keys.check_counter()
        keys.current.check_counter()
        read_only(self, statedir)
        for check in (keys.check_counter, keys.current.check_counter):
            error = self.assertRaises(KeyFileError, check)
            self.assertIn(statedir, str(error))
            self.assertIn("Read-only file system", str(error))


class StateDirectoryTests(SynchronousTestCase):
    """
    What a state directory holds, and who may share a key directory.
    """

    def test_two_state_directories_without_instance_ids_cannot_share_a_key(self) -> None:
        keydir, _ = make_keydir(self)
        first = FileVault(keydir, statedir=self.mktemp())
        self.addCleanup(first.close)
        # Each would count on its own from the same number: the same nonces.
        with self.assertRaises(KeyFileError) as cm:
            FileVault(keydir, statedir=self.mktemp())
        self.assertIn("--instance", str(cm.exception))
        # With instance IDs, each has its own part of the counter space.
        first.close()
        for instance in (1, 2):
            vault = FileVault(keydir, statedir=self.mktemp(), instance=instance)
            self.addCleanup(vault.close)

    def test_statedir_in_a_config_file_is_relative_to_the_file(self) -> None:
        from curvetun.config import read_config_file

        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        path = os.path.join(base, "curvetun.toml")
        with open(path, "w") as f:
            f.write('[[tunnel]]\nlisten = "tcp:0"\nstatedir = "state"\ninstance = 7\n')
        [config] = read_config_file(path)
        self.assertEqual(config.statedir, os.path.join(base, "state"))
        self.assertEqual(config.instance, 7)


class InstanceTests(SynchronousTestCase):
    """
    C{--instance}: each host's part of the counter space, stored in the
    state; a shared key directory needs one.
    """

    def test_nonces_of_an_instance_count_in_its_own_part_of_the_counter_space(self) -> None:
        keydir, _ = make_keydir(self)
        vault = FileVault(keydir, instance=513)
        self.addCleanup(vault.close)
        counters = [counter_of(vault.safe_nonce(), nonce_key(keydir)) for _ in range(3)]
        self.assertEqual(counters, [513 * INSTANCE_SPACE + n for n in range(3)])
        # The stored counter is the instance's own count, not the nonce's.
        self.assertLess(int(counter_file(keydir).getContent()), INSTANCE_SPACE)

    def test_the_instance_is_stored_and_another_one_is_refused_unless_asked_for(self) -> None:
        keydir, _ = make_keydir(self)
        FileVault(keydir, instance=3).close()
        self.assertEqual(FilePath(keydir).child("instance").getContent(), b"3\n")
        vault = FileVault(keydir)  # the stored one
        self.assertEqual(vault.state.instance, 3)
        vault.close()
        with self.assertRaises(KeyFileError) as cm:
            FileVault(keydir, instance=4)
        self.assertIn("instance 3", str(cm.exception))
        self.assertIn("--change-instance", str(cm.exception))
        FileVault(keydir, instance=4, change_instance=True).close()
        self.assertEqual(FilePath(keydir).child("instance").getContent(), b"4\n")

    def test_an_instance_id_out_of_range_is_refused(self) -> None:
        keydir, _ = make_keydir(self)
        with self.assertRaises(KeyFileError):
            FileVault(keydir, instance=65536)


class SharedKeyDirectoryTests(CommandTestCase):
    """
    C{curvetun keygen --shared}: servers of the directory need an
    C{--instance}.
    """

    def test_twist_refuses_a_shared_directory_without_an_instance(self) -> None:
        keydir = os.path.join(self.temp_dir(), "keys")
        result = self.call("keygen", "--shared", "--keydir", keydir)
        self.assertEqual(result.code, 0, result)
        self.assertTrue(os.path.exists(os.path.join(keydir, SHARED_FILE)))
        home = self.temp_dir()
        listen = ("--listen", "curvetun:0:interface=127.0.0.1")
        done = run_twist(home, "--keydir", keydir, *listen)
        self.assertEqual(done.returncode, 78, done)
        self.assertEqual(done.stderr.count("\n"), 1, done.stderr)
        self.assertIn("shared", done.stderr)
        self.assertIn("--instance", done.stderr)
        key = result.out.strip()
        self.assertEqual(format_public_key(bytes.fromhex(key)), key)
