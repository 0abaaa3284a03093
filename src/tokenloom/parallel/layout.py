"""Which part of a Llama-family model each tensor-parallel rank holds (Megatron style).

Pure arithmetic on the model's shape; no torch. For ``size`` ranks::

    q/k/v, gate/up   column-parallel: each rank holds whole heads / a slice of the
                     intermediate rows, so its attention and SwiGLU need no exchange
    o_proj, down     row-parallel: the matching input columns; their partial sums
                     are added over the ranks (one all-reduce after each)
    embedding        split by vocabulary: a rank looks up only its ids, the sum over
                     ranks is the full lookup (one all-reduce)
    LM head          split by vocabulary: logits are gathered on rank 0 for sampling
    norms, rotary    replicated

Heads are split by key/value group, so that each rank's q heads keep one
uniform grouping over its own kv heads (what every attention kernel assumes):

    size <= kv heads   rank r: kv heads [r*KV//size, (r+1)*KV//size) and their q heads
                       (uneven when size does not divide KV, e.g. SmolLM2's 3 kv
                       heads on 2 ranks: 1 and 2 kv heads, 3 and 6 q heads)
    size >  kv heads   size must be a multiple of KV and q heads a multiple of size;
                       each kv head is replicated on size/KV ranks, as in vLLM

The intermediate rows split in steps of 256 (a K-quant super-block) where the size
allows, else 32 (a quant block), so that a quantized down_proj splits on block
boundaries; vocab rows split as evenly as possible.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenloom.config import ModelArchConfig

_INTERMEDIATE_STEPS = (256, 32, 1)


@dataclass(frozen=True, slots=True)
class TPShard:
    """Rank ``rank`` of ``size``: the half-open ranges of the model's q heads, kv heads,
    intermediate rows and vocabulary rows it holds."""

    rank: int
    size: int
    head_dim: int
    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    intermediate: tuple[int, int]
    vocab: tuple[int, int]

    @property
    def num_heads(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def intermediate_size(self) -> int:
        return self.intermediate[1] - self.intermediate[0]

    @property
    def vocab_size(self) -> int:
        return self.vocab[1] - self.vocab[0]

    def param_slice(self, param_name: str, part: str | None) -> tuple[int, int, int] | None:
        """(dim, start, stop) of a checkpoint tensor that this rank holds (None: all of it).
        ``part``: the part of a fused projection (``ParamTarget.shard``)."""
        if self.size == 1:
            return None
        d = self.head_dim
        module = param_name.rsplit(".", 1)[0]
        if part == "q":
            return 0, self.q_heads[0] * d, self.q_heads[1] * d
        if part in ("k", "v"):
            return 0, self.kv_heads[0] * d, self.kv_heads[1] * d
        if part in ("gate", "up"):
            return 0, *self.intermediate
        if module.endswith("o_proj") and param_name.endswith("weight"):
            return 1, self.q_heads[0] * d, self.q_heads[1] * d
        if module.endswith("down_proj") and param_name.endswith("weight"):
            return 1, *self.intermediate
        if param_name in ("model.embed_tokens.weight", "lm_head.weight"):
            return 0, *self.vocab
        return None


def take(tensor, cut: tuple[int, int, int] | None):
    """The part ``cut`` (``TPShard.param_slice``) of a tensor, array or lazy slice of a
    checkpoint (anything that slices like a tensor); all of it for None."""
    if cut is None:
        return tensor
    dim, start, stop = cut
    return tensor[start:stop] if dim == 0 else tensor[:, start:stop]


def tp_shard(arch: ModelArchConfig, size: int, rank: int) -> TPShard:
    """What rank ``rank`` of ``size`` holds; ValueError where the model cannot be split so."""
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"tensor parallel rank {rank} of {size} is not a rank")
    check_splittable(arch, size)
    heads, kv = arch.num_attention_heads, arch.num_key_value_heads
    if size <= kv:
        kv_range = _even(kv, size, rank)
        group = heads // kv
        q_range = (kv_range[0] * group, kv_range[1] * group)
    else:
        q_range = _even(heads, size, rank)
        first_kv = q_range[0] // (heads // kv)
        kv_range = (first_kv, first_kv + 1)
    size_i = arch.intermediate_size
    step = next(s for s in _INTERMEDIATE_STEPS if size_i % s == 0 and size_i // s >= size)
    units = _even(size_i // step, size, rank)
    return TPShard(rank, size, arch.head_dim, q_range, kv_range, (units[0] * step, units[1] * step),
                   _even(arch.vocab_size, size, rank))


def check_splittable(arch: ModelArchConfig, size: int) -> None:
    """ValueError naming the reason when ``size`` ranks cannot share ``arch``."""
    heads, kv = arch.num_attention_heads, arch.num_key_value_heads
    where = f"--tensor-parallel-size {size}"
    if size > kv and (size % kv or heads % size):
        raise ValueError(f"{where}: the model has {heads} q heads and {kv} kv heads; more ranks than kv heads "
                         f"needs a rank count that is a multiple of the kv heads and divides the q heads")
    if size > arch.intermediate_size or size > arch.vocab_size:
        raise ValueError(f"{where}: more ranks than the model's intermediate size or vocabulary")


def _even(total: int, size: int, rank: int) -> tuple[int, int]:
    """Rank ``rank``'s share of ``total`` items split as evenly as possible, in order."""
    return total * rank // size, total * (rank + 1) // size
