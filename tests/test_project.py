"""
Project-level promises: CI runs the README's test command, the package is
typed and type-checks cleanly.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent
TEST_COMMAND = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install '.[test]'"
    " && python -m twisted.trial tests"
)


class ProjectTests(SynchronousTestCase):
    def test_ci_runs_the_test_command_the_readme_gives(self) -> None:
        readme = (ROOT / "README.md").read_text()
        ci = (ROOT / ".ci" / "run").read_text()
        self.assertIn(TEST_COMMAND, readme)
        self.assertIn("\n" + TEST_COMMAND + "\n", ci)

    def test_the_package_is_marked_typed(self) -> None:
        self.assertTrue((ROOT / "curvetun" / "py.typed").exists())

    def test_twisted_and_its_plugins_have_no_init_file(self) -> None:
        # An __init__.py there would shadow Twisted's own package.
        self.assertFalse((ROOT / "twisted" / "__init__.py").exists())
        self.assertFalse((ROOT / "twisted" / "plugins" / "__init__.py").exists())

    def test_mypy_finds_no_errors(self) -> None:
        if importlib.util.find_spec("mypy") is None:
            raise SkipTest("mypy is not installed (it comes with the test extra)")
        result = subprocess.run(
            [sys.executable, "-m", "mypy", "--no-error-summary"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={**os.environ, "MYPY_CACHE_DIR": str(ROOT / "_trial_temp" / "mypy-cache")},
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
