"""ALBERT's pretraining network (Lan et al. 2020): BERT with a sentence-order prediction head.

The encoder is `BERT` itself, with ALBERT's options set in the model config (factorized embedding
`embedding_size`, cross-layer sharing `share_layers`); objective `sop` (data_pipeline/objectives/
sentence_order.py) builds this subclass, which adds a two-way classifier on the pooled <cls> state and
trains MLM cross-entropy + SOP cross-entropy, each a mean over its own items (ALBERT §4.1 sums the two).
The state dict is BERT's plus `sop_head.*`, so `pretrain export` writes AlbertForPreTraining.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from parallel.layers import LayerFactory
from pretrain.config import ModelConfig
from pretrain.losses import token_cross_entropy
from pretrain.models.bert import BERT


class ALBERTForPretraining(BERT):
    def __init__(self, cfg: ModelConfig, layers: LayerFactory | None = None):
        super().__init__(cfg, layers)
        self.sop_head = nn.Linear(cfg.hidden_size, 2)
        nn.init.normal_(self.sop_head.weight, mean=0.0, std=cfg.init_std)
        nn.init.zeros_(self.sop_head.bias)
        self.head_drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        sop_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """-> MLM logits (B, T, V). `sop_labels` is accepted and unused, so a batch of objective sop can be
        passed as it is (`pretrain eval` then reports the masked-token perplexity)."""
        return self.mlm_logits(self.encode(input_ids, attention_mask, token_type_ids))

    def heads(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (MLM logits (B, T, V), sentence-order logits (B, 2); class 1 = segments swapped)."""
        hidden = self.encode(input_ids, attention_mask, token_type_ids)  # (B, T, C)
        return self.mlm_logits(hidden), self.sop_head(self.head_drop(self.pooled(hidden)))

    def pretraining_loss(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if "sop_labels" not in batch:
            raise KeyError(
                "ALBERT's pretraining loss needs the batch key 'sop_labels': train it with model.objective=sop"
            )
        mlm, sop = self.heads(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))
        mlm_loss = token_cross_entropy(mlm, batch["labels"])
        labels = batch["sop_labels"].long()  # (B,)
        sop_loss = F.cross_entropy(sop.float(), labels)
        accuracy = (sop.argmax(-1) == labels).float().mean()
        metrics = {"mlm_loss": mlm_loss.detach(), "sop_loss": sop_loss.detach(), "sop_accuracy": accuracy}
        return mlm_loss + sop_loss, metrics


def build_sop_model(cfg: ModelConfig, layers: LayerFactory | None = None) -> nn.Module:
    if cfg.family != "bert":
        raise ValueError(
            f"model.objective='sop' with model.family={cfg.family!r}: sentence-order prediction needs "
            "an encoder (family bert)"
        )
    return ALBERTForPretraining(cfg, layers)
