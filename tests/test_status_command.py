"""
C{curvetun status URL} (L{curvetun.cli.status}): its URL, its one-line
errors, against real HTTP servers on 127.0.0.1; the whole command against a
running C{twist curvetun} is in C{tests.test_metrics}.
"""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from curvetun.cli.base import CommandFailed
from curvetun.cli.status import fetch_status, status_url

from ._support import CommandTestCase, closed_port, curvetun_process, subprocess_env, tcp_port


class _Page(Resource):
    isLeaf = True

    def __init__(self, code: int, body: bytes) -> None:
        super().__init__()
        self.code = code
        self.body = body

    def render_GET(self, request: Request) -> bytes:
        request.setResponseCode(self.code)
        return self.body


class _Silent(Protocol):
    """
    Accepts a connection and never answers.
    """


class StatusCommandTests(CommandTestCase):
    """
    What C{curvetun status} fetches, and how it fails.
    """

    async def serve(self, code: int, body: bytes) -> str:
        """
        An HTTP server answering every GET with C{code} and C{body}; its URL.
        """
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Site(_Page(code, body))
        )
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{tcp_port(port)}/status"

    async def failure(self, url: str, timeout: float = 10.0) -> str:
        """
        What fetching C{url} fails with.
        """
        try:
            await fetch_status(reactor, url, timeout)
        except CommandFailed as error:
            return str(error)
        self.fail(f"fetching {url} did not fail")

    def test_a_bare_address_means_its_status_page(self) -> None:
        self.assertEqual(status_url("http://127.0.0.1:9100"), "http://127.0.0.1:9100/status")
        self.assertEqual(status_url("http://127.0.0.1:9100/"), "http://127.0.0.1:9100/status")
        self.assertEqual(status_url("http://h:1/other/status"), "http://h:1/other/status")

    def test_a_malformed_url_is_a_usage_error(self) -> None:
        for url in ("127.0.0.1:9100", "ftp://host/", "http://", "http://h:99999", "http://h/a b"):
            result = self.call("status", url)
            self.assertOneLineError(result, 2, "bad URL")

    def test_no_url_is_a_usage_error(self) -> None:
        self.assertOneLineError(self.call("status"), 2, "expected URL")

    async def test_the_document_is_returned_with_its_json(self) -> None:
        url = await self.serve(200, b'{"now": 1}')
        self.assertEqual(await fetch_status(reactor, url), (b'{"now": 1}', {"now": 1}))

    async def test_an_http_error_is_one_line_with_the_first_line_of_its_body(self) -> None:
        url = await self.serve(503, b"not listening on curvetun:7700\n")
        error = await self.failure(url)
        self.assertEqual(
            error, f"'{url}' answered 503 Service Unavailable: not listening on curvetun:7700"
        )

    async def test_a_body_that_is_not_json_is_one_line(self) -> None:
        url = await self.serve(200, b"<html>")
        error = await self.failure(url)
        self.assertEqual(error, f"'{url}' sent no status document (not JSON)")

    async def test_a_refused_connection_is_one_line(self) -> None:
        url = f"http://127.0.0.1:{closed_port()}/status"
        error = await self.failure(url)
        self.assertIn("connection refused by", error)

    async def test_a_server_that_never_answers_times_out(self) -> None:
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(_Silent)
        )
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{tcp_port(port)}/status"
        error = await self.failure(url, timeout=0.2)
        self.assertEqual(error, f"no answer from '{url}' within 0.2 seconds")

    async def test_json_that_is_not_a_status_document_exits_1_in_one_line(self) -> None:
        url = await self.serve(200, b'{"now": "soon"}')
        out, err, code = await curvetun_process(
            ["status", url], subprocess_env(os.path.abspath(self.mktemp()))
        )
        self.assertEqual((code, out), (1, b""))
        self.assertEqual(err.count(b"\n"), 1, err)
        self.assertIn(b"sent no status document", err)
        self.assertNotIn(b"Traceback", err)

    async def test_a_refused_connection_exits_1_in_one_line(self) -> None:
        out, err, code = await curvetun_process(
            ["status", f"http://127.0.0.1:{closed_port()}"],
            subprocess_env(os.path.abspath(self.mktemp())),
        )
        self.assertEqual((code, out), (1, b""))
        self.assertEqual(err.count(b"\n"), 1, err)
        self.assertIn(b"curvetun: error: connection refused by", err)
