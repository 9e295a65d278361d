"""
Server-key rollover with overlap: C{curvetun rotate} and C{rotate
--finish} on a key directory, L{ServerKeys} and
L{CurveTunService.reload_keys} in a running server, which answers hellos
sealed to either key until the rollover is finished.
"""

from __future__ import annotations

import os
import stat

from twisted.internet import reactor
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from curvetun.errors import KeyFileError, ServerKeyMismatch
from curvetun.handshake_vault import LocalHandshakeVault
from curvetun.interfaces import IServerKeys, IVault
from curvetun.keydir import COUNTER_FILE
from curvetun.keys import fingerprint
from curvetun.server_keys import ServerKeys, finish_rotation, rotate
from curvetun.vault import COUNTER_STEP, FileVault, MemoryVault, read_public_key

from ._support import (
    CommandTestCase,
    Peers,
    admit,
    client_string,
    counter_file,
    counter_of,
    echoes,
    forget_keydir,
    listening_ports,
    make_keydir,
    read_until,
    start_twist,
)
from ._tap_support import port_of, start_tunnel

LOCALHOST = "interface=127.0.0.1"


def nonce_key(keydir: FilePath[str], previous: bool = False) -> bytes:
    name = ("previous." if previous else "") + "nonce.key"
    return bytes.fromhex(keydir.child(name).getContent().decode("ascii"))


class RotateCommandTests(CommandTestCase):
    """
    C{curvetun rotate}, C{rotate --finish} and C{pubkey --previous}.
    """

    def keydir(self) -> tuple[str, str]:
        keydir = os.path.join(self.temp_dir(), "keys")
        result = self.call("keygen", "--keydir", keydir)
        self.assertEqual(result.code, 0, result)
        return keydir, result.out.strip()

    def test_rotate_prints_a_new_key_and_keeps_the_old_one_as_previous(self) -> None:
        keydir, old = self.keydir()
        result = self.call("rotate", "--keydir", keydir)
        self.assertEqual(result.code, 0, result)
        new = result.out.strip()
        self.assertRegex(result.out, r"^[0-9a-f]{64}\n$")
        self.assertNotEqual(new, old)
        self.assertIn("rotate --finish", result.err)
        self.assertEqual(self.call("pubkey", "--keydir", keydir).out.strip(), new)
        self.assertEqual(self.call("pubkey", "--previous", "--keydir", keydir).out.strip(), old)
        # Each key has its own nonce key and its own counter.
        path = FilePath(keydir)
        self.assertNotEqual(nonce_key(path), nonce_key(path, previous=True))
        self.assertEqual(counter_file(path).getContent(), b"0\n")
        self.assertTrue(counter_file(path, previous=True).exists())
        for name in ("previous.secret.key", "previous.nonce.key"):
            self.assertEqual(stat.S_IMODE(os.stat(os.path.join(keydir, name)).st_mode), 0o600)

    def test_pubkey_previous_without_a_rollover_fails_with_one_line(self) -> None:
        keydir, _ = self.keydir()
        result = self.call("pubkey", "--previous", "--keydir", keydir)
        self.assertOneLineError(result, 1, keydir, "no previous key")

    def test_a_second_rotate_before_finish_is_refused(self) -> None:
        keydir, _ = self.keydir()
        self.assertEqual(self.call("rotate", "--keydir", keydir).code, 0)
        previous = self.call("pubkey", "--previous", "--keydir", keydir).out
        result = self.call("rotate", "--keydir", keydir)
        self.assertOneLineError(result, 1, "previous key", "rotate --finish")
        self.assertEqual(self.call("pubkey", "--previous", "--keydir", keydir).out, previous)

    def test_finish_overwrites_the_previous_secret_files_and_unlinks_them(self) -> None:
        keydir, _ = self.keydir()
        self.call("rotate", "--keydir", keydir)
        current = self.call("pubkey", "--keydir", keydir).out
        # Hard links see the bytes of the files finish removes: the
        # secrets are overwritten where they were, not only unlinked.
        links = {}
        for name in ("previous.secret.key", "previous.nonce.key"):
            link = os.path.join(self.temp_dir(), name)
            os.link(os.path.join(keydir, name), link)
            with open(link, "rb") as f:
                links[link] = f.read()
        result = self.call("rotate", "--finish", "--keydir", keydir)
        self.assertEqual(result.code, 0, result)
        self.assertIn("forgot the previous key", result.err)
        for name in ("previous.secret.key", "previous.nonce.key", "previous.public.key"):
            self.assertFalse(os.path.exists(os.path.join(keydir, name)), name)
        for link, before in links.items():
            with open(link, "rb") as f:
                after = f.read()
            self.assertEqual(len(after), len(before))
            self.assertNotEqual(after, before)
        self.assertEqual(self.call("pubkey", "--keydir", keydir).out, current)
        self.assertOneLineError(self.call("pubkey", "--previous", "--keydir", keydir), 1)

    def test_finish_without_a_rollover_fails_with_one_line(self) -> None:
        keydir, _ = self.keydir()
        self.assertOneLineError(
            self.call("rotate", "--finish", "--keydir", keydir), 1, "no previous key"
        )

    def test_rotate_without_a_key_directory_fails_with_one_line(self) -> None:
        missing = os.path.join(self.temp_dir(), "none")
        self.assertOneLineError(self.call("rotate", "--keydir", missing), 1, "keygen")


