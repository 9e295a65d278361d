"""
Project-level promises: CI runs the README's test command, on every Python
the package claims and at the lowest versions it declares; the package is
typed, type-checks and lints cleanly; the sdist holds what the tests need
and the wheel what an installation needs.
"""

from __future__ import annotations

import ast
import configparser
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from functools import cache
from importlib import metadata
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent
TEST_COMMAND = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install '.[test]'"
    " && python -m twisted.trial -j2 tests"
)
CI = ROOT / ".ci" / "run"


def setup_cfg() -> configparser.ConfigParser:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg", encoding="utf-8")
    return config


def listed(value: str) -> list[str]:
    """
    The entries of a multi-line setup.cfg value, without comments.
    """
    lines = (line.split("#", 1)[0].strip() for line in value.splitlines())
    return [line for line in lines if line]


def skip_in_the_floors_run() -> None:
    """
    Static checks judge the code against the newest dependencies' type
    stubs and a pinned ruff; at the floors older stubs can disagree about
    code that runs correctly, which says nothing about whether curvetun
    works there (the rest of the suite says that).
    """
    if os.environ.get("CURVETUN_FLOORS") == "1":
        raise SkipTest("the minimum-versions run checks behaviour, not types or lint")


def run_tool(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


class ProjectTests(SynchronousTestCase):
    def test_ci_runs_the_test_command_the_readme_gives(self) -> None:
        readme = (ROOT / "README.md").read_text()
        ci = CI.read_text()
        self.assertIn(TEST_COMMAND, readme)
        self.assertIn("\n" + TEST_COMMAND + "\n", ci)

    def test_the_package_is_marked_typed(self) -> None:
        self.assertTrue((ROOT / "curvetun" / "py.typed").exists())

    def test_twisted_and_its_plugins_have_no_init_file(self) -> None:
        # An __init__.py there would shadow Twisted's own package.
        self.assertFalse((ROOT / "twisted" / "__init__.py").exists())
        self.assertFalse((ROOT / "twisted" / "plugins" / "__init__.py").exists())


class DeclaredVersionsTests(SynchronousTestCase):
    """
    What setup.cfg claims is what CI tests.
    """

    def test_every_dependency_is_a_plain_floor(self) -> None:
        """
        CI pins each C{name>=X} to C{name==X} to test the floors, so each
        dependency is exactly one C{>=} bound on a full version.
        """
        requirements = listed(setup_cfg()["options"]["install_requires"])
        self.assertEqual(len(requirements), 6, requirements)
        for requirement in requirements:
            # An environment marker may follow (tomli, on Pythons without tomllib).
            self.assertRegex(
                requirement, r"^[A-Za-z0-9_.-]+>=\d+\.\d+\.\d+(; python_version < \"3\.\d+\")?$"
            )

    def test_ci_runs_the_suite_on_every_claimed_python(self) -> None:
        """
        The Python classifiers start at C{python_requires}, and .ci/run's
        list of interpreters is the same list.
        """
        config = setup_cfg()
        claimed = re.findall(
            r"Programming Language :: Python :: (3\.\d+)$",
            config["metadata"]["classifiers"],
            re.MULTILINE,
        )
        self.assertEqual(config["options"]["python_requires"], ">=" + claimed[0])
        minors = [int(version.split(".")[1]) for version in claimed]
        self.assertEqual(minors, list(range(minors[0], minors[-1] + 1)))
        [ci_list] = re.findall(r"^PYTHONS=\"([^\"]*)\"$", CI.read_text(), re.MULTILINE)
        self.assertEqual(ci_list.split(), claimed)

    def test_the_floors_are_installed_when_ci_says_so(self) -> None:
        """
        In CI's minimum-versions run (C{CURVETUN_FLOORS=1}), every declared
        floor is exactly the installed version: the run tests what it says.
        """
        if os.environ.get("CURVETUN_FLOORS") != "1":
            raise SkipTest("not the minimum-versions run (CURVETUN_FLOORS=1 in .ci/run)")
        for requirement in listed(setup_cfg()["options"]["install_requires"]):
            requirement, _, marker = requirement.partition(";")
            if marker and sys.version_info >= (3, 11):
                continue  # tomli: only where there is no tomllib
            name, floor = requirement.strip().split(">=")
            self.assertEqual(metadata.version(name), floor, name)


class StaticCheckTests(SynchronousTestCase):
    """
    mypy (strict, with mypy-zope) and ruff (the rules pinned in
    pyproject.toml) find nothing, in the package and in the tests.
    """

    def test_mypy_checks_the_tests_too(self) -> None:
        files = [name.strip() for name in setup_cfg()["mypy"]["files"].split(",")]
        self.assertEqual(sorted(files), ["curvetun", "tests", "twisted/plugins"])

    def test_mypy_finds_no_errors(self) -> None:
        skip_in_the_floors_run()
        if importlib.util.find_spec("mypy") is None:
            raise SkipTest("mypy is not installed (it comes with the test extra)")
        cache_dir = os.environ.get("MYPY_CACHE_DIR") or str(ROOT / "_trial_temp" / "mypy-cache")
        result = subprocess.run(
            [sys.executable, "-m", "mypy", "--no-error-summary"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={**os.environ, "MYPY_CACHE_DIR": cache_dir},
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_ruff_finds_nothing_to_fix_or_format(self) -> None:
        skip_in_the_floors_run()
        if importlib.util.find_spec("ruff") is None:
            raise SkipTest("ruff is not installed (it comes with the test extra)")
        check = run_tool("ruff", "check", "--no-cache", ".")
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)
        formatted = run_tool("ruff", "format", "--check", "--no-cache", ".")
        self.assertEqual(formatted.returncode, 0, formatted.stdout + formatted.stderr)


def imports_of_test_modules(path: Path) -> list[str]:
    """
    Every import in the module at C{path} that reads a test module
    (C{tests/test_*.py}), each as its file, line and statement.
    """
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.ImportFrom):
            package = "." * node.level + (node.module or "")
            if package in (".", "tests"):
                # from . import test_x, from tests import test_x
                modules = [alias.name for alias in node.names]
            else:
                modules = [package.removeprefix("tests.").lstrip(".")]
            names = ", ".join(alias.name for alias in node.names)
            statement = f"from {package} import {names}"
        elif isinstance(node, ast.Import):
            modules = [alias.name.removeprefix("tests.") for alias in node.names]
            statement = "import " + ", ".join(alias.name for alias in node.names)
        else:
            continue
        if any(module.startswith("test_") for module in modules):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {statement}")
    return found


class TestLayoutTests(SynchronousTestCase):
    """
    The tests share their helpers through the support modules
    (C{tests/_support.py}, C{tests/_vectors.py}), never through another
    test module: importing one runs its test classes' definitions and ties
    two specifications together.
    """

    def test_no_test_module_imports_from_another(self) -> None:
        modules = sorted((ROOT / "tests").glob("test_*.py"))
        # Never pass at zero: this module itself must have been read.
        self.assertIn(Path(__file__).resolve().with_suffix(".py"), modules)
        offending = [line for path in modules for line in imports_of_test_modules(path)]
        if offending:
            self.fail("\n".join(["imports from a test module:", *offending]))


# -- what the distributions hold ----------------------------------------------

# Never part of a distribution: caches and what building or testing leaves.
SCRATCH = re.compile(
    r"(^|/)(__pycache__|_trial_temp[^/]*|\.venv[^/]*|\.ci-venvs|build|dist|[^/]*\.egg-info"
    r"|\.mypy_cache|\.ruff_cache|\.hypothesis|\.git)(/|$)|\.py[cod]$|(^|/)dropin\.cache$"
)


def source_files() -> list[str]:
    """
    The project's files: what git tracks in a checkout, else (in an
    unpacked sdist) what is on disk.
    """
    if (ROOT / ".git").exists() and shutil.which("git"):
        tracked = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
        ).stdout.decode()
        files = [name for name in tracked.split("\0") if name and (ROOT / name).is_file()]
    else:
        files = [str(path.relative_to(ROOT)) for path in ROOT.rglob("*") if path.is_file()]
    return sorted(name for name in files if not SCRATCH.search(name))


