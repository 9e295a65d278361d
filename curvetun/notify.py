"""
Readiness and status for a service manager, by the C{sd_notify} protocol:
one datagram of C{KEY=VALUE} lines to the UNIX socket named by
C{$NOTIFY_SOCKET} (systemd's C{Type=notify}; also understood by s6 and
supervisors that speak it). Without C{$NOTIFY_SOCKET} every call does
nothing, so the same program runs under any manager.

A name that starts with C{@} is in Linux's abstract namespace (C{@} stands
for the leading NUL byte), as systemd documents.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

from twisted.logger import Logger

log = Logger()


def _socket_address(name: str) -> str | bytes:
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name


def notify(fields: Mapping[str, str], environ: Mapping[str, str] | None = None) -> bool:
    """
    Send C{fields} (C{{"READY": "1", "STATUS": "..."}}) to the service
    manager.

    @param environ: where to find C{NOTIFY_SOCKET} (L{os.environ} when
        L{None}).
    @return: whether a datagram was sent. A missing C{NOTIFY_SOCKET} is no
        error; a socket that cannot be reached is logged once per call and
        not raised: readiness is advice, never a reason to stop serving.
    """
    name = (os.environ if environ is None else environ).get("NOTIFY_SOCKET")
    if not name:
        return False
    for key, value in fields.items():
        if "\n" in value or "=" in key or "\n" in key:
            raise ValueError(f"a notify field cannot hold a newline: {key!r}")
    message = "".join(f"{key}={value}\n" for key, value in fields.items()).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, _socket_address(name))
    except OSError as error:
        log.warn(
            "curvetun could not notify the service manager at {socket}: {error}",
            socket=name,
            error=error.strerror or str(error),
        )
        return False
    return True


def ready(status: str, environ: Mapping[str, str] | None = None) -> bool:
    """
    Tell the manager the service is ready (every listener is up).
    """
    return notify({"READY": "1", "STATUS": status, "MAINPID": str(os.getpid())}, environ)


def reloading(environ: Mapping[str, str] | None = None) -> bool:
    """
    Tell the manager a reload has begun (C{Type=notify-reload} wants the
    monotonic time with it); send L{ready} when it is done.
    """
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify({"RELOADING": "1", "MONOTONIC_USEC": str(usec)}, environ)


def stopping(environ: Mapping[str, str] | None = None) -> bool:
    """
    Tell the manager the service is stopping (draining its connections).
    """
    return notify({"STOPPING": "1", "STATUS": "draining connections"}, environ)
