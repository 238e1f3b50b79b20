"""Resuming at a different data-parallel layout: a run saved at DP2 (ZeRO-1, optimizer states
partitioned) continues at DP1 through DeepSpeed's universal checkpoint, converted automatically and
cached beside the original; DP1 -> DP2 likewise; unpartitioned (ZeRO-0) states load directly.

The loader position is the global sample count, so no sample is skipped or repeated: the losses after the
switch equal the uninterrupted run's within 1e-5 (fp32; only the gradient reduction order differs, as in
tests/distributed/test_data_parallel.py)."""

from __future__ import annotations

import pytest

from tests.conftest import SMOKE_CONFIG, read_metrics, tiny_overrides

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
RTOL = 1e-5


def args(shards, out, steps, zero):
    keys = {
        "train.steps": steps,
        "optimizer.decay_steps": 6,
        "checkpoint.interval": 3,
        "train.micro_batch_size": 4,
        "parallel.zero_stage": zero,
    }
    return ["train", "--config", str(SMOKE_CONFIG), *tiny_overrides(shards, out, **keys)]


@pytest.mark.parametrize(("first", "second", "zero"), [(2, 1, 1), (1, 2, 1), (2, 1, 0)])
def test_resume_at_another_dp_size(first, second, zero, shards_dir, tmp_path, run_pretrain):
    full = tmp_path / "full"
    run_pretrain(
        args(shards_dir, full, 6, zero), launcher="deepspeed" if first > 1 else "python", nprocs=first
    )
    run = tmp_path / "run"
    run_pretrain(
        args(shards_dir, run, 3, zero), launcher="deepspeed" if first > 1 else "python", nprocs=first
    )
    proc = run_pretrain(
        args(shards_dir, run, 6, zero), launcher="deepspeed" if second > 1 else "python", nprocs=second
    )
    assert "at a new layout" in proc.stdout
    if zero:
        assert (run / "checkpoints" / "step-3.universal" / "TANDEM_COMPLETE").is_file()
    ref, got = read_metrics(full), read_metrics(run)
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        assert got[step]["consumed_samples"] == ref[step]["consumed_samples"]  # no sample skipped or repeated
        a, b = got[step]["loss"], ref[step]["loss"]
        assert abs(a - b) <= RTOL * abs(b), f"step {step}: {a} vs {b}"
