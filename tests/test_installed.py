"""
The installed package, seen from outside the source tree: Twisted finds the
curvetun plugins there, and no plugin cache was shipped.

These tests check what C{pip install .} put in site-packages, so they skip
when curvetun is not installed (a source checkout used in place).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import curvetun, sys
from twisted.plugin import getPlugins
from twisted.application.service import IServiceMaker
from twisted.internet.interfaces import (
    IStreamClientEndpointStringParserWithReactor,
    IStreamServerEndpointStringParser,
)
found = [
    sum(
        1 for p in getPlugins(IStreamClientEndpointStringParserWithReactor)
        if p.prefix == "curvetun"
    ),
    sum(1 for p in getPlugins(IStreamServerEndpointStringParser) if p.prefix == "curvetun"),
    sum(1 for m in getPlugins(IServiceMaker) if m.tapname == "curvetun"),
]
print(curvetun.__file__)
print(found)
"""


# The installed parsers take endpoint= and registry=dns strings (this code
# is newer than the parsers an old install would hold).
WRAPPING_PROBE = r"""
import os, sys
from twisted.internet import reactor
from twisted.internet.endpoints import clientFromString, serverFromString
from curvetun.vault import FileVault
keydir = os.path.join(sys.argv[1], "keys")
vault = FileVault.create(keydir)
key = vault.public_key.hex()
vault.close()
server = serverFromString(reactor, f"curvetun:endpoint=unix\\:/run/ct.sock:keydir={keydir}")
print(type(server._wrapped).__name__)
print(serverFromString(reactor, f"curvetun:endpoint=haproxy\\:tcp\\:0:keydir={keydir}")._proxied)
client = clientFromString(
    reactor, f"curvetun:endpoint=unix\\:path\\=/run/ct.sock:key={key}:keydir={keydir}"
)
print(type(client._wrapped).__name__)
dns = clientFromString(
    reactor, f"curvetun:example.com:7700:registry=dns:resolver=127.0.0.1\\:53:keydir={keydir}"
)
print(type(dns).__name__)
"""


def installed_files() -> list[str]:
    try:
        files = metadata.files("curvetun")
    except metadata.PackageNotFoundError:
        raise SkipTest("curvetun is not installed (pip install .)") from None
    return [str(f) for f in files or []]


class InstalledPackageTests(SynchronousTestCase):
    def test_plugins_are_found_outside_the_source_tree(self) -> None:
        installed_files()
        with tempfile.TemporaryDirectory() as elsewhere:
            # -I: isolated mode, so neither the current directory nor
            # PYTHONPATH can put the source tree on the path.
            result = subprocess.run(
                [sys.executable, "-I", "-c", PROBE],
                check=False,
                cwd=elsewhere,
                capture_output=True,
                text=True,
                timeout=120,
            )
        self.assertEqual(result.returncode, 0, result.stderr)
        location, found = result.stdout.splitlines()
        # Installed, not the checkout's own curvetun/ (the virtual
        # environment itself may live inside the checkout).
        self.assertFalse(Path(location).resolve().is_relative_to(ROOT / "curvetun"), location)
        self.assertIn("site-packages", location)
        self.assertEqual(found, "[1, 1, 1]")

    def test_the_installed_parsers_wrap_other_endpoints(self) -> None:
        installed_files()
        with tempfile.TemporaryDirectory() as elsewhere:
            result = subprocess.run(
                [sys.executable, "-I", "-c", WRAPPING_PROBE, elsewhere],
                check=False,
                cwd=elsewhere,
                capture_output=True,
                text=True,
                timeout=120,
            )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(
            result.stdout.split(),
            ["UNIXServerEndpoint", "True", "UNIXClientEndpoint", "DNSKeyClientEndpoint"],
        )

    def test_the_plugin_module_is_installed_and_no_plugin_cache_is(self) -> None:
        files = installed_files()
        self.assertIn("twisted/plugins/curvetun_plugins.py", files)
        self.assertEqual([f for f in files if "dropin.cache" in f], [])
        self.assertNotIn("twisted/__init__.py", files)
        self.assertNotIn("twisted/plugins/__init__.py", files)
        self.assertIn("curvetun/py.typed", files)
