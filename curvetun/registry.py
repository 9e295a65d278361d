"""
Registries: which long-term public keys belong to which peer addresses
(spec "Registry"), like SSH's C{authorized_keys} and C{known_hosts}.

The file format and the matching rules are in C{docs/keys-and-registry.md}.
"""

from __future__ import annotations

import functools
import os
import re
import stat
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

import attrs
from twisted.application.service import Service
from twisted.logger import Logger
from twisted.python.filepath import FilePath
from zope.interface import implementer

from curvetun.errors import RegistryError
from curvetun.files import open_regular_file, write_atomically
from curvetun.interfaces import IRegistry
from curvetun.keys import format_public_key, keys_equal, parse_public_key, quoted

ANY = "*"

_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")


@attrs.frozen
class Entry:
    """
    One registry line: a peer address and the key registered for it.

    @ivar address: the address in canonical form: C{"*"}, an IP address, a
        CIDR network, or a lower-case host name without a trailing dot.
    @ivar key: the 32-byte public key.
    @ivar network: the addresses an IP or CIDR entry covers (an IP address
        is a network of one); L{None} for C{"*"} and host names.
    """

    address: str
    key: bytes
    network: IPv4Network | IPv6Network | None

    def allows_ip(self, ip: IPv4Address | IPv6Address | None) -> bool:
        """
        Does this entry apply to a peer at C{ip} (server side)? C{"*"}
        applies to any peer, IP and CIDR entries to the addresses they
        cover, host names to none.
        """
        if self.address == ANY:
            return True
        return ip is not None and self.network is not None and ip in self.network


# A server parses each peer's address on every handshake, and the same
# peers come back: cache the (immutable) results, within a bound.
@functools.lru_cache(maxsize=4096)
def _ip(text: str) -> IPv4Address | IPv6Address | None:
    """
    C{text} as an IP address, or L{None} if it is not one. An IPv4-mapped
    IPv6 address (C{::ffff:10.0.0.1}, as a dual-stack socket reports IPv4
    peers) becomes the IPv4 address, so that IPv4 entries match it.
    """
    try:
        ip = ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def parse_address(text: str) -> tuple[str, IPv4Network | IPv6Network | None]:
    """
    Parse the ADDRESS field of a registry line.

    @return: the canonical address and its network (see L{Entry}).
    @raise ValueError: C{text} is none of the forms of an address.
    """
    if text == ANY:
        return ANY, None
    if "/" in text:
        try:
            network = ip_network(text)  # strict: refuses host bits after the prefix
        except ValueError as e:
            raise ValueError(f"bad CIDR network: {e}") from None
        return str(network), network
    ip = _ip(text)
    if ip is not None:
        return str(ip), ip_network(ip)
    name = text.lower().removesuffix(".")
    labels = name.split(".")
    # A name whose last label is a number is a mistyped IPv4 address, not a
    # host name (the WHATWG URL rule).
    if (
        len(name) <= 253
        and all(_LABEL.fullmatch(label) for label in labels)
        and not labels[-1].isdigit()
    ):
        return name, None
    # Not quoted: a registry= that names the wrong file (a secret key, say)
    # must not print it.
    raise ValueError("bad address: expected an IP address, a CIDR network, a host name or '*'")


MAX_REGISTRY_SIZE = 16 * 1024 * 1024
"""
The largest registry file read (some 100,000 entries); a larger one is
refused rather than read into memory.
"""


def _lines(text: str) -> list[str]:
    """
    The lines of registry text. Only a newline ends a line (with an optional
    carriage return before it): str.splitlines would also split at form
    feeds, U+2028 and the like, so that an entry that an editor shows inside
    a comment would count.
    """
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _parse_key(key: bytes | str) -> bytes:
    # Raw keys are checked like typed ones (size, low-order points).
    return parse_public_key(key if isinstance(key, str) else key.hex())


def _parse_line(line: str, source: str, lineno: int) -> Entry | None:
    """
    Parse one registry line; L{None} for a blank or comment line.

    @raise RegistryError: the line is malformed.
    """
    fields = line.split()
    if not fields or fields[0].startswith("#"):
        return None
    try:
        address, network = parse_address(fields[0])
        if len(fields) < 2 or fields[1].startswith("#"):
            raise ValueError(f"missing key after {quoted(fields[0])}")
        key = parse_public_key(fields[1])
    except ValueError as e:
        raise RegistryError(f"{source}:{lineno}: {e}") from None
    return Entry(address, key, network)


