"""
C{twist curvetun}: forward connections between endpoints, either of which
may be a curvetun endpoint, or echo them.

    twist curvetun [--listen ENDPOINT]... [--forward ENDPOINT]
                   [--keydir DIR] [--registry FILE] [--grace SECONDS]
                   [--handshake-timeout SECONDS] ...

The server end of a tunnel to a local service::

    twist curvetun --listen curvetun:7700 --forward tcp:127.0.0.1:6379

and its client end::

    twist curvetun --listen tcp:6380:interface=127.0.0.1 --forward curvetun:server:7700:key=KEY

Without C{--forward} each connection is echoed, so that C{twist curvetun}
alone is a curvetun server to try. The options describe one tunnel, a
L{TunnelConfig}; L{curvetun.tunnel_service} runs it (and says how it stops
and with which exit status it fails to start).
"""

from __future__ import annotations

from typing import ClassVar

import attrs
from twisted.application.service import IService
from twisted.python import usage

from .config import DEFAULT_GRACE, DEFAULT_LISTEN, TunnelConfig, parse_count, parse_seconds
from .keydir import default_keydir
from .transport import DEFAULT_HANDSHAKE_TIMEOUT, ConnectionLimits
from .tunnel_service import make_service

MAX_WORKERS = 64
"""The most worker processes C{--workers} takes."""


class Options(usage.Options):
    """
    The options of C{twist curvetun}. After parsing, C{tunnels} is the list
    of the tunnels they describe (one); the values are also kept by name:
    C{"listen"} a non-empty list of endpoint strings, C{"forward"} an
    endpoint string or L{None}, C{"keydir"} a path, C{"registry"} a path or
    L{None} (the key directory's), C{"grace"}, C{"handshake-timeout"} and
    C{"idle-timeout"} floats (the last L{None} for none), and C{"limits"} a
    L{ConnectionLimits}.
    """

    synopsis = (
        "[--listen ENDPOINT]... [--forward ENDPOINT] [--keydir DIR] "
        "[--registry FILE] [--grace SECONDS] [--handshake-timeout SECONDS] "
        "[--idle-timeout SECONDS] [--max-connections N] ..."
    )
    longdesc = (
        "Forward each connection accepted on a --listen endpoint to a connection "
        "opened through the --forward endpoint, both ways, once the incoming side "
        "is authenticated; either may be a curvetun: endpoint. Without --forward, "
        "echo what is received. The key directory is created, with a fresh key, "
        "if it does not exist."
    )

    # The limits that have an option, and what each counts.
    _LIMITS: ClassVar[dict[str, str]] = {
        "connections": "connections",
        "connections_per_address": "connections from one IP address",
        "handshakes": "unfinished handshakes",
        "handshakes_per_address": "unfinished handshakes from one IP address",
    }

    optParameters: ClassVar[list[list[str | None]]] = [
        [
            "keydir",
            "k",
            None,
            (
                "Key directory of this side's long-term key, created if missing "
                "[default: $CURVETUN_HOME, else ~/.curvetun]."
            ),
        ],
        ["registry", "r", None, "Registry file [default: the file registry in the key directory]."],
        [
            "workers",
            None,
            "1",
            (
                "Worker processes; with more than one, a supervisor runs them and one vault "
                "process, the only one that reads the key directory (see docs/deploy.md)."
            ),
        ],
        [
            "grace",
            "g",
            str(DEFAULT_GRACE),
            "Seconds open connections may take to finish when stopping; then they are aborted.",
        ],
        [
            "handshake-timeout",
            None,
            str(DEFAULT_HANDSHAKE_TIMEOUT),
            "Seconds a curvetun handshake may take.",
        ],
        [
            "idle-timeout",
            None,
            "0",
            "Close a curvetun connection that receives nothing for this many seconds (0: never).",
        ],
        *(
            [
                f"max-{name.replace('_', '-')}",
                None,
                str(getattr(ConnectionLimits(), name)),
                (
                    f"The most {what} a curvetun listen endpoint takes at once "
                    "(0: no limit); past it, new connections are closed at once."
                ),
            ]
            for name, what in _LIMITS.items()
        ),
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["forward"] = None
        self.tunnels: list[TunnelConfig] = []

    def opt_listen(self, endpoint: str) -> None:
        """
        Endpoint to listen on; repeat for several [default: curvetun:7700].
        """
        self["listen"].append(endpoint)

    opt_l = opt_listen

    def opt_forward(self, endpoint: str) -> None:
        """
        Endpoint to forward each connection to, given at most once, e.g.
        tcp:127.0.0.1:6379 or curvetun:HOST:7700:key=KEY [default: echo what
        is received].
        """
        if self["forward"] is not None:
            # Not silently the last one: one tunnel forwards to one place.
            raise usage.UsageError(
                f"--forward given twice ({self['forward'][:80]!r}, then {endpoint[:80]!r}): "
                "a tunnel forwards to one endpoint"
            )
        self["forward"] = endpoint

    opt_f = opt_forward

    def postOptions(self) -> None:
        """
        Check the values, fill in the defaults that depend on others, and
        build the tunnel.

        @raise usage.UsageError: a value is malformed (a one-line message).
        """
        # An empty value is a mistake (an unset shell variable, say), not a
        # request for the default.
        if any(not endpoint.strip() for endpoint in self["listen"]):
            raise usage.UsageError(f"--listen needs an endpoint, e.g. {DEFAULT_LISTEN}")
        if self["forward"] is not None and not self["forward"].strip():
            raise usage.UsageError("--forward needs an endpoint, e.g. tcp:127.0.0.1:6379")
        for option in ("keydir", "registry"):
            if self[option] is not None and not self[option].strip():
                raise usage.UsageError(f"--{option} needs a path")
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        if self["keydir"] is None:
            self["keydir"] = default_keydir()
        try:
            self["grace"] = parse_seconds("--grace", str(self["grace"]), allow_zero=True)
            self["handshake-timeout"] = parse_seconds(
                "--handshake-timeout", str(self["handshake-timeout"]), allow_zero=False
            )
            self["idle-timeout"] = (
                parse_seconds("--idle-timeout", str(self["idle-timeout"]), allow_zero=True) or None
            )
            self["workers"] = parse_count("--workers", str(self["workers"]))
            if not 1 <= self["workers"] <= MAX_WORKERS:
                raise ValueError(f"--workers must be from 1 to {MAX_WORKERS}")
            limits = {}
            for name in self._LIMITS:
                option = f"max-{name.replace('_', '-')}"
                limits[name] = parse_count(f"--{option}", str(self[option])) or None
        except ValueError as error:
            raise usage.UsageError(str(error)) from None
        self["limits"] = attrs.evolve(ConnectionLimits(), **limits)
        self.tunnels = [
            TunnelConfig(
                keydir=self["keydir"],
                listen=tuple(self["listen"]),
                forward=self["forward"],
                registry=self["registry"],
                grace=self["grace"],
                handshake_timeout=self["handshake-timeout"],
                idle_timeout=self["idle-timeout"],
                limits=self["limits"],
            )
        ]


def makeService(options: Options) -> IService:
    """
    The L{IServiceMaker} entry point: the service of the tunnels C{options}
    describe (with C{--workers} above 1, a supervisor of worker processes
    that run it). A configuration error exits with a one-line message.
    """
    if options["workers"] > 1:
        from .workers import make_supervisor_service

        return make_supervisor_service(options.tunnels[0], options["workers"])
    return make_service(options.tunnels)
