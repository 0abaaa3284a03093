"""``bench serve --save-texts`` and ``bench compare-texts``: answers kept by prompt, compared by prompt."""

from __future__ import annotations

import json

from tokenloom.bench.cli import main
from tokenloom.bench.metrics import RequestRecord, summarize_level
from tokenloom.bench.results import LevelResult, ServeResult
from tokenloom.bench.serve import LoadLevel
from tokenloom.bench.texts import compare_texts
from tokenloom.bench.workloads import WorkloadSpec, build_workload
from tokenloom.engine.tokenizer import Tokenizer

CONFIG = {"workload": {"name": "copy", "seed": 0}, "levels": ["c=1", "c=4"]}


def _result(texts_by_level: dict[int, list[str | None]], label: str = "run", config=CONFIG) -> ServeResult:
    levels = []
    for concurrency, texts in texts_by_level.items():
        # Completion order is not prompt order: the records come reversed.
        records = [RequestRecord(prompt_len=10, output_len=3, start=0.0, chunk_times=() if t is None else (0.1,),
                                 end=0.2, error="HTTP 500" if t is None else None, prompt_index=i, text=t)
                   for i, t in reversed(list(enumerate(texts)))]
        levels.append(LevelResult(LoadLevel(concurrency=concurrency), summarize_level(records, 1.0), tuple(records)))
    return ServeResult(label=label, config=config, levels=tuple(levels))


def _compare(tmp_path, first: ServeResult, second: ServeResult) -> int:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    first.save(a)
    second.save(b)
    return main(["compare-texts", str(a), str(b)])


def test_identical_texts_exit_0(tmp_path, capsys):
    texts = {1: ["alpha", "beta", "gamma"], 4: ["delta", "epsilon", "zeta"]}
    assert _compare(tmp_path, _result(texts, "a"), _result(texts, "b")) == 0
    assert "6 of 6 texts identical (a vs b)" in capsys.readouterr().out


def test_the_first_difference_is_named_by_level_request_and_character(tmp_path, capsys):
    first = _result({1: ["alpha", "beta", "gamma"], 4: ["delta", "epsilon", "zeta"]}, "a")
    second = _result({1: ["alpha", "beta", "gamut"], 4: ["delta", "upsilon", "zeta"]}, "b")
    assert _compare(tmp_path, first, second) == 1
    out = capsys.readouterr().out
    assert "4 of 6 texts identical" in out
    assert "first difference: level c=1, request 2, at character 3" in out
    assert "'gamma'" in out and "'gamut'" in out


def test_a_request_without_text_in_one_run_differs():
    comparison = compare_texts(_result({1: ["alpha", "beta"]}), _result({1: ["alpha", None]}))
    assert (comparison.num_identical, comparison.num_requests) == (1, 2)
    diff = comparison.first_difference
    assert diff is not None and (diff.prompt_index, diff.first, diff.second) == (1, "beta", None)


def test_runs_without_saved_texts_or_of_other_workloads_cannot_be_compared(tmp_path, capsys):
    texts = _result({1: ["alpha"]})
    assert _compare(tmp_path, texts, _result({1: [None]})) == 2
    assert "--save-texts" in capsys.readouterr().err
    other = _result({1: ["alpha"]}, config={**CONFIG, "workload": {"name": "open", "seed": 0}})
    assert _compare(tmp_path, texts, other) == 2
    assert "differ in workload" in capsys.readouterr().err


def test_texts_and_prompt_indexes_survive_the_json_file():
    result = _result({1: ["alpha", None]})
    data = json.loads(json.dumps(result.to_dict()))
    requests = data["levels"][0]["requests"]
    assert [(r["prompt_index"], r.get("text")) for r in requests] == [(1, None), (0, "alpha")]
    assert "text" not in requests[0]  # no text, no key
    assert ServeResult.from_dict(data).levels[0].records == result.levels[0].records


def _serve(server, checkpoint, out, *extra: str) -> list[str]:
    return ["serve", "--base-url", f"{server.url}/v1", "--model", server.model_name,
            "--tokenizer", str(checkpoint.hf_dir), "--workload", "open", "--endpoint", "chat",
            "--force-output", "none", "--num-prompts", "4", "--output-len", "8", "--num-warmup", "0",
            "--output-json", str(out), "--quiet", *extra]


def test_open_workload_without_forced_length_saves_texts_and_counts_the_servers_tokens(
        tiny_server, tiny_checkpoint, tmp_path, capsys):
    first, second, plain = tmp_path / "first.json", tmp_path / "second.json", tmp_path / "plain.json"
    before = tiny_server.metrics()["tokenloom:generation_tokens_total"]
    assert main(_serve(tiny_server, tiny_checkpoint, first, "--concurrency", "1,2", "--save-texts")) == 0
    tiny_server.wait_idle()
    generated = tiny_server.metrics()["tokenloom:generation_tokens_total"] - before
    data = json.loads(first.read_text())
    assert data["config"]["save_texts"] is True and data["config"]["force_output"] == "none"
    tokenizer = Tokenizer.from_path(tiny_checkpoint.hf_dir)
    prompts = build_workload(WorkloadSpec("open", 8, 256, 8, endpoint="chat"), tokenizer)
    for i, level in enumerate(data["levels"]):
        requests = sorted(level["requests"], key=lambda r: r["prompt_index"])
        assert [r["prompt_index"] for r in requests] == [0, 1, 2, 3]
        for r, prompt in zip(requests, prompts[4 * i:4 * i + 4]):
            assert r["error"] is None and r["text"]
            assert r["prompt_len"] == prompt.prompt_len  # the server's count: the chat-encoded prompt
            assert 1 <= r["output_len"] <= 8
    # Output counts are the server's own (usage), whatever the text re-encodes to.
    assert generated == sum(r["output_len"] for level in data["levels"] for r in level["requests"])

    assert main(_serve(tiny_server, tiny_checkpoint, second, "--concurrency", "1,2", "--save-texts")) == 0
    capsys.readouterr()
    assert main(["compare-texts", str(first), str(second)]) == 0  # greedy: the same answers again
    assert "8 of 8 texts identical" in capsys.readouterr().out
    assert main(_serve(tiny_server, tiny_checkpoint, plain, "--concurrency", "1")) == 0
    assert all("text" not in r for r in json.loads(plain.read_text())["levels"][0]["requests"])
    tiny_server.wait_idle()

