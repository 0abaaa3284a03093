"""Model loading: a ``.gguf`` file or a Hugging Face directory (config.json + safetensors)."""

from __future__ import annotations

from pathlib import Path

import torch

from tokenloom.config import QUANTIZATION_MODES, ModelArchConfig
from tokenloom.gguf_file import GGUFFile
from tokenloom.model.llama import LlamaForCausalLM
from tokenloom.model.loader.gguf import load_gguf_model, read_gguf_config
from tokenloom.model.loader.safetensors import load_hf_model, read_hf_config

__all__ = ["QUANTIZATION_MODES", "load_model", "read_arch_config"]


def load_model(path: str | Path, dtype: torch.dtype, device: torch.device | str,
               quantization: str = "none") -> tuple[LlamaForCausalLM, ModelArchConfig]:
    """Build the model for ``path`` and fill its weights in ``dtype`` on ``device``;
    ``quantization`` is one of ``QUANTIZATION_MODES`` (see ``loader/quantize.py``)."""
    path = Path(path)
    if _is_gguf(path):
        return load_gguf_model(path, dtype, device, quantization)
    return load_hf_model(_hf_directory(path), dtype, device, quantization)


def read_arch_config(path: str | Path) -> ModelArchConfig:
    """The network shape of ``path`` without loading any weights."""
    path = Path(path)
    if _is_gguf(path):
        return read_gguf_config(GGUFFile(path))
    return read_hf_config(_hf_directory(path))


def _is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix == ".gguf"


def _hf_directory(path: Path) -> Path:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is neither a .gguf file nor a directory with config.json")
    return path
