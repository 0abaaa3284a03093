"""Ship the default model's tokenizer with the shapes, so that random-weight models
(``--load-format dummy``, benchmarks/random_model.py) tokenize as the default model
does on machines that do not have it (a GPU box without network).

    python benchmarks/export_tokenizer.py [--model smollm2-135m] [--out benchmarks/shapes]

tokenizer.json is the backend tokenloom itself builds from the GGUF's vocabulary,
written compact (~1.6 MB); tokenizer_config.json holds the special tokens, whether
BOS/EOS are added, and the chat template. tests/engine/test_shipped_tokenizer.py
checks that both give the GGUF's ids.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenloom.engine.gguf_tokenizer import build_backend, default_add_bos_token, read_gguf_tokenizer_metadata
from tokenloom.gguf_file import GGUFFile
from tokenloom.model_files import SHAPES_DIR, resolve_model


def export_tokenizer(gguf_path: Path, out: Path) -> None:
    meta = read_gguf_tokenizer_metadata(GGUFFile(gguf_path).fields)
    if meta.eot_token_id is not None or meta.eom_token_id is not None:
        raise ValueError("end-of-turn ids would need a generation_config.json; not written")
    named = {"bos_token": meta.bos_token_id, "eos_token": meta.eos_token_id,
             "unk_token": meta.unk_token_id, "pad_token": meta.pad_token_id}
    config = {name: meta.tokens[i] for name, i in named.items() if meta.token_or_none(i) is not None}
    config.update(add_bos_token=default_add_bos_token(meta), add_eos_token=bool(meta.add_eos_token),
                  chat_template=meta.chat_template)
    out.mkdir(parents=True, exist_ok=True)
    build_backend(meta).save(str(out / "tokenizer.json"), pretty=False)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a GGUF file or alias (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=SHAPES_DIR, help="(default: %(default)s)")
    args = parser.parse_args()
    export_tokenizer(resolve_model(args.model), args.out)
    print(args.out)


if __name__ == "__main__":
    main()
