"""Tensor parallelism through the engine (CPU, gloo): the ranks are real processes and
the engine over 2 (or 4) of them gives what it gives on one, with every feature that
lives above the runner; a dead rank is a clear error; no process outlives the engine."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.engine.test_engine import make_llm, token_ids
from tests.engine.test_spec_decode import NGRAM, PROMPTS, generate_checked
from tests.helpers.tensor_parallel import REPO, free_init_method
from tests.helpers.tiny_models import write_random_kquant_gguf
from tests.helpers.tiny_tokenizer import make_tiny_tokenizer
from tokenloom import LLM, SamplingParams, StructuredOutputsParams
from tokenloom.engine.llm_engine import LLMEngine

GREEDY_32 = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
# Short of room: 40 blocks of 4 tokens, so that the batch below preempts and recomputes.
SMALL_CACHE = {"num_kv_blocks": 40, "block_size": 4}


def _state_and_parent(pid: int) -> tuple[str, int] | None:
    """A process's state letter and parent pid from /proc (None: it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def running(pid: int) -> bool:
    info = _state_and_parent(pid)
    return info is not None and info[0] != "Z"


def child_pids() -> set[int]:
    """This process's live children (from /proc), zombies excluded."""
    return {int(e) for e in os.listdir("/proc") if e.isdigit() and running(int(e))
            and (_state_and_parent(int(e)) or ("", 0))[1] == os.getpid()}


def wait_for_no_children(before: set[int], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while child_pids() - before:
        assert time.monotonic() < deadline, f"processes left behind: {child_pids() - before}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def single(tiny_checkpoint) -> LLM:
    return make_llm(tiny_checkpoint.hf_dir)


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_two_ranks_give_the_greedy_tokens_of_one(tiny_checkpoint, single, fmt):
    path = tiny_checkpoint.hf_dir if fmt == "hf" else tiny_checkpoint.gguf_path
    before = child_pids()
    split = make_llm(path, tensor_parallel_size=2)
    assert len(child_pids() - before) == 1  # rank 1; rank 0 is this process
    try:
        assert token_ids(split.generate(PROMPTS, GREEDY_32, use_tqdm=False)) == \
            token_ids(single.generate(PROMPTS, GREEDY_32, use_tqdm=False))
    finally:
        split.engine.shutdown()
    assert [p.returncode for p in split.engine.tp.ranks.processes.values()] == [0]  # a clean exit on stop
    wait_for_no_children(before)


def test_features_above_the_runner_work_on_two_ranks(tiny_checkpoint):
    """Preemption, prefix caching, n-gram speculation, structured output, seeded n > 1,
    logprobs and prompt logprobs: the same outputs on 2 ranks as on 1."""
    shared = "The same long prefix for every one of these prompts, so that blocks are shared: "
    prompts = [shared + p for p in PROMPTS]
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2, prompt_logprobs=1),
              SamplingParams(temperature=0.8, seed=7, n=2, max_tokens=16, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=40, structured_outputs=StructuredOutputsParams(
                  regex=r"(ab|cd){3,8}")),
              *[SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)] * (len(prompts) - 3)]
    results = []
    for size in (1, 2):
        llm = make_llm(tiny_checkpoint.hf_dir, tensor_parallel_size=size, speculative_config=NGRAM, **SMALL_CACHE)
        try:
            results.append(generate_checked(llm, prompts, params))
            stats = llm.engine.stats.snapshot()
            assert stats.num_preemptions_total > 0 and stats.prefix_cache_hits_total > 0
            assert stats.spec_decode_accepted_tokens_total > 0
        finally:
            llm.engine.shutdown()
    one, two = results
    for a, b in zip(one, two):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
        assert [c.text for c in a.outputs] == [c.text for c in b.outputs]
    for a, b in ((one[0].outputs[0].logprobs, two[0].outputs[0].logprobs),
                 (one[0].prompt_logprobs[1:], two[0].prompt_logprobs[1:])):
        for x, y in zip(a, b):
            assert x.keys() == y.keys()
            assert all(abs(x[t].logprob - y[t].logprob) < 1e-4 for t in x)


def test_a_draft_model_drafts_whole_on_rank_0_for_a_split_target(tiny_checkpoint, single):
    """The target drafting for itself: every draft is right, on 2 ranks as on 1."""
    spec = {"method": "draft_model", "model": str(tiny_checkpoint.hf_dir), "num_speculative_tokens": 3,
            "disable_by_batch_size": None}
    llm = make_llm(tiny_checkpoint.hf_dir, tensor_parallel_size=2, speculative_config=spec)
    try:
        assert token_ids(generate_checked(llm, PROMPTS, GREEDY_32)) == \
            token_ids(single.generate(PROMPTS, GREEDY_32, use_tqdm=False))
        stats = llm.engine.stats.snapshot()
        assert stats.spec_decode_accepted_tokens_total == stats.spec_decode_draft_tokens_total > 0
        assert llm.engine.drafter.draft_model.runner.model.group.size == 1
    finally:
        llm.engine.shutdown()


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_over_nccl_give_the_greedy_tokens_of_one(tiny_checkpoint):
    options = {"device": "cuda", "dtype": "float32"}
    one = make_llm(tiny_checkpoint.hf_dir, **options)
    expected = token_ids(one.generate(PROMPTS, GREEDY_32, use_tqdm=False))
    split = make_llm(tiny_checkpoint.hf_dir, tensor_parallel_size=2, **options)
    try:
        assert str(split.engine.runner.device) == "cuda:0"
        assert token_ids(split.generate(PROMPTS, GREEDY_32, use_tqdm=False)) == expected
    finally:
        split.engine.shutdown()