@cache
def distributions() -> tuple[list[str], list[str]] | str:
    """
    The file lists of an sdist built from the project's files and of the
    wheel built from that sdist; or why they cannot be built here.
    """
    if importlib.util.find_spec("build") is None:
        return "the build package is not installed (it comes with the test extra)"
    with tempfile.TemporaryDirectory() as scratch:
        # Build from a copy, so that building leaves nothing in the checkout.
        tree = Path(scratch) / "tree"
        for name in source_files():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tree / name)
        out = Path(scratch) / "dist"
        offline = all(importlib.util.find_spec(m) is not None for m in ("setuptools", "wheel"))
        # With the backend at hand (the test extra brings it) no network is
        # needed; otherwise build fetches it into an isolated environment.
        isolation = ["--no-isolation"] if offline else []
        result = run_tool("build", *isolation, "--outdir", str(out), str(tree))
        if result.returncode != 0:
            if not offline:
                return "the build backend could not be fetched:\n" + result.stderr[-2000:]
            raise AssertionError(result.stdout[-3000:] + result.stderr[-3000:])
        [sdist] = out.glob("*.tar.gz")
        [wheel] = out.glob("*.whl")
        with tarfile.open(sdist) as archive:
            sdist_files = [name.split("/", 1)[1] for name in archive.getnames() if "/" in name]
        with zipfile.ZipFile(wheel) as archive:
            wheel_files = archive.namelist()
    return sdist_files, wheel_files


