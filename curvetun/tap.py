"""
C{twist curvetun}: forward connections between endpoints, either of which
may be a curvetun endpoint, or echo them.

    twist curvetun [--listen ENDPOINT]... [--forward ENDPOINT]
                   [--keydir DIR] [--registry FILE] [--grace SECONDS]
                   [--handshake-timeout SECONDS] [--send-proxy v1|v2] ...
    twist curvetun --config FILE [--metrics ENDPOINT] [--workers N]

The server end of a tunnel to a local service::

    twist curvetun --listen curvetun:7700 --forward tcp:127.0.0.1:6379

and its client end::

    twist curvetun --listen tcp:6380:interface=127.0.0.1 --forward curvetun:server:7700:key=KEY

Without C{--forward} each connection is echoed, so that C{twist curvetun}
alone is a curvetun server to try. The options describe one tunnel, a
L{TunnelConfig}; C{--config} names a file describing several
(L{curvetun.config.read_config_file}). L{curvetun.tunnel_service} runs
them (and says how they stop and with which exit status they fail to
start).
"""

from __future__ import annotations

import signal
from typing import ClassVar

import attrs
from twisted.application.service import IService
from twisted.python import usage

from .admission import ConnectionLimits
from .config import (
    DEFAULT_GRACE,
    LIMITS,
    MAX_WORKERS,
    NETWORK_PREFIXES,
    TUNNEL_KEYS,
    SettingError,
    TunnelConfig,
    parse_count,
    tunnel_config,
)
from .factories import DEFAULT_HANDSHAKE_TIMEOUT
from .tunnel_service import make_service, make_service_from_file


def _default(text: object) -> str:
    return f" [default: {text}]"