def test_an_abort_mid_run_frees_every_block_on_two_ranks(tiny_checkpoint):
    llm = make_llm(tiny_checkpoint.hf_dir, tensor_parallel_size=2)
    engine = llm.engine
    try:
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(f"r{i}", prompt, GREEDY_32)
        for _ in range(3):
            engine.step()
        engine.abort_request("r1")
        while engine.has_unfinished_requests():
            engine.step()
            engine.check_integrity()
        assert engine.kv_manager.usage == 0
        assert len(llm.generate(PROMPTS[:2], GREEDY_32, use_tqdm=False)) == 2
    finally:
        engine.shutdown()


def test_a_dead_rank_is_a_clear_error_and_leaves_no_process(tiny_checkpoint):
    before = child_pids()
    engine = LLMEngine.from_options(str(tiny_checkpoint.hf_dir), num_kv_blocks=64, block_size=4,
                                    tensor_parallel_size=2)
    engine.tp.ranks.processes[1].kill()
    deadline = time.monotonic() + 10
    while engine.tp.ranks.failure is None:
        assert time.monotonic() < deadline, "the death of rank 1 went unnoticed"
        time.sleep(0.02)
    with pytest.raises(RuntimeError, match=r"tensor-parallel rank 1 \(pid \d+\) exited with code -9"):
        engine.check_health()
    engine.add_request("r", PROMPTS[0], GREEDY_32)
    with pytest.raises(RuntimeError):
        engine.step()  # the exchange with the dead rank fails at once, rather than hanging
    engine.shutdown()
    wait_for_no_children(before)


def test_ranks_end_with_rank_0s_process_however_it_ends(tiny_checkpoint):
    script = ("import time; from tokenloom import LLM; "
              f"llm = LLM({str(tiny_checkpoint.hf_dir)!r}, num_kv_blocks=64, block_size=4, tensor_parallel_size=2); "
              "print(llm.engine.tp.ranks.processes[1].pid, flush=True); time.sleep(120)")
    rank_0 = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    rank_1 = int(rank_0.stdout.readline())
    rank_0.kill()  # SIGKILL: no shutdown, no atexit
    rank_0.wait()
    deadline = time.monotonic() + 10
    while running(rank_1):
        assert time.monotonic() < deadline, "rank 1 outlived rank 0"
        time.sleep(0.05)


def test_a_model_that_cannot_be_split_is_refused_naming_the_tensor(tmp_path):
    """Q4_K blocks of 256 along the input: 4 heads of 64 split after 128 columns."""
    path = write_random_kquant_gguf(tmp_path / "q4_k_m.gguf", tokenizer=make_tiny_tokenizer(512))
    before = child_pids()
    with pytest.raises(ValueError, match=r"attn_output\.weight \(Q4_K, blocks of 256\) cannot be split"):
        LLMEngine.from_options(str(path), num_kv_blocks=16, block_size=4, tensor_parallel_size=2)
    wait_for_no_children(before)


def test_ranks_across_two_nodes_on_one_host(tiny_checkpoint, single):
    """4 ranks over 2 "nodes" on 127.0.0.1: node 1 (ranks 2, 3) is ``tokenloom serve
    --node-rank 1``; node 0 (ranks 0, 1) is the engine here. 4 ranks over 2 kv heads
    replicate each kv head on two ranks."""
    init = free_init_method()
    node_args = ["-tp", "4", "--nnodes", "2", "--distributed-init-method", init]
    node1 = subprocess.Popen([sys.executable, "-m", "tokenloom.entrypoints.cli", "serve", str(tiny_checkpoint.hf_dir),
                              *node_args, "--node-rank", "1"], cwd=REPO)
    try:
        split = make_llm(tiny_checkpoint.hf_dir, tensor_parallel_size=4, nnodes=2, node_rank=0,
                         distributed_init_method=init)
        try:
            assert token_ids(split.generate(PROMPTS, GREEDY_32, use_tqdm=False)) == \
                token_ids(single.generate(PROMPTS, GREEDY_32, use_tqdm=False))
        finally:
            split.engine.shutdown()
        assert node1.wait(timeout=30) == 0  # node 1 leaves when rank 0 says stop
    finally:
        if node1.poll() is None:
            node1.kill()
