"""The norm modules the models build: `FusedRMSNorm` and `FusedLayerNorm`, drop-in subclasses of torch's (same
parameters, same state dict, same `isinstance`), whose forward runs the fused Triton kernels of
`pretrain.kernels.norms` or PyTorch's functional norm.

Which one is a process-wide default, like the attention backend: `set_default_norm_backend("auto" |
"triton" | "torch")`, or the environment variable TANDEM_NORM_BACKEND read at import (a training run's
`train.norm_backend` sets it too). "auto" runs Triton on CUDA tensors and PyTorch otherwise; "triton" on
a CPU tensor needs Triton's interpreter (TRITON_INTERPRET=1, for tests).

This module does not import Triton: the kernels module is imported at the first fused call, so building
a model never fixes Triton's compile-or-interpret choice (see `pretrain/kernels/__init__.py`), and a CPU
run never loads Triton at all.
"""

from __future__ import annotations

import importlib
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.kernels.defaults import ProcessDefault

NormBackend = Literal["auto", "triton", "torch"]
ENV_NORM_BACKEND = "TANDEM_NORM_BACKEND"


_DEFAULT = ProcessDefault(ENV_NORM_BACKEND, get_args(NormBackend))


def set_default_norm_backend(backend: NormBackend) -> NormBackend:
    """Set what the norm modules run from now on; returns the previous default."""
    return _DEFAULT.set(backend)  # type: ignore[return-value]


def get_default_norm_backend() -> NormBackend:
    return _DEFAULT.value  # type: ignore[return-value]


def _fused(x: torch.Tensor) -> bool:
    return _DEFAULT.value == "triton" or (_DEFAULT.value == "auto" and x.device.type == "cuda")


def _kernels():
    # Looked up at each fused call (a dict lookup once imported), so a test that re-imports the kernel
    # module under the interpreter is the one used.
    return importlib.import_module("pretrain.kernels.norms")


class FusedRMSNorm(nn.RMSNorm):
    """nn.RMSNorm over the last dimension, on the default norm backend."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.normalized_shape) != 1 or not _fused(x):
            return super().forward(x)
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return _kernels().rms_norm(x, self.weight, eps, backend=_DEFAULT.value)


class FusedLayerNorm(nn.LayerNorm):
    """nn.LayerNorm over the last dimension, on the default norm backend."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.normalized_shape) != 1 or not _fused(x):
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return _kernels().layer_norm(x, self.weight, self.bias, self.eps, backend=_DEFAULT.value)