@implementer(IRegistry)
@attrs.frozen
class Registry:
    """
    A registry held in memory.

    @ivar entries: the entries, in file order.
    """

    entries: tuple[Entry, ...] = ()
    # The server's look-up index: the keys of single-address entries by
    # address, and the entries that cover more (CIDR, "*") to scan, so that
    # a handshake costs a dict look-up, not a pass over every line.
    _exact: dict[IPv4Address | IPv6Address, tuple[bytes, ...]] = attrs.field(
        init=False, repr=False, eq=False
    )
    _wide: tuple[Entry, ...] = attrs.field(init=False, repr=False, eq=False)

    @_exact.default
    def _index_exact(self) -> dict[IPv4Address | IPv6Address, tuple[bytes, ...]]:
        exact: dict[IPv4Address | IPv6Address, tuple[bytes, ...]] = {}
        for entry in self.entries:
            if entry.network is not None and entry.network.num_addresses == 1:
                address = entry.network.network_address
                exact[address] = (*exact.get(address, ()), entry.key)
        return exact

    @_wide.default
    def _index_wide(self) -> tuple[Entry, ...]:
        return tuple(
            e
            for e in self.entries
            if e.address == ANY or (e.network is not None and e.network.num_addresses > 1)
        )

    @classmethod
    def parse(cls, text: str, source: str = "<string>") -> Registry:
        """
        Parse registry text (the file format).

        @param source: the file name for error messages.
        @raise RegistryError: a line is malformed; the message is
            C{"{source}:{lineno}: {problem}"}.
        """
        lines = enumerate(_lines(text), start=1)
        entries = (_parse_line(line, source, n) for n, line in lines)
        return cls(tuple(e for e in entries if e is not None))

    def is_client_allowed(self, client_key: bytes, peer_host: str) -> bool:
        """
        Server side: true if any entry that applies to C{peer_host} (see
        L{Entry.allows_ip}) has the key C{client_key}. Every applicable
        entry is compared, in constant time, whether or not one matched.
        """
        ip = _ip(peer_host)
        allowed = False
        if ip is not None:
            for key in self._exact.get(ip, ()):
                allowed |= keys_equal(key, client_key)
        for entry in self._wide:
            if entry.allows_ip(ip):
                allowed |= keys_equal(entry.key, client_key)
        return allowed

    def server_key_for(self, host: str) -> bytes | None:
        """
        Client side: the key of the first entry whose address is C{host}
        (the same host name, ignoring case, or the same IP address); failing
        that, of the first CIDR entry that covers the IP address C{host}.
        C{"*"} entries never apply: a client must name its server's key.
        """
        ip = _ip(host)
        if ip is None:
            name = host.lower().removesuffix(".")
            candidates = [
                e
                for e in self.entries
                if e.network is None and e.address != ANY and e.address == name
            ]
        else:
            covering = [e for e in self.entries if e.network is not None and ip in e.network]
            exact = [e for e in covering if e.network is not None and e.network.num_addresses == 1]
            candidates = exact + covering
        return candidates[0].key if candidates else None


