"""
Reading and writing curvetun's files safely: key-directory files and the
registry.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from contextlib import suppress
from typing import BinaryIO

from twisted.python.filepath import FilePath


def open_regular_file(path: str) -> BinaryIO:
    """
    Open C{path} for reading, refusing anything but a regular file (a FIFO
    or a device could block or never end).

    @raise OSError: it cannot be opened, or is not a regular file.
    """
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a
    # writer. It changes nothing for a regular file.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def write_atomically(path: FilePath[str], data: bytes, mode: int) -> None:
    """
    Replace the contents of C{path} with C{data}, so that a crash at any
    moment leaves either the old file or the new one, whole: write a
    temporary file in the same directory, fsync it, rename it over C{path},
    fsync the directory.

    @param mode: the permissions of the new file (not subject to the umask).
    @raise OSError: the file could not be written; C{path} is unchanged.
    """
    directory = path.parent().path
    # mkstemp creates with O_CREAT | O_EXCL and mode 0600, so nobody else
    # can open the file before it has its final mode.
    fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{path.basename()}.")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path.path)
    except BaseException:
        with suppress(OSError):
            os.unlink(temp)
        raise
    # The rename is durable only once the directory is.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
