"""
curvetun's benchmark (C{curvetun bench}, C{python -m curvetun.bench}).

The library figures: curvetun beside plain TCP and TLS 1.3 through
Twisted, on 127.0.0.1, all in one run::

    python -m curvetun.bench [--quick] [--json] [--runs N] [--only FIGURES]
                             [--transports tcp,tls,curvetun,curvetun-memory]
                             [--duration S] [--connections N]
                             [--pin none|same|split] [--profile DIR]

The tunnel comparison: C{twist curvetun} beside spiped and stunnel (when
installed) and no tunnel, each tunnel end its own process::

    python -m curvetun.bench --tunnel [--quick] [--json] [--runs N] ...

The worker scaling: C{twist curvetun --workers 1} and C{--workers N}
under the same load from several client processes::

    python -m curvetun.bench --workers N|auto [--clients P] [--quick] [--json] [--runs N] ...

The figures, how they are measured, and how to read them are in
C{docs/performance.md}. The modules, by job:

  - L{curvetun.bench.options}: the command line and the settings;
  - L{curvetun.bench.figures}: the figures, the targets, the report data;
  - L{curvetun.bench.transports}: how each transport listens and connects;
  - L{curvetun.bench.server}: the server process and its handle;
  - L{curvetun.bench.client}: the client protocols and the measurements;
  - L{curvetun.bench.runner}: the library benchmark's run;
  - L{curvetun.bench.report}: the library report, as a table or JSON;
  - L{curvetun.bench.tunnel}: the tunnel comparison, run and report;
  - L{curvetun.bench.scale}: the worker scaling, run and report;
  - L{curvetun.bench.load}: a client process of the worker scaling.
"""

from __future__ import annotations

import sys

from twisted.python import usage

from .options import BenchOptions, settings_from
from .server import log_warnings_only, serve
from .transports import ServerIdentity

__all__ = ["main"]


def main(argv: list[str]) -> int:
    """
    C{curvetun bench}: run the benchmark (or, with the internal
    C{--serve}, be one of its server processes).

    @param argv: the arguments after the command name.
    @return: the exit status: 0 done, 1 failed, 2 bad command line.
    """
    options = BenchOptions()
    try:
        options.parseOptions(argv)
    except usage.UsageError as error:
        # One line, always, as curvetun's other commands say it.
        message = " ".join(str(error).splitlines())
        sys.stderr.write(f"curvetun bench: error: {message} (see 'curvetun bench --help')\n")
        return 2
    except SystemExit as exit:
        # --help and --version print, then exit.
        return exit.code if isinstance(exit.code, int) else 0
    if options["serve"] is not None:
        identity = ServerIdentity(
            client_key=bytes.fromhex(options["client-key"] or ""),
            tls_dir=options["tls-dir"],
            keydir=options["keydir"],
            registry=options["registry"],
        )
        return serve(options["serve"], identity, options["profile-to"], options["cpu"])
    log_warnings_only()
    settings = settings_from(options)
    if settings.workers:
        from .scale import run_scale_benchmark

        return run_scale_benchmark(settings, argv, sys.stdout, bool(options["json"]))
    if settings.tunnel:
        from .tunnel import run_tunnel_benchmark

        return run_tunnel_benchmark(settings, argv, sys.stdout, bool(options["json"]))
    from .runner import run_benchmark

    return run_benchmark(settings, argv, sys.stdout, bool(options["json"]))
