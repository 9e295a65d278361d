"""
The C{curvetun} command: make and show keys, edit the registry, and talk
to a curvetun server from a shell.

    curvetun keygen [--keydir DIR] [--force] [--shared]
    curvetun pubkey [--keydir DIR] [--previous]
    curvetun rotate [--keydir DIR] [--finish]
    curvetun trust [--comment TEXT] [--keydir DIR] [--registry FILE] ADDRESS KEY
    curvetun untrust [--keydir DIR] [--registry FILE] ADDRESS [KEY]
    curvetun peers [--keydir DIR] [--registry FILE]
    curvetun cat [--keydir DIR] [--wait SECONDS] ENDPOINT
    curvetun status [--json] URL
    curvetun bench [options]

A command's options come before its arguments; an option after an argument
is refused (see L{curvetun.cli.base}). Exit status: 0 on success, 1 when the
command failed (an unusable key directory or registry, a refused
connection, a server that is not the one expected, a client that is not
authorized, ...), 2 when the command line is wrong. Every error is one line
on standard error: C{curvetun: error: ...}.

One module per command group: L{curvetun.cli.keys} (keygen, pubkey, rotate),
L{curvetun.cli.registry_cmds} (trust, untrust, peers), L{curvetun.cli.cat};
this one parses the command name and runs the command.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from twisted.python import usage

from ..errors import CurveTunError
from . import cat as cat_cmd
from . import keys as keys_cmds
from . import registry_cmds
from . import status as status_cmd
from .base import EXIT_FAILED, EXIT_USAGE, BaseOptions, CommandFailed, print_error

__all__ = ["main", "run"]


class BenchOptions(usage.Options):
    """
    C{curvetun bench}: its arguments go as they are to
    C{curvetun.bench.main}, which parses them (C{curvetun bench --help}).
    """

    def parseOptions(self, options: list[str] | None = None) -> None:
        self.argv = list(options or [])


def _bench(options: BenchOptions) -> int:
    from .. import bench

    status: int = bench.main(options.argv)
    return status


_COMMANDS: list[tuple[str, type[usage.Options], Callable[[Any], int], str]] = [
    (
        "keygen",
        keys_cmds.KeygenOptions,
        keys_cmds.keygen,
        "Create a key pair; print its public key.",
    ),
    (
        "pubkey",
        keys_cmds.PubkeyOptions,
        keys_cmds.pubkey,
        "Print the public key of a key directory.",
    ),
    (
        "rotate",
        keys_cmds.RotateOptions,
        keys_cmds.rotate_command,
        "Make a new server key, keeping the old one until --finish.",
    ),
    (
        "trust",
        registry_cmds.TrustOptions,
        registry_cmds.trust,
        "Add a peer's address and key to a registry.",
    ),
    (
        "untrust",
        registry_cmds.UntrustOptions,
        registry_cmds.untrust,
        "Remove a peer's entries from a registry.",
    ),
    ("peers", registry_cmds.PeersOptions, registry_cmds.peers, "List the entries of a registry."),
    (
        "cat",
        cat_cmd.CatOptions,
        cat_cmd.cat,
        "Send standard input to a server; print what it sends.",
    ),
    ("status", status_cmd.StatusOptions, status_cmd.status, "Show a running server's peers."),
    ("bench", BenchOptions, _bench, "Measure curvetun beside TCP and TLS ('bench --help')."),
]
_RUN = {name: function for name, _, function, _ in _COMMANDS}


class Options(BaseOptions):
    """
    The command line of C{curvetun}: its own options, then a command and
    that command's options and arguments.
    """

    subCommands = [[name, None, parser, text] for name, parser, _, text in _COMMANDS]
    longdesc = (
        "Run 'curvetun COMMAND --help' for a command's options, which come "
        "before its arguments. Exit status: 0 on success, 1 when the command "
        "failed, 2 for a wrong command line."
    )

    def getSynopsis(self) -> str:
        # usage.Options builds a subcommand's synopsis as ours + its name +
        # its own, and would name this program after sys.argv[0], which is
        # __main__.py under "python -m curvetun".
        if self.subCommand is None:
            return "Usage: curvetun COMMAND [options] [arguments]"
        return "Usage: curvetun"

    def postOptions(self) -> None:
        if self.subCommand is None:
            names = ", ".join(_RUN)
            raise usage.UsageError(f"no command given (commands: {names})")


def run(argv: list[str]) -> int:
    """
    Run the command line C{argv} (without the program name).

    @return: the exit status.
    """
    options = Options()
    try:
        options.parseOptions(argv)
    except usage.UsageError as error:
        command = getattr(options, "subCommand", None)
        helper = f"curvetun {command} --help" if command else "curvetun --help"
        print_error(f"{error} (see '{helper}')")
        return EXIT_USAGE
    except SystemExit as exit:
        # --help and --version print, then exit.
        return exit.code if isinstance(exit.code, int) else 0
    command = options.subCommand
    assert command is not None  # postOptions refuses a missing command
    try:
        return _RUN[command](options.subOptions)
    except usage.UsageError as error:
        print_error(f"{error} (see 'curvetun {command} --help')")
        return EXIT_USAGE
    except (CommandFailed, CurveTunError) as error:
        print_error(str(error))
        return EXIT_FAILED
    except BrokenPipeError:
        raise  # for main
    except OSError as error:
        where = f"{error.filename}: " if error.filename else ""
        print_error(f"{where}{error.strerror or error}")
        return EXIT_FAILED


def main() -> NoReturn:
    """
    The C{curvetun} console script.
    """
    try:
        status = run(sys.argv[1:])
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader of our output went away (curvetun peers | head -1):
        # nothing to report. Python would still fail to flush standard
        # output at exit, so point it at /dev/null (the signal module
        # documentation's recipe).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = EXIT_FAILED
    sys.exit(status)
