"""The one attention entry point every model calls.

`attention(q, k, v, causal=..., key_padding_mask=..., position_bias=...)` computes
softmax(q k^T * scale + position_bias + masks) v. The reference path is PyTorch's
scaled_dot_product_attention (which itself picks flash / memory-efficient / math); fused Triton kernels
plug in behind `backend=` without any model changing.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Backend = Literal["auto", "triton", "sdpa"]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    position_bias: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention.

    q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D) with H a multiple of Hkv (grouped-query attention).
    key_padding_mask: (B, Tk) bool, True where the key is a real token (Hugging Face's attention_mask).
    position_bias: additive float bias broadcastable to (B, H, Tq, Tk), e.g. T5's relative position bias.
    causal with Tq != Tk aligns the triangle to the bottom right (query i sees keys <= Tk - Tq + i), as
    FlashAttention-2 and a KV cache do. scale defaults to 1/sqrt(D). Returns (B, H, Tq, D).
    """
    if backend == "triton":
        raise NotImplementedError(
            "backend='triton': the fused Triton kernels are not available in this build"
        )
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
