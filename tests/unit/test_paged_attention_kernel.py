"""paged_attention (csrc/paged_attention.cpp) on decode steps (one new token per sequence)
against a gather + softmax reference; test_prefill_attention_kernel.py covers prompt chunks."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.kv_cache import poison, q_and_cache_cases
from tokenloom import kernels
from tokenloom.model.layers.attention import cache_rows_as, to_cache_rows

try:
    OPS = kernels.ops()
except kernels.KernelsUnavailable as exc:
    pytest.skip(str(exc), allow_module_level=True)

SEQ_LENS = (1, 15, 16, 17, 100, 300)
BLOCK_SIZE = 16
CACHE_DTYPES = pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.int8])


def blocks_for(seq_len: int, block_size: int) -> int:
    return -(-seq_len // block_size)


def make_case(seq_lens: tuple[int, ...], num_heads: int, num_kv_heads: int, head_dim: int,
              block_size: int = BLOCK_SIZE, pad_blocks: int = 3, spare_blocks: int = 4,
              seed: int = 0, cache_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random q and cache, with each sequence's blocks drawn from a shuffled pool.

    Block 0 is never given to a sequence and every table row is padded with it
    (``pad_blocks`` extra entries), so padding points at a block nobody owns.
    ``spare_blocks`` more blocks stay unreferenced too. The caches are drawn in
    float32 and rounded (int8: quantized) to ``cache_dtype``; q stays float32."""
    gen = torch.Generator().manual_seed(seed)
    used = [blocks_for(n, block_size) for n in seq_lens]
    num_blocks = 1 + sum(used) + spare_blocks
    max_num_blocks = max(used) + pad_blocks
    pool = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    tables = torch.zeros(len(seq_lens), max_num_blocks, dtype=torch.int64)
    for i, n in enumerate(used):
        tables[i, :n] = torch.tensor(pool[:n])
        pool = pool[n:]
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return {
        "q": torch.randn(len(seq_lens), num_heads, head_dim, generator=gen),
        "k_cache": to_cache_rows(torch.randn(cache_shape, generator=gen), cache_dtype),
        "v_cache": to_cache_rows(torch.randn(cache_shape, generator=gen), cache_dtype),
        "block_tables": tables,
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int64),
    }


