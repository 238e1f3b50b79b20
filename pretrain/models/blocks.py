"""Shared Transformer pieces: norms, positions (rotary, T5 relative buckets), attention (self or cross),
MLP (plain or gated) and the block (pre- or post-norm, optional cross-attention). GPT, BERT and T5 are
assembled from these.

The math lives here; which concrete linear/embedding layer is used (plain or tensor-parallel) comes from
`parallel.layers.LayerFactory`, so these modules never know how they are parallelized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from parallel.layers import LayerFactory
from pretrain.config import ModelConfig
from pretrain.kernels import FusedLayerNorm, FusedRMSNorm, attention
from pretrain.kernels.t5_bias import T5Bias


def make_norm(cfg: ModelConfig, width: int | None = None) -> nn.Module:
    """The model's norm over `width` features (default hidden_size): subclasses of nn.RMSNorm /
    nn.LayerNorm that run the fused Triton kernels when the norm backend says so (train.norm_backend)."""
    width = cfg.hidden_size if width is None else width
    if cfg.norm == "rmsnorm":
        return FusedRMSNorm(width, eps=cfg.norm_eps)
    return FusedLayerNorm(width, eps=cfg.norm_eps, bias=cfg.bias)


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


class RelativePositionBias(nn.Module):
    """A (buckets, heads) table of learned biases, shared by every layer of one stack (T5)."""

    def __init__(self, cfg: ModelConfig, *, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets, self.max_distance = cfg.relative_buckets, cfg.relative_max_distance
        self.table = nn.Embedding(cfg.relative_buckets, cfg.num_heads)

    def forward(self) -> T5Bias:
        """The table with T5's bucketing rules: the attention kernel fuses it (Triton) or expands it to a
        dense (1, H, Tq, Tk) bias (SDPA), queries being the last Tq of Tk positions."""
        return T5Bias(self.table.weight, self.bidirectional, self.num_buckets, self.max_distance)


@dataclass
class LayerCache:
    """Keys and values already computed for one attention layer (incremental decoding).

    Self-attention appends each new step's keys/values; cross-attention computes the encoder's once."""

    k: torch.Tensor | None = None  # (B, Hkv, S, D)
    v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]


@dataclass
class BlockCache:
    self_attn: LayerCache = field(default_factory=LayerCache)
    cross_attn: LayerCache = field(default_factory=LayerCache)


def sinusoid_table(length: int, dim: int, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(length, dim): [sin(p / 10000^(2i/dim)), cos(...)] of positions (here distances) p = 0..length-1,
    the halves concatenated as in Transformer-XL's relative encoding."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2, device=device, dtype=torch.float64) / dim)
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float64), inv_freq)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)[:, :dim].to(dtype)


class AttentionCore(nn.Module):
    """softmax(q k^T · scale + bias + mask) v, with attention dropout: the part of a block whose saved
    activations grow with the square of the sequence (scores, probabilities, dropout mask; 5·a·s²·b bytes
    per layer, Korthikanti et al. 2022). No parameters: it is a module only so that
    `parallel.activation_checkpointing=selective` can recompute it by name."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool,
        key_padding_mask: torch.Tensor | None,
        position_bias: torch.Tensor | T5Bias | None,
        scale: float | None,
        dropout_p: float,
    ) -> torch.Tensor:
        return attention(
            q,
            k,
            v,
            causal=causal,
            key_padding_mask=key_padding_mask,
            position_bias=position_bias,
            scale=scale,
            dropout_p=dropout_p,
        )


