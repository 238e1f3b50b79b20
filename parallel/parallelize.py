"""The one place a plain model becomes a parallel, engine-wrapped one. Order:

1. tensor-parallel plan (layers already come from `parallel.layers`; nothing to do at tp=1),
2. activation checkpointing of each Transformer block (applied to the module tree `model.*.blocks`),
3. the DeepSpeed wrap (`deepspeed.initialize`): data parallelism, ZeRO, mixed precision, accumulation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Wraps every module held in a `blocks` ModuleList so its activations are recomputed in backward.
    Returns the number of blocks wrapped. State-dict keys are unchanged (the wrapper strips its prefix)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    wrapped = 0
    for module in list(model.modules()):
        blocks = getattr(module, "blocks", None)
        if isinstance(blocks, nn.ModuleList):
            for i, block in enumerate(blocks):
                blocks[i] = checkpoint_wrapper(block)
                wrapped += 1
    return wrapped


def parallelize(
    model: nn.Module,
    *,
    optimizer: torch.optim.Optimizer,
    ds_config: dict[str, Any],
    activation_checkpointing: bool = False,
) -> Any:
    """Returns the DeepSpeed engine around `model`."""
    import deepspeed

    if activation_checkpointing:
        apply_activation_checkpointing(model)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config, dist_init_required=False
    )
    return engine


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices and embeddings; never biases or norm gains (1-D tensors).

    `wd_mult` is read by megatron-core's OptimizerParamScheduler when it sets each group's weight decay."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "wd_mult": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0},
    ]
