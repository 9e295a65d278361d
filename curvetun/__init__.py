"""
curvetun: encrypted, mutually authenticated message tunnels over TCP for
Twisted, speaking the curve_tun wire protocol v1.0 (a CurveCP-style
handshake over length-prefixed TCP frames).
"""

__version__ = "0.1.0"
