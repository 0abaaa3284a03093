from __future__ import annotations

import math

import pytest

from tokenloom.bench.metrics import RequestRecord, distribution_ms, percentile, summarize_level


def test_percentile_interpolates_between_order_statistics():
    values = [40.0, 10.0, 30.0, 20.0]  # sorted: 10 20 30 40
    assert percentile(values, 0) == 10.0
    assert percentile(values, 100) == 40.0
    assert percentile(values, 50) == 25.0  # rank 1.5
    assert percentile(values, 90) == pytest.approx(37.0)  # rank 2.7: 30 + 0.7 * 10
    assert percentile(values, 99) == pytest.approx(39.7)


def test_percentile_of_one_value_and_of_none():
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def _stream(start: float, chunks: list[float], end: float, output_len: int | None = None,
            prompt_len: int = 10) -> RequestRecord:
    return RequestRecord(prompt_len=prompt_len, output_len=len(chunks) if output_len is None else output_len,
                         start=start, chunk_times=tuple(chunks), end=end)


def test_ttft_itl_tpot_e2e_from_a_recorded_stream():
    # Sent at 100.0; first token after 0.5 s; then gaps of 0.1, 0.2, 0.3; stream closed at 101.2.
    record = _stream(100.0, [100.5, 100.6, 100.8, 101.1], 101.2)
    assert record.ok
    assert record.ttft == pytest.approx(0.5)
    assert record.itls == pytest.approx([0.1, 0.2, 0.3])
    assert record.tpot == pytest.approx(0.6 / 3)
    assert record.e2e_latency == pytest.approx(1.2)


def test_tpot_counts_tokens_when_a_chunk_carries_several():
    record = _stream(0.0, [1.0, 2.0], 2.0, output_len=5)  # 4 tokens after the first in 1 s
    assert record.itls == [1.0]
    assert record.tpot == pytest.approx(0.25)
    assert _stream(0.0, [1.0], 1.0).tpot is None


def test_distribution_reports_milliseconds():
    d = distribution_ms([0.1, 0.2, 0.3, 0.4])
    assert (d.count, d.mean, d.p50) == (4, pytest.approx(250.0), pytest.approx(250.0))
    assert d.p99 == pytest.approx(397.0)
    empty = distribution_ms([])
    assert empty.count == 0 and math.isnan(empty.mean) and math.isnan(empty.p99)


def test_summarize_level_counts_and_rates():
    records = [
        _stream(0.0, [0.2, 0.3, 0.4], 0.4, prompt_len=8),  # ttft 0.2, tpot 0.1
        _stream(0.1, [0.5, 0.7], 0.8, prompt_len=8),  # ttft 0.4, tpot 0.2
        RequestRecord(prompt_len=8, output_len=0, start=0.0, chunk_times=(), end=0.1, error="HTTP 500: boom"),
    ]
    s = summarize_level(records, duration_s=2.0)
    assert (s.num_completed, s.num_errors) == (2, 1)
    assert (s.total_prompt_tokens, s.total_output_tokens) == (16, 5)
    assert s.request_throughput == 1.0
    assert s.output_throughput == 2.5
    assert s.total_token_throughput == 10.5
    assert s.ttft_ms.mean == pytest.approx(300.0)
    assert s.itl_ms.count == 3  # two gaps in the first stream, one in the second
    assert s.itl_ms.mean == pytest.approx((100 + 100 + 200) / 3)
    assert s.tpot_ms.mean == pytest.approx(150.0)
    assert s.e2e_latency_ms.p50 == pytest.approx(550.0)


def test_summarize_level_rejects_a_non_positive_duration():
    with pytest.raises(ValueError):
        summarize_level([], duration_s=0.0)


def test_bench_is_a_subcommand_of_the_main_cli():
    from tokenloom.entrypoints.cli import build_parser

    args = build_parser().parse_args(["bench", "report", "a.json", "b.json", "--markdown", "t.md"])
    assert (args.command, args.bench_command) == ("bench", "report")
    assert [str(p) for p in args.results] == ["a.json", "b.json"] and str(args.markdown) == "t.md"
