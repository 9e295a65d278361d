"""
Server-key rollover: a key directory with a current and a previous key
(L{rotate}, L{finish_rotation}), and L{ServerKeys}, the vaults of both for
a running server, which L{ServerKeys.reload} brings up to date with the
directory.

During a rollover the previous key's files are the current key's names
with the prefix C{previous.} (L{curvetun.keydir.PREVIOUS_PREFIX}). Each key
has its own nonce key and its own counter file, named by its public key
(L{curvetun.keydir.counter_file_name}): a server that runs on while the
directory is rotated keeps storing its key's counter in that key's file,
wherever the key's other files have moved to. See
C{docs/keys-and-registry.md}, "Rolling the server key over".
"""

from __future__ import annotations

import contextlib
import os

import nacl.utils
from nacl.bindings import crypto_box_keypair
from twisted.application.service import Service
from twisted.logger import Logger
from twisted.python.filepath import FilePath
from zope.interface import implementer

from . import keydir as layout
from .errors import KeyFileError
from .files import write_atomically
from .interfaces import IServerKeys, IVault
from .keydir import (
    COUNTER_FILE,
    NONCE_KEY_FILE,
    PUBLIC_KEY_FILE,
    SECRET_KEY_FILE,
    counter_file_name,
    key_file_name,
)
from .keys import KEY_SIZE, fingerprint, keys_equal
from .vault import FileVault, KeyState, disable_core_dumps, read_public_key

_KEY_FILES = (PUBLIC_KEY_FILE, SECRET_KEY_FILE, NONCE_KEY_FILE)
_MODES = {PUBLIC_KEY_FILE: 0o644, SECRET_KEY_FILE: 0o600, NONCE_KEY_FILE: 0o600}


def has_previous(keydir: FilePath[str]) -> bool:
    """
    Whether C{keydir} holds a previous key (a rollover is not finished).
    """
    return any(keydir.child(key_file_name(name, True)).exists() for name in _KEY_FILES)


def rotate(keydir: str | FilePath[str]) -> bytes:
    """
    Make a new key pair (with its own nonce key, and its counter at 0) the
    current key of C{keydir}, and keep the current one as the previous key.
    It takes no lock: a server may be running on the directory, and goes
    on with its keys (and their counters) until it reloads.

    @return: the new public key.
    @raise KeyFileError: the directory holds a previous key already (a
        rollover is not finished), its current key does not load (as
        L{read_public_key} checks it), or a file cannot be written.
    """
    path = FilePath(keydir) if isinstance(keydir, str) else keydir
    old_public_key = read_public_key(path)
    if has_previous(path):
        raise KeyFileError(
            f"{path.path} holds a previous key already "
            f"({fingerprint(read_public_key(path, previous=True))}...): finish that "
            f"rollover first with 'curvetun rotate --finish --keydir {path.path}'"
        )
    disable_core_dumps()
    public_key, secret_key = crypto_box_keypair()
    try:
        # In this order, a crash at any point leaves the old key current
        # (maybe with a copy of it as the previous key, which --finish
        # forgets), or the new key pair current with the old one
        # previous, or a public key that does not match its secret key,
        # which does not load (restore, or copy previous.* back): never a
        # key with a counter of another, or back at 0.
        #
        # 1. The new key's counter: it is named by the new key.
        write_atomically(path.child(counter_file_name(public_key)), b"0\n", 0o600)
        # 2. A counter of older versions is the old key's: give it the old
        #    key's name, now that the current key is about to change.
        legacy = path.child(COUNTER_FILE)
        old_counter = path.child(counter_file_name(old_public_key))
        if legacy.exists():
            values = [layout.read_counter(legacy)]
            if old_counter.exists():
                values.append(layout.read_counter(old_counter))
            write_atomically(old_counter, f"{max(values)}\n".encode("ascii"), 0o600)
            legacy.remove()
        # 3. The old key, as the previous one; 4. the new one, as current.
        for name in _KEY_FILES:
            write_atomically(
                path.child(key_file_name(name, True)), path.child(name).getContent(), _MODES[name]
            )
        new = {
            PUBLIC_KEY_FILE: public_key,
            SECRET_KEY_FILE: secret_key,
            NONCE_KEY_FILE: nacl.utils.random(KEY_SIZE),
        }
        for name in _KEY_FILES:
            text = new[name].hex().encode("ascii") + b"\n"
            write_atomically(path.child(name), text, _MODES[name])
    except OSError as e:
        raise KeyFileError(f"cannot rotate the key in {path.path}: {e.strerror}") from e
    return public_key


