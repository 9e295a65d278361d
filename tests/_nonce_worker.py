"""
Hand out safe nonces from a key directory until killed (for
C{tests/test_crash_safety.py}).

    python tests/_nonce_worker.py KEYDIR [INSTANCE]

Loads the L{curvetun.vault.FileVault} of KEYDIR and, in a loop, makes a
safe nonce and writes it to standard output as 32 hex digits and a newline,
with one C{write} system call per nonce and no buffering, so that every
nonce written before the process dies is in the output. It writes nothing
else: the parent unscrambles each nonce with the key directory's nonce key
itself, rather than trust a counter this process would print.

With INSTANCE, the vault is that instance of a key directory copied to
several hosts (C{FileVault(KEYDIR, instance=INSTANCE)}).

If the key directory does not load, it writes the error (one line) to
standard error and exits with status 2.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    from curvetun.errors import KeyFileError
    from curvetun.vault import FileVault

    try:
        instance = int(argv[2]) if len(argv) > 2 else None
        vault = FileVault(argv[1], instance=instance)
    except KeyFileError as error:
        sys.stderr.write(f"{error}\n")
        return 2
    out = sys.stdout.fileno()
    while True:
        os.write(out, vault.safe_nonce().hex().encode("ascii") + b"\n")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
