"""
PROXY protocol headers for backends: the bytes of HAProxy's specification,
and what Twisted's own C{haproxy:} server endpoint reads out of them over
real TCP.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.interfaces import IAddress, IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from curvetun.proxy_header import (
    PP2_TYPE_CURVETUN_KEY,
    V2_SIGNATURE,
    client_key,
    proxy_header,
    v1_header,
    v2_header,
)

CLIENT = IPv4Address("TCP", "192.0.2.7", 40000)
TUNNEL = IPv4Address("TCP", "198.51.100.1", 7700)
KEY = bytes(range(32))


class VersionOneTests(SynchronousTestCase):
    def test_ipv4_line_names_source_then_destination(self) -> None:
        self.assertEqual(
            v1_header(CLIENT, TUNNEL), b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 7700\r\n"
        )

    def test_ipv6_line(self) -> None:
        header = v1_header(
            IPv6Address("TCP", "2001:db8::7", 40000), IPv6Address("TCP", "2001:db8::1", 7700)
        )
        self.assertEqual(header, b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 7700\r\n")

    def test_ipv4_mapped_client_is_reported_as_ipv4(self) -> None:
        header = v1_header(IPv6Address("TCP", "::ffff:192.0.2.7", 40000), TUNNEL)
        self.assertEqual(header, b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 7700\r\n")

    def test_a_client_without_ip_address_is_unknown(self) -> None:
        self.assertEqual(v1_header(UNIXAddress(b"/run/ct.sock"), TUNNEL), b"PROXY UNKNOWN\r\n")

    def test_version_one_leaves_the_key_out(self) -> None:
        self.assertEqual(proxy_header("v1", CLIENT, TUNNEL, KEY), v1_header(CLIENT, TUNNEL))


class VersionTwoTests(SynchronousTestCase):
    def test_ipv4_header_bytes(self) -> None:
        header = v2_header(CLIENT, TUNNEL)
        self.assertEqual(
            header,
            V2_SIGNATURE
            + bytes([0x21, 0x11, 0, 12])
            + bytes([192, 0, 2, 7, 198, 51, 100, 1])
            + (40000).to_bytes(2, "big")
            + (7700).to_bytes(2, "big"),
        )

    def test_the_key_travels_in_a_tlv_of_type_e0(self) -> None:
        header = v2_header(CLIENT, TUNNEL, KEY)
        self.assertEqual(header[15], 12 + 3 + 32)
        self.assertEqual(header[-35:], bytes([PP2_TYPE_CURVETUN_KEY, 0, 32]) + KEY)
        self.assertEqual(client_key(header), KEY)

    def test_ipv6_header_carries_the_key(self) -> None:
        header = v2_header(
            IPv6Address("TCP", "2001:db8::7", 40000), IPv6Address("TCP", "2001:db8::1", 7700), KEY
        )
        self.assertEqual(header[13], 0x21)
        self.assertEqual(client_key(header), KEY)

    def test_a_client_without_ip_address_still_gives_the_key(self) -> None:
        header = v2_header(UNIXAddress(b"/run/ct.sock"), TUNNEL, KEY)
        self.assertEqual(header[13], 0x00)
        self.assertEqual(client_key(header), KEY)

    def test_no_key_no_tlv(self) -> None:
        self.assertIsNone(client_key(v2_header(CLIENT, TUNNEL)))

    def test_a_key_of_the_wrong_size_is_refused(self) -> None:
        self.assertRaises(ValueError, v2_header, CLIENT, TUNNEL, b"short")

    def test_a_cut_header_is_refused_when_read(self) -> None:
        header = v2_header(CLIENT, TUNNEL, KEY)
        self.assertRaises(ValueError, client_key, header[:-1])
        self.assertRaises(ValueError, client_key, b"PROXY TCP4 ...")


class _Recorder(Protocol):
    """
    A backend protocol that reports the peer address and the first bytes
    after the header.
    """

    def __init__(self, seen: Deferred[tuple[IAddress, bytes]]) -> None:
        self.seen = seen

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.seen.callback((self.transport.getPeer(), data))
        self.transport.loseConnection()


class TwistedBackendTests(TestCase):
    """
    A backend behind Twisted's C{haproxy:} endpoint sees the tunnel's client
    as its peer.
    """

    async def _through_haproxy_endpoint(self, header: bytes) -> tuple[IAddress, bytes]:
        seen: Deferred[tuple[IAddress, bytes]] = Deferred()
        factory = Factory.forProtocol(lambda: _Recorder(seen))
        port: IListeningPort = await serverFromString(
            reactor, "haproxy:tcp:0:interface=127.0.0.1"
        ).listen(factory)
        self.addCleanup(port.stopListening)
        address = port.getHost()
        assert isinstance(address, IPv4Address)
        client = await TCP4ClientEndpoint(reactor, "127.0.0.1", address.port).connect(
            Factory.forProtocol(Protocol)
        )
        assert isinstance(client, Protocol) and client.transport is not None
        client.transport.write(header + b"payload")
        result = await seen
        client.transport.loseConnection()
        return result

    async def test_v1_header_gives_the_client_address(self) -> None:
        peer, data = await self._through_haproxy_endpoint(v1_header(CLIENT, TUNNEL))
        self.assertEqual(peer, IPv4Address("TCP", "192.0.2.7", 40000))
        self.assertEqual(data, b"payload")

    async def test_v2_header_with_key_gives_the_client_address(self) -> None:
        peer, data = await self._through_haproxy_endpoint(v2_header(CLIENT, TUNNEL, KEY))
        self.assertEqual(peer, IPv4Address("TCP", "192.0.2.7", 40000))
        self.assertEqual(data, b"payload")
