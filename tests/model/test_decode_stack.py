"""The native decoder stack computes what the per-layer path computes, bit for bit.

Both run the same kernels in the same order; only who calls them differs
(C++ back to back, or Python module by module). So a step with the stack (decodes,
or several tokens per sequence) must give identical logits and write identical K/V.
"""

from __future__ import annotations

import gguf
import pytest
import torch

from tests.helpers.tiny_models import write_gguf
from tests.model.conftest import PROMPT
from tests.model.paged import Sequence, make_kv_caches, run_step
from tokenloom import kernels
from tokenloom.model.decode_stack import DecodeStack
from tokenloom.model.layers.linear import Linear
from tokenloom.model.layers.quantization import quantize
from tokenloom.model.loader import load_model

QType = gguf.GGMLQuantizationType
BLOCK_SIZE = 4

pytestmark = pytest.mark.skipif(not kernels.available(), reason="native kernels unavailable here")


def _prefilled(model, num_seqs: int, cache_dtype: torch.dtype, left: list[int] | None = None):
    """``num_seqs`` sequences of different lengths, prefilled but for their last ``left[i]``
    tokens (default 1)."""
    caches = make_kv_caches(model.config, 16 * num_seqs, BLOCK_SIZE, cache_dtype)
    seqs = []
    for i in range(num_seqs):
        tokens = PROMPT[:len(PROMPT) - i % 5] + [7 * i + 3]
        table = list(range(16 * num_seqs - 1 - i, -1, -num_seqs))[:16]  # interleaved, descending
        seqs.append(Sequence(tokens, table))
    for seq, n in zip(seqs, left or [1] * num_seqs):
        run_step(model, caches, [seq], [len(seq.token_ids) - n], BLOCK_SIZE)
    return caches, seqs


class _CountingStack:
    def __init__(self, stack) -> None:
        self.stack, self.calls = stack, 0

    def applies(self, *args) -> bool:
        return self.stack.applies(*args)

    def __call__(self, *args) -> torch.Tensor:
        self.calls += 1
        return self.stack(*args)


def _decode_step(model, caches, seqs, use_stack: bool, num_new: list[int] | None = None):
    caches = [(k.clone(), v.clone()) for k, v in caches]
    seqs = [Sequence(list(s.token_ids), list(s.block_table), s.num_computed_tokens) for s in seqs]
    stack = model.model.decode_stack
    spy = _CountingStack(stack)
    model.model.decode_stack = spy if use_stack else None
    try:
        logits = run_step(model, caches, seqs, num_new or [1] * len(seqs), BLOCK_SIZE)
    finally:
        model.model.decode_stack = stack
    assert spy.calls == int(use_stack)
    return torch.cat(logits), caches


@pytest.mark.parametrize("kind", ["llama3", "qwen2", "smollm"])  # permuted q/k, qkv bias, tied head
@pytest.mark.parametrize("qtype", [QType.Q4_1, QType.Q8_0])
@pytest.mark.parametrize("num_seqs", [1, 6, 35])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.int8])
def test_stack_matches_the_per_layer_path(tiny, tmp_path, kind, qtype, num_seqs, cache_dtype):
    path = write_gguf(tiny(kind).hf, tmp_path / f"{kind}.gguf", tensor_type=qtype)
    model, _ = load_model(path, torch.float32, "cpu", quantization="auto")
    assert model.model.decode_stack is not None
    caches, seqs = _prefilled(model, num_seqs, cache_dtype)
    ours, our_caches = _decode_step(model, caches, seqs, use_stack=True)
    theirs, their_caches = _decode_step(model, caches, seqs, use_stack=False)
    assert torch.equal(ours, theirs)
    for (k, v), (k_ref, v_ref) in zip(our_caches, their_caches, strict=True):
        assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    assert not torch.equal(our_caches[0][0], caches[0][0])  # the step did write K/V


@pytest.mark.parametrize("kind", ["llama3", "qwen2"])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.int8])
def test_stack_matches_the_per_layer_path_on_mixed_steps(tiny, tmp_path, kind, cache_dtype):
    """Several tokens per sequence (speculative decoding's verify steps, prompt chunks)
    next to decodes, in one step."""
    path = write_gguf(tiny(kind).hf, tmp_path / f"{kind}.gguf", tensor_type=QType.Q4_1)
    model, _ = load_model(path, torch.float32, "cpu", quantization="auto")
    num_new = [6, 1, 3, 1, 9, 2]
    caches, seqs = _prefilled(model, len(num_new), cache_dtype, left=num_new)
    ours, our_caches = _decode_step(model, caches, seqs, use_stack=True, num_new=num_new)
    theirs, their_caches = _decode_step(model, caches, seqs, use_stack=False, num_new=num_new)
    assert ours.shape[0] == sum(num_new) and torch.equal(ours, theirs)
    for (k, v), (k_ref, v_ref) in zip(our_caches, their_caches, strict=True):
        assert torch.equal(k, k_ref) and torch.equal(v, v_ref)


@pytest.mark.parametrize("num_seqs", [1, 6])
def test_stack_runs_k_quants_and_projections_merged_from_two_kinds(tmp_path, num_seqs):
    """A Q4_K_M mix: q4_k and q6_k GEMMs, and a qkv of Q4_K q/k and Q6_K v run side by side."""
    from tests.helpers.tiny_models import write_random_kquant_gguf

    model, _ = load_model(write_random_kquant_gguf(tmp_path / "q4_k_m.gguf"), torch.float32, "cpu",
                          quantization="auto")
    assert model.model.layers[0].self_attn.qkv_proj.quantized.kind == "q4_k+q6_k"
    assert model.model.decode_stack is not None
    caches, seqs = _prefilled(model, num_seqs, torch.int8)
    ours, our_caches = _decode_step(model, caches, seqs, use_stack=True)
    theirs, their_caches = _decode_step(model, caches, seqs, use_stack=False)
    assert torch.equal(ours, theirs)
    for (k, v), (k_ref, v_ref) in zip(our_caches, their_caches, strict=True):
        assert torch.equal(k, k_ref) and torch.equal(v, v_ref)


def test_the_stack_needs_every_projection_quantized(tiny, tmp_path):
    path = write_gguf(tiny("llama3").hf, tmp_path / "q4.gguf", tensor_type=QType.Q4_1)
    model, _ = load_model(path, torch.float32, "cpu", quantization="none")
    assert model.model.decode_stack is None
    projections = [m for m in model.model.modules() if isinstance(m, Linear)]
    for module in projections[1:]:
        module.quantized = quantize(module.weight, "int4").with_gemm_tiles()
    assert DecodeStack.build(model.model) is None
    projections[0].quantized = quantize(projections[0].weight, "int4").with_gemm_tiles()
    assert DecodeStack.build(model.model) is not None


def test_no_stack_without_quantized_layers(tiny):
    model, _ = load_model(tiny("llama3").gguf_path, torch.float32, "cpu", quantization="auto")
    assert model.model.decode_stack is None  # a float checkpoint stays dense under auto
