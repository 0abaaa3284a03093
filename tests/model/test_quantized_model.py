"""--quantization on whole models: which weights get which blocks, and what it does to the logits.

``prefill_logits`` feeds the prompt in chunks of at most 13 rows, so every
matmul here takes the quantized (decode-sized) path when a layer has one.
"""

from __future__ import annotations

from collections import Counter

import gguf
import pytest
import torch
import torch.nn.functional as F

from tests.helpers.quant import int8_blocks
from tests.helpers.tiny_models import write_gguf
from tests.model.conftest import PROMPT
from tests.model.paged import prefill_logits
from tokenloom import kernels
from tokenloom.model.layers.linear import Linear
from tokenloom.model.footprint import weights_bytes
from tokenloom.model.loader import load_model

QType = gguf.GGMLQuantizationType

pytestmark = pytest.mark.skipif(not kernels.available(), reason="native kernels unavailable here")


def _kinds(model) -> tuple[Counter, str]:
    layers = Counter("dense" if m.quantized is None else m.quantized.kind
                     for m in model.modules() if isinstance(m, Linear) and m is not model.lm_head)
    head = "dense" if model.logits_quantized is None else model.logits_quantized.kind
    return layers, head


@pytest.mark.parametrize("kind", ["llama3", "qwen2"])  # permuted and unpermuted q/k rows
@pytest.mark.parametrize("qtype", [QType.Q8_0, QType.Q4_0, QType.Q4_1])
def test_auto_runs_the_files_own_blocks_with_the_same_logits(tiny, tmp_path, kind, qtype):
    path = write_gguf(tiny(kind).hf, tmp_path / f"{kind}.gguf", tensor_type=qtype)
    dense, _ = load_model(path, torch.float32, "cpu", quantization="none")
    auto, _ = load_model(path, torch.float32, "cpu", quantization="auto")
    expected = "int8" if qtype == QType.Q8_0 else "int4"
    layers, head = _kinds(auto)
    assert layers == Counter({expected: 8}) and head == expected  # 2 layers x (qkv, o, gate_up, down)
    assert _kinds(dense) == (Counter({"dense": 8}), "dense")
    # Projections take every batch on their GEMM tiles, so their dense weights are freed.
    released = {m.weight.numel() == 0 for m in auto.modules() if isinstance(m, Linear) and m is not auto.lm_head}
    assert released == {True} and auto.logits_quantized.gemm is not None
    _assert_same_logits(auto, dense)


def _assert_same_logits(model, reference) -> None:
    """``model``'s quantized projections compute with ``reference``'s dense weights.

    Without GEMM tiles only the summation order differs. int4 GEMM tiles also
    quantize each projection's input to int8 blocks: exact per projection (same
    input), but through the whole model a value that lands on a rounding
    boundary can go either way, so there the check is the size of the error.
    """
    tiles = any(m.quantized.gemm is not None for m in model.modules() if isinstance(m, Linear) and m.quantized)
    ours, theirs = prefill_logits(model, PROMPT), prefill_logits(reference, PROMPT)
    if not tiles:
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
        return
    for name, module in model.named_modules():
        if isinstance(module, Linear) and module.quantized is not None and module is not model.lm_head:
            x = torch.randn(7, module.input_size, generator=torch.Generator().manual_seed(0))
            dense = reference.get_submodule(name)
            torch.testing.assert_close(module(x), F.linear(int8_blocks(x), dense.weight, dense.bias),
                                       rtol=0, atol=1e-5)
    diff = (ours - theirs).abs()  # logits are O(1) here; a wrong weight moves them by that much
    assert diff.mean() < 0.03 and diff.max() < 0.2


@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])  # float checkpoints
def test_auto_keeps_float_checkpoints_dense(tiny, fmt):
    model, _ = load_model(tiny("llama3").path(fmt), torch.float32, "cpu", quantization="auto")
    assert _kinds(model) == (Counter({"dense": 8}), "dense")


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_explicit_modes_compute_with_the_quantized_weights(tiny, mode):
    tm = tiny("smollm")  # tied embeddings: the LM head is the embedding table
    model, _ = load_model(tm.hf_dir, torch.float32, "cpu", quantization=mode)
    layers, head = _kinds(model)
    assert layers == Counter({mode: 12}) and head == "int8"  # int4 keeps an 8-bit LM head
    # Reference: the dense path with every weight replaced by what its blocks stand for.
    fake, _ = load_model(tm.hf_dir, torch.float32, "cpu", quantization="none")
    original = prefill_logits(fake, PROMPT)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, Linear):
                fake.get_submodule(name).weight.copy_(module.quantized.dequantize())
    head = model.logits_quantized.dequantize()  # the input embeddings stay the dense table
    fake.compute_logits = lambda hidden: hidden @ head.T
    _assert_same_logits(model, fake)
    assert (prefill_logits(model, PROMPT) - original).abs().max() > 1e-3  # and the quantization is real