def run_kernel(case: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    starts = torch.arange(case["q"].shape[0] + 1, dtype=torch.int64)  # one token per sequence
    return OPS.paged_attention(case["q"], case["k_cache"], case["v_cache"], case["block_tables"],
                               case["seq_lens"], starts, scale)


def reference(case: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    """Gathers each sequence's context and attends in float64.

    A float16 cache is upcast from the very values the kernel reads (exactly),
    an int8 cache dequantized (exactly, in float64), so only the order of the
    arithmetic separates the two, whatever the cache dtype."""
    q, k_cache, v_cache = case["q"], case["k_cache"], case["v_cache"]
    block_size = k_cache.shape[1]
    group = q.shape[1] // k_cache.shape[2]
    out = []
    for i, seq_len in enumerate(case["seq_lens"].tolist()):
        blocks = case["block_tables"][i, :blocks_for(seq_len, block_size)]
        k = cache_rows_as(k_cache[blocks].flatten(0, 1)[:seq_len], torch.float64)  # [seq_len, num_kv_heads, head_dim]
        v = cache_rows_as(v_cache[blocks].flatten(0, 1)[:seq_len], torch.float64)
        k = k.repeat_interleave(group, dim=1)  # [seq_len, num_heads, head_dim]
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,thd->ht", q[i].double(), k) * scale  # [num_heads, seq_len]
        out.append(torch.einsum("ht,thd->hd", scores.softmax(-1), v))  # [num_heads, head_dim]
    return torch.stack(out).float()  # [num_seqs, num_heads, head_dim]


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [
    (9, 3, 64),  # SmolLM2-135M: grouped-query attention
    (4, 4, 32),  # multi-head attention
    (4, 1, 72),  # multi-query attention; head_dim an odd number of AVX2 registers
])
@CACHE_DTYPES
def test_matches_reference(num_heads: int, num_kv_heads: int, head_dim: int,
                           cache_dtype: torch.dtype) -> None:
    case = make_case(SEQ_LENS, num_heads, num_kv_heads, head_dim, cache_dtype=cache_dtype)
    scale = head_dim ** -0.5
    out = run_kernel(case, scale)
    assert out.shape == (len(SEQ_LENS), num_heads, head_dim)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference(case, scale), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_size", [1, 3])
@CACHE_DTYPES
def test_other_block_sizes(block_size: int, cache_dtype: torch.dtype) -> None:
    case = make_case((1, 2, 3, 4, 40), 6, 2, 16, block_size=block_size, seed=1,
                     cache_dtype=cache_dtype)
    torch.testing.assert_close(run_kernel(case, 0.25), reference(case, 0.25), rtol=1e-5, atol=1e-5)


@CACHE_DTYPES
def test_sequence_result_does_not_depend_on_the_batch(cache_dtype: torch.dtype) -> None:
    case = make_case(SEQ_LENS, 9, 3, 64, seed=2, cache_dtype=cache_dtype)
    batched = run_kernel(case, 0.125)
    for i in range(len(SEQ_LENS)):
        alone = dict(case, q=case["q"][i:i + 1], block_tables=case["block_tables"][i:i + 1],
                     seq_lens=case["seq_lens"][i:i + 1])
        assert torch.equal(run_kernel(alone, 0.125)[0], batched[i])


def test_large_scores_stay_finite() -> None:
    """Scores of several hundred would overflow exp() without subtracting the max."""
    case = make_case(SEQ_LENS, 9, 3, 64, seed=3)
    case["q"] *= 400.0
    out = run_kernel(case, 0.125)
    assert torch.isfinite(out).all()
    # Float32 scores this large carry up to ~1e-4 absolute rounding, which exp()
    # turns into as much relative error in the probabilities: a looser bound (the
    # same as test_prefill_attention_kernel.py's; float32 PyTorch is off by ~2e-4 too).
    torch.testing.assert_close(out, reference(case, 0.125), rtol=3e-4, atol=3e-4)


@CACHE_DTYPES
def test_unreferenced_cache_slots_are_never_read(cache_dtype: torch.dtype) -> None:
    case = make_case(SEQ_LENS, 9, 3, 64, seed=4, cache_dtype=cache_dtype)
    clean = run_kernel(case, 0.125)

    # [num_blocks, block_size]: the slots some sequence's context covers
    referenced = torch.zeros(case["k_cache"].shape[:2], dtype=torch.bool)
    for i, seq_len in enumerate(SEQ_LENS):
        for t in range(seq_len):
            referenced[case["block_tables"][i, t // BLOCK_SIZE], t % BLOCK_SIZE] = True
    assert not referenced[0].any()  # the padding block, among others
    poison(case["k_cache"], ~referenced, float("nan"))
    poison(case["v_cache"], ~referenced, float("inf"))

    assert torch.equal(run_kernel(case, 0.125), clean)


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(9, 3, 64), (4, 4, 32)])
def test_fp16_cache_is_exactly_its_float32_upcast(num_heads: int, num_kv_heads: int,
                                                  head_dim: int) -> None:
    """Widening float16 is exact and the arithmetic is the float32 path's, in
    the same order: the same bits as the float32 kernel on the upcast cache."""
    case = make_case(SEQ_LENS, num_heads, num_kv_heads, head_dim, seed=5,
                     cache_dtype=torch.float16)
    upcast = dict(case, k_cache=case["k_cache"].float(), v_cache=case["v_cache"].float())
    assert torch.equal(run_kernel(case, 0.125), run_kernel(upcast, 0.125))


def test_empty_batch() -> None:
    case = make_case((5,), 4, 2, 16)
    empty = dict(case, q=case["q"][:0], block_tables=case["block_tables"][:0],
                 seq_lens=case["seq_lens"][:0])
    assert run_kernel(empty, 0.25).shape == (0, 4, 16)


@CACHE_DTYPES
def test_padding_rows_are_zero_and_change_no_other_row(cache_dtype: torch.dtype) -> None:
    """seq_lens 0 marks a padding row of a batch padded to a static size (runner/cuda_graph.py):
    it attends to nothing and comes out zero, and the real rows keep their bits."""
    case = make_case(SEQ_LENS, 9, 3, 64, seed=7, cache_dtype=cache_dtype)
    padded = dict(case, q=torch.cat([case["q"], torch.randn(3, 9, 64)]),
                  block_tables=torch.cat([case["block_tables"], torch.zeros(3, case["block_tables"].shape[1],
                                                                              dtype=torch.int64)]),
                  seq_lens=torch.cat([case["seq_lens"], torch.zeros(3, dtype=torch.int64)]))
    out = run_kernel(padded, 0.125)
    assert torch.equal(out[:len(SEQ_LENS)], run_kernel(case, 0.125))
    assert torch.equal(out[len(SEQ_LENS):], torch.zeros(3, 9, 64))


def _invalid_cases() -> list[object]:
    base = make_case((5, 20), 4, 2, 16)
    q, k, v = base["q"], base["k_cache"], base["v_cache"]
    tables, lens = base["block_tables"], base["seq_lens"]
    past_last_block = tables.clone()
    past_last_block[1, 1] = k.shape[0]
    too_long = tables.shape[1] * BLOCK_SIZE + 1

    def case(name: str, message: str, **changes: torch.Tensor) -> object:
        return pytest.param(dict(base, **changes), message, id=name)

    return [
        *(case(name, message, **changes) for name, message, changes in q_and_cache_cases(q, k, v)),
        pytest.param(make_case((5, 20), 4, 2, 12), "head_dim", id="head_dim not a multiple of 8"),
        pytest.param(make_case((5, 20), 3, 2, 16), "num_heads", id="heads not a multiple"),
        case("tables dtype", "block_tables must be int64", block_tables=tables.int()),
        case("tables rows", "block_tables has 1 rows", block_tables=tables[:1]),
        case("block id too large", r"block_tables\[1, 1\]", block_tables=past_last_block),
        case("negative block id", r"block_tables\[0, 0\]", block_tables=tables - 100),
        case("lens dtype", "seq_lens must be int64", seq_lens=lens.int()),
        case("lens count", "block_tables has 2 rows, expected num_seqs = 1", seq_lens=lens[:1]),
        case("negative length", r"seq_lens\[0\] = -1", seq_lens=torch.tensor([-1, 20])),
        case("too long", rf"seq_lens\[1\] = {too_long} exceeds",
             seq_lens=torch.tensor([5, too_long])),
    ]


@pytest.mark.parametrize(("case", "message"), _invalid_cases())
def test_invalid_inputs_name_the_argument(case: dict[str, torch.Tensor], message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        run_kernel(case, 0.25)
