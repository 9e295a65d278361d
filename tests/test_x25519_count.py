"""
The handshake's cost in X25519 operations: three a side, no more (and the
client's long-term one is cached across connections to the same server, as
is the server's per client key).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import nacl.bindings
from twisted.trial.unittest import SynchronousTestCase

import curvetun.handshake
import curvetun.handshake_vault
import curvetun.vault
from curvetun.admission import ConnectionLimits

from ._support import Peers


class X25519CountTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.calls: list[str] = []
        for module in (curvetun.handshake, curvetun.handshake_vault, curvetun.vault):
            for name in ("crypto_box_beforenm", "crypto_box_keypair", "crypto_scalarmult_base"):
                if hasattr(module, name):
                    self.patch(module, name, self.counting(name, getattr(nacl.bindings, name)))

    def counting(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any) -> Any:
            self.calls.append(name)
            return function(*args)

        return counted

    def handshake(self, peers: Peers) -> list[str]:
        self.calls.clear()
        peers.connect()
        self.assertEqual(len(peers.server_apps.built), len(peers.client_apps.built))
        return sorted(self.calls)

    def test_a_first_handshake_costs_six_shared_keys_and_two_key_pairs(self) -> None:
        """
        Client: (S, ECs) for hello and cookie, (ES, ECs) for vouch and
        messages, (S, Cs) for the inner vouch. Server: (EC, Ss) for hello
        and cookie, (EC, ESs) for vouch and messages, (C, Ss) for the inner
        vouch. Plus one ephemeral key pair a side.
        """
        calls = self.handshake(Peers())
        self.assertEqual(calls, ["crypto_box_beforenm"] * 6 + ["crypto_box_keypair"] * 2)

    def test_later_handshakes_reuse_the_long_term_shared_keys(self) -> None:
        peers = Peers()
        self.handshake(peers)
        calls = self.handshake(peers)
        self.assertEqual(calls, ["crypto_box_beforenm"] * 4 + ["crypto_box_keypair"] * 2)

    def test_many_handshakes_do_not_evict_the_long_term_shared_keys(self) -> None:
        peers = Peers(
            limits=ConnectionLimits(
                None, None, None, None, connections_per_network=None, handshakes_per_network=None
            )
        )
        for _ in range(curvetun.vault.SHARED_KEY_CACHE_SIZE + 10):
            peers.connect()
        calls = self.handshake(peers)
        self.assertEqual(calls.count("crypto_box_beforenm"), 4)
