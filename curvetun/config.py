"""
What the tunnels of C{twist curvetun} are, as values: L{TunnelConfig} (one
tunnel's listen endpoints, where it forwards or that it echoes, its
identity, its limits and timeouts, and the PROXY header it sends), the
checks that turn the text an operator wrote into those values, and
L{read_config_file}, which reads a TOML file describing several tunnels.

The command line and the file name the same settings (C{--max-connections}
is C{max_connections}) and go through one function, L{tunnel_config}, so
that both are checked by the same rules; only the way a message says where
the mistake is differs (a L{Source}). The tunnel service
(L{curvetun.tunnel_service}) takes a list of L{TunnelConfig}s, whichever
made them.

The file::

    [[tunnel]]
    name = "redis"                      # optional, for the log
    listen = "curvetun:7700"            # or a list of endpoint strings
    forward = "tcp:127.0.0.1:6379"      # absent: echo
    keydir = "/etc/curvetun/keys"       # relative: to the file's directory
    statedir = "/var/lib/curvetun"      # counters and lock: the keydir may be read-only
    send_proxy = "v2"
    max_connections = 1000

Every key of a C{[[tunnel]]} table is one of L{TUNNEL_KEYS}; the top level
holds only L{TOP_LEVEL_KEYS}. Anything else is an error naming the file,
the line and the key. Settings not built yet are
refused like any unknown key until they are added to those tuples and to
L{tunnel_config}. The top level may also hold C{metrics} and C{workers}
(L{read_config}).
"""

from __future__ import annotations

import contextlib
import difflib
import math
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar, cast
from typing import Protocol as TypingProtocol

import attrs

from .admission import ConnectionLimits
from .endpoints import DEFAULT_PORT
from .factories import DEFAULT_HANDSHAKE_TIMEOUT
from .keydir import MAX_INSTANCE, default_keydir
from .proxy_header import ProxyVersion

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

_P = ParamSpec("_P")
_T = TypeVar("_T")

DEFAULT_GRACE = 10.0
"""
Seconds open connections may take to finish when the service stops.
"""

DEFAULT_LISTEN = f"curvetun:{DEFAULT_PORT}"
"""
Where a tunnel listens when it is told nowhere.
"""

MAX_NUMBER_LENGTH = 32
"""
The longest text taken for a number. Checked before converting: Python
refuses to convert integers of more than 4,300 digits with an error of its
own, and a float of a million digits costs time to read; no sensible
count or number of seconds is longer than this.
"""

LIMITS: dict[str, str] = {
    "connections": "connections",
    "connections_per_address": "connections from one IP address",
    "handshakes": "unfinished handshakes",
    "handshakes_per_address": "unfinished handshakes from one IP address",
    "connections_per_network": "connections from one network (see --ipv4-prefix)",
    "handshakes_per_network": "unfinished handshakes from one network (see --ipv4-prefix)",
}
"""
The fields of L{ConnectionLimits} that can be set (as C{max_NAME}), and
what each counts.
"""

NETWORK_PREFIXES: dict[str, int] = {"ipv4_prefix": 32, "ipv6_prefix": 128}
"""
The settings that say how long a network is for the per-network limits
(C{ipv4_prefix = 24}: a /24), with the longest each can be.
"""

PROXY_VERSIONS: tuple[ProxyVersion, ...] = ("v1", "v2")
"""
The values of C{send_proxy}.
"""

_SECONDS = {"grace": True, "handshake_timeout": False, "idle_timeout": True}
_COUNTS = tuple(f"max_{name}" for name in LIMITS)
_PATHS = ("keydir", "registry", "statedir")
_FLAGS = ("keep_sessions_on_revoke",)

TUNNEL_KEYS: tuple[str, ...] = (
    "name",
    "listen",
    "forward",
    *_PATHS,
    *_SECONDS,
    *_COUNTS,
    *NETWORK_PREFIXES,
    "send_proxy",
    *_FLAGS,
    "instance",
)
"""
The keys of a C{[[tunnel]]} table; without C{name}, also the settings of
the command line (C{handshake_timeout} is C{--handshake-timeout}).
"""

