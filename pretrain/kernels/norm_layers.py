"""The norm modules the models build: `FusedRMSNorm` and `FusedLayerNorm`, drop-in subclasses of torch's (same
parameters, same state dict, same `isinstance`), whose forward runs the fused Triton kernels of
`pretrain.kernels.norms` or PyTorch's functional norm.

Which one is a process-wide default, like the attention backend: `set_default_norm_backend("auto" |
"triton" | "torch")`, or the environment variable TANDEM_NORM_BACKEND read at import, else "torch" (a
training run's `train.norm_backend` sets it too). "auto" runs Triton on CUDA tensors and PyTorch
otherwise; "triton" on a CPU tensor needs Triton's interpreter (TRITON_INTERPRET=1, for tests). The
default is PyTorch's norms until the kernels are measured faster on a GPU (docs/benchmarks.md).

This module does not import Triton: the kernels module is imported at the first fused call, so building
a model never fixes Triton's compile-or-interpret choice (see `pretrain/kernels/__init__.py`), and a CPU
run never loads Triton at all.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn

from pretrain.kernels.defaults import ProcessDefault

NormBackend = Literal["auto", "triton", "torch"]
ENV_NORM_BACKEND = "TANDEM_NORM_BACKEND"


# Started from TANDEM_NORM_BACKEND, else "torch": the Triton norms time unsteadily against PyTorch's on
# an H200 (0.63-1.30x, docs/benchmarks.md), so they are opted into until measured faster.
NORM_BACKEND_DEFAULT = ProcessDefault(ENV_NORM_BACKEND, get_args(NormBackend), fallback="torch")


def set_default_norm_backend(backend: NormBackend) -> NormBackend:
    """Set what the norm modules run from now on; returns the previous default."""
    return NORM_BACKEND_DEFAULT.set(backend)  # type: ignore[return-value]


def get_default_norm_backend() -> NormBackend:
    return NORM_BACKEND_DEFAULT.value  # type: ignore[return-value]


def _fused(x: torch.Tensor) -> bool:
    return NORM_BACKEND_DEFAULT.value == "triton" or (
        NORM_BACKEND_DEFAULT.value == "auto" and x.device.type == "cuda"
    )


def _fused_norm(kind: Literal["rms_norm", "layer_norm"], *args: torch.Tensor | float | None) -> torch.Tensor:
    """The Triton kernel `kind` (rms_norm / layer_norm of `pretrain.kernels.norms`). Imported at each fused
    call (a sys.modules lookup once loaded), so a test that re-imports the kernel module under the
    interpreter is the one used; an import statement, which TorchDynamo follows, where importlib would be
    one more graph break under train.compile."""
    from pretrain.kernels import norms

    return getattr(norms, kind)(*args, backend=NORM_BACKEND_DEFAULT.value)


class FusedRMSNorm(nn.RMSNorm):
    """nn.RMSNorm over the last dimension, on the default norm backend."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.normalized_shape) != 1 or not _fused(x):
            return super().forward(x)
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return _fused_norm("rms_norm", x, self.weight, eps)


class FusedLayerNorm(nn.LayerNorm):
    """nn.LayerNorm over the last dimension, on the default norm backend."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.normalized_shape) != 1 or not _fused(x):
            return super().forward(x)
        return _fused_norm("layer_norm", x, self.weight, self.bias, self.eps)
