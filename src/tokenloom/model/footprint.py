"""What a loaded model's weights occupy in memory."""

from __future__ import annotations

import torch


def weights_bytes(model: torch.nn.Module) -> int:
    """The model's tensors (tied or shared ones counted once) and the quantized blocks
    the native kernels run on."""
    tensors = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
               for t in [*model.parameters(), *model.buffers()] if t.device.type != "meta"}
    quantized = [getattr(m, "quantized", None) for m in model.modules()] + [getattr(model, "logits_quantized", None)]
    return sum(tensors.values()) + sum(q.nbytes for q in quantized if q is not None)
