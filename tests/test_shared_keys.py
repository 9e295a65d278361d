"""
Twisted's transports keep sharing their instance dictionaries' keys when a
tunnel opens many connections at once (L{curvetun.shared_keys}).

Each case runs a fresh process (C{tests/_shared_keys_census.py}): a class's
shared keys are the process's, and this one has made many transports.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests._process_support import child_environment

CENSUS = Path(__file__).resolve().parent / "_shared_keys_census.py"
AT_ONCE = 24


def _census(testcase: SynchronousTestCase, *options: str) -> dict[str, list[int]]:
    finished = subprocess.run(
        [sys.executable, str(CENSUS), testcase.mktemp(), str(AT_ONCE), *options],
        env=child_environment(),
        capture_output=True,
        timeout=120,
        check=False,
    )
    testcase.assertEqual(finished.returncode, 0, finished.stderr.decode(errors="replace"))
    counts: dict[str, list[int]] = json.loads(finished.stdout)
    return counts


class TransportKeySharingTests(SynchronousTestCase):
    if sys.version_info < (3, 11):
        skip = "Python 3.10 gives every instance a dictionary of its own"

    def test_no_transport_of_a_burst_of_tunnel_connections_has_a_dictionary(self) -> None:
        counts = _census(self)
        # Each tunnel connection is three TCP hops (the census's client to
        # the client end, the client end to the server end, the server end
        # to the echo), each a tcp.Client at one end and a tcp.Server at
        # the other: all in this one process.
        self.assertEqual(counts, {"tcp.Server": [3 * AT_ONCE, 0], "tcp.Client": [3 * AT_ONCE, 0]})

    def test_untaught_every_transport_of_the_burst_has_a_dictionary(self) -> None:
        counts = _census(self, "--untaught")
        self.assertEqual(
            counts,
            {"tcp.Server": [3 * AT_ONCE, 3 * AT_ONCE], "tcp.Client": [3 * AT_ONCE, 3 * AT_ONCE]},
        )