TOP_LEVEL_KEYS: tuple[str, ...] = ("tunnel", "metrics", "workers")
"""
The keys of the file's top level: the C{[[tunnel]]} tables, and the
process-wide settings (C{metrics}: the server endpoint string of the
monitoring endpoint, as C{--metrics}; C{workers}: how many worker
processes run every tunnel, as C{--workers}).
"""

MAX_WORKERS = 64
"""The most worker processes C{--workers} (or C{workers}) takes."""


# -- one tunnel -----------------------------------------------------------------


class Source(TypingProtocol):
    """
    Where a tunnel's settings were written, for messages about them.
    """

    def option(self, key: str) -> str:
        """
        How the operator spells setting C{key} (C{"--max-connections"} or
        C{"max_connections"}).
        """

    def where(self, key: str | None = None) -> str:
        """
        What a message about setting C{key} (or the tunnel as a whole)
        starts with: C{""} on the command line, C{"FILE:LINE: tunnel N: "}
        in a file.
        """


@attrs.frozen
class CommandLine:
    """
    The settings came from C{twist curvetun}'s options.
    """

    def option(self, key: str) -> str:
        return "--" + key.replace("_", "-")

    def where(self, key: str | None = None) -> str:
        return ""


@attrs.frozen
class FileTunnel:
    """
    The settings came from the C{number}th C{[[tunnel]]} table of C{path},
    which starts at line C{line}; C{lines} has the line of each key.
    """

    path: str
    number: int
    line: int
    lines: Mapping[str, int] = attrs.field(factory=dict)

    def option(self, key: str) -> str:
        return key

    def where(self, key: str | None = None) -> str:
        line = self.lines.get(key, self.line) if key is not None else self.line
        return f"{self.path}:{line}: tunnel {self.number}: "


COMMAND_LINE = CommandLine()


@attrs.frozen
class TunnelConfig:
    """
    One tunnel: what it listens on, what it does with each connection, and
    with which identity and bounds.

    @ivar keydir: the key directory of the tunnel's long-term key (created,
        with a fresh key, if it does not exist).
    @ivar listen: the server endpoint strings to listen on, at least one.
    @ivar forward: the client endpoint string each connection is forwarded
        to, or L{None} to echo what is received.
    @ivar registry: the registry file, or L{None} for the key directory's.
    @ivar grace: seconds open connections may take to finish on stop.
    @ivar handshake_timeout: seconds a curvetun handshake may take.
    @ivar idle_timeout: seconds a curvetun connection may receive nothing
        before it is closed, or L{None} for never.
    @ivar limits: how many connections the curvetun listen endpoints take.
    @ivar send_proxy: the PROXY header version each forward connection
        starts with, or L{None} for none.
    @ivar keep_sessions_on_revoke: whether an established connection stays
        open when the registry stops admitting its key (by default it is
        closed: L{curvetun.revocation}).
    @ivar statedir: the directory of the identity's mutable files (nonce
        counters, lock, instance ID), or L{None} for the key directory.
    @ivar instance: this host's instance ID (0 to 65535) for a key
        directory copied to several hosts, or L{None} (the one stored in
        the state, if any).
    @ivar change_instance: let C{instance} replace another stored one (a
        command-line flag, C{--change-instance}, for every tunnel).
    @ivar name: what the log calls the tunnel, or L{None}.
    @ivar source: where the settings were written (for messages).
    """

    keydir: str
    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    forward: str | None = None
    registry: str | None = None
    grace: float = DEFAULT_GRACE
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    idle_timeout: float | None = None
    limits: ConnectionLimits = attrs.field(factory=ConnectionLimits)
    send_proxy: ProxyVersion | None = None
    keep_sessions_on_revoke: bool = False
    statedir: str | None = None
    instance: int | None = None
    change_instance: bool = False
    name: str | None = None
    source: Source = attrs.field(default=COMMAND_LINE, eq=False, repr=False)

    @property
    def serving(self) -> str:
        """
        What the tunnel does with a connection, for a log message.
        """
        what = "echo" if self.forward is None else f"forwarding to {self.forward}"
        if self.send_proxy is not None and self.forward is not None:
            what += f" with a PROXY {self.send_proxy} header"
        return what if self.name is None else f"tunnel {self.name}: {what}"


