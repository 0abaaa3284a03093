"""A whole model through the Triton backend against the PyTorch reference backend.

On the CPU the kernels run under Triton's interpreter (float32); on CUDA the
same schedule runs in bfloat16, where greedy tokens must match the reference
backend on the same card.
"""

from __future__ import annotations

import pytest
import torch

from tokenloom.model.layers.backend import TorchOps, TritonOps, select_ops
from tokenloom.model.loader import load_model
from tests.model.conftest import hf_logits
from tests.model.paged import Sequence, make_kv_caches, run_step

BLOCK_SIZE = 16
PROMPTS = [[5 + (7 * i) % 90 for i in range(37)], [11, 3, 8, 19, 40]]


def _run_schedule(model, ops, device, dtype, decode_steps=6, cache_dtype=None):
    """Seq 0's prompt in two chunks while seq 1 prefills, then both decode greedily
    (mixed steps throughout). Returns every step's logits and the greedy tokens."""
    model.use_ops(ops)
    caches = make_kv_caches(model.config, 16, BLOCK_SIZE, cache_dtype or dtype, device)
    seqs = [Sequence(list(PROMPTS[0]), [9, 2, 14]), Sequence(list(PROMPTS[1]), [5, 0])]
    logits = run_step(model, caches, seqs, [20, 5], BLOCK_SIZE)
    seqs[1].token_ids.append(int(logits[1][-1].argmax()))
    logits += run_step(model, caches, seqs, [17, 1], BLOCK_SIZE)  # chunk + decode
    seqs[0].token_ids.append(int(logits[2][-1].argmax()))
    seqs[1].token_ids.append(int(logits[3][-1].argmax()))
    for _ in range(decode_steps):
        step = run_step(model, caches, seqs, [1, 1], BLOCK_SIZE)
        logits += step
        for seq, out in zip(seqs, step):
            seq.token_ids.append(int(out[-1].argmax()))
    return logits, [seq.token_ids for seq in seqs]


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs under Triton's interpreter, set only without CUDA")
@pytest.mark.parametrize("kind", ["llama3", "qwen2", "mistral"])
def test_triton_backend_matches_the_reference_on_cpu(tiny, kind):
    model, _ = load_model(tiny(kind).hf_dir, torch.float32, "cpu", quantization="none")
    ref_logits, ref_tokens = _run_schedule(model, TorchOps(), "cpu", torch.float32)
    logits, tokens = _run_schedule(model, TritonOps(), "cpu", torch.float32)
    assert tokens == ref_tokens
    for ours, ref in zip(logits, ref_logits):
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    # and the first chunk against transformers itself
    torch.testing.assert_close(logits[0], hf_logits(tiny(kind).hf, PROMPTS[0][:20]), atol=1e-3, rtol=1e-3)


def test_cuda_selects_triton_and_cpu_does_not():
    assert select_ops(torch.device("cpu"), torch.bfloat16).name == "torch"
    assert select_ops(torch.device("cpu"), torch.float32, "torch").name == "torch"
    with pytest.raises(ValueError, match="attention backend must be one of"):
        select_ops(torch.device("cpu"), torch.float32, "flash")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["llama3", "qwen2", "mistral"])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_cuda_bf16_greedy_matches_the_reference_backend(tiny, kind, cache_dtype):
    model, _ = load_model(tiny(kind).hf_dir, torch.bfloat16, "cuda", quantization="none")
    assert model.ops.name == "triton"
    _, ref_tokens = _run_schedule(model, TorchOps(), "cuda", torch.bfloat16, cache_dtype=cache_dtype)
    _, tokens = _run_schedule(model, select_ops(torch.device("cuda"), torch.bfloat16), "cuda", torch.bfloat16,
                              cache_dtype=cache_dtype)
    assert tokens == ref_tokens
