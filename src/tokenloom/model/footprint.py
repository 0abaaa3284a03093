"""What a loaded model's weights occupy in memory."""

from __future__ import annotations

import torch


def weights_bytes(model: torch.nn.Module) -> int:
    """The model's tensors and the quantized blocks and tiles it runs on, each storage
    counted once (a tied LM head shares its blocks with the embedding; an untied one's
    quantized copy is its layer's too)."""
    quantized = [getattr(m, "quantized", None) for m in model.modules()] + [getattr(model, "logits_quantized", None)]
    tensors = [*model.parameters(), *model.buffers(), *(t for q in quantized if q is not None for t in q.held_tensors())]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors
                if t.device.type != "meta"}
    return sum(storages.values())
