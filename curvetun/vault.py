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
from collections import OrderedDict
from collections.abc import Callable
from typing import IO

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
from curvetun.interfaces import IVault
from curvetun.keydir import COUNTER_FILE, MAX_COUNTER, NONCE_KEY_FILE, PUBLIC_KEY_FILE
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
        """
        if len(secret_key) != KEY_SIZE or len(nonce_key) != KEY_SIZE:
            raise ValueError("a vault needs a 32-byte secret key and a 32-byte nonce key")
        if not 0 <= counter <= MAX_COUNTER:
            raise ValueError(f"nonce counter out of range: {counter}")
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
        if counter == self._persist_at:
            if self._persist is not None:
                self._persist(counter + COUNTER_RESERVE)
            self._persist_at = (counter // COUNTER_STEP + 1) * COUNTER_STEP
        self._counter = counter + 1
        return scramble16(counter.to_bytes(8, "big") + self._random_bytes(8), self._nonce_key)

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


@implementer(IVault)
class FileVault(Service):
    """
    The vault of a key directory, as a service for the server's or client's
    service tree. The keys are loaded, and checked, when it is made.

    @ivar keydir: the key directory.
    @ivar public_key: the 32-byte long-term public key.
    """

    log = Logger()

    def __init__(self, keydir: str | FilePath[str], _lock: IO[bytes] | None = None) -> None:
        """
        Load the key directory C{keydir}, and hold its lock until L{close}.
        Turns core dumps off for this process first (L{disable_core_dumps}).

        @raise KeyFileError: a file is missing or damaged; a secret file is
            readable by others; the directory, a secret file or the counter
            belongs to another user; the directory or one above it may be
            changed by another user (L{curvetun.keydir.check_directory});
            or another vault (in this or another process) has the
            directory. The message names the file and the fix.
        """
        self.keydir = FilePath(keydir) if isinstance(keydir, str) else keydir
        disable_core_dumps()
        secret_key = layout.read_key(self.keydir.child(SECRET_KEY_FILE), secret=True)
        layout.check_directory(self.keydir)
        nonce_key = layout.read_key(self.keydir.child(NONCE_KEY_FILE), secret=True)
        stored_public_key = layout.read_key(self.keydir.child(PUBLIC_KEY_FILE), secret=False)
        # Lock before reading the counter: the counter we read must be ours.
        self._lock = _lock if _lock is not None else layout.lock(self.keydir)
        try:
            counter = layout.read_counter(self.keydir.child(COUNTER_FILE))
        except KeyFileError:
            self.close()
            raise
        self._vault = MemoryVault(secret_key, nonce_key, counter, persist=self._store_counter)
        self.public_key = self._vault.public_key
        if not keys_equal(stored_public_key, self.public_key):
            self.close()
            raise _mismatch(self.keydir, stored_public_key, self.public_key)

    @classmethod
    def create(cls, keydir: str | FilePath[str], overwrite: bool = False) -> FileVault:
        """
        Make a new key directory with a fresh key pair and nonce key and the
        counter at 0, and load it.

        @param overwrite: replace the keys in C{keydir} if it has any. This
            replaces the identity: peers that trust the old public key will
            refuse the new one.
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
        lock = layout.lock(path)
        try:
            layout.write_key_files(path, public_key, secret_key, nacl.utils.random(KEY_SIZE))
        except OSError as e:
            lock.close()
            raise KeyFileError(f"cannot create key directory {path.path}: {e.strerror}") from e
        return cls(path, _lock=lock)

    def close(self) -> None:
        """
        Release the key directory for another vault. This vault must not be
        used afterwards.
        """
        self._lock.close()

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
        layout.write_counter(self.keydir, value)

    def __repr__(self) -> str:
        return f"<FileVault {fingerprint(self.public_key)} in {self.keydir.path}>"

    def check_counter(self) -> None:
        """
        Check that the safe-nonce counter can still be stored, as the next
        handshakes may need: read it and store the same value again. That
        never moves it back: this vault holds the directory's lock, so it
        is the only writer, and the file holds what it last stored.

        @raise KeyFileError: it cannot be read or stored (the message says
            which file and why).
        """
        layout.write_counter(self.keydir, layout.read_counter(self.keydir.child(COUNTER_FILE)))


def read_public_key(keydir: str | FilePath[str]) -> bytes:
    """
    The public key of the key directory C{keydir}, checked against its
    secret key, without taking the directory's lock or reading its
    counter: this shows the identity of a directory that a running process
    may be using (C{curvetun pubkey}), and hands out no nonce.

    It reads the secret key, and so turns core dumps off as L{FileVault}
    does.

    @raise KeyFileError: a key file is missing, damaged or not safe (as for
        L{FileVault}), or the public key is not the secret key's.
    """
    path = FilePath(keydir) if isinstance(keydir, str) else keydir
    disable_core_dumps()
    secret_key = layout.read_key(path.child(SECRET_KEY_FILE), secret=True)
    layout.check_directory(path)
    stored_public_key = layout.read_key(path.child(PUBLIC_KEY_FILE), secret=False)
    public_key = crypto_scalarmult_base(secret_key)
    if not keys_equal(stored_public_key, public_key):
        raise _mismatch(path, stored_public_key, public_key)
    return public_key


def _mismatch(keydir: FilePath[str], stored_public_key: bytes, public_key: bytes) -> KeyFileError:
    return KeyFileError(
        f"{keydir.child(PUBLIC_KEY_FILE).path} "
        f"({fingerprint(stored_public_key)}...) does not match "
        f"{keydir.child(SECRET_KEY_FILE).path} "
        f"({fingerprint(public_key)}...); "
        "restore both files from the same backup"
    )
