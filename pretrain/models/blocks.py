"""Shared Transformer pieces: norms, rotary positions, attention, MLP and the pre-norm block.

The math lives here; which concrete linear/embedding layer is used (plain or tensor-parallel) comes from
`parallel.layers.LayerFactory`, so these modules never know how they are parallelized.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from parallel.layers import LayerFactory
from pretrain.config import ModelConfig
from pretrain.kernels import attention


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.bias)


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al. 2021) in the rotate-half layout used by GPT-NeoX and Llama."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)  # (T, D/2)
        angles = torch.cat([angles, angles], dim=-1)  # (T, D)
        # Not saved in checkpoints: recomputed from the config, so the state dict holds only weights.
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """x: (B, H, T, D) -> x rotated by each position's angle."""
        t = x.shape[-2]
        cos = self.cos[offset : offset + t].to(x.dtype)  # type: ignore[index]
        sin = self.sin[offset : offset + t].to(x.dtype)  # type: ignore[index]
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: LayerFactory, *, causal: bool):
        super().__init__()
        self.causal = causal
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.kv_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = layers.column_linear(h, self.num_heads * self.head_dim, bias=cfg.bias)
        self.k_proj = layers.column_linear(h, self.num_kv_heads * self.head_dim, bias=cfg.bias)
        self.v_proj = layers.column_linear(h, self.num_kv_heads * self.head_dim, bias=cfg.bias)
        self.o_proj = layers.row_linear(self.num_heads * self.head_dim, h, bias=cfg.bias)
        self.o_proj.is_residual_projection = True  # type: ignore[assignment]
        self.dropout = cfg.dropout

    def forward(
        self,
        x: torch.Tensor,
        *,
        rope: RotaryEmbedding | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, t, _ = x.shape  # (B, T, C)
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = rope(q), rope(k)
        y = attention(
            q,
            k,
            v,
            causal=self.causal,
            key_padding_mask=key_padding_mask,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: LayerFactory):
        super().__init__()
        h, f = cfg.hidden_size, cfg.ffn_size
        self.gated = cfg.activation == "swiglu"
        self.activation = cfg.activation
        if self.gated:
            self.gate_proj = layers.column_linear(h, f, bias=cfg.bias)
        self.up_proj = layers.column_linear(h, f, bias=cfg.bias)
        self.down_proj = layers.row_linear(f, h, bias=cfg.bias)
        self.down_proj.is_residual_projection = True  # type: ignore[assignment]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        act = F.gelu if self.activation == "gelu" else F.relu
        return self.down_proj(act(self.up_proj(x)))


class PreNormBlock(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)) (GPT-2's placement of LayerNorm)."""

    def __init__(self, cfg: ModelConfig, layers: LayerFactory, *, causal: bool):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = SelfAttention(cfg, layers, causal=causal)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg, layers)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: RotaryEmbedding | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), rope=rope, key_padding_mask=key_padding_mask))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


def init_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """Normal(0, init_std) weights, zero biases, unit norms; residual output projections get
    init_std / sqrt(2 * num_layers) so the residual stream's variance does not grow with depth (GPT-2)."""
    residual_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            std = residual_std if getattr(module, "is_residual_projection", False) else cfg.init_std
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=cfg.init_std)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            if module.weight is not None:
                nn.init.ones_(module.weight)
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                nn.init.zeros_(bias)