class SettingError(ValueError):
    """
    A tunnel setting is malformed.

    @ivar key: the setting (as in L{TUNNEL_KEYS}), or L{None} for the
        tunnel as a whole.
    """

    def __init__(self, key: str | None, message: str) -> None:
        super().__init__(message)
        self.key = key


def tunnel_config(
    settings: Mapping[str, str | Sequence[str]], source: Source = COMMAND_LINE
) -> TunnelConfig:
    """
    The tunnel that C{settings} describe: each a key of L{TUNNEL_KEYS}
    (absent for the default) with its text as the operator wrote it
    (C{listen}: a list of endpoint strings).

    @raise SettingError: a setting is malformed (a one-line message that
        names it the way C{source} spells it).
    """
    unknown = sorted(set(settings) - set(TUNNEL_KEYS))
    if unknown:
        raise SettingError(unknown[0], f"unknown setting {unknown[0]!r}")

    def text(key: str) -> str | None:
        value = settings.get(key)
        assert value is None or isinstance(value, str), (key, value)
        return value

    listen = list(settings.get("listen", [DEFAULT_LISTEN]))
    # An empty value is a mistake (an unset shell variable, say), not a
    # request for the default.
    if not listen or any(not endpoint.strip() for endpoint in listen):
        raise SettingError(
            "listen", f"{source.option('listen')} needs an endpoint, e.g. {DEFAULT_LISTEN}"
        )
    forward = text("forward")
    if forward is not None and not forward.strip():
        raise SettingError(
            "forward", f"{source.option('forward')} needs an endpoint, e.g. tcp:127.0.0.1:6379"
        )
    paths = {}
    for key in _PATHS:
        path = text(key)
        if path is not None and (not path.strip() or "\x00" in path):
            raise SettingError(key, f"{source.option(key)} needs a path")
        paths[key] = path
    seconds = {}
    for key, allow_zero in _SECONDS.items():
        given = text(key)
        if given is not None:
            seconds[key] = _checked(key, parse_seconds, source.option(key), given, allow_zero)
    limits: dict[str, Any] = {}
    for limit in LIMITS:
        key = f"max_{limit}"
        given = text(key)
        if given is not None:
            limits[limit] = _checked(key, parse_count, source.option(key), given) or None
    for key, longest in NETWORK_PREFIXES.items():
        given = text(key)
        if given is not None:
            limits[key] = _checked(key, parse_prefix, source.option(key), given, longest)
    send_proxy: ProxyVersion | None = None
    version = text("send_proxy")
    if version is not None:
        send_proxy = _checked(
            "send_proxy", parse_proxy_version, source.option("send_proxy"), version
        )
    if send_proxy is not None and forward is None:
        raise SettingError(
            "send_proxy",
            f"{source.option('send_proxy')} needs {source.option('forward')}: "
            "an echo has no backend to send the header to",
        )
    flags = {}
    for key in _FLAGS:
        given = text(key)
        if given is not None:
            flags[key] = _checked(key, parse_flag, source.option(key), given)
    instance: int | None = None
    given = text("instance")
    if given is not None:
        instance = _checked("instance", parse_count, source.option("instance"), given)
        if instance > MAX_INSTANCE:
            raise SettingError(
                "instance",
                f"{source.option('instance')} must be a number from 0 to {MAX_INSTANCE}, "
                f"not {_quoted(given)}",
            )
    name = text("name")
    if name is not None and (not name.strip() or not name.isprintable() or len(name) > 64):
        raise SettingError("name", "name must be printable text of 1 to 64 characters")
    return TunnelConfig(
        keydir=paths["keydir"] or default_keydir(),
        listen=tuple(listen),
        forward=forward,
        registry=paths["registry"],
        grace=seconds.get("grace", DEFAULT_GRACE),
        handshake_timeout=seconds.get("handshake_timeout", DEFAULT_HANDSHAKE_TIMEOUT),
        idle_timeout=seconds.get("idle_timeout") or None,
        limits=attrs.evolve(ConnectionLimits(), **limits),
        send_proxy=send_proxy,
        keep_sessions_on_revoke=flags.get("keep_sessions_on_revoke", False),
        statedir=paths["statedir"],
        instance=instance,
        name=name,
        source=source,
    )


