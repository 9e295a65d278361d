"""
The status document a running C{twist curvetun} serves at C{/status}, and
its rendering as text for C{curvetun status} (one block per peer, in the
manner of C{wg show}).

The document (JSON)::

    {
      "version": "0.1.0",
      "now": 1764620000.5,                 # the server's clock, epoch seconds
      "tunnels": [
        {
          "name": "curvetun:7700",          # its config-file name, else its first listen endpoint
          "listen": ["curvetun:7700"],
          "forward": "tcp:127.0.0.1:6379",  # null: echo
          "server_keys": [{"key": "<64 hex>", "role": "current"},
                          {"key": "<64 hex>", "role": "previous"}],
          "connections": [
            {
              "peer_key": "<64 hex>",
              "address": "127.0.0.1:40312",
              "started": 1764619990.0,      # when the handshake completed
              "bytes_received": 1024,       # application bytes from the peer
              "bytes_sent": 2048,           # application bytes to the peer
              "last_message": 1764619999.0, # the later of the two below; null: none yet
              "last_received": 1764619999.0,# the last message from the peer; null: none yet
              "last_sent": 1764619998.0     # the last message to the peer; null: none yet
            }
          ]
        }
      ]
    }

Readers ignore keys they do not know, so that keys can be added without
breaking them; C{last_received} and C{last_sent} were added so. Times are
epoch seconds of the server's clock; the rendering measures ages
against the document's C{now}, so a skew between the two hosts' clocks does
not show.
"""

from __future__ import annotations

from typing import Any

from .keys import fingerprint

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(count: int) -> str:
    """
    C{count} bytes in binary units, as C{wg show} gives transfer:
    C{"512 B"}, C{"1.50 KiB"}, C{"3.21 GiB"}.
    """
    if count < 1024:
        return f"{count} B"
    value = float(count)
    for unit in _UNITS[1:]:
        value /= 1024
        if value < 1024 or unit == _UNITS[-1]:
            return f"{value:.2f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def human_age(seconds: float) -> str:
    """
    How long ago, in words: C{"3 seconds ago"}, C{"2 minutes, 5 seconds
    ago"}, C{"1 day, 3 hours ago"}: the two largest units, as C{wg show}.
    """
    remaining = max(0, int(seconds))
    parts: list[str] = []
    for name, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        amount, remaining = divmod(remaining, size)
        if amount:
            parts.append(f"{amount} {name}{'' if amount == 1 else 's'}")
    if not parts:
        return "just now"
    return ", ".join(parts[:2]) + " ago"


def _field(mapping: object, name: str, kind: type | tuple[type, ...]) -> Any:
    """
    C{mapping[name]}, checked to be a C{kind} (booleans are not numbers).

    @raise ValueError: it is missing or of another type.
    """
    value = mapping.get(name) if isinstance(mapping, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"the status document's {name!r} is missing or of the wrong type")
    return value


_NUMBER = (int, float)


def _optional_number(mapping: dict[str, Any], name: str) -> float | None:
    value = mapping.get(name)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"the status document's {name!r} is not a number")
    return float(value)


def render(document: object) -> str:
    """
    The status document as text: one block per tunnel, then one block per
    connected peer, most recently active first.

    @raise ValueError: C{document} is not a status document.
    """
    if not isinstance(document, dict):
        raise ValueError("the status document is not a JSON object")
    now = float(_field(document, "now", _NUMBER))
    blocks: list[str] = []
    for tunnel in _field(document, "tunnels", list):
        if not isinstance(tunnel, dict):
            raise ValueError("a tunnel of the status document is not a JSON object")
        lines = [f"tunnel: {_field(tunnel, 'name', str)}"]
        for server_key in _field(tunnel, "server_keys", list):
            key = bytes.fromhex(_field(server_key, "key", str))
            role = _field(server_key, "role", str)
            lines.append(f"  {role} key: {key.hex()} ({fingerprint(key)})")
        lines.append("  listening: " + ", ".join(_field(tunnel, "listen", list)))
        forward = tunnel.get("forward")
        lines.append(f"  forwarding to: {forward}" if forward else "  echoing")
        connections = _field(tunnel, "connections", list)
        lines.append(f"  connections: {len(connections)}")
        blocks.append("\n".join(lines))

        def activity(connection: dict[str, Any]) -> float:
            last = _optional_number(connection, "last_message")
            return last if last is not None else float(_field(connection, "started", _NUMBER))

        for connection in sorted(connections, key=activity, reverse=True):
            key = bytes.fromhex(_field(connection, "peer_key", str))
            started = float(_field(connection, "started", _NUMBER))
            last = _optional_number(connection, "last_message")
            received = int(_field(connection, "bytes_received", int))
            sent = int(_field(connection, "bytes_sent", int))
            blocks.append(
                "\n".join(
                    [
                        f"peer: {fingerprint(key)}",
                        f"  key: {key.hex()}",
                        f"  address: {_field(connection, 'address', str)}",
                        f"  connected: {human_age(now - started)}",
                        "  latest message: "
                        + ("none yet" if last is None else human_age(now - last)),
                        f"  transfer: {human_bytes(received)} received, {human_bytes(sent)} sent",
                    ]
                )
            )
    return "\n\n".join(blocks) + "\n"
