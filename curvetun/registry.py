"""
Registries: which long-term public keys belong to which peer addresses
(spec "Registry"), like SSH's C{authorized_keys} and C{known_hosts}.

The file format and the matching rules are in C{docs/keys-and-registry.md}.

A look-up never passes over the entries. IP and CIDR entries are indexed by
prefix length: for each prefix length present in the registry (at most 33
for IPv4, 129 for IPv6) the peer's address, cut to that length, is one dict
look-up, which finds the set of keys registered for that network. So a
server's look-up costs at most 33 (or 129) dict look-ups and as many set
look-ups, however many entries there are, and however many keys share a
network. (Indexing by key first would not do: the networks of one key, a
fleet key allowed from many networks say, would still be scanned.)

L{FileRegistry} reads its file again when it changes, in a thread, and
swaps the new registry in whole: look-ups never wait for a parse and always
see one complete version of the file.
"""

from __future__ import annotations

import functools
import os
import re
import stat
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
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


def _parse_ip(text: str) -> IPv4Address | IPv6Address | None:
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


# A server parses each peer's address on every handshake, and the same
# peers come back: cache the (immutable) results, within a bound. Registry
# lines use _parse_ip, so that reading a large file does not flush the
# peers out of the cache.
_ip = functools.lru_cache(maxsize=4096)(_parse_ip)


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
    ip = _parse_ip(text)
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


INLINE_REREAD_LIMIT = 64 * 1024
"""
A changed registry file smaller than this (some 800 entries) is read again
by the look-up that notices the change, as it takes a few milliseconds
(about 9 ms of CPU for 64 KiB): so an edit, by C{curvetun trust} for instance,
applies to the very next connection. A larger one is read in a thread.
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


class _Network:
    """
    The entries of one network in the index: the keys registered for it,
    and, for clients, the first of them in file order.

    @ivar first: the position in the file of the network's first entry.
    @ivar exact: the network is a single address (an IP entry, or a /32 or
        /128 CIDR entry).
    """

    __slots__ = ("exact", "first", "first_key", "keys")

    def __init__(self, first: int, first_key: bytes, exact: bool) -> None:
        self.first = first
        self.first_key = first_key
        self.exact = exact
        self.keys: frozenset[bytes] | set[bytes] = {first_key}


class _PrefixIndex:
    """
    The networks of one IP version, by prefix length: for each length that
    some entry has, a dict from network address (as an integer) to its
    L{_Network}. A look-up probes each length present once, longest first.
    """

    def __init__(self, bits: int) -> None:
        self._bits = bits
        self._tables: dict[int, dict[int, _Network]] = {}
        # (host bits, table), longest prefix first: filled by freeze().
        self._probes: tuple[tuple[int, dict[int, _Network]], ...] = ()

    def add(self, position: int, network: IPv4Network | IPv6Network, key: bytes) -> None:
        table = self._tables.setdefault(network.prefixlen, {})
        address = int(network.network_address)
        found = table.get(address)
        if found is None:
            exact = network.prefixlen == self._bits
            table[address] = _Network(position, key, exact)
        else:
            assert isinstance(found.keys, set)
            found.keys.add(key)

    def freeze(self) -> None:
        for table in self._tables.values():
            for network in table.values():
                network.keys = frozenset(network.keys)
        self._probes = tuple(
            (self._bits - length, self._tables[length])
            for length in sorted(self._tables, reverse=True)
        )

    def covering(self, address: int) -> Iterator[_Network]:
        """
        The networks that cover C{address}, longest prefix first.
        """
        for host_bits, table in self._probes:
            found = table.get(address >> host_bits << host_bits)
            if found is not None:
                yield found


@attrs.frozen
class _Index:
    """
    The look-up index of a registry's entries (see the module docstring).
    """

    v4: _PrefixIndex
    v6: _PrefixIndex
    any_keys: frozenset[bytes]
    # Host name -> the key of its first entry (client side).
    names: dict[str, bytes]

    @classmethod
    def of(cls, entries: tuple[Entry, ...]) -> _Index:
        v4, v6 = _PrefixIndex(32), _PrefixIndex(128)
        any_keys: set[bytes] = set()
        names: dict[str, bytes] = {}
        for position, entry in enumerate(entries):
            network = entry.network
            if network is not None:
                (v4 if network.version == 4 else v6).add(position, network, entry.key)
            elif entry.address == ANY:
                any_keys.add(entry.key)
            else:
                names.setdefault(entry.address, entry.key)
        v4.freeze()
        v6.freeze()
        return cls(v4, v6, frozenset(any_keys), names)

    def covering(self, ip: IPv4Address | IPv6Address) -> Iterator[_Network]:
        return (self.v4 if ip.version == 4 else self.v6).covering(int(ip))


@implementer(IRegistry)
@attrs.frozen
class Registry:
    """
    A registry held in memory. It never changes: a new version of the
    file is a new L{Registry}, so a reader holding one sees one version.

    @ivar entries: the entries, in file order.
    """

    entries: tuple[Entry, ...] = ()
    _index: _Index = attrs.field(init=False, repr=False, eq=False)

    @_index.default
    def _make_index(self) -> _Index:
        return _Index.of(self.entries)

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
        L{Entry.allows_ip}) has the key C{client_key}.

        The keys are found by hashing, not compared one by one with
        L{keys_equal}: C{client_key} is the client's own public key, which
        the client chose to send, and the time a set look-up takes tells it
        no more than the answer does (whether that key is registered for a
        network that covers its address). No secret is compared here.
        """
        index = self._index
        if client_key in index.any_keys:
            return True
        ip = _ip(peer_host)
        if ip is None:
            return False
        return any(client_key in network.keys for network in index.covering(ip))

    def server_key_for(self, host: str) -> bytes | None:
        """
        Client side: the key of the first entry whose address is C{host}
        (the same host name, ignoring case, or the same IP address); failing
        that, of the first CIDR entry that covers the IP address C{host}.
        C{"*"} entries never apply: a client must name its server's key.
        """
        ip = _ip(host)
        if ip is None:
            return self._index.names.get(host.lower().removesuffix("."))
        first: _Network | None = None
        for network in self._index.covering(ip):
            if network.exact:  # longest first: a single address comes first
                return network.first_key
            if first is None or network.first < first.first:
                first = network
        return None if first is None else first.first_key


