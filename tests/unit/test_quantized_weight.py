"""QuantizedWeight: block quantization, the native kernels, and which batches use them."""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.helpers.quant import int8_blocks
from tokenloom import kernels
from tokenloom.model.layers.linear import Linear, apply_linear
from tokenloom.model.layers.quantization import (MAX_INT8_ACTIVATION_ROWS, MAX_QUANTIZED_ROWS,
                                                 concat_rows, quantize)
from tokenloom.model.loader.dequant import dequantize_tensor, quantized_blocks

QType = gguf.GGMLQuantizationType

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="native kernels unavailable here")


def _weight(n: int = 48, k: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_round_to_nearest_error_is_at_most_half_a_step(kind):
    w = _weight()
    q = quantize(w, kind)
    assert q.shape == (48, 96) and q.scales.shape == (48, 3)
    assert q.scales.dtype == torch.float16 and (q.mins is None or q.mins.dtype == torch.float16)
    step = q.scales.float().repeat_interleave(32, dim=1)  # [48, 96]
    err = (q.dequantize() - w).abs()
    # Half a step, plus what rounding the scale (and min) to float16 moves the grid.
    assert (err <= step * 0.51 + 1e-3 * w.abs().max()).all()
    assert err.max() > 0  # it really is quantized


def test_int4_packs_weight_j_and_j_plus_16_in_one_byte():
    w = torch.arange(32, dtype=torch.float32).repeat(2, 1)  # min 0, max 31 -> scale 31/15
    q = quantize(w, "int4")
    assert q.qweight.shape == (2, 16) and q.qweight.dtype == torch.uint8
    scale = torch.tensor(31 / 15).half().float()
    nibbles = torch.round(w[0] / scale).clamp(0, 15).to(torch.uint8)
    assert q.qweight[0, 3].item() == nibbles[3].item() | (nibbles[19].item() << 4)


@pytest.mark.parametrize("qtype", [QType.Q8_0, QType.Q4_0, QType.Q4_1])
def test_gguf_blocks_hold_exactly_the_files_weights(qtype):
    w = _weight(8, 64).numpy()
    data = gguf.quants.quantize(w, qtype)
    blocks = quantized_blocks(data, qtype, (8, 64))
    assert blocks.kind == ("int8" if qtype == QType.Q8_0 else "int4")
    dense = dequantize_tensor(data, qtype, (8, 64), torch.float32, "cpu")
    assert torch.equal(blocks.dequantize(), dense)


def test_other_gguf_types_have_no_blocks():
    data = np.zeros((4, 32), dtype=np.float32)
    assert quantized_blocks(data, QType.F32, (4, 32)) is None


def test_rows_select_and_concatenate_exactly():
    a, b = quantize(_weight(8, 64, 1), "int4"), quantize(_weight(4, 64, 2), "int4")
    both = concat_rows([a, b])
    assert torch.equal(both.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    perm = torch.tensor([3, 0, 2, 1])
    assert torch.equal(b.select_rows(perm).dequantize(), b.dequantize()[perm])
    with pytest.raises(ValueError, match="differently"):
        concat_rows([a, quantize(_weight(4, 64), "int8")])


def test_quantize_rejects_ragged_rows_and_unknown_kinds():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize(torch.zeros(4, 40), "int8")
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize(torch.zeros(4, 32), "int2")


@needs_kernels
@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("rows", [5, 9, 32])
def test_batched_kernel_matches_the_dense_product_of_the_same_weights(kind, rows):
    q = quantize(_weight(80, 160), kind)
    x = torch.randn(rows, 160, generator=torch.Generator().manual_seed(rows))
    torch.testing.assert_close(q.matmul(x), x @ q.dequantize().T, rtol=0, atol=2e-6)


@needs_kernels
@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("rows", [1, 2, 3, MAX_INT8_ACTIVATION_ROWS])
def test_decode_kernel_quantizes_activations_per_block(kind, rows):
    q = quantize(_weight(80, 160), kind)
    x = torch.randn(rows, 160, generator=torch.Generator().manual_seed(rows))
    x[0, 32:64] = 0  # an all-zero block quantizes to zeros, not NaN
    ours = q.matmul(x)
    torch.testing.assert_close(ours, int8_blocks(x) @ q.dequantize().T, rtol=0, atol=2e-6)
    exact = x @ q.dequantize().T
    assert 0 < (ours - exact).abs().max() < 0.02 * exact.abs().max()


@needs_kernels
def test_kernel_reads_a_strided_input_correctly():
    q = quantize(_weight(16, 64), "int4")
    wide = torch.randn(MAX_INT8_ACTIVATION_ROWS + 1, 128)
    x = wide[:, 32:96]  # not contiguous
    torch.testing.assert_close(q.matmul(x), x @ q.dequantize().T, rtol=0, atol=2e-6)


@needs_kernels
def test_kernel_rejects_mismatched_shapes():
    q = quantize(_weight(16, 64), "int8")
    with pytest.raises(RuntimeError, match="bytes per row"):
        kernels.ops().q8_linear(torch.randn(2, 96), q.qweight, q.scales)
    with pytest.raises(RuntimeError, match="x must be float32"):
        q.matmul(torch.randn(2, 64, dtype=torch.float64))
    tiles = q.with_gemm_tiles().gemm
    with pytest.raises(RuntimeError, match=r"q8_gemm: tiles must be"):
        kernels.ops().q8_gemm(torch.randn(2, 96), tiles.tiles, tiles.scales, 16)
    with pytest.raises(RuntimeError, match=r"q8_gemm: tile scales"):
        kernels.ops().q8_gemm(torch.randn(2, 64), tiles.tiles, tiles.scales.float(), 16)


@needs_kernels
def test_small_batches_use_the_quantized_copy_large_ones_the_dense_weight():
    w = _weight(16, 64)
    q = quantize(w, "int4")  # differs from w by up to half a step
    bias = torch.randn(16)
    small = torch.randn(MAX_QUANTIZED_ROWS, 64)
    large = torch.randn(MAX_QUANTIZED_ROWS + 1, 64)
    torch.testing.assert_close(apply_linear(small, w, bias, q), small @ q.dequantize().T + bias,
                               rtol=0, atol=2e-6)
    assert torch.equal(apply_linear(large, w, bias, q), F.linear(large, w, bias))
    assert torch.equal(apply_linear(small, w, None, None), F.linear(small, w))


def test_gemm_tiles_lay_out_8_columns_x_4_weights_per_32_bit_lane():
    w = _weight(13, 64)  # 13 columns: the second tile is padded with 3 zero columns
    q = quantize(w, "int4")
    tiles = q.with_gemm_tiles().gemm
    assert tiles.tiles.shape == (2, 2, 128) and tiles.scales.shape == tiles.mins.shape == (2, 2, 8)
    nibbles = torch.cat([q.qweight.view(13, 2, 16) & 0x0F, q.qweight.view(13, 2, 16) >> 4], -1)  # [n, b, 32]
    for n, b, p, r in [(0, 0, 0, 0), (5, 1, 2, 3), (12, 1, 3, 1), (9, 0, 1, 2)]:
        byte = tiles.tiles[n // 8, b, 32 * p + 4 * (n % 8) + r].item()
        assert byte & 0x0F == nibbles[n, b, 8 * p + r] and byte >> 4 == nibbles[n, b, 8 * p + 4 + r]
        assert tiles.scales[n // 8, b, n % 8] == q.scales[n, b] and tiles.mins[n // 8, b, n % 8] == q.mins[n, b]
    assert (tiles.tiles[1, :, 20:32] == 0).all() and (tiles.scales[1, :, 5:] == 0).all()  # padded columns
    with pytest.raises(ValueError, match="int8 activations"):
        dataclasses.replace(q, int8_activations=False, gemm=tiles)
    assert dataclasses.replace(q, int8_activations=False).with_gemm_tiles().gemm is None


def test_int8_gemm_tiles_lay_out_8_columns_x_4_weights_per_32_bit_lane():
    q = quantize(_weight(13, 64), "int8")
    tiles = q.with_gemm_tiles().gemm
    assert tiles.tiles.shape == (2, 2, 256) and tiles.tiles.dtype == torch.int8 and tiles.mins is None
    assert tiles.scales.shape == (2, 2, 8)
    blocks = q.qweight.view(13, 2, 32)
    for n, b, p, r in [(0, 0, 0, 0), (5, 1, 2, 3), (12, 1, 7, 1), (9, 0, 5, 2)]:
        assert tiles.tiles[n // 8, b, 32 * p + 4 * (n % 8) + r] == blocks[n, b, 4 * p + r]
        assert tiles.scales[n // 8, b, n % 8] == q.scales[n, b]
    assert (tiles.tiles[1].view(2, 8, 8, 4)[:, :, 5:] == 0).all() and (tiles.scales[1, :, 5:] == 0).all()


@needs_kernels
@pytest.mark.parametrize("rows", [1, 3, MAX_INT8_ACTIVATION_ROWS + 1, MAX_QUANTIZED_ROWS, 70, 300])
@pytest.mark.parametrize("columns", [80, 13])
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_gemm_tiles_compute_with_int8_activations_per_block(rows, columns, kind):
    q = quantize(_weight(columns, 160), kind).with_gemm_tiles()
    x = torch.randn(rows, 160, generator=torch.Generator().manual_seed(rows))
    x[-1, 64:96] = 0  # an all-zero block quantizes to zeros, not NaN
    ours = q.matmul(x)
    torch.testing.assert_close(ours, int8_blocks(x) @ q.dequantize().T, rtol=0, atol=2e-6)
    # Each row's result is the same whatever the batch (batch-invariant), as in the per-row kernel.
    assert torch.equal(ours[-1:], q.matmul(torch.cat([x[-1:]] * (MAX_INT8_ACTIVATION_ROWS + 1)))[:1])
    assert q.handles(rows) and not quantize(_weight(columns, 160), kind).handles(MAX_QUANTIZED_ROWS + 1)


@needs_kernels
def test_int8_gemm_takes_full_scale_weights_and_activations_without_overflow():
    # |w| = |x| = 127 in every position: each maddubs pair is 2 x 127 x 127, the int16 limit's edge.
    w = torch.full((8, 64), 127.0)
    w[::2] *= -1
    q = quantize(w, "int8").with_gemm_tiles()
    x = torch.full((3, 64), 127.0)
    x[1] *= -1
    torch.testing.assert_close(q.matmul(x), x @ q.dequantize().T, rtol=1e-6, atol=0)


@needs_kernels
def test_only_a_weight_that_takes_every_batch_frees_its_dense_copy():
    layer = Linear(64, 16, False, torch.float32, "cpu")
    layer.weight.data.copy_(_weight(16, 64))
    layer.quantized = quantize(layer.weight, "int8")  # dense GEMM above MAX_QUANTIZED_ROWS rows
    with pytest.raises(ValueError, match="still needed"):
        layer.release_dense_weight()
    layer.quantized = quantize(layer.weight, "int4").with_gemm_tiles()
    layer.release_dense_weight()
    assert layer.weight.shape == (16, 0)
    x = torch.randn(MAX_QUANTIZED_ROWS + 5, 64)
    torch.testing.assert_close(layer(x), int8_blocks(x) @ layer.quantized.dequantize().T, rtol=0, atol=2e-6)
