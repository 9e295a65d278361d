"""
Send hellos to a curvetun server and write the safe nonce of each cookie
that comes back (for C{tests/test_workers.py}).

    python tests/_hello_client.py PORT SERVER_KEY_HEX COUNT

Each hello goes on a new TCP connection to 127.0.0.1:PORT, made with the
pure handshake functions; the cookie's C{SN} (in the clear in the packet)
is written to standard output as 32 hex digits and a newline, one
C{write} per nonce. A connection that closes without a cookie (the vault
is restarting) is counted and tried again, until COUNT cookies came; the
number of those failures goes to standard error at the end.
"""

from __future__ import annotations

import os
import socket
import struct
import sys


def read_frame(connection: socket.socket) -> bytes | None:
    data = b""
    while len(data) < 2 or len(data) < 2 + struct.unpack(">H", data[:2])[0]:
        chunk = connection.recv(4096)
        if not chunk:
            return None
        data += chunk
    return data[2 : 2 + struct.unpack(">H", data[:2])[0]]


def main(argv: list[str]) -> None:
    from curvetun import handshake
    from curvetun.handshake import EphemeralKeyPair
    from curvetun.packets import Cookie, parse_as

    port, server_key, count = int(argv[1]), bytes.fromhex(argv[2]), int(argv[3])
    out = sys.stdout.fileno()
    cookies = failures = 0
    while cookies < count:
        ephemeral = EphemeralKeyPair.generate()
        hello, shared = handshake.client_hello(server_key, ephemeral)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
            connection.sendall(struct.pack(">H", len(hello)) + hello)
            try:
                frame = read_frame(connection)
            except OSError:
                frame = None
        if frame is None:
            failures += 1
            continue
        cookie = parse_as(frame, Cookie)
        # The cookie is really from the server's key: it opens.
        handshake.client_open_cookie(cookie, shared)
        os.write(out, cookie.safe_nonce.hex().encode("ascii") + b"\n")
        cookies += 1
    sys.stderr.write(f"{failures} failed\n")


if __name__ == "__main__":
    main(sys.argv)
