"""
The library benchmark's report: the table for people and the JSON for
machines, and the number formatting the tunnel report shares.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import IO, Any, TypeVar

from twisted.python.failure import Failure

from .figures import CRYPTO_COLUMN, BenchError, Report, Summary, evaluate_targets, summary_json

_R = TypeVar("_R")


def format_number(value: float) -> str:
    """
    A figure's value with a sensible number of digits: three significant
    ones, with k and M for thousands and millions from 10 000 up.
    """
    if value >= 1e6:
        return f"{value / 1e6:.3g}M"
    if value >= 1e4:
        return f"{value / 1e3:.3g}k"
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def format_summary(summary: Summary | None) -> str:
    """
    C{"median (min-max)"}, or C{"n/a"}.
    """
    if summary is None:
        return "n/a"
    if len(summary.runs) == 1:
        return format_number(summary.median)
    return (
        f"{format_number(summary.median)}"
        f" ({format_number(summary.low)}-{format_number(summary.high)})"
    )


def render(rows: list[list[str]], left: int = 2) -> list[str]:
    """
    Align C{rows} in columns: the first C{left} left-aligned, the rest
    right-aligned.
    """
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.ljust(width) if i < left else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=False))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def format_report(report: Report) -> str:
    """
    The human-readable report: the transport table, the crypto ceiling,
    and the targets.
    """
    env = report.environment
    lines = [
        f"curvetun benchmark: 127.0.0.1, server and client in separate processes,"
        f" {report.runs} run{'s' if report.runs != 1 else ''} interleaved"
        + (" (--quick: smoke run, not a measurement)" if report.quick else ""),
        f"curvetun {env.get('curvetun', '')}; {env.get('python', '')};"
        f" Twisted {env.get('twisted', '')}; PyNaCl {env.get('pynacl', '')};"
        f" {env.get('cpus', '')} CPUs, load {env.get('load', '?')} at start; {env.get('date', '')}",
        f"processes: {env.get('pin', 'not pinned')}",
    ]
    if report.tls:
        lines.append(f"TLS: {report.tls}, {report.environment.get('openssl', '')}")
    lines += report.skipped.values()
    if "curvetun-memory" in report.transports:
        lines.append(
            "curvetun: endpoint strings with a key directory each side;"
            " curvetun-memory: in-memory identities"
        )
    lines.append("values: median (min-max) of the runs; ratios: of the medians")
    network = [f for f in report.figures if not f.in_process]
    crypto = [f for f in report.figures if f.in_process]
    if network:
        ratios = [
            t for t in ("tcp", "tls") if t in report.transports and "curvetun" in report.transports
        ]
        header = ["figure", "unit", *report.transports, *(f"curvetun/{t}" for t in ratios)]
        rows = [header]
        for figure in network:
            row = [figure.title, figure.unit]
            row += [format_summary(report.summary(figure.key, t)) for t in report.transports]
            for t in ratios:
                ratio = report.ratio(figure.key, t)
                row.append("n/a" if ratio is None else f"{ratio:.2f}")
            rows.append(row)
        lines += ["", *render(rows)]
        if any(not f.higher_is_better for f in network):
            lines.append("(memory: lower is better; every other figure: higher is better)")
    if crypto:
        rows = [["in-process crypto ceiling (PyNaCl)", "unit", "value"]]
        for figure in crypto:
            rows.append(
                [
                    figure.title,
                    figure.unit,
                    format_summary(report.summary(figure.key, CRYPTO_COLUMN)),
                ]
            )
        lines += ["", *render(rows)]
    targets = [r for r in evaluate_targets(report) if r.target.figure in report.samples]
    if targets:
        rows = [["targets", "measured", "verdict"]]
        for result in targets:
            if result.measured is None:
                rows.append([result.target.label, "-", "not measured"])
            else:
                rows.append(
                    [
                        result.target.label,
                        f"{result.measured:.2f}",
                        "met" if result.met else "NOT MET",
                    ]
                )
        lines += ["", *render(rows, left=1)]
    lines.append("")
    lines.append(f"({report.seconds:.1f} s)")
    return "\n".join(lines) + "\n"


def report_json(report: Report) -> dict[str, Any]:
    """
    The report for machines (C{--json}).
    """
    figures = []
    for figure in report.figures:
        results: dict[str, Any] = {}
        columns = [CRYPTO_COLUMN] if figure.in_process else list(report.transports)
        for column in columns:
            results[column] = summary_json(report.summary(figure.key, column))
        ratios = {}
        if not figure.in_process and "curvetun" in report.transports:
            for other in ("tcp", "tls"):
                if other in report.transports:
                    ratios[f"curvetun/{other}"] = report.ratio(figure.key, other)
        figures.append(
            {
                "key": figure.key,
                "title": figure.title,
                "unit": figure.unit,
                "higher_is_better": figure.higher_is_better,
                "results": results,
                "ratios": ratios,
            }
        )
    return {
        "runs": report.runs,
        "quick": report.quick,
        "argv": report.argv,
        "environment": report.environment,
        "transports": list(report.transports),
        "skipped": report.skipped,
        "tls": report.tls,
        "seconds": report.seconds,
        "figures": figures,
        "crypto_ceiling_100": report.crypto_ceiling_100(),
        "targets": [
            {
                "label": result.target.label,
                "figure": result.target.figure,
                "reference": result.target.reference or None,
                "goal": result.target.goal,
                "at_most": result.target.at_most,
                "measured": result.measured,
                "met": result.met,
            }
            for result in evaluate_targets(report)
        ],
    }


def write_outcome(
    outcome: list[object],
    report: _R,
    as_json: bool,
    out: IO[str],
    to_json: Callable[[_R], object],
    to_text: Callable[[_R], str],
) -> int:
    """
    End a benchmark run: write C{report} to C{out} (as JSON or as the
    table) if the run succeeded, or one line on stderr (and the traceback
    of an unexpected error) if it failed or was interrupted; return the
    exit status (0 or 1).

    @param outcome: what the run ended with: empty if interrupted, else a
        one-element list holding a L{Failure} or the run's result.
    """
    if not outcome:
        sys.stderr.write("curvetun bench: interrupted\n")
        return 1
    if isinstance(outcome[0], Failure):
        failure = outcome[0]
        if not failure.check(BenchError):
            failure.printTraceback(sys.stderr)
        sys.stderr.write(f"curvetun bench: error: {failure.getErrorMessage()}\n")
        return 1
    if as_json:
        json.dump(to_json(report), out, indent=2)
        out.write("\n")
    else:
        out.write(to_text(report))
    out.flush()
    return 0
