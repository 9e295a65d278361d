"""
C{curvetun keygen} and C{curvetun pubkey}: make a key directory, show its
public key.
"""

from __future__ import annotations

import os

from ..errors import KeyFileError
from ..keydir import existing_key_files
from ..keys import format_public_key
from ..vault import FileVault, read_public_key
from .base import CommandFailed, KeydirOptions


class KeygenOptions(KeydirOptions):
    """
    C{curvetun keygen}'s command line.
    """

    synopsis = "[--keydir DIR] [--force]"
    optFlags = [
        ["force", None, "Replace the key pair if the key directory already has one."],
    ]
    longdesc = (
        "Create a key directory (mode 0700; secret files 0600) with a new key "
        "pair, and print its public key (64 hex digits). A directory that "
        "already holds keys is left alone (exit 1) unless --force is given: "
        "replacing a key pair replaces the identity, and every peer that "
        "trusts the old public key will refuse the new one. The directory, "
        "and every directory above it, must be safe from other users (see "
        "docs/keys-and-registry.md)."
    )


class PubkeyOptions(KeydirOptions):
    """
    C{curvetun pubkey}'s command line.
    """

    synopsis = "[--keydir DIR]"
    longdesc = (
        "Print the public key (64 hex digits) of a key directory, after "
        "checking it against the secret key. It works while a server uses the "
        "directory. Exit 1 if the directory is missing, damaged or not safe."
    )


def keygen(options: KeygenOptions) -> int:
    """
    C{curvetun keygen}: create a key directory, print its public key.
    """
    keydir = options.keydir
    try:
        vault = FileVault.create(keydir, overwrite=options["force"])
    except KeyFileError as error:
        if not options["force"] and existing_key_files(keydir):
            raise CommandFailed(
                f"{error}; to make a new identity anyway, use --force (peers that "
                "trust the old public key will refuse the new one)"
            ) from None
        raise
    # Let the key directory go at once: a server may be started on it next.
    vault.close()
    print(format_public_key(vault.public_key))
    return 0


def pubkey(options: PubkeyOptions) -> int:
    """
    C{curvetun pubkey}: print a key directory's public key.
    """
    keydir = options.keydir
    if not os.path.isdir(keydir):
        raise CommandFailed(
            f"no curvetun key directory at {keydir}: create one with "
            f"'curvetun keygen --keydir {keydir}'"
        )
    # Without the directory's lock: the server using it is the usual
    # reason to want its key.
    print(format_public_key(read_public_key(keydir)))
    return 0
