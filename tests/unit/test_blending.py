"""Blending several shard directories by weight (`data.sources`): exact per-block proportions, a
function of the global sample index only (so resuming reproduces the sequence), per-source counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline.loader import BlendedSamples, PackedSamples, SplitStream, TrainLoader
from data_pipeline.manifest import load_manifest
from data_pipeline.objectives import build_objective
from pretrain.config import ConfigError, load_config


def parts(shards, n):
    stream = SplitStream.from_manifest(shards, "train")
    eos = int(load_manifest(shards)["tokenizer"]["eos_id"])
    return [PackedSamples(stream, sample_len=33, eos_id=eos, seed=i, shuffle=True) for i in range(n)]


@pytest.mark.parametrize("weights", [[0.7, 0.3], [0.5, 0.3, 0.2], [1.0, 9.0]])
def test_fractions_over_10k_samples_match_the_weights(shards_dir, weights):
    blend = BlendedSamples(parts(shards_dir, len(weights)), weights, seed=5)
    sources = np.array([blend.locate(j)[0] for j in range(10_000)])
    fractions = np.bincount(sources, minlength=len(weights)) / len(sources)
    want = np.array(weights) / sum(weights)
    assert np.all(np.abs(fractions - want) <= 0.02), (fractions, want)
    # Within a source, samples are taken in order, each once.
    for s in range(len(weights)):
        ks = [blend.locate(j)[1] for j in np.flatnonzero(sources == s)]
        assert ks == list(range(len(ks)))
    assert blend.counts(10_000) == np.bincount(sources, minlength=len(weights)).tolist()
    assert blend.counts(1234) == np.bincount(sources[:1234], minlength=len(weights)).tolist()


def test_blended_loader_resumes_exactly_and_counts_per_source(shards_dir):
    objective = build_objective("gpt", seq_len=32, tokenizer={}, seed=0)
    eos = int(load_manifest(shards_dir)["tokenizer"]["eos_id"])
    sources = [(shards_dir, 0.75), (shards_dir, 0.25)]

    def loader(consumed=0):
        return TrainLoader(
            sources,
            objective,
            split="train",
            micro_batch_size=2,
            global_batch_size=8,
            seed=3,
            eos_id=eos,
            consumed_samples=consumed,
        )

    first = loader()
    for _ in range(3 * first.gas):
        next(first)
    state = first.state_dict()
    expected = [next(first) for _ in range(8)]
    again = loader(state["consumed_samples"])
    got = [next(again) for _ in range(8)]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(expected, got))
    counts = again.source_samples()
    assert counts is not None and sum(counts.values()) == 24 + 16  # 3 steps before, 2 steps of 8 after
    # Another weight set is another data stream: the fingerprint refuses an inexact resume.
    other = TrainLoader(
        [(shards_dir, 0.5), (shards_dir, 0.5)],
        objective,
        split="train",
        micro_batch_size=2,
        global_batch_size=8,
        seed=3,
        eos_id=eos,
    )
    assert other.fingerprint != first.fingerprint


def test_sources_config_is_validated():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["data.sources=[{path: a, weight: 0}, {path: b}, 7]", "data.shards=c"])
    text = str(exc.value)
    assert "data.sources[0].weight=0: must be a number > 0" in text
    assert "data.sources[1]={'path': 'b'}: must be a mapping with exactly the keys path and weight" in text
    assert "data.sources[2]=7" in text and "data.shards and data.sources are both set" in text
    cfg = load_config(None, ["data.sources=[{path: a, weight: 2}, {path: b, weight: 1}]"])
    assert cfg.data.sources == [{"path": "a", "weight": 2}, {"path": "b", "weight": 1}]
