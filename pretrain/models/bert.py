"""BERT: encoder-only Transformer for masked language modelling (Devlin et al. 2019).

As in the paper: post-norm blocks, learned absolute positions, token-type (segment) embeddings summed
with the token embeddings and normalized, GELU, an MLM head (dense + GELU + norm) whose output
projection is tied to the token embeddings with its own bias, and a pooler (dense + tanh on the first,
<cls>, position) that classification fine-tuning builds on.

Options of the lineage, all off by default (the state dict of a plain BERT is unchanged):
- `embedding_size` E < hidden (ALBERT, Lan et al. 2020 §3.1): token, position and type tables are E wide
  and normalized there, `embed_proj` maps E -> H; the MLM head's dense maps H -> E, so the tied output
  projection is the E-wide token table.
- `share_layers` (ALBERT §3.1): "all" repeats one block `num_layers` times; "attention" / "ffn" share only
  that sub-layer (with the norm that closes it) across blocks. `blocks` still holds `num_layers` entries
  (the same module objects), so the state dict lists shared tensors under every layer's name.
- `position_offset` (RoBERTa's fairseq layout): the position table has that many rows before position 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from parallel.layers import LayerFactory
from pretrain.config import ModelConfig
from pretrain.models.blocks import TransformerBlock, init_weights, make_norm


def _shared_blocks(cfg: ModelConfig, layers: LayerFactory) -> list[TransformerBlock]:
    """`num_layers` blocks with ALBERT's cross-layer sharing applied (the same modules in every block)."""
    if cfg.share_layers == "all":
        return [TransformerBlock(cfg, layers, causal=False)] * cfg.num_layers
    blocks = [TransformerBlock(cfg, layers, causal=False) for _ in range(cfg.num_layers)]
    first = blocks[0]
    for block in blocks[1:]:
        if cfg.share_layers == "attention":  # post-norm: attn_norm closes the attention sub-layer
            block.attn, block.attn_norm = first.attn, first.attn_norm
        elif cfg.share_layers == "ffn":
            block.mlp, block.mlp_norm = first.mlp, first.mlp_norm
    return blocks


class BERT(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: LayerFactory | None = None):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError(
                f"model.vocab_size={cfg.vocab_size}: must be set (> 0) before building the model"
            )
        layers = layers or LayerFactory()
        self.config = cfg
        e = cfg.embed_size
        self.embed = layers.vocab_embedding(cfg.vocab_size, e)
        self.pos_embed = layers.embedding(cfg.max_seq_len + cfg.position_offset, e)
        self.type_embed = layers.embedding(cfg.type_vocab_size, e) if cfg.type_vocab_size else None
        self.embed_norm = make_norm(cfg, e)
        self.drop = nn.Dropout(cfg.dropout)
        self.embed_proj = nn.Linear(e, cfg.hidden_size) if e != cfg.hidden_size else None
        self.blocks = nn.ModuleList(_shared_blocks(cfg, layers))
        # Pre-norm stacks need a final norm; post-norm blocks end normalized already.
        self.final_norm = make_norm(cfg) if cfg.norm_position == "pre" else None
        self.mlm_dense = nn.Linear(cfg.hidden_size, e)
        self.mlm_norm = make_norm(cfg, e)
        # The head's activation: exact GELU as BERT's, unless the model uses the tanh GELU (ALBERT's gelu_new).
        self.mlm_act = "tanh" if cfg.activation == "gelu_tanh" else "none"
        self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.lm_head = None if cfg.tie_embeddings else layers.column_linear(e, cfg.vocab_size, bias=False)
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
        positions = torch.arange(t, device=input_ids.device) + self.config.position_offset
        x = self.embed(input_ids) + self.pos_embed(positions)  # (B, T, E)
        if self.type_embed is not None:
            types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
            x = x + self.type_embed(types)
        x = self.drop(self.embed_norm(x))
        if self.embed_proj is not None:
            x = self.embed_proj(x)  # (B, T, E) -> (B, T, C)
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
        return self.mlm_logits(self.encode(input_ids, attention_mask, token_type_ids))

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, T, C) -> MLM logits (B, T, V)."""
        return F.linear(*self._mlm_head(hidden))

    def lm_head_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What `forward` feeds its output projection: (MLM-transformed hidden (B, T, E), weight (V, E),
        bias (V,)), so a loss can fuse the projection with the cross-entropy (train.loss_chunk_size)."""
        return self._mlm_head(self.encode(input_ids, attention_mask, token_type_ids))

    def _mlm_head(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.mlm_norm(F.gelu(self.mlm_dense(hidden), approximate=self.mlm_act))  # (B, T, E)
        head = self.embed if self.lm_head is None else self.lm_head
        weight: torch.Tensor = head.weight  # type: ignore[assignment]
        return h, weight, self.mlm_bias

    def pooled(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, C): tanh(dense(h_<cls>)), the sentence representation for classification."""
        return torch.tanh(self.pooler(hidden[:, 0]))
