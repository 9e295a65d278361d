"""
The documentation's examples work: the C{sh} blocks of docs/usage.md run
as written, its tunnel commands are accepted by C{twist curvetun}, and its
endpoint strings parse.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.trial.unittest import SynchronousTestCase

from curvetun import tap
from curvetun.endpoints import service_pool
from curvetun.tunnel_service import build_tunnel

ROOT = Path(__file__).resolve().parent.parent
USAGE = (ROOT / "docs" / "usage.md").read_text()


def blocks(kind: str) -> list[str]:
    """
    The fenced code blocks of docs/usage.md marked C{kind}.
    """
    return re.findall(rf"```{re.escape(kind)}\n(.*?)```", USAGE, re.DOTALL)


class ScratchHome:
    """
    A scratch home directory, and a C{curvetun} command on the PATH that
    runs this checkout's code with this Python.
    """

    def __init__(self, testcase: SynchronousTestCase) -> None:
        self.home = os.path.abspath(testcase.mktemp())
        bin_dir = os.path.join(self.home, "bin")
        os.makedirs(bin_dir)
        command = os.path.join(bin_dir, "curvetun")
        with open(command, "w") as f:
            f.write(f'#!/bin/sh\nexec "{sys.executable}" -m curvetun "$@"\n')
        os.chmod(command, stat.S_IRWXU)
        self.environ = {key: value for key, value in os.environ.items() if key != "CURVETUN_HOME"}
        self.environ.update(
            HOME=self.home,
            PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),
            PYTHONPATH=str(ROOT),
        )

    def run(self, script: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["/bin/sh", "-e", "-c", script],
            env=self.environ,
            capture_output=True,
            text=True,
            timeout=120,
        )


class UsageExampleTests(SynchronousTestCase):
    def test_the_key_and_registry_commands_run_as_written(self) -> None:
        [script] = blocks("sh")
        home = ScratchHome(self)
        result = home.run(script)
        self.assertEqual(result.returncode, 0, result.stderr)
        laptop_key = (Path(home.home) / ".curvetun-laptop" / "public.key").read_text().strip()
        registry = (Path(home.home) / ".curvetun" / "registry").read_text()
        self.assertIn(f"127.0.0.1 {laptop_key}", " ".join(registry.split()))
        self.assertNotIn("10.0.0.0/8", registry)

    def test_the_tunnel_commands_are_accepted(self) -> None:
        commands = [block.strip() for block in blocks("sh-tunnel")]
        self.assertEqual(len(commands), 2)
        home = ScratchHome(self)
        # The client end names a key directory of its own: make it.
        self.assertEqual(home.run("curvetun keygen --keydir ~/.curvetun-laptop").returncode, 0)
        self.patch(os, "environ", home.environ)
        for command in commands:
            argv = [os.path.expanduser(arg) for arg in shlex.split(command)]
            self.assertEqual(argv[:2], ["twist", "curvetun"])
            options = tap.Options()
            options.parseOptions(argv[2:])
            [config] = options.tunnels
            service = build_tunnel(config, reactor)
            self.addCleanup(service.release)
            self.assertEqual(len(service.listeners), 1)

    def test_every_endpoint_string_in_the_guide_parses(self) -> None:
        home = ScratchHome(self)
        self.assertEqual(
            home.run(
                "curvetun keygen --keydir ~/.curvetun && "
                "curvetun keygen --keydir ~/.curvetun-laptop && "
                "curvetun keygen --keydir ~/etc-curvetun && "
                "curvetun trust --keydir ~/.curvetun-laptop 127.0.0.1 $(curvetun pubkey)"
            ).returncode,
            0,
        )
        self.patch(os, "environ", home.environ)
        for keydir in ("~/.curvetun", "~/.curvetun-laptop", "~/etc-curvetun"):
            self.addCleanup(_forget, keydir)
        examples = re.findall(r"`(curvetun:[^`\s]+)`", USAGE)
        self.assertGreater(len(examples), 4)
        for example in examples:
            if example.endswith("...]") or "[" in example:
                continue  # a grammar line, not an example
            example = example.replace("/etc/curvetun", os.path.join(home.home, "etc-curvetun"))
            example = example.replace("~/", home.home + "/")
            parse = serverFromString if _is_server(example) else clientFromString
            parse(reactor, example)


def _is_server(description: str) -> bool:
    first = description.split(":")[1]
    return first.isdigit() or first.startswith("port=")


def _forget(keydir: str) -> None:
    service = service_pool.forget_keydir(os.path.expanduser(keydir))
    close = getattr(service.vault if service is not None else None, "close", None)
    if close is not None:
        close()


class DiagramTests(SynchronousTestCase):
    def load_make_diagrams(self) -> Any:
        spec = importlib.util.spec_from_file_location(
            "make_diagrams", ROOT / "docs" / "make_diagrams.py"
        )
        assert spec is not None and spec.loader is not None
        make_diagrams = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(make_diagrams)
        return make_diagrams

    def test_the_state_diagrams_match_the_machines(self) -> None:
        """
        docs/*-machine.dot (and the SVGs made from them) are drawn from the
        Automat machines as they are: regenerate them if this fails.
        """
        make_diagrams = self.load_make_diagrams()
        for name, machine in make_diagrams.MACHINES.items():
            drawn = (ROOT / "docs" / f"{name}-machine.dot").read_text()
            self.assertEqual(
                drawn, make_diagrams.to_dot(f"curvetun {name} connection", machine), name
            )

    def test_the_diagrams_show_the_states_of_the_spec(self) -> None:
        for name, states in (
            ("server", ["ready", "accepting", "connected", "closed"]),
            ("client", ["ready", "initiating", "vouched", "connected", "closed"]),
        ):
            drawn = (ROOT / "docs" / f"{name}-machine.dot").read_text()
            found = re.findall(r"^\t(\w+) \[.*shape=ellipse", drawn, re.MULTILINE)
            self.assertEqual(sorted(found), sorted(states), name)

    def test_a_change_in_automats_drawing_fails_loudly(self) -> None:
        """
        The diagrams are put in order by reading Automat's output: a line
        of a shape it does not know is an error, never silently dropped.
        """
        make_diagrams = self.load_make_diagrams()

        class Changed:
            def asDigraph(self) -> Any:
                digraph = make_diagrams.ServerMachine.asDigraph()
                digraph.body.append("\tsomething -> new [style=odd]\n")
                return digraph

        self.assertRaises(ValueError, make_diagrams.to_dot, "changed", Changed())
