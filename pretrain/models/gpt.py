"""GPT: decoder-only Transformer (Radford et al. 2019), pre-norm with a final norm; options for the
Llama-style variant (RMSNorm, SwiGLU, RoPE, no biases, untied head, grouped-query attention), GPT-3's
alternating dense / locally banded layers, Gopher's Transformer-XL relative positions and PaLM's parallel
block with multi-query attention (z-loss: pretrain/losses.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from parallel.layers import LayerFactory
from pretrain.config import ModelConfig
from pretrain.models.blocks import BlockCache, RotaryEmbedding, TransformerBlock, init_weights, make_norm


def local_window(cfg: ModelConfig, layer: int) -> int:
    """Band width of layer `layer`'s self-attention (0 = dense): GPT-3 alternates dense and banded layers."""
    every = cfg.local_attention_every
    return cfg.local_attention_window if cfg.local_attention_window and (layer + 1) % every == 0 else 0


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: LayerFactory | None = None):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError(
                f"model.vocab_size={cfg.vocab_size}: must be set (> 0) before building the model"
            )
        layers = layers or LayerFactory()
        self.config = cfg
        self.embed = layers.vocab_embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos_embed = (
            layers.embedding(cfg.max_seq_len, cfg.hidden_size) if cfg.position == "learned" else None
        )
        self.rope = (
            RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta) if cfg.position == "rope" else None
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                cfg, layers, causal=True, local_window=local_window(cfg, i), moe=cfg.is_moe_layer(i)
            )
            for i in range(cfg.num_layers)
        )
        self.final_norm = make_norm(cfg)
        self.lm_head = (
            None if cfg.tie_embeddings else layers.column_linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )
        init_weights(self, cfg)

    def new_cache(self) -> list[BlockCache]:
        """Empty key/value caches, one per block, for incremental decoding."""
        return [BlockCache() for _ in self.blocks]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: list[BlockCache] | None = None,
    ) -> torch.Tensor:
        """input_ids: (B, T) -> logits (B, T, V). attention_mask: optional (B, T_past + T), 1 = real token.

        With `cache` (from `new_cache()`), input_ids continue the cached sequence: positions start after the
        cached tokens and the cache is extended in place (greedy/sampled generation)."""
        return F.linear(*self._trunk(input_ids, attention_mask, cache))  # (B, T, V)

    def lm_head_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        """What `forward` feeds its output projection: (hidden (B, T, C), weight (V, C), bias None), so a
        loss can fuse the projection with the cross-entropy (train.loss_chunk_size)."""
        return (*self._trunk(input_ids, attention_mask, None), None)

    def _trunk(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: list[BlockCache] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything before the output projection: (final-normed hidden (B, T, C), head weight (V, C))."""
        past = cache[0].self_attn.length if cache else 0
        t = input_ids.shape[1]  # (B, T)
        if past + t > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {past + t} exceeds model.max_seq_len={self.config.max_seq_len}"
            )
        x = self.embed(input_ids)  # (B, T, C)
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(past, past + t, device=input_ids.device))
        x = self.drop(x)
        padding = attention_mask.bool() if attention_mask is not None else None  # (B, T), True = real token
        for i, block in enumerate(self.blocks):
            x = block(x, self.rope, padding, cache=cache[i] if cache is not None else None)
        head = self.embed if self.lm_head is None else self.lm_head
        weight: torch.Tensor = head.weight  # type: ignore[assignment]
        return self.final_norm(x), weight

    def num_parameters(self, *, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.weight.numel()
            if self.pos_embed is not None:
                n -= self.pos_embed.weight.numel()
        return n
