"""Export to Hugging Face `transformers`: the exported directory loads with the matching Auto class and
its logits equal Tandem's. Both sides are randomly initialized from the same config; nothing is
downloaded."""

from __future__ import annotations

import pytest
import torch
import transformers

from pretrain.config import load_config
from pretrain.export import ExportError, export_hf
from pretrain.models import build_model

VOCAB = 300

# fp32 on both sides with the same weights: the only differences are the order of floating-point
# operations inside attention/matmul kernels (SDPA vs. HF's eager/sdpa paths, fused vs. separate qkv),
# ~1e-7 relative on O(1) logits (seen: <= 7e-7). 1e-5 is the bound and still catches any wrong
# mapping (a swapped or transposed weight moves logits by O(0.1)).
TOL = {"rtol": 1e-5, "atol": 1e-5}

CASES = {
    "gpt2-style": ("gpt-tiny", [], "GPT2LMHeadModel", transformers.AutoModelForCausalLM),
    "llama-style": ("llama-tiny", [], "LlamaForCausalLM", transformers.AutoModelForCausalLM),
    "llama-tied": (
        "llama-tiny",
        ["model.tie_embeddings=true", "model.num_kv_heads=4"],
        "LlamaForCausalLM",
        transformers.AutoModelForCausalLM,
    ),
    "bert": ("bert-tiny", [], "BertForMaskedLM", transformers.AutoModelForMaskedLM),
    "t5": ("t5-tiny", [], "T5ForConditionalGeneration", transformers.AutoModelForSeq2SeqLM),
    "t5-v1.1-gated-gelu": (
        "t5-tiny",
        ["model.activation=geglu", "model.tie_embeddings=false"],
        "T5ForConditionalGeneration",
        transformers.AutoModelForSeq2SeqLM,
    ),
}


def tandem_model(preset: str, extra: list[str]):
    cfg = load_config(
        None, ["data.shards=unused", f"model.preset={preset}", f"model.vocab_size={VOCAB}", *extra]
    )
    model = build_model(cfg.model).eval()
    with torch.no_grad():  # move norms and biases off their init values so their mapping is exercised
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, cfg


@pytest.mark.parametrize("case", list(CASES))
def test_exported_model_reproduces_tandem_logits(case, tmp_path):
    preset, extra, cls_name, auto = CASES[case]
    torch.manual_seed(0)
    model, cfg = tandem_model(preset, extra)
    assert export_hf(model, cfg.model, tmp_path) == cls_name
    hf = auto.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == cls_name
    ids = torch.randint(0, VOCAB, (2, 19))
    # Right padding on the second row: padded keys must be ignored identically by both.
    mask = torch.ones(2, 19, dtype=torch.long)
    mask[1, 13:] = 0
    with torch.no_grad():
        if cfg.model.family == "t5":
            dec = torch.randint(0, VOCAB, (2, 7))
            ours = model(ids, decoder_input_ids=dec, attention_mask=mask)
            theirs = hf(input_ids=ids, decoder_input_ids=dec, attention_mask=mask).logits
        else:
            ours = model(ids, attention_mask=mask)
            theirs = hf(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool() if cfg.model.family != "t5" else torch.ones(ours.shape[:2], dtype=torch.bool)
    torch.testing.assert_close(ours[valid], theirs[valid], **TOL)


def test_export_refuses_what_the_target_cannot_express(tmp_path):
    model, cfg = tandem_model("gpt-tiny", ["model.position=rope"])
    with pytest.raises(ExportError, match=r"LlamaForCausalLM: model.norm='layernorm' \(needs 'rmsnorm'\)"):
        export_hf(model, cfg.model, tmp_path)