class ServerKeysTests(SynchronousTestCase):
    """
    L{ServerKeys}: the current and previous key of a directory, and what a
    reload does to them.
    """

    def setUp(self) -> None:
        self.keydir = FilePath(self.mktemp())
        FileVault.create(self.keydir).close()

    def load(self) -> ServerKeys:
        keys = ServerKeys(self.keydir)
        self.addCleanup(keys.close)
        return keys

    def test_reload_after_rotate_adds_the_new_key_and_keeps_the_live_vault_of_the_old(
        self,
    ) -> None:
        keys = self.load()
        old = keys.current
        self.assertEqual(keys.reload(), "keys unchanged")
        new_key = rotate(self.keydir)
        described = keys.reload()
        self.assertEqual(
            described,
            f"new current key {fingerprint(new_key)}..., previous {fingerprint(old.public_key)}...",
        )
        self.assertEqual(keys.current.public_key, new_key)
        self.assertEqual(keys.public_key, new_key)
        # The very vault that was running: its counter goes on in memory.
        self.assertIs(keys.previous, old)
        self.assertEqual(keys.vaults(), (keys.current, old))
        self.assertEqual(keys.reload(), "keys unchanged")

    def test_reload_after_finish_forgets_the_previous_key(self) -> None:
        old_key = read_public_key(self.keydir)
        rotate(self.keydir)
        keys = self.load()
        self.assertIsNotNone(keys.previous)
        current = keys.current
        finish_rotation(self.keydir)
        self.assertEqual(
            keys.reload(),
            f"previous key {fingerprint(old_key)}... forgotten; "
            f"current key {fingerprint(current.public_key)}...",
        )
        self.assertIsNone(keys.previous)
        self.assertEqual(keys.vaults(), (current,))

    def test_a_reload_that_cannot_use_the_directory_raises_one_line_and_keeps_the_keys(
        self,
    ) -> None:
        keys = self.load()
        before = keys.vaults()
        rotate(self.keydir)
        self.keydir.child("public.key").setContent(b"00" * 32 + b"\n")
        with self.assertRaises(KeyFileError) as cm:
            keys.reload()
        self.assertNotIn("\n", str(cm.exception))
        self.assertIn("public.key", str(cm.exception))
        self.assertEqual(keys.vaults(), before)

    def test_the_counter_of_a_key_rotated_while_in_use_is_never_reused(self) -> None:
        """
        A server keeps handing out nonces with its key after the directory
        was rotated, across a step of 2**20 (so it stores its counter), and
        then restarts: the old key, now the previous one, continues after
        every nonce it made. Counters named by position (the current
        key's file, the previous key's file) would fail this: the running
        server would store its counter in what is now the new key's file,
        and the previous key would come back with the counter it had when
        the directory was rotated.
        """
        # The counter of older versions, just short of a step: also checks
        # that it is migrated as the current key's.
        self.keydir.child(COUNTER_FILE).setContent(b"%d\n" % (COUNTER_STEP - 10))
        counter_file(self.keydir).remove()
        keys = self.load()
        old = keys.current
        old_key = nonce_key(self.keydir)
        made = [counter_of(keys.safe_nonce(), old_key) for _ in range(5)]
        rotate(self.keydir)
        # Not reloaded yet: the server goes on with the old key, across
        # the step, which stores its counter.
        made += [counter_of(old.safe_nonce(), old_key) for _ in range(20)]
        self.assertEqual(made, list(range(COUNTER_STEP - 10, COUNTER_STEP + 15)))
        keys.close()

        restarted = ServerKeys(self.keydir)
        self.addCleanup(restarted.close)
        assert restarted.previous is not None
        after = counter_of(restarted.previous.safe_nonce(), nonce_key(self.keydir, True))
        self.assertGreater(after, max(made))
        # The new key starts at its own 0: nothing of the old one's.
        self.assertEqual(counter_of(restarted.current.safe_nonce(), nonce_key(self.keydir)), 0)


