"""A non-finite loss or a 100x loss spike on ONE rank makes every rank skip that step: with ZeRO-1 each
rank updates its own slice of the parameters, so a rank that stepped alone would leave a checkpoint that
differs from the previous one. Skipped steps leave weights and optimizer states bitwise untouched."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import SMOKE_CONFIG, tiny_overrides

pytestmark = pytest.mark.distributed


def model_and_optimizer(ckpt):
    module = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    from pretrain.checkpoint import _allowed_deepspeed_globals

    with torch.serialization.safe_globals(_allowed_deepspeed_globals()):
        optim = [torch.load(p, weights_only=True) for p in sorted(ckpt.glob("*optim_states.pt"))]
    flat = [t for o in optim for t in o["optimizer_state_dict"]["single_partition_of_fp32_groups"]]
    return module, flat


@pytest.mark.parametrize("fault", ["nan", "spike"])
def test_one_rank_fault_skips_the_step_everywhere(fault, shards_dir, tmp_path, run_pretrain):
    out = tmp_path / "run"
    keys = {
        "train.steps": 14,
        "checkpoint.interval": 1,
        "checkpoint.keep_last": 0,
        "parallel.zero_stage": 1,
        "train.loss_spike_factor": 3.0,
        "optimizer.warmup_steps": 0,
    }
    run_pretrain(
        ["train", "--config", str(SMOKE_CONFIG), *tiny_overrides(shards_dir, out, **keys)],
        launcher="deepspeed",
        nprocs=2,
        env={"TANDEM_FAULT_INJECT": f"{fault}:12:1"},
    )
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in records if "skipped" in r]
    assert [r["step"] for r in skipped] == [12], skipped
    assert ("non-finite" in skipped[0]["skipped"]) == (fault == "nan")
    before, at = (model_and_optimizer(out / "checkpoints" / f"step-{s}") for s in (11, 12))
    assert all(torch.equal(before[0][k], at[0][k]) for k in before[0])  # weights untouched
    assert all(torch.equal(a, b) for a, b in zip(before[1], at[1], strict=True))  # fp32 masters untouched
    after = model_and_optimizer(out / "checkpoints" / "step-13")
    assert not all(torch.equal(before[0][k], after[0][k]) for k in before[0])  # training went on
