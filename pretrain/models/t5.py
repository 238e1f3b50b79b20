"""T5: encoder-decoder Transformer trained by span corruption (Raffel et al. 2020).

As in the paper: pre-norm blocks with RMSNorm and no biases, no absolute positions but learned
relative-position buckets (one table per stack, shared by its layers, added to the attention logits),
attention logits not scaled by 1/sqrt(d) (the initialization absorbs it), ReLU MLP or T5 v1.1's
gated-GELU, decoder cross-attention to the encoder output, and an LM head tied to the embeddings (with
the decoder output scaled by d_model^-0.5) or untied (v1.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from parallel.layers import LayerFactory
from pretrain.config import ModelConfig
from pretrain.models.blocks import RelativePositionBias, TransformerBlock, init_weights, make_norm


class T5(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: LayerFactory | None = None):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError(
                f"model.vocab_size={cfg.vocab_size}: must be set (> 0) before building the model"
            )
        layers = layers or LayerFactory()
        self.config = cfg
        self.embed = layers.vocab_embedding(cfg.vocab_size, cfg.hidden_size)
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder_bias = RelativePositionBias(cfg, bidirectional=True)
        self.encoder_blocks = nn.ModuleList(
            TransformerBlock(cfg, layers, causal=False, attention_scale=1.0, moe=cfg.is_moe_layer(i))
            for i in range(cfg.num_layers)
        )
        self.encoder_norm = make_norm(cfg)
        self.decoder_bias = RelativePositionBias(cfg, bidirectional=False)
        self.decoder_blocks = nn.ModuleList(
            TransformerBlock(
                cfg, layers, causal=True, cross_attention=True, attention_scale=1.0, moe=cfg.is_moe_layer(i)
            )
            for i in range(cfg.decoder_layers)
        )
        self.decoder_norm = make_norm(cfg)
        self.lm_head = (
            None if cfg.tie_embeddings else layers.column_linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )
        init_weights(self, cfg, num_residual_layers=cfg.num_layers + cfg.decoder_layers)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: (B, S) -> encoder output (B, S, C)."""
        x = self.drop(self.embed(input_ids))
        bias = self.encoder_bias()
        padding = attention_mask.bool() if attention_mask is not None else None
        for block in self.encoder_blocks:
            x = block(x, None, padding, bias)
        return self.drop(self.encoder_norm(x))

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        encoder_output: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """decoder_input_ids: (B, T), encoder_output: (B, S, C) -> logits (B, T, V)."""
        y = self.drop(self.embed(decoder_input_ids))
        bias = self.decoder_bias()
        self_padding = decoder_attention_mask.bool() if decoder_attention_mask is not None else None
        context_padding = attention_mask.bool() if attention_mask is not None else None
        for block in self.decoder_blocks:
            y = block(y, None, self_padding, bias, encoder_output, context_padding)
        y = self.drop(self.decoder_norm(y))
        if self.lm_head is None:
            # Tied head: rescale so the logits keep the scale of the (unit-RMS) decoder output.
            return F.linear(y * self.config.hidden_size**-0.5, self.embed.weight)
        return self.lm_head(y)

    def forward(
        self,
        input_ids: torch.Tensor,
        decoder_input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        encoded = self.encode(input_ids, attention_mask)
        return self.decode(
            decoder_input_ids,
            encoded,
            attention_mask=attention_mask,
            decoder_attention_mask=decoder_attention_mask,
        )