def finish_rotation(keydir: str | FilePath[str]) -> bytes:
    """
    Forget the previous key of C{keydir}: overwrite its secret files
    (C{previous.secret.key}, C{previous.nonce.key}) with random bytes,
    flush them to disk and unlink them, then unlink C{previous.public.key}.
    Its counter file stays: should a backup of the key ever come back, the
    counter keeps it from making a nonce it made before.

    Overwriting in place keeps the old secret from lingering in the file's
    blocks on a simple file system; on a journaling, copy-on-write or
    flash-backed one copies may remain (see the docs).

    @return: the public key forgotten.
    @raise KeyFileError: there is no previous key, or it cannot be removed.
    """
    path = FilePath(keydir) if isinstance(keydir, str) else keydir
    layout.check_directory(path)
    if not has_previous(path):
        raise KeyFileError(f"{path.path} holds no previous key: no rollover to finish")
    try:
        forgotten = layout.read_key(path.child(key_file_name(PUBLIC_KEY_FILE, True)), False)
    except KeyFileError:
        forgotten = b""
    try:
        for name in (SECRET_KEY_FILE, NONCE_KEY_FILE):
            _destroy(path.child(key_file_name(name, True)))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path.child(key_file_name(PUBLIC_KEY_FILE, True)).path)
        _sync_directory(path)
    except OSError as e:
        raise KeyFileError(f"cannot forget the previous key in {path.path}: {e.strerror}") from e
    return forgotten


