"""
Tests for L{curvetun.keydir}: the key directory's layout, and the checks
that refuse a key directory that another user could change (as OpenSSH's
StrictModes does), through L{FileVault} and C{read_public_key}, which use
them.

Files and directories owned by another user are made with C{os.chown},
which needs root; those tests are skipped otherwise.
"""

from __future__ import annotations

import os
import pwd

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from curvetun import keydir as layout
from curvetun.errors import KeyFileError
from curvetun.vault import FileVault, read_public_key

from ._support import OTHER_UID, counter_file

AS_ROOT = os.geteuid() == 0
ME = pwd.getpwuid(os.geteuid()).pw_name
NOT_ROOT = None if AS_ROOT else "making files owned by another user needs root"


class LayoutTests(SynchronousTestCase):
    """
    Where a key directory is, and what it holds.
    """

    def test_default_is_CURVETUN_HOME_else_dot_curvetun_in_the_home_directory(self) -> None:
        self.patch(os, "environ", {"HOME": "/home/someone", "CURVETUN_HOME": "/srv/keys"})
        self.assertEqual(layout.default_keydir(), "/srv/keys")
        self.patch(os, "environ", {"HOME": "/home/someone"})
        self.assertEqual(layout.default_keydir(), "/home/someone/.curvetun")

    def test_the_registry_defaults_to_a_file_in_the_key_directory(self) -> None:
        self.assertEqual(layout.registry_path("/srv/keys"), "/srv/keys/registry")

    def test_existing_key_files_are_the_identity_files_present(self) -> None:
        keydir = FilePath(self.mktemp())
        keydir.makedirs()
        self.assertEqual(layout.existing_key_files(keydir), [])
        keydir.child("nonce.counter").setContent(b"0\n")
        keydir.child("registry").setContent(b"")
        self.assertEqual(layout.existing_key_files(keydir.path), ["nonce.counter"])


