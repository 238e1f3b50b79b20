"""Model families assembled from the shared blocks in `blocks.py`."""

from __future__ import annotations

from torch import nn

from parallel.layers import LayerFactory
from pretrain.config import ModelConfig


def build_model(cfg: ModelConfig, layers: LayerFactory | None = None) -> nn.Module:
    if cfg.family == "gpt":
        from pretrain.models.gpt import GPT

        return GPT(cfg, layers)
    if cfg.family == "bert":
        from pretrain.models.bert import BERT

        return BERT(cfg, layers)
    if cfg.family == "t5":
        from pretrain.models.t5 import T5

        return T5(cfg, layers)
    raise ValueError(f"model.family={cfg.family!r}: not implemented (available: gpt, bert, t5)")
