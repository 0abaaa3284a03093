"""tokenloom: a fast LLM inference engine and OpenAI-compatible server on PyTorch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tokenloom.request import CompletionOutput, RequestOutput
from tokenloom.sampling_params import SamplingParams, StructuredOutputsParams

if TYPE_CHECKING:
    from tokenloom.entrypoints.llm import LLM

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # LLM pulls in torch; importing it lazily keeps the pure layers (kv_cache, sched) torch-free.
    if name == "LLM":
        from tokenloom.entrypoints.llm import LLM

        return LLM
    raise AttributeError(f"module 'tokenloom' has no attribute {name!r}")
