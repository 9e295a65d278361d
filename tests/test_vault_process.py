"""
The vault process, on real processes and UNIX sockets: it answers the
three handshake steps (each answer verifies with the peer's pure
handshake functions), survives bad input, keeps its nonces unique across
workers and kills, and is the only process whose memory holds the secret
key.
"""

from __future__ import annotations

import os
import signal
import stat
import time
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols import amp
from twisted.trial.unittest import SynchronousTestCase, TestCase

from curvetun import handshake
from curvetun.cookies import CookieKeys
from curvetun.errors import BadPacket
from curvetun.handshake import EphemeralKeyPair
from curvetun.handshake_vault import VaultUnavailable, client_vouch_key, client_vouch_packet
from curvetun.packets import Cookie, Hello, Vouch, parse_as
from curvetun.remote_vault import RemoteVault
from curvetun.vault import MemoryVault
from curvetun.vault_process import VaultProtocol
from curvetun.vault_protocol import (
    BAD_REQUEST,
    HELLO_REQUEST_SIZE,
    OPEN_VOUCH_REQUEST_SIZE,
    SEAL_VOUCH_REQUEST_SIZE,
    BoxReader,
    OpenHelloAndSealCookie,
    OpenVouch,
    SealVouch,
)

from ._process_support import (
    HAMMER,
    Child,
    make_keydir,
    memory_holds,
    socket_path,
    start_vault,
    stop,
    wait_for,
)
from ._support import capture_logs, counter_of, events_like


async def connect(testcase: TestCase, socket: str, timeout: float = 5.0) -> RemoteVault:
    vault = await RemoteVault.connect(
        UNIXClientEndpoint(reactor, socket), reactor, timeout=timeout, start_timeout=10.0
    )
    testcase.addCleanup(vault.stop)
    return vault


async def sleep(seconds: float) -> None:
    from twisted.internet.task import deferLater

    await deferLater(reactor, seconds, lambda: None)


