"""Token embedding table."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenloom.model.layers.quantization import QuantizedWeight
from tokenloom.parallel.group import SINGLE, TPGroup


class VocabEmbedding(nn.Module):
    """Looks up rows of ``weight`` ``[vocab_size, hidden_size]``.

    With tied embeddings the same table doubles as the LM head. Under tensor
    parallelism the table holds the ids ``vocab_start .. vocab_start + vocab_size`` of
    the vocabulary: each rank looks up its own ids (zero rows for the others) and the
    sum over the ranks is the full lookup.

    A quantized GGUF's table stays in the file's blocks (``use_blocks``): a lookup
    dequantizes just the rows it reads, the same values as the dense table, which is
    never made (4 bytes per weight: 2.1 GB for Llama 3 8B's 128k x 4096 table).
    """

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype,
                 device: torch.device | str, vocab_start: int = 0, group: TPGroup = SINGLE) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size, dtype=dtype, device=device),
                                   requires_grad=False)
        self.vocab_start = vocab_start
        self.group = group
        self.num_rows = vocab_size
        self.quantized: QuantizedWeight | None = None  # use_blocks

    def use_blocks(self, blocks: QuantizedWeight) -> None:
        """Look rows up in ``blocks`` from now on; the dense table is dropped."""
        if blocks.shape != (self.num_rows, self.weight.shape[1]):
            raise ValueError(f"embedding blocks of shape {blocks.shape} for a table of "
                             f"{(self.num_rows, self.weight.shape[1])}")
        self.quantized = blocks
        self.weight = nn.Parameter(self.weight.new_empty(self.num_rows, 0), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.group.size == 1:
            return self._rows(input_ids)  # [num_tokens, hidden_size]
        local = input_ids - self.vocab_start
        mine = (local >= 0) & (local < self.num_rows)
        rows = self._rows(torch.where(mine, local, 0)) * mine[:, None]
        return self.group.all_reduce(rows)

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        if self.quantized is None:
            return F.embedding(ids, self.weight)
        return self.quantized.select_rows(ids).dequantize().to(self.weight.dtype)
