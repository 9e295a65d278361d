"""
The HTTP endpoint of C{twist curvetun --metrics ENDPOINT}:

  - C{/metrics}: the Prometheus text format (L{curvetun.metrics});
  - C{/status}: the status document as JSON (L{curvetun.status} has its
    schema; C{curvetun status URL} prints it);
  - C{/healthz}: C{200 ok} while every listener listens and every identity
    can store its nonce counter, else C{503} and one line saying why.

Every page is computed when it is asked for, from the live state of the
tunnels, in the reactor's thread. That is why C{/metrics} is a plain
L{Resource} calling C{prometheus_client.generate_latest} with a registry of
our own, and not C{prometheus_client.twisted.MetricsResource}: that one is
a C{WSGIResource}, which runs the collection in the reactor's thread pool,
so our collector would read the connections, the factories' counters and
the admission while the reactor thread changes them. The global registry
is not used either: it would also export the process collectors and
whatever else a library registers there.

No access log: a scraper asks every few seconds, and each request would be
a log line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from twisted.internet.interfaces import IReactorTime, IStreamServerEndpoint
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from .listeners import CannotListen, OpenConnections, TunnelListener
from .metrics import CurveTunCollector, Figures
from .tunnel_service import EX_UNAVAILABLE, StartupError

PATHS = (b"metrics", b"status", b"healthz")
"""
The pages of the monitoring endpoint.
"""


class Reporter(Protocol):
    """
    What the pages report: a process's tunnels (L{curvetun.metrics.Observer})
    or a supervisor's workers (L{curvetun.workers.SupervisorObserver}).
    """

    def figures(self) -> Mapping[str, Figures]:
        """Each tunnel's figures now, by name."""

    def status(self) -> dict[str, Any]:
        """The status document."""

    def health(self) -> str | None:
        """L{None} when healthy, else why not (one line)."""


class MetricsPage(Resource):
    """
    C{/metrics}: the registry's metrics in the Prometheus text format.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.registry)


class StatusPage(Resource):
    """
    C{/status}: the observer's status document, as JSON.
    """

    isLeaf = True

    def __init__(self, observer: Reporter) -> None:
        super().__init__()
        self.observer = observer

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(self.observer.status(), indent=2).encode("utf-8") + b"\n"


class HealthPage(Resource):
    """
    C{/healthz}: C{200} and C{ok}, or C{503} and why not (one line).
    """

    isLeaf = True

    def __init__(self, observer: Reporter) -> None:
        super().__init__()
        self.observer = observer

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        problem = self.observer.health()
        if problem is None:
            return b"ok\n"
        request.setResponseCode(503)
        return problem.encode("utf-8", "replace") + b"\n"


class IndexPage(Resource):
    """
    C{/}: the pages there are; another path is a 404.
    """

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"curvetun: " + b" ".join(b"/" + path for path in PATHS) + b"\n"


def site(observer: Reporter) -> Site:
    """
    The web site of the monitoring endpoint, for C{observer}'s tunnels.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CurveTunCollector(observer.figures))
    root = IndexPage()
    root.putChild(b"metrics", MetricsPage(registry))
    root.putChild(b"status", StatusPage(observer))
    root.putChild(b"healthz", HealthPage(observer))
    return _QuietSite(root)


class _QuietSite(Site):
    noisy = False

    def logPrefix(self) -> str:
        # What the port's "... starting on PORT" line calls us.
        return "curvetun metrics"

    def log(self, request: Any) -> None:
        pass  # no access log (see the module docstring)


class MonitoringListener(TunnelListener):
    """
    Listens for the monitoring endpoint's HTTP requests. A port it cannot
    listen on is a L{StartupError} (status C{EX_UNAVAILABLE}), as a
    tunnel's is.

    @ivar observer: what the pages report.
    """

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        description: str,
        observer: Reporter,
        clock: IReactorTime,
        where: str = "",
    ) -> None:
        # No drain: a request in progress is not worth a wait on stop.
        super().__init__(
            endpoint,
            description,
            site(observer),
            OpenConnections(),
            0.0,
            clock,
            serving="metrics, status and health over HTTP",
        )
        self.observer = observer
        self._where = where

    def privilegedStartService(self) -> None:
        """
        Listen.

        @raise StartupError: the endpoint cannot listen.
        """
        try:
            super().privilegedStartService()
        except CannotListen as error:
            raise StartupError(f"{self._where}metrics endpoint: {error}", EX_UNAVAILABLE) from None
