"""``bench compare-texts``: do two runs of one workload give the same answers?

Both runs must have been made with ``bench serve --save-texts`` and the same
workload (name, seed, lengths, endpoint) and levels, so that request ``i`` of a
level is the same prompt in both. At temperature 0 an optimisation that must not
change outputs (speculative decoding, another kernel) should give identical texts;
this says how many are, and where the first difference begins.
"""

from __future__ import annotations

import os

from dataclasses import dataclass

from tokenloom.bench.results import ServeResult

_CONTEXT_CHARS = 60

TextKey = tuple[str, int]  # (level label, prompt index)


@dataclass(frozen=True, slots=True)
class TextDifference:
    level: str
    prompt_index: int
    first: str | None  # None: no text (the request failed or was never sent)
    second: str | None
    offset: int  # first character at which the two texts differ


@dataclass(frozen=True, slots=True)
class TextComparison:
    num_requests: int  # requests with a text in either run
    num_identical: int
    first_difference: TextDifference | None  # in level order, then prompt order

    @property
    def identical(self) -> bool:
        return self.first_difference is None


def saved_texts(result: ServeResult) -> dict[TextKey, str | None]:
    """Every request's text by (level, prompt index), in level then prompt order."""
    texts: dict[TextKey, str | None] = {}
    for level in result.levels:
        indexed = [(r.prompt_index, r.text) for r in level.records if r.prompt_index is not None]
        if len(indexed) != len(level.records):
            raise ValueError(f"{result.label}: requests carry no prompt_index (a result from before "
                             "--save-texts existed)")
        texts.update(((level.level.label, index), text) for index, text in sorted(indexed))
    if not any(text is not None for text in texts.values()):
        raise ValueError(f"{result.label}: no saved texts; run bench serve with --save-texts")
    return texts


def compare_texts(first: ServeResult, second: ServeResult) -> TextComparison:
    """Request by request; a request with text in one run and none in the other differs."""
    for key in ("workload", "levels"):
        if first.config.get(key) != second.config.get(key):
            raise ValueError(f"the runs differ in {key}: {first.config.get(key)} vs {second.config.get(key)}")
    a, b = saved_texts(first), saved_texts(second)
    keys = [*a, *(k for k in b if k not in a)]
    keys = [k for k in keys if a.get(k) is not None or b.get(k) is not None]
    differing = [k for k in keys if a.get(k) != b.get(k)]
    first_difference = None
    if differing:
        level, index = differing[0]
        text_a, text_b = a.get((level, index)), b.get((level, index))
        first_difference = TextDifference(level, index, text_a, text_b, _common_prefix_len(text_a or "", text_b or ""))
    return TextComparison(num_requests=len(keys), num_identical=len(keys) - len(differing),
                          first_difference=first_difference)


def format_comparison(comparison: TextComparison, first_label: str, second_label: str) -> str:
    lines = [f"{comparison.num_identical} of {comparison.num_requests} texts identical "
             f"({first_label} vs {second_label})"]
    diff = comparison.first_difference
    if diff is not None:
        lines.append(f"first difference: level {diff.level}, request {diff.prompt_index}, at character {diff.offset}")
        for label, text in ((first_label, diff.first), (second_label, diff.second)):
            lines.append(f"  {label}: " + ("(no text)" if text is None else repr(_around(text, diff.offset))))
    return "\n".join(lines)


def _common_prefix_len(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


def _around(text: str, offset: int) -> str:
    start = max(0, offset - _CONTEXT_CHARS // 2)
    return ("..." if start else "") + text[start:offset + _CONTEXT_CHARS // 2]
