"""
Server keys in DNS (C{registry=dns}), against a real twisted.names
authoritative server on 127.0.0.1 serving a zone file: no mock resolver.
"""

from __future__ import annotations

from collections.abc import Callable

from nacl.public import PrivateKey
from twisted.internet import reactor
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.trial.unittest import SynchronousTestCase, TestCase

from curvetun.channel import MessageListener, connect, listen
from curvetun.dnskeys import (
    MAX_KEYS,
    DNSKeyClientEndpoint,
    DNSServerKeys,
    NoKeyInDNS,
    parse_record,
    parse_resolver,
    record_name,
)
from curvetun.errors import ServerKeyMismatch
from curvetun.keys import format_public_key

from ._support import KeyDirs, capture_log, log_formats, serve_zone

# The server's name: the zone the test serves, and a name the system
# resolves to 127.0.0.1 for the TCP connection itself.
HOST = "localhost"

# A key no server here has (the server rolled over from it).
STALE = PrivateKey.generate().public_key.encode()
OTHER = PrivateKey.generate().public_key.encode()


def txt(key: bytes) -> bytes:
    """
    The text of a key record for C{key}.
    """
    return b"curvetun-key=" + format_public_key(key).encode("ascii")


class RecordTests(SynchronousTestCase):
    def test_the_record_name(self) -> None:
        self.assertEqual(record_name("example.com"), "_curvetun.example.com")
        self.assertEqual(record_name("example.com."), "_curvetun.example.com")

    def test_a_record_holds_one_key(self) -> None:
        text = b"curvetun-key=" + STALE.hex().encode()
        self.assertEqual(parse_record([text]), STALE)
        # A value split into several character-strings is one value.
        self.assertEqual(parse_record([text[:20], text[20:]]), STALE)

    def test_anything_else_is_malformed(self) -> None:
        for text in (
            b"",
            b"curvetun-key=" + STALE.hex()[:-2].encode(),
            b"curvetun-key=" + STALE.hex().encode() + b" ",
            b"v=spf1 -all",
            b"curvetun-key=\xff" + STALE.hex()[2:].encode(),
        ):
            self.assertIsNone(parse_record([text]), text)

    def test_a_resolver_is_an_ip_and_a_port(self) -> None:
        self.assertIsNone(parse_resolver(None))
        self.assertIsNotNone(parse_resolver("127.0.0.1:53"))
        self.assertIsNotNone(parse_resolver("[::1]:53"))
        for bad in ("127.0.0.1", "ns.example:53", "127.0.0.1:0", "127.0.0.1:dns", ":53"):
            self.assertRaises(ValueError, parse_resolver, bad)


class ParseTests(SynchronousTestCase):
    def test_a_tcp_inner_endpoints_host_is_looked_up(self) -> None:
        dirs = KeyDirs(self)
        endpoint = clientFromString(
            reactor,
            "curvetun:endpoint=tcp\\:localhost\\:7700:registry=dns"
            f":resolver=127.0.0.1\\:5353:keydir={dirs.client}",
        )
        self.assertIsInstance(endpoint, DNSKeyClientEndpoint)
        self.assertEqual(endpoint._host, "localhost")

    def test_a_unix_inner_endpoint_has_no_host_to_look_up(self) -> None:
        dirs = KeyDirs(self)
        error = self.assertRaises(
            ValueError,
            clientFromString,
            reactor,
            f"curvetun:endpoint=unix\\:path\\=/run/ct.sock:registry=dns:keydir={dirs.client}",
        )
        self.assertIn("has no host to look the server's key up by", str(error))


