"""Pipeline checkpoints through `pretrain train` under the deepspeed launcher: a GPT PP2 run resumed from
its own checkpoint continues bit for bit; its checkpoint is sealed by the manifest (layer files included)
and is resharded (ZeRO 0, fp32) or refused at another layout. The run validates at steps 2 and 4 through
the engine's eval_batch under pp.

The training parity of pipeline layouts (PP2, TP2 x PP2, TP2 x PP2 x DP2) for GPT and BERT (T5 once it can
be pipelined) is in the parity matrix, tests/distributed/test_parity_matrix.py."""

from __future__ import annotations

import json

import pytest

from pretrain.checkpoint import Checkpointer, CheckpointError, verify_checkpoint
from tests.conftest import SMOKE_CONFIG, read_metrics, tiny_overrides

pytestmark = pytest.mark.distributed
TIMEOUT = 600


def args(shards, out, **extra):
    # global batch 8 = 2 micro-batches of 4: the pipeline's 1F1B schedule has two micro-batches in flight.
    keys = {
        "train.steps": 4,
        "train.micro_batch_size": 4,
        "checkpoint.interval": 2,
        "train.eval_interval": 2,
        **extra,
    }
    return ["train", "--config", str(SMOKE_CONFIG), *tiny_overrides(shards, out, **keys)]


@pytest.fixture(scope="module")
def pp2_run(shards_dir, tmp_path_factory, run_pretrain_module):
    out = tmp_path_factory.mktemp("pp2") / "run"
    run_pretrain_module(
        args(shards_dir, out, **{"parallel.pp": 2}), launcher="deepspeed", nprocs=2, timeout=TIMEOUT
    )
    return out


def test_pp2_checkpoint_is_sealed_and_bound_to_its_layout(pp2_run):
    step2 = pp2_run / "checkpoints" / "step-2"
    assert verify_checkpoint(step2) == []
    files = json.loads((step2 / "manifest.json").read_text())["files"]
    layers = sorted(name for name in files if name.startswith("layer_"))
    # gpt-tiny: embedding, positions, 2 blocks, final norm (the tied head's copy is not written).
    assert len(layers) == 5, layers
    assert json.loads((step2 / "meta.json").read_text())["layout"]["pp"] == 2
    # Another layout goes through pretrain.reshard, at any precision and ZeRO stage 0-2; ZeRO-3 changes only
    # its dp size (through DeepSpeed's universal checkpoint), never the pipeline.
    for layout in (
        {"tp": 1, "pp": 1, "dp": 2, "zero": 0},
        {"tp": 1, "pp": 2, "dp": 2, "zero": 0},
        {"tp": 1, "pp": 2, "dp": 2, "zero": 1},
        {"tp": 2, "pp": 2, "dp": 1, "zero": 0, "precision": "bf16"},
    ):
        assert Checkpointer.reshard_plan(step2, layout) == "reshard"
    with pytest.raises(CheckpointError, match="ZeRO stage 3 partitions the weights"):
        Checkpointer.reshard_plan(step2, {"tp": 1, "pp": 1, "dp": 2, "zero": 3})
    assert Checkpointer.reshard_plan(step2, {"tp": 1, "pp": 2, "dp": 1, "zero": 0}) == "same"


def test_pp2_resume_continues_exactly(pp2_run, shards_dir, tmp_path, run_pretrain):
    out = tmp_path / "resumed"
    step2 = pp2_run / "checkpoints" / "step-2"
    extra = {"parallel.pp": 2, "train.resume": step2}
    run_pretrain(args(shards_dir, out, **extra), launcher="deepspeed", nprocs=2, timeout=TIMEOUT)
    got, full = read_metrics(out), read_metrics(pp2_run)
    assert sorted(got) == [3, 4]
    for step in got:
        # Same layout, same weights, optimizer state, loader position and RNG: the same floats.
        assert (got[step]["loss"], got[step]["grad_norm"]) == (full[step]["loss"], full[step]["grad_norm"])
