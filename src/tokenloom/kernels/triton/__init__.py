"""Triton kernels for CUDA: paged attention, the KV write and the fused layer ops.

Each kernel is a plain function over tensors, with the same contract as its
PyTorch reference (``model/layers``) and its C++ twin (``kernels/csrc``). On a
machine without CUDA they run under Triton's interpreter (``TRITON_INTERPRET=1``,
set before triton is imported), which is how CI tests them; the interpreter keeps
bf16 as raw 16-bit words, so every kernel widens its tiles to float32 right after
loading and narrows them only when storing.
"""
