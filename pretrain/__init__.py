"""Tandem: pretrain GPT, BERT and T5 language models.

`from pretrain import load_model; model, config = load_model(CHECKPOINT_DIR)` returns a trained model on
CPU in eval mode.
"""

from __future__ import annotations

from typing import Any


def load_model(checkpoint: Any) -> Any:
    """See `pretrain.export.load_model` (imported lazily: `pretrain` stays cheap to import)."""
    from pretrain.export import load_model as _load

    return _load(checkpoint)


__all__ = ["load_model"]
