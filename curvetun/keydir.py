"""
The key directory: where an identity lives on disk, and the checks that
make it safe to use (see C{docs/keys-and-registry.md}).

This module knows the layout (the default location and every file name),
reads and writes the files, takes the directory's lock, and refuses a
directory that someone other than this process's user could change. It
does no cryptography: L{curvetun.vault.FileVault} turns what it reads into
a vault. Code that only needs a file name (the CLI, C{twist curvetun})
imports it from here, not from the protocol stack.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import stat
from typing import IO

from twisted.python.filepath import FilePath

from curvetun.errors import KeyFileError
from curvetun.files import open_regular_file, write_atomically
from curvetun.keys import KEY_SIZE, fingerprint, quoted

SECRET_KEY_FILE = "secret.key"
"""The Curve25519 secret key: 64 hex digits and a newline (mode 0600)."""

PUBLIC_KEY_FILE = "public.key"
"""Its public key: 64 hex digits and a newline (mode 0644)."""

NONCE_KEY_FILE = "nonce.key"
"""The key that scrambles safe nonces: 64 hex digits and a newline (mode 0600)."""

COUNTER_FILE = "nonce.counter"
"""
The counter file of older versions, which named no key: read (and migrated)
as the current key's. New counters are L{counter_file_name}.
"""

COUNTER_PREFIX = "nonce.counter."
"""
Each key's safe-nonce counter is C{COUNTER_PREFIX + fingerprint}: a decimal
number and a newline (mode 0600), named by the key it counts for, so that
a rotation (which moves the key files) never gives one key's counter to
another.
"""

PREVIOUS_PREFIX = "previous."
"""
During a rollover, the previous key's files are the current key's names
with this prefix: C{previous.secret.key}, C{previous.public.key},
C{previous.nonce.key}.
"""

INSTANCE_FILE = "instance"
"""The instance ID of this state (C{--instance}): a decimal number and a newline."""

SHARED_FILE = "shared"
"""
Present (its contents do not matter) when the key directory is meant to be
copied to several hosts: a server then needs an instance ID.
"""

LOCK_FILE = "lock"
"""Empty; locked (C{flock}) by the one process that uses the directory."""

REGISTRY_FILE = "registry"
"""The registry's file name inside a key directory (its default place)."""

KEY_FILES = (SECRET_KEY_FILE, PUBLIC_KEY_FILE, NONCE_KEY_FILE, COUNTER_FILE)
"""The files that make an identity (the legacy counter among them)."""

INSTANCE_BITS = 16
"""The top bits of a safe nonce's 64-bit counter that hold the instance ID."""

MAX_INSTANCE = 2**INSTANCE_BITS - 1
"""The largest instance ID."""

INSTANCE_SPACE = 2 ** (64 - INSTANCE_BITS)
"""How many counter values each instance has: 2**48."""

MAX_COUNTER = 2**63
"""The largest counter a counter file may hold: far below 2**64, so it never runs out."""


def default_keydir() -> str:
    """
    The key directory used when none is named: C{$CURVETUN_HOME}, else
    C{~/.curvetun}.
    """
    return os.environ.get("CURVETUN_HOME") or os.path.expanduser("~/.curvetun")


def registry_path(keydir: str) -> str:
    """
    The default registry file of the key directory C{keydir}.
    """
    return os.path.join(keydir, REGISTRY_FILE)


def existing_key_files(keydir: str | FilePath[str]) -> list[str]:
    """
    The names of the identity files (L{KEY_FILES} and the counter files of
    keys) that C{keydir} holds.
    """
    path = FilePath(keydir) if isinstance(keydir, str) else keydir
    found = [name for name in KEY_FILES if path.child(name).exists()]
    if path.isdir():
        found += sorted(name for name in path.listdir() if name.startswith(COUNTER_PREFIX))
    return found


def counter_file_name(public_key: bytes) -> str:
    """
    The name of the counter file of the key whose public key is C{public_key}.
    """
    return COUNTER_PREFIX + fingerprint(public_key)


def key_file_name(name: str, previous: bool) -> str:
    """
    The name of key file C{name} (L{SECRET_KEY_FILE}, L{PUBLIC_KEY_FILE},
    L{NONCE_KEY_FILE}) for the current key, or with C{previous} for the
    previous key of a rollover.
    """
    return PREVIOUS_PREFIX + name if previous else name


def is_shared(keydir: FilePath[str]) -> bool:
    """
    Whether C{keydir} says it is shared by several hosts (L{SHARED_FILE}).
    """
    return keydir.child(SHARED_FILE).exists()


# -- who may change a key directory ------------------------------------------------
#
# Whoever can write a key file, or the directory, or any directory above
# it (which lets them rename the key directory away and put another in
# its place), can put back an old nonce counter and make this key repeat
# nonces. So, as OpenSSH's StrictModes does: the key directory and its
# secret files must belong to the user curvetun runs as (or root), and no
# directory from the key directory up to / may be writable by anyone else,
# except a root-owned sticky directory such as /tmp, where others cannot
# rename what is not theirs.


