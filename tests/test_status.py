"""
The status document's rendering for C{curvetun status}: one block per
tunnel and per peer, ages and transfer in human units.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from curvetun.status import human_age, human_bytes, render

SERVER_KEY = "11" * 32
PEER_KEY = "ab" * 32
QUIET_PEER_KEY = "cd" * 32


def _document() -> dict[str, object]:
    return {
        "version": "0.1.0",
        "now": 1000.0,
        "tunnels": [
            {
                "name": "curvetun:7700",
                "listen": ["curvetun:7700"],
                "forward": "tcp:127.0.0.1:6379",
                "server_keys": [{"key": SERVER_KEY, "role": "current"}],
                "connections": [
                    {
                        "peer_key": QUIET_PEER_KEY,
                        "address": "10.0.0.2:40000",
                        "started": 990.0,
                        "bytes_received": 0,
                        "bytes_sent": 0,
                        "last_message": None,
                    },
                    {
                        "peer_key": PEER_KEY,
                        "address": "127.0.0.1:40312",
                        "started": 1000.0 - 3725,
                        "bytes_received": 1536,
                        "bytes_sent": 3 * 1024**3,
                        "last_message": 997.0,
                    },
                ],
            }
        ],
    }


class HumanUnitsTests(SynchronousTestCase):
    def test_bytes_below_a_kibibyte_are_counted(self) -> None:
        self.assertEqual(human_bytes(512), "512 B")

    def test_bytes_in_binary_units_with_two_decimals(self) -> None:
        self.assertEqual(human_bytes(1536), "1.50 KiB")
        self.assertEqual(human_bytes(3 * 1024**3), "3.00 GiB")

    def test_ages_give_the_two_largest_units(self) -> None:
        self.assertEqual(human_age(3), "3 seconds ago")
        self.assertEqual(human_age(3725), "1 hour, 2 minutes ago")
        self.assertEqual(human_age(86400 + 1), "1 day, 1 second ago")
        self.assertEqual(human_age(0.4), "just now")


class RenderTests(SynchronousTestCase):
    def test_a_tunnel_block_names_keys_listeners_and_forward(self) -> None:
        text = render(_document())
        tunnel = text.split("\n\n")[0]
        self.assertIn("tunnel: curvetun:7700", tunnel)
        self.assertIn(f"current key: {SERVER_KEY} (1111111111111111)", tunnel)
        self.assertIn("forwarding to: tcp:127.0.0.1:6379", tunnel)
        self.assertIn("connections: 2", tunnel)

    def test_one_block_per_peer_most_recently_active_first(self) -> None:
        blocks = render(_document()).strip().split("\n\n")
        self.assertEqual(len(blocks), 3)
        self.assertEqual(
            blocks[1].splitlines(),
            [
                "peer: abababababababab",
                f"  key: {PEER_KEY}",
                "  address: 127.0.0.1:40312",
                "  connected: 1 hour, 2 minutes ago",
                "  latest message: 3 seconds ago",
                "  transfer: 1.50 KiB received, 3.00 GiB sent",
            ],
        )
        self.assertIn("latest message: none yet", blocks[2])

    def test_a_document_of_another_shape_is_a_value_error(self) -> None:
        bad_documents: list[object] = [[], {"now": "x", "tunnels": []}, {"now": 1, "tunnels": [1]}]
        for bad in bad_documents:
            self.assertRaises(ValueError, render, bad)

    def test_a_bad_key_is_a_value_error(self) -> None:
        document = _document()
        document["tunnels"][0]["server_keys"][0]["key"] = "zz"  # type: ignore[index]
        self.assertRaises(ValueError, render, document)
