"""Resuming at a different data-parallel layout: a run saved at DP2 (ZeRO-1, optimizer states
partitioned) continues at DP1 through Tandem's parallel conversion (pretrain/reshard.py; every rank converts
its own slice), cached beside the original; DP1 -> DP2 likewise; unpartitioned (ZeRO-0) states load directly. A TP2 x PP2
checkpoint resumes at TP1 x PP2 x DP2 through Tandem's own conversion (pretrain/reshard.py), and
`pretrain ckpt reshard` writes the same conversion offline.

The loader position is the global sample count, so no sample is skipped or repeated: the losses after the
switch equal the uninterrupted run's within 1e-5 (fp32; only the gradient reduction order differs, as in
tests/distributed/test_parity_matrix.py)."""

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
    """The uninterrupted run saves at step 3 on its way to step 6; a second run resumes from that
    checkpoint at the other dp size and must give steps 4-6 as the uninterrupted run did (the same
    checkpoint an interrupted run would have left: saving changes nothing in the run)."""
    full = tmp_path / "full"
    run_pretrain(
        args(shards_dir, full, 6, zero), launcher="deepspeed" if first > 1 else "python", nprocs=first
    )
    run = tmp_path / "run"
    step3 = full / "checkpoints" / "step-3"
    proc = run_pretrain(
        [*args(shards_dir, run, 6, zero), f"train.resume={step3}"],
        launcher="deepspeed" if second > 1 else "python",
        nprocs=second,
    )
    assert "at a new layout" in proc.stdout
    if zero:  # partitioned optimizer states: converted by every rank for itself (pretrain/reshard.py)
        assert (full / "checkpoints" / f"step-3.reshard-tp1-pp1-dp{second}" / "manifest.json").is_file()
    ref, got = read_metrics(full), read_metrics(run)
    assert sorted(got) == list(range(4, 7))
    for step in range(4, 7):
        assert got[step]["consumed_samples"] == ref[step]["consumed_samples"]  # no sample skipped or repeated
        a, b = got[step]["loss"], ref[step]["loss"]
        assert abs(a - b) <= RTOL * abs(b), f"step {step}: {a} vs {b}"


# ----------------------------------------------------------------------------- tensor/pipeline layout changes
# A TP2 x PP2 run (ZeRO 0, fp32) saves at step 2 and runs on to step 4; the same checkpoint resumed at
# TP1 x PP2 x DP2 (converted once by pretrain.reshard, cached beside it) must give steps 3-4 within 1e-5 of the
# uninterrupted run: the weights and Adam moments are moved, not recomputed, and only the order of a few sums
# differs (row/vocab-parallel reductions vs the DP gradient all-reduce; seen: 4e-8 relative).
TIMEOUT = 300


def tp_pp_args(shards, out, **extra):
    keys = {"train.steps": 4, "checkpoint.interval": 2, "train.micro_batch_size": 4, **extra}
    return ["train", "--config", str(SMOKE_CONFIG), *tiny_overrides(shards, out, **keys)]


def samples_seen(run_dir, shards, schedule):
    """The training samples (input ids) a run's loader yields for `schedule` = [(steps, dp size), ...], over
    every dp rank, from sample 0: the data half of the loader's contract, at the run's own settings."""
    import yaml

    from data_pipeline.loader import TrainLoader
    from data_pipeline.manifest import load_manifest
    from data_pipeline.objectives import build_objective

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    train, data = cfg["train"], cfg["data"]
    tok = load_manifest(shards)["tokenizer"]
    seen, consumed = [], 0
    for steps, dp in schedule:
        for dp_rank in range(dp):
            loader = TrainLoader(
                shards,
                build_objective("gpt", seq_len=data["seq_len"], tokenizer=tok, seed=train["seed"]),
                split=data["train_split"],
                micro_batch_size=train["micro_batch_size"],
                global_batch_size=train["global_batch_size"],
                dp_rank=dp_rank,
                dp_size=dp,
                seed=train["seed"],
                shuffle_shards=data["shuffle_shards"],
                eos_id=int(tok["eos_id"]),
                num_workers=0,
                consumed_samples=consumed,
            )
            micro_per_step = train["global_batch_size"] // (train["micro_batch_size"] * dp)
            for _ in range(steps * micro_per_step):
                seen += [tuple(row.tolist()) for row in next(loader)["input_ids"]]
        consumed += steps * train["global_batch_size"]
    return sorted(seen)


def test_resume_tp2pp2_at_tp1pp2dp2(shards_dir, tmp_path, run_pretrain):
    from pretrain.checkpoint import verify_checkpoint

    full = tmp_path / "full"
    run_pretrain(
        tp_pp_args(shards_dir, full, **{"parallel.tp": 2, "parallel.pp": 2}),
        launcher="deepspeed",
        nprocs=4,
        timeout=TIMEOUT,
    )
    step2 = full / "checkpoints" / "step-2"
    run = tmp_path / "run"
    proc = run_pretrain(
        tp_pp_args(shards_dir, run, **{"parallel.pp": 2, "train.resume": step2}),
        launcher="deepspeed",
        nprocs=4,
        timeout=TIMEOUT,
    )
    assert "(reshard load)" in proc.stdout
    cached = full / "checkpoints" / "step-2.reshard-tp1-pp2-dp2"
    assert verify_checkpoint(cached) == []
    ref, got = read_metrics(full), read_metrics(run)
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        assert got[step]["consumed_samples"] == ref[step]["consumed_samples"]
        a, b = got[step]["loss"], ref[step]["loss"]
        assert abs(a - b) <= RTOL * abs(b), f"step {step}: {a} vs {b}"
    # Samples 0-15 at dp1 then 16-31 split over two dp ranks: the same set as 0-31 at dp1.
    assert samples_seen(run, shards_dir, [(2, 1), (2, 2)]) == samples_seen(full, shards_dir, [(4, 1)])

    # Offline: the same conversion through the CLI is a checkpoint `ckpt verify` accepts.
    out = tmp_path / "offline"
    done = run_pretrain(["ckpt", "reshard", str(step2), "--to", "tp=1,pp=2,dp=2", "--out", str(out)])
    assert "resharded" in done.stdout
    assert f"{out}: OK" in run_pretrain(["ckpt", "verify", str(out)]).stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in cached.iterdir())