def _user(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _chown_to() -> str:
    # What to give chown: the user's name, which reads better than a number.
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _trusted_owner(uid: int) -> bool:
    return uid in (0, os.geteuid())


def _owner_problem(uid: int) -> str:
    me = os.geteuid()
    trusted = "root" if me == 0 else f"{_user(me)} (the user curvetun runs as) or root"
    return f"owned by {_user(uid)}, not by {trusted}"


def _writers(mode: int) -> str:
    return {0o020: "group", 0o002: "others"}.get(mode & 0o022, "group and others")


def check_owner(path: str, st: os.stat_result) -> None:
    """
    Refuse a key file (C{st} is its status) that belongs to someone other
    than the effective user or root.

    @raise KeyFileError: it does; the message names the file and the fix.
    """
    if not _trusted_owner(st.st_uid):
        raise KeyFileError(
            f"refusing {path}: it is {_owner_problem(st.st_uid)}; chown {_chown_to()} {path}"
        )


def check_directory(keydir: FilePath[str]) -> None:
    """
    Refuse a key directory that anyone but the effective user or root
    could change: one owned by another user, writable by group or others,
    or inside a directory (at any level up to /) that another user owns or
    that group or others may write to, unless that one is root's and has
    the sticky bit (like /tmp).

    @raise KeyFileError: it is not safe; one line that names the path and
        the fix.
    """
    shown = keydir.path
    try:
        st = os.stat(shown)
    except OSError as e:
        raise KeyFileError(f"cannot read {shown}: {e.strerror}") from e
    if not _trusted_owner(st.st_uid):
        raise KeyFileError(
            f"refusing key directory {shown}: it is {_owner_problem(st.st_uid)}; "
            f"chown {_chown_to()} {shown}"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        raise KeyFileError(
            f"{shown} is writable by group or others (mode {mode & 0o777:04o}); "
            f"run: chmod 700 {shown}"
        )
    # The real path: a symbolic link on the way is followed, and the
    # directories that hold its target are the ones that matter.
    path = os.path.realpath(shown)
    while True:
        parent = os.path.dirname(path)
        if parent == path:  # "/" is its own parent, and was checked last time round
            return
        try:
            st = os.stat(parent)
        except OSError as e:
            raise KeyFileError(
                f"refusing key directory {shown}: cannot check its parent {parent}: {e.strerror}"
            ) from e
        mode = stat.S_IMODE(st.st_mode)
        if not _trusted_owner(st.st_uid):
            raise KeyFileError(
                f"refusing key directory {shown}: its parent {parent} is "
                f"{_owner_problem(st.st_uid)}; move the key directory, or "
                f"chown {_chown_to()} {parent}"
            )
        if mode & 0o022 and not (st.st_uid == 0 and mode & stat.S_ISVTX):
            raise KeyFileError(
                f"refusing key directory {shown}: its parent {parent} is writable by "
                f"{_writers(mode)}; chmod go-w {parent}"
            )
        path = parent


# -- reading ---------------------------------------------------------------------

# Key-directory files are a line of at most 64 characters; reading a little
# more than that is enough to tell that a file is too long.
_READ_LIMIT = 256


def _read_text(path: FilePath[str], secret: bool, owned: bool, fix: str) -> str:
    """
    Read a key-directory file as ASCII text without surrounding whitespace.
    Permissions and owner are checked on the open file itself, so that
    what is checked is what is read.

    @param secret: refuse the file if group or others have any access.
    @param owned: refuse the file if another user owns it.
    @param fix: what to do if the file is missing or damaged.
    """
    try:
        with open_regular_file(path.path) as f:
            st = os.fstat(f.fileno())
            if owned:
                check_owner(path.path, st)
            mode = st.st_mode & 0o777
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


def read_key(path: FilePath[str], secret: bool) -> bytes:
    """
    Read a 32-byte key written as 64 hex digits.

    @param secret: the file holds a secret (C{secret.key}, C{nonce.key}):
        it must be private to its owner, who must be the effective user or
        root. The message of an error never quotes its contents.
    @raise KeyFileError: the file is missing, damaged or not safe.
    """
    fix = "restore it from a backup"
    text = _read_text(path, secret, owned=secret, fix=fix)
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


def read_counter(path: FilePath[str]) -> int:
    """
    Read a safe-nonce counter file, which the effective user or root must
    own.

    @raise KeyFileError: it is missing, damaged or owned by someone else;
        the message says how to restore it without reusing nonces.
    """
    # A backup's counter is behind the lost one; 2**40 more nonces than
    # that would take 35 years at a thousand handshakes a second.
    fix = (
        "restore it from a backup and add 2**40 (1099511627776) to the number in it; "
        "starting again at 0 could reuse nonces with this key"
    )
    text = _read_text(path, secret=False, owned=True, fix=fix)
    if not (text.isascii() and text.isdigit() and int(text) <= MAX_COUNTER):
        raise KeyFileError(
            f"{path.path} is damaged: expected a decimal number from 0 to {MAX_COUNTER}; {fix}"
        )
    return int(text)


# -- writing and locking -------------------------------------------------------------


def lock(keydir: FilePath[str]) -> IO[bytes]:
    """
    Take the key directory's exclusive lock, so that only one vault at a
    time hands out nonces from its counter: two would hand out the same
    counter values. The lock goes with the returned file (and with the
    process, however it ends).

    @raise KeyFileError: another process holds it, or it cannot be opened.
    """
    path = keydir.child(LOCK_FILE).path
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise KeyFileError(f"cannot open the lock file {path}: {e.strerror}") from e
    held = os.fdopen(fd, "r+b")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        held.close()
        raise KeyFileError(
            f"{keydir.path} is in use by another curvetun process; "
            "give each process a key directory of its own"
        ) from None
    return held


def lock_key_directory(keydir: FilePath[str], shared: bool) -> int:
    """
    Lock the key directory itself (C{flock} on the directory, which works
    on a read-only mount too): exclusively, or with C{shared} (a vault
    with an instance ID, whose part of the counter space is its own)
    shared with other instances. Every vault takes this lock besides the
    lock of its state, so that two processes that keep their counters in
    different state directories cannot both use a key without instance
    IDs: they would hand out the same nonces.

    @return: the locked file descriptor (the lock goes when it is closed).
    @raise KeyFileError: another process holds it, or it cannot be opened.
    """
    try:
        fd = os.open(keydir.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise KeyFileError(f"cannot open key directory {keydir.path}: {e.strerror}") from e
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise KeyFileError(
            f"{keydir.path} is in use by another curvetun process"
            + ("" if shared else " (without an instance ID, one process per key directory)")
            + "; give each process a key directory of its own, or each an --instance ID"
        ) from None
    return fd


def read_instance(state: FilePath[str]) -> int | None:
    """
    The instance ID stored in the state directory C{state}, or L{None}.

    @raise KeyFileError: the file is damaged or owned by someone else.
    """
    path = state.child(INSTANCE_FILE)
    if not path.exists():
        return None
    fix = f"write the instance ID (0 to {MAX_INSTANCE}) into it, or remove it"
    text = _read_text(path, secret=False, owned=True, fix=fix)
    if not (text.isascii() and text.isdigit() and int(text) <= MAX_INSTANCE):
        raise KeyFileError(
            f"{path.path} is damaged: expected a number from 0 to {MAX_INSTANCE}; {fix}"
        )
    return int(text)


def write_instance(state: FilePath[str], instance: int) -> None:
    """
    Store the instance ID C{instance} in the state directory C{state}.

    @raise KeyFileError: it could not be stored.
    """
    path = state.child(INSTANCE_FILE)
    try:
        write_atomically(path, f"{instance}\n".encode("ascii"), 0o600)
    except OSError as e:
        raise KeyFileError(f"cannot store the instance ID in {path.path}: {e.strerror}") from e


def make_directory(keydir: FilePath[str]) -> None:
    """
    Create C{keydir} (and its parents) if missing, make it private (mode
    0700), and check it as L{check_directory} does.

    @raise KeyFileError: it cannot be made, or is not safe.
    """
    try:
        os.makedirs(keydir.path, exist_ok=True)
        owner = os.stat(keydir.path).st_uid
    except OSError as e:
        raise KeyFileError(f"cannot create key directory {keydir.path}: {e.strerror}") from e
    if not _trusted_owner(owner):
        check_directory(keydir)  # refuses it, before its mode is touched
    try:
        os.chmod(keydir.path, 0o700)
    except OSError as e:
        raise KeyFileError(f"cannot create key directory {keydir.path}: {e.strerror}") from e
    check_directory(keydir)


def write_key_files(
    keydir: FilePath[str], public_key: bytes, secret_key: bytes, nonce_key: bytes
) -> None:
    """
    Write a new identity into C{keydir} (made by L{make_directory}, and
    locked by the caller), with its counter at 0.

    @raise OSError: a file could not be written.
    """
    # In this order, a crash part way (even when overwriting) leaves a
    # directory that does not load (a public key that does not match, a
    # missing file) or one with a new key pair and the old, higher
    # counter: never an old key with its counter back at 0.
    for name, text, mode in [
        (PUBLIC_KEY_FILE, public_key.hex(), 0o644),
        (SECRET_KEY_FILE, secret_key.hex(), 0o600),
        (NONCE_KEY_FILE, nonce_key.hex(), 0o600),
        (counter_file_name(public_key), "0", 0o600),
    ]:
        write_atomically(keydir.child(name), f"{text}\n".encode("ascii"), mode)


def write_counter(path: FilePath[str], value: int) -> None:
    """
    Store the safe-nonce counter C{value} durably in the counter file C{path}.

    @raise KeyFileError: it could not be stored.
    """
    try:
        write_atomically(path, f"{value}\n".encode("ascii"), 0o600)
    except OSError as e:
        raise KeyFileError(f"cannot store the nonce counter in {path.path}: {e.strerror}") from e
