"""
L{curvetun.remote_vault.RemoteVault}'s calls, in memory: a vault process
protocol over an in-memory connection (C{iosim}) and a fake clock. Every
waiting call has its timeout without a timer of its own, and an answer
that comes after its call has failed is dropped.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.address import UNIXAddress
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from curvetun.errors import BadPacket, CurveTunError
from curvetun.handshake_vault import VaultUnavailable
from curvetun.remote_vault import RemoteVault
from curvetun.vault import MemoryVault
from curvetun.vault_process import VaultProtocol

TIMEOUT = 5.0


@implementer(IStreamClientEndpoint)
class _MemoryVaultEndpoint:
    """
    A client endpoint whose connections reach a L{VaultProtocol} in
    memory; C{pump} moves the bytes of the latest one.
    """

    def __init__(self, vault: MemoryVault) -> None:
        self._vault = vault
        self.pump: iosim.IOPump | None = None

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        server = VaultProtocol(self._vault)
        client = factory.buildProtocol(UNIXAddress("vault.sock"))
        assert client is not None
        self.pump = iosim.connect(
            server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client)
        )
        return succeed(client)

    def flush(self) -> None:
        assert self.pump is not None
        self.pump.flush()


class _FailingVault(MemoryVault):
    """
    A vault whose nonce counter cannot be stored once C{fail_nonces} is set.
    """

    fail_nonces = False

    def safe_nonce(self) -> bytes:
        if self.fail_nonces:
            raise CurveTunError("the nonce counter cannot be stored")
        return super().safe_nonce()


class RemoteVaultCallTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.failing = _FailingVault(os.urandom(32), os.urandom(32))
        self.endpoint = _MemoryVaultEndpoint(self.failing)
        self.vault = RemoteVault(self.endpoint, self.clock, timeout=TIMEOUT)
        started = Deferred.fromCoroutine(self.vault.start())
        self.endpoint.flush()
        self.successResultOf(started)
        self.server_key = MemoryVault.generate().public_key

    def ask(self) -> Deferred[tuple[bytes, bytes]]:
        return self.vault.seal_vouch(os.urandom(32), self.server_key)

    def test_the_vaults_declared_errors_keep_their_meaning(self) -> None:
        bad = self.vault.seal_vouch(os.urandom(31), self.server_key)
        self.endpoint.flush()
        self.failureResultOf(bad, BadPacket)
        self.failing.fail_nonces = True
        failed = self.ask()
        self.endpoint.flush()
        self.assertUnavailable(failed, "the vault failed: the nonce counter cannot be stored")

    def assertUnavailable(self, asking: Deferred[Any], reason: str) -> None:
        failure: Failure = self.failureResultOf(asking, VaultUnavailable)
        self.assertIn(reason, failure.getErrorMessage())

    def test_waiting_calls_share_one_timer(self) -> None:
        calls = [self.ask() for _ in range(50)]
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(TIMEOUT)
        for asking in calls:
            self.assertUnavailable(asking, "no answer within 5 seconds")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_answered_calls_leave_no_timer_behind(self) -> None:
        calls = [self.ask() for _ in range(10)]
        self.endpoint.flush()
        self.assertEqual(len({self.successResultOf(asking)[0] for asking in calls}), 10)
        self.clock.advance(TIMEOUT)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_each_call_times_out_after_its_own_timeout(self) -> None:
        first = self.ask()
        self.clock.advance(2)
        second = self.ask()
        self.clock.advance(TIMEOUT - 2 - 0.001)
        self.assertNoResult(first)
        self.clock.advance(0.001)
        self.assertUnavailable(first, "no answer within")
        self.clock.advance(2 - 0.001)
        self.assertNoResult(second)
        self.clock.advance(0.001)
        self.assertUnavailable(second, "no answer within")

    def test_a_late_answer_to_a_timed_out_call_is_dropped(self) -> None:
        late = self.ask()
        self.clock.advance(TIMEOUT)
        self.assertUnavailable(late, "no answer within")
        self.endpoint.flush()  # the answer arrives now, and is not used
        following = self.ask()
        self.endpoint.flush()
        self.successResultOf(following)

    def test_a_cancelled_call_fails_and_its_answer_is_dropped(self) -> None:
        cancelled = self.ask()
        kept = self.ask()
        cancelled.cancel()
        self.assertUnavailable(cancelled, "cancelled")
        self.endpoint.flush()
        self.successResultOf(kept)

    def test_calls_in_flight_when_the_vault_goes_away_are_asked_again(self) -> None:
        asking = [self.ask() for _ in range(3)]
        assert self.endpoint.pump is not None
        lost = self.endpoint.pump
        lost.client.connectionLost(Failure(ConnectionDone()))  # no answer came
        self.assertIsNot(self.endpoint.pump, lost)  # connected again at once
        self.endpoint.flush()  # the public key, then the three questions
        self.assertEqual(len({self.successResultOf(each)[0] for each in asking}), 3)

    def test_stopping_fails_the_waiting_calls_and_the_timer(self) -> None:
        waiting = self.ask()
        stopped = Deferred.fromCoroutine(self.vault.stop())
        self.endpoint.flush()
        self.successResultOf(stopped)
        self.assertUnavailable(waiting, "stopped")
        self.assertEqual(self.clock.getDelayedCalls(), [])
