"""Model families assembled from the shared blocks in `blocks.py`.

`build_model` picks the network from `model.family`; an objective that trains more than one network or
adds heads (ELECTRA's generator and discriminator, ALBERT's sentence-order head, a distillation teacher)
registers a builder in `OBJECTIVE_MODELS` keyed by `model.objective`, which wraps or extends the family's
network and defines `pretraining_loss` (see `pretrain/losses.py`)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from parallel.layers import LayerFactory
from pretrain.config import ModelConfig

# objective name -> "module:function" building the model for it (imported lazily).
OBJECTIVE_MODELS: dict[str, str] = {}
OBJECTIVE_MODELS["span_mlm"] = "pretrain.models.spanbert:build_spanbert"  # SpanBERT: BERT + SBO head
OBJECTIVE_MODELS["electra"] = "pretrain.models.electra:build_electra"  # generator + discriminator
OBJECTIVE_MODELS["distill"] = "pretrain.models.distill:build_distilbert"  # student + frozen teacher
OBJECTIVE_MODELS["sop"] = "pretrain.models.albert:build_sop_model"  # ALBERT: BERT + sentence-order head


def build_family_model(cfg: ModelConfig, layers: LayerFactory | None = None) -> nn.Module:
    """The family's own network (no objective-specific heads or wrappers)."""
    if cfg.family == "gpt":
        from pretrain.models.gpt import GPT

        return GPT(cfg, layers)
    if cfg.family == "bert":
        from pretrain.models.bert import BERT

        return BERT(cfg, layers)
    if cfg.family in ("t5", "bart"):
        # BART is the same encoder-decoder with other options (learned positions, post-norm, GELU, biases).
        from pretrain.models.t5 import T5

        return T5(cfg, layers)
    raise ValueError(f"model.family={cfg.family!r}: not implemented (available: gpt, bert, t5, bart)")


def build_model(cfg: ModelConfig, layers: LayerFactory | None = None) -> nn.Module:
    target = OBJECTIVE_MODELS.get(cfg.objective)
    if target is None:
        return build_family_model(cfg, layers)
    import importlib

    module, _, name = target.partition(":")
    builder: Callable[..., nn.Module] = getattr(importlib.import_module(module), name)
    return builder(cfg, layers)