class VaultStepTests(TestCase):
    """
    Each step asked of a vault process gives an answer that the peer's own
    pure handshake functions accept, and refuses what does not verify.
    """

    async def test_the_worker_learns_the_public_key_from_the_vault(self) -> None:
        keydir, public_key, _, _ = make_keydir(self)
        socket = socket_path(self)
        start_vault(self, keydir, socket)
        vault = await connect(self, socket)
        self.assertEqual(vault.public_key, public_key)

    async def test_each_step_verifies_with_the_peers_pure_functions(self) -> None:
        keydir, public_key, _, _ = make_keydir(self)
        socket = socket_path(self)
        start_vault(self, keydir, socket)
        vault = await connect(self, socket)
        cookie_key = os.urandom(32)
        cookie_keys = CookieKeys(clock=reactor, initial_key=cookie_key)

        # The vault as a server: a client made with the pure functions.
        client = MemoryVault.generate()
        ephemeral = EphemeralKeyPair.generate()
        hello, shared = handshake.client_hello(public_key, ephemeral)
        server_ephemeral = EphemeralKeyPair.generate()
        cookie = await vault.open_hello_and_seal_cookie(
            parse_as(hello, Hello), server_ephemeral, cookie_keys
        )
        server_ephemeral_key, cookie_K = handshake.client_open_cookie(
            parse_as(cookie, Cookie), shared
        )
        self.assertEqual(server_ephemeral_key, server_ephemeral.public_key)
        # K is the spec's SN || secretbox under the server's cookie key.
        self.assertEqual(cookie_K[:16], parse_as(cookie, Cookie).safe_nonce)
        self.assertEqual(
            cookie_keys.open(cookie_K), (ephemeral.public_key, server_ephemeral.secret_key)
        )
        vouch, _ = handshake.client_vouch(
            cookie_K, server_ephemeral_key, ephemeral, public_key, client
        )
        opened = handshake.server_open_vouch(parse_as(vouch, Vouch), cookie_keys)
        await vault.open_vouch(opened)

        # The vault as a client: a server made with the pure functions.
        server = MemoryVault.generate()
        server_cookies = CookieKeys(clock=reactor)
        ephemeral = EphemeralKeyPair.generate()
        hello, shared = handshake.client_hello(server.public_key, ephemeral)
        handshake.server_open_hello(parse_as(hello, Hello), server)
        cookie = handshake.server_cookie(ephemeral.public_key, server, server_cookies)
        server_ephemeral_key, cookie_K = handshake.client_open_cookie(
            parse_as(cookie, Cookie), shared
        )
        vouch_key = client_vouch_key(server_ephemeral_key, ephemeral)
        vouch_nonce, inner = await vault.seal_vouch(ephemeral.public_key, server.public_key)
        vouch, _ = client_vouch_packet(cookie_K, vouch_key, public_key, vouch_nonce, inner)
        opened = handshake.server_open_vouch(parse_as(vouch, Vouch), server_cookies)
        self.assertEqual(opened.client_key, public_key)
        handshake.server_verify_vouch(opened, server)

    async def test_a_hello_that_does_not_verify_is_a_bad_packet(self) -> None:
        keydir, public_key, _, _ = make_keydir(self)
        socket = socket_path(self)
        start_vault(self, keydir, socket)
        vault = await connect(self, socket)
        hello, _ = handshake.client_hello(public_key, EphemeralKeyPair.generate())
        tampered = parse_as(hello[:-1] + bytes([hello[-1] ^ 1]), Hello)
        with self.assertRaises(BadPacket):
            await vault.open_hello_and_seal_cookie(
                tampered, EphemeralKeyPair.generate(), CookieKeys(clock=reactor)
            )

    async def test_a_vouch_for_another_ephemeral_key_does_not_verify(self) -> None:
        keydir, public_key, _, _ = make_keydir(self)
        socket = socket_path(self)
        start_vault(self, keydir, socket)
        vault = await connect(self, socket)
        cookie_keys = CookieKeys(clock=reactor)
        server = MemoryVault.generate()
        client = MemoryVault.generate()
        ephemeral = EphemeralKeyPair.generate()
        # A vouch made for the vault's key, with another client's inner box.
        cookie = handshake.server_cookie(ephemeral.public_key, server, cookie_keys)
        hello_shared = handshake.client_hello(server.public_key, ephemeral)[1]
        es, cookie_K = handshake.client_open_cookie(parse_as(cookie, Cookie), hello_shared)
        vouch, _ = handshake.client_vouch(cookie_K, es, ephemeral, public_key, client)
        opened = handshake.server_open_vouch(parse_as(vouch, Vouch), cookie_keys)
        # The vault opens V (it is for its key), but V holds this EC, not
        # the one the cookie of another connection would carry.
        import attrs

        other = attrs.evolve(opened, client_ephemeral_key=os.urandom(32))
        with self.assertRaises(BadPacket):
            await vault.open_vouch(other)
        # And V from a key that did not make it does not open at all.
        forged = attrs.evolve(opened, client_key=MemoryVault.generate().public_key)
        with self.assertRaises(BadPacket):
            await vault.open_vouch(forged)
        await vault.open_vouch(opened)

    async def test_many_calls_wait_on_one_connection_at_once(self) -> None:
        keydir, _, _, _ = make_keydir(self)
        socket = socket_path(self)
        start_vault(self, keydir, socket)
        vault = await connect(self, socket)
        server_key = MemoryVault.generate().public_key
        calls = [vault.seal_vouch(os.urandom(32), server_key) for _ in range(200)]
        results = await DeferredList(calls, consumeErrors=True)
        self.assertEqual([ok for ok, _ in results], [True] * 200)
        self.assertEqual(len({result[0] for _, result in results}), 200)


class _Raw(Protocol):
    """
    Writes bytes that are not AMP and records whether it was closed.
    """

    def __init__(self) -> None:
        self.closed: Deferred[None] = Deferred()

    def connectionLost(self, reason: object = None) -> None:
        self.closed.callback(None)


