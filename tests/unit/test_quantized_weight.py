"""QuantizedWeight: block quantization, the GEMM tiles and the native kernels that run on them."""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.helpers.quant import int8_blocks
from tests.helpers.tiny_models import random_kquant
from tokenloom import kernels
from tokenloom.model.layers.linear import Linear, apply_linear
from tokenloom.model.layers.quantization import concat_rows, quantize, stack_rows
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


def _kquant(qtype: QType, n: int, k: int, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """Random K-quant bytes of an [n, k] matrix and the weights gguf reads from them."""
    data = random_kquant(np.random.default_rng(seed), (n, k), qtype)
    return data, torch.from_numpy(gguf.quants.dequantize(data, qtype)).view(n, k)


@pytest.mark.parametrize(("qtype", "kind"), [(QType.Q4_K, "q4_k"), (QType.Q6_K, "q6_k")])
def test_k_quant_blocks_hold_exactly_the_files_weights(qtype, kind):
    data, file_weights = _kquant(qtype, 32, 512)
    blocks = quantized_blocks(data, qtype, (32, 512))
    assert blocks.kind == kind and blocks.shape == (32, 512)
    assert torch.equal(blocks.dequantize(), file_weights)  # value for value, as llama.cpp computes them
    assert torch.equal(dequantize_tensor(data, qtype, (32, 512), torch.float32, "cpu"), file_weights)
    # What the GEMMs read per weight: Q6_K's 6.5625 bits; Q4_K's 4.5 and its 6-bit scales
    # and mins a byte each (4.625).
    tiles = blocks.with_gemm_tiles().gemm.tensors()
    bits = sum(t.numel() * t.element_size() for t in tiles if t is not None) * 8 / (32 * 512)
    assert bits == {"q4_k": 4.625, "q6_k": 6.5625}[kind]


@pytest.mark.parametrize("qtype", [QType.Q4_K, QType.Q6_K])
def test_k_quant_rows_select_and_concatenate_exactly(qtype):
    a, b = (quantized_blocks(_kquant(qtype, n, 256, seed)[0], qtype, (n, 256)) for n, seed in ((8, 1), (4, 2)))
    assert torch.equal(concat_rows([a, b]).dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    perm = torch.tensor([3, 0, 2, 1])
    assert torch.equal(b.select_rows(perm).dequantize(), b.dequantize()[perm])


@pytest.mark.parametrize("kind", ["int8", "int4", "q4_k", "q6_k"])
@pytest.mark.parametrize("n", [24, 13])  # 13: the last tile has 3 zero columns of padding
def test_the_tiles_alone_give_back_the_blocks_exactly(kind, n):
    """A loaded model keeps only the GEMM tiles (``without_blocks``); they are a
    permutation of the blocks, so the blocks come back bit for bit."""
    if kind in ("q4_k", "q6_k"):
        qtype = QType.Q4_K if kind == "q4_k" else QType.Q6_K
        blocks = quantized_blocks(_kquant(qtype, n, 512, seed=n)[0], qtype, (n, 512))
    else:
        blocks = quantize(_weight(n, 512, seed=n), kind)
    tiles_only = blocks.with_gemm_tiles().without_blocks()
    assert not tiles_only.has_blocks and tiles_only.shape == blocks.shape
    assert tiles_only.nbytes == sum(t.numel() * t.element_size() for t in tiles_only.gemm.tensors() if t is not None)
    restored = tiles_only.restored()
    for original, back in zip(blocks._tensors(), restored._tensors()):
        assert (original is None and back is None) or (back.dtype == original.dtype and torch.equal(back, original))
    assert torch.equal(tiles_only.dequantize(), blocks.dequantize())
    rows = torch.tensor([2, 0, n - 1])
    assert torch.equal(tiles_only.select_rows(rows).dequantize(), blocks.dequantize()[rows])


@needs_kernels
def test_parts_of_two_kinds_stack_as_one_gemm_per_run_of_a_kind():
    (q_data, q_file), (k_data, k_file), (v_data, v_file) = (
        _kquant(qtype, n, 256, seed) for qtype, n, seed in ((QType.Q4_K, 16, 1), (QType.Q4_K, 8, 2), (QType.Q6_K, 8, 3)))
    parts = [quantized_blocks(q_data, QType.Q4_K, (16, 256)), quantized_blocks(k_data, QType.Q4_K, (8, 256)),
             quantized_blocks(v_data, QType.Q6_K, (8, 256))]
    stacked = stack_rows(parts).with_gemm_tiles()
    assert stacked.kind == "q4_k+q6_k" and stacked.shape == (32, 256) and len(stacked.parts) == 2
    file_weights = torch.cat([q_file, k_file, v_file])
    assert torch.equal(stacked.dequantize(), file_weights)
    x = torch.randn(3, 256)
    reference = int8_blocks(x) @ file_weights.T
    torch.testing.assert_close(stacked.matmul(x), reference, rtol=0, atol=2e-6 * reference.abs().max().item())
    assert stack_rows(parts[:2]).kind == "q4_k"  # one kind: one weight


def test_q6_k_gemm_tiles_hold_low_nibbles_then_top_bits_per_half_block():
    data, _ = _kquant(QType.Q6_K, 13, 512)
    q = quantized_blocks(data, QType.Q6_K, (13, 512))
    tiles = q.with_gemm_tiles().gemm.by_tile()
    assert tiles.tiles.shape == (2, 16, 192) and tiles.scales.shape == (2, 16, 16) and tiles.scales.dtype == torch.int8
    assert tiles.super_scales.shape == (2, 2, 8) and tiles.mins is None and tiles.super_mins is None
    values = q.qweight.view(13, 16, 32)  # [n, block, weight] in 0..63
    for n, b, g, pp, h, r in [(0, 0, 0, 0, 0, 0), (5, 3, 1, 1, 1, 3), (12, 15, 0, 1, 0, 2), (9, 7, 1, 0, 1, 1)]:
        k = 16 * g + 8 * pp + 4 * h + r
        low = tiles.tiles[n // 8, b, 32 * (2 * g + pp) + 4 * (n % 8) + r].item()
        assert (low >> 4 * h) & 0x0F == values[n, b, k] & 0x0F
        high = tiles.tiles[n // 8, b, 128 + 32 * g + 4 * (n % 8) + r].item()
        assert (high >> (4, 6, 0, 2)[2 * pp + h]) & 3 == values[n, b, k] >> 4
        assert tiles.scales[n // 8, b, 8 * g + n % 8] == q.scales[n, 2 * b + g]
        assert tiles.super_scales[n // 8, b // 8, n % 8] == q.super_scales[n, b // 8]
    assert (tiles.tiles[1].view(16, 6, 8, 4)[:, :, 5:] == 0).all()  # padded columns


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 32, 70])
@pytest.mark.parametrize("columns", [80, 13])
@pytest.mark.parametrize("qtype", [QType.Q4_K, QType.Q6_K])
def test_k_quant_gemms_compute_the_files_weights_with_int8_activations(rows, columns, qtype):
    data, file_weights = _kquant(qtype, columns, 512, seed=rows)
    q = quantized_blocks(data, qtype, (columns, 512)).with_gemm_tiles()
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows))
    x[-1, 64:96] = 0
    ours = q.matmul(x)
    reference = int8_blocks(x) @ file_weights.T
    torch.testing.assert_close(ours, reference, rtol=0, atol=2e-6 * reference.abs().max().item())
    assert torch.equal(ours[-1:], q.matmul(torch.cat([x[-1:]] * 5))[:1])  # batch-invariant


@needs_kernels
def test_k_quant_gemms_need_whole_super_blocks():
    data, _ = _kquant(QType.Q4_K, 8, 256)
    tiles = quantized_blocks(data, QType.Q4_K, (8, 256)).with_gemm_tiles().gemm
    cut = [t[:, :4].contiguous() if t is not None and t.shape[1] == 8 else t for t in tiles.tensors()]
    with pytest.raises(RuntimeError, match="multiple of 256"):
        kernels.ops().quant_gemm(torch.randn(2, 128), 2, cut, 8)
    with pytest.raises(RuntimeError, match="unknown format 7"):
        kernels.ops().quant_gemm(torch.randn(2, 256), 7, tiles.tensors(), 8)


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
def test_kernel_reads_a_strided_input_correctly():
    q = quantize(_weight(16, 64), "int4").with_gemm_tiles()
    wide = torch.randn(5, 128)
    x = wide[:, 32:96]  # not contiguous
    torch.testing.assert_close(q.matmul(x), int8_blocks(x) @ q.dequantize().T, rtol=0, atol=2e-6)


@needs_kernels
def test_kernel_rejects_mismatched_shapes_and_weights_without_tiles():
    q = quantize(_weight(16, 64), "int8")
    with pytest.raises(ValueError, match="no GEMM tiles"):
        q.matmul(torch.randn(2, 64))
    q = q.with_gemm_tiles()
    with pytest.raises(RuntimeError, match="x must be a contiguous float32"):
        q.matmul(torch.randn(2, 64, dtype=torch.float64))
    tiles = q.gemm
    with pytest.raises(RuntimeError, match=r"q8_gemm: tiles must be"):
        kernels.ops().q8_gemm(torch.randn(2, 96), tiles.tiles, tiles.scales, 16)
    with pytest.raises(RuntimeError, match=r"q8_gemm: tile scales"):
        kernels.ops().q8_gemm(torch.randn(2, 64), tiles.tiles, tiles.scales.float(), 16)
    q4 = quantize(_weight(16, 64), "int4").with_gemm_tiles().gemm
    with pytest.raises(RuntimeError, match=r"q4_gemm: tiles must be"):
        kernels.ops().q4_gemm(torch.randn(2, 64), tiles.tiles, q4.scales, q4.mins, 16)


@needs_kernels
def test_a_quantized_copy_takes_every_batch_and_no_copy_means_the_dense_weight():
    w = _weight(16, 64)
    q = quantize(w, "int4").with_gemm_tiles()  # differs from w by up to half a step
    bias = torch.randn(16)
    for rows in (1, 40):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(apply_linear(x, w, bias, q), int8_blocks(x) @ q.dequantize().T + bias,
                                   rtol=0, atol=2e-6)
        assert torch.equal(apply_linear(x, w, None, None), F.linear(x, w))


def test_gemm_tiles_lay_out_8_columns_x_4_weights_per_32_bit_lane():
    w = _weight(13, 64)  # 13 columns: the second tile is padded with 3 zero columns
    q = quantize(w, "int4")
    tiles = q.with_gemm_tiles().gemm.by_tile()
    assert tiles.tiles.shape == (2, 2, 128) and tiles.scales.shape == tiles.mins.shape == (2, 2, 8)
    nibbles = torch.cat([q.qweight.view(13, 2, 16) & 0x0F, q.qweight.view(13, 2, 16) >> 4], -1)  # [n, b, 32]
    for n, b, p, r in [(0, 0, 0, 0), (5, 1, 2, 3), (12, 1, 3, 1), (9, 0, 1, 2)]:
        byte = tiles.tiles[n // 8, b, 32 * p + 4 * (n % 8) + r].item()
        assert byte & 0x0F == nibbles[n, b, 8 * p + r] and byte >> 4 == nibbles[n, b, 8 * p + 4 + r]
        assert tiles.scales[n // 8, b, n % 8] == q.scales[n, b] and tiles.mins[n // 8, b, n % 8] == q.mins[n, b]
    assert (tiles.tiles[1, :, 20:32] == 0).all() and (tiles.scales[1, :, 5:] == 0).all()  # padded columns


@pytest.mark.parametrize("kind", ["int4", "int8", "q4_k", "q6_k"])
def test_gemm_tiles_are_stored_as_pairs_side_by_side_per_block(kind):
    if kind in ("q4_k", "q6_k"):
        qtype = QType.Q4_K if kind == "q4_k" else QType.Q6_K
        q = quantized_blocks(_kquant(qtype, 40, 512)[0], qtype, (40, 512))
    else:
        q = quantize(_weight(40, 64), kind)
    paired, by_tile = q.with_gemm_tiles().gemm, q.with_gemm_tiles().gemm.by_tile()
    for stored, tiles in zip(paired.tensors(), by_tile.tensors()):
        if stored is None:
            assert tiles is None
            continue
        assert tiles.shape[0] == 6 and stored.shape == (3, tiles.shape[1], 2 * tiles.shape[2])  # 40 columns: 48
        width = tiles.shape[2]
        for pair, x in [(0, 0), (1, tiles.shape[1] - 1), (2, tiles.shape[1] // 2)]:
            assert torch.equal(stored[pair, x, :width], tiles[2 * pair, x])
            assert torch.equal(stored[pair, x, width:], tiles[2 * pair + 1, x])
    assert (by_tile.tiles[5] == 0).all()  # columns 40-47: a whole padded tile


def test_int8_gemm_tiles_lay_out_8_columns_x_4_weights_per_32_bit_lane():
    q = quantize(_weight(13, 64), "int8")
    tiles = q.with_gemm_tiles().gemm.by_tile()
    assert tiles.tiles.shape == (2, 2, 256) and tiles.tiles.dtype == torch.int8 and tiles.mins is None
    assert tiles.scales.shape == (2, 2, 8)
    blocks = q.qweight.view(13, 2, 32)
    for n, b, p, r in [(0, 0, 0, 0), (5, 1, 2, 3), (12, 1, 7, 1), (9, 0, 5, 2)]:
        assert tiles.tiles[n // 8, b, 32 * p + 4 * (n % 8) + r] == blocks[n, b, 4 * p + r]
        assert tiles.scales[n // 8, b, n % 8] == q.scales[n, b]
    assert (tiles.tiles[1].view(2, 8, 8, 4)[:, :, 5:] == 0).all() and (tiles.scales[1, :, 5:] == 0).all()


@needs_kernels
@pytest.mark.parametrize("rows", [1, 3, 5, 32, 70, 300])
@pytest.mark.parametrize("columns", [80, 13])
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_gemm_tiles_compute_with_int8_activations_per_block(rows, columns, kind):
    q = quantize(_weight(columns, 160), kind).with_gemm_tiles()
    x = torch.randn(rows, 160, generator=torch.Generator().manual_seed(rows))
    x[-1, 64:96] = 0  # an all-zero block quantizes to zeros, not NaN
    ours = q.matmul(x)
    torch.testing.assert_close(ours, int8_blocks(x) @ q.dequantize().T, rtol=0, atol=2e-6)
    exact = x @ q.dequantize().T  # int8 activations move the result, but little
    assert 0 < (ours - exact).abs().max() < 0.02 * exact.abs().max()
    # Each row's result is the same whatever the batch (batch-invariant).
    assert torch.equal(ours[-1:], q.matmul(torch.cat([x[-1:]] * 5))[:1])


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
def test_only_a_weight_with_gemm_tiles_frees_its_dense_copy():
    layer = Linear(64, 16, False, torch.float32, "cpu")
    layer.weight.data.copy_(_weight(16, 64))
    layer.quantized = quantize(layer.weight, "int8")  # no tiles: it cannot multiply yet
    with pytest.raises(ValueError, match="still needed"):
        layer.release_dense_weight()
    layer.quantized = quantize(layer.weight, "int4").with_gemm_tiles()
    layer.release_dense_weight()
    assert layer.weight.shape == (16, 0)
    x = torch.randn(37, 64)
    torch.testing.assert_close(layer(x), int8_blocks(x) @ layer.quantized.dequantize().T, rtol=0, atol=2e-6)


def _every_gemm_isa() -> list[str]:
    """The instruction sets this machine can run the GEMMs on (AVX2 always, where the kernels build)."""
    if not kernels.available():
        return []
    current = kernels.gemm_isa()
    isas = ["avx2"] + (["avx512_vnni"] if kernels.gemm_isa("auto") == "avx512_vnni" else [])
    kernels.gemm_isa(current)
    return isas


@pytest.fixture
def restore_gemm_isa():
    current = kernels.gemm_isa()
    yield
    kernels.gemm_isa(current)


def _full_scale(kind: str, columns: int, k: int, seed: int):
    """A weight of ``kind`` whose first block holds the largest integer weights the kind has."""
    if kind in ("int4", "int8"):
        w = _weight(columns, k, seed=seed)
        w[:, :32] = 0.05 if kind == "int8" else torch.linspace(0, 0.05, 32)  # q = 127 / nibbles up to 15
        return quantize(w, kind)
    qtype = QType.Q4_K if kind == "q4_k" else QType.Q6_K
    q = quantized_blocks(_kquant(qtype, columns, k, seed)[0], qtype, (columns, k))
    top = torch.full_like(q.qweight[:, :16], 0xFF) if kind == "q4_k" else torch.full_like(q.qweight[:, :32], 63)
    return dataclasses.replace(q, qweight=torch.cat([top, q.qweight[:, top.shape[1]:]], dim=1).contiguous())


@needs_kernels
@pytest.mark.parametrize("isa", _every_gemm_isa() or ["avx2"])
@pytest.mark.parametrize("kind", ["int4", "int8", "q4_k", "q6_k"])
def test_every_instruction_set_gives_the_same_bits(isa, kind, restore_gemm_isa):
    """VNNI's vpdpbusd and AVX2's maddubs sum the same integers exactly, so each path gives the
    AVX2 path's bits, at every batch size and with full-scale weights and activations."""
    kernels.gemm_isa(isa)
    assert kernels.gemm_isa() == isa
    k = 512 if kind.startswith("q") else 160
    for rows, columns in ((1, 80), (2, 16), (4, 13), (7, 64), (70, 24)):
        q = _full_scale(kind, columns, k, seed=rows).with_gemm_tiles()
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)) * 3
        x[0, :32] = 127.0  # the accumulators' edge: every product at full scale
        ours = q.matmul(x)
        reference = int8_blocks(x) @ q.dequantize().T
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6 * reference.abs().max().item())
        kernels.gemm_isa("avx2")
        assert torch.equal(ours, q.matmul(x))
        kernels.gemm_isa(isa)


@needs_kernels
def test_gemm_isa_refuses_unknown_names_and_missing_instructions(restore_gemm_isa):
    with pytest.raises(RuntimeError, match="choose auto, avx2 or avx512_vnni"):
        kernels.gemm_isa("sse2")
    if "avx512_vnni" not in _every_gemm_isa():
        with pytest.raises(RuntimeError, match="no AVX-512 VNNI"):
            kernels.gemm_isa("avx512_vnni")
    assert kernels.gemm_isa("auto") in ("avx2", "avx512_vnni")
