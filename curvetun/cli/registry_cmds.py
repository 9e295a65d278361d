"""
C{curvetun trust}, C{untrust} and C{peers}: edit and list a registry file.
"""

from __future__ import annotations

from twisted.python import usage

from ..keys import format_public_key, parse_public_key

# Addresses are checked by the registry file's own parser, so that the
# command line accepts exactly what the file does, before FileRegistry is
# asked: its RegistryError would not tell a bad address (exit status 2)
# from a bad file (exit status 1).
from ..registry import ANY, FileRegistry, Registry, parse_address
from .base import CommandFailed, RegistryOptions, expect_arguments, print_note


def _address(text: str) -> tuple[str, bool]:
    """
    The canonical form of a registry address, and whether it is a host
    name.

    @raise usage.UsageError: C{text} is not an address.
    """
    try:
        canonical, network = parse_address(text)
    except ValueError as error:
        raise usage.UsageError(str(error)) from None
    return canonical, network is None and canonical != ANY


def _key(text: str) -> bytes:
    """
    A public key typed on the command line.

    @raise usage.UsageError: C{text} is not one.
    """
    try:
        return parse_public_key(text)
    except ValueError as error:
        raise usage.UsageError(str(error)) from None


class TrustOptions(RegistryOptions):
    """
    C{curvetun trust}'s command line; the address and key, checked.
    """

    synopsis = "[--comment TEXT] [--keydir DIR] [--registry FILE] ADDRESS KEY"
    optParameters = [
        ["comment", None, None, "A note written after the entry (one line)."],
    ]
    longdesc = (
        "Add the entry ADDRESS KEY to a registry (created if missing). On a "
        "server, ADDRESS is where a client may connect from: an IP address, "
        "a CIDR network, or '*' for anywhere. On a client, it is a server's "
        "host name or IP address, so that 'curvetun cat' and curvetun: "
        "endpoint strings find the server's key without key=. KEY is 64 hex "
        "digits or 44 base64 characters. A running server reads the change "
        "at its next connection. Adding an entry that is already there does "
        "nothing (exit 0). A malformed ADDRESS or KEY exits 2."
    )

    address: str
    is_host_name: bool
    key: bytes

    def take_arguments(self, args: tuple[str, ...]) -> None:
        expect_arguments(args, "ADDRESS KEY", 2, 2)
        self.address, self.is_host_name = _address(args[0])
        self.key = _key(args[1])

    def postOptions(self) -> None:
        self["comment"] = self["comment"] or ""
        if "\n" in self["comment"] or "\r" in self["comment"]:
            raise usage.UsageError("--comment must be a single line")


class UntrustOptions(RegistryOptions):
    """
    C{curvetun untrust}'s command line; the address and key, checked.
    """

    synopsis = "[--keydir DIR] [--registry FILE] ADDRESS [KEY]"
    longdesc = (
        "Remove from a registry the entries for ADDRESS (written in any "
        "form), or only the one with KEY. Every other line stays as it is. "
        "Exit status: 0 if an entry was removed, 1 if none matched (the file "
        "is then unchanged), 2 for a malformed ADDRESS or KEY."
    )

    address: str
    key: bytes | None

    def take_arguments(self, args: tuple[str, ...]) -> None:
        expect_arguments(args, "ADDRESS [KEY]", 1, 2)
        self.address, _ = _address(args[0])
        self.key = _key(args[1]) if len(args) == 2 else None


class PeersOptions(RegistryOptions):
    """
    C{curvetun peers}'s command line.
    """

    synopsis = "[--keydir DIR] [--registry FILE]"
    longdesc = (
        "List the entries of a registry, one per line in the file's own "
        "format (ADDRESS KEY  # comment), in file order. An empty or missing "
        "registry lists nothing (exit 0)."
    )


def trust(options: TrustOptions) -> int:
    """
    C{curvetun trust}: add a registry entry.
    """
    path = options.registry
    line = f"{options.address} {format_public_key(options.key)}"
    if FileRegistry(path).add(options.address, options.key, options["comment"]):
        print(f"added to {path}: {line}")
    else:
        print(f"already in {path}: {line}")
    if options.is_host_name:
        # A newcomer who writes "localhost" would otherwise be refused by
        # the server without a clue.
        print_note(
            "note: a server admits clients by IP address or network only; "
            "a host-name entry tells a client its server's key"
        )
    return 0


def untrust(options: UntrustOptions) -> int:
    """
    C{curvetun untrust}: remove registry entries.
    """
    path = options.registry
    removed = FileRegistry(path).remove(options.address, options.key)
    which = options.address
    if options.key is not None:
        which += f" with key {format_public_key(options.key)}"
    if not removed:
        raise CommandFailed(f"no entry for {which} in {path}; nothing removed")
    print(f"removed {removed} {'entry' if removed == 1 else 'entries'} for {which} from {path}")
    return 0


def peers(options: PeersOptions) -> int:
    """
    C{curvetun peers}: list registry entries.
    """
    path = options.registry
    # Loading checks the whole file first, so that a malformed line is
    # reported with its number instead of being skipped below.
    FileRegistry(path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        lines = []
    except (OSError, UnicodeDecodeError) as error:
        raise CommandFailed(f"cannot read {path}: {error}") from None
    listed = []
    for line in lines:
        for entry in Registry.parse(line, path).entries:
            # Anything after the key is a comment, "#" or not.
            fields = line.split(None, 2)
            comment = fields[2].lstrip("#").strip() if len(fields) == 3 else ""
            listed.append((entry.address, format_public_key(entry.key), comment))
    if not listed:
        print_note(f"no entries in {path}")
    width = max((len(address) for address, _, _ in listed), default=0)
    for address, key, comment in listed:
        print(f"{address:<{width}}  {key}" + (f"  # {comment}" if comment else ""))
    return 0
