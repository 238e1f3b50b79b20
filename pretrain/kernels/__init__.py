"""Attention and other hot-path kernels; models import `attention` from here.

The Triton modules are imported lazily (attribute access) because Triton decides at kernel-definition
time whether to compile for a GPU or to interpret on the CPU (TRITON_INTERPRET=1): importing
`pretrain.kernels` must not fix that choice before a test or script has set the variable.
(`flash_attention` and `cross_entropy` are also submodule names, which an import would bind over a
function of the same name here: the fused attention is reached through `attention(..., backend=...)`,
the logits cross-entropy as `fused_cross_entropy`.)
"""

from __future__ import annotations

from typing import Any

from pretrain.kernels.attention import attention, get_default_backend, set_default_backend
from pretrain.kernels.norm_layers import (
    FusedLayerNorm,
    FusedRMSNorm,
    get_default_norm_backend,
    set_default_norm_backend,
)
from pretrain.kernels.t5_bias import T5Bias

_LAZY = {
    "varlen_attention": "pretrain.kernels.flash_attention",
    "rms_norm": "pretrain.kernels.norms",
    "layer_norm": "pretrain.kernels.norms",
    "fused_cross_entropy": "pretrain.kernels.cross_entropy",
    "linear_cross_entropy": "pretrain.kernels.cross_entropy",
}

__all__ = [
    "FusedLayerNorm",
    "FusedRMSNorm",
    "T5Bias",
    "attention",
    "get_default_backend",
    "get_default_norm_backend",
    "set_default_backend",
    "set_default_norm_backend",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pretrain.kernels' has no attribute {name!r}")
