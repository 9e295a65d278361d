"""
How curvetun names a peer's address: in log lines (L{format_address}) and
for the registry and the connection limits (L{peer_host}).
"""

from __future__ import annotations

from twisted.internet.interfaces import IAddress


def format_address(address: IAddress) -> str:
    """
    An address for a log message: C{host:port} (C{[host]:port} for IPv6),
    or its C{str} if it is not an IP address.
    """
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is None or port is None:
        return str(address)
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def peer_host(address: IAddress) -> str:
    """
    The IP address of C{address}, as the registry and the connection limits
    know peers; empty for an address that has none (a UNIX socket), which
    only a registry entry for C{*} admits.
    """
    host = getattr(address, "host", "")
    return host if isinstance(host, str) else ""
