"""
Vaults: the holders of a long-term key pair (spec "Safe nonces (vault)").

L{MemoryVault} keeps the keys in memory; L{FileVault} loads them from a key
directory (its files and checks are L{curvetun.keydir}; see
C{docs/keys-and-registry.md}) and stores the safe-nonce counter there, so
that no nonce is ever made twice with the same key. Loading or creating a
secret key turns core dumps off for the process (L{disable_core_dumps}).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import sys
import tempfile
from collections import OrderedDict
from collections.abc import Callable

import nacl.utils
from nacl.bindings import (
    crypto_box_beforenm,
    crypto_box_easy_afternm,
    crypto_box_keypair,
    crypto_box_open_easy_afternm,
    crypto_scalarmult_base,
)
from nacl.exceptions import CryptoError
from twisted.application.service import Service
from twisted.logger import Logger
from twisted.python.filepath import FilePath
from zope.interface import implementer

from curvetun import keydir as layout
from curvetun.errors import BadPacket, KeyFileError
from curvetun.files import write_atomically
from curvetun.interfaces import IVault
from curvetun.keydir import (
    COUNTER_FILE,
    INSTANCE_SPACE,
    MAX_COUNTER,
    MAX_INSTANCE,
    NONCE_KEY_FILE,
    PUBLIC_KEY_FILE,
    counter_file_name,
    key_file_name,
)
from curvetun.keys import KEY_SIZE, fingerprint, keys_equal
from curvetun.nonces import scramble16

# Re-exported: service.py and tap.py import it from here.
from .keydir import SECRET_KEY_FILE

# Spec "Safe nonces (vault)": whenever the counter is a multiple of
# COUNTER_STEP, store counter + COUNTER_RESERVE before handing out that nonce.
COUNTER_STEP = 2**20
COUNTER_RESERVE = 2**21
# Peers whose precomputed X25519 shared keys a vault remembers.
SHARED_KEY_CACHE_SIZE = 1024


@implementer(IVault)
class MemoryVault:
    """
    A long-term key pair held in memory, with the safe-nonce counter.

    @ivar public_key: the 32-byte long-term public key.
    """

    def __init__(
        self,
        secret_key: bytes,
        nonce_key: bytes,
        counter: int = 0,
        random_bytes: Callable[[int], bytes] = nacl.utils.random,
        persist: Callable[[int], None] | None = None,
        instance: int | None = None,
    ) -> None:
        """
        @param secret_key: the 32-byte Curve25519 secret key.
        @param nonce_key: the 32-byte key that scrambles safe nonces.
        @param counter: the first counter value to use.
        @param random_bytes: the source of the 8 random bytes in each safe
            nonce (tests inject a deterministic one).
        @param persist: called with C{counter + 2**21} before a nonce is
            handed out whenever that must be stored durably; if it raises,
            no nonce is handed out.
        @param instance: the instance ID (0 to 65535) of a key used on
            several hosts, or L{None}. With one, C{counter} counts within
            the instance's own part of the counter space: the nonce holds
            C{instance * 2**48 + counter}, and C{counter} stays below
            2**48, so that two instances never make the same nonce.
        """
        if len(secret_key) != KEY_SIZE or len(nonce_key) != KEY_SIZE:
            raise ValueError("a vault needs a 32-byte secret key and a 32-byte nonce key")
        if not 0 <= counter <= MAX_COUNTER:
            raise ValueError(f"nonce counter out of range: {counter}")
        if instance is not None and not 0 <= instance <= MAX_INSTANCE:
            raise ValueError(f"instance ID out of range: {instance}")
        self.instance = instance
        self._base = 0 if instance is None else instance * INSTANCE_SPACE
        # Without an instance the whole 64-bit space is the key's (a
        # counter file holds at most 2**63, so it never wraps).
        self._limit = 2**64 if instance is None else INSTANCE_SPACE
        self.public_key: bytes = crypto_scalarmult_base(secret_key)
        self._secret_key = secret_key
        self._nonce_key = nonce_key
        self._counter = counter
        # The spec persists at multiples of COUNTER_STEP. The first nonce
        # after a start persists too: a counter that starts between two
        # multiples (written by hand, or by an older version) would
        # otherwise run unprotected until the next one.
        self._persist_at = counter
        self._random_bytes = random_bytes
        self._persist = persist
        self._shared_keys: OrderedDict[bytes, bytes] = OrderedDict()
        self._last_ephemeral: tuple[bytes, bytes] | None = None

    @classmethod
    def generate(cls, random_bytes: Callable[[int], bytes] = nacl.utils.random) -> MemoryVault:
        """
        Make a vault with a fresh random key pair and nonce key, whose
        counter starts at 0 and is not stored anywhere.
        """
        _, secret_key = crypto_box_keypair()
        return cls(secret_key, random_bytes(KEY_SIZE), random_bytes=random_bytes)

    def safe_nonce(self) -> bytes:
        """
        Return C{scramble16(u64be(counter) || random(8), nonce_key)} and
        count one up, storing the counter first when the spec says so.
        """
        counter = self._counter
        if counter >= self._limit:
            # 2**48 nonces: 8,900 years at a thousand handshakes a second.
            raise KeyFileError(
                f"the nonce counter of instance {self.instance} is used up: "
                "give this host an unused --instance ID"
            )
        if counter == self._persist_at:
            if self._persist is not None:
                self._persist(counter + COUNTER_RESERVE)
            self._persist_at = (counter // COUNTER_STEP + 1) * COUNTER_STEP
        self._counter = counter + 1
        value = self._base + counter
        return scramble16(value.to_bytes(8, "big") + self._random_bytes(8), self._nonce_key)

    def box(
        self,
        plaintext: bytes,
        nonce: bytes,
        peer_public_key: bytes,
        ephemeral_peer: bool = False,
    ) -> bytes:
        """
        NaCl C{crypto_box} from this vault's key to C{peer_public_key}.

        @raise BadPacket: C{peer_public_key} is unusable (wrong size or a
            low-order point); it usually comes from the network.
        """
        return crypto_box_easy_afternm(
            plaintext, nonce, self._shared_key(peer_public_key, ephemeral_peer)
        )

    def box_open(
        self,
        ciphertext: bytes,
        nonce: bytes,
        peer_public_key: bytes,
        ephemeral_peer: bool = False,
    ) -> bytes:
        """
        Open a box made by C{peer_public_key} for this vault's key.

        @raise BadPacket: the box does not verify, or the peer key is
            unusable.
        """
        shared_key = self._shared_key(peer_public_key, ephemeral_peer)
        try:
            return crypto_box_open_easy_afternm(ciphertext, nonce, shared_key)
        except CryptoError as e:  # nacl's ValueError and RuntimeError are CryptoErrors
            raise BadPacket("box does not open") from e

    def _shared_key(self, peer_public_key: bytes, ephemeral_peer: bool) -> bytes:
        # The server boxes to the same ephemeral key twice in a row (it
        # opens the hello and seals the cookie with EC): one slot keeps the
        # last one. Long-term peers come back on every connection (the
        # vouch): an LRU keeps those, which ephemeral keys never enter, so
        # a burst of handshakes cannot evict them.
        if ephemeral_peer:
            last = self._last_ephemeral
            if last is not None and last[0] == peer_public_key:
                return last[1]
        else:
            cached = self._shared_keys.get(peer_public_key)
            if cached is not None:
                self._shared_keys.move_to_end(peer_public_key)
                return cached
        try:
            shared_key: bytes = crypto_box_beforenm(peer_public_key, self._secret_key)
        except CryptoError as e:
            raise BadPacket("peer public key is unusable (wrong size or low order)") from e
        if ephemeral_peer:
            self._last_ephemeral = (peer_public_key, shared_key)
            return shared_key
        self._shared_keys[peer_public_key] = shared_key
        if len(self._shared_keys) > SHARED_KEY_CACHE_SIZE:
            self._shared_keys.popitem(last=False)
        return shared_key

    def __repr__(self) -> str:
        return f"<MemoryVault {fingerprint(self.public_key)}>"


# A core dump of a process that holds a secret key holds the key: every
# FileVault turns core dumps off for its whole process when it loads one.

ALLOW_CORE_DUMPS_VARIABLE = "CURVETUN_ALLOW_CORE_DUMPS"
"""
The environment variable that, set to 1 (any value but empty or 0), keeps
core dumps on in a process that loads a secret key, for debugging.
"""

_PR_SET_DUMPABLE = 4  # <linux/prctl.h>


def disable_core_dumps() -> None:
    """
    Make sure that this process leaves no core dump, and (on Linux) that
    other processes of the same user cannot read its memory: a core file,
    C{/proc/PID/mem} or a debugger attached with ptrace would show the
    secret key. Sets the core-file size limit to 0 (soft and hard, so that
    the process cannot raise it again) and clears the "dumpable" flag
    (C{prctl(PR_SET_DUMPABLE, 0)}), which also makes C{/proc/PID} belong
    to root. Child processes that C{exec} another program are dumpable
    again; the limit is inherited.

    Does nothing if the environment variable L{ALLOW_CORE_DUMPS_VARIABLE}
    is set to a value other than empty or C{0}.
    """
    if os.environ.get(ALLOW_CORE_DUMPS_VARIABLE, "") not in ("", "0"):
        return
    # Lowering a limit is always allowed; a platform without this limit has
    # nothing to lower.
    with contextlib.suppress(OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
        except (OSError, AttributeError):
            # No C library to call (a static interpreter): the limit above
            # still keeps core files from being written.
            pass


class KeyState:
    """
    Where the mutable files of a key directory live: each key's nonce
    counter, the lock and the instance ID. That is the key directory
    itself, or a state directory of its own (C{--statedir}), so that the
    key directory may be read-only. One L{KeyState} serves every vault of
    one key directory in a process (the current and the previous key of a
    rollover): it holds the locks.

    @ivar keydir: the key directory.
    @ivar path: the directory the mutable files are in.
    @ivar instance: the instance ID, or L{None} (see L{MemoryVault}).
    """

    def __init__(
        self,
        keydir: str | FilePath[str],
        statedir: str | FilePath[str] | None = None,
        instance: int | None = None,
        change_instance: bool = False,
    ) -> None:
        """
        Check the state directory (creating a missing C{statedir}, mode
        0700), settle the instance ID and take the locks: the state's
        C{lock} file, and the key directory itself (exclusively without an
        instance ID, shared with one).

        @param instance: the instance ID to use; L{None} uses the one
            stored in the state, if any.
        @param change_instance: let C{instance} replace another stored
            one (the operator says that the old one is no longer in use
            anywhere with this key).
        @raise KeyFileError: the counter cannot be stored there (a
            read-only key directory without C{statedir}); the key
            directory is shared (L{curvetun.keydir.SHARED_FILE}) and no
            instance ID is given or stored; another ID is stored; another
            process holds a lock; a directory is not safe.
        """
        self.keydir = FilePath(keydir) if isinstance(keydir, str) else keydir
        if statedir is None:
            self.path = self.keydir
        else:
            self.path = FilePath(statedir) if isinstance(statedir, str) else statedir
            layout.make_directory(self.path)
        if instance is not None and not 0 <= instance <= MAX_INSTANCE:
            raise KeyFileError(f"instance ID {instance} is out of range: 0 to {MAX_INSTANCE}")
        self._check_can_store(statedir is None)
        stored = layout.read_instance(self.path)
        if instance is None:
            instance = stored
        elif stored is not None and stored != instance and not change_instance:
            raise KeyFileError(
                f"{self.path.child(layout.INSTANCE_FILE).path} says this is instance {stored}, "
                f"not {instance}; if instance {stored} is no longer used anywhere with this "
                "key, add --change-instance"
            )
        if instance is None and layout.is_shared(self.keydir):
            raise KeyFileError(
                f"key directory {self.keydir.path} is shared by several hosts "
                f"({layout.SHARED_FILE} is there): give each server an --instance ID "
                f"of its own (0 to {MAX_INSTANCE})"
            )
        self.instance = instance
        self._lock = layout.lock(self.path)
        try:
            self._directory_lock = layout.lock_key_directory(self.keydir, instance is not None)
        except KeyFileError:
            self._lock.close()
            raise
        if instance is not None and stored != instance:
            try:
                layout.write_instance(self.path, instance)
            except KeyFileError:
                self.close()
                raise

    def _check_can_store(self, in_keydir: bool) -> None:
        problem = self._store_problem()
        if problem is None:
            return
        hint = (
            "; keep the mutable files elsewhere with --statedir DIR (statedir= in an "
            "endpoint string)"
            if in_keydir
            else ""
        )
        raise KeyFileError(f"cannot store the nonce counter in {self.path.path}: {problem}{hint}")

    def _store_problem(self) -> str | None:
        # What storing a counter does first: make a file in the directory.
        try:
            fd, name = tempfile.mkstemp(dir=self.path.path, prefix=".probe.")
        except OSError as e:
            return e.strerror or str(e)
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(name)
        return None

    def counter_path(self, public_key: bytes) -> FilePath[str]:
        """
        The counter file of the key C{public_key}.
        """
        return self.path.child(counter_file_name(public_key))

    def read_counter(self, public_key: bytes, current: bool) -> int:
        """
        The counter to continue from for the key C{public_key}: the largest
        of its counter file in the state, its counter file in the key
        directory (where a key starts, made by C{keygen} or C{rotate}) and,
        for the C{current} key, the key directory's L{COUNTER_FILE} of
        older versions. A larger number only skips nonces; so reading more
        than one can never make a nonce twice. The result is stored in the
        state's counter file at once (which migrates an old counter file
        and proves that the state can be written).

        @raise KeyFileError: none of them exists, or one is damaged or
            unsafe.
        """
        own = self.counter_path(public_key)
        candidates = [own]
        if self.path != self.keydir:
            candidates.append(self.keydir.child(own.basename()))
        legacy = self.keydir.child(COUNTER_FILE)
        if current:
            candidates.append(legacy)
        values = [layout.read_counter(path) for path in candidates if path.exists()]
        if not values:
            layout.read_counter(own)  # raises: missing, with how to restore it
        value = max(values)
        if value > MAX_COUNTER:
            raise KeyFileError(f"the nonce counter in {own.path} is out of range")
        layout.write_counter(own, value)
        if current and self.path == self.keydir and legacy.exists():
            # Its number is in the key's own file now, durably.
            with contextlib.suppress(OSError):
                legacy.remove()
        return value

    def close(self) -> None:
        """
        Release the locks. No vault of this state may be used afterwards.
        """
        self._lock.close()
        if self._directory_lock >= 0:
            os.close(self._directory_lock)
            self._directory_lock = -1

    def __repr__(self) -> str:
        return f"<KeyState {self.path.path} instance {self.instance}>"


@implementer(IVault)
class FileVault(Service):
    """
    The vault of a key directory, as a service for the server's or client's
    service tree. The keys are loaded, and checked, when it is made.

    @ivar keydir: the key directory.
    @ivar state: where its counter is (L{KeyState}).
    @ivar previous: whether this is the previous key of a rollover.
    @ivar public_key: the 32-byte long-term public key.
    """

    log = Logger()

    def __init__(
        self,
        keydir: str | FilePath[str],
        *,
        statedir: str | FilePath[str] | None = None,
        instance: int | None = None,
        change_instance: bool = False,
        previous: bool = False,
        state: KeyState | None = None,
    ) -> None:
        """
        Load the key directory C{keydir}, and hold its locks until L{close}.
        Turns core dumps off for this process first (L{disable_core_dumps}).

        @param statedir: where the counters, the lock and the instance ID
            are (see L{KeyState}); by default the key directory.
        @param instance: the instance ID (see L{KeyState}).
        @param previous: load the previous key of a rollover
            (C{previous.secret.key} and so on) instead of the current one.
        @param state: a L{KeyState} of C{keydir} to share (with the vault
            of the other key); it stays the caller's to close. Without it
            the vault opens one with C{statedir}, C{instance} and
            C{change_instance}, and closes it in L{close}.
        @raise KeyFileError: a file is missing or damaged; a secret file is
            readable by others; the directory, a secret file or the counter
            belongs to another user; the directory or one above it may be
            changed by another user (L{curvetun.keydir.check_directory});
            the counter cannot be stored; or another vault (in this or
            another process) has the directory. The message names the file
            and the fix.
        """
        self.keydir = FilePath(keydir) if isinstance(keydir, str) else keydir
        self.previous = previous
        disable_core_dumps()

        def path(name: str) -> FilePath[str]:
            return self.keydir.child(key_file_name(name, previous))

        secret_key = layout.read_key(path(SECRET_KEY_FILE), secret=True)
        layout.check_directory(self.keydir)
        nonce_key = layout.read_key(path(NONCE_KEY_FILE), secret=True)
        stored_public_key = layout.read_key(path(PUBLIC_KEY_FILE), secret=False)
        public_key = crypto_scalarmult_base(secret_key)
        if not keys_equal(stored_public_key, public_key):
            raise _mismatch(self.keydir, stored_public_key, public_key, previous)
        # Lock before reading the counter: the counter we read must be ours.
        self._owns_state = state is None
        self.state = (
            KeyState(self.keydir, statedir, instance, change_instance) if state is None else state
        )
        try:
            counter = self.state.read_counter(public_key, current=not previous)
            self._counter_path = self.state.counter_path(public_key)
            self._vault = MemoryVault(
                secret_key,
                nonce_key,
                counter,
                persist=self._store_counter,
                instance=self.state.instance,
            )
        except (KeyFileError, ValueError) as e:
            self.close()
            if isinstance(e, ValueError):
                raise KeyFileError(str(e)) from e
            raise
        self.public_key = self._vault.public_key

    @classmethod
    def create(
        cls, keydir: str | FilePath[str], overwrite: bool = False, shared: bool = False
    ) -> FileVault:
        """
        Make a new key directory with a fresh key pair and nonce key and the
        counter at 0, and load it.

        @param overwrite: replace the keys in C{keydir} if it has any. This
            replaces the identity: peers that trust the old public key will
            refuse the new one.
        @param shared: mark the directory as one to copy to several hosts
            (L{curvetun.keydir.SHARED_FILE}): servers then need an instance
            ID. The returned vault is loaded before the mark is made.
        @raise KeyFileError: C{keydir} already holds key files and
            C{overwrite} is false, it cannot be written, or another user
            could change it (as when loading).
        """
        path = FilePath(keydir) if isinstance(keydir, str) else keydir
        existing = layout.existing_key_files(path)
        if existing and not overwrite:
            raise KeyFileError(
                f"{path.path} already holds keys ({', '.join(existing)}); refusing to replace them"
            )
        disable_core_dumps()
        public_key, secret_key = crypto_box_keypair()
        # Checked before a secret is written into it.
        layout.make_directory(path)
        # Never replace the keys of a vault that is in use.
        state = KeyState(path)
        try:
            layout.write_key_files(path, public_key, secret_key, nacl.utils.random(KEY_SIZE))
            if shared:
                # Marked last: the state above was settled without an
                # instance, and the vault returned is for showing the key.
                write_atomically(path.child(layout.SHARED_FILE), b"shared\n", 0o644)
        except OSError as e:
            state.close()
            raise KeyFileError(f"cannot create key directory {path.path}: {e.strerror}") from e
        vault = cls(path, state=state)
        vault._owns_state = True
        return vault

    def close(self) -> None:
        """
        Release the key directory for another vault (if this vault opened
        its own L{KeyState}). This vault must not be used afterwards.
        """
        if self._owns_state:
            self.state.close()

    def check_counter(self) -> None:
        """
        Check that the safe-nonce counter can still be stored, as the next
        handshakes may need (a vault that cannot store it hands out no
        nonce at the next step of 2**20): read it and store the same value
        again. That never moves it back: the file is this key's alone, and
        this vault holds the state's lock, so it is the only writer, and
        the file holds what it last stored. A health check (C{/healthz}).

        @raise KeyFileError: it cannot be read or stored (the message says
            which file and why).
        """
        layout.write_counter(self._counter_path, layout.read_counter(self._counter_path))

    def startService(self) -> None:
        """
        Say which identity this process has.
        """
        super().startService()
        self.log.info(
            "Long-term key {fingerprint} from {keydir}",
            fingerprint=fingerprint(self.public_key),
            keydir=self.keydir.path,
        )

    def safe_nonce(self) -> bytes:
        """
        See L{IVault.safe_nonce}.

        @raise KeyFileError: the counter had to be stored and could not be.
        """
        return self._vault.safe_nonce()

    def box(
        self,
        plaintext: bytes,
        nonce: bytes,
        peer_public_key: bytes,
        ephemeral_peer: bool = False,
    ) -> bytes:
        """
        See L{MemoryVault.box}.
        """
        return self._vault.box(plaintext, nonce, peer_public_key, ephemeral_peer)

    def box_open(
        self,
        ciphertext: bytes,
        nonce: bytes,
        peer_public_key: bytes,
        ephemeral_peer: bool = False,
    ) -> bytes:
        """
        See L{MemoryVault.box_open}.
        """
        return self._vault.box_open(ciphertext, nonce, peer_public_key, ephemeral_peer)

    def _store_counter(self, value: int) -> None:
        # Synchronous, and so blocking the reactor for one fsync: this
        # happens once per 2**20 nonces (about a million handshakes), and
        # the nonce must not be used before the write is durable anyway.
        # The file is named by the key, so a rotation that moves the key
        # files does not move it.
        layout.write_counter(self._counter_path, value)

    def __repr__(self) -> str:
        return f"<FileVault {fingerprint(self.public_key)} in {self.keydir.path}>"


def read_public_key(keydir: str | FilePath[str], previous: bool = False) -> bytes:
    """
    The public key of the key directory C{keydir} (with C{previous}, of
    its previous key during a rollover), checked against its secret key,
    without taking the directory's lock or reading its counter: this shows
    the identity of a directory that a running process may be using
    (C{curvetun pubkey}), and hands out no nonce.

    It reads the secret key, and so turns core dumps off as L{FileVault}
    does.

    @raise KeyFileError: a key file is missing, damaged or not safe (as for
        L{FileVault}), or the public key is not the secret key's.
    """
    path = FilePath(keydir) if isinstance(keydir, str) else keydir
    disable_core_dumps()
    secret_key = layout.read_key(path.child(key_file_name(SECRET_KEY_FILE, previous)), secret=True)
    layout.check_directory(path)
    stored_public_key = layout.read_key(
        path.child(key_file_name(PUBLIC_KEY_FILE, previous)), secret=False
    )
    public_key = crypto_scalarmult_base(secret_key)
    if not keys_equal(stored_public_key, public_key):
        raise _mismatch(path, stored_public_key, public_key, previous)
    return public_key


def _mismatch(
    keydir: FilePath[str], stored_public_key: bytes, public_key: bytes, previous: bool = False
) -> KeyFileError:
    return KeyFileError(
        f"{keydir.child(key_file_name(PUBLIC_KEY_FILE, previous)).path} "
        f"({fingerprint(stored_public_key)}...) does not match "
        f"{keydir.child(key_file_name(SECRET_KEY_FILE, previous)).path} "
        f"({fingerprint(public_key)}...); "
        "restore both files from the same backup"
    )
