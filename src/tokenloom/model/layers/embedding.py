"""Token embedding table."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenloom.parallel.group import SINGLE, TPGroup


class VocabEmbedding(nn.Module):
    """Looks up rows of ``weight`` ``[vocab_size, hidden_size]``.

    With tied embeddings the same table doubles as the LM head. Under tensor
    parallelism the table holds the ids ``vocab_start .. vocab_start + vocab_size`` of
    the vocabulary: each rank looks up its own ids (zero rows for the others) and the
    sum over the ranks is the full lookup.
    """

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype,
                 device: torch.device | str, vocab_start: int = 0, group: TPGroup = SINGLE) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size, dtype=dtype, device=device),
                                   requires_grad=False)
        self.vocab_start = vocab_start
        self.group = group

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.group.size == 1:
            return F.embedding(input_ids, self.weight)  # [num_tokens, hidden_size]
        local = input_ids - self.vocab_start
        mine = (local >= 0) & (local < self.weight.shape[0])
        rows = F.embedding(torch.where(mine, local, 0), self.weight) * mine[:, None]
        return self.group.all_reduce(rows)
