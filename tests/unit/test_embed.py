"""`pretrain embed`: a BERT/T5 checkpoint's encoder representations of JSONL texts.

The reference is the model's own encoder run directly on each text alone (batch of one, no padding, no
mask), on the ids the test frames itself from the checkpoint's tokenizer. `embed` runs padded, masked
batches: masked keys get exactly zero attention weight, so only the matmul shapes differ, which changes
fp32 summation order: a few ulp of O(1) activations; 1e-5 absolute bounds that with room (seen: ~1e-6).
Pooled vectors are recomputed from the written token vectors (mean in float64 vs the writer's float32
mean: 1e-6 on O(1) values).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import SMOKE_CONFIG, tiny_overrides

ATOL = 1e-5
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Short one.",
    "A somewhat longer sentence, with punctuation; and several clauses that keep going for a while.",
    "x",
    "Numbers 12345 and symbols %$# appear here too.",
]


@pytest.fixture(scope="module")
def checkpoints(shards_dir, tmp_path_factory, run_pretrain_module):
    out = {}
    for preset in ("bert-tiny", "t5-tiny", "gpt-tiny"):
        run = tmp_path_factory.mktemp(preset) / "run"
        keys = {
            "model.preset": preset,
            "train.steps": 1,
            "train.micro_batch_size": 4,
            "optimizer.decay_steps": 6,
        }
        run_pretrain_module(
            ["train", "--config", str(SMOKE_CONFIG), *tiny_overrides(shards_dir, run, **keys)]
        )
        out[preset.split("-")[0]] = run / "checkpoints" / "step-1"
    return out


@pytest.fixture
def texts_file(tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(TEXTS)) + "\n")
    return path


def _reference(checkpoint, family):
    from data_pipeline.tokenizer import Tokenizer
    from pretrain.export import load_model

    model, _ = load_model(checkpoint)
    tok = Tokenizer(checkpoint / "tokenizer.model")
    return model, tok


@pytest.mark.parametrize(("family", "pooling"), [("bert", "mean"), ("bert", "cls"), ("t5", "mean")])
def test_embeddings_equal_the_encoder_on_each_text_alone(family, pooling, checkpoints, texts_file, tmp_path):
    from pretrain.cli_embed import embed

    out = tmp_path / "emb.npz"
    info = embed(checkpoints[family], texts_file, out, batch_size=2, max_length=12, pooling=pooling)
    data = np.load(out)
    model, tok = _reference(checkpoints[family], family)
    offsets = data["offsets"]
    assert len(offsets) == len(TEXTS) + 1 and offsets[-1] == len(data["token_embeddings"])
    assert data["pooled"].shape == (len(TEXTS), model.config.hidden_size)
    truncated = 0
    for i, text in enumerate(TEXTS):
        ids = tok.encode(text)
        if family == "bert":
            framed = [tok.cls_id, *ids[:10], tok.sep_id]
            truncated += len(ids) > 10
        else:
            framed = [*ids[:11], tok.eos_id]
            truncated += len(ids) > 11
        rows = slice(offsets[i], offsets[i + 1])
        assert data["input_ids"][rows].tolist() == framed
        with torch.no_grad():
            want = model.encode(torch.tensor([framed]))[0].numpy()
        got = data["token_embeddings"][rows]
        assert np.abs(got - want).max() <= ATOL, (family, i)
        pooled = got.astype(np.float64).mean(axis=0) if pooling == "mean" else got[0]
        assert np.abs(data["pooled"][i] - pooled).max() <= 1e-6
    assert truncated > 0 and info["truncated"] == truncated  # the long text was cut, framing kept
    sidecar = json.loads((tmp_path / "emb.npz.json").read_text())
    assert sidecar["texts"] == len(TEXTS) and sidecar["pooling"] == pooling and sidecar["family"] == family


def test_bad_inputs_are_refused_naming_file_and_line(checkpoints, tmp_path, capsys):
    from pretrain.cli import main

    def run(lines, *extra, checkpoint=checkpoints["bert"]):
        path = tmp_path / "in.jsonl"
        path.write_text("\n".join(lines) + "\n")
        code = main(
            [
                "embed",
                "--checkpoint",
                str(checkpoint),
                "--input",
                str(path),
                "--out",
                str(tmp_path / "o.npz"),
                *extra,
            ]
        )
        return code, capsys.readouterr().err

    code, err = run(['{"text": "a"}', '{"text": "b"}', "{not json"])
    assert code == 2 and "in.jsonl:3: not valid JSON" in err
    code, err = run(['{"text": "a"}', '{"body": "b"}'])
    assert code == 2 and "in.jsonl:2: no 'text' field (--field); found ['body']" in err
    code, err = run(['{"body": "a"}'], "--field", "body")
    assert code == 0
    code, err = run(['{"text": "a"}'], checkpoint=checkpoints["gpt"])
    assert code == 2 and "model.family='gpt' has no encoder" in err
    code, err = run(['{"text": "a"}'], "--pooling", "cls", checkpoint=checkpoints["t5"])
    assert code == 2 and "--pooling cls needs a BERT checkpoint" in err