class VaultHostileInputTests(TestCase):
    """
    Bad AMP input gives a logged line and an error answer (or, for broken
    framing, a closed connection), never a crash nor a traceback.
    """

    async def test_bad_requests_get_an_error_answer_and_one_log_line(self) -> None:
        keydir, _, _, _ = make_keydir(self)
        socket = socket_path(self)
        vault_process = start_vault(self, keydir, socket)
        client = await connectProtocol(UNIXClientEndpoint(reactor, socket), amp.AMP())
        self.addCleanup(client.transport.loseConnection)
        # Wrong sizes: the peer's data does not verify.
        with self.assertRaises(BadPacket):
            await client.callRemote(OpenVouch, request=b"x")
        # Missing arguments: the request itself is bad.
        with self.assertRaises(amp.RemoteAmpError) as missing:
            await client.callRemoteString(b"open-vouch", client_key=b"x" * 32)
        self.assertEqual(missing.exception.errorCode, BAD_REQUEST)
        # Unknown commands.
        with self.assertRaises(amp.UnhandledCommand):
            await client.callRemoteString(b"give-me-the-secret-key")
        # The same connection still answers.
        with self.assertRaises(BadPacket):
            await client.callRemote(OpenVouch, request=b"")
        await sleep(0.2)
        log = vault_process.stderr()
        self.assertIn("bad open-vouch request", log)
        self.assertNotIn("Traceback", log)
        self.assertIsNone(vault_process.process.poll())

    async def test_a_request_of_the_wrong_size_is_a_bad_packet(self) -> None:
        keydir, _, _, _ = make_keydir(self)
        socket = socket_path(self)
        vault_process = start_vault(self, keydir, socket)
        client = await connectProtocol(UNIXClientEndpoint(reactor, socket), amp.AMP())
        self.addCleanup(client.transport.loseConnection)
        sizes = {
            OpenHelloAndSealCookie: HELLO_REQUEST_SIZE,
            OpenVouch: OPEN_VOUCH_REQUEST_SIZE,
            SealVouch: SEAL_VOUCH_REQUEST_SIZE,
        }
        for command, size in sizes.items():
            for wrong in (size - 1, size + 1):
                with self.assertRaises(BadPacket):
                    await client.callRemote(command, request=b"\x09" * wrong)
        self.assertNotIn("Traceback", vault_process.stderr())

    async def test_broken_framing_closes_that_connection_only(self) -> None:
        keydir, public_key, _, _ = make_keydir(self)
        socket = socket_path(self)
        vault_process = start_vault(self, keydir, socket)
        raw = await connectProtocol(UNIXClientEndpoint(reactor, socket), _Raw())
        assert raw.transport is not None
        raw.transport.write(b"\xff\xff" + b"x" * 600)
        await raw.closed
        # An answer box to a question the vault never asked.
        raw = await connectProtocol(UNIXClientEndpoint(reactor, socket), _Raw())
        assert raw.transport is not None
        raw.transport.write(amp.AmpBox(_answer=b"1", public_key=b"x").serialize())
        await raw.closed
        vault = await connect(self, socket)
        self.assertEqual(vault.public_key, public_key)
        log = vault_process.stderr()
        self.assertIn("closing that connection", log)
        self.assertNotIn("Traceback", log)


class _BrokenVault(MemoryVault):
    """
    A vault with a defect: making a nonce raises what no step expects.
    """

    def safe_nonce(self) -> bytes:
        raise ValueError("a defect")