def _destroy(path: FilePath[str]) -> None:
    # Overwrite the secret where it is stored, durably, before unlinking:
    # an unlinked file's blocks keep their bytes until reused.
    try:
        fd = os.open(path.path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        size = os.fstat(fd).st_size
        os.write(fd, nacl.utils.random(size))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.unlink(path.path)


def _sync_directory(path: FilePath[str]) -> None:
    fd = os.open(path.path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@implementer(IServerKeys)
class ServerKeys(Service):
    """
    The keys of a key directory for a server: the current key's vault and,
    during a rollover, the previous key's, which share one L{KeyState}
    (one lock, one instance ID; a counter file per key). As an L{IVault}
    it is the current key (a client side of the same identity uses that).

    @ivar keydir: the key directory.
    @ivar state: the L{KeyState} of both vaults.
    @ivar current: the current key's vault.
    @ivar previous: the previous key's vault, or L{None}.
    """

    log = Logger()

    def __init__(
        self,
        keydir: str | FilePath[str],
        statedir: str | FilePath[str] | None = None,
        instance: int | None = None,
        change_instance: bool = False,
    ) -> None:
        """
        Load the key directory's current key and, if it has one, its
        previous key (see L{FileVault} for C{statedir} and C{instance}).

        @raise KeyFileError: a key does not load (see L{FileVault}).
        """
        self.keydir = FilePath(keydir) if isinstance(keydir, str) else keydir
        self.state = KeyState(self.keydir, statedir, instance, change_instance)
        try:
            self.current, self.previous = self._load(())
        except KeyFileError:
            self.state.close()
            raise

    @property
    def public_key(self) -> bytes:
        """
        The current public key.
        """
        return self.current.public_key

    def vaults(self) -> tuple[IVault, ...]:
        """
        See L{IServerKeys.vaults}.
        """
        return (self.current,) if self.previous is None else (self.current, self.previous)

    def _load(self, known: tuple[FileVault, ...]) -> tuple[FileVault, FileVault | None]:
        """
        The vaults of the directory's keys as it is now, reusing those of
        C{known} whose key is still there: a key's live vault goes on with
        its counter, and a second vault of the same key would count from
        the stored number, behind the live one.
        """

        def vault(previous: bool) -> FileVault:
            public_key = read_public_key(self.keydir, previous=previous)
            for live in known:
                if keys_equal(live.public_key, public_key):
                    return live
            return FileVault(self.keydir, previous=previous, state=self.state)

        current = vault(False)
        previous = vault(True) if has_previous(self.keydir) else None
        if previous is current:
            raise KeyFileError(
                f"the previous key in {self.keydir.path} is the current key; "
                f"forget it with 'curvetun rotate --finish --keydir {self.keydir.path}'"
            )
        return current, previous

    def reload(self) -> str:
        """
        Bring the keys up to date with the key directory (after C{curvetun
        rotate} or C{rotate --finish}). Hellos already answered keep the
        vault that answered them.

        @return: what changed, as a short phrase for the log: C{"keys
            unchanged"}, C{"new current key 1a2b..., previous 3c4d..."},
            C{"previous key 3c4d... forgotten; current key 1a2b..."}.
        @raise KeyFileError: the directory cannot be used (one line); the
            keys in use stay as they were.
        """
        known = tuple(v for v in (self.current, self.previous) if v is not None)
        current, previous = self._load(known)
        old_current, old_previous = self.current, self.previous
        self.current, self.previous = current, previous
        now = f"{fingerprint(current.public_key)}..."
        was = f"{fingerprint(old_previous.public_key)}..." if old_previous is not None else ""
        if current is old_current and previous is old_previous:
            return "keys unchanged"
        if current is not old_current:
            if previous is None:
                return f"new current key {now}, no previous key"
            return f"new current key {now}, previous {fingerprint(previous.public_key)}..."
        if previous is None:
            return f"previous key {was} forgotten; current key {now}"
        return f"previous key {fingerprint(previous.public_key)}...; current key {now}"

    @property
    def public_keys(self) -> list[bytes]:
        """
        The public keys hellos are answered to, current first (for a
        status page).
        """
        return [vault.public_key for vault in self.vaults()]

    def check_counter(self) -> None:
        """
        Check that every key's counter can still be stored (see
        L{FileVault.check_counter}): a health check.

        @raise KeyFileError: one cannot (the message names its file).
        """
        for vault in (self.current, self.previous):
            if vault is not None:
                vault.check_counter()

    def safe_nonce(self) -> bytes:
        """
        A safe nonce of the current key (L{IVault.safe_nonce}).
        """
        return self.current.safe_nonce()

    def box(
        self, plaintext: bytes, nonce: bytes, peer_public_key: bytes, ephemeral_peer: bool = False
    ) -> bytes:
        """
        L{IVault.box} with the current key.
        """
        return self.current.box(plaintext, nonce, peer_public_key, ephemeral_peer)

    def box_open(
        self, ciphertext: bytes, nonce: bytes, peer_public_key: bytes, ephemeral_peer: bool = False
    ) -> bytes:
        """
        L{IVault.box_open} with the current key.
        """
        return self.current.box_open(ciphertext, nonce, peer_public_key, ephemeral_peer)

    def close(self) -> None:
        """
        Release the key directory. No vault of these keys may be used
        afterwards.
        """
        self.state.close()

    def startService(self) -> None:
        """
        Say which keys this process has.
        """
        super().startService()
        self.log.info(
            "Long-term key {fingerprint} from {keydir}{previous}",
            fingerprint=fingerprint(self.public_key),
            keydir=self.keydir.path,
            previous=""
            if self.previous is None
            else f" (and the previous key {fingerprint(self.previous.public_key)}, until"
            " the rollover is finished)",
        )

    def __repr__(self) -> str:
        return f"<ServerKeys {fingerprint(self.public_key)} in {self.keydir.path}>"