@attrs.frozen
class RegistryChange:
    """
    What a new version of a registry changed, each in file order, without
    repeats: entries are compared whole (address and key), so a key that
    moved to another address is one removed and one added.
    """

    added: tuple[Entry, ...] = ()
    removed: tuple[Entry, ...] = ()

    @classmethod
    def between(cls, old: Registry, new: Registry) -> RegistryChange:
        old_entries, new_entries = set(old.entries), set(new.entries)
        return cls(
            tuple(e for e in dict.fromkeys(new.entries) if e not in old_entries),
            tuple(e for e in dict.fromkeys(old.entries) if e not in new_entries),
        )


@attrs.frozen
class _Reread:
    """
    What a reread of the file found (made in a thread, used in the
    reactor's).

    @ivar version: the file's version, examined before it was read.
    @ivar base: the registry in use when the reread began.
    @ivar registry: the new registry, or L{None} if C{error}.
    @ivar change: from C{base} to C{registry}.
    """

    version: tuple[int, ...]
    base: Registry
    registry: Registry | None = None
    change: RegistryChange = RegistryChange()
    error: RegistryError | None = None


RunInThread = Callable[[Callable[[], _Reread]], "Deferred[_Reread]"]
"""
Runs a function in a thread and gives its result in the reactor's thread,
like L{twisted.internet.threads.deferToThread} (the default).
"""


def _defer_to_thread(job: Callable[[], _Reread]) -> Deferred[_Reread]:
    from twisted.internet.threads import deferToThread

    return deferToThread(job)


