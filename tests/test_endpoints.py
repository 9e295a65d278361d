"""
C{curvetun:} endpoint strings: the plugins are found, strings parse (and
malformed ones fail with the documented message), and real Twisted software
(twisted.web) runs over them unchanged.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    TCP6ClientEndpoint,
    TCP6ServerEndpoint,
    clientFromString,
    serverFromString,
)
from twisted.internet.interfaces import (
    IStreamClientEndpoint,
    IStreamClientEndpointStringParserWithReactor,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import IPlugin, getPlugins
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, readBody
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface.verify import verifyObject

from curvetun.channel import connect, listen
from curvetun.endpoints import CurveTunClientEndpoint, CurveTunServerEndpoint
from curvetun.errors import NotAuthorized
from curvetun.keys import format_public_key

from ._support import KeyDirs, tcp_port


class PluginDiscoveryTests(SynchronousTestCase):
    """
    Twisted finds curvetun's endpoint parsers and service maker.
    """

    def test_the_client_parser_is_found(self) -> None:
        parsers = [
            p
            for p in getPlugins(IStreamClientEndpointStringParserWithReactor)
            if p.prefix == "curvetun"
        ]
        self.assertEqual(len(parsers), 1)
        verifyObject(IStreamClientEndpointStringParserWithReactor, parsers[0])

    def test_the_server_parser_is_found(self) -> None:
        parsers = [
            p for p in getPlugins(IStreamServerEndpointStringParser) if p.prefix == "curvetun"
        ]
        self.assertEqual(len(parsers), 1)
        verifyObject(IStreamServerEndpointStringParser, parsers[0])

    def test_the_service_maker_is_found(self) -> None:
        from twisted.application.service import IServiceMaker

        makers = [m for m in getPlugins(IServiceMaker) if m.tapname == "curvetun"]
        self.assertEqual(len(makers), 1)
        verifyObject(IServiceMaker, makers[0])
        verifyObject(IPlugin, makers[0])


class ServerStringTests(SynchronousTestCase):
    """
    C{curvetun:PORT[:interface=ADDR][:backlog=N][:keydir=DIR][:registry=FILE]}
    """

    def setUp(self) -> None:
        self.dirs = KeyDirs(self)

    def parse(self, description: str) -> Any:
        return serverFromString(reactor, description)

    def test_a_port_and_a_keydir_make_a_curvetun_server_endpoint(self) -> None:
        endpoint = self.parse(f"curvetun:7700:keydir={self.dirs.server}")
        self.assertIsInstance(endpoint, CurveTunServerEndpoint)
        verifyObject(IStreamServerEndpoint, endpoint)
        wrapped = endpoint._wrapped
        self.assertIsInstance(wrapped, TCP4ServerEndpoint)
        self.assertEqual((wrapped._port, wrapped._interface, wrapped._backlog), (7700, "", 50))

    def test_keywords_set_port_interface_and_backlog(self) -> None:
        endpoint = self.parse(
            f"curvetun:port=7701:interface=127.0.0.1:backlog=5:keydir={self.dirs.server}"
        )
        wrapped = endpoint._wrapped
        self.assertEqual(
            (wrapped._port, wrapped._interface, wrapped._backlog), (7701, "127.0.0.1", 5)
        )

    def test_an_ipv6_interface_listens_on_ipv6(self) -> None:
        endpoint = self.parse(f"curvetun:7700:interface=\\:\\:1:keydir={self.dirs.server}")
        self.assertIsInstance(endpoint._wrapped, TCP6ServerEndpoint)

    def test_the_service_of_a_key_directory_is_shared(self) -> None:
        first = self.parse(f"curvetun:7700:keydir={self.dirs.server}")
        second = self.parse(f"curvetun:7701:keydir={self.dirs.server}/.")
        self.assertIs(first._service, second._service)
        self.assertEqual(first._service.vault.public_key, self.dirs.server_key)

    def test_malformed_strings_fail_with_the_documented_message(self) -> None:
        cases = {
            "curvetun:": "a port is required",
            "curvetun:seventy": "port must be a number",
            "curvetun:70000": "port must be between 0 and 65535",
            "curvetun:7700:7701": "too many positional arguments",
            "curvetun:7700:port=7701": "port given twice",
            "curvetun:7700:colour=blue": "unknown keyword 'colour'",
            "curvetun:7700:backlog=-1": "backlog must be a number from 1 to 65535",
            "curvetun:7700:backlog=many": "backlog must be a number from 1 to 65535",
            "curvetun:7700:keydir=/nonexistent/curvetun": "no curvetun key directory at /nonexistent/curvetun",  # noqa: E501
            "curvetun:7700:endpoint=tcp\\:7701": "endpoint= and port exclude each other",
            "curvetun:endpoint=tcp\\:7701:interface=127.0.0.1": "endpoint= and interface exclude",
            "curvetun:endpoint=tcp\\:7701:backlog=5": "endpoint= and backlog exclude each other",
            "curvetun:endpoint=nosuch\\:1": "endpoint='nosuch:1': Unknown endpoint type",
            "curvetun:endpoint=tcp\\:7701\\:colour\\=blue": "endpoint='tcp:7701:colour=blue'",
            "curvetun:endpoint=systemd\\:domain\\=INET\\:index\\=7": "no such inherited socket",
            "curvetun:7700:registry=dns": "registry=dns is for clients",
            "curvetun:7700:resolver=127.0.0.1\\:53": "unknown keyword 'resolver'",
            "curvetun:7700:interface=[::1]": "curvetun:7700:interface=\\:\\:1",
        }
        for description, message in cases.items():
            if "keydir=" not in description:
                description += f":keydir={self.dirs.server}"
            error = self.assertRaises(ValueError, self.parse, description)
            self.assertIn(message, str(error), description)
            self.assertNotIn("\n", str(error))

    def test_a_damaged_key_directory_fails_naming_the_file(self) -> None:
        with open(os.path.join(self.dirs.server, "secret.key"), "w") as f:
            f.write("not hex\n")
        os.chmod(os.path.join(self.dirs.server, "secret.key"), 0o600)
        error = self.assertRaises(
            ValueError, self.parse, f"curvetun:7700:keydir={self.dirs.server}"
        )
        self.assertIn("secret.key", str(error))

    def test_a_malformed_registry_fails_naming_the_line(self) -> None:
        registry = os.path.join(self.dirs.server, "other-registry")
        with open(registry, "w") as f:
            f.write("# fine\n127.0.0.1 not-a-key\n")
        error = self.assertRaises(
            ValueError,
            self.parse,
            f"curvetun:7700:keydir={self.dirs.server}:registry={registry}",
        )
        self.assertIn(f"{registry}:2", str(error))


class ClientStringTests(SynchronousTestCase):
    """
    C{curvetun:HOST:PORT[:key=SERVERKEY][:keydir=DIR][:registry=FILE][:timeout=SECONDS]}
    """

    def setUp(self) -> None:
        self.dirs = KeyDirs(self)

    def parse(self, description: str) -> Any:
        return clientFromString(reactor, description)

    def test_a_hex_key_makes_a_curvetun_client_endpoint(self) -> None:
        hexkey = format_public_key(self.dirs.server_key)
        endpoint = self.parse(f"curvetun:example.com:7700:key={hexkey}:keydir={self.dirs.client}")
        self.assertIsInstance(endpoint, CurveTunClientEndpoint)
        verifyObject(IStreamClientEndpoint, endpoint)
        self.assertEqual(endpoint._server_key, self.dirs.server_key)
        self.assertIsInstance(endpoint._wrapped, HostnameEndpoint)
        self.assertEqual(endpoint._wrapped._hostBytes, b"example.com")
        self.assertEqual(endpoint._wrapped._port, 7700)

    def test_an_ip_address_is_connected_to_without_name_resolution(self) -> None:
        # HostnameEndpoint would resolve even a literal address, in a thread,
        # for every connection: a TCP endpoint connects at once.
        hexkey = format_public_key(self.dirs.server_key)
        for host, kind in (("127.0.0.1", TCP4ClientEndpoint), ("::1", TCP6ClientEndpoint)):
            memory = MemoryReactorClock()
            quoted_host = host.replace(":", "\\:")
            endpoint = clientFromString(
                memory, f"curvetun:{quoted_host}:7700:key={hexkey}:keydir={self.dirs.client}"
            )
            self.assertIsInstance(endpoint._wrapped, kind)
            endpoint._wrapped.connect(Factory.forProtocol(Protocol))
            [(connected_host, port, *_)] = memory.tcpClients
            self.assertEqual((connected_host, port), (host, 7700))

    def test_a_base64_key_is_accepted_too(self) -> None:
        import base64

        b64 = base64.b64encode(self.dirs.server_key).decode().replace("=", "\\=")
        endpoint = self.parse(f"curvetun:host=h:port=1:key={b64}:keydir={self.dirs.client}")
        self.assertEqual(endpoint._server_key, self.dirs.server_key)

    def test_without_a_key_the_registry_names_the_server(self) -> None:
        endpoint = self.parse(f"curvetun:127.0.0.1:7700:keydir={self.dirs.client}")
        self.assertEqual(endpoint._server_key, self.dirs.server_key)

    def test_timeout_sets_the_connect_and_handshake_timeouts(self) -> None:
        endpoint = self.parse(f"curvetun:127.0.0.1:7700:timeout=2.5:keydir={self.dirs.client}")
        self.assertEqual(endpoint._handshake_timeout, 2.5)
        self.assertEqual(endpoint._wrapped._timeout, 2.5)

    def test_malformed_strings_fail_with_the_documented_message(self) -> None:
        cases = {
            "curvetun:": "a host is required",
            "curvetun:127.0.0.1": "a port is required",
            "curvetun:127.0.0.1:0": "port must be between 1 and 65535",
            "curvetun:127.0.0.1:http": "port must be a number",
            "curvetun:127.0.0.1:7700:extra": "too many positional arguments",
            "curvetun:127.0.0.1:7700:size=3": "unknown keyword 'size'",
            "curvetun:127.0.0.1:7700:key=abc": (
                "key: bad public key 'abc': expected 64 hex digits or 44 base64"
            ),
            "curvetun:127.0.0.1:7700:timeout=0": "timeout must be a positive number",
            "curvetun:127.0.0.1:7700:timeout=soon": "timeout must be a positive number",
            "curvetun:127.0.0.1:7700:timeout=inf": "timeout must be a positive number",
            "curvetun:other.example:7700": "no key for server other.example",
            "curvetun:127.0.0.1:7700:endpoint=tcp\\:h\\:1": "endpoint= and host exclude each other",
            "curvetun:port=7700:endpoint=tcp\\:h\\:1": "endpoint= and port exclude each other",
            "curvetun:endpoint=unix\\:path\\=/run/ct.sock": "has no host to look the server's key up by: give key=",  # noqa: E501
            "curvetun:endpoint=nosuch\\:1:key="
            + "00" * 32: "endpoint='nosuch:1': Unknown endpoint type",
            "curvetun:endpoint=tcp\\:other.example\\:7700": "no key for server other.example",
            "curvetun:[::1]:7700": "as in curvetun:\\:\\:1:7700",
            "curvetun:[fe80::1]": "as in curvetun:fe80\\:\\:1:PORT",
            "curvetun:127.0.0.1:7700:resolver=127.0.0.1\\:53": "resolver= goes with registry=dns",
            "curvetun:127.0.0.1:7700:registry=dns:key="
            + "00" * 32: "key= and registry=dns exclude",
            "curvetun:127.0.0.1:7700:registry=dns:resolver=ns.example\\:53": "resolver must be IP",
            "curvetun:127.0.0.1:7700:registry=dns:resolver=127.0.0.1": "resolver must be IP",
        }
        for description, message in cases.items():
            description += f":keydir={self.dirs.client}"
            error = self.assertRaises(ValueError, self.parse, description)
            self.assertIn(message, str(error), description)
            self.assertNotIn("\n", str(error))


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        key = request.channel.transport.peer_public_key
        return b"hello, " + format_public_key(key).encode("ascii")


class EndToEndStringTests(TestCase):
    """
    Applications written for any stream endpoint work over curvetun: strings.
    """

    async def test_a_web_page_served_and_fetched_over_curvetun(self) -> None:
        dirs = KeyDirs(self)

        server = serverFromString(reactor, f"curvetun:0:interface=127.0.0.1:keydir={dirs.server}")
        port = await server.listen(Site(Hello()))
        self.addCleanup(port.stopListening)
        endpoint = clientFromString(
            reactor,
            f"curvetun:127.0.0.1:{port.getHost().port}:keydir={dirs.client}",
        )
        agent = Agent.usingEndpointFactory(reactor, _OneEndpoint(endpoint))
        response = await agent.request(b"GET", b"http://127.0.0.1/")
        body = await readBody(response)
        self.assertEqual(response.code, 200)
        self.assertEqual(body, b"hello, " + format_public_key(dirs.client_key).encode())

    async def test_the_pooled_service_runs_only_while_endpoints_use_it(self) -> None:
        dirs = KeyDirs(self)

        server = serverFromString(reactor, f"curvetun:0:interface=127.0.0.1:keydir={dirs.server}")
        service = server._service
        self.assertFalse(service.running)
        listener = await listen(server)
        self.assertTrue(service.running)
        assert listener.port is not None
        client_endpoint = clientFromString(
            reactor,
            f"curvetun:127.0.0.1:{tcp_port(listener.port)}:keydir={dirs.client}",
        )
        channel = await connect(client_endpoint)
        self.assertTrue(client_endpoint._service.running)
        accepted = await listener.accept()
        await channel.send(b"ping")
        self.assertEqual(await accepted.recv(), b"ping")
        await channel.close()
        self.assertFalse(client_endpoint._service.running)
        await listener.close()
        self.assertFalse(service.running)

    async def test_an_unknown_client_is_refused_through_strings(self) -> None:
        dirs = KeyDirs(self, admit_from=None)

        listener = await listen(
            serverFromString(reactor, f"curvetun:0:interface=127.0.0.1:keydir={dirs.server}")
        )
        self.addCleanup(listener.close)
        assert listener.port is not None
        channel = await connect(
            clientFromString(
                reactor,
                f"curvetun:127.0.0.1:{tcp_port(listener.port)}:keydir={dirs.client}",
            )
        )
        with self.assertRaises(NotAuthorized):
            await channel.recv()


class _OneEndpoint:
    """
    An Agent endpoint factory that always uses one endpoint.
    """

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        return self._endpoint
