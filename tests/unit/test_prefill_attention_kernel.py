"""paged_attention (csrc/paged_attention.cpp) on prompt chunks and mixed steps against a gather +
causal softmax reference."""

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

BLOCK_SIZE = 16
CACHE_DTYPES = pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.int8])
HEAD_SHAPES = pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [
    (9, 3, 64),  # SmolLM2-135M: GQA groups of 3
    (4, 4, 128),  # multi-head attention (groups of 1)
    (8, 2, 64),  # GQA groups of 4
    (4, 1, 72),  # multi-query attention; head_dim an odd number of AVX2 registers
])

# (seq_len, q_len) per sequence: the sequence's last q_len tokens are new.
PROMPTS = {"q_len 1": [(1, 1)], "q_len 5": [(5, 5)], "q_len 17": [(17, 17)],
           "q_len 256": [(256, 256)]}
CHUNKS = {"chunk after 48": [(300, 252)], "chunk after 83": [(100, 17)],
          "decode after 299": [(300, 1)]}
MIXED = [(40, 1), (17, 17), (300, 5), (70, 40), (1, 1), (129, 64), (333, 1)]


def blocks_for(seq_len: int, block_size: int) -> int:
    return -(-seq_len // block_size)


def make_case(seqs: list[tuple[int, int]], num_heads: int, num_kv_heads: int, head_dim: int,
              block_size: int = BLOCK_SIZE, pad_blocks: int = 3, spare_blocks: int = 4, seed: int = 0,
              cache_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random q and cache for sequences given as (seq_len, q_len), with each
    sequence's blocks drawn from a shuffled pool.

    Block 0 is never given to a sequence and every table row is padded with it
    (``pad_blocks`` extra entries), so padding points at a block nobody owns.
    ``spare_blocks`` more blocks stay unreferenced too. The caches are drawn in
    float32 and rounded (int8: quantized) to ``cache_dtype``; q stays float32."""
    gen = torch.Generator().manual_seed(seed)
    used = [blocks_for(seq_len, block_size) for seq_len, _ in seqs]
    num_blocks = 1 + sum(used) + spare_blocks
    max_num_blocks = max(used, default=0) + pad_blocks
    pool = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    tables = torch.zeros(len(seqs), max_num_blocks, dtype=torch.int64)
    for i, n in enumerate(used):
        tables[i, :n] = torch.tensor(pool[:n])
        pool = pool[n:]
    starts = [0]
    for _, q_len in seqs:
        starts.append(starts[-1] + q_len)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return {
        "q": torch.randn(starts[-1], num_heads, head_dim, generator=gen),
        "k_cache": to_cache_rows(torch.randn(cache_shape, generator=gen), cache_dtype),
        "v_cache": to_cache_rows(torch.randn(cache_shape, generator=gen), cache_dtype),
        "block_tables": tables,
        "seq_lens": torch.tensor([seq_len for seq_len, _ in seqs], dtype=torch.int64),
        "query_start_loc": torch.tensor(starts, dtype=torch.int64),
    }


def run_kernel(case: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    return OPS.paged_attention(case["q"], case["k_cache"], case["v_cache"], case["block_tables"],
                               case["seq_lens"], case["query_start_loc"], scale)


def reference(case: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    """Gathers each sequence's context and attends with an explicit causal mask, in float64.

    A float16 cache is upcast from the very values the kernel reads (exactly),
    an int8 cache dequantized (exactly, in float64), so only the order of the
    arithmetic separates the two, whatever the cache dtype."""
    q, k_cache, v_cache = case["q"], case["k_cache"], case["v_cache"]
    block_size = k_cache.shape[1]
    group = q.shape[1] // k_cache.shape[2]
    starts = case["query_start_loc"].tolist()
    out = torch.zeros(q.shape, dtype=torch.float64)
    for i, seq_len in enumerate(case["seq_lens"].tolist()):
        lo, hi = starts[i], starts[i + 1]
        blocks = case["block_tables"][i, :blocks_for(seq_len, block_size)]
        k = cache_rows_as(k_cache[blocks].flatten(0, 1)[:seq_len], torch.float64)  # [seq_len, num_kv_heads, head_dim]
        v = cache_rows_as(v_cache[blocks].flatten(0, 1)[:seq_len], torch.float64)
        k = k.repeat_interleave(group, dim=1)  # [seq_len, num_heads, head_dim]
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("jhd,thd->hjt", q[lo:hi].double(), k) * scale  # [H, q_len, seq_len]
        positions = torch.arange(hi - lo) + seq_len - (hi - lo)
        hidden = torch.arange(seq_len).unsqueeze(0) > positions.unsqueeze(1)  # [q_len, seq_len]
        scores = scores.masked_fill(hidden, float("-inf"))
        out[lo:hi] = torch.einsum("hjt,thd->jhd", scores.softmax(-1), v)
    return out.float()


def assert_matches_reference(case: dict[str, torch.Tensor], scale: float) -> None:
    out = run_kernel(case, scale)
    assert out.shape == case["q"].shape
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference(case, scale), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seqs", list(PROMPTS.values()), ids=list(PROMPTS))
@HEAD_SHAPES
@CACHE_DTYPES
def test_whole_prompts(seqs: list[tuple[int, int]], num_heads: int, num_kv_heads: int, head_dim: int,
                       cache_dtype: torch.dtype) -> None:
    case = make_case(seqs, num_heads, num_kv_heads, head_dim, cache_dtype=cache_dtype)
    assert_matches_reference(case, head_dim ** -0.5)


@pytest.mark.parametrize("seqs", list(CHUNKS.values()), ids=list(CHUNKS))
@HEAD_SHAPES
@CACHE_DTYPES
def test_chunks_after_a_cached_prefix(seqs: list[tuple[int, int]], num_heads: int, num_kv_heads: int,
                                      head_dim: int, cache_dtype: torch.dtype) -> None:
    case = make_case(seqs, num_heads, num_kv_heads, head_dim, seed=1, cache_dtype=cache_dtype)
    assert_matches_reference(case, head_dim ** -0.5)


@HEAD_SHAPES
@CACHE_DTYPES
def test_mixed_batch_of_prompts_chunks_and_decodes(num_heads: int, num_kv_heads: int, head_dim: int,
                                                   cache_dtype: torch.dtype) -> None:
    case = make_case(MIXED, num_heads, num_kv_heads, head_dim, seed=2, cache_dtype=cache_dtype)
    assert_matches_reference(case, head_dim ** -0.5)


@pytest.mark.parametrize("block_size", [4, 1, 3])
@CACHE_DTYPES
def test_other_block_sizes(block_size: int, cache_dtype: torch.dtype) -> None:
    case = make_case(MIXED, 9, 3, 64, block_size=block_size, seed=3, cache_dtype=cache_dtype)
    assert_matches_reference(case, 0.125)


def test_sequence_with_no_new_tokens_is_skipped() -> None:
    case = make_case([(20, 5), (30, 0), (9, 9)], 9, 3, 64, seed=4)
    assert_matches_reference(case, 0.125)


@CACHE_DTYPES
def test_sequence_result_does_not_depend_on_the_batch(cache_dtype: torch.dtype) -> None:
    case = make_case(MIXED, 9, 3, 64, seed=5, cache_dtype=cache_dtype)
    batched = run_kernel(case, 0.125)
    starts = case["query_start_loc"].tolist()
    for i in range(len(MIXED)):
        lo, hi = starts[i], starts[i + 1]
        alone = dict(case, q=case["q"][lo:hi], block_tables=case["block_tables"][i:i + 1],
                     seq_lens=case["seq_lens"][i:i + 1], query_start_loc=torch.tensor([0, hi - lo]))
        assert torch.equal(run_kernel(alone, 0.125), batched[lo:hi])


@CACHE_DTYPES
@HEAD_SHAPES
def test_a_token_gives_the_same_bits_alone_or_in_a_chunk(cache_dtype, num_heads, num_kv_heads, head_dim) -> None:
    """The last token of a 300-token context as a decode (its heads read the cache rows in
    place) and as the last row of chunks of 7 and 40 (a widened tile): the same bits."""
    case = make_case([(300, 40)], num_heads, num_kv_heads, head_dim, seed=8, cache_dtype=cache_dtype)
    chunk = run_kernel(case, 0.125)
    for q_len in (1, 7):
        part = dict(case, q=case["q"][-q_len:], query_start_loc=torch.tensor([0, q_len]))
        assert torch.equal(run_kernel(part, 0.125), chunk[-q_len:])


def test_large_scores_stay_finite() -> None:
    """Scores of several hundred would overflow exp() without subtracting the running max."""
    case = make_case(MIXED, 9, 3, 64, seed=7)
    case["q"] *= 400.0
    out = run_kernel(case, 0.125)
    assert torch.isfinite(out).all()
    # Float32 scores this large carry up to ~1e-4 absolute rounding, which exp()
    # turns into as much relative error in the probabilities: a looser bound
    # (float32 PyTorch on the same inputs is off by ~2e-4 as well).
    torch.testing.assert_close(out, reference(case, 0.125), rtol=3e-4, atol=3e-4)


@CACHE_DTYPES
def test_unreferenced_cache_slots_are_never_read(cache_dtype: torch.dtype) -> None:
    """NaN keys and infinite values in the padding block, the spare blocks and
    the slots past each sequence's end change nothing, not even a bit."""
    case = make_case(MIXED, 9, 3, 64, seed=8, cache_dtype=cache_dtype)
    clean = run_kernel(case, 0.125)

    # [num_blocks, block_size]: the slots some sequence's context covers
    referenced = torch.zeros(case["k_cache"].shape[:2], dtype=torch.bool)
    for i, (seq_len, _) in enumerate(MIXED):
        for t in range(seq_len):
            referenced[case["block_tables"][i, t // BLOCK_SIZE], t % BLOCK_SIZE] = True
    assert not referenced[0].any()  # the padding block, among others
    poison(case["k_cache"], ~referenced, float("nan"))
    poison(case["v_cache"], ~referenced, float("inf"))

    out = run_kernel(case, 0.125)
    assert torch.isfinite(out).all()
    assert torch.equal(out, clean)


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(9, 3, 64), (4, 4, 128)])
def test_fp16_cache_is_exactly_its_float32_upcast(num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    """Widening float16 is exact and the arithmetic is the float32 path's, in
    the same order: the same bits as the kernel on the upcast cache."""
    case = make_case(MIXED, num_heads, num_kv_heads, head_dim, seed=9, cache_dtype=torch.float16)
    upcast = dict(case, k_cache=case["k_cache"].float(), v_cache=case["v_cache"].float())
    assert torch.equal(run_kernel(case, 0.125), run_kernel(upcast, 0.125))


def test_empty_batch() -> None:
    case = make_case([], 4, 2, 16)
    assert run_kernel(case, 0.25).shape == (0, 4, 16)


def _invalid_cases() -> list[object]:
    base = make_case([(5, 5), (20, 3)], 4, 2, 16)
    q, k, v = base["q"], base["k_cache"], base["v_cache"]
    tables, lens = base["block_tables"], base["seq_lens"]
    past_last_block = tables.clone()
    past_last_block[1, 1] = k.shape[0]
    too_long = tables.shape[1] * BLOCK_SIZE + 1

    def case(name: str, message: str, **changes: torch.Tensor) -> object:
        return pytest.param(dict(base, **changes), message, id=name)

    def starts(*values: int) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64)

    return [
        *(case(name, message, **changes) for name, message, changes in q_and_cache_cases(q, k, v)),
        pytest.param(make_case([(5, 5)], 4, 2, 12), "head_dim", id="head_dim not a multiple of 8"),
        pytest.param(make_case([(5, 5)], 3, 2, 16), "num_heads", id="heads not a multiple"),
        case("tables dtype", "block_tables must be int64", block_tables=tables.int()),
        case("tables rows", "block_tables has 1 rows", block_tables=tables[:1]),
        case("block id too large", r"block_tables\[1, 1\]", block_tables=past_last_block),
        case("negative block id", r"block_tables\[0, 0\]", block_tables=tables - 100),
        case("lens dtype", "seq_lens must be int64", seq_lens=lens.int()),
        case("negative length", r"seq_lens\[0\] = -1", seq_lens=torch.tensor([-1, 20])),
        case("too long", rf"seq_lens\[1\] = {too_long} exceeds", seq_lens=torch.tensor([5, too_long])),
        case("q_len > seq_len", r"sequence 0 has 5 query tokens, more than seq_lens\[0\] = 4",
             seq_lens=torch.tensor([4, 20])),
        case("starts dtype", "query_start_loc must be int64", query_start_loc=starts(0, 5, 8).int()),
        case("starts count", "query_start_loc has 2 entries", query_start_loc=starts(0, 8)),
        case("starts not at 0", r"query_start_loc\[0\] = 1 must be 0", query_start_loc=starts(1, 5, 8)),
        case("starts decreasing", "query_start_loc must be nondecreasing", query_start_loc=starts(0, 9, 8),
             seq_lens=torch.tensor([10, 20])),
        case("starts past q", r"query_start_loc\[2\] = 7 must equal q's num_tokens 8",
             query_start_loc=starts(0, 5, 7)),
    ]


@pytest.mark.parametrize(("case", "message"), _invalid_cases())
def test_invalid_inputs_name_the_argument(case: dict[str, torch.Tensor], message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        run_kernel(case, 0.25)
