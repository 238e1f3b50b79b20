"""The loader: packing, determinism, the split over ranks and workers, and save/restore.

Batches are integer token ids, so every comparison here is exact (torch.equal)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline.loader import PackedSamples, SplitStream, TrainLoader
from data_pipeline.manifest import iter_shard_documents, load_manifest
from data_pipeline.objectives import build_objective

SEQ = 32


def objective():
    return build_objective("gpt", seq_len=SEQ, tokenizer={}, seed=0)


def eos_id(shards) -> int:
    return int(load_manifest(shards)["tokenizer"]["eos_id"])


def make_loader(shards, *, dp_rank=0, dp_size=1, workers=0, consumed=0, micro=2, global_batch=8, seed=3):
    return TrainLoader(
        shards,
        objective(),
        split="train",
        micro_batch_size=micro,
        global_batch_size=global_batch,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=seed,
        shuffle_shards=True,
        eos_id=eos_id(shards),
        num_workers=workers,
        consumed_samples=consumed,
    )


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same(a, b) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


def test_packing_reproduces_the_document_stream(shards_dir):
    """Unshuffled, the samples laid end to end are the shards' documents each followed by <eos>."""
    eos = eos_id(shards_dir)
    manifest = load_manifest(shards_dir)
    expected = []
    for shard in manifest["shards"]:
        if shard["split"] == "train":
            for _, tokens in iter_shard_documents(shards_dir / shard["name"]):
                expected.extend([*tokens.tolist(), eos])
    stream = SplitStream.from_manifest(shards_dir, "train")
    assert stream.total == len(expected)  # the manifest's counts agree with the shards
    samples = PackedSamples(stream, sample_len=SEQ + 1, eos_id=eos, seed=0, shuffle=False)
    n = samples.samples_per_epoch
    assert n == len(expected) // (SEQ + 1)
    got = np.concatenate([samples[i] for i in range(n)])
    assert got.tolist() == expected[: n * (SEQ + 1)]
    # Epoch 1 without shuffling starts the stream again.
    assert np.array_equal(samples[n], samples[0])
    # Random access (seeking to a shard through the manifest) agrees with the sequential read.
    fresh = PackedSamples(stream, sample_len=SEQ + 1, eos_id=eos, seed=0, shuffle=False)
    for i in (n - 1, n // 2, 3, n // 3):
        assert np.array_equal(fresh[i], got[i * (SEQ + 1) : (i + 1) * (SEQ + 1)])


def test_shuffled_epochs_visit_every_shard_in_a_new_order(shards_dir):
    stream = SplitStream.from_manifest(shards_dir, "train")
    samples = PackedSamples(stream, sample_len=SEQ + 1, eos_id=eos_id(shards_dir), seed=7, shuffle=True)
    orders = [samples.shard_order(e).tolist() for e in range(3)]
    assert all(sorted(o) == list(range(len(stream.paths))) for o in orders)
    assert orders[0] != orders[1] != orders[2]
    assert samples.shard_order(1).tolist() == orders[1]  # a function of (seed, epoch) only


def test_causal_targets_are_inputs_shifted_by_one(shards_dir):
    batch = next(make_loader(shards_dir))
    assert batch["input_ids"].shape == batch["labels"].shape == (2, SEQ)
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])


def test_same_seed_same_batches_and_different_seed_differs(shards_dir):
    a, b = take(make_loader(shards_dir), 8), take(make_loader(shards_dir), 8)
    assert same(a, b)
    # The first epoch's shard order differs with the seed, so the first batches differ.
    assert not same(a, take(make_loader(shards_dir, seed=4), 8))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("dp_size", [1, 2])
def test_restore_continues_with_the_same_next_8_batches(shards_dir, workers, dp_size):
    for rank in range(dp_size):
        loader = make_loader(shards_dir, dp_rank=rank, dp_size=dp_size, workers=workers)
        take(loader, 3 * loader.gas)  # three optimizer steps
        state = loader.state_dict()
        assert state["consumed_samples"] == 3 * 8
        expected = take(loader, 8)
        restored = make_loader(
            shards_dir, dp_rank=rank, dp_size=dp_size, workers=workers, consumed=state["consumed_samples"]
        )
        assert same(take(restored, 8), expected)


def test_workers_do_not_change_the_batches(shards_dir):
    assert same(take(make_loader(shards_dir, workers=0), 10), take(make_loader(shards_dir, workers=2), 10))


def test_ranks_split_each_global_batch_without_overlap(shards_dir):
    """Rank 0's then rank 1's micro batches of a step are exactly the 1-rank micro batches of that step."""
    one = take(make_loader(shards_dir, dp_size=1), 4 * 4)  # gas 4 at dp 1
    r0 = take(make_loader(shards_dir, dp_rank=0, dp_size=2), 4 * 2)  # gas 2 at dp 2
    r1 = take(make_loader(shards_dir, dp_rank=1, dp_size=2), 4 * 2)
    for step in range(4):
        assert same(one[4 * step : 4 * step + 4], r0[2 * step : 2 * step + 2] + r1[2 * step : 2 * step + 2])


def test_state_mid_step_and_mismatch_are_refused(shards_dir):
    loader = make_loader(shards_dir)
    next(loader)
    with pytest.raises(RuntimeError, match="middle of a global batch"):
        loader.state_dict()
    take(loader, loader.gas - 1)
    state = loader.state_dict()
    problems = TrainLoader.check_resumable(
        state,
        fingerprint=state["fingerprint"],
        sample_len=SEQ + 1,
        global_batch_size=16,
        seed=3,
        shuffle_shards=True,
    )
    assert problems == ["global_batch_size: checkpoint has 8, this run has 16"]
    with pytest.raises(ValueError, match="not a whole number of global batches"):
        make_loader(shards_dir, consumed=4)


def test_missing_split_is_named(shards_dir):
    with pytest.raises(ValueError, match="no shards in split 'test'"):
        SplitStream.from_manifest(shards_dir, "test")
