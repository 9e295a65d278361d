"""
What every C{curvetun} command shares: the exit-status plumbing, one-line
errors, and the options base classes.

The command-line grammar is usage.Options' own: a command's options come
before its arguments (C{curvetun trust --comment TEXT ADDRESS KEY}). The
first argument ends the options, so an option written after an argument is
refused with one line that says where it belongs, rather than taken as an
argument (no curvetun argument starts with C{-}).
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from twisted.python import usage

from .. import __version__
from ..keydir import REGISTRY_FILE, default_keydir, registry_path

EXIT_OK = 0
"""The command did its work."""

EXIT_FAILED = 1
"""The command could not do its work (L{CommandFailed}, a curvetun error, an OS error)."""

EXIT_USAGE = 2
"""The command line is wrong (a L{usage.UsageError})."""


class CommandFailed(Exception):
    """
    A command could not do its work (exit status 1); the message is one
    line, for C{curvetun: error: ...}.
    """


def print_error(message: str) -> None:
    """
    Write C{curvetun: error: MESSAGE} to standard error, on one line.
    """
    # One line, always: a message that quotes user input could hold a newline.
    one_line = " ".join(message.splitlines())
    sys.stderr.write(f"curvetun: error: {one_line}\n")
    sys.stderr.flush()


def print_note(message: str) -> None:
    """
    Write C{curvetun: MESSAGE} to standard error: something to know, not
    a failure.
    """
    sys.stderr.write(f"curvetun: {message}\n")


class BaseOptions(usage.Options):
    """
    What C{curvetun}'s and each command's options share: C{--version},
    C{-h}.
    """

    def opt_version(self) -> NoReturn:
        """
        Display curvetun's version and exit.
        """
        print(f"curvetun {__version__}")
        sys.exit(0)

    opt_h = usage.Options.opt_help


def expect_arguments(args: tuple[str, ...], names: str, least: int, most: int) -> None:
    """
    Refuse a wrong number of arguments, naming the ones expected.

    @raise usage.UsageError: there are fewer than C{least} or more than
        C{most}.
    """
    if not least <= len(args) <= most:
        raise usage.UsageError(f"expected {names}, got {len(args)} argument(s)")


class CommandOptions(BaseOptions):
    """
    A command's options, followed by its arguments.

    Subclasses take their arguments in L{take_arguments}; by default a
    command takes none.
    """

    def parseArgs(self, *args: str) -> None:
        """
        Refuse an option written after an argument, then hand the arguments
        to L{take_arguments}.
        """
        for arg in args:
            if arg.startswith("-") and arg != "-":
                usage_line = self.getSynopsis().removeprefix("Usage: ")
                raise usage.UsageError(
                    f"option {arg.split('=', 1)[0]} after an argument: options come "
                    f"first ({usage_line})"
                )
        self.take_arguments(args)

    def take_arguments(self, args: tuple[str, ...]) -> None:
        """
        Check and keep the command's arguments.

        @raise usage.UsageError: they are wrong.
        """
        expect_arguments(args, "no arguments", 0, 0)


class KeydirOptions(CommandOptions):
    """
    Options of commands that use a key directory.
    """

    optParameters = [
        [
            "keydir",
            None,
            None,
            "The key directory [default: $CURVETUN_HOME, else ~/.curvetun].",
        ],
    ]

    @property
    def keydir(self) -> str:
        """
        The key directory named, or the default one.
        """
        return os.path.expanduser(str(self["keydir"] or default_keydir()))


class RegistryOptions(KeydirOptions):
    """
    Options of commands that use a registry file.
    """

    optParameters = [
        [
            "registry",
            None,
            None,
            f"The registry file [default: the file {REGISTRY_FILE!r} in the key directory].",
        ],
    ]

    @property
    def registry(self) -> str:
        """
        The registry file named, or the one in the key directory.
        """
        if self["registry"]:
            return os.path.expanduser(str(self["registry"]))
        return registry_path(self.keydir)
