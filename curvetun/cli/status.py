"""
C{curvetun status URL}: what a running C{twist curvetun --metrics ENDPOINT}
serves at C{/status}, as text (one block per tunnel, one per peer, as
C{wg show} prints; L{curvetun.status.render}) or, with C{--json}, as the
document itself.

    curvetun status http://127.0.0.1:9100
    curvetun status --json http://127.0.0.1:9100/status
"""

from __future__ import annotations

import json
import sys
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError, ConnectionRefusedError, DNSLookupError
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.python import usage
from twisted.web.client import Agent, readBody
from twisted.web.error import SchemeNotSupported

from .. import status as document_format
from ..keys import quoted
from .base import CommandFailed, CommandOptions, expect_arguments, print_error

TIMEOUT = 10.0
"""
Seconds C{curvetun status} waits for the whole answer.
"""


class StatusOptions(CommandOptions):
    """
    C{curvetun status}'s command line.
    """

    synopsis = "[--json] URL"
    optFlags = [["json", None, "Print the status document (JSON) as the server sent it."]]
    longdesc = (
        "Fetch the status of a running 'twist curvetun --metrics ENDPOINT' from "
        "URL (http://HOST:PORT, or the full http://HOST:PORT/status) and print "
        "one block per tunnel and one per connected peer: key fingerprint, "
        "address, how long connected, latest message, transfer. Exit 1 if the "
        "server cannot be reached, answers with an error, or sends no status "
        f"document, or after {TIMEOUT:g} seconds without an answer; exit 2 for a "
        "malformed URL."
    )

    url: str

    def take_arguments(self, args: tuple[str, ...]) -> None:
        expect_arguments(args, "URL", 1, 1)
        self.url = status_url(args[0])


def status_url(text: str) -> str:
    """
    The URL of the status document at C{text}: C{http://HOST:PORT} (or
    with a trailing C{/}) means its C{/status}; a URL with another path is
    taken as it is.

    @raise usage.UsageError: C{text} is not an http or https URL with a
        host.
    """
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as error:
        raise usage.UsageError(f"bad URL {quoted(text)}: {error}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise usage.UsageError(
            f"bad URL {quoted(text)}: expected http://HOST:PORT, e.g. http://127.0.0.1:9100"
        )
    if not text.isascii() or any(c.isspace() for c in text):
        raise usage.UsageError(f"bad URL {quoted(text)}: spaces and non-ASCII are not allowed")
    if parts.path in ("", "/"):
        return parts._replace(path="/status").geturl()
    return text


def describe_failure(error: BaseException, url: str) -> str:
    """
    One line that says why the status at C{url} could not be fetched.
    """
    target = quoted(url)
    if isinstance(error, ConnectionRefusedError):
        return f"connection refused by {target}: is twist curvetun running with --metrics there?"
    if isinstance(error, DNSLookupError):
        return f"cannot connect to {target}: host name not found"
    if isinstance(error, ConnectTimeoutError):
        return f"cannot connect to {target}: timed out"
    if isinstance(error, ConnectError):
        return f"cannot connect to {target}: {error}"
    if isinstance(error, SchemeNotSupported):
        return f"cannot fetch {target}: {error} (https needs pyOpenSSL and service_identity)"
    return f"cannot fetch {target}: {str(error) or type(error).__name__}"


async def fetch_status(reactor: Any, url: str, timeout: float = TIMEOUT) -> tuple[bytes, object]:
    """
    GET the status document at C{url}.

    @return: the body as sent, and its JSON.
    @raise CommandFailed: the server cannot be reached, does not answer
        within C{timeout} seconds, answers with another status than 200,
        or sends something that is not JSON (a one-line message).
    """
    agent = Agent(reactor, connectTimeout=timeout)

    async def get() -> tuple[int, bytes, bytes]:
        response = await agent.request(b"GET", url.encode("ascii"))
        body: bytes = await readBody(response)
        return response.code, response.phrase, body

    answer = Deferred.fromCoroutine(get())
    # Not addTimeout: the agent reports a cancelled request as
    # ResponseNeverReceived, which addTimeout does not take for its own.
    timer = reactor.callLater(timeout, answer.cancel)
    try:
        code, phrase, body = await answer
    except Exception as error:
        if not timer.active():
            raise CommandFailed(
                f"no answer from {quoted(url)} within {timeout:g} seconds"
            ) from None
        raise CommandFailed(describe_failure(error, url)) from None
    finally:
        if timer.active():
            timer.cancel()
    if code != 200:
        reason = phrase.decode("ascii", "replace")
        first = body.decode("utf-8", "replace").strip().splitlines()[:1]
        said = f": {first[0][:200]}" if first else ""
        raise CommandFailed(f"{quoted(url)} answered {code} {reason}{said}")
    try:
        return body, json.loads(body)
    except ValueError:
        raise CommandFailed(f"{quoted(url)} sent no status document (not JSON)") from None


async def _run_status(reactor: Any, options: StatusOptions) -> None:
    try:
        body, document = await fetch_status(reactor, options.url)
        text = body.decode("utf-8") if options["json"] else document_format.render(document)
    except CommandFailed as error:
        print_error(str(error))
        raise SystemExit(1) from None
    except ValueError as error:
        print_error(f"{quoted(options.url)} sent no status document: {error}")
        raise SystemExit(1) from None
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def status(options: StatusOptions) -> int:
    """
    C{curvetun status}: print the status of a running server.
    """
    from twisted.internet import reactor
    from twisted.internet.task import react

    react(_run_status, (options,), _reactor=reactor)
