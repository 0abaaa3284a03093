"""The native decoder stack computes what the per-layer path computes, bit for bit.

Both run the same kernels in the same order; only who calls them differs
(C++ back to back, or Python module by module). So a decode step with the
stack must give identical logits and write identical K/V.
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
from tokenloom.model.layers.quantization import MAX_INT8_ACTIVATION_ROWS, MAX_QUANTIZED_ROWS, quantize
from tokenloom.model.loader import load_model

QType = gguf.GGMLQuantizationType
BLOCK_SIZE = 4

pytestmark = pytest.mark.skipif(not kernels.available(), reason="native kernels unavailable here")


def _prefilled(model, num_seqs: int, cache_dtype: torch.dtype):
    """``num_seqs`` sequences of different lengths, prefilled through the per-layer path."""
    caches = make_kv_caches(model.config, 16 * num_seqs, BLOCK_SIZE, cache_dtype)
    seqs = []
    for i in range(num_seqs):
        tokens = PROMPT[:len(PROMPT) - i % 5] + [7 * i + 3]
        table = list(range(16 * num_seqs - 1 - i, -1, -num_seqs))[:16]  # interleaved, descending
        seqs.append(Sequence(tokens, table))
    for seq in seqs:
        run_step(model, caches, [seq], [len(seq.token_ids) - 1], BLOCK_SIZE)
    return caches, seqs


class _CountingStack:
    def __init__(self, stack) -> None:
        self.stack, self.calls = stack, 0

    def applies(self, *args) -> bool:
        return self.stack.applies(*args)

    def __call__(self, *args) -> torch.Tensor:
        self.calls += 1
        return self.stack(*args)


def _decode_step(model, caches, seqs, use_stack: bool):
    caches = [(k.clone(), v.clone()) for k, v in caches]
    seqs = [Sequence(list(s.token_ids), list(s.block_table), s.num_computed_tokens) for s in seqs]
    stack = model.model.decode_stack
    spy = _CountingStack(stack)
    model.model.decode_stack = spy if use_stack else None
    try:
        logits = run_step(model, caches, seqs, [1] * len(seqs), BLOCK_SIZE)
    finally:
        model.model.decode_stack = stack
    assert spy.calls == int(use_stack)
    return torch.cat(logits), caches


@pytest.mark.parametrize("kind", ["llama3", "qwen2", "smollm"])  # permuted q/k, qkv bias, tied head
@pytest.mark.parametrize("qtype", [QType.Q4_1, QType.Q8_0])
@pytest.mark.parametrize("num_seqs", [1, MAX_INT8_ACTIVATION_ROWS + 2, MAX_QUANTIZED_ROWS])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
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


@pytest.mark.parametrize("qtype", [QType.Q4_1, QType.Q8_0])
@pytest.mark.parametrize("tiles", [True, False])
def test_past_32_rows_only_gemm_tiles_take_the_stack(tiny, tmp_path, qtype, tiles):
    path = write_gguf(tiny("llama3").hf, tmp_path / f"{qtype.name}.gguf", tensor_type=qtype)
    model, _ = load_model(path, torch.float32, "cpu", quantization="none" if not tiles else "auto")
    if not tiles:  # blocks without GEMM tiles take at most MAX_QUANTIZED_ROWS rows
        kind = "int4" if qtype == QType.Q4_1 else "int8"
        for module in model.modules():
            if isinstance(module, Linear) and module is not model.lm_head:
                module.quantized = quantize(module.weight, kind)
        model.model.decode_stack = DecodeStack.build(model.model)
    if not tiles:
        # Up to MAX_QUANTIZED_ROWS the stack runs the per-row kernels, as the per-layer path does...
        for num_seqs in (MAX_INT8_ACTIVATION_ROWS, MAX_INT8_ACTIVATION_ROWS + 1):
            caches, seqs = _prefilled(model, num_seqs, torch.float16)
            ours, our_caches = _decode_step(model, caches, seqs, use_stack=True)
            theirs, their_caches = _decode_step(model, caches, seqs, use_stack=False)
            assert torch.equal(ours, theirs)
        # ...past that the dense GEMM takes the batch, outside the stack.
        caches, seqs = _prefilled(model, MAX_QUANTIZED_ROWS + 3, torch.float16)
        spy = _CountingStack(model.model.decode_stack)
        model.model.decode_stack = spy
        run_step(model, caches, seqs, [1] * len(seqs), BLOCK_SIZE)
        assert spy.calls == 0
        return
    caches, seqs = _prefilled(model, MAX_QUANTIZED_ROWS + 3, torch.float16)
    ours, our_caches = _decode_step(model, caches, seqs, use_stack=True)
    theirs, their_caches = _decode_step(model, caches, seqs, use_stack=False)
    assert torch.equal(ours, theirs)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(our_caches, their_caches))


def test_no_stack_without_quantized_layers(tiny):
    model, _ = load_model(tiny("llama3").gguf_path, torch.float32, "cpu", quantization="auto")
    assert model.model.decode_stack is None  # a float checkpoint stays dense under auto
