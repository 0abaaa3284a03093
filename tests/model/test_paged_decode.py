"""Greedy decoding through the paged KV cache: chunked prefill, one-token decode
steps, non-contiguous blocks and mixed batches give transformers' tokens."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.tiny_models import TINY_KINDS
from tests.model.conftest import PROMPT, hf_greedy, hf_logits
from tests.model.paged import Sequence, make_kv_caches, run_step
from tokenloom.model.loader import load_model

BLOCK_SIZE = 4
NUM_BLOCKS = 32
# 13 prompt + 32 new tokens need 12 blocks; the table jumps around the cache.
BLOCK_TABLE = [7, 2, 19, 11, 30, 0, 5, 23, 14, 9, 27, 16]


def greedy_paged(model, prompt: list[int], max_new_tokens: int, chunks: list[int],
                 device: torch.device | str = "cpu") -> list[int]:
    """Prefill ``prompt`` in ``chunks``, then decode one token per step."""
    config = model.config
    caches = make_kv_caches(config, NUM_BLOCKS, BLOCK_SIZE, next(model.parameters()).dtype, device)
    seq = Sequence(list(prompt), list(BLOCK_TABLE))
    for n in chunks:
        logits = run_step(model, caches, [seq], [n], BLOCK_SIZE)[0]
    assert seq.num_computed_tokens == len(prompt)
    for _ in range(max_new_tokens):
        seq.token_ids.append(int(logits[-1].argmax()))
        if len(seq.token_ids) - len(prompt) == max_new_tokens:
            break
        logits = run_step(model, caches, [seq], [1], BLOCK_SIZE)[0]
    return seq.token_ids[len(prompt):]


@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
@pytest.mark.parametrize("kind", TINY_KINDS)
def test_greedy_decode_matches_transformers(tiny, kind, fmt):
    model, _ = load_model(tiny(kind).path(fmt), torch.float32, "cpu")
    expected = hf_greedy(tiny(kind).hf, PROMPT, 32)
    assert greedy_paged(model, PROMPT, 32, chunks=[5, 3, 5]) == expected


def test_mixed_batch_matches_solo_runs(tiny):
    """A prefilling and a decoding sequence in one forward get their solo results."""
    model, _ = load_model(tiny("qwen2").gguf_path, torch.float32, "cpu")
    caches = make_kv_caches(model.config, NUM_BLOCKS, BLOCK_SIZE, torch.float32)
    long_ids, short_ids = PROMPT, [1, 420, 8, 77, 301, 64, 2]
    long = Sequence(list(long_ids), [3, 26, 12, 8])
    short = Sequence(list(short_ids), [21, 1, 17])
    first = run_step(model, caches, [long, short], [6, 6], BLOCK_SIZE)  # two prefill chunks
    mixed = run_step(model, caches, [long, short], [7, 1], BLOCK_SIZE)  # prefill + decode
    long_logits = torch.cat([first[0], mixed[0]])
    short_logits = torch.cat([first[1], mixed[1]])
    short.token_ids.append(int(short_logits[-1].argmax()))
    long.token_ids.append(int(long_logits[-1].argmax()))
    decode = run_step(model, caches, [long, short], [1, 1], BLOCK_SIZE)  # decode-only batch

    for ids, batched, step in ((long_ids, long_logits, decode[0]),
                               (short_ids, short_logits, decode[1])):
        solo = hf_logits(tiny("qwen2").hf, ids + [int(batched[-1].argmax())])
        torch.testing.assert_close(batched, solo[:len(ids)], rtol=0, atol=1e-4)
        torch.testing.assert_close(step, solo[-1:], rtol=0, atol=1e-4)


def test_decode_reads_only_its_own_blocks(tiny):
    """Another sequence's blocks holding garbage must not change the result."""
    model, _ = load_model(tiny("mistral").hf_dir, torch.float32, "cpu")
    caches = make_kv_caches(model.config, NUM_BLOCKS, BLOCK_SIZE, torch.float32)
    for k_cache, v_cache in caches:
        k_cache[1].fill_(1e4)
        v_cache[1].fill_(-1e4)
    seq = Sequence(list(PROMPT), [4, 6, 10, 31])
    logits = run_step(model, caches, [seq], [len(PROMPT)], BLOCK_SIZE)[0]
    torch.testing.assert_close(logits, hf_logits(tiny("mistral").hf, PROMPT), rtol=0, atol=1e-4)


@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
def test_bfloat16_greedy_follows_float32(tiny, fmt):
    path = tiny("smollm").path(fmt)
    fp32, _ = load_model(path, torch.float32, "cpu")
    bf16, _ = load_model(path, torch.bfloat16, "cpu")
    expected = greedy_paged(fp32, PROMPT, 6, chunks=[13])
    assert greedy_paged(bf16, PROMPT, 6, chunks=[7, 6]) == expected


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
def test_cuda_matches_cpu(tiny, fmt):
    path = tiny("llama3").path(fmt)
    cpu_model, _ = load_model(path, torch.float32, "cpu")
    cuda_model, _ = load_model(path, torch.float32, "cuda")
    assert next(cuda_model.parameters()).is_cuda
    cpu_tokens = greedy_paged(cpu_model, PROMPT, 16, chunks=[5, 8])
    assert greedy_paged(cuda_model, PROMPT, 16, chunks=[5, 8], device="cuda") == cpu_tokens
    bf16_model, _ = load_model(path, torch.bfloat16, "cuda")
    assert greedy_paged(bf16_model, PROMPT, 4, chunks=[13], device="cuda") == cpu_tokens[:4]
