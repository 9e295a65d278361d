"""
C{curvetun keygen}, C{curvetun pubkey} and C{curvetun rotate}: make a key
directory, show its public key, roll its key over.
"""

from __future__ import annotations

import os

from twisted.python.filepath import FilePath

from ..errors import KeyFileError
from ..keydir import existing_key_files
from ..keys import fingerprint, format_public_key
from ..server_keys import finish_rotation, has_previous, rotate
from ..vault import FileVault, read_public_key
from .base import CommandFailed, KeydirOptions, print_note


class KeygenOptions(KeydirOptions):
    """
    C{curvetun keygen}'s command line.
    """

    synopsis = "[--keydir DIR] [--force] [--shared]"
    optFlags = [
        ["force", None, "Replace the key pair if the key directory already has one."],
        [
            "shared",
            None,
            "Mark the directory as one to copy to several hosts: each server "
            "then needs an --instance ID of its own.",
        ],
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

    synopsis = "[--keydir DIR] [--previous]"
    optFlags = [
        ["previous", None, "Print the previous key of an unfinished rollover instead."],
    ]
    longdesc = (
        "Print the public key (64 hex digits) of a key directory, after "
        "checking it against the secret key; with --previous, the key that "
        "'curvetun rotate' replaced, until 'rotate --finish'. It works while a "
        "server uses the directory. Exit 1 if the directory is missing, "
        "damaged or not safe, or (--previous) has no previous key."
    )


class RotateOptions(KeydirOptions):
    """
    C{curvetun rotate}'s command line.
    """

    synopsis = "[--keydir DIR] [--finish]"
    optFlags = [
        ["finish", None, "Forget the previous key: overwrite its secret files and unlink them."],
    ]
    longdesc = (
        "Make a new key pair the current key of a key directory and keep the "
        "old one as the previous key (with its own nonce key and counter); "
        "print the new public key. A server answers hellos to both once it "
        "reloads its keys (SIGHUP); give clients the new key, then run "
        "'curvetun rotate --finish' and reload again, after which hellos to "
        "the old key are refused. It is safe while a server uses the "
        "directory. See docs/keys-and-registry.md."
    )


def keygen(options: KeygenOptions) -> int:
    """
    C{curvetun keygen}: create a key directory, print its public key.
    """
    keydir = options.keydir
    try:
        vault = FileVault.create(keydir, overwrite=options["force"], shared=options["shared"])
    except KeyFileError as error:
        if not options["force"] and existing_key_files(keydir):
            raise CommandFailed(
                f"{error}; to make a new identity anyway, use --force (peers that "
                "trust the old public key will refuse the new one)"
            ) from None
        raise
    # Let the key directory go at once: a server may be started on it next.
    vault.close()
    if options["shared"]:
        print_note(f"{keydir} is marked shared: start each server on it with its own --instance ID")
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
    if options["previous"] and not has_previous(FilePath(keydir)):
        raise CommandFailed(f"{keydir} has no previous key: no rollover is in progress")
    # Without the directory's lock: the server using it is the usual
    # reason to want its key.
    print(format_public_key(read_public_key(keydir, previous=options["previous"])))
    return 0


def rotate_command(options: RotateOptions) -> int:
    """
    C{curvetun rotate}: make a new current key, keeping the old one as the
    previous key; with C{--finish}, forget the previous key.
    """
    keydir = options.keydir
    if not os.path.isdir(keydir):
        raise CommandFailed(
            f"no curvetun key directory at {keydir}: create one with "
            f"'curvetun keygen --keydir {keydir}'"
        )
    if options["finish"]:
        forgotten = finish_rotation(keydir)
        shown = f"{fingerprint(forgotten)}..." if forgotten else "(its public key was damaged)"
        print_note(
            f"forgot the previous key {shown}: reload the servers that use {keydir} "
            "to refuse hellos to it"
        )
        return 0
    new = rotate(keydir)
    print_note(
        f"the previous key stays until 'curvetun rotate --finish --keydir {keydir}'; "
        "reload the servers that use the directory (SIGHUP) to answer to both"
    )
    print(format_public_key(new))
    return 0