def _checked(key: str, parse: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """
    C{parse(*args, **kwargs)}, its L{ValueError} a L{SettingError} for C{key}.
    """
    try:
        return parse(*args, **kwargs)
    except ValueError as error:
        raise SettingError(key, str(error)) from None


def parse_seconds(name: str, text: str, allow_zero: bool) -> float:
    """
    Parse a number of seconds given for C{name}.

    @raise ValueError: it is longer than L{MAX_NUMBER_LENGTH}, not a finite
        number, negative, or zero when C{allow_zero} is false (a one-line
        message naming C{name}).
    """
    value = math.nan
    if len(text) <= MAX_NUMBER_LENGTH:
        with contextlib.suppress(ValueError):
            value = float(text)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        kind = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"{name} must be {kind} number of seconds, not {_quoted(text)}")
    return value


def parse_prefix(option: str, text: str, longest: int) -> int:
    """
    Parse a network prefix length given to C{option}: a whole number from 0
    to C{longest}.

    @raise ValueError: it is not (a one-line message).
    """
    count = parse_count(option, text)
    if count > longest:
        raise ValueError(f"{option} must be at most {longest}, not {count}")
    return count


def parse_count(name: str, text: str) -> int:
    """
    Parse a whole number (a limit) given for C{name}.

    @raise ValueError: it is not a string of at most L{MAX_NUMBER_LENGTH}
        ASCII digits (a one-line message naming C{name}).
    """
    if not (len(text) <= MAX_NUMBER_LENGTH and text.isascii() and text.isdigit()):
        raise ValueError(
            f"{name} must be a whole number of at most {MAX_NUMBER_LENGTH} digits, "
            f"not {_quoted(text)}"
        )
    return int(text)


def parse_flag(name: str, text: str) -> bool:
    """
    Parse a setting that is on or off, given for C{name}: C{true} or
    C{false} (as TOML writes them).

    @raise ValueError: it is neither (a one-line message naming C{name}).
    """
    if text in ("true", "false"):
        return text == "true"
    raise ValueError(f"{name} must be true or false, not {_quoted(text)}")


def parse_proxy_version(name: str, text: str) -> ProxyVersion:
    """
    Parse the PROXY header version given for C{name}: C{v1} or C{v2}.

    @raise ValueError: it is neither (a one-line message naming C{name}).
    """
    for version in PROXY_VERSIONS:
        if text == version:
            return version
    raise ValueError(f"{name} must be v1 or v2, not {_quoted(text)}")


def _quoted(text: str) -> str:
    """
    C{text} quoted for a message, cut short if long.
    """
    return repr(text[:40]) + ("..." if len(text) > 40 else "")


# -- the file ---------------------------------------------------------------------


class ConfigFileError(ValueError):
    """
    A config file cannot be read or describes no usable tunnels; the
    message is one line and starts with C{FILE:LINE:} (or C{FILE:} when
    the problem is the whole file).
    """


# What the file's TOML values must be before they become the text the
# command line would have given (and go through the same checks).
_STRING_KEYS = ("name", "forward", *_PATHS, "send_proxy")
_NUMBER_KEYS = (*_SECONDS, *_COUNTS, "instance")


@attrs.frozen
class ProcessConfig:
    """
    What a config file describes: its tunnels, and the settings of the
    process as a whole.

    @ivar tunnels: one L{TunnelConfig} per C{[[tunnel]]} table, in order.
    @ivar metrics: the monitoring endpoint's server endpoint string, or
        L{None}.
    @ivar metrics_where: what a message about C{metrics} starts with
        (C{"FILE:LINE: "}).
    @ivar workers: how many worker processes run the tunnels, or L{None}
        (not set: one process, unless C{--workers} says otherwise).
    """

    tunnels: list[TunnelConfig]
    metrics: str | None = None
    metrics_where: str = ""
    workers: int | None = None


