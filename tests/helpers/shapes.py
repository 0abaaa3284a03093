"""A tiny model shape (a config.json and nothing else) for ``--load-format dummy`` tests.

The vocabulary is the default model's, so the shipped tokenizer's ids fit; the LM
head is untied, since with a tied one a random model's greedy token is the input
token whatever the seed (the residual keeps each token's own embedding on top).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TINY_SHAPE: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 49152,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def write_shape(path: Path, **changes: Any) -> Path:
    """TINY_SHAPE with ``changes``, written to ``path`` (a .json file, or a directory that
    gets a config.json); returns the path written."""
    target = path / "config.json" if path.suffix != ".json" else path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({**TINY_SHAPE, **changes}))
    return target
