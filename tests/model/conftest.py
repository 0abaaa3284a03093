"""Tiny random models built once per session, saved as HF directories and GGUF files."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from tests.helpers.tiny_models import make_tiny_model, save_hf_model, write_gguf  # noqa: E402

# 13 tokens: with block_size 4 the prompt ends inside its fourth block.
PROMPT = [1, 17, 300, 45, 211, 9, 498, 120, 33, 76, 250, 5, 404]


@dataclass(frozen=True)
class TinyModel:
    kind: str
    hf: torch.nn.Module  # the transformers model, float32, the reference
    hf_dir: Path
    gguf_path: Path  # F32

    def path(self, fmt: str) -> Path:
        return self.hf_dir if fmt == "safetensors" else self.gguf_path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Callable[[str], TinyModel]:
    """``tiny(kind)``: the tiny model of that kind, built and saved on first use."""
    cache: dict[str, TinyModel] = {}

    def get(kind: str) -> TinyModel:
        if kind not in cache:
            root = tmp_path_factory.mktemp(kind)
            hf = make_tiny_model(kind)
            cache[kind] = TinyModel(kind, hf, save_hf_model(hf, root / "hf"),
                                    write_gguf(hf, root / "model-f32.gguf"))
        return cache[kind]

    return get


@torch.inference_mode()
def hf_logits(hf: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    """transformers' logits ``[len(token_ids), vocab]`` for one sequence."""
    return hf(torch.tensor([token_ids])).logits[0].float()


@torch.inference_mode()
def hf_greedy(hf: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens from full forwards with transformers (no cache, no generation config)."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]
