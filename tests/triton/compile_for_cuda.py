"""Compile the Triton kernels for a CUDA GPU on a machine without one (CUDA 9.0 =
H100/H200 by default): Triton ships ptxas, so the whole pipeline down to a cubin
runs here. It catches what the interpreter cannot (types, layouts, tl.dot shapes,
loop-carried values) before GPU time is spent.

    python tests/triton/compile_for_cuda.py [--arch 90] [--quick]

(tests/triton/test_compile_for_cuda.py runs the quick set in CI.)
"""

from __future__ import annotations

import argparse
import os

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from tokenloom.kernels.triton import attention, fused_ops, kv_write  # noqa: E402


def _compile(fn, types: dict[str, str], constants: dict, arch: int) -> None:
    signature = {name: ("constexpr" if name in constants else types[name]) for name in fn.arg_names}
    src = ASTSource(fn, signature, constexprs=constants)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32))
    print(f"ok  {fn.__name__} {constants}: {len(kernel.asm['cubin'])} bytes of cubin")


def _attention(arch: int, dtype: str, cache: str, split: bool, group: int, head_dim: int) -> None:
    ints = {n: "i64" for n in attention._paged_attention_kernel.arg_names if n.startswith("stride")}
    types = {"out_ptr": f"*{dtype}", "q_ptr": f"*{dtype}", "k_cache_ptr": f"*{cache}", "v_cache_ptr": f"*{cache}",
             "block_tables_ptr": "*i64", "seq_lens_ptr": "*i64", "query_start_loc_ptr": "*i64",
             "part_m_ptr": "*fp32", "part_l_ptr": "*fp32", "part_acc_ptr": "*fp32", "scale": "fp32",
             "num_seqs": "i32", **ints}
    pad = triton.next_power_of_2(group)
    block_q = max(1, 16 // pad)
    _compile(attention._paged_attention_kernel, types,
             dict(G=group, G_PAD=pad, HEAD_DIM=head_dim, D_PAD=max(16, triton.next_power_of_2(head_dim)),
                  BLOCK_SIZE=16, BLOCK_Q=block_q, BLOCK_M=block_q * pad, SEGMENT=attention.SEGMENT, SPLIT=split,
                  WIDEN=False, PRECISION="ieee" if dtype == "fp32" else "tf32"), arch)
    if split:
        names = attention._merge_segments_kernel.arg_names
        types = {n: ("i64" if n.startswith("stride") else "i32") for n in names}
        types.update(out_ptr=f"*{dtype}", part_m_ptr="*fp32", part_l_ptr="*fp32", part_acc_ptr="*fp32")
        _compile(attention._merge_segments_kernel, types,
                 dict(HEAD_DIM=head_dim, D_PAD=max(16, triton.next_power_of_2(head_dim)),
                      SEGMENT=attention.SEGMENT), arch)


def _fused(arch: int, dtype: str) -> None:
    p = f"*{dtype}"
    _compile(fused_ops._rms_norm_kernel, dict(x_ptr=p, x_stride="i64", w_ptr=p, out_ptr=p, width="i32",
                                              eps="fp32"), dict(BLOCK=2048), arch)
    _compile(fused_ops._add_rms_norm_kernel, dict(x_ptr=p, x_stride="i64", r_ptr=p, r_stride="i64", w_ptr=p,
                                                  out_ptr=p, total_ptr=p, width="i32", eps="fp32"),
             dict(BLOCK=4096), arch)
    _compile(fused_ops._rotary_qk_kernel, dict(qkv_ptr=p, qkv_stride="i64", cache_ptr=p, pos_ptr="*i64", q_ptr=p,
                                               k_ptr=p, num_heads="i32", num_kv_heads="i32", head_dim="i32"),
             dict(BLOCK=32), arch)
    _compile(fused_ops._silu_and_mul_kernel, dict(x_ptr=p, x_stride="i64", out_ptr=p, inter="i32"),
             dict(BLOCK=1024), arch)


def _kv_write(arch: int, dtype: str, cache: str) -> None:
    fn = kv_write._write_kv_kernel
    types = {n: ("i64" if "_s" in n else "i32") for n in fn.arg_names}
    types.update(k_ptr=f"*{dtype}", v_ptr=f"*{dtype}", kc_ptr=f"*{cache}", vc_ptr=f"*{cache}", slot_ptr="*i64",
                 k_scale="fp32", v_scale="fp32")
    _compile(fn, types, dict(BLOCK=64, IS_FP8=cache == "fp8e4nv"), arch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--quick", action="store_true", help="bf16 (and an fp8 cache) only")
    args = parser.parse_args()
    print("triton", triton.__version__)
    if args.quick:
        for split in (False, True):
            _attention(args.arch, "bf16", "bf16", split, group=4, head_dim=64)
        _attention(args.arch, "bf16", "fp8e4nv", False, group=3, head_dim=128)
        _fused(args.arch, "bf16")
        _kv_write(args.arch, "bf16", "bf16")
        _kv_write(args.arch, "bf16", "fp8e4nv")
        return
    for dtype, cache in (("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "fp32"), ("bf16", "fp8e4nv")):
        for split in (False, True):
            _attention(args.arch, dtype, cache, split, group=4, head_dim=64)
    _attention(args.arch, "bf16", "bf16", False, group=3, head_dim=128)
    _attention(args.arch, "bf16", "bf16", False, group=8, head_dim=80)
    _attention(args.arch, "bf16", "bf16", True, group=7, head_dim=128)  # Qwen2-7B: 28 / 4 heads
    _attention(args.arch, "bf16", "bf16", False, group=1, head_dim=128)  # multi-head attention
    for dtype in ("bf16", "fp16", "fp32"):
        _fused(args.arch, dtype)
        _kv_write(args.arch, dtype, dtype)
    _kv_write(args.arch, "bf16", "fp8e4nv")


if __name__ == "__main__":
    main()
