"""Data parallelism under the real launchers: a 2-rank run's losses match the 1-rank run with the same
global batch. The loader gives rank r the r-th half of each global batch, so both runs see the same
samples in every step and only the order of floating-point reductions differs."""

from __future__ import annotations

import pytest

from tests.conftest import SMOKE_CONFIG, read_metrics, tiny_overrides

pytestmark = pytest.mark.distributed

# fp32 on CPU: the two runs differ only in how gradients are summed (one process accumulating 4 micro
# batches vs. 2 processes x 2 micro batches + a gloo all-reduce). Over 6 steps that reordering moves the
# loss by ~1e-7 relative (seen: 5e-8); 1e-5 is the project's parity bound (DESIGN.md invariants).
RTOL = 1e-5


@pytest.fixture(scope="module")
def reference(shards_dir, tmp_path_factory, run_pretrain_module):
    out = tmp_path_factory.mktemp("dp1") / "run"
    run_pretrain_module(["train", "--config", str(SMOKE_CONFIG), *tiny_overrides(shards_dir, out)])
    return read_metrics(out)


def assert_close(got: dict, ref: dict) -> None:
    assert sorted(got) == sorted(ref) == list(range(1, 7))
    for step in ref:
        a, b = got[step]["loss"], ref[step]["loss"]
        assert abs(a - b) <= RTOL * abs(b), f"step {step}: loss {a} vs 1-rank {b}"
        assert abs(got[step]["grad_norm"] - ref[step]["grad_norm"]) <= 1e-4 * ref[step]["grad_norm"]


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_deepspeed_launcher_dp2_matches_one_rank(shards_dir, tmp_path, run_pretrain, reference, zero_stage):
    out = tmp_path / "run"
    proc = run_pretrain(
        [
            "train",
            "--config",
            str(SMOKE_CONFIG),
            *tiny_overrides(shards_dir, out, **{"parallel.zero_stage": zero_stage}),
        ],
        launcher="deepspeed",
        nprocs=2,
    )
    assert "--local_rank=1" in proc.stdout + proc.stderr  # the launcher really started two ranks
    assert_close(read_metrics(out), reference)


def test_torchrun_dp2_matches_one_rank(shards_dir, tmp_path, run_pretrain, reference):
    out = tmp_path / "run"
    run_pretrain(
        ["train", "--config", str(SMOKE_CONFIG), *tiny_overrides(shards_dir, out)],
        launcher="torchrun",
        nprocs=2,
    )
    assert_close(read_metrics(out), reference)


def test_batch_size_ramp_dp2_matches_one_rank(shards_dir, tmp_path, run_pretrain):
    """train.batch_size_ramp at dp=2: each step's batch (4, 4, 4, 4, 8, 8, 12, 16) splits over the ranks
    into 1..4 micro batches of 2, and the losses are the 1-rank run's."""
    keys = {
        "train.steps": 8,
        "train.micro_batch_size": 2,
        "train.global_batch_size": 16,
        "train.batch_size_ramp": "{start: 4, increment: 4, samples: 40}",
        "data.seq_len": 32,
    }
    runs = {}
    for nprocs in (1, 2):
        out = tmp_path / f"dp{nprocs}"
        run_pretrain(
            ["train", "--config", str(SMOKE_CONFIG), *tiny_overrides(shards_dir, out, **keys)],
            launcher="torchrun" if nprocs > 1 else "python",
            nprocs=nprocs,
        )
        runs[nprocs] = read_metrics(out)
    one, two = runs[1], runs[2]
    assert [two[s]["global_batch_size"] for s in range(1, 9)] == [4, 4, 4, 4, 8, 8, 12, 16]
    for step in one:
        assert two[step]["consumed_samples"] == one[step]["consumed_samples"]
        a, b = two[step]["loss"], one[step]["loss"]
        assert abs(a - b) <= RTOL * abs(b), f"step {step}: loss {a} vs 1-rank {b}"