class OwnershipTests(SynchronousTestCase):
    """
    A key directory that someone other than the effective user or root
    could change is refused with one line naming the path and the fix:
    whoever can change it could put back an old nonce counter.
    """

    def make_keydir(self, parent_mode: int = 0o755) -> tuple[FilePath[str], FilePath[str]]:
        """
        A loadable key directory C{keys} in a fresh parent directory given
        C{parent_mode} afterwards; returns both.
        """
        parent = FilePath(self.mktemp())
        parent.makedirs()
        keydir = parent.child("keys")
        FileVault.create(keydir).close()
        os.chmod(parent.path, parent_mode)
        return parent, keydir

    def assert_refused(self, keydir: FilePath[str], *fragments: str) -> str:
        """
        Loading C{keydir}, and reading its public key, fail with one line
        that contains each of C{fragments}.
        """
        for load in (FileVault, read_public_key):
            with self.assertRaises(KeyFileError) as cm:
                load(keydir)
            message = str(cm.exception)
            self.assertNotIn("\n", message)
            for fragment in fragments:
                self.assertIn(fragment, message)
        return message

    def test_a_normal_key_directory_loads(self) -> None:
        _, keydir = self.make_keydir()
        FileVault(keydir).close()

    def test_a_key_directory_owned_by_another_user_is_refused(self) -> None:
        _, keydir = self.make_keydir()
        os.chown(keydir.path, OTHER_UID, -1)
        self.assert_refused(
            keydir,
            f"refusing key directory {keydir.path}: it is owned by uid {OTHER_UID}",
            f"chown {ME} {keydir.path}",
        )

    test_a_key_directory_owned_by_another_user_is_refused.skip = NOT_ROOT  # type: ignore[attr-defined]

    def test_secret_files_and_the_counter_owned_by_another_user_are_refused(self) -> None:
        for name in ("secret.key", "nonce.key", "counter"):
            _, keydir = self.make_keydir()
            path = (counter_file(keydir) if name == "counter" else keydir.child(name)).path
            os.chown(path, OTHER_UID, -1)
            with self.assertRaises(KeyFileError) as cm:
                FileVault(keydir)
            message = str(cm.exception)
            self.assertIn(f"refusing {path}: it is owned by uid {OTHER_UID}", message)
            self.assertIn(f"chown {ME} {path}", message)
            self.assertNotIn("\n", message)

    test_secret_files_and_the_counter_owned_by_another_user_are_refused.skip = NOT_ROOT  # type: ignore[attr-defined]

    def test_a_public_key_owned_by_another_user_is_still_checked_against_the_secret(
        self,
    ) -> None:
        """
        public.key is not a secret, and a replaced one does not load: it
        must be the public key of secret.key.
        """
        _, keydir = self.make_keydir()
        os.chown(keydir.child("public.key").path, OTHER_UID, -1)
        FileVault(keydir).close()

    test_a_public_key_owned_by_another_user_is_still_checked_against_the_secret.skip = NOT_ROOT  # type: ignore[attr-defined]

    def test_a_parent_writable_by_others_is_refused(self) -> None:
        for mode, who in [(0o777, "group and others"), (0o757, "others"), (0o775, "group")]:
            parent, keydir = self.make_keydir(parent_mode=mode)
            self.assert_refused(
                keydir,
                f"refusing key directory {keydir.path}: its parent {parent.path} is "
                f"writable by {who}; chmod go-w {parent.path}",
            )

    def test_every_directory_up_to_the_root_is_checked(self) -> None:
        grandparent = FilePath(self.mktemp())
        keydir = grandparent.child("a").child("b").child("keys")
        FileVault.create(keydir).close()
        os.chmod(grandparent.path, 0o777)
        self.assert_refused(keydir, f"its parent {grandparent.path} is writable")

    def test_a_root_owned_sticky_parent_like_tmp_is_allowed(self) -> None:
        _, keydir = self.make_keydir(parent_mode=0o1777)
        FileVault(keydir).close()
        read_public_key(keydir)

    test_a_root_owned_sticky_parent_like_tmp_is_allowed.skip = NOT_ROOT  # type: ignore[attr-defined]

    def test_a_sticky_parent_owned_by_another_user_is_refused(self) -> None:
        parent, keydir = self.make_keydir(parent_mode=0o1777)
        os.chown(parent.path, OTHER_UID, -1)
        self.assert_refused(keydir, f"its parent {parent.path} is owned by uid {OTHER_UID}")

    test_a_sticky_parent_owned_by_another_user_is_refused.skip = NOT_ROOT  # type: ignore[attr-defined]

    def test_a_parent_owned_by_another_user_is_refused(self) -> None:
        """
        Its owner could rename the key directory away and put another in
        its place, whatever the mode.
        """
        parent, keydir = self.make_keydir()
        os.chown(parent.path, OTHER_UID, -1)
        self.assert_refused(
            keydir,
            f"refusing key directory {keydir.path}: its parent {parent.path} is owned by "
            f"uid {OTHER_UID}",
        )

    test_a_parent_owned_by_another_user_is_refused.skip = NOT_ROOT  # type: ignore[attr-defined]

    def test_a_symbolic_link_is_checked_where_it_points(self) -> None:
        parent, real = self.make_keydir(parent_mode=0o777)
        link = FilePath(self.mktemp())
        os.symlink(real.path, link.path)
        self.assert_refused(link, f"its parent {parent.path} is writable by group and others")

    def test_create_refuses_an_unsafe_place_before_writing_a_secret(self) -> None:
        parent = FilePath(self.mktemp())
        parent.makedirs()
        os.chmod(parent.path, 0o777)
        keydir = parent.child("keys")
        with self.assertRaises(KeyFileError) as cm:
            FileVault.create(keydir)
        self.assertIn(f"its parent {parent.path} is writable", str(cm.exception))
        self.assertEqual(keydir.listdir(), [])

    def test_create_leaves_the_mode_of_another_users_directory_alone(self) -> None:
        keydir = FilePath(self.mktemp())
        keydir.makedirs()
        os.chmod(keydir.path, 0o750)
        os.chown(keydir.path, OTHER_UID, -1)
        with self.assertRaises(KeyFileError) as cm:
            FileVault.create(keydir)
        self.assertIn(f"it is owned by uid {OTHER_UID}", str(cm.exception))
        self.assertEqual(os.stat(keydir.path).st_mode & 0o7777, 0o750)
        self.assertEqual(keydir.listdir(), [])

    test_create_leaves_the_mode_of_another_users_directory_alone.skip = NOT_ROOT  # type: ignore[attr-defined]