class Attention(nn.Module):
    """Multi-head attention over the block's own input (self) or an encoder's output (cross).

    `local_window` > 0 bands causal self-attention: query i sees keys i-window+1..i (GPT-3's locally banded
    sparse layers). position=relative_xl adds Transformer-XL's relative terms (Dai et al. 2019, eq. 4):
    score(i, j) = (q_i + u) k_j + (q_i + v) W_R r_{i-j}, with r the sinusoid of the distance, W_R this
    layer's projection and u, v per-head biases; both are passed to the kernel as a dense additive bias."""

    def __init__(
        self,
        cfg: ModelConfig,
        layers: LayerFactory,
        *,
        causal: bool,
        scale: float | None = None,
        local_window: int = 0,
    ):
        super().__init__()
        self.causal, self.scale = causal, scale
        if local_window and not causal:
            raise ValueError(f"local_window={local_window}: banded attention is defined for causal attention")
        self.local_window = local_window
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.kv_heads, cfg.head_dim
        h, inner = cfg.hidden_size, cfg.num_heads * cfg.head_dim
        self.q_proj = layers.column_linear(h, inner, bias=cfg.bias)
        self.k_proj = layers.column_linear(h, self.num_kv_heads * self.head_dim, bias=cfg.bias)
        self.v_proj = layers.column_linear(h, self.num_kv_heads * self.head_dim, bias=cfg.bias)
        self.o_proj = layers.row_linear(inner, h, bias=cfg.bias)
        self.o_proj.is_residual_projection = True  # type: ignore[assignment]
        self.dropout = cfg.dropout
        self.core = AttentionCore()
        self.relative_xl, self.hidden_size = cfg.position == "relative_xl", h
        if self.relative_xl:
            self.r_proj = layers.column_linear(h, inner, bias=False)  # W_R
            # u (content) and v (position) biases of the query; zero at init like the paper's code's default
            self.r_content_bias = nn.Parameter(torch.zeros(self.num_heads, self.head_dim))
            self.r_position_bias = nn.Parameter(torch.zeros(self.num_heads, self.head_dim))

    def _extra_bias(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
        """The banding mask and/or Transformer-XL terms as an additive bias (B or 1, H or 1, Tq, Tk), scaled
        like q k^T; queries are the last Tq of the Tk positions (a KV cache holds the earlier ones)."""
        if not (self.relative_xl or self.local_window):
            return None
        tq, tk = q.shape[-2], k.shape[-2]
        q_pos = torch.arange(tk - tq, tk, device=q.device)
        distance = q_pos[:, None] - torch.arange(tk, device=q.device)[None, :]  # (Tq, Tk), i - j
        bias = torch.zeros(1, 1, tq, tk, device=q.device, dtype=q.dtype)
        if self.relative_xl:
            scale = self.scale if self.scale is not None else 1.0 / math.sqrt(self.head_dim)
            table = sinusoid_table(tk, self.hidden_size, device=q.device, dtype=q.dtype)  # (Tk, C)
            r = self.r_proj(table).view(tk, self.num_heads, self.head_dim)  # (distances, H, D)
            qv = q + self.r_position_bias[:, None, :].to(q.dtype)  # (B, H, Tq, D)
            by_distance = torch.einsum("bhqd,rhd->bhqr", qv, r)  # (B, H, Tq, distances)
            # Future keys (negative distance) are masked by causality; clamp keeps the gather in range.
            index = distance.clamp(min=0).expand(q.shape[0], self.num_heads, tq, tk)
            position_term = by_distance.gather(-1, index)
            k_heads = k.repeat_interleave(self.num_heads // k.shape[1], dim=1)  # (B, H, Tk, D)
            content_term = torch.einsum("hd,bhkd->bhk", self.r_content_bias.to(q.dtype), k_heads)[:, :, None]
            bias = bias + scale * (position_term + content_term)
        if self.local_window:
            bias = bias.masked_fill(distance >= self.local_window, float("-inf"))
        return bias

    def forward(
        self,
        x: torch.Tensor,
        *,
        context: torch.Tensor | None = None,
        rope: RotaryEmbedding | None = None,
        key_padding_mask: torch.Tensor | None = None,
        position_bias: torch.Tensor | T5Bias | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        b, t, _ = x.shape  # (B, T, C)
        source = x if context is None else context  # (B, S, C)
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        if cache is not None and context is not None and cache.k is not None:
            k, v = cache.k, cache.v  # the encoder output does not change while decoding
            assert v is not None
        else:
            k = (
                self.k_proj(source).view(b, source.shape[1], -1, self.head_dim).transpose(1, 2)
            )  # (B, Hkv, S, D)
            v = self.v_proj(source).view(b, source.shape[1], -1, self.head_dim).transpose(1, 2)
            offset = cache.length if cache is not None and context is None else 0
            if rope is not None:
                q, k = rope(q, offset), rope(k, offset)
            if cache is not None:
                if context is None and cache.k is not None:
                    k = torch.cat([cache.k, k], dim=2)  # (B, Hkv, S_past + T, D)
                    v = torch.cat([cache.v, v], dim=2)  # type: ignore[list-item]
                cache.k, cache.v = k, v
        extra = self._extra_bias(q, k)
        if extra is not None:
            if isinstance(position_bias, T5Bias):
                raise ValueError("relative_xl / banded attention cannot be combined with T5's bucketed bias")
            position_bias = extra if position_bias is None else position_bias + extra
        y = self.core(
            q,
            k,
            v,
            causal=self.causal,
            key_padding_mask=key_padding_mask,
            position_bias=position_bias,
            scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "swiglu": F.silu,
    "geglu": lambda x: F.gelu(x, approximate="tanh"),  # T5 v1.1's gated-gelu uses the tanh GELU
}


class MLP(nn.Module):
    """down(act(up(x))), or down(act(gate(x)) * up(x)) when gated (Shazeer 2020)."""

    def __init__(self, cfg: ModelConfig, layers: LayerFactory):
        super().__init__()
        h, f = cfg.hidden_size, cfg.ffn_size
        self.gated = cfg.gated
        self.act = _ACTIVATIONS[cfg.activation]
        if self.gated:
            self.gate_proj = layers.column_linear(h, f, bias=cfg.bias)
        self.up_proj = layers.column_linear(h, f, bias=cfg.bias)
        self.down_proj = layers.row_linear(f, h, bias=cfg.bias)
        self.down_proj.is_residual_projection = True  # type: ignore[assignment]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act(self.gate_proj(x)) * self.up_proj(x) if self.gated else self.act(self.up_proj(x))
        return self.down_proj(hidden)


class TransformerBlock(nn.Module):
    """Self-attention, optional cross-attention, MLP; each a residual branch.

    Pre-norm (GPT-2, T5): x + f(norm(x)). Post-norm (BERT): norm(x + f(x)). With model.parallel_block
    (GPT-J, PaLM): x + attn(norm(x)) + mlp(norm(x)), one norm shared by both branches."""

    def __init__(
        self,
        cfg: ModelConfig,
        layers: LayerFactory,
        *,
        causal: bool,
        cross_attention: bool = False,
        attention_scale: float | None = None,
        moe: bool = False,
        local_window: int = 0,
    ):
        super().__init__()
        self.post_norm = cfg.norm_position == "post"
        self.parallel_block = cfg.parallel_block
        if self.parallel_block and (self.post_norm or cross_attention):
            raise ValueError("model.parallel_block: needs pre-norm blocks without cross-attention")
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layers, causal=causal, scale=attention_scale, local_window=local_window)
        if cross_attention:
            self.cross_norm = make_norm(cfg)
            self.cross_attn = Attention(cfg, layers, causal=False, scale=attention_scale)
        if not self.parallel_block:
            self.mlp_norm = make_norm(cfg)
        if moe:  # Switch Transformer: top-1 routed expert MLPs (pretrain/models/moe.py)
            from pretrain.models.moe import SwitchFFN

            self.mlp: nn.Module = SwitchFFN(cfg, layers)
        else:
            self.mlp = MLP(cfg, layers)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: RotaryEmbedding | None = None,
        key_padding_mask: torch.Tensor | None = None,
        position_bias: torch.Tensor | T5Bias | None = None,
        context: torch.Tensor | None = None,
        context_padding_mask: torch.Tensor | None = None,
        cache: BlockCache | None = None,
    ) -> torch.Tensor:
        # Each branch is called here, not through a helper taking it as a function: under train.compile a
        # Triton kernel is a graph break, and a break inside a helper would recompile the helper once per
        # branch passed to it.
        pre = not self.post_norm
        self_cache = cache.self_attn if cache is not None else None
        h = self.attn_norm(x) if pre else x
        attended = self.attn(
            h, rope=rope, key_padding_mask=key_padding_mask, position_bias=position_bias, cache=self_cache
        )
        if self.parallel_block:
            return x + self.drop(attended) + self.drop(self.mlp(h))
        x = x + self.drop(attended) if pre else self.attn_norm(x + self.drop(attended))
        if context is not None:
            h = self.cross_norm(x) if pre else x
            attended = self.cross_attn(
                h,
                context=context,
                key_padding_mask=context_padding_mask,
                cache=cache.cross_attn if cache is not None else None,
            )
            x = x + self.drop(attended) if pre else self.cross_norm(x + self.drop(attended))
        h = self.mlp_norm(x) if pre else x
        return x + self.drop(self.mlp(h)) if pre else self.mlp_norm(x + self.drop(self.mlp(h)))


def init_weights(model: nn.Module, cfg: ModelConfig, *, num_residual_layers: int | None = None) -> None:
    """Normal(0, init_std) weights, zero biases, unit norms; residual output projections get
    init_std / sqrt(2 * layers) so the residual stream's variance does not grow with depth (GPT-2)."""
    residual_std = cfg.init_std / math.sqrt(2 * (num_residual_layers or cfg.num_layers))
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
