"""Vocabulary padding under tensor parallelism: a 511-piece tokenizer (odd, so tp=2 cannot split it) with
model.make_vocab_size_divisible_by=2 gives a 512-row model; TP2 trains it to the one-process run's losses
and gradient norms, and without the setting the TP2 run is refused before any process group exists.

Under TP2 the vocab-parallel embedding and loss give rank 1 rows 256..511, so the padding row 511 is one
of its rows: it enters the softmax normalizer of the vocab-parallel cross-entropy and gets a gradient,
exactly as in the one-process model with the same padding."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import pretrain.train
from pretrain.config import ConfigError, load_config
from pretrain.train import train
from tests.conftest import SMOKE_CONFIG, read_metrics, tiny_overrides

pytestmark = pytest.mark.distributed

STEPS = 5
ODD_VOCAB = 511

# fp32 on CPU. The TP2 run differs from the one-process run in the order of floating-point sums only (the
# row-parallel all-reduces and the vocab-parallel softmax's max / sum over two shards). 1e-5 relative is
# the project's parity bound (DESIGN.md). Seen: 8.5e-8 (loss) and 5.5e-8 (grad norm) at most over 5 steps.
RTOL = 1e-5


@pytest.fixture(scope="module")
def odd_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test corpus of tests/conftest.py (400 sample documents) tokenized with a 511-piece tokenizer."""
    from data_pipeline.sample_corpus import write_sample_corpus
    from data_pipeline.sharding import shard_corpus
    from data_pipeline.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("odd_vocab")
    corpus = write_sample_corpus(root / "corpus", docs=400, seed=0, docs_per_file=200)
    model = train_tokenizer(corpus, vocab_size=ODD_VOCAB, out_prefix=root / "tok" / "sp")
    manifest = shard_corpus(
        corpus, tokenizer_path=model, out_dir=root / "shards", workers=1, val_fraction=0.1, shard_size_mb=0.02
    )
    assert manifest["tokenizer"]["vocab_size"] == ODD_VOCAB
    return root / "shards"


def _keys(**extra: object) -> dict[str, object]:
    return {"train.steps": STEPS, "checkpoint.save_final": "false", **extra}


def test_tp2_without_padding_is_refused_before_any_process_group(odd_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")

    def no_process_group(**_: object) -> None:
        raise AssertionError("train() reached process-group creation before refusing the vocabulary")

    monkeypatch.setattr(pretrain.train, "init_distributed", no_process_group)
    cfg = load_config(
        SMOKE_CONFIG, tiny_overrides(odd_shards, tmp_path / "run", **_keys(**{"parallel.tp": 2}))
    )
    with pytest.raises(ConfigError) as exc:
        train(cfg)
    message = str(exc.value)
    assert "model.vocab_size=511 is not divisible by parallel.tp=2" in message
    assert "model.make_vocab_size_divisible_by=2 and model.vocab_size=0" in message
    assert "the tokenizer's 511 pieces become 512 rows" in message


def test_tp2_with_padding_matches_one_process(odd_shards, tmp_path, run_pretrain):
    keys = _keys(**{"model.make_vocab_size_divisible_by": 2})
    runs = {}
    for tp in (1, 2):
        out = tmp_path / f"tp{tp}"
        run_pretrain(
            [
                "train",
                "--config",
                str(SMOKE_CONFIG),
                *tiny_overrides(odd_shards, out, **keys, **{"parallel.tp": tp}),
            ],
            launcher="deepspeed" if tp > 1 else "python",
            nprocs=tp,
        )
        model = yaml.safe_load((out / "config.yaml").read_text())["model"]
        assert (model["vocab_size"], model["tokenizer_vocab_size"]) == (512, ODD_VOCAB)  # same model
        runs[tp] = read_metrics(out)
    one, two = runs[1], runs[2]
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        for key in ("loss", "grad_norm"):
            a, b = two[step][key], one[step][key]
            assert abs(a - b) <= RTOL * abs(b), f"step {step}: {key} {a} at TP2 vs {b} in one process"