def built() -> tuple[list[str], list[str]]:
    lists = distributions()
    if isinstance(lists, str):
        raise SkipTest(lists)
    return lists


class DistributionTests(SynchronousTestCase):
    def test_the_sdist_holds_every_project_file(self) -> None:
        """
        Everything the tests read is in the sdist (the tests and their
        helpers and vectors, the docs and their diagram script, CI's script),
        so the suite runs from an unpacked sdist; and the license.
        """
        sdist, _ = built()
        missing = sorted(set(source_files()) - set(sdist) - {".gitignore"})
        self.assertEqual(missing, [])
        for name in (
            "LICENSE",
            "tests/__init__.py",
            "tests/_support.py",
            "tests/_vectors.py",
            "tests/vectors/handshake.json",
            "docs/make_diagrams.py",
            ".ci/run",
        ):
            self.assertIn(name, sdist)
        self.assertEqual([name for name in sdist if "dropin.cache" in name], [])

    def test_the_wheel_holds_the_license_and_the_plugin_but_no_plugin_cache(self) -> None:
        _, wheel = built()
        licenses = [
            name for name in wheel if ".dist-info/" in name and name.rsplit("/", 1)[-1] == "LICENSE"
        ]
        self.assertEqual(len(licenses), 1, wheel)
        self.assertIn("twisted/plugins/curvetun_plugins.py", wheel)
        self.assertIn("curvetun/py.typed", wheel)
        self.assertEqual([name for name in wheel if "dropin.cache" in name], [])
        self.assertEqual(
            [
                name
                for name in wheel
                if name.endswith("__init__.py") and name.startswith("twisted/")
            ],
            [],
        )
        self.assertEqual([name for name in wheel if name.startswith("tests/")], [])

    def test_the_license_is_mit_as_declared(self) -> None:
        self.assertEqual(setup_cfg()["metadata"]["license"], "MIT")
        text = (ROOT / "LICENSE").read_text()
        self.assertTrue(text.startswith("MIT License\n"), text[:40])
        self.assertIn("Copyright (c) the curvetun authors", text)