class VaultAnswerTests(SynchronousTestCase):
    """
    A handshake step asked as a worker asks it is answered with the very
    boxes AMP's responder gives for the same question (asked with an extra
    argument, which AMP ignores, it goes through AMP's dispatch).
    """

    def answer(self, vault: MemoryVault, box: dict[bytes, bytes]) -> amp.AmpBox:
        protocol = VaultProtocol(vault)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(amp.AmpBox(box).serialize())
        boxes: list[amp.AmpBox] = amp.parseString(transport.value())
        self.assertEqual(len(boxes), 1)
        return boxes[0]

    def both_ways(self, vault: MemoryVault, command: bytes, request: bytes) -> list[amp.AmpBox]:
        box = {amp.COMMAND: command, amp.ASK: b"7", b"request": request}
        return [self.answer(vault, box), self.answer(vault, {**box, b"extra": b""})]

    def test_an_answer_has_the_responders_keys(self) -> None:
        request = os.urandom(32) + MemoryVault.generate().public_key
        fast, slow = self.both_ways(MemoryVault.generate(), SealVouch.commandName, request)
        self.assertEqual(sorted(fast), sorted(slow))
        self.assertEqual(len(fast[b"vouch"]), 64)

    def test_a_bad_packet_is_the_responders_error(self) -> None:
        fast, slow = self.both_ways(MemoryVault.generate(), OpenVouch.commandName, b"x")
        self.assertEqual(fast, slow)
        self.assertEqual(fast[amp.ERROR_CODE], b"BAD_PACKET")

    def test_a_defect_is_a_bad_request_and_one_log_line(self) -> None:
        events = capture_logs(self)
        vault = _BrokenVault.generate()
        request = os.urandom(32) + MemoryVault.generate().public_key
        fast, slow = self.both_ways(vault, SealVouch.commandName, request)
        self.assertEqual(fast, slow)
        self.assertEqual(fast[amp.ERROR_CODE], BAD_REQUEST)
        self.assertEqual(len(events_like(events, "Vault: bad {command} request")), 2)
        self.assertNotIn("Traceback", repr(events))


class _Boxes(BoxReader):
    def __init__(self) -> None:
        super().__init__()
        self.boxes: list[amp.AmpBox] = []

    def ampBoxReceived(self, box: amp.AmpBox) -> None:
        self.boxes.append(box)


