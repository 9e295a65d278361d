"""
The command line of C{curvetun bench} (and of C{python -m
curvetun.bench}), and the L{Settings} it asks for.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import attrs
from twisted.python import usage

from .. import __version__
from .figures import (
    FIGURES,
    FIGURES_BY_KEY,
    GROUPS,
    SCALE_FIGURES,
    SCALE_FIGURES_BY_KEY,
    SCALE_GROUPS,
    TRANSPORTS,
    TUNNEL_FIGURES,
    TUNNEL_FIGURES_BY_KEY,
    TUNNEL_GROUPS,
    TUNNELS,
    Figure,
)


@attrs.frozen
class Settings:
    """
    How much to measure.

    @ivar duration: seconds each timed measurement aims to take.
    @ivar connections: idle connections opened for the memory figure.
    @ivar tunnel: measure the tunnel comparison (C{--tunnel}); then
        C{transports} are its columns (L{TUNNELS}).
    @ivar workers: measure worker scaling (C{--workers N}) with 1 and with
        this many server workers (0: not this mode).
    @ivar clients: the client processes of the worker scaling.
    """

    runs: int
    duration: float
    connections: int
    quick: bool
    transports: tuple[str, ...]
    figures: tuple[Figure, ...]
    profile: str | None = None
    pin: str = "none"
    tunnel: bool = False
    workers: int = 0
    clients: int = 0


PINNINGS = ("none", "same", "split")
"""
Where C{--pin} puts the processes: where the system likes; client and
servers on one CPU; client on one CPU and servers on another.
"""

MAX_WORKERS = 64
"""
The most server workers C{--workers} measures (as C{twist curvetun
--workers} takes).
"""

SCALE_QUICK_DURATION = 0.3
"""
The window of C{--workers --quick}: the kernel counts CPU time in ticks
of 10 ms, and the library's quick 0.03 s would be three of them.
"""

NORMAL = {"runs": 5, "duration": 1.0, "connections": 1000}
QUICK = {"runs": 1, "duration": 0.03, "connections": 200}


def _comma_list(choices: Sequence[str], what: str, option: str) -> Callable[[str], tuple[str, ...]]:
    """
    A parser of C{--option}'s comma-separated list of C{choices}.
    """

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(name.strip() for name in text.split(",") if name.strip())
        unknown = [name for name in names if name not in choices]
        if unknown or not names:
            raise usage.UsageError(
                f"--{option}: unknown {what} {', '.join(unknown) or '(none given)'}"
                f" (choose from {','.join(choices)})"
            )
        return names

    return parse


def _positive(kind: Callable[[str], float], option: str) -> Callable[[str], float]:
    """
    A parser of C{--option}'s number (an C{int} or C{float}, by C{kind}),
    more than 0.
    """

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise usage.UsageError(f"--{option}: not a number: {text!r}") from None
        if not value > 0:
            raise usage.UsageError(f"--{option}: must be positive: {text!r}")
        return value

    return parse


def _choice(choices: Sequence[str], option: str) -> Callable[[str], str]:
    """
    A parser of C{--option}'s value, one of C{choices}.
    """

    def parse(text: str) -> str:
        if text not in choices:
            raise usage.UsageError(
                f"--{option}: invalid choice: {text!r} (choose from {', '.join(choices)})"
            )
        return text

    return parse


def _integer(option: str) -> Callable[[str], int]:
    """
    A parser of C{--option}'s whole number.
    """

    def parse(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise usage.UsageError(f"--{option}: invalid int value: {text!r}") from None

    return parse


def _workers(text: str) -> int:
    """
    The parser of C{--workers}: a whole number from 2 to L{MAX_WORKERS},
    or C{auto} for as many as this machine has usable CPUs (at least 2).
    """
    if text == "auto":
        return max(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2)
    try:
        value = int(text)
    except ValueError:
        raise usage.UsageError(f"--workers: not a number or auto: {text!r}") from None
    if not 2 <= value <= MAX_WORKERS:
        raise usage.UsageError(
            f"--workers: must be from 2 to {MAX_WORKERS} (1 worker is always measured): {text!r}"
        )
    return value


_SERVER_PARAMETERS: list[list[Any]] = [
    # The server process's options (internal: see ServerProcess.spawn), left
    # out of --help by BenchOptions.getUsage:
    #   --serve TRANSPORT   be the server process for TRANSPORT
    #   --client-key HEX    the benchmark client's curvetun public key
    #   --tls-dir DIR       where the TLS certificate and key are
    #   --keydir DIR        the curvetun server's key directory
    #   --registry FILE     the curvetun server's registry
    #   --profile-to FILE   write the server's cProfile data into FILE
    #   --cpu N             pin the server process to CPU N
    ["serve", None, None, None, _choice(TRANSPORTS, "serve")],
    ["client-key", None, None, None],
    ["tls-dir", None, None, None],
    ["keydir", None, None, None],
    ["registry", None, None, None],
    ["profile-to", None, None, None],
    ["cpu", None, None, None, _integer("cpu")],
]


class BenchOptions(usage.Options):
    """
    The command line of C{curvetun bench} (and of C{python -m
    curvetun.bench}).

    After L{parseOptions}, C{self["only"]} and C{self["transports"]} are
    tuples of names (of the tunnel comparison's, with C{--tunnel}),
    C{self["runs"]}, C{self["duration"]} and
    C{self["connections"]} are numbers or C{None} (the default for
    C{--quick} or not: see L{settings_from}).
    """

    synopsis = "Usage: curvetun bench [options]"
    longdesc = (
        "Measure curvetun beside plain TCP and TLS 1.3 (Twisted) on 127.0.0.1,"
        " server and client in separate processes; with --tunnel, twist curvetun"
        " beside spiped and stunnel; with --workers N, twist curvetun with 1 and with"
        " N worker processes under load from several client processes."
        " See docs/performance.md."
        " Exit status: 0 on success, 1 when the benchmark failed, 2 for a"
        " wrong command line."
    )

    optFlags = [
        ["quick", None, "A smoke run of a few seconds."],
        ["json", None, "Write JSON to stdout instead of the table."],
        [
            "tunnel",
            None,
            "Compare tunnels instead: twist curvetun, spiped and stunnel (when installed)"
            " and no tunnel, each end its own process, a backend behind them.",
        ],
    ]
    optParameters = [
        ["runs", None, None, "Runs per figure (default 5; --quick: 1).", _positive(int, "runs")],
        [
            "only",
            None,
            None,
            f"FIGURES: measure only these figure groups ({','.join(GROUPS)};"
            f" with --tunnel: {','.join(TUNNEL_GROUPS)}) or single figures (their JSON"
            " keys, such as pipelined_message), comma-separated (default: all).",
        ],
        [
            "transports",
            None,
            None,
            f"LIST: the transports to measure (default {','.join(TRANSPORTS)};"
            f" with --tunnel: {','.join(TUNNELS)}).",
        ],
        [
            "duration",
            None,
            None,
            "Seconds each timed measurement aims to take (default 1; --quick: 0.03,"
            " with --workers 0.3).",
            _positive(float, "duration"),
        ],
        [
            "connections",
            None,
            None,
            "Idle connections for the memory figure, opened after as many others"
            " (default 1000; --quick: 200).",
            _positive(int, "connections"),
        ],
        [
            "profile",
            None,
            None,
            "DIR: write cProfile data of the client (client.prof) and of each server"
            " (server-TRANSPORT.prof) into DIR.",
        ],
        [
            "pin",
            None,
            "none",
            "Pin the processes to CPUs: none, same (client and servers on one CPU),"
            " split (client on one, servers on another).",
            _choice(PINNINGS, "pin"),
        ],
        [
            "workers",
            None,
            None,
            "N: measure worker scaling instead: handshakes/s and bulk MB/s of twist curvetun"
            " --workers 1 and --workers N (2 to 64, or auto: one per CPU), with the server's"
            " CPU per handshake and per MB.",
            _workers,
        ],
        [
            "clients",
            None,
            None,
            "With --workers: the client processes that make the load, each with its own key"
            " directory (default: twice N).",
            _positive(int, "clients"),
        ],
        *_SERVER_PARAMETERS,
    ]

    def opt_version(self) -> NoReturn:
        """
        Display curvetun's version and exit.
        """
        print(f"curvetun {__version__}")
        sys.exit(0)

    opt_h = usage.Options.opt_help

    def parseArgs(self, *arguments: str) -> None:
        if arguments:
            raise usage.UsageError(f"unrecognized arguments: {' '.join(arguments)}")

    def postOptions(self) -> None:
        if self["workers"] is not None:
            self._check_workers()
            groups, keys = SCALE_GROUPS, SCALE_FIGURES_BY_KEY
            transports: tuple[str, ...] = ()
        elif self["clients"] is not None:
            raise usage.UsageError("--clients: goes with --workers N")
        elif self["tunnel"]:
            groups, keys, transports = TUNNEL_GROUPS, TUNNEL_FIGURES_BY_KEY, TUNNELS
            if self["profile"] is not None:
                raise usage.UsageError(
                    "--profile: profiles the library figures; profile the tunnel ends"
                    " with py-spy (see docs/performance.md)"
                )
            if self["pin"] != "none":
                raise usage.UsageError("--pin: pins the library figures' processes only")
        else:
            groups, keys, transports = GROUPS, FIGURES_BY_KEY, TRANSPORTS
        only = tuple(dict.fromkeys(groups + tuple(keys)))
        self["only"] = (
            groups
            if self["only"] is None
            else _comma_list(only, "figure group", "only")(self["only"])
        )
        self["transports"] = (
            transports
            if self["transports"] is None
            else _comma_list(transports, "transport", "transports")(self["transports"])
        )
        needs = {
            "curvetun-memory": ("client-key",),
            "tls": ("tls-dir",),
            "curvetun": ("keydir", "registry"),
        }
        for needed in needs.get(self["serve"], ()):
            if self[needed] is None:
                raise usage.UsageError(f"--serve {self['serve']} needs --{needed}")

    def _check_workers(self) -> None:
        """
        Refuse what C{--workers} does not take, each in one line.
        """
        if self["tunnel"]:
            raise usage.UsageError("--workers: measures one tunnel program, not with --tunnel")
        for option in ("transports", "connections", "profile"):
            if self[option] is not None:
                raise usage.UsageError(
                    f"--{option}: not with --workers (it measures twist curvetun only)"
                )
        if self["pin"] != "none":
            raise usage.UsageError("--pin: pins the library figures' processes only")
        if self["clients"] is not None and self["clients"] > 256:
            raise usage.UsageError(f"--clients: at most 256: {self['clients']}")

    def getUsage(self, width: int | None = None) -> str:
        # usage.Options lists every option it parses: hide the server
        # process's while it writes the help.
        hidden = {parameter[0] for parameter in _SERVER_PARAMETERS}
        everything = self.longOpt
        self.longOpt = [name for name in everything if name.rstrip("=") not in hidden]
        try:
            return super().getUsage(width)
        finally:
            self.longOpt = everything


def settings_from(options: BenchOptions) -> Settings:
    """
    The settings the parsed command line asks for.
    """
    quick = bool(options["quick"])
    tunnel = bool(options["tunnel"])
    workers = int(options["workers"] or 0)
    defaults = QUICK if quick else NORMAL
    only = options["only"]
    every = SCALE_FIGURES if workers else TUNNEL_FIGURES if tunnel else FIGURES
    columns = () if workers else TUNNELS if tunnel else TRANSPORTS
    duration = defaults["duration"]
    if workers and quick:
        duration = SCALE_QUICK_DURATION
    return Settings(
        runs=int(options["runs"] or defaults["runs"]),
        duration=float(options["duration"] or duration),
        connections=int(options["connections"] or defaults["connections"]),
        quick=quick,
        transports=tuple(t for t in columns if t in options["transports"]),
        figures=tuple(f for f in every if f.group in only or f.key in only),
        profile=options["profile"],
        pin=options["pin"],
        tunnel=tunnel,
        workers=workers,
        clients=int(options["clients"] or 2 * workers),
    )
