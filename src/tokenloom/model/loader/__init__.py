"""Model loading: a ``.gguf`` file or a Hugging Face directory (config.json + safetensors),
or random weights in the shape of either or of a config.json-style file (``load_format="dummy"``)."""

from __future__ import annotations

from pathlib import Path

import torch

from tokenloom.config import LOAD_FORMATS, QUANTIZATION_MODES, ModelArchConfig
from tokenloom.gguf_file import GGUFFile
from tokenloom.model.llama import LlamaForCausalLM
from tokenloom.model.loader.dummy import load_dummy_model
from tokenloom.model.loader.gguf import load_gguf_model, read_gguf_config
from tokenloom.model.loader.safetensors import load_hf_model, read_hf_config
from tokenloom.parallel.group import SINGLE, TPGroup

__all__ = ["LOAD_FORMATS", "QUANTIZATION_MODES", "load_model", "read_arch_config"]


def load_model(path: str | Path, dtype: torch.dtype, device: torch.device | str,
               quantization: str = "none", load_format: str = "auto",
               seed: int = 0, group: TPGroup = SINGLE) -> tuple[LlamaForCausalLM, ModelArchConfig]:
    """Build the model for ``path`` and fill its weights in ``dtype`` on ``device``;
    ``quantization`` is one of ``QUANTIZATION_MODES`` (see ``loader/quantize.py``).
    ``load_format="dummy"``: random weights drawn from ``seed`` (``loader/dummy.py``)
    in the shape ``read_arch_config(path)`` gives; no weight file is read (nor a GGUF's
    llama3 rope factors, a tensor: random weights make no use of long-context rotary).
    ``group``: the tensor-parallel ranks; this process builds and reads only its rank's part."""
    path = Path(path)
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    if load_format == "dummy":
        return load_dummy_model(read_arch_config(path), dtype, device, quantization, seed, group)
    if _is_gguf(path):
        return load_gguf_model(path, dtype, device, quantization, group)
    return load_hf_model(_hf_directory(path), dtype, device, quantization, group)


def read_arch_config(path: str | Path) -> ModelArchConfig:
    """The network shape of ``path`` (a GGUF file, an HF directory, or a JSON file in
    config.json's layout) without loading any weights."""
    path = Path(path)
    if _is_gguf(path):
        return read_gguf_config(GGUFFile(path))
    if path.is_file() and path.suffix == ".json":
        return read_hf_config(path)
    return read_hf_config(_hf_directory(path))


def _is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix == ".gguf"


def _hf_directory(path: Path) -> Path:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is neither a .gguf file nor a directory with config.json")
    return path