class BoxReaderTests(SynchronousTestCase):
    """
    L{BoxReader} reads AMP's framing as AMP does, however the bytes are split.
    """

    def test_boxes_split_anywhere_are_read_whole(self) -> None:
        boxes = [
            amp.AmpBox({b"_command": b"seal-vouch", b"_ask": b"1", b"request": b"x" * 64}),
            amp.AmpBox({b"_answer": b"1", b"vouch": b""}),
            amp.AmpBox({b"k" * 255: b"v" * 300}),
        ]
        stream = b"".join(box.serialize() for box in boxes)
        for split in range(len(stream) + 1):
            for second in (split, (split + len(stream)) // 2):
                reader = _Boxes()
                reader.makeConnection(StringTransport())
                reader.dataReceived(stream[:split])
                reader.dataReceived(stream[split:second])
                reader.dataReceived(stream[second:])
                self.assertEqual(reader.boxes, boxes)

    def test_a_key_longer_than_amp_allows_closes_the_connection(self) -> None:
        reader = _Boxes()
        transport = StringTransport()
        reader.makeConnection(transport)
        reader.dataReceived(amp.AmpBox({b"a": b"b"}).serialize() + b"\x01\x00" + b"k" * 256)
        self.assertTrue(transport.disconnecting)
        reader.dataReceived(amp.AmpBox({b"c": b"d"}).serialize())
        self.assertEqual(reader.boxes, [amp.AmpBox({b"a": b"b"})])


class VaultAvailabilityTests(TestCase):
    """
    A worker's calls wait for, time out on, and reconnect to the vault; a
    vault that does not answer fails the handshake cleanly.
    """

    async def test_no_vault_at_start_is_a_clean_failure(self) -> None:
        socket = socket_path(self)
        with self.assertRaises(VaultUnavailable):
            await RemoteVault.connect(
                UNIXClientEndpoint(reactor, socket), reactor, start_timeout=0.3
            )

    async def test_a_vault_that_does_not_answer_times_out(self) -> None:
        keydir, _, _, _ = make_keydir(self)
        socket = socket_path(self)
        vault_process = start_vault(self, keydir, socket)
        vault = await connect(self, socket, timeout=0.3)
        vault_process.signal(signal.SIGSTOP)
        self.addCleanup(vault_process.signal, signal.SIGCONT)
        started = time.monotonic()
        with self.assertRaises(VaultUnavailable):
            await vault.seal_vouch(os.urandom(32), MemoryVault.generate().public_key)
        self.assertLess(time.monotonic() - started, 2.0)
        vault_process.signal(signal.SIGCONT)
        # The late answer to the timed-out call is dropped; the next one works.
        await vault.seal_vouch(os.urandom(32), MemoryVault.generate().public_key)

    async def test_calls_reconnect_after_the_vault_restarts(self) -> None:
        keydir, _, _, _ = make_keydir(self)
        socket = socket_path(self)
        vault_process = start_vault(self, keydir, socket)
        vault = await connect(self, socket)
        server_key = MemoryVault.generate().public_key
        await vault.seal_vouch(os.urandom(32), server_key)
        vault_process.signal(signal.SIGKILL)
        vault_process.wait()
        start_vault(self, keydir, socket)
        await vault.seal_vouch(os.urandom(32), server_key)

    async def test_a_restarted_vault_with_another_key_is_refused(self) -> None:
        keydir, _, _, _ = make_keydir(self)
        other_keydir, _, _, _ = make_keydir(self)
        socket = socket_path(self)
        vault_process = start_vault(self, keydir, socket)
        vault = await connect(self, socket, timeout=1.0)
        stop(vault_process)
        start_vault(self, other_keydir, socket)
        with self.assertRaises(VaultUnavailable):
            await vault.seal_vouch(os.urandom(32), MemoryVault.generate().public_key)


class VaultProcessStartTests(SynchronousTestCase):
    """
    The socket is the owner's alone; a vault that cannot start exits with
    one line and a status.
    """

    def test_the_socket_is_private(self) -> None:
        keydir, _, _, _ = make_keydir(self)
        socket = socket_path(self)
        os.rmdir(os.path.dirname(socket))
        vault = start_vault(self, keydir, socket)
        self.assertEqual(stat.S_IMODE(os.stat(socket).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(socket)).st_mode), 0o700)
        self.assertEqual(stop(vault), 0)

    def test_an_open_socket_directory_is_refused(self) -> None:
        keydir, _, _, _ = make_keydir(self)
        socket = socket_path(self)
        os.chmod(os.path.dirname(socket), 0o755)
        vault = Child(
            self, ["-m", "curvetun.vault_process", "--keydir", keydir, "--socket", socket], "v"
        )
        self.assertEqual(vault.wait(), 78)
        self.assertEqual(len(vault.stderr().splitlines()), 1, vault.stderr())
        self.assertIn("chmod 700", vault.stderr())

    def test_a_key_directory_in_use_is_refused(self) -> None:
        keydir, _, _, _ = make_keydir(self)
        start_vault(self, keydir, socket_path(self))
        second = Child(
            self,
            ["-m", "curvetun.vault_process", "--keydir", keydir, "--socket", socket_path(self)],
            "second",
        )
        self.assertEqual(second.wait(), 78)
        self.assertIn("in use by another curvetun process", second.stderr())
        self.assertNotIn("Traceback", second.stderr())


def hammer(
    testcase: SynchronousTestCase, socket: str, mode: str, count: int, go: str | None = None
) -> Child:
    """
    Start C{tests/_vault_hammer.py}; with C{go}, it waits until that path
    exists before it asks anything (see L{start_together}).
    """
    environ = {"CURVETUN_HAMMER_GO": go} if go is not None else None
    return Child(testcase, [str(HAMMER), socket, mode, str(count)], f"hammer-{mode}", environ)


