"""
Vaults: the holders of a long-term key pair (spec "Safe nonces (vault)").

L{MemoryVault} keeps the keys in memory; L{FileVault} loads them from a key
directory (see C{docs/keys-and-registry.md}) and stores the safe-nonce
counter there, so that no nonce is ever made twice with the same key.
"""

from __future__ import annotations

import fcntl
import os
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

from curvetun.errors import BadPacket, KeyFileError
from curvetun.files import open_regular_file, write_atomically
from curvetun.interfaces import IVault
from curvetun.keys import KEY_SIZE, fingerprint, format_public_key, keys_equal, quoted
from curvetun.nonces import scramble16

# Spec "Safe nonces (vault)": whenever the counter is a multiple of
# COUNTER_STEP, store counter + COUNTER_RESERVE before handing out that nonce.
COUNTER_STEP = 2**20
COUNTER_RESERVE = 2**21
# Far below 2**64, so that a stored counter can never run out of room.
MAX_COUNTER = 2**63

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


SECRET_KEY_FILE = "secret.key"
PUBLIC_KEY_FILE = "public.key"
NONCE_KEY_FILE = "nonce.key"
COUNTER_FILE = "nonce.counter"
LOCK_FILE = "lock"
_KEY_FILES = (SECRET_KEY_FILE, PUBLIC_KEY_FILE, NONCE_KEY_FILE, COUNTER_FILE)


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

        @raise KeyFileError: a file is missing, damaged, or readable by
            others, or another vault (in this or another process) has the
            directory; the message names the file and the fix.
        """
        self.keydir = FilePath(keydir) if isinstance(keydir, str) else keydir
        secret_key = _read_key(self.keydir.child(SECRET_KEY_FILE), secret=True)
        _check_directory(self.keydir)
        nonce_key = _read_key(self.keydir.child(NONCE_KEY_FILE), secret=True)
        stored_public_key = _read_key(self.keydir.child(PUBLIC_KEY_FILE), secret=False)
        # Lock before reading the counter: the counter we read must be ours.
        self._lock = _lock if _lock is not None else _lock_keydir(self.keydir)
        try:
            counter = _read_counter(self.keydir.child(COUNTER_FILE))
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
            C{overwrite} is false, or it cannot be written.
        """
        path = FilePath(keydir) if isinstance(keydir, str) else keydir
        existing = [name for name in _KEY_FILES if path.child(name).exists()]
        if existing and not overwrite:
            raise KeyFileError(
                f"{path.path} already holds keys ({', '.join(existing)}); refusing to replace them"
            )
        public_key, secret_key = crypto_box_keypair()
        try:
            os.makedirs(path.path, exist_ok=True)
            os.chmod(path.path, 0o700)
        except OSError as e:
            raise KeyFileError(f"cannot create key directory {path.path}: {e.strerror}") from e
        # Never replace the keys of a vault that is in use.
        lock = _lock_keydir(path)
        try:
            # In this order, a crash part way (even when overwriting) leaves
            # a directory that does not load (a public key that does not
            # match, a missing file) or one with a new key pair and the old,
            # higher counter: never an old key with its counter back at 0.
            for name, text, mode in [
                (PUBLIC_KEY_FILE, format_public_key(public_key), 0o644),
                (SECRET_KEY_FILE, secret_key.hex(), 0o600),
                (NONCE_KEY_FILE, nacl.utils.random(KEY_SIZE).hex(), 0o600),
                (COUNTER_FILE, "0", 0o600),
            ]:
                write_atomically(path.child(name), f"{text}\n".encode("ascii"), mode)
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
        path = self.keydir.child(COUNTER_FILE)
        try:
            write_atomically(path, f"{value}\n".encode("ascii"), 0o600)
        except OSError as e:
            raise KeyFileError(
                f"cannot store the nonce counter in {path.path}: {e.strerror}"
            ) from e

    def __repr__(self) -> str:
        return f"<FileVault {fingerprint(self.public_key)} in {self.keydir.path}>"


