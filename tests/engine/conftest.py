"""A tiny random Llama with a real tokenizer, saved as an HF directory and a GGUF file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from tests.helpers.tiny_models import make_tiny_model, save_hf_model, write_gguf  # noqa: E402
from tests.helpers.tiny_tokenizer import CHATML_TEMPLATE, make_tiny_tokenizer  # noqa: E402


@dataclass(frozen=True)
class TinyCheckpoint:
    hf: torch.nn.Module  # the transformers reference, float32
    hf_dir: Path
    gguf_path: Path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> TinyCheckpoint:
    root = tmp_path_factory.mktemp("tiny_engine")
    hf = make_tiny_model("llama3", seed=1)
    tokenizer = make_tiny_tokenizer(512)
    return TinyCheckpoint(
        hf=hf,
        hf_dir=save_hf_model(hf, root / "hf", tokenizer=tokenizer, chat_template=CHATML_TEMPLATE),
        gguf_path=write_gguf(hf, root / "tiny.gguf", tokenizer=tokenizer, chat_template=CHATML_TEMPLATE),
    )
