"""The one attention entry point every model calls. Fused Triton kernels replace the body later;
until then it is PyTorch's scaled_dot_product_attention (which itself picks flash/mem-efficient/math)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v.

    q: (B, H, T, D); k, v: (B, Hkv, S, D) with H a multiple of Hkv (grouped-query attention).
    mask: broadcastable to (B, H, T, S); bool (True = attend) or additive float. Returns (B, H, T, D).
    """
    if k.shape[1] != q.shape[1]:
        repeat = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(repeat, dim=1)
        v = v.repeat_interleave(repeat, dim=1)
    t, s = q.shape[-2], k.shape[-2]
    if causal and (mask is not None or t != s):
        # Queries are the last t of s positions (as with a KV cache), so query i sees keys <= s - t + i.
        # SDPA's is_causal aligns the triangle to the first key instead and rejects an explicit mask, so
        # the triangle is folded into the mask here.
        tri = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
        if mask is None:
            mask = tri
        else:
            mask = (mask & tri) if mask.dtype == torch.bool else mask.masked_fill(~tri, float("-inf"))
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)