def read_public_key(keydir: str | FilePath[str]) -> bytes:
    """
    The public key of the key directory C{keydir}, checked against its
    secret key, without taking the directory's lock or reading its
    counter: this shows the identity of a directory that a running process
    may be using (C{curvetun pubkey}), and hands out no nonce.

    @raise KeyFileError: a key file is missing, damaged or readable by
        others, or the public key is not the secret key's.
    """
    path = FilePath(keydir) if isinstance(keydir, str) else keydir
    secret_key = _read_key(path.child(SECRET_KEY_FILE), secret=True)
    stored_public_key = _read_key(path.child(PUBLIC_KEY_FILE), secret=False)
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


def _check_directory(keydir: FilePath[str]) -> None:
    """
    Refuse a key directory that others may write to: they could put back
    an old nonce counter (and so make nonces repeat) or swap the keys.
    """
    try:
        mode = os.stat(keydir.path).st_mode & 0o777
    except OSError as e:
        raise KeyFileError(f"cannot read {keydir.path}: {e.strerror}") from e
    if mode & 0o022:
        raise KeyFileError(
            f"{keydir.path} is writable by group or others (mode {mode:04o}); "
            f"run: chmod 700 {keydir.path}"
        )


def _lock_keydir(keydir: FilePath[str]) -> IO[bytes]:
    """
    Take the key directory's exclusive lock, so that only one vault at a
    time hands out nonces from its counter: two would hand out the same
    counter values. The lock goes with the returned file (and with the
    process, however it ends).

    @raise KeyFileError: another vault holds it, or it cannot be opened.
    """
    path = keydir.child(LOCK_FILE).path
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise KeyFileError(f"cannot open the lock file {path}: {e.strerror}") from e
    lock = os.fdopen(fd, "r+b")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise KeyFileError(
            f"{keydir.path} is in use by another curvetun process; "
            "give each process a key directory of its own"
        ) from None
    return lock


# Key-directory files are a line of at most 64 characters; reading a little
# more than that is enough to tell that a file is too long.
_READ_LIMIT = 256


def _read_text(path: FilePath[str], secret: bool, fix: str) -> str:
    """
    Read a key-directory file as ASCII text without surrounding whitespace.
    The permissions of a secret file are checked on the open file itself.

    @param fix: what to do if the file is missing or damaged.
    """
    try:
        with open_regular_file(path.path) as f:
            mode = os.fstat(f.fileno()).st_mode & 0o777
            if secret and mode & 0o077:
                raise KeyFileError(
                    f"{path.path} is accessible to group or others (mode {mode:04o}); "
                    f"run: chmod 600 {path.path}"
                )
            data = f.read(_READ_LIMIT)
    except FileNotFoundError as e:
        raise KeyFileError(f"{path.path} is missing; {fix}") from e
    except OSError as e:
        raise KeyFileError(f"cannot read {path.path}: {e.strerror}") from e
    except ValueError as e:  # a NUL byte in the path
        raise KeyFileError(f"cannot read {quoted(path.path)}: {e}") from e
    text = data.strip()
    if not text:
        raise KeyFileError(f"{path.path} is empty; {fix}")
    try:
        return text.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError(f"{path.path} is damaged: it is not text; {fix}") from None


def _read_key(path: FilePath[str], secret: bool) -> bytes:
    # Never quote a secret file's contents in an error message.
    fix = "restore it from a backup"
    text = _read_text(path, secret, fix)
    if len(text) != 2 * KEY_SIZE:
        raise KeyFileError(
            f"{path.path} is damaged: expected {2 * KEY_SIZE} hex digits, found "
            f"{len(text)} characters; {fix}"
        )
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_SIZE:  # fromhex skips spaces, so check the length again
        raise KeyFileError(f"{path.path} is damaged: not hexadecimal; {fix}")
    return key


def _read_counter(path: FilePath[str]) -> int:
    # A backup's counter is behind the lost one; 2**40 more nonces than
    # that would take 35 years at a thousand handshakes a second.
    fix = (
        "restore it from a backup and add 2**40 (1099511627776) to the number in it; "
        "starting again at 0 could reuse nonces with this key"
    )
    text = _read_text(path, secret=False, fix=fix)
    if not (text.isascii() and text.isdigit() and int(text) <= MAX_COUNTER):
        raise KeyFileError(
            f"{path.path} is damaged: expected a decimal number from 0 to {MAX_COUNTER}; {fix}"
        )
    return int(text)
