"""The decode batch sizes captured as CUDA graphs and the bucket a step pads to."""

from __future__ import annotations

import pytest

from tokenloom.config import ModelConfig
from tokenloom.runner.graph_buckets import bucket_for, capture_sizes

UP_TO_256 = (1, 2, 4, 8, *range(16, 257, 8))


def test_default_cap_is_vllms_512_past_256_every_16():
    sizes = capture_sizes(max_num_seqs=1024)
    assert sizes == (*UP_TO_256, *range(272, 513, 16))
    assert len(sizes) == 4 + 31 + 16 and sizes[-1] == 512


@pytest.mark.parametrize("max_num_seqs, cap, expected", [
    (256, 512, UP_TO_256),  # the default max_num_seqs: 256 is itself a size
    (1, 512, (1,)),
    (2, 512, (1, 2)),
    (3, 512, (1, 2, 3)),  # the cap is always a size
    (8, 512, (1, 2, 4, 8)),
    (20, 512, (1, 2, 4, 8, 16, 20)),
    (256, 20, (1, 2, 4, 8, 16, 20)),  # the smaller of the two caps
    (300, 512, (*UP_TO_256, 272, 288, 300)),
    (512, 300, (*UP_TO_256, 272, 288, 300)),
    (512, 264, (*UP_TO_256, 264)),
    (40, 40, (1, 2, 4, 8, 16, 24, 32, 40)),
])
def test_sizes_for_max_num_seqs_and_cap(max_num_seqs, cap, expected):
    assert capture_sizes(max_num_seqs, cap) == expected


@pytest.mark.parametrize("bad", [(0, 512), (8, 0), (-1, 4)])
def test_sizes_need_positive_limits(bad):
    with pytest.raises(ValueError, match="must be >= 1"):
        capture_sizes(*bad)


@pytest.mark.parametrize("n, bucket", [
    (1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (8, 8), (9, 16), (16, 16), (17, 24), (24, 24), (25, 32),
    (255, 256), (256, 256), (257, 272), (272, 272), (273, 288), (511, 512), (512, 512),
    (513, None), (10_000, None), (0, None),
])
def test_bucket_is_the_smallest_size_that_holds_the_batch(n, bucket):
    assert bucket_for(n, capture_sizes(1024, 512)) == bucket


def test_bucket_with_an_odd_cap():
    sizes = capture_sizes(20, 512)  # 1 2 4 8 16 20
    assert [bucket_for(n, sizes) for n in (15, 16, 17, 20, 21)] == [16, 16, 20, 20, None]


def test_model_config_defaults_and_validation():
    config = ModelConfig()
    assert (config.enforce_eager, config.max_cudagraph_batch_size) == (False, 512)
    with pytest.raises(ValueError, match="max_cudagraph_batch_size must be > 0, got 0"):
        ModelConfig(max_cudagraph_batch_size=0).validate()
