"""Switch Transformer feed-forward layer (Fedus et al. 2021): each token goes to one expert MLP.

The layer is DeepSpeed's `deepspeed.moe.layer.MoE` with Tandem's own `MLP` as the expert, configured for
Switch routing:

- top-1 gating (k=1): router logits = x @ W_r in fp32 whatever the training precision (DeepSpeed's
  `TopKGate` casts input and weight to fp32), p = softmax(logits), expert = argmax p, and the expert's
  output is scaled by that token's p (so the router gets a gradient);
- capacity = max(ceil(capacity_factor * tokens / experts), min_capacity) per expert and per micro batch
  of one rank (`capacity_factor` in training, `eval_capacity_factor` in eval); min_capacity is 0 here, so
  the capacity is exactly the paper's;
- drop_tokens=True: tokens over capacity get a zero expert output, i.e. they pass through the block's
  residual connection unchanged. use_rts=False (no random token selection, deterministic): which of an
  expert's tokens are kept is DeepSpeed's `topk` over the one-hot routing mask;
- the load-balancing loss N * sum_i f_i * P_i (f_i: fraction of the tokens routed to expert i before
  dropping, P_i: mean router probability of expert i) is DeepSpeed's `l_aux`; the trainer adds
  `moe_aux_loss_coef` (alpha = 0.01) times its sum over layers to the loss;
- the router z-loss mean(logsumexp(logits)^2) (Zoph et al. 2022), optional (`router_z_loss_coef`).

Expert parallelism: the model is built with all experts on every rank (ep_size=1, so the initialization
equals the one-process model's for the same seed); `parallel.expert.apply_expert_parallel` then replaces
each layer's DeepSpeed MoE by one with ep_size=parallel.ep holding this rank's slice of the experts, and
DeepSpeed's all-to-all (gloo supports all_to_all_single on CPU) exchanges the tokens.

After every forward, `stats` holds this layer's losses and routing counts; `moe_loss_and_metrics` sums
them over a model for `pretrain.losses.LanguageModelLoss`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from parallel.layers import LayerFactory
from pretrain.config import ModelConfig


@dataclass
class RoutingStats:
    """One MoE layer's last forward: losses (with grad) and counts (no grad)."""

    aux_loss: torch.Tensor  # N * sum_i f_i * P_i (1.0 when perfectly balanced)
    z_loss: torch.Tensor | None  # mean(logsumexp(logits)^2), when router_z_loss_coef > 0
    counts: torch.Tensor  # (E,) tokens routed to each expert, before capacity dropping
    tokens: int
    capacity: int

    @property
    def dropped(self) -> int:
        """Tokens over capacity: expert i keeps min(count_i, capacity) of its count_i tokens."""
        return int((self.counts - self.capacity).clamp(min=0).sum())


def expert_capacity(tokens: int, num_experts: int, capacity_factor: float, min_capacity: int = 0) -> int:
    """DeepSpeed's rule (`deepspeed.moe.sharded_moe._capacity`): ceil(tokens / experts * factor)."""
    return max(math.ceil(tokens / num_experts * capacity_factor), min_capacity)


class SwitchFFN(nn.Module):
    """Drop-in replacement for the block's MLP: x (B, T, C) -> (B, T, C)."""

    min_capacity = 0

    def __init__(self, cfg: ModelConfig, layers: LayerFactory, *, ep_size: int = 1):
        super().__init__()
        from pretrain.models.blocks import MLP

        self.num_experts = cfg.num_experts
        self.capacity_factor, self.eval_capacity_factor = cfg.capacity_factor, cfg.eval_capacity_factor
        self.z_loss = cfg.router_z_loss_coef > 0
        self.moe = self.make_moe(cfg.hidden_size, MLP(cfg, layers), ep_size)
        self.stats: RoutingStats | None = None

    def make_moe(self, hidden_size: int, expert: nn.Module, ep_size: int) -> nn.Module:
        from deepspeed.moe.layer import MoE

        return MoE(
            hidden_size,
            expert,
            num_experts=self.num_experts,
            ep_size=ep_size,
            k=1,
            capacity_factor=self.capacity_factor,
            eval_capacity_factor=self.eval_capacity_factor,
            min_capacity=self.min_capacity,
            noisy_gate_policy=None,
            drop_tokens=True,
            use_rts=False,
        )

    @property
    def router_weight(self) -> torch.Tensor:
        """(E, C): the router's logits are x @ W^T."""
        return self.moe.deepspeed_moe.gate.wg.weight  # type: ignore[union-attr,return-value]

    def experts(self) -> list[nn.Module]:
        """This rank's experts (all of them unless expert-parallel)."""
        return list(self.moe.deepspeed_moe.experts.deepspeed_experts)  # type: ignore[union-attr,arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, aux, counts = self.moe(x)
        tokens = x.shape[0] * x.shape[1]
        z = None
        if self.z_loss:
            logits = F.linear(x.reshape(tokens, -1).float(), self.router_weight.float())  # (S, E) in fp32
            z = torch.logsumexp(logits, dim=-1).pow(2).mean()
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        self.stats = RoutingStats(
            aux_loss=aux,
            z_loss=z,
            counts=counts.detach(),
            tokens=tokens,
            capacity=expert_capacity(tokens, self.num_experts, factor, self.min_capacity),
        )
        return out


def moe_layers(model: nn.Module) -> list[SwitchFFN]:
    return [m for m in model.modules() if isinstance(m, SwitchFFN)]


def moe_loss_and_metrics(
    layers: list[SwitchFFN], cfg: ModelConfig
) -> tuple[torch.Tensor, dict[str, float]] | None:
    """alpha * sum_l aux_l + beta * sum_l z_l over the layers' last forward, and the routing metrics:

    moe_aux_loss: mean over layers of N * sum_i f_i * P_i (1.0 = balanced; alpha times the sum is what
    the loss adds); router_z_loss (when enabled); expert_utilization: fraction of (layer, expert) pairs
    that received at least one token; expert_load_max: the busiest expert's token count over the mean,
    averaged over layers (1.0 = balanced); capacity_overflow: fraction of routed tokens dropped."""
    stats = [s for s in (layer.stats for layer in layers) if s is not None]
    if not stats:
        return None
    aux = torch.stack([s.aux_loss for s in stats])
    loss = cfg.moe_aux_loss_coef * aux.sum()
    metrics = {"moe_aux_loss": float(aux.detach().mean())}
    zs = [s.z_loss for s in stats if s.z_loss is not None]
    if zs:
        z = torch.stack(zs)
        loss = loss + cfg.router_z_loss_coef * z.sum()
        metrics["router_z_loss"] = float(z.detach().mean())
    counts = torch.stack([s.counts.float() for s in stats])  # (L, E)
    metrics["expert_utilization"] = float((counts > 0).float().mean())
    metrics["expert_load_max"] = float((counts.max(dim=1).values / counts.mean(dim=1)).mean())
    metrics["capacity_overflow"] = sum(s.dropped for s in stats) / sum(s.tokens for s in stats)
    return loss, metrics
