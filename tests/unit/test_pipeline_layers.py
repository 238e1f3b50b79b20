"""The pipeline's layer list is the model: applied in order (as DeepSpeed's PipelineModule does on one
stage) it gives GPT.forward's logits bit for bit (BERT's within one rounding), and it holds every
parameter of the model exactly once.

This is what keeps `parallel/pipeline.py` honest when GPT grows options (rotary, untied head, PaLM's
parallel block, Transformer-XL positions, banded layers): a module the adapters forget fails here, in
one process, before any pipeline run."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from parallel.pipeline import pipeline_inputs, pipeline_layers
from pretrain.config import load_config
from pretrain.models import build_model

PRESETS = [
    "gpt-tiny",
    "llama-tiny",
    "palm-tiny",
    "gopher-tiny",
    "gpt3-tiny",
    "bert-tiny",
    "roberta-tiny",
    "t5-tiny",
    "bart-tiny",
]
# T5 v1.1's untied head and gated-GELU MLP, as overrides of t5-tiny.
UNTIED_T5 = ["model.tie_embeddings=false", "model.activation=geglu"]


def compose(specs: list) -> tuple[list, list]:
    """The layers as one stage holding all of them builds them: tied specs share one module."""
    from deepspeed.pipe import TiedLayerSpec

    tied: dict = {}
    funcs, modules = [], []
    for spec in specs:
        if isinstance(spec, TiedLayerSpec):
            if spec.key not in tied:
                tied[spec.key] = spec.build()
                modules.append(tied[spec.key])
            module = tied[spec.key]
            funcs.append(partial(spec.forward_fn, module) if spec.forward_fn else module)
        else:
            module = spec.build()
            modules.append(module)
            funcs.append(module)
    return funcs, modules


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [(p, []) for p in PRESETS] + [("t5-tiny", UNTIED_T5)],
    ids=[*PRESETS, "t5-untied"],
)
def test_pipeline_layers_reproduce_the_model(preset, overrides):
    cfg = load_config(
        None, [f"model.preset={preset}", "model.vocab_size=512", *overrides], validate=False
    ).model
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    funcs, modules = compose(pipeline_layers(model))

    pipeline_params = [id(p) for m in modules for p in m.parameters()]
    assert len(pipeline_params) == len(set(pipeline_params)), "a parameter is held by two pipeline layers"
    assert set(pipeline_params) == {id(p) for p in model.parameters()}, "a parameter is missing"

    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    batch = {"input_ids": ids, "labels": ids}
    if cfg.family == "bert":
        mask = torch.ones_like(ids)
        mask[1, 12:] = 0  # padding travels with the activations through every block
        types = (torch.arange(16) >= 8).long().expand(2, 16) if cfg.type_vocab_size > 1 else ids * 0
        batch.update(attention_mask=mask, token_type_ids=types)
    if cfg.family in ("t5", "bart"):
        mask = torch.ones_like(ids)
        mask[0, 11:] = 0  # the encoder's padding reaches every cross-attention through the pipeline
        batch = {
            "input_ids": ids,
            "attention_mask": mask,
            "decoder_input_ids": ids[:, :10],
            "labels": ids[:, :10],
        }
    x, labels = pipeline_inputs(cfg.family, batch)
    assert labels is batch["labels"]
    with torch.no_grad():
        for f in funcs:
            x = f(x)
        want = model(**{k: v for k, v in batch.items() if k != "labels"})
    if cfg.family in ("gpt", "t5"):
        # The same modules applied in the same order: identical floating-point operations. (T5's
        # relative-position table reaches the blocks as `table * 1`, which is exact.)
        assert torch.equal(x, want)
    else:
        # BERT's (and BART's) output bias is added after the matmul instead of inside it (addmm): one
        # rounding of |logit| < 10 per element, ~1e-6 at most.
        torch.testing.assert_close(x, want, rtol=0, atol=2e-6)


def test_batches_with_more_than_ids_and_labels_are_refused():
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="attention_mask"):
        pipeline_inputs("gpt", {"input_ids": ids, "labels": ids, "attention_mask": ids})
