"""From a trained checkpoint to `transformers`: `load_model` returns the trained weights, and
`pretrain export --format hf` writes a directory whose Auto class reproduces load_model's logits;
`--format safetensors` writes the consolidated weights."""

from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import load_file

from pretrain import load_model
from tests.conftest import SMOKE_CONFIG, tiny_overrides

AUTO = {
    "gpt": transformers.AutoModelForCausalLM,
    "bert": transformers.AutoModelForMaskedLM,
    "t5": transformers.AutoModelForSeq2SeqLM,
}
PRESET = {"gpt": "gpt-tiny", "bert": "bert-tiny", "t5": "t5-tiny"}


@pytest.mark.parametrize("family", ["gpt", "bert", "t5"])
def test_trained_checkpoint_exports_to_transformers(family, shards_dir, tmp_path, run_pretrain):
    run = tmp_path / "run"
    run_pretrain(
        [
            "train",
            "--config",
            str(SMOKE_CONFIG),
            *tiny_overrides(shards_dir, run, **{"model.preset": PRESET[family], "train.steps": 3}),
        ]
    )
    ckpt = run / "checkpoints" / "step-3"
    model, cfg = load_model(ckpt)
    assert not model.training and cfg.model.family == family

    out = tmp_path / "hf"
    proc = run_pretrain(["export", "--checkpoint", str(ckpt), "--format", "hf", "--out", str(out)])
    assert "exported" in proc.stdout
    hf = AUTO[family].from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok.encode("Three plus four is seven.", add_special_tokens=False)])
    with torch.no_grad():
        if family == "t5":
            dec = torch.tensor([[0, 7, 12, 9]])
            ours, theirs = model(ids, decoder_input_ids=dec), hf(input_ids=ids, decoder_input_ids=dec).logits
        else:
            ours, theirs = model(ids), hf(input_ids=ids).logits
    # fp32 both sides, same weights: only kernel summation order differs (see tests/unit/test_export.py).
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)

    flat = tmp_path / "flat"
    run_pretrain(["export", "--checkpoint", str(ckpt), "--format", "safetensors", "--out", str(flat)])
    weights = load_file(str(flat / "model.safetensors"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(weights[name], tensor), name
    assert (flat / "config.yaml").is_file()
