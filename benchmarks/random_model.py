"""A Hugging Face directory of random weights in a named shape, for benchmarks.

    python benchmarks/random_model.py benchmarks/shapes/llama-3.2-1b.json OUT_DIR [--seed 0]

The config is the shape file as is (Llama-3.2-1B's layer sizes with SmolLM2's
49152-token vocabulary); the weights are normal(0, 0.02), norms 1, written as
bf16 safetensors; the tokenizer is the default model's as shipped with the shapes
(benchmarks/export_tokenizer.py), so prompts tokenize as for the default model, or
another GGUF's (--tokenizer-from, read by transformers). llama.cpp's converter
turns the directory into a GGUF (benchmarks/random_gguf.sh). To benchmark a shape
without writing weights at all: ``--load-format dummy``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaConfig

from tokenloom.model_files import SHAPES_DIR, resolve_model


def random_state_dict(config: LlamaConfig, seed: int) -> dict[str, torch.Tensor]:
    """Every weight of a Llama of this config; one generator, fixed order."""
    generator = torch.Generator().manual_seed(seed)
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = config.head_dim
    q_dim, kv_dim = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)

    weights = {"model.embed_tokens.weight": normal(config.vocab_size, hidden),
               "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
    shapes = {"self_attn.q_proj": (q_dim, hidden), "self_attn.k_proj": (kv_dim, hidden),
              "self_attn.v_proj": (kv_dim, hidden), "self_attn.o_proj": (hidden, q_dim),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
              "mlp.down_proj": (hidden, inter)}
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        for name, shape in shapes.items():
            weights[f"{prefix}{name}.weight"] = normal(*shape)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            weights[f"{prefix}{norm}.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    if not config.tie_word_embeddings:
        weights["lm_head.weight"] = normal(config.vocab_size, hidden)
    return weights


def write_tokenizer(gguf_or_alias: str | None, out: Path) -> None:
    if gguf_or_alias is None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(SHAPES_DIR / name, out / name)
        return
    gguf = resolve_model(gguf_or_alias)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", type=Path, help="a config.json of the shape")
    parser.add_argument("out", type=Path, help="the directory to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer-from", default=None,
                        help="a GGUF (or alias) whose tokenizer the model takes (default: the shipped one)")
    args = parser.parse_args()
    config_dict = json.loads(args.shape.read_text())
    config = LlamaConfig(**config_dict)
    args.out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(args.tokenizer_from, args.out)
    (args.out / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
    save_file(random_state_dict(config, args.seed), args.out / "model.safetensors", metadata={"format": "pt"})
    print(args.out)


if __name__ == "__main__":
    main()
