"""The GPT-3 batch-size ramp: Megatron's rule against a table worked out by hand and against megatron-core's
own calculator, the step layout built from it, the loader's samples under a ramp, and the config rules."""

from __future__ import annotations

import pytest
import torch

from data_pipeline.batch_ramp import BatchSchedule, BatchSizeRamp
from data_pipeline.loader import TrainLoader
from data_pipeline.manifest import load_manifest
from data_pipeline.objectives import build_objective
from pretrain.config import ConfigError, load_config, validation_problems

SEQ = 32


def test_ramp_matches_a_hand_computed_table():
    # start 4, increment 4, full 16: n = 3 increments over 40 samples, one every 40/3 = 13.33 samples.
    ramp = BatchSizeRamp(start=4, increment=4, samples=40, global_batch_size=16)
    table = {0: 4, 13: 4, 14: 8, 26: 8, 27: 12, 39: 12, 40: 16, 41: 16, 1000: 16}
    assert {c: ramp.batch_size(c) for c in table} == table
    # The steps a run takes: each starts where the previous ended.
    consumed, batches = 0, []
    for _ in range(9):
        batches.append(ramp.batch_size(consumed))
        consumed += batches[-1]
    assert batches == [4, 4, 4, 4, 8, 8, 12, 16, 16]


def test_ramp_agrees_with_megatron_core():
    from megatron.core.num_microbatches_calculator import RampupBatchsizeNumMicroBatchesCalculator

    for start, inc, samples, full in [(4, 4, 40, 16), (32, 32, 1000, 512), (8, 16, 777, 264), (2, 2, 3, 10)]:
        ours = BatchSizeRamp(start, inc, samples, full)
        theirs = RampupBatchsizeNumMicroBatchesCalculator(full, 2, 1, False, 1, start, inc, samples)
        for consumed in range(0, samples + 3 * full):
            theirs.update(consumed, consistency_check=False)
            assert ours.batch_size(consumed) == theirs.current_global_batch_size, (start, consumed)


@pytest.mark.parametrize("ramp", [None, BatchSizeRamp(4, 4, 40, 16), BatchSizeRamp(2, 2, 7, 16)])
def test_schedule_lays_out_the_steps_the_rule_gives(ramp):
    schedule = BatchSchedule(16, ramp)
    consumed = 0
    for step in range(30):
        batch = ramp.batch_size(consumed) if ramp else 16
        assert schedule.step_start(step) == (consumed, batch)
        assert schedule.step_of(consumed) == step
        consumed += batch
    with pytest.raises(ValueError, match="not a whole number of global batches"):
        schedule.step_of(consumed - 2)


# ----------------------------------------------------------------------------- loader


def make_loader(shards, *, dp_rank=0, dp_size=1, workers=0, consumed=0, micro=2, ramp=True):
    return TrainLoader(
        shards,
        build_objective("gpt", seq_len=SEQ, tokenizer={}, seed=0),
        split="train",
        micro_batch_size=micro,
        global_batch_size=16,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=3,
        eos_id=int(load_manifest(shards)["tokenizer"]["eos_id"]),
        num_workers=workers,
        consumed_samples=consumed,
        batch_size_ramp=BatchSizeRamp(4, 4, 40, 16) if ramp else None,
    )


def steps(loader, n):
    """The next n steps, each as the rows of input_ids this rank got (its micro batches concatenated)."""
    out = []
    for _ in range(n):
        gas = loader.gas
        out.append(torch.cat([next(loader)["input_ids"] for _ in range(gas)]))
        assert loader.state_dict()["consumed_samples"] == loader.consumed_samples
    return out


def test_ramp_loader_hands_out_consecutive_samples(shards_dir):
    """At dp=1 the ramped steps are consecutive slices of the sample stream a fixed batch hands out too."""
    loader = make_loader(shards_dir)
    got = steps(loader, 9)
    assert [len(s) for s in got] == [4, 4, 4, 4, 8, 8, 12, 16, 16]
    assert loader.consumed_samples == 76
    fixed = make_loader(shards_dir, ramp=False)
    stream = torch.cat(steps(fixed, 5))  # 80 samples
    assert torch.equal(torch.cat(got), stream[:76])


