"""
The package's face: C{curvetun.__all__} names the public API, each name
resolves to the object its module defines, and importing the package
alone does not import the protocol stack.
"""

from __future__ import annotations

import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

import curvetun


class PublicAPITests(SynchronousTestCase):
    def test_every_exported_name_resolves(self) -> None:
        for name in curvetun.__all__:
            self.assertIsNotNone(getattr(curvetun, name), name)

    def test_the_endpoints_and_the_message_api_are_exported(self) -> None:
        from curvetun.channel import connect, listen
        from curvetun.endpoints import CurveTunClientEndpoint, CurveTunServerEndpoint

        self.assertIs(curvetun.connect, connect)
        self.assertIs(curvetun.listen, listen)
        self.assertIs(curvetun.CurveTunServerEndpoint, CurveTunServerEndpoint)
        self.assertIs(curvetun.CurveTunClientEndpoint, CurveTunClientEndpoint)

    def test_an_unknown_name_is_an_attribute_error(self) -> None:
        self.assertRaises(AttributeError, getattr, curvetun, "transport_internals")

    def test_importing_the_package_imports_no_protocol_module(self) -> None:
        code = (
            "import sys, curvetun; "
            "print(sorted(m for m in sys.modules if m.startswith('curvetun.')))"
        )
        output = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
        self.assertEqual(output.strip(), "[]")

    def test_all_lists_exactly_the_exported_names(self) -> None:
        self.assertEqual(
            sorted(curvetun.__all__),
            sorted(["__version__", *curvetun._EXPORTS]),
        )
