"""Tensor-parallel layouts that cannot work are refused by `pretrain train` before any process starts,
with every problem named at once.

The training parity of tensor parallelism (TP2 with and without sequence parallelism, TP2 x DP2, TP2 x PP2,
TP2 x PP2 x DP2) for GPT, BERT and T5 is in the parity matrix, tests/distributed/test_parity_matrix.py."""

from __future__ import annotations

import pytest

from tests.conftest import SMOKE_CONFIG, tiny_overrides

pytestmark = pytest.mark.distributed


def args(shards, out, **extra):
    return ["train", "--config", str(SMOKE_CONFIG), *tiny_overrides(shards, out, **extra)]


def test_invalid_tensor_parallel_layouts_are_refused_before_launch(run_pretrain, shards_dir, tmp_path):
    proc = run_pretrain(
        args(
            shards_dir,
            tmp_path / "run",
            **{
                "parallel.tp": 3,
                "parallel.pp": 2,
                "parallel.zero_stage": 3,
                "parallel.sequence_parallel": "true",
            },
        ),
        check=False,
    )
    assert proc.returncode == 2
    for needle in (
        "model.num_heads=4 is not divisible by parallel.tp=3",
        "parallel.pp=2",
        "parallel.zero_stage=3 with parallel.tp=3",
        "data.seq_len=64: must be divisible by parallel.tp=3",
    ):
        assert needle in proc.stderr, needle