@implementer(IRegistry)
class FileRegistry(Service):
    """
    The registry in a file, read again whenever the file has changed: each
    look-up compares the file's modification time, size and inode with
    those of the version last read (one C{stat}, no read). A small changed
    file (under C{inline_limit} bytes) is read there and then, so the edit
    applies to that very connection; a larger one is read in a thread
    (C{run_in_thread}) while look-ups go on with the last good registry,
    and the new one replaces it whole, in the reactor's thread, once
    parsed. So an edit applies with no restart and no polling, and a large
    file never stalls the reactor.

    A file that does not exist is an empty registry. A malformed file keeps
    the entries last read (and is logged, once per version of the file),
    except when the registry is made: then it is an error.

    @ivar path: the registry file.
    @ivar changed_callbacks: called in the reactor's thread with a
        L{RegistryChange} after each new version is swapped in (by a
        reread, L{reload}, L{add} or L{remove}); the change may be empty
        (the file was written again with the same entries). A callback
        that raises is logged and does not stop the others.
    """

    log = Logger()

    def __init__(
        self,
        path: str | FilePath[str],
        run_in_thread: RunInThread | None = None,
        inline_limit: int = INLINE_REREAD_LIMIT,
    ) -> None:
        """
        @param run_in_thread: runs rereads of the file (default:
            L{twisted.internet.threads.deferToThread}).
        @param inline_limit: a changed file smaller than this many bytes
            is read by the look-up that notices the change, a larger one
            in a thread (see L{INLINE_REREAD_LIMIT}). L{reload} always
            reads in a thread.
        @raise RegistryError: the file cannot be read or is malformed.
        """
        self.path = FilePath(path) if isinstance(path, str) else path
        self._inline_limit = inline_limit
        self._run_in_thread = run_in_thread if run_in_thread is not None else _defer_to_thread
        self._version = self._stat()
        self._registry = Registry.parse(self._read(), self.path.path)
        self.changed_callbacks: list[Callable[[RegistryChange], None]] = []
        # One reread runs at a time; _waiting wait for the running one,
        # _queued for one to start after it (None: none asked for).
        self._rereading = False
        self._waiting: list[Deferred[RegistryChange]] = []
        self._queued: list[Deferred[RegistryChange]] | None = None

    @property
    def current(self) -> Registry:
        """
        The registry in use: the last version of the file read whole.
        """
        return self._registry

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

    def _reread(self, base: Registry) -> _Reread:
        """
        Read and parse the file; runs in a thread, so it only reads
        C{self.path} and C{base}, which never change.
        """
        version = self._stat()
        try:
            registry = Registry.parse(self._read(), self.path.path)
        except RegistryError as e:
            return _Reread(version, base, error=e)
        return _Reread(version, base, registry, RegistryChange.between(base, registry))

    def _start_reread(self, waiting: list[Deferred[RegistryChange]]) -> None:
        self._rereading = True
        self._waiting = waiting
        base = self._registry
        self._run_in_thread(lambda: self._reread(base)).addBoth(self._reread_done)

    def _reread_done(self, result: _Reread | Failure) -> None:
        waiting, self._waiting = self._waiting, []
        self._rereading = False
        if isinstance(result, Failure):
            # Not a RegistryError (those are in the result): a bug, or the
            # thread pool refused the job.
            self.log.failure("Reading {path} failed", result, path=self.path.path)
            for d in waiting:
                d.errback(result)
        elif result.base is not self._registry:
            # add() or remove() swapped in a version of their own while the
            # thread read the file: what it read may be older. Read again
            # for whoever asked; the look-ups' watcher needs nothing more,
            # as the version add() or remove() wrote is recorded.
            if waiting:
                self._queued = waiting + (self._queued or [])
        else:
            # Recorded first, so that a malformed file is reported once,
            # not at every connection.
            self._version = result.version
            if result.error is not None:
                self.log.error(
                    "{error}; still using the {count} entries read before",
                    error=str(result.error),
                    count=len(self._registry.entries),
                )
                for d in waiting:
                    d.errback(result.error)
            else:
                assert result.registry is not None
                self._swap(result.registry, result.change)
                self.log.info(
                    "Read {count} entries from {path}",
                    count=len(result.registry.entries),
                    path=self.path.path,
                )
                for d in waiting:
                    d.callback(result.change)
        if self._queued is not None:
            queued, self._queued = self._queued, None
            self._start_reread(queued)

    def _swap(self, registry: Registry, change: RegistryChange) -> None:
        """
        Put C{registry} in use (one assignment: a look-up sees the old
        version or the new, whole) and tell the subscribers.
        """
        self._registry = registry
        for callback in list(self.changed_callbacks):
            try:
                callback(change)
            # One subscriber's bug must not keep the others from hearing of
            # the change (revocation among them).
            except Exception:
                self.log.failure("A registry change callback failed")

    def reload(self) -> Deferred[RegistryChange]:
        """
        Read the file again, whether or not it seems to have changed (for
        SIGHUP), in a thread; look-ups use the last good version meanwhile.

        @return: fires with the L{RegistryChange} once the new version is
            in use, or fails with the L{RegistryError} (already logged, and
            the entries read before are kept). Calls made while a reread
            runs share one reread that starts after it.
        """
        d: Deferred[RegistryChange] = Deferred()
        if not self._rereading:
            self._start_reread([d])
        elif self._queued is None:
            self._queued = [d]
        else:
            self._queued.append(d)
        return d

    def _current(self) -> Registry:
        """
        The registry in use, after starting a reread if the file has
        changed (while one runs, there is nothing to check: it will have
        examined the file after that change or the next look-up will).
        """
        if not self._rereading:
            version = self._stat()
            if version != self._version:
                # Versions without a size (no file, or one that cannot be
                # examined) are read at once: that fails or ends at once.
                size = version[1] if len(version) == 3 else 0
                if size < self._inline_limit:
                    self._rereading = True
                    self._reread_done(self._reread(self._registry))
                else:
                    self._start_reread([])
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
        before = Registry.parse(text, self.path.path)
        if entry in before.entries:
            return False
        line = f"{entry.address} {format_public_key(entry.key)}"
        self._write([*_lines(text), f"{line}  # {comment}" if comment else line])
        self._wrote(Registry((*before.entries, entry)))
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
        kept_entries = []
        for lineno, line in enumerate(lines, start=1):
            entry = _parse_line(line, self.path.path, lineno)
            if (
                entry is None
                or entry.address != target
                or (target_key is not None and not keys_equal(entry.key, target_key))
            ):
                kept.append(line)
                if entry is not None:
                    kept_entries.append(entry)
        if len(kept) < len(lines):
            self._write(kept)
            self._wrote(Registry(tuple(kept_entries)))
        return len(lines) - len(kept)

    def _wrote(self, registry: Registry) -> None:
        """
        L{add} or L{remove} wrote C{registry} to the file: use it now, so
        that the edit applies to the very next look-up, without a reread.
        """
        self._version = self._stat()
        self._swap(registry, RegistryChange.between(self._registry, registry))

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
