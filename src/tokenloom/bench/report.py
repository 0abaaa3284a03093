"""Reports from ``bench serve`` result files: markdown tables and one self-contained HTML page.

Several files (one per engine) overlay in one report. The comparison table puts
every run beside a baseline run (by default the one labelled ``tokenloom``) as
ratios baseline / peer at each load level both ran: above 1 for throughput, or
below 1 for latency, means the baseline is ahead.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from html import escape

from tokenloom.bench.metrics import LevelSummary, RequestRecord
from tokenloom.bench.results import LevelResult, ServeResult
from tokenloom.bench.svg import Series, line_chart

SUMMARY_COLUMNS: tuple[tuple[str, Callable[[LevelSummary], float]], ...] = (
    ("req/s", lambda s: s.request_throughput),
    ("output tok/s", lambda s: s.output_throughput),
    ("total tok/s", lambda s: s.total_token_throughput),
    ("TTFT mean ms", lambda s: s.ttft_ms.mean),
    ("TTFT p50 ms", lambda s: s.ttft_ms.p50),
    ("TTFT p90 ms", lambda s: s.ttft_ms.p90),
    ("TTFT p99 ms", lambda s: s.ttft_ms.p99),
    ("ITL mean ms", lambda s: s.itl_ms.mean),
    ("ITL p50 ms", lambda s: s.itl_ms.p50),
    ("ITL p99 ms", lambda s: s.itl_ms.p99),
    ("TPOT mean ms", lambda s: s.tpot_ms.mean),
    ("e2e p50 ms", lambda s: s.e2e_latency_ms.p50),
    ("e2e p99 ms", lambda s: s.e2e_latency_ms.p99),
)
# Compared as baseline / peer.
RATIO_COLUMNS: tuple[tuple[str, Callable[[LevelSummary], float]], ...] = (
    ("output tok/s", lambda s: s.output_throughput),
    ("TTFT p50 ms", lambda s: s.ttft_ms.p50),
    ("TTFT p99 ms", lambda s: s.ttft_ms.p99),
    ("TPOT mean ms", lambda s: s.tpot_ms.mean),
    ("e2e p50 ms", lambda s: s.e2e_latency_ms.p50),
)

Table = tuple[list[str], list[list[str]]]


def summary_table(results: Sequence[ServeResult]) -> Table:
    """One row per run and level, every metric of the level summary."""
    header = ["engine", "level", "done", "errors", *(name for name, _ in SUMMARY_COLUMNS)]
    rows = []
    for result in results:
        for level in result.levels:
            s = level.summary
            rows.append([result.label, level.level.label, str(s.num_completed), str(s.num_errors),
                         *(_fmt(metric(s)) for _, metric in SUMMARY_COLUMNS)])
    return header, rows


def comparison_table(results: Sequence[ServeResult], baseline: str = "tokenloom") -> Table:
    """Baseline vs each other run at each level both ran: both values and their ratio."""
    base = next((r for r in results if r.label == baseline), None)
    if base is None:
        raise ValueError(f"no result labelled {baseline!r} among {[r.label for r in results]}")
    header = ["level", "peer"]
    for name, _ in RATIO_COLUMNS:
        header += [f"{name} {baseline}", f"{name} peer", f"{name} ratio"]
    rows = []
    for level in base.levels:
        for peer in (r for r in results if r is not base):
            other = _level_of(peer, level)
            if other is None:
                continue
            row = [level.level.label, peer.label]
            for _, metric in RATIO_COLUMNS:
                a, b = metric(level.summary), metric(other.summary)
                row += [_fmt(a), _fmt(b), _fmt_ratio(a, b)]
            rows.append(row)
    return header, rows


def markdown(table: Table) -> str:
    header, rows = table
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def html_table(table: Table) -> str:
    header, rows = table
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_report(results: Sequence[ServeResult], title: str = "tokenloom bench", baseline: str = "tokenloom") -> str:
    """One HTML page, no external resources: tables, then the plots."""
    sections = [f"<h1>{escape(title)}</h1>", _html_configs(results),
                "<h2>Summary</h2>", html_table(summary_table(results))]
    if len(results) > 1 and any(r.label == baseline for r in results):
        sections += [f"<h2>{escape(baseline)} / peer</h2>",
                     "<p>Ratios above 1 for throughput, below 1 for latency, mean the baseline is ahead.</p>",
                     html_table(comparison_table(results, baseline))]
    sections += ["<h2>Plots</h2>", *_level_charts(results), *_distribution_charts(results)]
    return _HTML_PAGE.format(title=escape(title), body="\n".join(sections))


def _level_charts(results: Sequence[ServeResult]) -> list[str]:
    x_label = "concurrency" if results[0].levels[0].level.concurrency is not None else "request rate (req/s)"
    xs = [_level_x(level) for r in results for level in r.levels]
    log_x = bool(xs) and max(xs) / min(xs) >= 8

    def chart(title: str, y_label: str, metric: Callable[[LevelSummary], float]) -> str:
        series = [Series(r.label, tuple((_level_x(lv), metric(lv.summary)) for lv in r.levels)) for r in results]
        return line_chart(title, x_label, y_label, series, log_x=log_x)

    return [chart("Output throughput", "output tokens / s", lambda s: s.output_throughput),
            chart("Request throughput", "requests / s", lambda s: s.request_throughput),
            chart("Time to first token (p50)", "ms", lambda s: s.ttft_ms.p50),
            chart("Time to first token (p99)", "ms", lambda s: s.ttft_ms.p99),
            chart("Time per output token (mean)", "ms", lambda s: s.tpot_ms.mean),
            chart("End-to-end latency (p50)", "ms", lambda s: s.e2e_latency_ms.p50)]


def _distribution_charts(results: Sequence[ServeResult]) -> list[str]:
    """Empirical CDFs of per-request latencies, one line per run and level."""
    def cdf(title: str, value: Callable[[RequestRecord], float | None]) -> str:
        series = []
        for r in results:
            for lv in r.levels:
                values = sorted(v * 1000 for v in (value(rec) for rec in lv.records if rec.ok) if v is not None)
                n = len(values)
                series.append(Series(f"{r.label} {lv.level.label}",
                                     tuple((v, (i + 1) / n) for i, v in enumerate(values))))
        return line_chart(title, "ms", "fraction of requests", series)

    return [cdf("TTFT distribution", lambda rec: rec.ttft),
            cdf("TPOT distribution", lambda rec: rec.tpot),
            cdf("End-to-end latency distribution", lambda rec: rec.e2e_latency)]


def _html_configs(results: Sequence[ServeResult]) -> str:
    items = "".join(f"<details><summary>{escape(r.label)}: run settings</summary><pre>"
                    f"{escape(json.dumps(r.config, indent=1))}</pre></details>" for r in results)
    return f"<div>{items}</div>"


def _level_of(result: ServeResult, level: LevelResult) -> LevelResult | None:
    return next((lv for lv in result.levels if lv.level == level.level), None)


def _level_x(level: LevelResult) -> float:
    return float(level.level.concurrency if level.level.concurrency is not None else level.level.request_rate or 0)


def _fmt(value: float) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def _fmt_ratio(a: float, b: float) -> str:
    if math.isnan(a) or math.isnan(b) or b == 0:
        return "-"
    return f"{a / b:.2f}"


_HTML_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; font-size: 12px; margin-bottom: 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 3px 6px; text-align: right; }}
th {{ background: #f4f4f4; }}
svg {{ display: block; margin: 1em 0; }}
</style></head>
<body>
{body}
</body></html>
"""
