"""Model families assembled from the shared blocks in `blocks.py`."""

from __future__ import annotations

from torch import nn

from parallel.layers import LayerFactory
from pretrain.config import ModelConfig


def build_model(cfg: ModelConfig, layers: LayerFactory | None = None) -> nn.Module:
    if cfg.family == "gpt":
        from pretrain.models.gpt import GPT

        return GPT(cfg, layers)
    raise ValueError(f"model.family={cfg.family!r}: not implemented (available: gpt)")
