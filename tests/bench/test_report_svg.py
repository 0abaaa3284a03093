from __future__ import annotations

import math

from tokenloom.bench.metrics import RequestRecord, summarize_level
from tokenloom.bench.report import comparison_table, markdown, summary_table
from tokenloom.bench.results import LevelResult, ServeResult
from tokenloom.bench.serve import LoadLevel
from tokenloom.bench.svg import Series, line_chart, nice_ticks


def _result(label: str, seconds_per_request: float) -> ServeResult:
    levels = []
    for concurrency in (1, 4):
        records = [RequestRecord(prompt_len=10, output_len=5, start=0.0,
                                 chunk_times=(0.1, 0.2, 0.3, 0.4, 0.5), end=seconds_per_request)]
        levels.append(LevelResult(LoadLevel(concurrency=concurrency), summarize_level(records, 1.0), tuple(records)))
    return ServeResult(label=label, config={}, levels=tuple(levels))


def test_nice_ticks_are_round_and_cover_the_range():
    assert nice_ticks(0, 97) == [0, 20, 40, 60, 80, 100]
    assert nice_ticks(0, 1.2) == [0, 0.5, 1.0, 1.5]
    assert nice_ticks(0, 0) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]


def test_line_chart_draws_one_polyline_per_series_and_skips_nan():
    svg = line_chart("t", "x", "y", [Series("a", ((1, 2), (2, 4))), Series("b", ((1, math.nan), (2, 1)))])
    assert svg.startswith("<svg") and svg.count("<polyline") == 2
    assert "nan" not in svg
    assert "no data" in line_chart("t", "x", "y", [Series("a", ((1, math.nan),))])


def test_comparison_table_gives_ratios_per_level():
    header, rows = comparison_table([_result("tokenloom", 1.0), _result("peer", 2.0)])
    assert [row[:2] for row in rows] == [["c=1", "peer"], ["c=4", "peer"]]
    e2e = header.index("e2e p50 ms ratio")
    assert [row[e2e] for row in rows] == ["0.50", "0.50"]
    out = header.index("output tok/s ratio")
    assert [row[out] for row in rows] == ["1.00", "1.00"]


def test_summary_table_has_a_row_per_run_and_level():
    text = markdown(summary_table([_result("tokenloom", 1.0), _result("peer", 2.0)]))
    assert [line.split(" | ")[:2] for line in text.splitlines()[2:]] == [
        ["| tokenloom", "c=1"], ["| tokenloom", "c=4"], ["| peer", "c=1"], ["| peer", "c=4"]]
