"""The CPU paged attention kernel against the ones it replaced, in one process.

    python benchmarks/attention_ab.py [--old-commit 9ae6573]

Builds the old decode and prefill kernels (csrc/paged_attention.cpp and
csrc/prefill_attention.cpp of --old-commit) as a separate extension under their
own op namespace, then times old and current on the same tensors, alternated,
best of 5 (this VM drifts, so only the ratio within one run counts). SmolLM2's
attention shape: 9 heads / 3 KV heads, head_dim 64, blocks of 16.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

from tokenloom import kernels
from tokenloom.model.layers.attention import quantize_kv

CSRC = "src/tokenloom/kernels/csrc"
H, KVH, D, BLOCK = 9, 3, 64, 16


def build_old(commit: str) -> None:
    """The old ops as torch.ops.tokenloom_old.{paged_decode_attention, paged_prefill_attention}."""
    out = Path(tempfile.mkdtemp(prefix="tokenloom-old-attention-"))
    listing = subprocess.run(["git", "ls-tree", "--name-only", commit, CSRC + "/"], capture_output=True,
                             text=True, check=True).stdout.split()
    for path in listing:
        if path.endswith(".h"):
            (out / Path(path).name).write_text(_show(commit, path))
    sources = []
    for name, op in (("paged_attention.cpp", "paged_decode_attention"),
                     ("prefill_attention.cpp", "paged_prefill_attention")):
        text = _show(commit, f"{CSRC}/{name}")
        text = re.sub(r"TORCH_LIBRARY_(FRAGMENT|IMPL)\(tokenloom,", r"TORCH_LIBRARY_\1(tokenloom_old,", text)
        text = text.replace(f"{op}(const at::Tensor", f"old_{op}(const at::Tensor")
        text = text.replace(f"&tokenloom::{op}", f"&tokenloom::old_{op}")
        (out / name).write_text(text)
        sources.append(str(out / name))
    load(name="tokenloom_old_attention", sources=sources, build_directory=str(out), is_python_module=False,
         extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-std=c++17"], extra_ldflags=["-fopenmp"])


def _show(commit: str, path: str) -> str:
    return subprocess.run(["git", "show", f"{commit}:{path}"], capture_output=True, text=True, check=True).stdout


def case(num_seqs: int, ctx: int, q_len: int, cache: str) -> tuple[torch.Tensor, ...]:
    num_blocks = num_seqs * -(-ctx // BLOCK) + 1
    k, v = torch.randn(num_blocks, BLOCK, KVH, D), torch.randn(num_blocks, BLOCK, KVH, D)
    if cache == "int8":
        k, v = quantize_kv(k), quantize_kv(v)
    elif cache == "f16":
        k, v = k.half(), v.half()
    tables = torch.arange(num_blocks - 1).view(num_seqs, -1)
    seq_lens = torch.full((num_seqs,), ctx, dtype=torch.int64)
    starts = torch.arange(0, num_seqs * q_len + 1, q_len, dtype=torch.int64)
    return torch.randn(num_seqs * q_len, H, D), k, v, tables, seq_lens, starts


def best_us(fn, reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-commit", default="9ae6573")
    args = parser.parse_args()
    build_old(args.old_commit)
    new, old = kernels.ops(), torch.ops.tokenloom_old
    torch.manual_seed(0)
    print("| step | cache | old us | new us | new / old |\n|---|---|---|---|---|")
    for num_seqs, ctx, q_len in ((1, 300, 1), (1, 1000, 1), (16, 300, 1), (32, 600, 1),
                                 (1, 256, 256), (4, 512, 256), (1, 2048, 512)):
        for cache in ("int8", "f32", "f16"):
            q, k, v, tables, lens, starts = case(num_seqs, ctx, q_len, cache)
            if q_len == 1:
                f_old = lambda: old.paged_decode_attention(q, k, v, tables, lens, 0.125)  # noqa: E731
            else:
                f_old = lambda: old.paged_prefill_attention(q, k, v, tables, lens, starts, 0.125)  # noqa: E731
            f_new = lambda: new.paged_attention(q, k, v, tables, lens, starts, 0.125)  # noqa: E731
            reps = 200 if q_len == 1 else 10
            times = {"old": [], "new": []}
            for _ in range(5):
                times["old"].append(best_us(f_old, reps))
                times["new"].append(best_us(f_new, reps))
            t_old, t_new = min(times["old"]), min(times["new"])
            what = f"{num_seqs} x {'decode' if q_len == 1 else f'{q_len} new'} of {ctx}"
            print(f"| {what} | {cache} | {t_old:.1f} | {t_new:.1f} | {t_new / t_old:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
