"""Training losses: the token cross-entropy every objective starts from, and the hook through which a model
with its own pretraining loss (auxiliary heads, two networks, routed experts) takes over.

A model may define `pretraining_loss(batch) -> (loss, metrics)`: `batch` is the objective's dict of tensors
(labels included), `loss` the scalar to minimize, `metrics` a dict of scalar tensors (component losses,
accuracies, expert utilization) that the training loop averages over each log interval and writes to
metrics.jsonl next to `loss`. Without it, the loss is the cross-entropy of `model(**inputs)` against
`batch["labels"]`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def token_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, *, tp_group: Any = None, tp_size: int = 1
) -> torch.Tensor:
    """Mean cross-entropy over the labels that are not IGNORE_INDEX. logits: (..., V), or (..., V/tp) when
    the vocabulary is split over a tensor-parallel group.

    Computed in fp32 whatever the training precision: bf16 logits lose the small probability differences
    that the loss averages over. A micro-batch with no label at all (a masked-LM draw that masked nothing, a
    batch of padding) gives 0 with zero gradients, as the chunked loss does, not F.cross_entropy's NaN
    (0/0), which the step guard would take for a divergence and skip the whole step with the other
    micro-batches' data in it. Like any micro-batch it still counts once in the step's mean over
    micro-batches: the step's gradient and logged loss are the other k-1 micro-batches' sum over k."""
    if tp_size > 1:
        from parallel.tensor import vocab_parallel_cross_entropy

        return vocab_parallel_cross_entropy(logits.float(), labels, tp_group, ignore_index=IGNORE_INDEX)
    labels = labels.flatten()
    total = F.cross_entropy(logits.float().flatten(0, -2), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def fused_token_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    chunk_size: int,
    z_loss: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_cross_entropy(F.linear(hidden, weight, bias), labels)` with the output projection fused into
    the loss, `chunk_size` tokens at a time (pretrain.kernels.linear_cross_entropy: the (tokens x vocab) fp32
    logits never exist), plus `z_loss` times the z-loss (see `z_loss` below) of the same logits. Only the
    labelled positions reach the projection, which is exact (the others add neither loss nor gradient) and
    saves most of the head's FLOPs for masked LM (~15% of tokens labelled).
    hidden: (..., C); weight: (V, C); bias: (V,) or None; labels: (...). Returns (loss, the z-loss metric:
    mean log(Z)^2 before the coefficient, not differentiable)."""
    from pretrain.kernels.cross_entropy import linear_cross_entropy

    hidden2, labels2 = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    keep = (labels2 != IGNORE_INDEX).nonzero().squeeze(1)
    if keep.numel() < labels2.numel():
        hidden2, labels2 = hidden2.index_select(0, keep), labels2.index_select(0, keep)
    return linear_cross_entropy(  # type: ignore[return-value]
        hidden2, weight, labels2, bias=bias, chunk_size=chunk_size, z_loss=z_loss, return_z=True
    )


def add_moe_losses(model: nn.Module, loss: torch.Tensor, metrics: dict[str, float]) -> torch.Tensor:
    """loss + the Switch MoE layers' auxiliary losses from the forward just run (load balancing, router
    z-loss; pretrain/models/moe.py); their routing metrics are added to `metrics`."""
    cfg = getattr(model, "config", None)
    if not getattr(cfg, "num_experts", 0):
        return loss
    from pretrain.models.moe import moe_layers, moe_loss_and_metrics

    extra = moe_loss_and_metrics(moe_layers(model), cfg)  # type: ignore[arg-type]
    if extra is None:
        return loss
    metrics.update(extra[1])
    return loss + extra[0]


class LanguageModelLoss(nn.Module):
    """Wraps a model so the engine's forward takes a batch dict and returns the scalar training loss.

    After each forward, `metrics` holds the model's extra scalars (empty for plain cross-entropy)."""

    def __init__(self, model: nn.Module, *, tp_group: Any = None, tp_size: int = 1, loss_chunk_size: int = 0):
        super().__init__()
        self.model = model
        self.tp_group, self.tp_size = tp_group, tp_size
        # > 0: the model's output projection and the cross-entropy fused (train.loss_chunk_size); the model
        # must define lm_head_inputs (GPT, BERT, T5/BART do).
        self.loss_chunk_size = loss_chunk_size
        if loss_chunk_size > 0 and not hasattr(model, "lm_head_inputs"):
            raise ValueError(
                f"train.loss_chunk_size={loss_chunk_size}: {type(model).__name__} does not expose its output "
                "projection (lm_head_inputs); use 0"
            )
        self.metrics: dict[str, float] = {}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # The loader yields CPU tensors; on a GPU the batch follows the model (the engine does not move it).
        device = next(self.model.parameters()).device
        if device.type != "cpu":
            batch = {
                k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
            }
        custom = getattr(self.model, "pretraining_loss", None)
        if custom is not None:
            loss, metrics = custom(batch)
            self.metrics = {
                k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in metrics.items()
            }
            return loss
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        self.metrics = {}
        # The z-loss is a training regularizer: validation loss stays the cross-entropy.
        z_coef = (
            float(getattr(getattr(self.model, "config", None), "z_loss", 0.0) or 0.0)
            if self.training
            else 0.0
        )
        if self.loss_chunk_size > 0:
            hidden, weight, bias = self.model.lm_head_inputs(**inputs)  # type: ignore[operator]
            loss, z = fused_token_cross_entropy(
                hidden, weight, bias, batch["labels"], chunk_size=self.loss_chunk_size, z_loss=z_coef
            )
        else:
            logits = self.model(**inputs)  # (B, T, V), or (B, T, V/tp) under tensor parallelism
            loss = token_cross_entropy(logits, batch["labels"], tp_group=self.tp_group, tp_size=self.tp_size)
            if z_coef > 0:
                z = z_loss(logits, batch["labels"], tp_size=self.tp_size)
                loss = loss + z_coef * z
        if z_coef > 0:
            self.metrics = {"z_loss": float(z.detach())}
        if self.training:  # like the z-loss, a training regularizer: validation loss stays the CE
            loss = add_moe_losses(self.model, loss, self.metrics)
        return loss


def z_loss(logits: torch.Tensor, labels: torch.Tensor, *, tp_size: int = 1) -> torch.Tensor:
    """mean(log(Z)^2) over the labelled tokens, Z = sum(exp(logits)) the softmax normalizer (PaLM,
    Chowdhery et al. 2022, sec. 5: it keeps log Z near 0 for stability). The training loss adds
    model.z_loss times this; the metric `z_loss` is this mean before the coefficient."""
    if tp_size > 1:
        raise NotImplementedError("model.z_loss with a vocabulary split over tensor-parallel ranks")
    log_z = torch.logsumexp(logits.float(), dim=-1)  # (B, T)
    keep = labels != IGNORE_INDEX
    return (log_z.square() * keep).sum() / keep.sum().clamp(min=1)
