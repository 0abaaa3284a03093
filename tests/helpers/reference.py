"""transformers as the reference implementation."""

from __future__ import annotations

import torch


def hf_greedy(hf_model, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None = None) -> list[int]:
    """Plain greedy decoding with the model's own forward and KV cache (no generation-config
    surprises such as eos suppression); stops after ``eos_id`` when given."""
    past = None
    out: list[int] = []
    step_input = torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(max_new_tokens):
            res = hf_model(input_ids=step_input, past_key_values=past, use_cache=True)
            past = res.past_key_values
            token = int(res.logits[0, -1].argmax())
            out.append(token)
            if token == eos_id:
                break
            step_input = torch.tensor([[token]])
    return out
