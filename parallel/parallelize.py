"""The one place a plain model becomes a parallel, engine-wrapped one. Order:

1. tensor-parallel plan (`parallel.tensor_plan.apply_tensor_parallel`: shards the built model in place;
   nothing to do at tp=1),
2. activation checkpointing (`full`: each Transformer block of `model.*.blocks`; `selective`: each
   attention core), replaying the TP RNG stream on recompute,
   then torch.compile of each block (`train.compile=blocks`),
3. the training wrapper (loss) and the optimizer, built on the final, sharded parameters,
4. the DeepSpeed wrap (`deepspeed.initialize`): data parallelism, ZeRO, mixed precision, accumulation;
   with tp > 1 the topology is passed as `mpu=` so gradients are averaged over dp only; with pp > 1 the
   model becomes a DeepSpeed PipelineModule instead (`parallel.pipeline`: layers, tied embedding, loss).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

ACTIVATION_CHECKPOINTING = ("none", "full", "selective")


def tracker_restoring_context(tracker: Any) -> Callable[[], tuple[Any, Any]]:
    """`context_fn` for torch.utils.checkpoint that makes a recompute replay the tensor-parallel RNG
    stream too. Checkpointing saves and restores the default generator, but a block's attention dropout
    draws from the tracker's TP stream (`TPRngTracker.fork`), which has moved on by the time backward
    recomputes the block: without this, the recomputed dropout masks would differ from the forward's and
    the gradients would be wrong (Megatron's CheckpointFunction saves its CUDA RNG tracker likewise).
    Forward: remember the tracker's states. Recompute: run on those states, then put back the current
    ones, so the stream continues as if nothing had been recomputed."""

    def context_fn() -> tuple[Any, Any]:
        saved: dict[str, Any] = {}

        @contextlib.contextmanager
        def forward() -> Iterator[None]:
            saved.update(tracker.state_dict())
            yield

        @contextlib.contextmanager
        def recompute() -> Iterator[None]:
            current = tracker.state_dict()
            tracker.load_state_dict(saved)
            try:
                yield
            finally:
                tracker.load_state_dict(current)

        return forward(), recompute()

    return context_fn


def apply_activation_checkpointing(model: nn.Module, mode: str = "full", rng_tracker: Any = None) -> int:
    """Recompute activations in the backward pass instead of keeping them. Returns the modules wrapped.

    `full`: every module held in a ModuleList named `blocks`, `encoder_blocks` or `decoder_blocks` (each
    Transformer block keeps only its input).
    `selective` (Korthikanti et al. 2022): only each attention's core (`attn.core`, `cross_attn.core`:
    scores, softmax, dropout and the product with v), whose activations grow with the square of the
    sequence while costing few FLOPs to recompute. State-dict keys are unchanged (the wrapper strips its
    prefix). With tensor parallelism pass the RNG tracker so recomputed dropout replays the TP stream."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    if mode not in ACTIVATION_CHECKPOINTING:
        raise ValueError(
            f"parallel.activation_checkpointing={mode!r}: must be one of {ACTIVATION_CHECKPOINTING}"
        )
    if mode == "none":
        return 0
    kwargs: dict[str, Any] = {"context_fn": tracker_restoring_context(rng_tracker)} if rng_tracker else {}
    wrapped = 0
    if mode == "full":
        for blocks, i in transformer_blocks(model):
            blocks[i] = checkpoint_wrapper(blocks[i], **kwargs)
            wrapped += 1
        return wrapped
    for name, module in list(model.named_modules()):  # selective
        if name.rsplit(".", 1)[-1] in ("attn", "cross_attn"):
            core = getattr(module, "core", None)
            if isinstance(core, nn.Module):
                module.core = checkpoint_wrapper(core, **kwargs)
                wrapped += 1
    return wrapped


COMPILE = ("none", "blocks")
RECOMPILE_LIMIT = 32


def compile_counts() -> dict[str, int]:
    """This process's TorchDynamo totals so far (a run reports the difference across its training,
    `train.compile`): graphs compiled; graph breaks, each one a resume function compiled after it (Dynamo
    records the reason only for some kinds of break, so the larger of the two counts); frames Dynamo gave
    up on, which run entirely eagerly."""
    from torch._dynamo.utils import counters

    frames = counters["frames"]
    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(max(sum(counters["graph_break"].values()), sum(counters["resumes"].values()))),
        "eager_frames": int(frames["total"] - frames["ok"]),
    }


def transformer_blocks(model: nn.Module) -> Iterator[tuple[nn.ModuleList, int]]:
    """(list, index) of every Transformer block: the entries of each ModuleList named `blocks` (GPT, BERT),
    `encoder_blocks` or `decoder_blocks` (T5/BART) anywhere in the model."""
    for module in list(model.modules()):
        for attr, blocks in list(module.named_children()):
            if attr.endswith("blocks") and isinstance(blocks, nn.ModuleList):
                for i in range(len(blocks)):
                    yield blocks, i


def apply_compile(model: nn.Module, mode: str = "blocks", **options: Any) -> int:
    """torch.compile each Transformer block in place (`nn.Module.compile`: the module's call is compiled,
    so parameter names, the state dict and checkpoints are unchanged). Returns the blocks compiled.

    Regional rather than whole-model: a block's forward is one code object, so blocks of the same shape
    and flags share their compiled graphs (compile time is a block's, not the model's), and the embedding,
    loss and DeepSpeed's engine stay eager. A block under full activation checkpointing is compiled
    inside its checkpoint wrapper, so the recompute replays the compiled code; a selectively checkpointed
    attention core runs eagerly inside the compiled block. Call after tensor
    parallelism and activation checkpointing have rebuilt the blocks, before the engine wraps the model.
    `options` go to torch.compile (tests pass backend="eager", fullgraph=True to prove a block traces
    whole)."""
    if mode not in COMPILE:
        raise ValueError(f"train.compile={mode!r}: must be one of {COMPILE}")
    if mode == "none":
        return 0
    import torch._dynamo
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    # Each distinct call of a block is a variant of the same code objects: encoder and decoder, self- and
    # cross-attention, training and evaluation (dropout and autograd differ). With the Triton kernels as
    # graph breaks, the frames resumed after them count their own variants: a T5 reached 6 (seen on CPU
    # with every kernel forced). Past Dynamo's default limit of 8 a variant would run eagerly, silently.
    dynamo_config = torch._dynamo.config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    compiled = 0
    for blocks, i in transformer_blocks(model):
        block = blocks[i]
        if isinstance(block, CheckpointWrapper):
            block = block._checkpoint_wrapped_module
        for module in block.modules():
            core = getattr(module, "core", None)
            if isinstance(core, CheckpointWrapper):
                # Selective checkpointing: the attention core keeps its own eager checkpoint, one graph
                # break. Traced by Dynamo, a checkpoint accepts only selective-checkpoint policies as its
                # context_fn, not the one that replays the tensor-parallel RNG stream (a TP2 run failed so);
                # the core is a single attention call anyway, with nothing around it to fuse.
                core.forward = torch.compiler.disable(core.forward)  # type: ignore[method-assign]
        block.compile(**options)
        compiled += 1
    return compiled


def parallelize(
    model: nn.Module,
    *,
    topology: Any,
    ds_config: dict[str, Any],
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    wrap: Callable[[nn.Module], nn.Module] | None = None,
    activation_checkpointing: str = "none",
    compile_blocks: str = "none",
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
    apply_activation_checkpointing(model, activation_checkpointing, tracker)
    apply_compile(model, compile_blocks)
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