def test_int8_requantizes_4bit_blocks_but_int4_keeps_them(tiny, tmp_path):
    path = write_gguf(tiny("llama3").hf, tmp_path / "q41.gguf", tensor_type=QType.Q4_1)
    as_int4, _ = load_model(path, torch.float32, "cpu", quantization="int4")
    as_int8, _ = load_model(path, torch.float32, "cpu", quantization="int8")
    assert _kinds(as_int4) == (Counter({"int4": 8}), "int4")
    assert _kinds(as_int8) == (Counter({"int8": 8}), "int8")


def test_explicit_modes_need_float32_on_the_cpu(tiny):
    with pytest.raises(ValueError, match="--quantization int8: .*float32"):
        load_model(tiny("llama3").hf_dir, torch.bfloat16, "cpu", quantization="int8")


def test_without_kernels_auto_falls_back_and_explicit_modes_fail(tiny, tmp_path, monkeypatch):
    path = write_gguf(tiny("llama3").hf, tmp_path / "q8.gguf", tensor_type=QType.Q8_0)
    monkeypatch.setattr(kernels, "_state", {"error": "native kernels unavailable: test", "warned": True})
    model, _ = load_model(path, torch.float32, "cpu", quantization="auto")
    assert _kinds(model) == (Counter({"dense": 8}), "dense")
    assert model.ops.name == "torch" and model.model.decode_stack is None
    # The loader held the projections as blocks; falling back, it dequantized them into place.
    exact, _ = load_model(path, torch.float32, "cpu", quantization="none")
    assert torch.equal(prefill_logits(model, PROMPT), prefill_logits(exact, PROMPT))
    with pytest.raises(kernels.KernelsUnavailable, match="test"):
        load_model(path, torch.float32, "cpu", quantization="int8")


def test_unknown_mode_is_rejected(tiny):
    with pytest.raises(ValueError, match="quantization must be one of"):
        load_model(tiny("llama3").hf_dir, torch.float32, "cpu", quantization="fp8")


def test_single_token_steps_quantize_activations_within_a_small_error(tiny, tmp_path):
    path = write_gguf(tiny("llama3").hf, tmp_path / "q41.gguf", tensor_type=QType.Q4_1)
    dense, _ = load_model(path, torch.float32, "cpu", quantization="none")
    auto, _ = load_model(path, torch.float32, "cpu", quantization="auto")
    one_by_one = [1] * len(PROMPT)  # decode-sized steps: int8 activations
    ours, exact = prefill_logits(auto, PROMPT, chunks=one_by_one), prefill_logits(dense, PROMPT, chunks=one_by_one)
    err = (ours - exact).abs().max().item()
    assert 0 < err < 0.05 * exact.abs().max().item()


def test_a_q4_k_m_file_runs_on_the_kernels_with_the_files_weights(tmp_path):
    """Q4_K and Q6_K matrices run on their own kernels with exactly the file's weights,
    projections merged from both as one GEMM per kind, the LM head too: the whole model
    is on the fast path, with the file's weights."""
    from tests.helpers.tiny_models import write_random_kquant_gguf

    path = write_random_kquant_gguf(tmp_path / "q4_k_m.gguf")
    dense, _ = load_model(path, torch.float32, "cpu", quantization="none")
    auto, _ = load_model(path, torch.float32, "cpu", quantization="auto")
    layers, head = _kinds(auto)
    # Per layer: qkv (Q4_K q/k + Q6_K v), o (Q4_K), gate_up (Q4_K), down (Q6_K).
    assert layers == Counter({"q4_k": 4, "q6_k": 2, "q4_k+q6_k": 2}) and head == "q6_k"
    layer = auto.model.layers[0]
    reference = dense.model.layers[0]
    for native, file_weight in ((layer.self_attn.qkv_proj, reference.self_attn.qkv_proj.weight),
                                (layer.self_attn.o_proj, reference.self_attn.o_proj.weight),
                                (layer.mlp.down_proj, reference.mlp.down_proj.weight),
                                (layer.mlp.gate_up_proj, reference.mlp.gate_up_proj.weight)):
        assert torch.equal(native.quantized.dequantize(), file_weight)
    assert torch.equal(auto.logits_quantized.dequantize(), dense.logits_weight())
    # No dense copy of what the kernels run: the projections' and the untied head's weights are empty.
    assert layer.mlp.down_proj.weight.numel() == 0 and auto.lm_head.weight.numel() == 0
    # Nor of the embedding: lookups read the file's Q4_K rows, the same values as the dense table.
    ids = torch.tensor(PROMPT)
    assert auto.model.embed_tokens.weight.numel() == 0 and auto.model.embed_tokens.quantized.kind == "q4_k"
    assert torch.equal(auto.model.embed_tokens(ids), dense.model.embed_tokens(ids))
    # And each weight is held once, as GEMM tiles (the blocks they came from are dropped):
    # at most Q6_K's 6.5625 bits per weight, where blocks and tiles together took twice that.
    assert not layer.mlp.down_proj.quantized.has_blocks and not auto.logits_quantized.has_blocks
    num_weights = sum(p.numel() for p in dense.parameters())
    assert weights_bytes(auto) * 8 / num_weights < 6.6
    ours, theirs = prefill_logits(auto, PROMPT), prefill_logits(dense, PROMPT)
    # int8 activations and weights move the logits by a few percent of their size.
    assert (ours - theirs).norm() < 0.05 * theirs.norm()
