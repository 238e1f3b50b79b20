"""Training with the GPT-3 batch-size ramp (train.batch_size_ramp), one process, gpt-tiny.

Ramp start 4, increment 4, 40 samples, full batch 16 with micro batches of 4: steps of 4, 4, 4, 4, 8, 8, 12
and 16 samples (1, 1, 1, 1, 2, 2, 3, 4 micro batches), 60 samples in all."""

from __future__ import annotations

import math

from tests.conftest import train_in_process

RAMP = "{start: 4, increment: 4, samples: 40}"
BATCHES = [4, 4, 4, 4, 8, 8, 12, 16]
STEPS = len(BATCHES)


def keys(**extra: object) -> dict[str, object]:
    return {
        "data.seq_len": 32,
        "train.steps": STEPS,
        "train.micro_batch_size": 4,
        "train.global_batch_size": 16,
        "train.batch_size_ramp": RAMP,
        "optimizer.decay_steps": STEPS,  # the schedule of the full run, also for a run cut short
        "checkpoint.save_final": "false",
        **extra,
    }


def test_ramp_run_grows_the_batch_and_starts_like_a_fixed_batch(shards_dir, tmp_path):
    result, metrics = train_in_process(shards_dir, tmp_path / "ramp", **keys())
    assert result.steps == STEPS
    assert [metrics[s]["global_batch_size"] for s in range(1, STEPS + 1)] == BATCHES
    consumed = [sum(BATCHES[:s]) for s in range(1, STEPS + 1)]
    assert [metrics[s]["consumed_samples"] for s in range(1, STEPS + 1)] == consumed
    assert all(math.isfinite(metrics[s]["loss"]) for s in metrics)

    # The first four steps (batch 4, one micro batch) are those of a fixed batch of 4 with the same seed and
    # schedule: same samples, same loss, and a gradient DeepSpeed scaled by 1/1, not by the full batch's 1/4.
    _, fixed = train_in_process(
        shards_dir,
        tmp_path / "fixed",
        **keys(**{"train.global_batch_size": 4, "train.batch_size_ramp": "null"}),
    )
    for s in range(1, 5):
        assert fixed[s]["global_batch_size"] == 4
        assert abs(metrics[s]["loss"] - fixed[s]["loss"]) <= 1e-6, s
        assert abs(metrics[s]["grad_norm"] - fixed[s]["grad_norm"]) <= 1e-6 * fixed[s]["grad_norm"], s
    assert abs(metrics[5]["loss"] - fixed[5]["loss"]) > 1e-6  # step 5 takes 8 samples, the fixed run 4


def test_ramp_run_stopped_mid_ramp_resumes_exactly(shards_dir, tmp_path):
    """Stopped after step 5 (inside the batch-8 stretch), resumed to the end: the uninterrupted run's
    losses bit for bit. The resumed run starts DeepSpeed's micro-step counter afresh, so a gradient-
    accumulation boundary taken from that counter would fall elsewhere than in the uninterrupted run."""
    _, full = train_in_process(shards_dir, tmp_path / "full", **keys(**{"model.dropout": 0.1}))

    cut = tmp_path / "cut"
    first, _ = train_in_process(
        shards_dir, cut, **keys(**{"model.dropout": 0.1, "train.steps": 5, "checkpoint.save_final": "true"})
    )
    assert first.checkpoint is not None and first.checkpoint.name == "step-5"
    resumed, metrics = train_in_process(shards_dir, cut, **keys(**{"model.dropout": 0.1}))
    assert resumed.steps == STEPS
    for s in range(1, STEPS + 1):
        assert metrics[s]["global_batch_size"] == full[s]["global_batch_size"]
        assert metrics[s]["consumed_samples"] == full[s]["consumed_samples"]
        assert metrics[s]["loss"] == full[s]["loss"], (s, metrics[s]["loss"], full[s]["loss"])
