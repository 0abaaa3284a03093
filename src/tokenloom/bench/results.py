"""The result of one ``bench serve`` run and its JSON form.

One file per run::

    {"schema": "tokenloom-bench-serve/1", "label": "...", "config": {...},
     "levels": [{"concurrency": 32, "request_rate": null,
                 "summary": {"request_throughput": ..., "ttft_ms": {"mean", "p50", "p90", "p99", "count"}, ...},
                 "requests": [{"prompt_index", "prompt_len", "output_len", "start", "chunk_times", "end",
                               "error", "text"?}, ...]}]}

Request times are seconds from the start of their level. ``prompt_index`` is the
request's prompt in its level (the same prompt for the same workload and seed, in
any run); ``text``, its output, is there only with ``bench serve --save-texts``.
Latencies nobody measured (no completed request) are ``null``, not NaN, so the
file is strict JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenloom.bench.metrics import Distribution, LevelSummary, RequestRecord
from tokenloom.bench.serve import LoadLevel

SCHEMA = "tokenloom-bench-serve/1"
_TIME_DIGITS = 6


@dataclass(frozen=True, slots=True)
class LevelResult:
    level: LoadLevel
    summary: LevelSummary
    records: tuple[RequestRecord, ...]


@dataclass(frozen=True, slots=True)
class ServeResult:
    """Every level of one run against one server, and how it was run."""

    label: str
    config: dict[str, Any]
    levels: tuple[LevelResult, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "label": self.label, "config": self.config,
                "levels": [_level_to_dict(level) for level in self.levels]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServeResult:
        if data.get("schema") != SCHEMA:
            raise ValueError(f"not a {SCHEMA} result (schema: {data.get('schema')!r})")
        levels = tuple(_level_from_dict(level) for level in data["levels"])
        return cls(label=data["label"], config=data["config"], levels=levels)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ServeResult:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _level_to_dict(result: LevelResult) -> dict[str, Any]:
    origin = min((r.start for r in result.records), default=0.0)
    return {"concurrency": result.level.concurrency, "request_rate": result.level.request_rate,
            "summary": _nan_to_none(dataclasses.asdict(result.summary)),
            "requests": [_record_to_dict(r, origin) for r in result.records]}


def _level_from_dict(data: dict[str, Any]) -> LevelResult:
    summary = dict(data["summary"])
    for name, value in summary.items():
        if isinstance(value, dict):
            summary[name] = Distribution(**{k: math.nan if v is None else v for k, v in value.items()})
    return LevelResult(level=LoadLevel(concurrency=data["concurrency"], request_rate=data["request_rate"]),
                       summary=LevelSummary(**summary),
                       records=tuple(_record_from_dict(r) for r in data["requests"]))


def _record_to_dict(record: RequestRecord, origin: float) -> dict[str, Any]:
    def t(x: float) -> float:
        return round(x - origin, _TIME_DIGITS)

    data = {"prompt_index": record.prompt_index, "prompt_len": record.prompt_len, "output_len": record.output_len,
            "start": t(record.start), "chunk_times": [t(c) for c in record.chunk_times], "end": t(record.end),
            "error": record.error}
    return data if record.text is None else {**data, "text": record.text}


def _record_from_dict(data: dict[str, Any]) -> RequestRecord:
    return RequestRecord(prompt_len=data["prompt_len"], output_len=data["output_len"], start=data["start"],
                         chunk_times=tuple(data["chunk_times"]), end=data["end"], error=data["error"],
                         prompt_index=data.get("prompt_index"), text=data.get("text"))


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
