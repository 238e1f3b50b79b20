"""The one attention entry point every model calls.

`attention(q, k, v, causal=..., key_padding_mask=..., position_bias=...)` computes
softmax(q k^T * scale + position_bias + masks) v on one of two backends:

* "triton": Tandem's fused FlashAttention-2-style kernels (`pretrain.kernels.flash_attention`), with
  T5's relative position bias fused in-kernel when `position_bias` is a `T5Bias`;
* "sdpa": PyTorch's scaled_dot_product_attention (which itself picks flash / memory-efficient / cuDNN /
  math).

`backend="auto"` (what models pass) resolves through the process-wide default, set by
`set_default_backend(...)` or the environment variable TANDEM_ATTENTION_BACKEND (auto | triton | sdpa)
read at import (a training run's `train.attention_backend` sets it too). A default of "auto" picks Triton
for CUDA tensors whose shapes and dtypes the kernels support (no dense bias tensor; attention dropout is
fused) and SDPA otherwise, so CPU runs use SDPA. Forcing "triton" on a CPU tensor runs the kernels in
Triton's interpreter, which needs TRITON_INTERPRET=1 set before Python imports triton (slow; for tests);
without it the call raises a clear error.

Packed (varlen) sequences have their own entry point, `pretrain.kernels.varlen_attention`
(FlashAttention's cu_seqlens interface, Triton only).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F

from pretrain.kernels.defaults import ProcessDefault
from pretrain.kernels.t5_bias import T5Bias, t5_dense_bias

Backend = Literal["auto", "triton", "sdpa"]
ENV_BACKEND = "TANDEM_ATTENTION_BACKEND"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# tl.dot needs tiles >= 16 wide; above 128 the tiles would not fit Hopper's shared memory at these blocks.
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128


BACKEND_DEFAULT = ProcessDefault(ENV_BACKEND, get_args(Backend))


def set_default_backend(backend: Backend) -> Backend:
    """Set what `backend="auto"` resolves to for every later call; returns the previous default."""
    return BACKEND_DEFAULT.set(backend)  # type: ignore[return-value]


def get_default_backend() -> Backend:
    return BACKEND_DEFAULT.value  # type: ignore[return-value]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    position_bias: torch.Tensor | T5Bias | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention.

    q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D) with H a multiple of Hkv (grouped-query attention).
    key_padding_mask: (B, Tk) bool, True where the key is a real token (Hugging Face's attention_mask).
    position_bias: additive float bias broadcastable to (B, H, Tq, Tk), or a `T5Bias` (T5's bucketed
    relative position bias table, fused in the Triton kernel, gathered into a dense bias for SDPA).
    causal with Tq != Tk aligns the triangle to the bottom right (query i sees keys <= Tk - Tq + i), as
    FlashAttention-2 and a KV cache do. scale defaults to 1/sqrt(D). dropout_p: dropout on the attention
    probabilities, in [0, 1) (fused in the Triton kernels, which draw a Philox seed from PyTorch's
    generator of q's device: reproducible under torch.manual_seed and under an activation-checkpointing
    recompute, but not the same mask as SDPA's for the same seed).
    Returns (B, H, Tq, D). A query row that sees no key returns zeros on Triton (NaN on SDPA).
    """
    chosen = BACKEND_DEFAULT.validated(backend, "backend")
    if chosen == "auto":
        chosen = BACKEND_DEFAULT.value
    if chosen == "auto":
        chosen = (
            "triton"
            if _triton_unsupported(q, k, v, position_bias, dropout_p, cuda_only=True) is None
            else "sdpa"
        )
    if chosen == "triton":
        reason = _triton_unsupported(q, k, v, position_bias, dropout_p, cuda_only=False)
        if reason is not None:
            raise ValueError(f"backend='triton' cannot run this call: {reason} (use backend='sdpa')")
        from pretrain.kernels.flash_attention import flash_attention

        return flash_attention(
            q,
            k,
            v,
            causal=causal,
            key_padding_mask=key_padding_mask,
            t5_bias=position_bias,  # type: ignore[arg-type]
            scale=scale,
            dropout_p=dropout_p,
        )
    if isinstance(position_bias, T5Bias):
        position_bias = t5_dense_bias(position_bias, q.shape[-2], k.shape[-2])
    return _sdpa(
        q,
        k,
        v,
        causal=causal,
        key_padding_mask=key_padding_mask,
        position_bias=position_bias,
        scale=scale,
        dropout_p=dropout_p,
    )


def _triton_unsupported(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    position_bias: torch.Tensor | T5Bias | None,
    dropout_p: float,
    *,
    cuda_only: bool,
) -> str | None:
    """Why the Triton kernels cannot take this call, or None when they can."""
    if cuda_only and q.device.type != "cuda":
        return f"tensors on {q.device.type}, not CUDA"
    if not 0.0 <= dropout_p < 1.0:
        return f"dropout_p={dropout_p} outside [0, 1)"
    if position_bias is not None and not isinstance(position_bias, T5Bias):
        return "a dense position_bias tensor (only a fused T5Bias is supported)"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype} (need one of {SUPPORTED_DTYPES})"
    d = q.shape[-1]
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        return f"head_dim={d} outside [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]"
    if q.dim() != 4 or k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        return f"q {tuple(q.shape)} / k {tuple(k.shape)}: need (B, H, T, D) with H a multiple of Hkv"
    return None


def _sdpa(q, k, v, *, causal, key_padding_mask, position_bias, scale, dropout_p) -> torch.Tensor:
    if k.shape[1] != q.shape[1]:
        repeat = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(repeat, dim=1)
        v = v.repeat_interleave(repeat, dim=1)
    t, s = q.shape[-2], k.shape[-2]
    mask: torch.Tensor | None = None
    if key_padding_mask is not None:
        mask = key_padding_mask.bool()[:, None, None, :]  # (B, 1, 1, Tk)
    if causal and (mask is not None or position_bias is not None or t != s):
        # SDPA's is_causal aligns the triangle to the top left and rejects an explicit mask: fold a
        # bottom-right-aligned triangle into the mask instead.
        tri = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
        mask = tri if mask is None else mask & tri
        causal = False
    if position_bias is not None:
        bias = position_bias.to(q.dtype)
        mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, scale=scale
    )