class RolloverServerTests(TestCase):
    """
    A server of C{twist curvetun} rolled over while it runs: clients of
    both keys get through between rotate and finish (once the server has
    reloaded its keys), clients of the old key are refused after it.
    """

    async def test_a_real_twist_server_keeps_its_key_while_the_directory_is_rotated(
        self,
    ) -> None:
        home = os.path.abspath(self.mktemp())
        os.makedirs(home)
        server_dir, old_key = make_keydir(self)
        forget_keydir(server_dir)
        client_dir, client_key = make_keydir(self)
        admit(server_dir, client_key)
        process = start_twist(
            self, home, "--keydir", server_dir, "--listen", f"curvetun:0:{LOCALHOST}"
        )
        output = read_until(process, b"", "Listening on")
        [port] = listening_ports(output)
        self.assertEqual(await echoes(port, old_key, client_dir), b"which key?")
        rotate(server_dir)
        # Until it reloads, the running server answers with the key it has.
        self.assertEqual(await echoes(port, old_key, client_dir), b"which key?")
        new_key = read_public_key(server_dir)
        await self.assertFailure(
            connectProtocol(
                clientFromString(reactor, client_string(port, new_key, client_dir)), Protocol()
            ),
            ServerKeyMismatch,
        )

    async def test_after_rotate_and_reload_both_keys_work_and_after_finish_only_the_new(
        self,
    ) -> None:
        server_dir, old_key = make_keydir(self)
        client_dir, client_key = make_keydir(self)
        admit(server_dir, client_key)
        tunnel = start_tunnel(self, "--keydir", server_dir, "--listen", f"curvetun:0:{LOCALHOST}")
        port = port_of(tunnel)
        self.assertEqual(await echoes(port, old_key, client_dir), b"which key?")

        new_key = rotate(server_dir)
        self.assertEqual(
            tunnel.identity.reload_keys(),
            f"new current key {fingerprint(new_key)}..., previous {fingerprint(old_key)}...",
        )
        self.assertEqual(await echoes(port, new_key, client_dir), b"which key?")
        self.assertEqual(await echoes(port, old_key, client_dir), b"which key?")

        finish_rotation(server_dir)
        self.assertIn("forgotten", tunnel.identity.reload_keys())
        self.assertEqual(await echoes(port, new_key, client_dir), b"which key?")
        await self.assertFailure(
            connectProtocol(
                clientFromString(reactor, client_string(port, old_key, client_dir)), Protocol()
            ),
            ServerKeyMismatch,
        )


@implementer(IVault)
class CountingVault:
    """
    A L{MemoryVault} that counts the boxes it is asked to open.
    """

    def __init__(self) -> None:
        self._vault = MemoryVault.generate()
        self.public_key = self._vault.public_key
        self.opened = 0

    def safe_nonce(self) -> bytes:
        return self._vault.safe_nonce()

    def box(
        self, plaintext: bytes, nonce: bytes, peer_public_key: bytes, ephemeral_peer: bool = False
    ) -> bytes:
        return self._vault.box(plaintext, nonce, peer_public_key, ephemeral_peer)

    def box_open(
        self, ciphertext: bytes, nonce: bytes, peer_public_key: bytes, ephemeral_peer: bool = False
    ) -> bytes:
        self.opened += 1
        return self._vault.box_open(ciphertext, nonce, peer_public_key, ephemeral_peer)


@implementer(IServerKeys)
class TwoKeys:
    """
    Server keys in a rollover: a current and (until dropped) a previous
    vault; as an L{IVault}, the current one.
    """

    def __init__(self) -> None:
        self.current = CountingVault()
        self.previous: CountingVault | None = CountingVault()
        self.public_key = self.current.public_key

    def vaults(self) -> tuple[IVault, ...]:
        return (self.current,) if self.previous is None else (self.current, self.previous)

    def safe_nonce(self) -> bytes:
        return self.current.safe_nonce()

    def box(
        self, plaintext: bytes, nonce: bytes, peer_public_key: bytes, ephemeral_peer: bool = False
    ) -> bytes:
        return self.current.box(plaintext, nonce, peer_public_key, ephemeral_peer)

    def box_open(
        self, ciphertext: bytes, nonce: bytes, peer_public_key: bytes, ephemeral_peer: bool = False
    ) -> bytes:
        return self.current.box_open(ciphertext, nonce, peer_public_key, ephemeral_peer)


class RolloverMachineTests(SynchronousTestCase):
    """
    The server machine with two keys: which it tries, and which answers
    the rest of a connection.
    """

    def setUp(self) -> None:
        self.peers = Peers()
        self.keys = TwoKeys()
        # The server's factory asks its handshake vault at each connection,
        # which reads the key set live, as it does of a reloaded ServerKeys.
        self.peers.server_factory.handshake_vault = LocalHandshakeVault(self.keys)

    def test_a_hello_to_the_current_key_never_tries_the_previous_one(self) -> None:
        self.peers.connect(server_key=self.keys.current.public_key)
        self.assertEqual(len(self.peers.server_apps.built), 1)
        assert self.keys.previous is not None
        self.assertEqual(self.keys.previous.opened, 0)

    def test_a_hello_to_the_previous_key_is_answered_with_it_to_the_end(self) -> None:
        previous = self.keys.previous
        assert previous is not None
        opened = previous.opened
        self.peers.connect(server_key=previous.public_key)
        self.assertEqual(len(self.peers.server_apps.built), 1)
        # The hello and the vouch's inner box, both with the previous key.
        self.assertEqual(previous.opened, opened + 2)
        # Once the rollover is finished (and reloaded), a new hello to the
        # forgotten key is refused.
        self.keys.previous = None
        self.peers.connect(server_key=previous.public_key)
        self.assertEqual(len(self.peers.server_apps.built), 1)
