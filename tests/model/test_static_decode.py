"""The graph runner's padded static decode path (runner/cuda_graph.py) on the CPU.

On CUDA the same forward is captured and replayed; here it runs eagerly, so its
logic (filling the static buffers, the padding convention, the bucket's static
metadata) is checked against the plain eager step: the same greedy tokens, the
same KV slots written (padding rows write nothing) and the same logits. Bit for
bit where every kernel is batch-invariant (the quantized native decoder stack,
the CPU engine's default); dense float32 GEMMs (MKL) and the reference's
attention over a longer padded key range round differently with the number of
rows, so there the logits agree to float32 rounding.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import gguf
import pytest
import torch

from tests.helpers.tiny_models import write_gguf
from tokenloom import kernels
from tokenloom.model.layers.backend import CpuNativeOps, TorchOps, TritonOps
from tokenloom.model.loader import load_model
from tokenloom.runner.cuda_graph import PAD_SLOT
from tokenloom.runner.graph_buckets import capture_sizes
from tokenloom.runner.model_runner import ModelRunner
from tokenloom.sampling_params import SamplingParams
from tokenloom.sched.output import ScheduledRequest, SchedulerOutput

BLOCK_SIZE = 16
MAX_LEN = 64
BLOCKS_PER_SEQ = MAX_LEN // BLOCK_SIZE
MAX_NUM_SEQS = 16
SIZES = capture_sizes(MAX_NUM_SEQS, MAX_NUM_SEQS)  # 1 2 4 8 16
NUM_BLOCKS = 2 + MAX_NUM_SEQS * BLOCKS_PER_SEQ  # block 0 and the last block: nobody's
GREEDY = SamplingParams(temperature=0.0)
NEEDS_KERNELS = pytest.mark.skipif(not kernels.available(), reason="native kernels unavailable here")


@dataclass
class Seq:
    request_id: str
    prompt: tuple[int, ...]
    blocks: tuple[int, ...]
    output: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    def scheduled(self, num_new: int) -> ScheduledRequest:
        tokens = (*self.prompt, *self.output)
        computed = self.num_tokens - num_new
        used = self.blocks[:-(-self.num_tokens // BLOCK_SIZE)]
        return ScheduledRequest(self.request_id, tokens[computed:], computed, num_new, used, True, GREEDY,
                                self.prompt, tuple(self.output), seed=0)


def _sequences(n: int) -> list[Seq]:
    """Prompts of different lengths, some ending on a block boundary; blocks from 1 on."""
    return [Seq(f"s{i}", tuple((11 * i + 7 * j) % 500 + 3 for j in range(5 + 3 * i)),
                tuple(range(1 + i * BLOCKS_PER_SEQ, 1 + (i + 1) * BLOCKS_PER_SEQ))) for i in range(n)]


def _step(seqs: list[Seq], prefill: bool = False) -> SchedulerOutput:
    scheduled = tuple(s.scheduled(s.num_tokens if prefill else 1) for s in seqs)
    return SchedulerOutput(scheduled, sum(sr.num_new_tokens for sr in scheduled))


def _model(tiny, tmp_path, backend: str):
    if backend == "native-stack":  # quantized: the native decoder stack runs every layer in one call
        path = write_gguf(tiny("llama3").hf, tmp_path / "q8.gguf", tensor_type=gguf.GGMLQuantizationType.Q8_0)
        model, arch = load_model(path, torch.float32, "cpu", quantization="auto")
        assert model.model.decode_stack is not None
        return model, arch, torch.int8
    model, arch = load_model(tiny("qwen2").hf_dir, torch.float32, "cpu", quantization="none")
    model.use_ops({"torch": TorchOps, "native": CpuNativeOps, "triton": TritonOps}[backend]())
    return model, arch, torch.float32


def _runner(model, arch, cache_dtype, sizes: tuple[int, ...] = ()) -> ModelRunner:
    runner = ModelRunner(model, arch, NUM_BLOCKS, BLOCK_SIZE, cache_dtype, torch.device("cpu"), MAX_NUM_SEQS,
                         MAX_LEN, cudagraph_sizes=sizes)
    for k, v in runner.kv_caches:  # a known value where nobody wrote (the cache is not initialised)
        k.fill_(64)
        v.fill_(64)
    return runner


class _Counting:
    """Counts the padded forwards of a graph runner (by bucket)."""

    def __init__(self, runner: ModelRunner) -> None:
        self.buckets: list[int] = []
        forward = runner.graphs._forward

        def counted(b: int):
            self.buckets.append(b)
            return forward(b)

        runner.graphs._forward = counted


def _assert_padding(runner: ModelRunner, n: int, bucket: int) -> None:
    """Rows n..bucket-1 of the static buffers hold padding (nothing of an earlier step)."""
    static = runner.graphs._static
    assert static.slot_mapping[n:bucket].eq(PAD_SLOT).all() and static.seq_lens[n:bucket].eq(0).all()
    assert static.input_ids[n:bucket].eq(0).all() and static.positions[n:bucket].eq(0).all()
    assert static.block_tables[n:bucket].eq(0).all()
    assert static.query_start_loc.tolist() == list(range(len(static.query_start_loc)))


def _assert_same(ours: torch.Tensor, ref: torch.Tensor, exact: bool) -> None:
    if exact:
        assert torch.equal(ours, ref)
    else:
        torch.testing.assert_close(ours.float(), ref.float(), atol=1e-5, rtol=1e-5)


def _assert_same_caches(padded: ModelRunner, eager: ModelRunner, exact: bool) -> None:
    """The same slots written (the others still hold the fill value), with the same values."""
    for (k, v), (k_ref, v_ref) in zip(padded.kv_caches, eager.kv_caches, strict=True):
        assert torch.equal(k == 64, k_ref == 64) and torch.equal(v == 64, v_ref == 64)
        _assert_same(k, k_ref, exact)
        _assert_same(v, v_ref, exact)
    k = padded.kv_caches[0][0]
    assert (k[0] == 64).all() and (k[-1] == 64).all()  # pad rows' block 0, and slot -1 did not wrap around


@torch.inference_mode()
def _decode_both(eager: ModelRunner, padded: ModelRunner, seqs: list[Seq], exact: bool) -> torch.Tensor:
    """One decode step of ``seqs`` through both runners; checks they agree, appends the tokens."""
    out = _step(seqs)
    _, hidden, logits = eager.forward(out)
    _, padded_hidden, padded_logits = padded.forward(out)
    assert padded_logits.shape == logits.shape == (len(seqs), eager.arch.vocab_size)
    assert padded_logits.argmax(-1).tolist() == logits.argmax(-1).tolist()
    _assert_same(padded_logits, logits, exact)
    _assert_same(padded_hidden, hidden, exact)
    _assert_same_caches(padded, eager, exact)
    for seq, token in zip(seqs, logits.argmax(-1).tolist()):
        seq.output.append(token)
    return logits


def _prefilled(tiny, tmp_path, backend: str, n: int):
    model, arch, cache_dtype = _model(tiny, tmp_path, backend)
    eager, padded = _runner(model, arch, cache_dtype), _runner(model, arch, cache_dtype, SIZES)
    assert eager.graphs is None and padded.graphs is not None
    seqs = _sequences(n)
    with torch.inference_mode():
        _, _, logits = eager.forward(_step(seqs, prefill=True))
        padded.forward(_step(seqs, prefill=True))  # a prompt step: eager in both
    for seq, token in zip(seqs, logits.argmax(-1).tolist()):
        seq.output.append(token)
    return eager, padded, seqs


@pytest.mark.parametrize("backend, exact", [("torch", False), pytest.param("native", False, marks=NEEDS_KERNELS),
                                            pytest.param("native-stack", True, marks=NEEDS_KERNELS)])
@pytest.mark.parametrize("n, bucket", [(1, 1), (3, 4), (5, 8), (9, 16)])
def test_padded_decode_equals_the_eager_step(tiny, tmp_path, backend, exact, n, bucket):
    eager, padded, seqs = _prefilled(tiny, tmp_path, backend, n)
    counting = _Counting(padded)
    for _ in range(3):
        _decode_both(eager, padded, seqs, exact)
    assert counting.buckets == [bucket] * 3
    _assert_padding(padded, n, bucket)


@pytest.mark.parametrize("backend, exact", [("torch", False), pytest.param("native-stack", True, marks=NEEDS_KERNELS)])
def test_refilled_buffers_leak_no_stale_rows(tiny, tmp_path, backend, exact):
    """Steps of 9, 3, 5 and 9 sequences through the same buffers: rows 3..8, real in the first
    step, are padding in the second, and each step gives its own eager result."""
    eager, padded, seqs = _prefilled(tiny, tmp_path, backend, 9)
    counting = _Counting(padded)
    for subset in (seqs, seqs[:3], seqs[4:9], seqs):
        _decode_both(eager, padded, subset, exact)
        _assert_padding(padded, len(subset), counting.buckets[-1])
    assert counting.buckets == [16, 4, 8, 16]


def test_steps_that_are_not_plain_decodes_run_eagerly(tiny, tmp_path):
    """Verify steps of several rows per sequence, steps with prompt logprobs and batches
    above the largest bucket take the eager path."""
    eager, padded, seqs = _prefilled(tiny, tmp_path, "torch", 3)
    counting = _Counting(padded)
    with torch.inference_mode():
        two_rows = SchedulerOutput(tuple(s.scheduled(1) for s in seqs[:2]) + (seqs[2].scheduled(2),), 4)
        for runner in (eager, padded):
            runner.forward(two_rows)
    assert counting.buckets == []
    with_prompt_logprobs = dataclasses.replace(seqs[0].scheduled(1), prompt_logprobs_start=0)
    with torch.inference_mode():
        padded.forward(SchedulerOutput((with_prompt_logprobs, seqs[1].scheduled(1)), 2))
    assert counting.buckets == []  # its hidden states are read after the step: not a graph's buffers
    small = _runner(eager.model, eager.arch, torch.float32, (1, 2))
    with torch.inference_mode():
        small.forward(_step(seqs, prefill=True))
        counting = _Counting(small)
        _, _, logits = small.forward(_step(seqs))  # 3 sequences: above the largest bucket
    assert counting.buckets == [] and logits.shape[0] == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs under Triton's interpreter, set only without CUDA")
def test_padded_decode_equals_the_eager_step_on_the_triton_backend(tiny, tmp_path):
    eager, padded, seqs = _prefilled(tiny, tmp_path, "triton", 3)
    _decode_both(eager, padded, seqs, exact=False)