def start_together(testcase: SynchronousTestCase, socket: str, count: int) -> list[Child]:
    """
    Two nonce hammers, each connected to the vault before either asks: so
    that they ask at the same time however long each took to start.
    """
    go = os.path.abspath(testcase.mktemp())
    workers = [hammer(testcase, socket, "nonces", count, go) for _ in range(2)]
    wait_for(
        lambda: all("connected" in w.stderr() or w.process.poll() is not None for w in workers)
    )
    Path(go).touch()
    return workers


def counters(output: bytes, nonce_key: bytes) -> list[int]:
    return [
        counter_of(bytes.fromhex(line.decode("ascii")), nonce_key)
        for line in output.split(b"\n")
        if len(line) == 32
    ]


class VaultNonceTests(SynchronousTestCase):
    """
    Workers never get the same safe nonce: not two at once, and not after
    the vault is killed and restarted under them.
    """

    def test_two_workers_never_get_the_same_nonce(self) -> None:
        keydir, _, _, nonce_key = make_keydir(self)
        socket = socket_path(self)
        start_vault(self, keydir, socket)
        workers = start_together(self, socket, 3000)
        for worker in workers:
            self.assertEqual(worker.wait(60), 0, worker.stderr())
        each = [counters(worker.stdout(), nonce_key) for worker in workers]
        self.assertEqual([len(c) for c in each], [3000, 3000])
        every = each[0] + each[1]
        self.assertEqual(len(set(every)), len(every))
        # They did hammer at the same time: their counters interleave.
        self.assertLess(min(each[1]), max(each[0]))
        self.assertLess(min(each[0]), max(each[1]))

    def test_no_nonce_repeats_when_the_vault_is_killed_and_restarted(self) -> None:
        keydir, _, _, nonce_key = make_keydir(self)
        socket = socket_path(self)
        vault = start_vault(self, keydir, socket)
        workers = start_together(self, socket, 6000)
        kills = 0
        for _ in range(3):
            # Kill while both workers are asking: wait for fresh nonces.
            wanted = sum(len(worker.stdout()) for worker in workers) + 33 * 200
            wait_for(lambda wanted=wanted: sum(len(w.stdout()) for w in workers) > wanted)
            vault.signal(signal.SIGKILL)
            vault.wait()
            kills += 1
            vault = start_vault(self, keydir, socket)
        for worker in workers:
            self.assertEqual(worker.wait(120), 0, worker.stderr())
        each = [counters(worker.stdout(), nonce_key) for worker in workers]
        every = each[0] + each[1]
        self.assertEqual(len(every), 12000)
        self.assertEqual(len(set(every)), len(every), f"a counter repeated after {kills} kills")
        # Every restart jumped ahead: the nonces came from four vault lives.
        lives = {c >> 21 for c in every}
        self.assertGreaterEqual(len(lives), 4, sorted(lives))


class SecretKeyPlacementTests(SynchronousTestCase):
    """
    The secret key is in the vault process's memory and never in a
    worker's, even after the worker served handshakes through the vault.
    """

    def test_the_secret_key_is_in_the_vault_process_only(self) -> None:
        if os.geteuid() != 0:
            self.skipTest("reading another process's memory needs root")
        keydir, _, secret, _ = make_keydir(self)
        socket = socket_path(self)
        vault = start_vault(self, keydir, socket)
        worker = hammer(self, socket, "handshakes", 20)
        wait_for(lambda: b"ready" in worker.stdout() or worker.process.poll() is not None)
        self.assertIsNone(worker.process.poll(), worker.stderr())
        # The search can fail: it finds the key where it is.
        self.assertTrue(memory_holds(vault.pid, secret))
        self.assertFalse(memory_holds(worker.pid, secret))
        self.assertFalse(memory_holds(worker.pid, secret.hex().encode("ascii")))
        self.assertFalse(_opened_keydir(worker.pid, keydir))


def _opened_keydir(pid: int, keydir: str) -> bool:
    """
    Does process C{pid} have a file of C{keydir} open?
    """
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(keydir):
            return True
    return False