@pytest.mark.parametrize("workers", [0, 2])
def test_ramp_split_over_ranks_and_restored_mid_ramp(shards_dir, workers):
    one = steps(make_loader(shards_dir), 9)
    r0 = steps(make_loader(shards_dir, dp_rank=0, dp_size=2, workers=workers), 9)
    r1 = steps(make_loader(shards_dir, dp_rank=1, dp_size=2, workers=workers), 9)
    for s in range(9):
        assert torch.equal(one[s], torch.cat([r0[s], r1[s]]))
    # Restored after step 5 (24 samples, inside the ramp's batch-8 stretch): the same steps 6..9.
    for rank, ref in ((0, r0), (1, r1)):
        restored = make_loader(shards_dir, dp_rank=rank, dp_size=2, workers=workers, consumed=24)
        assert restored.batch_size == 8
        assert all(torch.equal(a, b) for a, b in zip(steps(restored, 4), ref[5:]))
    with pytest.raises(ValueError, match="not a whole number of global batches of 16 under the batch-size"):
        make_loader(shards_dir, consumed=20)  # 16 then a step of 8: 20 is inside a step


def test_resume_check_names_a_changed_ramp(shards_dir):
    loader = make_loader(shards_dir)
    steps(loader, 2)
    state = loader.state_dict()
    assert state["batch_size_ramp"] == {"start": 4, "increment": 4, "samples": 40}
    common = dict(fingerprint=state["fingerprint"], sample_len=SEQ + 1, global_batch_size=16, seed=3)
    same = TrainLoader.check_resumable(
        state, **common, shuffle_shards=True, batch_size_ramp=BatchSizeRamp(4, 4, 40, 16)
    )
    assert same == []
    off = TrainLoader.check_resumable(state, **common, shuffle_shards=True)
    assert off == [
        "batch_size_ramp: checkpoint has {'start': 4, 'increment': 4, 'samples': 40}, this run has None"
    ]
    old = {k: v for k, v in state.items() if k != "batch_size_ramp"}  # saved before ramps existed
    assert TrainLoader.check_resumable(old, **common, shuffle_shards=True) == []


# ----------------------------------------------------------------------------- config

BASE = ["data.shards=/tmp/shards", "train.micro_batch_size=4", "train.global_batch_size=32"]


def problems(ramp: str, *extra: str, world_size: int | None = None) -> list[str]:
    cfg = load_config(None, [*BASE, f"train.batch_size_ramp={ramp}", *extra], validate=False)
    return validation_problems(cfg, world_size=world_size)


def test_a_valid_ramp_loads_and_off_is_the_default():
    cfg = load_config(None, [*BASE, "train.batch_size_ramp={start: 8, increment: 8, samples: 1000}"])
    assert cfg.train.batch_size_ramp == {"start": 8, "increment": 8, "samples": 1000}
    assert load_config(None, BASE).train.batch_size_ramp is None
    assert problems("null") == problems("{}") == []


@pytest.mark.parametrize(
    "ramp, extra, world, expected",
    [
        ("{start: 8, increment: 8}", [], None, "exactly the keys start, increment and samples"),
        (
            "{start: 8, increment: 8, samples: 0}",
            [],
            None,
            "train.batch_size_ramp.samples=0: must be an integer > 0",
        ),
        ("{start: 8, increment: 8, samples: 1.5}", [], None, "train.batch_size_ramp.samples=1.5"),
        (
            "{start: 32, increment: 8, samples: 100}",
            [],
            None,
            "train.batch_size_ramp.start=32: must be < train.global_batch_size=32",
        ),
        (
            "{start: 8, increment: 16, samples: 100}",
            [],
            None,
            "train.batch_size_ramp.increment=16: must divide train.global_batch_size - start = 32 - 8 = 24",
        ),
        (
            "{start: 6, increment: 2, samples: 100}",
            [],
            None,
            "train.batch_size_ramp.start=6: must be a multiple of train.micro_batch_size=4",
        ),
        (
            "{start: 4, increment: 4, samples: 100}",
            [],
            2,
            "train.batch_size_ramp.start=4: must be a multiple of train.micro_batch_size=4 x dp=2",
        ),
        (
            "{start: 8, increment: 8, samples: 100}",
            ["parallel.pp=2", "model.num_layers=2"],
            2,
            "train.batch_size_ramp with parallel.pp=2: not supported; the pipeline engine",
        ),
        ("[8, 8, 100]", [], None, "train.batch_size_ramp=[8, 8, 100]: must be a mapping"),
    ],
)
def test_ramp_problems_name_the_field(ramp, extra, world, expected):
    if ramp.startswith("["):  # a type error is found while loading
        with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("]", r"\]")):
            load_config(None, [*BASE, f"train.batch_size_ramp={ramp}"])
        return
    found = problems(ramp, *extra, world_size=world)
    assert any(expected in p for p in found), found
