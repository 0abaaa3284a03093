"""Architecture string (HF ``architectures[0]`` or GGUF ``general.architecture``) -> model class."""

from __future__ import annotations

from tokenloom.model.llama import LlamaForCausalLM

_MODEL_CLASSES: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
}


def supported_architectures() -> tuple[str, ...]:
    return tuple(_MODEL_CLASSES)


def get_model_class(architecture: str) -> type[LlamaForCausalLM]:
    """The class implementing ``architecture``; ValueError if there is none."""
    try:
        return _MODEL_CLASSES[architecture]
    except KeyError:
        raise ValueError(f"unsupported model architecture {architecture!r}; "
                         f"supported: {', '.join(_MODEL_CLASSES)}") from None
