"""
Hostile input to every interface that reads it: endpoint strings, registry
files, key directories, and the network.

What each must do with input it cannot use: refuse it with its own error
type (C{ValueError} for endpoint strings, L{RegistryError} naming
C{FILE:LINE} for registries, L{KeyFileError} for key directories), in a
message that is one line, of bounded length however long the input, and
that never quotes a secret. No other exception type escapes, so the user
sees a sentence, not a traceback.

Symlinks in a key directory are followed, as SSH does with its keys (and as
key directories mounted from secret stores need): what is checked is the
file they point to, so a link to a file that others can read is refused
like that file would be, and a dangling link is a missing file. The counter
is always written in the key directory itself: storing it replaces a
symlink with a regular file, and never writes through it.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from curvetun import transport as transport_module
from curvetun.errors import KeyFileError, RegistryError
from curvetun.keys import _LOW_ORDER_POINTS, format_public_key
from curvetun.packets import HELLO_MAGIC, HELLO_SIZE, VOUCH_SIZE, parse_as
from curvetun.registry import FileRegistry, Registry
from curvetun.vault import FileVault

from ._support import KeyDirs, counter_file
from ._vectors import HELLO_V, VectorServer, protocol_of, unhex

MESSAGE_LIMIT = 500
"""The longest message we accept for any input, however long the input."""

A_KEY = "6984944f69cf6fabcdd48541e15d83dd5e01c66fb6f0d8f6b765e57e1e2bb51e"


class OneLineErrorMixin:
    """
    Checks that an error is of the interface's type, one line, and short.
    """

    assertRaises: Any
    assertNotIn: Callable[..., None]
    assertLess: Callable[..., None]
    assertIn: Callable[..., None]

    def assert_refused(
        self, error_type: type[Exception], call: Callable[[], object], *fragments: str
    ) -> str:
        error = self.assertRaises(error_type, call)
        message = str(error)
        self.assertNotIn("\n", message, repr(message))
        self.assertLess(len(message), MESSAGE_LIMIT, message[:200])
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message


def every_low_order_key_written() -> list[str]:
    """
    Every low-order point, with and without its ignored top bit, in hex
    and in base64.
    """
    keys = []
    for point in _LOW_ORDER_POINTS:
        for variant in (point, point[:31] + bytes([point[31] | 0x80])):
            keys += [variant.hex(), variant.hex().upper(), base64.b64encode(variant).decode()]
    return keys


def escaped(value: str) -> str:
    """
    C{value} escaped for an endpoint string (colons, equals signs and
    backslashes).
    """
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


class EndpointStringTests(OneLineErrorMixin, SynchronousTestCase):
    """
    C{curvetun:} client and server strings that cannot be used fail with a
    one-line C{ValueError} saying why.
    """

    def setUp(self) -> None:
        self.dirs = KeyDirs(self)

    def client(self, description: str) -> object:
        if "keydir=" not in description:
            description += f":keydir={escaped(self.dirs.client)}"
        return clientFromString(reactor, description)

    def server(self, description: str) -> object:
        if "keydir=" not in description:
            description += f":keydir={escaped(self.dirs.server)}"
        return serverFromString(reactor, description)

    def assert_all_refused(self, parse: Callable[[str], object], cases: dict[str, str]) -> None:
        for description, fragment in cases.items():
            self.assert_refused(ValueError, lambda: parse(description), fragment)

    def test_unknown_repeated_and_surplus_arguments(self) -> None:
        self.assert_all_refused(
            self.client,
            {
                f"curvetun:h:1:key={A_KEY}:colour=blue": "unknown keyword 'colour'",
                f"curvetun:h:1:key={A_KEY}:Key={A_KEY}": "unknown keyword 'Key'",
                f"curvetun:h:1:key={A_KEY}:=x": "unknown keyword ''",
                f"curvetun:h:1:key={A_KEY}:host=h": "host given twice",
                f"curvetun:h:1:2:key={A_KEY}": "too many positional arguments",
                # (A keyword given twice never reaches curvetun: Twisted's
                # string parser keeps the last one.)
            },
        )
        self.assert_all_refused(
            self.server,
            {
                "curvetun:1:colour=blue": "unknown keyword 'colour'",
                "curvetun:1:2": "too many positional arguments",
                "curvetun:1:port=2": "port given twice",
                "curvetun:1:host=h": "unknown keyword 'host'",
            },
        )

    def test_bad_ports(self) -> None:
        for port in ["", "0", "65536", "-1", "http", "0x50", "1e3", "80.0", "9" * 5000, "\x00"]:
            self.assert_refused(
                ValueError, lambda: self.client(f"curvetun:h:{port}:key={A_KEY}"), "port"
            )
        for port in ["", "65536", "-1", "http", "0x50", "9" * 5000]:
            self.assert_refused(ValueError, lambda: self.server(f"curvetun:{port}"), "port")

    def test_bad_numbers(self) -> None:
        for timeout in ["0", "-1", "nan", "inf", "-inf", "1e400", "soon", "", "\x00"]:
            self.assert_refused(
                ValueError,
                lambda: self.client(f"curvetun:h:1:key={A_KEY}:timeout={timeout}"),
                "timeout must be a positive number",
            )
        for backlog in ["0", "-5", "many", "", "1.5"]:
            self.assert_refused(
                ValueError,
                lambda: self.server(f"curvetun:1:backlog={backlog}"),
                "backlog must be a number from 1 to 65535",
            )

    def test_an_empty_host_is_refused(self) -> None:
        self.assert_refused(ValueError, lambda: self.client(f"curvetun::1:key={A_KEY}"), "host")
        self.assert_refused(
            ValueError, lambda: self.client(f"curvetun:host=:port=1:key={A_KEY}"), "host"
        )

    def test_malformed_keys(self) -> None:
        b64 = base64.b64encode(bytes.fromhex(A_KEY)).decode()
        self.assertTrue({"+", "/"} & set(b64), "the URL-safe form below must differ")
        for key in [
            "",
            A_KEY[:-1],
            A_KEY + "0",
            A_KEY[:-2],
            "g" * 64,
            A_KEY[:-1] + "\x00",
            A_KEY + "\x00",
            " ".join(A_KEY[i : i + 2] for i in range(0, 64, 2)),
            b64.rstrip("="),  # no padding
            b64[:-1] + "==",  # bad padding
            b64.replace("+", "-").replace("/", "_"),  # URL-safe alphabet
            b64[:-4] + "====",
            "a" * 100_000,
            "\u0660" * 64,  # Arabic-Indic zeros
        ]:
            self.assert_refused(
                ValueError,
                lambda: self.client(f"curvetun:h:1:key={escaped(key)}"),
                "bad public key",
            )

    def test_low_order_keys_are_refused_in_every_form(self) -> None:
        keys = every_low_order_key_written()
        self.assertEqual(len(keys), 7 * 2 * 3)
        for key in keys:
            self.assert_refused(
                ValueError,
                lambda: self.client(f"curvetun:h:1:key={escaped(key)}"),
                "low-order Curve25519 point",
            )

    def test_unusable_key_directories_and_registries(self) -> None:
        missing = os.path.join(self.mktemp(), "nowhere")
        self.assert_refused(
            ValueError,
            lambda: self.client(f"curvetun:h:1:key={A_KEY}:keydir={escaped(missing)}"),
            "no curvetun key directory",
        )
        a_file = os.path.join(self.dirs.client, "public.key")
        self.assert_refused(
            ValueError,
            lambda: self.server(f"curvetun:1:keydir={escaped(a_file)}"),
            "no curvetun key directory",
        )
        for name, content, fragment in [
            ("garbage", b"\xff" + os.urandom(2000), ":1: not UTF-8 text"),
            ("bad-line", b"# fine\n127.0.0.1 " + b"00" * 32 + b"\n", ":2: bad public key"),
        ]:
            dirs = KeyDirs(self, admit_from=None)
            registry = os.path.join(dirs.server, name)
            with open(registry, "wb") as f:
                f.write(content)
            message = self.assert_refused(
                ValueError,
                lambda: serverFromString(
                    reactor,
                    f"curvetun:1:keydir={escaped(dirs.server)}:registry={escaped(registry)}",
                ),
            )
            self.assertIn(registry + fragment, message)
        dirs = KeyDirs(self, admit_from=None)
        self.assert_refused(
            ValueError,
            lambda: serverFromString(
                reactor, f"curvetun:1:keydir={escaped(dirs.server)}:registry={escaped(dirs.server)}"
            ),
            "cannot read",
        )

    def test_a_host_that_is_neither_a_name_nor_an_address_is_refused(self) -> None:
        for host in ["a\x00b", " ", "h" * 100_000, "a..b", "two words", "\u2028"]:
            self.assert_refused(
                ValueError, lambda: self.client(f"curvetun:{escaped(host)}:1:key={A_KEY}"), "host"
            )

    def test_ports_and_backlogs_are_plain_decimal_numbers(self) -> None:
        for port in ["8_0", "\u0668\u0660", " 80", "+80"]:
            self.assert_refused(
                ValueError, lambda: self.client(f"curvetun:h:{port}:key={A_KEY}"), "port"
            )
            self.assert_refused(ValueError, lambda: self.server(f"curvetun:{port}"), "port")
        for backlog in ["1_0", "\u0661", "99999999999999999999"]:
            self.assert_refused(
                ValueError, lambda: self.server(f"curvetun:1:backlog={backlog}"), "backlog"
            )

    def test_an_interface_that_is_not_an_ip_address_is_refused(self) -> None:
        for interface in ["garbage", "1.2.3.4.5", "\\:\\:\\:\\:"]:
            self.assert_refused(
                ValueError, lambda: self.server(f"curvetun:1:interface={interface}"), "interface"
            )

    def test_an_unknown_keyword_is_quoted_briefly(self) -> None:
        self.assert_refused(
            ValueError, lambda: self.client(f"curvetun:h:1:key={A_KEY}:{'x' * 10_000}=1"), "unknown"
        )

    def test_keydir_and_registry_values_that_cannot_be_paths_are_refused_by_name(self) -> None:
        for option in ("keydir", "registry"):
            for value in ["a\x00b", ""]:
                description = f"curvetun:1:keydir={escaped(self.dirs.server)}"
                if option == "keydir":
                    description = f"curvetun:1:keydir={escaped(value)}"
                else:
                    description += f":registry={escaped(value)}"
                self.assert_refused(
                    ValueError, lambda: serverFromString(reactor, description), option
                )


class RegistryFileTests(OneLineErrorMixin, SynchronousTestCase):
    """
    A registry file that cannot be used is refused with a L{RegistryError}
    that names the file and the line.
    """

    def write(self, content: bytes) -> str:
        path: str = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(content)
        return path

    def assert_line_refused(self, content: bytes, line: int, *fragments: str) -> None:
        path = self.write(content)
        message = self.assert_refused(RegistryError, lambda: FileRegistry(path), *fragments)
        self.assertTrue(message.startswith(f"{path}:{line}: "), message)

    def test_binary_garbage_and_bad_utf8_name_the_line(self) -> None:
        self.assert_line_refused(b"\xff\xfe\x00garbage", 1, "not UTF-8")
        self.assert_line_refused(b"# one\n# two\n# three \xc3\x28\n", 3, "not UTF-8")
        self.assert_line_refused(b"\x80" * 100 + os.urandom(100), 1, "not UTF-8")
        # Surrogates encoded in UTF-8 are not UTF-8 either.
        self.assert_line_refused(b"# \xed\xa0\x80\n", 1, "not UTF-8")

    def test_very_long_lines_are_refused_briefly(self) -> None:
        self.assert_line_refused(b"x" * 1_000_000 + b"\n", 1, "bad address")
        self.assert_line_refused(b"127.0.0.1 " + b"a" * 1_000_000 + b"\n", 1, "bad public key")
        self.assert_line_refused(b"\n" * 1000 + b"127.0.0.1 " + b"0" * 63, 1001, "bad public key")

    def test_bad_addresses_and_networks(self) -> None:
        for address, fragment in [
            ("10.0.0.1/8", "host bits set"),
            ("10.0.0.0/33", "bad CIDR network"),
            ("10.0.0.0/-1", "bad CIDR network"),
            ("/8", "bad CIDR network"),
            ("::/129", "bad CIDR network"),
            ("300.1.1.1", "bad address"),
            ("127.0.0.1\x00", "bad address"),
            ("\ufeff127.0.0.1", "bad address"),  # a byte-order mark
            ("host..example", "bad address"),
        ]:
            self.assert_line_refused(f"# ok\n{address} {A_KEY}\n".encode(), 2, fragment)

    def test_keys_of_the_wrong_length_or_form(self) -> None:
        b64 = base64.b64encode(bytes.fromhex(A_KEY)).decode()
        for key in [A_KEY[:-2], A_KEY + "00", A_KEY[:-1], b64.rstrip("="), b64[:-1] + "==", "zz"]:
            self.assert_line_refused(f"127.0.0.1 {key}\n".encode(), 1, "bad public key")
        self.assert_line_refused(b"127.0.0.1\n", 1, "missing key")

    def test_low_order_keys_are_refused(self) -> None:
        for key in every_low_order_key_written():
            self.assert_line_refused(f"*\t{key}\n".encode(), 1, "low-order")

    def test_a_directory_is_not_a_registry(self) -> None:
        path = os.path.abspath(self.mktemp())
        os.mkdir(path)
        self.assert_refused(RegistryError, lambda: FileRegistry(path), f"cannot read {path}")

    # Known gaps.

    def test_only_a_newline_ends_a_line(self) -> None:
        """
        A comment that holds a character Python also counts as a line break
        (form feed, NEL, U+2028...) stays a comment: what looks commented
        out in an editor must not admit anyone. Line numbers are those an
        editor shows.
        """
        for breaker in ["\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]:
            text = f"# disabled:{breaker}* {A_KEY}\n"
            entries = Registry.parse(text).entries
            self.assertEqual(entries, (), repr(breaker))
            message = self.assert_refused(
                RegistryError, lambda: Registry.parse(f"# a{breaker}b\nbad-line\n", "f")
            )
            self.assertTrue(message.startswith("f:2: "), message)

    def test_a_registry_error_never_quotes_a_secret_file(self) -> None:
        """
        A registry option pointed at a key file by mistake must not print
        the secret key.
        """
        keydir = FilePath(self.mktemp())
        FileVault.create(keydir).close()
        for name in ("secret.key", "nonce.key"):
            secret = keydir.child(name).getContent().decode().strip()
            message = self.assert_refused(RegistryError, lambda: FileRegistry(keydir.child(name)))
            self.assertNotIn(secret[:16], message)


class KeyDirectoryTests(OneLineErrorMixin, SynchronousTestCase):
    """
    A key directory with damaged, unsafe or strange files is refused with a
    one-line L{KeyFileError} that names the file and never quotes a secret.
    """

    def make_keydir(self) -> FilePath[str]:
        keydir = FilePath(self.mktemp())
        FileVault.create(keydir).close()
        return keydir

    def refused(self, keydir: FilePath[str], *fragments: str) -> str:
        return self.assert_refused(KeyFileError, lambda: FileVault(keydir), *fragments)

    def replace(self, keydir: FilePath[str], name: str, content: bytes) -> None:
        path = keydir.child(name)
        path.remove()
        with open(path.path, "wb") as f:
            f.write(content)
        path.chmod(0o600)

    def test_damaged_secret_files_are_refused_without_quoting_them(self) -> None:
        for content in [
            b"",
            b"abcd",
            b"a" * 63,
            b"a" * 65,
            os.urandom(64),
            "\u00e9".encode() * 32,
            b"\x00" * 64,
            b"a" * 10_000_000,
            b"aa " * 21 + b"a",
            b"0x" + b"a" * 62,
        ]:
            for name in ("secret.key", "nonce.key"):
                keydir = self.make_keydir()
                self.replace(keydir, name, content)
                message = self.refused(keydir, keydir.child(name).path)
                if len(content) >= 8:
                    self.assertNotIn(content[:8].decode("latin-1"), message)

    def test_damaged_counters_are_refused(self) -> None:
        for content in [
            b"",
            b"-1",
            b"1_0",
            b"1 0",
            b"0x10",
            "\u0661".encode(),
            b"9" * 255,
            b"%d" % (2**63 + 1),
        ]:
            keydir = self.make_keydir()
            counter = counter_file(keydir)
            self.replace(keydir, counter.basename(), content + b"\n")
            self.refused(keydir, counter.path)

    def test_secret_files_others_may_read_are_refused(self) -> None:
        for name in ("secret.key", "nonce.key"):
            for mode in (0o644, 0o640, 0o604, 0o660, 0o606):
                keydir = self.make_keydir()
                keydir.child(name).chmod(mode)
                self.refused(keydir, f"chmod 600 {keydir.child(name).path}")

    def test_a_directory_in_place_of_a_file_is_refused(self) -> None:
        for name in ("secret.key", "public.key", "nonce.key", "counter", "lock"):
            keydir = self.make_keydir()
            if name == "counter":
                name = counter_file(keydir).basename()
            if keydir.child(name).exists():
                keydir.child(name).remove()
            keydir.child(name).makedirs()
            self.refused(keydir, keydir.child(name).path)

    def test_a_file_in_place_of_the_directory_is_refused(self) -> None:
        path = FilePath(self.mktemp())
        path.setContent(b"not a directory")
        self.refused(path, "Not a directory")

    def test_a_symlink_to_a_private_file_elsewhere_is_followed(self) -> None:
        keydir = self.make_keydir()
        elsewhere = FilePath(self.mktemp())
        keydir.child("secret.key").moveTo(elsewhere)
        os.symlink(elsewhere.path, keydir.child("secret.key").path)
        vault = FileVault(keydir)
        vault.close()
        self.assertEqual(
            format_public_key(vault.public_key),
            keydir.child("public.key").getContent().decode().strip(),
        )

    def test_a_symlink_to_a_file_others_may_read_is_refused(self) -> None:
        keydir = self.make_keydir()
        elsewhere = FilePath(self.mktemp())
        keydir.child("secret.key").moveTo(elsewhere)
        elsewhere.chmod(0o644)
        os.symlink(elsewhere.path, keydir.child("secret.key").path)
        self.refused(keydir, "(mode 0644)")
        keydir = self.make_keydir()
        keydir.child("nonce.key").remove()
        os.symlink("/dev/null", keydir.child("nonce.key").path)
        self.refused(keydir, "nonce.key", "not a regular file")

    def test_a_dangling_symlink_is_a_missing_file(self) -> None:
        keydir = self.make_keydir()
        keydir.child("secret.key").remove()
        os.symlink("/nonexistent/secret.key", keydir.child("secret.key").path)
        self.refused(keydir, "secret.key is missing")

    def test_the_counter_is_stored_in_the_key_directory_not_through_a_symlink(self) -> None:
        keydir = self.make_keydir()
        elsewhere = FilePath(self.mktemp())
        counter = counter_file(keydir)
        counter.moveTo(elsewhere)
        os.symlink(elsewhere.path, counter.path)
        vault = FileVault(keydir)
        self.addCleanup(vault.close)
        vault.safe_nonce()  # the first nonce after a start stores the counter
        self.assertFalse(counter.islink())
        self.assertGreater(int(counter.getContent()), 0)
        self.assertEqual(elsewhere.getContent(), b"0\n")

    # Known gaps.

    def test_a_path_with_a_nul_byte_is_refused_as_a_key_file_error(self) -> None:
        self.refused(FilePath(self.mktemp() + "\x00x"))

    def test_a_key_directory_others_may_write_to_is_refused(self) -> None:
        """
        Whoever can write to the key directory can put back an old
        nonce.counter (and reuse nonces) or swap the key pair.
        """
        for mode in (0o770, 0o707, 0o777):
            keydir = self.make_keydir()
            keydir.chmod(mode)
            self.refused(keydir, "chmod 700")


class NetworkInputTests(SynchronousTestCase):
    """
    The network is an interface too: what a peer sends after its
    connection has been refused costs the server nothing.
    """

    def test_the_rest_of_a_read_is_not_processed_once_a_connection_is_refused(self) -> None:
        """
        One read of 500 hello-sized frames that are not hellos: the first is
        refused and closes the connection; the 499 after it must not be
        parsed one by one (a parse per frame cost 0.2 to 0.4 s of CPU per
        64 KiB read, from an unauthenticated peer).
        """
        parsed: list[bytes] = []

        def counting_parse_as(frame: bytes, packet_type: Any) -> object:
            parsed.append(frame)
            return parse_as(frame, packet_type)

        self.patch(transport_module, "parse_as", counting_parse_as)
        server = VectorServer()
        protocol_of(server).dataReceived((b"\x00\x80" + bytes(128)) * 500)
        self.assertTrue(server.transport.disconnecting)
        self.assertEqual(len(parsed), 1)

    def test_a_first_frame_of_the_wrong_length_is_refused_at_its_length_prefix(self) -> None:
        """
        A first frame that announces 65535 bytes (or any length but a
        hello's) closes the connection as soon as its 2-byte length arrives:
        nothing of it is buffered, nothing is parsed.
        """
        parsed: list[bytes] = []

        def counting_parse_as(frame: bytes, packet_type: Any) -> object:
            parsed.append(frame)
            return parse_as(frame, packet_type)

        self.patch(transport_module, "parse_as", counting_parse_as)
        for length in (0xFFFF, 0, HELLO_SIZE - 1, HELLO_SIZE + 1, VOUCH_SIZE):
            server = VectorServer()
            protocol_of(server).dataReceived(length.to_bytes(2, "big"))
            self.assertTrue(server.transport.disconnecting, length)
            self.assertEqual(protocol_of(server).read_buffer_size, 0)
            protocol_of(server).dataReceived(bytes(1000))
            self.assertEqual(protocol_of(server).read_buffer_size, 0)
            self.assertEqual(server.transport.value(), b"")
        self.assertEqual(parsed, [])

    def test_a_vouch_of_the_wrong_length_is_refused_at_its_length_prefix(self) -> None:
        """
        After the hello, only a vouch's length is valid.
        """
        server = VectorServer()
        server.receive(unhex(HELLO_V["payload"]))
        protocol_of(server).dataReceived(b"\xff\xff")
        self.assertTrue(server.transport.disconnecting)
        self.assertEqual(protocol_of(server).read_buffer_size, 0)

    def test_a_closing_connection_still_ignores_what_follows(self) -> None:
        """
        Whatever the cost, nothing that follows a refused frame in the same
        read reaches the machine's verdict: the connection stays closed and
        answers nothing.
        """
        server = VectorServer()
        hello = bytes.fromhex("0080") + HELLO_MAGIC + bytes(120)
        protocol_of(server).dataReceived(b"\x00\x00" + hello * 10)
        self.assertTrue(server.transport.disconnecting)
        self.assertEqual(server.transport.value(), b"")
        self.assertEqual(server.apps.built, [])