def read_config_file(path: str) -> list[TunnelConfig]:
    """
    The tunnels the TOML file at C{path} describes, one per C{[[tunnel]]}
    table, in order. Relative C{keydir} and C{registry} paths are taken
    from the file's directory (endpoint strings are used as written).

    @raise ConfigFileError: the file cannot be read, is not TOML, has an
        unknown key or a malformed value, or describes no tunnel.
    """
    return read_config(path).tunnels


def read_config(path: str) -> ProcessConfig:
    """
    The tunnels (as L{read_config_file}) and the process-wide settings of
    the TOML file at C{path}.

    @raise ConfigFileError: as L{read_config_file}; also for a C{metrics}
        that is not a non-empty string, or a C{workers} that is not a whole
        number from 1 to L{MAX_WORKERS}.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        raise ConfigFileError(
            f"{path}: cannot read the config file: {error.strerror or error}"
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ConfigFileError(f"{path}:{line}: not UTF-8 text (TOML files are UTF-8)") from None
    document = _decode(path, text)
    top, tables = _key_lines(text)
    for key in document:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigFileError(f"{path}:{top.get(key, 1)}: {_unknown(key, TOP_LEVEL_KEYS)}")
    tunnels = document.get("tunnel")
    if tunnels is None:
        raise ConfigFileError(f"{path}: no [[tunnel]] table: describe at least one tunnel")
    if not isinstance(tunnels, list) or not all(isinstance(t, dict) for t in tunnels):
        raise ConfigFileError(
            f"{path}:{top.get('tunnel', 1)}: 'tunnel' must be tables written [[tunnel]]"
        )
    configs = []
    names: dict[str, int] = {}
    base = os.path.dirname(os.path.abspath(path))
    for index, table in enumerate(tunnels):
        line, lines = tables[index] if index < len(tables) else (top.get("tunnel", 1), {})
        source = FileTunnel(path, index + 1, line, lines)
        config = _tunnel(table, source, base)
        if config.name is not None:
            if config.name in names:
                raise ConfigFileError(
                    f"{source.where('name')}name {config.name!r} is that of tunnel "
                    f"{names[config.name]} too"
                )
            names[config.name] = index + 1
        configs.append(config)
    if not configs:
        raise ConfigFileError(f"{path}: no [[tunnel]] table: describe at least one tunnel")
    metrics = document.get("metrics")
    where = f"{path}:{top.get('metrics', 1)}: "
    if metrics is not None and (not isinstance(metrics, str) or not metrics.strip()):
        raise ConfigFileError(
            f'{where}metrics must be a server endpoint string, e.g. "tcp:9100:interface=127.0.0.1"'
        )
    workers = document.get("workers")
    if workers is not None:
        number = isinstance(workers, int) and not isinstance(workers, bool)
        if not number or not 1 <= cast("int", workers) <= MAX_WORKERS:
            raise ConfigFileError(
                f"{path}:{top.get('workers', 1)}: workers must be a whole number from 1 to "
                f"{MAX_WORKERS}, not {workers if number else _toml_type(workers)}"
            )
    return ProcessConfig(configs, metrics, where, cast("int | None", workers))


def _decode(path: str, text: str) -> dict[str, object]:
    """
    The TOML document C{text}, or a L{ConfigFileError} with the line the
    decoder gives.
    """
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        message = str(error).splitlines()[0] if str(error) else "invalid TOML"
        line = getattr(error, "lineno", None)
        found = re.search(r" \(at line (\d+), column (\d+)\)$", message)
        if found is not None:
            line = line or int(found.group(1))
            message = f"{message[: found.start()]} (column {found.group(2)})"
        elif message.endswith(" (at end of document)"):
            line = line or text.count("\n") + (not text.endswith("\n"))
            message = message.removesuffix(" (at end of document)") + " (at the end of the file)"
        raise ConfigFileError(f"{path}:{line or 1}: invalid TOML: {message}") from None
    except ValueError:
        # Python's own bound on converting integers of thousands of digits,
        # which the decoder does not turn into a TOMLDecodeError.
        found = re.search(r"[0-9_]{4000,}", text)
        line = text.count("\n", 0, found.start()) + 1 if found is not None else 1
        raise ConfigFileError(f"{path}:{line}: a number of thousands of digits") from None


def _tunnel(table: Mapping[str, object], source: FileTunnel, base: str) -> TunnelConfig:
    """
    The tunnel of one C{[[tunnel]]} table: its TOML values checked for
    type, made the text the command line would give, and checked by
    L{tunnel_config}.
    """

    def error(key: str | None, message: str) -> ConfigFileError:
        return ConfigFileError(source.where(key) + message)

    settings: dict[str, str | list[str]] = {}
    for key, value in table.items():
        if key not in TUNNEL_KEYS:
            raise error(key, _unknown(key, TUNNEL_KEYS))
        if key == "listen":
            endpoints = [value] if isinstance(value, str) else value
            if not isinstance(endpoints, list) or not all(isinstance(e, str) for e in endpoints):
                raise error(key, "listen must be an endpoint string or a list of them")
            settings[key] = cast("list[str]", endpoints)
        elif key in _FLAGS:
            if not isinstance(value, bool):
                raise error(key, f"{key} must be true or false, not {_toml_type(value)}")
            settings[key] = "true" if value else "false"
        elif key in _STRING_KEYS:
            if not isinstance(value, str):
                raise error(key, f"{key} must be a string, not {_toml_type(value)}")
            settings[key] = value
        else:
            assert key in _NUMBER_KEYS, key
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise error(key, f"{key} must be a number, not {_toml_type(value)}")
            settings[key] = repr(value) if isinstance(value, float) else str(value)
    if "listen" not in settings:
        raise error(None, "listen is required (an endpoint string or a list of them)")
    for key in _PATHS:
        path = settings.get(key)
        if isinstance(path, str) and path.strip():
            settings[key] = os.path.join(base, os.path.expanduser(path))
    try:
        return tunnel_config(settings, source)
    except SettingError as failed:
        raise error(failed.key, str(failed)) from None


def _unknown(key: str, known: Sequence[str]) -> str:
    """
    The message for an unknown C{key}, with the known one it is closest to.
    """
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})"
    return f"unknown key {key[:40]!r}{hint}"


def _toml_type(value: object) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}
    kinds.update({list: "an array", dict: "a table"})
    return kinds.get(type(value), "a date or time")


# A key at the start of a line (bare, "basic" or 'literal'), before = or a
# dotted part; and a table header.
_KEY = re.compile(r"""\s*([A-Za-z0-9_-]+|"[^"\\]*"|'[^']*')\s*[=.]""")
_HEADER = re.compile(
    r"""\s*(\[\[?)\s*([A-Za-z0-9_-]+|"[^"\\]*"|'[^']*')"""
    r"""(?:\s*\.\s*([A-Za-z0-9_-]+|"[^"\\]*"|'[^']*'))?"""
)