class LookupTests(TestCase):
    """
    L{DNSServerKeys} asks a real DNS server.
    """

    async def keys(self, records: list[bytes]) -> list[bytes]:
        self.zone = await serve_zone(self, HOST, records)
        resolver = parse_resolver(f"127.0.0.1:{self.zone.port}")
        return await DNSServerKeys(resolver).keys_for(HOST)

    async def test_the_published_key_is_found(self) -> None:
        self.assertEqual(await self.keys([txt(STALE)]), [STALE])

    async def test_two_records_give_two_keys_in_order(self) -> None:
        self.assertEqual(await self.keys([txt(STALE), txt(OTHER)]), [STALE, OTHER])

    async def test_at_most_max_keys_are_taken(self) -> None:
        many = [PrivateKey.generate().public_key.encode() for _ in range(8)]
        keys = await self.keys([txt(key) for key in many])
        self.assertEqual(keys, many[:MAX_KEYS])

    async def test_a_malformed_record_is_ignored_with_one_log_line(self) -> None:
        events = capture_log(self)
        keys = await self.keys([b"curvetun-key=nothex", txt(STALE)])
        self.assertEqual(keys, [STALE])
        malformed = [f for f in log_formats(events) if "malformed TXT record" in f]
        self.assertEqual(len(malformed), 1)

    async def test_no_record_is_a_clear_error(self) -> None:
        with self.assertRaises(NoKeyInDNS) as caught:
            await self.keys([])
        self.assertEqual(
            str(caught.exception), "no curvetun key for localhost in DNS (TXT _curvetun.localhost)"
        )

    async def test_only_malformed_records_is_no_record(self) -> None:
        with self.assertRaises(NoKeyInDNS):
            await self.keys([b"hello"])

    async def test_a_name_that_does_not_exist_is_no_record(self) -> None:
        zone = await serve_zone(self, HOST, [txt(STALE)])
        keys = DNSServerKeys(parse_resolver(f"127.0.0.1:{zone.port}"))
        with self.assertRaises(NoKeyInDNS):
            await keys.keys_for("nowhere.localhost")


class ConnectTests(TestCase):
    """
    C{curvetun:HOST:PORT:registry=dns:resolver=...}: the handshake runs with
    the key DNS publishes.
    """

    async def setup(self, records: Callable[[bytes], list[bytes]]) -> tuple[str, MessageListener]:
        """
        A server on 127.0.0.1 and a zone holding C{records(server_key)};
        the client string for them.
        """
        self.dirs = KeyDirs(self)
        listener = await listen(
            serverFromString(reactor, f"curvetun:0:interface=127.0.0.1:keydir={self.dirs.server}")
        )
        self.addCleanup(listener.close)
        assert listener.port is not None
        self.dns_port = (await serve_zone(self, HOST, records(self.dirs.server_key))).port
        port = listener.port.getHost().port  # type: ignore[attr-defined]
        description = (
            f"curvetun:{HOST}:{port}:registry=dns"
            f":resolver=127.0.0.1\\:{self.dns_port}:keydir={self.dirs.client}"
        )
        return description, listener

    async def round_trip(self, description: str, listener: MessageListener) -> bytes:
        endpoint = clientFromString(reactor, description)
        self.assertIsInstance(endpoint, DNSKeyClientEndpoint)
        channel = await connect(endpoint)
        self.addCleanup(channel.close)
        accepted = await listener.accept()
        await channel.send(b"ping")
        self.assertEqual(channel.peer_public_key, self.dirs.server_key)
        return await accepted.recv()

    async def test_the_key_is_found_and_the_handshake_completes(self) -> None:
        description, listener = await self.setup(lambda key: [txt(key)])
        self.assertEqual(await self.round_trip(description, listener), b"ping")

    async def test_a_stale_first_record_is_passed_over(self) -> None:
        description, listener = await self.setup(lambda key: [txt(STALE), txt(key)])
        resolver = parse_resolver(f"127.0.0.1:{self.dns_port}")
        # The stale key comes first: the retry is what connects.
        self.assertEqual((await DNSServerKeys(resolver).keys_for(HOST))[0], STALE)
        self.assertEqual(await self.round_trip(description, listener), b"ping")

    async def test_no_matching_key_fails_with_server_key_mismatch(self) -> None:
        description, _ = await self.setup(lambda key: [txt(STALE), txt(OTHER)])
        with self.assertRaises(ServerKeyMismatch):
            await connect(clientFromString(reactor, description))

    async def test_no_record_fails_the_connect(self) -> None:
        description, _ = await self.setup(lambda key: [])
        with self.assertRaises(NoKeyInDNS) as caught:
            await connect(clientFromString(reactor, description))
        self.assertIn("TXT _curvetun.localhost", str(caught.exception))
