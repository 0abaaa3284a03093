"""GGUF dequantization and the q/k row un-permutation."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from tokenloom.model.loader.dequant import dequantize_tensor
from tokenloom.model.loader.gguf import unpermute_qk

QType = gguf.GGMLQuantizationType


def _weights(rows: int, cols: int) -> np.ndarray:
    data = np.random.default_rng(0).normal(0, 0.5, (rows, cols)).astype(np.float32)
    data[0, :32] = 0.0  # an all-zero block (d == 0)
    data[1, :32] = -1.5  # a constant block
    return data


@pytest.mark.parametrize("qtype", [QType.Q8_0, QType.Q4_0, QType.Q4_1])
def test_torch_block_kernels_match_gguf_reference(qtype):
    raw = gguf.quants.quantize(_weights(6, 96), qtype)  # [6, bytes per row] uint8
    expected = torch.from_numpy(gguf.quants.dequantize(raw, qtype))
    ours = dequantize_tensor(raw, qtype, (6, 96), torch.float32, "cpu")
    assert torch.equal(ours, expected)
    assert ours[0, :32].abs().sum() == 0


def test_dequantize_casts_to_the_target_dtype():
    raw = gguf.quants.quantize(_weights(2, 64), QType.Q4_1)
    ours = dequantize_tensor(raw, QType.Q4_1, (2, 64), torch.bfloat16, "cpu")
    expected = torch.from_numpy(gguf.quants.dequantize(raw, QType.Q4_1)).to(torch.bfloat16)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, expected)


@pytest.mark.parametrize("qtype", [QType.F32, QType.F16, QType.BF16])
def test_float_types_are_exact(qtype):
    data = _weights(3, 64)
    raw = gguf.quants.quantize(data, qtype)
    expected = torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(3, 64))
    ours = dequantize_tensor(raw, qtype, (3, 64), torch.float32, "cpu")
    assert torch.equal(ours, expected)


# (type, byte offset of each f16 scale in a block): random bytes elsewhere.
K_QUANTS = [(QType.Q4_K, (0, 2)), (QType.Q5_K, (0, 2)), (QType.Q6_K, (208,))]


@pytest.mark.parametrize("qtype, scale_offsets", K_QUANTS)
def test_k_quants_go_through_the_reference_dequantizer(qtype, scale_offsets):
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(1).integers(0, 256, (2, 2 * type_size), dtype=np.uint8)
    blocks = raw.reshape(-1, type_size)
    for offset in scale_offsets:  # sane scales instead of random (possibly inf) halves
        blocks[:, offset:offset + 2] = np.array([0.01], np.float16).view(np.uint8)
    expected = torch.from_numpy(gguf.quants.dequantize(raw, qtype))
    ours = dequantize_tensor(raw, qtype, (2, 2 * block_size), torch.float32, "cpu")
    assert ours.shape == (2, 2 * block_size)
    assert torch.isfinite(ours).all() and torch.equal(ours, expected)


def test_unsupported_type_is_a_clear_error():
    with pytest.raises(ValueError, match="not supported"):
        dequantize_tensor(np.zeros((1, 8), np.uint8), QType.I64, (1, 1), torch.float32, "cpu")


def test_unpermute_restores_hf_row_order():
    # One head of dim 4: HF rows [r0 r1 | r2 r3]; llama.cpp interleaves to [r0 r2 r1 r3].
    gguf_rows = torch.tensor([[0.0], [2.0], [1.0], [3.0]])
    assert unpermute_qk(gguf_rows, num_heads=1).flatten().tolist() == [0.0, 1.0, 2.0, 3.0]
    two_heads = torch.tensor([0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0])  # a bias vector
    assert unpermute_qk(two_heads, num_heads=2).tolist() == [0.0, 1.0, 2.0, 3.0,
                                                             4.0, 5.0, 6.0, 7.0]
