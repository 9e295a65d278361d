"""
Readiness notification (sd_notify) against a real UNIX datagram socket, as
a service manager listens on one.
"""

from __future__ import annotations

import os
import socket
from typing import cast

from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from curvetun import notify

from ._support import short_socket_dir


class _Manager:
    """
    A service manager's notify socket: a bound UNIX datagram socket.
    """

    def __init__(self, test: SynchronousTestCase, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        test.addCleanup(self.sock.close)
        if abstract:
            name = f"curvetun-test-{os.getpid()}-{id(self)}"
            self.sock.bind(b"\0" + name.encode())
            self.name = "@" + name
        else:
            self.name = os.path.join(short_socket_dir(test), "notify")
            self.sock.bind(self.name)
        self.sock.settimeout(5)

    def received(self) -> dict[str, str]:
        data = self.sock.recv(4096).decode()
        assert data.endswith("\n"), data
        return dict(line.split("=", 1) for line in data.splitlines())


class NotifyTests(SynchronousTestCase):
    def test_ready_sends_ready_status_and_main_pid(self) -> None:
        manager = _Manager(self)
        self.assertTrue(notify.ready("listening on 7700", {"NOTIFY_SOCKET": manager.name}))
        self.assertEqual(
            manager.received(),
            {"READY": "1", "STATUS": "listening on 7700", "MAINPID": str(os.getpid())},
        )

    def test_abstract_socket_names_start_with_at(self) -> None:
        manager = _Manager(self, abstract=True)
        self.assertTrue(notify.stopping({"NOTIFY_SOCKET": manager.name}))
        self.assertEqual(manager.received()["STOPPING"], "1")

    def test_reloading_carries_the_monotonic_time(self) -> None:
        manager = _Manager(self)
        notify.reloading({"NOTIFY_SOCKET": manager.name})
        fields = manager.received()
        self.assertEqual(fields["RELOADING"], "1")
        self.assertGreater(int(fields["MONOTONIC_USEC"]), 0)

    def test_without_notify_socket_nothing_is_sent(self) -> None:
        self.assertFalse(notify.ready("x", {}))

    def test_an_unreachable_socket_is_logged_not_raised(self) -> None:
        events: list[LogEvent] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        missing = os.path.abspath(self.mktemp())
        self.assertFalse(notify.ready("x", {"NOTIFY_SOCKET": missing}))
        self.assertEqual(len([e for e in events if "notify" in e.get("log_format", "")]), 1)

    def test_a_field_with_a_newline_is_refused(self) -> None:
        manager = _Manager(self)
        self.assertRaises(
            ValueError, notify.notify, {"STATUS": "a\nREADY=1"}, {"NOTIFY_SOCKET": manager.name}
        )
