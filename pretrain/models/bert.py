"""BERT: encoder-only Transformer for masked language modelling (Devlin et al. 2019).

As in the paper: post-norm blocks, learned absolute positions, token-type (segment) embeddings summed
with the token embeddings and normalized, GELU, an MLM head (dense + GELU + norm) whose output
projection is tied to the token embeddings with its own bias, and a pooler (dense + tanh on the first,
<cls>, position) that classification fine-tuning builds on."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from parallel.layers import LayerFactory
from pretrain.config import ModelConfig
from pretrain.models.blocks import TransformerBlock, init_weights, make_norm


class BERT(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: LayerFactory | None = None):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError(
                f"model.vocab_size={cfg.vocab_size}: must be set (> 0) before building the model"
            )
        layers = layers or LayerFactory()
        self.config = cfg
        self.embed = layers.vocab_embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos_embed = layers.embedding(cfg.max_seq_len, cfg.hidden_size)
        self.type_embed = (
            layers.embedding(cfg.type_vocab_size, cfg.hidden_size) if cfg.type_vocab_size else None
        )
        self.embed_norm = make_norm(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg, layers, causal=False) for _ in range(cfg.num_layers)
        )
        # Pre-norm stacks need a final norm; post-norm blocks end normalized already.
        self.final_norm = make_norm(cfg) if cfg.norm_position == "pre" else None
        self.mlm_dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.mlm_norm = make_norm(cfg)
        self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.lm_head = (
            None if cfg.tie_embeddings else layers.column_linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        init_weights(self, cfg)

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids: (B, T) -> hidden states (B, T, C)."""
        t = input_ids.shape[1]
        if t > self.config.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds model.max_seq_len={self.config.max_seq_len}")
        x = self.embed(input_ids) + self.pos_embed(torch.arange(t, device=input_ids.device))
        if self.type_embed is not None:
            types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
            x = x + self.type_embed(types)
        x = self.drop(self.embed_norm(x))
        padding = attention_mask.bool() if attention_mask is not None else None  # (B, T), True = real token
        for block in self.blocks:
            x = block(x, None, padding)
        return self.final_norm(x) if self.final_norm is not None else x

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """-> MLM logits (B, T, V)."""
        h = self.encode(input_ids, attention_mask, token_type_ids)
        h = self.mlm_norm(F.gelu(self.mlm_dense(h)))
        head = self.embed if self.lm_head is None else self.lm_head
        weight: torch.Tensor = head.weight  # type: ignore[assignment]
        return F.linear(h, weight, self.mlm_bias)

    def pooled(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, C): tanh(dense(h_<cls>)), the sentence representation for classification."""
        return torch.tanh(self.pooler(hidden[:, 0]))