class Options(usage.Options):
    """
    The options of C{twist curvetun}. After parsing, C{tunnels} is the list
    of the tunnels they describe (one), or empty with C{--config}, whose
    path is then C{self["config"]}; the values are also kept by name:
    C{"listen"} a non-empty list of endpoint strings, C{"forward"} an
    endpoint string or L{None}, C{"keydir"} a path, C{"registry"} a path or
    L{None} (the key directory's), C{"grace"}, C{"handshake-timeout"} and
    C{"idle-timeout"} floats (the last L{None} for none), C{"limits"} a
    L{ConnectionLimits}, C{"send-proxy"} C{"v1"}, C{"v2"} or L{None}, and
    C{"metrics"} (also with C{--config}) an endpoint string or L{None}.
    C{"keep-sessions-on-revoke"} a bool. C{"workers"} is a number from 1
    to L{MAX_WORKERS}; with C{--config}, L{None} when not given (then the
    file's C{workers} says, else 1).
    """

    synopsis = (
        "[--listen ENDPOINT]... [--forward ENDPOINT] [--keydir DIR] "
        "[--registry FILE] [--grace SECONDS] [--handshake-timeout SECONDS] "
        "[--idle-timeout SECONDS] [--max-connections N] ... [--send-proxy v1|v2] "
        "[--keep-sessions-on-revoke] [--statedir DIR] [--instance ID [--change-instance]] "
        "[--metrics ENDPOINT] [--workers N]"
        "\n       twist [options] curvetun --config FILE [--metrics ENDPOINT] [--workers N]"
    )
    longdesc = (
        "Forward each connection accepted on a --listen endpoint to a connection "
        "opened through the --forward endpoint, both ways, once the incoming side "
        "is authenticated; either may be a curvetun: endpoint. Without --forward, "
        "echo what is received. The key directory is created, with a fresh key, "
        "if it does not exist. --config FILE runs the tunnels a TOML file describes "
        "instead (see docs/usage.md). --workers N runs them in N worker processes "
        "behind one vault process per key directory (see docs/deploy.md)."
    )

    # Every tunnel option defaults to None here, so that postOptions can
    # tell what was given (to refuse it with --config); the defaults are
    # filled in by tunnel_config, and shown in the help text.
    optParameters: ClassVar[list[list[str | None]]] = [
        [
            "config",
            "c",
            None,
            "TOML file describing the tunnels to run (only --metrics and --workers besides).",
        ],
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
            "statedir",
            None,
            None,
            (
                "Writable directory for the mutable files (a nonce counter per key, the "
                "lock, the instance ID), so that the key directory may be read-only "
                "[default: the key directory]."
            ),
        ],
        [
            "instance",
            None,
            None,
            (
                "This host's instance ID, 0 to 65535, for a key directory copied to "
                "several hosts: each gets its own part of the nonce counter space "
                "[default: the one stored in the state directory]."
            ),
        ],
        [
            "grace",
            "g",
            None,
            "Seconds open connections may take to finish when stopping; then they are aborted."
            + _default(DEFAULT_GRACE),
        ],
        [
            "handshake-timeout",
            None,
            None,
            "Seconds a curvetun handshake may take." + _default(DEFAULT_HANDSHAKE_TIMEOUT),
        ],
        [
            "idle-timeout",
            None,
            None,
            "Close a curvetun connection that receives nothing for this many seconds (0: never)."
            + _default(0),
        ],
        *(
            [
                f"max-{name.replace('_', '-')}",
                None,
                None,
                (
                    f"The most {what} a curvetun listen endpoint takes at once "
                    "(0: no limit); past it, new connections are closed at once."
                    + _default(getattr(ConnectionLimits(), name))
                ),
            ]
            for name, what in LIMITS.items()
        ),
        *(
            [
                name.replace("_", "-"),
                None,
                None,
                (
                    f"The length of the IPv{name[3]} networks the per-network limits count "
                    f"(0 to {longest})." + _default(getattr(ConnectionLimits(), name))
                ),
            ]
            for name, longest in NETWORK_PREFIXES.items()
        ),
        [
            "workers",
            None,
            None,
            (
                "Worker processes, each running every tunnel; with more than one, a "
                "supervisor runs them and one vault process per key directory, the only one "
                f"that reads it (1 to {MAX_WORKERS}; with --config it overrides the file's "
                "workers; see docs/deploy.md)." + _default(1)
            ),
        ],
        [
            "send-proxy",
            None,
            None,
            (
                "Start each forward connection with a PROXY protocol header, v1 or v2, "
                "giving the client's address (v2 also its curvetun key, in TLV 0xE0)."
            ),
        ],
        [
            "metrics",
            None,
            None,
            (
                "Server endpoint string to serve /metrics (Prometheus), /status (JSON) and "
                "/healthz on over HTTP, e.g. tcp:9100:interface=127.0.0.1; allowed with "
                "--config, where it overrides the file's metrics; with --workers, the "
                "supervisor serves the figures summed over the workers."
            ),
        ],
    ]

    optFlags: ClassVar[list[list[str | None]]] = [
        [
            "change-instance",
            None,
            (
                "Let --instance replace the instance ID stored in the state directory "
                "(only when the old ID is no longer used anywhere with this key)."
            ),
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["forward"] = None
        self["keep-sessions-on-revoke"] = None
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

    def opt_keep_sessions_on_revoke(self) -> None:
        # One line: usage.Options shows a flag's docstring as it is written.
        """Keep connections the registry no longer admits [default: close them]."""
        self["keep-sessions-on-revoke"] = "true"

    def postOptions(self) -> None:
        """
        Check the values, fill in the defaults, and build the tunnel; with
        C{--config}, check that no tunnel option was given.

        @raise usage.UsageError: a value is malformed, or a tunnel option
            is given with C{--config} (a one-line message).
        """
        # Only tunnel settings are refused with --config: an option about
        # the process as a whole (--metrics) is not one of TUNNEL_KEYS,
        # and goes with --config as it is.
        if self["metrics"] is not None and not self["metrics"].strip():
            raise usage.UsageError("--metrics needs an endpoint, e.g. tcp:9100:interface=127.0.0.1")
        if self["workers"] is not None:
            try:
                self["workers"] = parse_count("--workers", str(self["workers"]))
            except ValueError as error:
                raise usage.UsageError(str(error)) from None
            if not 1 <= self["workers"] <= MAX_WORKERS:
                raise usage.UsageError(f"--workers must be from 1 to {MAX_WORKERS}")
            if self["workers"] > 1 and self["change-instance"]:
                raise usage.UsageError(_CHANGE_INSTANCE_WITH_WORKERS)
        given = {
            key: self[key.replace("_", "-")]
            for key in TUNNEL_KEYS
            if key != "name" and self[key.replace("_", "-")] not in (None, [])
        }
        if self["config"] is not None:
            if not self["config"].strip():
                raise usage.UsageError("--config needs a path")
            mixed = [f"--{key.replace('_', '-')}" for key in given]
            if mixed:
                raise usage.UsageError(
                    f"--config cannot be combined with {', '.join(mixed)}: "
                    "set it in the config file's [[tunnel]] tables"
                )
            return
        if self["workers"] is None:
            self["workers"] = 1
        try:
            config = tunnel_config(given)
        except SettingError as error:
            raise usage.UsageError(str(error)) from None
        if self["change-instance"]:
            if config.instance is None:
                raise usage.UsageError("--change-instance needs --instance")
            config = attrs.evolve(config, change_instance=True)
        self.tunnels = [config]
        self["listen"] = list(config.listen)
        self["keydir"] = config.keydir
        self["grace"] = config.grace
        self["handshake-timeout"] = config.handshake_timeout
        self["idle-timeout"] = config.idle_timeout
        self["limits"] = config.limits
        self["send-proxy"] = config.send_proxy
        self["keep-sessions-on-revoke"] = config.keep_sessions_on_revoke


_CHANGE_INSTANCE_WITH_WORKERS = (
    "--change-instance is not taken with --workers: change the stored instance ID "
    "with one process first"
)


def makeService(options: Options) -> IService:
    """
    The L{IServiceMaker} entry point: the service of the tunnels C{options}
    describe (with more than one worker, from C{--workers} or the config
    file's C{workers}, a supervisor of worker processes that each run
    every tunnel). A configuration error exits with a one-line message.
    """
    workers = options["workers"]
    if options["config"] is not None and workers != 1:
        from .workers import exit_usage, make_supervisor_service_from_file, read_config_or_exit

        process = read_config_or_exit(options["config"])
        if workers is None:
            workers = process.workers or 1
        if workers > 1:
            if options["change-instance"]:
                exit_usage(_CHANGE_INSTANCE_WITH_WORKERS)
            return make_supervisor_service_from_file(process, workers, metrics=options["metrics"])
    elif workers > 1:
        from .workers import make_supervisor_service

        return make_supervisor_service(options.tunnels[0], workers, metrics=options["metrics"])
    if options["config"] is not None:
        return make_service_from_file(
            options["config"],
            metrics=options["metrics"],
            change_instance=bool(options["change-instance"]),
            reload_signal=signal.SIGHUP,
        )
    return make_service(options.tunnels, metrics=options["metrics"], reload_signal=signal.SIGHUP)
