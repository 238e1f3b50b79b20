"""SpanBERT (Joshi et al. 2020): BERT trained on span masking with the span-boundary objective (SBO, §3.2).

The network is BERT (same names, so it exports to BertForMaskedLM unchanged) plus the SBO head. Each
masked token x_i of the span s..e is predicted, besides the MLM head, from the encoder outputs just outside
the span and a learned embedding of its position in the span:

    h0 = [x_{s-1}; x_{e+1}; p_{i-s+1}]
    h1 = LayerNorm(GELU(W1 h0))
    y  = LayerNorm(GELU(W2 h1))

and y is projected onto the vocabulary with the token embedding (tied) plus its own bias. The pretraining
loss is MLM + SBO, each the mean cross-entropy over the masked tokens; both are logged (`mlm_loss`,
`sbo_loss`). The batch comes from `data_pipeline.objectives.span_masking` (`span_left`, `span_right`,
`span_position`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from parallel.layers import LayerFactory
from pretrain.config import ModelConfig
from pretrain.losses import IGNORE_INDEX
from pretrain.models.bert import BERT
from pretrain.models.blocks import init_weights, make_norm

# Rows of the in-span position table. Spans are at most 10 words; a word of many pieces can make a span
# longer in tokens, and positions past the table share its last row.
MAX_SPAN_POSITIONS = 32


class SpanBERT(BERT):
    def __init__(self, cfg: ModelConfig, layers: LayerFactory | None = None):
        super().__init__(cfg, layers)
        h = cfg.hidden_size
        self.sbo_position = nn.Embedding(MAX_SPAN_POSITIONS, h)
        self.sbo_dense1 = nn.Linear(3 * h, h)
        self.sbo_norm1 = make_norm(cfg)
        self.sbo_dense2 = nn.Linear(h, h)
        self.sbo_norm2 = make_norm(cfg)
        self.sbo_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        head = nn.ModuleList(
            [self.sbo_position, self.sbo_dense1, self.sbo_norm1, self.sbo_dense2, self.sbo_norm2]
        )
        init_weights(head, cfg)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        **span_targets: torch.Tensor,
    ) -> torch.Tensor:
        """-> MLM logits (B, T, V); the span arrays of a batch are accepted and unused (evaluation)."""
        return super().forward(input_ids, attention_mask, token_type_ids)

    def _vocab_logits(self, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        head = self.embed if self.lm_head is None else self.lm_head
        weight: torch.Tensor = head.weight  # type: ignore[assignment]
        if weight.shape[0] != self.config.vocab_size:
            raise NotImplementedError(
                "SpanBERT's span-boundary head with a vocab split by tensor parallelism"
            )
        return F.linear(h, weight, bias)

    def sbo_hidden(
        self,
        hidden: torch.Tensor,
        rows: torch.Tensor,
        left: torch.Tensor,
        right: torch.Tensor,
        offset: torch.Tensor,
    ) -> torch.Tensor:
        """hidden: (B, T, C); rows, left, right, offset: (K,) -> SBO representations (K, C)."""
        pos = self.sbo_position(offset.clamp(max=MAX_SPAN_POSITIONS - 1))
        h0 = torch.cat([hidden[rows, left], hidden[rows, right], pos], dim=-1)  # (K, 3C)
        h1 = self.sbo_norm1(F.gelu(self.sbo_dense1(h0)))
        return self.sbo_norm2(F.gelu(self.sbo_dense2(h1)))

    def pretraining_loss(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        labels = batch["labels"]  # (B, T)
        hidden = self.encode(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))
        rows, cols = (labels != IGNORE_INDEX).nonzero(as_tuple=True)  # (K,) masked positions
        target = labels[rows, cols]
        if len(target) == 0:  # nothing masked: both losses are 0, with gradients of the right shapes
            zero = hidden.sum() * 0.0
            return zero, {"mlm_loss": zero.detach(), "sbo_loss": zero.detach()}
        mlm_h = self.mlm_norm(F.gelu(self.mlm_dense(hidden[rows, cols])))  # (K, C)
        mlm_loss = F.cross_entropy(self._vocab_logits(mlm_h, self.mlm_bias).float(), target)
        sbo_h = self.sbo_hidden(
            hidden,
            rows,
            batch["span_left"][rows, cols],
            batch["span_right"][rows, cols],
            batch["span_position"][rows, cols],
        )
        sbo_loss = F.cross_entropy(self._vocab_logits(sbo_h, self.sbo_bias).float(), target)
        return mlm_loss + sbo_loss, {"mlm_loss": mlm_loss.detach(), "sbo_loss": sbo_loss.detach()}


def build_spanbert(cfg: ModelConfig, layers: LayerFactory | None = None) -> nn.Module:
    if cfg.family != "bert":
        raise ValueError(
            f"model.objective='span_mlm' needs model.family='bert' (SpanBERT is BERT); got {cfg.family!r}"
        )
    return SpanBERT(cfg, layers)