@implementer(IRegistry)
class FileRegistry(Service):
    """
    The registry in a file, read again whenever the file has changed: each
    lookup compares the file's modification time, size and inode with
    those of the version last read, so an edit applies to the next
    connection, with no restart and no polling.

    A file that does not exist is an empty registry. A malformed file keeps
    the entries last read (and is logged, once per version of the file),
    except when the registry is made: then it is an error.

    @ivar path: the registry file.
    """

    log = Logger()

    def __init__(self, path: str | FilePath[str]) -> None:
        """
        @raise RegistryError: the file cannot be read or is malformed.
        """
        self.path = FilePath(path) if isinstance(path, str) else path
        self._version = self._stat()
        self._registry = Registry.parse(self._read(), self.path.path)

    def _stat(self) -> tuple[int, ...]:
        """
        Identify the version of the file: C{(mtime_ns, size, inode)}; C{()}
        if there is no file; C{(errno,)} if it cannot be examined (reading
        it will then raise the error).
        """
        try:
            st = os.stat(self.path.path)
        except FileNotFoundError:
            return ()
        except OSError as e:
            return (e.errno or 0,)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read(self) -> str:
        """
        The file's text; C{""} if there is no file.

        @raise RegistryError: it cannot be read or is not UTF-8.
        """
        try:
            with open_regular_file(self.path.path) as f:
                data = f.read(MAX_REGISTRY_SIZE + 1)
        except FileNotFoundError:
            return ""
        except OSError as e:
            raise RegistryError(f"cannot read {self.path.path}: {e.strerror}") from e
        except ValueError as e:  # a NUL byte in the path
            raise RegistryError(f"cannot read {quoted(self.path.path)}: {e}") from e
        if len(data) > MAX_REGISTRY_SIZE:
            raise RegistryError(
                f"{self.path.path} is larger than {MAX_REGISTRY_SIZE} bytes: not a registry?"
            )
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            lineno = data.count(b"\n", 0, e.start) + 1
            raise RegistryError(f"{self.path.path}:{lineno}: not UTF-8 text") from None

    def _current(self) -> Registry:
        """
        The registry, read again first if the file has changed.
        """
        version = self._stat()
        if version != self._version:
            # Remember the version before parsing it, so that a malformed
            # file is reported once, not at every connection.
            self._version = version
            try:
                self._registry = Registry.parse(self._read(), self.path.path)
            except RegistryError as e:
                self.log.error(
                    "{error}; still using the {count} entries read before",
                    error=str(e),
                    count=len(self._registry.entries),
                )
            else:
                self.log.info(
                    "Read {count} entries from {path}",
                    count=len(self._registry.entries),
                    path=self.path.path,
                )
        return self._registry

    def is_client_allowed(self, client_key: bytes, peer_host: str) -> bool:
        """
        See L{Registry.is_client_allowed}.
        """
        return self._current().is_client_allowed(client_key, peer_host)

    def server_key_for(self, host: str) -> bytes | None:
        """
        See L{Registry.server_key_for}.
        """
        return self._current().server_key_for(host)

    def add(self, address: str, key: bytes | str, comment: str = "") -> bool:
        """
        Append the line C{ADDRESS KEY  # comment} to the file, unless an
        entry with this address and key is already there.

        @param key: the 32 raw bytes, or their hex or base64 text.
        @return: whether a line was added.
        @raise RegistryError: a bad address, key or comment, or a file that
            is malformed or cannot be written; the file is then unchanged.
        """
        try:
            canonical, network = parse_address(address)
            entry = Entry(canonical, _parse_key(key), network)
        except ValueError as e:
            raise RegistryError(str(e)) from None
        if "\n" in comment or "\r" in comment:
            raise RegistryError("a comment must be a single line")
        # Parsing first also refuses to rewrite a malformed file, whose
        # error would otherwise go unnoticed.
        text = self._read()
        if entry in Registry.parse(text, self.path.path).entries:
            return False
        line = f"{entry.address} {format_public_key(entry.key)}"
        self._write([*_lines(text), f"{line}  # {comment}" if comment else line])
        return True

    def remove(self, address: str, key: bytes | str | None = None) -> int:
        """
        Remove from the file the entries for C{address} (in any of its
        written forms), only those with C{key} if it is given; every other
        line, comments included, stays as it is.

        @return: how many entries were removed.
        @raise RegistryError: as for L{add}.
        """
        try:
            target, _ = parse_address(address)
            target_key = None if key is None else _parse_key(key)
        except ValueError as e:
            raise RegistryError(str(e)) from None
        lines = _lines(self._read())
        kept = []
        for lineno, line in enumerate(lines, start=1):
            entry = _parse_line(line, self.path.path, lineno)
            if (
                entry is None
                or entry.address != target
                or (target_key is not None and not keys_equal(entry.key, target_key))
            ):
                kept.append(line)
        if len(kept) < len(lines):
            self._write(kept)
        return len(lines) - len(kept)

    def _write(self, lines: list[str]) -> None:
        """
        Replace the file atomically; it keeps its permissions (0644 if new).
        """
        text = "".join(f"{line}\n" for line in lines)
        try:
            try:
                mode = stat.S_IMODE(os.stat(self.path.path).st_mode)
            except FileNotFoundError:
                mode = 0o644
                os.makedirs(self.path.parent().path, exist_ok=True)
            write_atomically(self.path, text.encode("utf-8"), mode)
        except OSError as e:
            raise RegistryError(f"cannot write {self.path.path}: {e.strerror}") from e
