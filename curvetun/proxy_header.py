"""
PROXY protocol headers (HAProxy's specification, versions 1 and 2) that a
tunnel writes at the start of each backend connection, so that the backend
learns who connected to the tunnel.

Version 2 also carries the client's authenticated long-term public key, in
a TLV of type C{0xE0} (C{PP2_TYPE_CURVETUN_KEY}, the first of the range the
specification keeps for applications, C{PP2_TYPE_MIN_CUSTOM}):

    type   0xE0
    length 0x00 0x20
    value  the client's 32-byte Curve25519 public key, raw

A backend that reads the header with Twisted's C{haproxy:} endpoint gets the
client's address from C{transport.getPeer()}; L{client_key} reads the key
out of a whole version 2 header.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Literal

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
"""
The twelve bytes every version 2 header starts with.
"""

PP2_TYPE_CURVETUN_KEY = 0xE0
"""
The TLV type that carries the client's authenticated public key.
"""

_V2_PROXY = 0x21  # version 2, command PROXY
_AF_UNSPEC = 0x00
_TCP_OVER_IPV4 = 0x11
_TCP_OVER_IPV6 = 0x21
_HEAD = struct.Struct("!12sBBH")
_TLV_HEAD = struct.Struct("!BH")

ProxyVersion = Literal["v1", "v2"]
"""
The header versions a tunnel can send.
"""


def _ip_pair(
    source: IAddress, destination: IAddress
) -> (
    tuple[ipaddress.IPv4Address, int, ipaddress.IPv4Address, int]
    | tuple[ipaddress.IPv6Address, int, ipaddress.IPv6Address, int]
    | None
):
    """
    Source and destination as IP addresses of one family, with their ports;
    L{None} when either is not an IP address (a UNIX socket) or the families
    differ.
    """
    if not isinstance(source, (IPv4Address, IPv6Address)) or not isinstance(
        destination, (IPv4Address, IPv6Address)
    ):
        return None
    # Twisted reports IPv6 addresses with a scope ("fe80::1%eth0"): the
    # header has no room for it.
    src = ipaddress.ip_address(source.host.split("%", 1)[0])
    dst = ipaddress.ip_address(destination.host.split("%", 1)[0])
    if isinstance(src, ipaddress.IPv6Address) and src.ipv4_mapped is not None:
        src = src.ipv4_mapped
    if isinstance(dst, ipaddress.IPv6Address) and dst.ipv4_mapped is not None:
        dst = dst.ipv4_mapped
    if isinstance(src, ipaddress.IPv4Address) and isinstance(dst, ipaddress.IPv4Address):
        return src, source.port, dst, destination.port
    if isinstance(src, ipaddress.IPv6Address) and isinstance(dst, ipaddress.IPv6Address):
        return src, source.port, dst, destination.port
    if isinstance(src, ipaddress.IPv4Address) and isinstance(dst, ipaddress.IPv6Address):
        # A dual-stack listener: give the source in the destination's family.
        return ipaddress.IPv6Address(f"::ffff:{src}"), source.port, dst, destination.port
    assert isinstance(src, ipaddress.IPv6Address) and isinstance(dst, ipaddress.IPv4Address)
    return src, source.port, ipaddress.IPv6Address(f"::ffff:{dst}"), destination.port


def v1_header(source: IAddress, destination: IAddress) -> bytes:
    """
    A version 1 (text) header: C{PROXY TCP4 SRC DST SPORT DPORT\\r\\n}, or
    C{PROXY UNKNOWN\\r\\n} when the client has no IP address.

    @param source: the client's address, as the tunnel saw it.
    @param destination: the tunnel's own address on that connection.
    """
    pair = _ip_pair(source, destination)
    if pair is None:
        return b"PROXY UNKNOWN\r\n"
    src, sport, dst, dport = pair
    family = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {family} {src} {dst} {sport} {dport}\r\n".encode("ascii")


def v2_header(source: IAddress, destination: IAddress, client_key: bytes | None = None) -> bytes:
    """
    A version 2 (binary) header with command PROXY, and the client's public
    key as a C{0xE0} TLV when it is given. A client without an IP address
    gives family C{AF_UNSPEC}: the backend then ignores the addresses (as
    the specification says) but still gets the key.

    @param source: the client's address, as the tunnel saw it.
    @param destination: the tunnel's own address on that connection.
    @param client_key: the client's authenticated 32-byte public key.
    """
    pair = _ip_pair(source, destination)
    if pair is None:
        family, addresses = _AF_UNSPEC, b""
    else:
        src, sport, dst, dport = pair
        family = _TCP_OVER_IPV4 if src.version == 4 else _TCP_OVER_IPV6
        addresses = src.packed + dst.packed + struct.pack("!HH", sport, dport)
    tlvs = b""
    if client_key is not None:
        if len(client_key) != 32:
            raise ValueError(f"a public key is 32 bytes, not {len(client_key)}")
        tlvs = _TLV_HEAD.pack(PP2_TYPE_CURVETUN_KEY, len(client_key)) + client_key
    body = addresses + tlvs
    return _HEAD.pack(V2_SIGNATURE, _V2_PROXY, family, len(body)) + body


def proxy_header(
    version: ProxyVersion, source: IAddress, destination: IAddress, client_key: bytes | None
) -> bytes:
    """
    The header of C{version} for a backend connection (version 1 has no
    room for the key and leaves it out).
    """
    if version == "v1":
        return v1_header(source, destination)
    return v2_header(source, destination, client_key)


def client_key(header: bytes) -> bytes | None:
    """
    The client's public key from a whole version 2 header (as a backend
    reads it), or L{None} when it carries none.

    @raise ValueError: C{header} is not a whole, well-formed version 2
        header.
    """
    if len(header) < _HEAD.size:
        raise ValueError("too short for a PROXY v2 header")
    signature, version_command, family, length = _HEAD.unpack_from(header)
    if signature != V2_SIGNATURE or version_command >> 4 != 2:
        raise ValueError("not a PROXY v2 header")
    body = header[_HEAD.size : _HEAD.size + length]
    if len(body) != length:
        raise ValueError("the PROXY v2 header is cut short")
    offset = {_TCP_OVER_IPV4: 12, _TCP_OVER_IPV6: 36}.get(family, 0)
    if family == 0x31:  # UNIX stream: two 108-byte paths
        offset = 216
    while offset < length:
        if offset + _TLV_HEAD.size > length:
            raise ValueError("a TLV of the PROXY v2 header is cut short")
        kind, size = _TLV_HEAD.unpack_from(body, offset)
        offset += _TLV_HEAD.size
        value = body[offset : offset + size]
        if len(value) != size:
            raise ValueError("a TLV of the PROXY v2 header is cut short")
        offset += size
        if kind == PP2_TYPE_CURVETUN_KEY:
            if size != 32:
                raise ValueError(f"the key TLV holds {size} bytes, not 32")
            return value
    return None
