"""T5: encoder-decoder Transformer trained by span corruption (Raffel et al. 2020).

As in the paper: pre-norm blocks with RMSNorm and no biases, no absolute positions but learned
relative-position buckets (one table per stack, shared by its layers, added to the attention logits),
attention logits not scaled by 1/sqrt(d) (the initialization absorbs it), ReLU MLP or T5 v1.1's
gated-GELU, decoder cross-attention to the encoder output, and an LM head tied to the embeddings (with
the decoder output scaled by d_model^-0.5) or untied (v1.1).

The same class is BART (Lewis et al. 2020; family `bart`), chosen by config options rather than a copy:
learned absolute position tables per stack (`position: learned`; transformers keeps 2 unused rows in front,
which export adds), post-norm blocks (`norm_position: post`, as BERT) with a LayerNorm on the embedding sum
and no final norm, GELU, biases, attention scaled by 1/sqrt(d), optional sqrt(d) embedding scale
(`scale_embedding`, off in bart-base/large), and a tied head with a learned output bias (transformers'
`final_logits_bias`) and no d_model^-0.5 rescale."""

from __future__ import annotations

import math

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
        relative, post = cfg.position == "relative", cfg.norm_position == "post"
        # T5 leaves attention logits unscaled and rescales the tied head (its init absorbs both); BART does not.
        scale = 1.0 if cfg.family == "t5" else None
        self.rescale_tied_head = cfg.family == "t5"
        self.embed = layers.vocab_embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_scale = math.sqrt(cfg.hidden_size) if cfg.scale_embedding else 1.0
        self.drop = nn.Dropout(cfg.dropout)
        # Positions: T5's relative bucket tables, or BART's learned absolute tables (one per stack).
        self.encoder_bias = RelativePositionBias(cfg, bidirectional=True) if relative else None
        self.encoder_pos = None if relative else layers.embedding(cfg.max_seq_len, cfg.hidden_size)
        # Post-norm stacks normalize the embedding sum and end normalized; pre-norm ones need a final norm.
        self.encoder_embed_norm = make_norm(cfg) if post else None
        self.encoder_blocks = nn.ModuleList(
            TransformerBlock(cfg, layers, causal=False, attention_scale=scale, moe=cfg.is_moe_layer(i))
            for i in range(cfg.num_layers)
        )
        self.encoder_norm = None if post else make_norm(cfg)
        self.decoder_bias = RelativePositionBias(cfg, bidirectional=False) if relative else None
        self.decoder_pos = None if relative else layers.embedding(cfg.max_seq_len, cfg.hidden_size)
        self.decoder_embed_norm = make_norm(cfg) if post else None
        self.decoder_blocks = nn.ModuleList(
            TransformerBlock(
                cfg, layers, causal=True, cross_attention=True, attention_scale=scale, moe=cfg.is_moe_layer(i)
            )
            for i in range(cfg.decoder_layers)
        )
        self.decoder_norm = None if post else make_norm(cfg)
        self.lm_head = (
            None if cfg.tie_embeddings else layers.column_linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )
        # BART's output bias over the vocabulary (zero at init; transformers' final_logits_bias).
        self.final_logits_bias = nn.Parameter(torch.zeros(cfg.vocab_size)) if cfg.family == "bart" else None
        init_weights(self, cfg, num_residual_layers=cfg.num_layers + cfg.decoder_layers)
        if cfg.family == "t5":
            _t5_init(self, cfg)

    def _embed(self, ids: torch.Tensor, positions: nn.Module | None, norm: nn.Module | None) -> torch.Tensor:
        """ids: (B, T) -> token (+ absolute position) embeddings, normalized for post-norm stacks: (B, T, C)."""
        x = self.embed(ids)
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        if positions is not None:
            t = ids.shape[1]
            if t > self.config.max_seq_len:
                raise ValueError(f"sequence length {t} exceeds model.max_seq_len={self.config.max_seq_len}")
            x = x + positions(torch.arange(t, device=ids.device))
        if norm is not None:
            x = norm(x)
        return self.drop(x)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: (B, S) -> encoder output (B, S, C)."""
        x = self._embed(input_ids, self.encoder_pos, self.encoder_embed_norm)
        bias = self.encoder_bias() if self.encoder_bias is not None else None
        padding = attention_mask.bool() if attention_mask is not None else None
        for block in self.encoder_blocks:
            x = block(x, None, padding, bias)
        if self.encoder_norm is None:
            return x  # post-norm: the last block's output is normalized already
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
        y = self._decoder_output(decoder_input_ids, encoder_output, attention_mask, decoder_attention_mask)
        if self.lm_head is None:
            logits = F.linear(self._tied_head_input(y), self.embed.weight)
        else:
            logits = self.lm_head(y)  # through the module: its hooks (ZeRO-3 gathers the weight) run
        if self.final_logits_bias is not None:
            logits = logits + self.final_logits_bias
        return logits

    def lm_head_inputs(
        self,
        input_ids: torch.Tensor,
        decoder_input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """What `forward` feeds its output projection: (decoder hidden (B, T, C), weight (V, C), bias (V,) or
        None), so a loss can fuse the projection with the cross-entropy (train.loss_chunk_size)."""
        encoded = self.encode(input_ids, attention_mask)
        y = self._decoder_output(decoder_input_ids, encoded, attention_mask, decoder_attention_mask)
        head = self.embed if self.lm_head is None else self.lm_head
        weight: torch.Tensor = head.weight  # type: ignore[assignment]
        hidden = self._tied_head_input(y) if self.lm_head is None else y
        return hidden, weight, self.final_logits_bias

    def _tied_head_input(self, y: torch.Tensor) -> torch.Tensor:
        """T5's tied head rescales the (unit-RMS) decoder output so the logits keep its scale."""
        return y * self.config.hidden_size**-0.5 if self.rescale_tied_head else y

    def _decoder_output(
        self,
        decoder_input_ids: torch.Tensor,
        encoder_output: torch.Tensor,
        attention_mask: torch.Tensor | None,
        decoder_attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """The decoder stack's final hidden states (B, T, C), before the output projection."""
        y = self._embed(decoder_input_ids, self.decoder_pos, self.decoder_embed_norm)
        bias = self.decoder_bias() if self.decoder_bias is not None else None
        self_padding = decoder_attention_mask.bool() if decoder_attention_mask is not None else None
        context_padding = attention_mask.bool() if attention_mask is not None else None
        for block in self.decoder_blocks:
            y = block(y, None, self_padding, bias, encoder_output, context_padding)
        if self.decoder_norm is not None:
            y = self.drop(self.decoder_norm(y))
        return y

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


@torch.no_grad()
def _t5_init(model: nn.Module, cfg: ModelConfig) -> None:
    """T5's initialization (Mesh TensorFlow, as transformers reproduces it), which its unscaled attention
    logits and d_model^-0.5 head rescale rely on: unit-variance token embeddings, an untied head at d_model^-0.5, and each
    projection with std fan_in^-0.5, the query's further divided by sqrt(head_dim) (the 1/sqrt(d) the
    attention leaves out); relative-position tables d_model^-0.5.

    With the generic normal(0.02) of `init_weights` instead, a tiny T5's attention logits start near zero,
    its decoder barely reads the encoder (logits for two different inputs differed by 1e-4), and fine-tuning
    on a 10-word mapping stalled at a constant answer where this init learns it in ~100 steps."""
    d, dkv, heads = cfg.hidden_size, cfg.head_dim, cfg.num_heads
    fan_in = {
        "q_proj": (d * dkv) ** -0.5,
        "k_proj": d**-0.5,
        "v_proj": d**-0.5,
        "o_proj": (heads * dkv) ** -0.5,
        "gate_proj": d**-0.5,
        "up_proj": d**-0.5,
        "down_proj": cfg.ffn_size**-0.5,
        # Untied head (v1.1): d_model^-0.5 keeps the initial logits at unit scale, as the tied head's rescale
        # does (transformers draws it with std 1.0, logits ~sqrt(d_model) at init).
        "lm_head": d**-0.5,
    }
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and leaf in fan_in:
            nn.init.normal_(module.weight, mean=0.0, std=fan_in[leaf])
        elif isinstance(module, nn.Embedding):
            std = (
                d**-0.5
                if isinstance(model.get_submodule(name.rsplit(".", 1)[0]), RelativePositionBias)
                else 1.0
            )
            nn.init.normal_(module.weight, mean=0.0, std=std)