def _key_lines(text: str) -> tuple[dict[str, int], list[tuple[int, dict[str, int]]]]:
    """
    Where the keys are, for messages (the TOML decoder gives values, not
    lines): the line of each top-level key, and for each C{[[tunnel]]}
    table its header's line and the line of each of its keys. Lines inside
    multi-line strings are skipped; a key not found here is reported at its
    table's header.
    """
    top: dict[str, int] = {}
    tunnels: list[tuple[int, dict[str, int]]] = []
    current: dict[str, int] | None = top
    in_string: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if in_string is not None:
            if line.count(in_string) % 2 == 1:
                in_string = None
            continue
        header = _HEADER.match(line)
        key = _KEY.match(line)
        if header is not None:
            name = header.group(2).strip("\"'")
            if header.group(1) == "[[" and name == "tunnel":
                current = {}
                tunnels.append((number, current))
            elif name == "tunnel" and header.group(3) and tunnels:
                # [tunnel.NAME]: a table in the last tunnel, at this line.
                tunnels[-1][1].setdefault(header.group(3).strip("\"'"), number)
                current = None
            else:
                # Another table: its keys are not a tunnel's; the table
                # itself, if at the top level, is an unknown key there.
                top.setdefault(name, number)
                current = None
        elif key is not None and current is not None:
            current.setdefault(key.group(1).strip("\"'"), number)
        for delimiter in ('"""', "'''"):
            if line.count(delimiter) % 2 == 1:
                in_string = delimiter
                break
    return top, tunnels
