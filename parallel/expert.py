"""Expert parallelism for the Switch MoE layers (pretrain/models/moe.py), through DeepSpeed's MoE.

The model is built and initialized whole (every rank holds all experts, exactly the one-process model
for the same seed); `apply_expert_parallel` then gives each MoE layer a DeepSpeed `MoE` with
ep_size = parallel.ep that keeps only this rank's experts, copied from the full layer, and the same
router. DeepSpeed's groups (`deepspeed.utils.groups`, legacy E + D layout at tp = pp = 1):

    world 4, ep 2:  expert-parallel groups [0, 1], [2, 3]      (all-to-all of the routed tokens)
                    expert-data-parallel groups [0, 2], [1, 3] (all-reduce of the expert gradients)
                    data-parallel group [0, 1, 2, 3]           (all-reduce of every other gradient)

Rank r holds experts [j * E/ep, (j + 1) * E/ep) where j is its rank in its expert-parallel group: the
all-to-all sends the j-th block of the (E, capacity, C) dispatch buffer to group rank j. The engine
divides expert gradients by the whole data-parallel size after summing them over the expert-data group,
which is the mean over all ranks' losses because every token's gradient reaches its expert through the
all-to-all's backward. Expert parameters carry `allreduce = False` (DeepSpeed's marker); the optimizer
needs them in their own parameter groups (`parallel.parallelize.param_groups`).

gloo implements `all_to_all_single` on CPU (checked by tests/distributed/test_expert_parallel.py), so the
same code runs on CPU and GPU.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def expert_parallel_rank(ep: int) -> int:
    """This rank's index in its expert-parallel group, creating DeepSpeed's expert groups if needed
    (collective: every rank calls it, in the same order)."""
    from deepspeed.utils import groups

    name = f"ep_size_{ep}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep)
    return groups._get_expert_parallel_rank(name)


@torch.no_grad()
def apply_expert_parallel(model: nn.Module, ep: int) -> int:
    """Keeps this rank's 1/ep of every MoE layer's experts. Returns the number of layers converted."""
    from deepspeed.moe.layer import MoE

    # The model's MoE layers (pretrain.models.moe.SwitchFFN), recognized by shape so that parallel/ does
    # not import pretrain: a DeepSpeed MoE held as `.moe` and a `make_moe` to build its replacement.
    layers: list[Any] = [
        m for m in model.modules() if isinstance(getattr(m, "moe", None), MoE) and hasattr(m, "make_moe")
    ]
    if ep == 1 or not layers:
        return 0
    rank = expert_parallel_rank(ep)
    for layer in layers:
        full = layer.experts()
        if len(full) != layer.num_experts:
            raise RuntimeError(
                f"MoE layer already expert-parallel ({len(full)} of {layer.num_experts} experts)"
            )
        local = layer.num_experts // ep
        mine = full[rank * local : (rank + 1) * local]
        router = layer.router_weight.detach().clone()
        new = layer.make_moe(router.shape[1], mine[0], ep)
        new.deepspeed_moe.gate.wg.weight.copy_(router)  # type: ignore[union-attr,operator]
        for target, source in zip(new.deepspeed_moe.experts.deepspeed_experts, mine, strict=True):  # type: ignore[union-attr,arg-type,call-overload]
            target.load_state_dict(source.state_dict())
        layer.moe = new
    return len(layers)


def is_expert_param(p: torch.Tensor) -> bool:
    """DeepSpeed's marker for expert weights (reduced over the expert-data-parallel group only)."""
    return getattr(p, "allreduce", True) is False
