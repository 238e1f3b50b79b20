"""The one place a plain model becomes a parallel, engine-wrapped one. Order:

1. tensor-parallel plan (`parallel.tensor_plan.apply_tensor_parallel`: shards the built model in place;
   nothing to do at tp=1),
2. activation checkpointing of each Transformer block (applied to the module tree `model.*.blocks`),
3. the training wrapper (loss) and the optimizer, built on the final, sharded parameters,
4. the DeepSpeed wrap (`deepspeed.initialize`): data parallelism, ZeRO, mixed precision, accumulation;
   with tp > 1 the topology is passed as `mpu=` so gradients are averaged over dp only; with pp > 1 the
   model becomes a DeepSpeed PipelineModule instead (`parallel.pipeline`: layers, tied embedding, loss).
"""

from __future__ import annotations

from collections.abc import Callable
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
    topology: Any,
    ds_config: dict[str, Any],
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    wrap: Callable[[nn.Module], nn.Module] | None = None,
    activation_checkpointing: bool = False,
    sequence_parallel: bool = False,
    seed: int = 0,
    expert_parallel: int = 1,
    pipeline_partition: str = "parameters",
    pipeline_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[Any, Any]:
    """Returns (the DeepSpeed engine, the tensor-parallel RNG tracker or None)."""
    import deepspeed

    tracker = None
    tp = topology.dims.tp
    if tp > 1:
        from parallel.tensor import TPRngTracker
        from parallel.tensor_plan import apply_tensor_parallel

        tracker = TPRngTracker()
        tracker.seed_tensor_parallel(seed, topology.tp_rank)
        apply_tensor_parallel(
            model,
            group=topology.tp_group,
            tp_size=tp,
            tp_rank=topology.tp_rank,
            sequence_parallel=sequence_parallel,
            rng_tracker=tracker,
        )
    if expert_parallel > 1:  # Switch MoE layers keep this rank's slice of the experts (parallel/expert.py)
        from parallel.expert import apply_expert_parallel

        apply_expert_parallel(model, expert_parallel)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if topology.dims.pp > 1:
        # Pipeline stages (parallel/pipeline.py) take the sharded, checkpoint-wrapped modules as layers;
        # `pipeline_loss(logits, labels)` runs on the last stage, so `wrap` is not used.
        from parallel.pipeline import pipeline_engine

        if pipeline_loss is None:
            raise ValueError("pipeline parallelism (pp > 1) needs pipeline_loss(logits, labels)")
        engine = pipeline_engine(
            model,
            topology=topology,
            ds_config=ds_config,
            make_optimizer=make_optimizer,
            loss_fn=pipeline_loss,
            partition_method=pipeline_partition,
        )
        return engine, tracker
    module = wrap(model) if wrap is not None else model
    optimizer = make_optimizer(module)
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        config=ds_config,
        dist_init_required=False,
        mpu=topology.as_mpu() if tp > 1 else None,
    )
    return engine, tracker


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices and embeddings; never biases or norm gains (1-D tensors).

    `wd_mult` is read by megatron-core's OptimizerParamScheduler when it sets each group's weight decay.
    MoE expert weights (DeepSpeed's `allreduce=False` marker) go into groups of their own marked `moe`, as
    DeepSpeed's engine and ZeRO optimizers require (`split_params_into_different_moe_groups_for_optimizer`)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups: list[dict[str, Any]] = [
        {"params": decay, "weight_decay": weight_decay, "wd_mult": 1.0, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0, "name": "no_decay"},
    ]
    from parallel.expert import is_expert_param

    if any(is_expert_param(p) for g in groups for p in g["params"]):
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups = [g for g in split_params_into_different_moe_groups_for_optimizer(groups) if g["params"]]
    return groups
