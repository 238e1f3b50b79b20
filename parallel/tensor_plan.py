"""The tensor-parallel plan: converts a built, initialized full model in place, by module name.

As in torchtitan's `parallelize.py`, the model file knows nothing of the plan: its linears and
embeddings are swapped for the Megatron-style layers of `parallel/tensor.py` by name, and the few
places where activations enter or leave the parallel regions outside any linear get forward hooks:

* `attn|cross_attn.{q,k,v}_proj`, `mlp.{gate,up}_proj` -> ColumnParallelLinear (heads split in
  contiguous groups: rank r owns query heads r·H/tp.. and kv heads r·Hkv/tp.., which is exactly the
  grouped-query mapping head h -> kv head h // (H/Hkv) restricted to rank r);
  `o_proj`, `down_proj` -> RowParallelLinear (Shoeybi et al. 2019: one all-reduce per sub-block).
* `embed` -> VocabParallelEmbedding. Its `.weight` is the local (V/tp, C) shard, so the models' own
  tied head `F.linear(x, self.embed.weight)` computes this rank's vocab slice of the logits; an untied
  `lm_head` and BERT's `mlm_bias` are sliced the same way. The loss is then
  `vocab_parallel_cross_entropy`, which never gathers (B, T, V).
* The LM head's input gets `copy_to_tp_region` (identity forward, all-reduce backward: each rank's
  gradient covers only its vocab slice) through a forward hook on the module that produces it
  (`final_norm`, `mlm_norm`, `decoder_norm`).
* T5's relative-position tables (buckets, H) are split by heads like the attention they bias.
* Sequence parallelism (Korthikanti et al. 2022): the first block of each stack gets its input
  scattered along the sequence by a forward pre-hook; column linears all-gather / row linears
  reduce-scatter; the LM head's input is all-gathered again; replicated parameters used on sequence
  shards (norms, row-parallel biases, BERT's MLM transform) get their gradients summed over the TP
  group by a hook. The embeddings stay replicated (all-reduce) because the models add positions with
  the full sequence length before the first block.

Copying slices of the already-initialized full weights makes the sharded model the one-process model
exactly, for any initialization scheme. (Building the full model first costs its memory on every rank;
building sharded directly is the LayerFactory's job and is not done yet.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from parallel.tensor import (
    ColumnParallelLinear,
    Group,
    RowParallelLinear,
    TPRngTracker,
    VocabParallelEmbedding,
    copy_to_tp_region,
    gather_from_sequence_parallel_region,
    is_tensor_parallel,
    mark_sequence_parallel,
    mark_tensor_parallel,
    scatter_to_sequence_parallel_region,
    shard,
    tp_world,
)


@dataclass(frozen=True)
class FamilyPlan:
    """Where each family's activations cross TP region boundaries outside the linears."""

    head_input: str  # the module whose output is the LM head's input
    sequence_entries: tuple[str, ...]  # blocks whose first positional input is split along the sequence
    sequence_region: tuple[str, ...]  # name prefixes of modules that run on sequence shards
    bias_tables: tuple[str, ...] = ()  # (buckets, H) relative-position tables, split by heads


PLANS: dict[str, FamilyPlan] = {
    "gpt": FamilyPlan("final_norm", ("blocks.0",), ("blocks.", "final_norm.")),
    "bert": FamilyPlan("mlm_norm", ("blocks.0",), ("blocks.", "final_norm.", "mlm_dense.", "mlm_norm.")),
    "t5": FamilyPlan(
        "decoder_norm",
        ("encoder_blocks.0", "decoder_blocks.0"),
        ("encoder_blocks.", "decoder_blocks.", "encoder_norm.", "decoder_norm."),
        ("encoder_bias.table", "decoder_bias.table"),
    ),
}

# Parameters whose dim 0 is the vocabulary: split by `apply_tensor_parallel` below (VocabParallelEmbedding, an
# untied VocabParallelHead, BERT's MLM bias) and padded by model.make_vocab_size_divisible_by. Checkpoint
# consolidation and resharding (pretrain/consolidate.py, pretrain/reshard.py) read the split rules from here.
VOCAB_PARALLEL_PARAMETERS = ("embed.weight", "lm_head.weight", "lm_head.bias", "mlm_bias")

_COLUMN = re.compile(r"(^|\.)((attn|cross_attn)\.(q_proj|k_proj|v_proj)|mlp\.(gate_proj|up_proj))$")
_QKV = re.compile(r"(^|\.)(attn|cross_attn)\.(q_proj|k_proj|v_proj)$")
_ROW = re.compile(r"(^|\.)((attn|cross_attn)\.o_proj|mlp\.down_proj)$")
_ATTENTION = re.compile(r"(^|\.)(attn|cross_attn)$")
_BLOCK_DROPOUT = re.compile(r"(^|\.)(blocks|encoder_blocks|decoder_blocks)\.\d+\.drop$")


class VocabParallelHead(nn.Module):
    """An untied LM head holding this rank's (V/tp, C) rows. Its input is already in the TP region (the
    plan's hook on the head input applied `copy_to_tp_region`), so the forward is a bare local matmul;
    the models that read `lm_head.weight` directly get the same shard."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None
        mark_tensor_parallel(self.weight, 0)
        if self.bias is not None:
            mark_tensor_parallel(self.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)  # (B, T, V/tp)


def pad_vocab_size(vocab_size: int, multiple: int) -> int:
    """`vocab_size` rounded up to a multiple of `multiple` (Megatron-LM / GPT-NeoX
    `make_vocab_size_divisible_by`). Deliberately independent of the TP degree, unlike Megatron's
    multiple x tp: a TP run and a one-process run with the same setting then build the same model."""
    if multiple < 1:
        raise ValueError(f"model.make_vocab_size_divisible_by={multiple}: must be >= 1")
    return -(-vocab_size // multiple) * multiple


def tensor_parallel_problems(cfg: Any, tp_size: int) -> list[str]:
    """Every reason `cfg` (a ModelConfig) cannot be split `tp_size` ways; empty when it can."""
    if tp_size == 1:
        return []
    problems = []
    if cfg.family not in PLANS:
        problems.append(f"model.family={cfg.family!r}: no tensor-parallel plan (have {', '.join(PLANS)})")
    checks = (
        ("model.num_heads", cfg.num_heads, "attention heads are split across TP ranks"),
        ("model.num_kv_heads", cfg.kv_heads, "key/value heads are split across TP ranks"),
        ("model.ffn_hidden_size", cfg.ffn_size, "the MLP hidden dim is split across TP ranks"),
    )
    for name, value, why in checks:
        if value % tp_size:
            problems.append(f"{name}={value} is not divisible by parallel.tp={tp_size} ({why})")
    if cfg.vocab_size % tp_size:
        problems.append(
            f"model.vocab_size={cfg.vocab_size} is not divisible by parallel.tp={tp_size} (the vocab is split "
            f"across TP ranks); {_vocab_padding_hint(cfg, tp_size)}"
        )
    return problems


def _vocab_padding_hint(cfg: Any, tp_size: int) -> str:
    """A concrete setting that makes the vocabulary divisible by `tp_size`."""
    import math

    tokens = getattr(cfg, "tokenizer_vocab_size", 0) or cfg.vocab_size
    multiple = math.lcm(getattr(cfg, "make_vocab_size_divisible_by", 1), tp_size)
    return (
        f"pad it with model.make_vocab_size_divisible_by={multiple} and model.vocab_size=0 (the tokenizer's "
        f"{tokens} pieces become {pad_vocab_size(tokens, multiple)} rows), or set model.vocab_size="
        f"{pad_vocab_size(cfg.vocab_size, multiple)}"
    )


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)


def _fork_rng_around(module: nn.Module, tracker: TPRngTracker) -> None:
    """Runs `module` inside the tracker's TP stream (its dropout then differs across TP ranks)."""

    def enter(mod: nn.Module, args: Any) -> None:
        ctx = tracker.fork()
        ctx.__enter__()
        mod._tp_rng_fork = ctx  # type: ignore[assignment]

    def leave(mod: nn.Module, args: Any, out: Any) -> None:
        ctx = mod.__dict__.pop("_tp_rng_fork", None)
        if ctx is not None:
            ctx.__exit__(None, None, None)

    # Under train.compile the hooks run inside a compiled block: they swap generator states, which
    # TorchDynamo cannot rebuild (the fork's entry failed to trace and its frame ran eagerly after a failed
    # attempt), so both run eagerly by design, one graph break each; the graphs around them draw their
    # dropout from whichever stream is current, as the eager modules do.
    enter, leave = torch.compiler.disable(enter), torch.compiler.disable(leave)
    module.register_forward_pre_hook(enter)
    # always_call: leave the fork also when the forward is cut short by an exception. Activation
    # checkpointing's recompute stops early that way, inside the last module that saved a tensor (under
    # sequence parallelism a block's forked residual dropout). A fork left open was exited only when the
    # next forward replaced it, by the garbage collector, which then restored the default generator state
    # of the aborted recompute inside the new forked region: its dropout masks came from that stale state
    # instead of the TP stream, and the losses differed from a run without checkpointing.
    module.register_forward_hook(leave, always_call=True)


def apply_tensor_parallel(
    model: nn.Module,
    *,
    group: Group,
    tp_size: int,
    tp_rank: int,
    sequence_parallel: bool = False,
    rng_tracker: TPRngTracker | None = None,
) -> nn.Module:
    """Converts a built GPT/BERT/T5 in place to this rank's tensor-parallel shard; returns it.

    Afterwards the model returns this rank's vocab slice of the logits, (B, T, V/tp): compute the loss
    with `parallel.tensor.vocab_parallel_cross_entropy(logits, labels, group)`. Every TP rank must feed
    the same batch. With `rng_tracker` (seeded by `seed_tensor_parallel`), attention (and, under
    sequence parallelism, residual) dropout runs in the per-rank stream."""
    cfg: Any = model.config
    size, rank = tp_world(group)
    problems = tensor_parallel_problems(cfg, tp_size)
    if (size, rank) != (tp_size, tp_rank):
        problems.append(f"tp_size={tp_size}, tp_rank={tp_rank} disagree with the group ({size}, {rank})")
    if problems:
        raise ValueError("cannot apply tensor parallelism: " + "; ".join(problems))
    if tp_size == 1:
        return model
    plan = PLANS[cfg.family]
    sp = sequence_parallel

    def gather_attention_inputs(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        # The models' Attention reads T from its input to reshape q and its output, so under SP it must
        # see the full sequence: gather x (and the cross-attention context) here, not in q/k/v.
        x = gather_from_sequence_parallel_region(args[0], group)  # (B, T/tp, C) -> (B, T, C)
        if kwargs.get("context") is not None:
            kwargs = {**kwargs, "context": gather_from_sequence_parallel_region(kwargs["context"], group)}
        return (x, *args[1:]), kwargs

    for name, module in list(model.named_modules()):
        if _COLUMN.search(name) and isinstance(module, nn.Linear):
            # Under SP the attention's own pre-hook gathers its inputs (see below), once for q, k, v.
            gathered = sp and bool(_QKV.search(name))
            kw = {"input_is_gathered": True} if gathered else {"sequence_parallel": sp}
            _replace(model, name, ColumnParallelLinear.from_linear(module, group, **kw))
        elif _ROW.search(name) and isinstance(module, nn.Linear):
            _replace(model, name, RowParallelLinear.from_linear(module, group, sequence_parallel=sp))
        elif _ATTENTION.search(name):
            module.num_heads //= tp_size  # type: ignore[operator]  # local heads, for readers of the attr
            module.num_kv_heads //= tp_size  # type: ignore[operator]
            if sp:
                module.register_forward_pre_hook(gather_attention_inputs, with_kwargs=True)
            if rng_tracker is not None:
                _fork_rng_around(module, rng_tracker)
        elif sp and rng_tracker is not None and _BLOCK_DROPOUT.search(name):
            _fork_rng_around(module, rng_tracker)

    embed = model.get_submodule("embed")
    if isinstance(embed, nn.Embedding):
        model.embed = VocabParallelEmbedding.from_embedding(embed, group)
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear):
        bias = shard(head.bias, 0, group) if head.bias is not None else None
        model.lm_head = VocabParallelHead(shard(head.weight, 0, group), bias)
    mlm_bias = getattr(model, "mlm_bias", None)
    if isinstance(mlm_bias, nn.Parameter) and not is_tensor_parallel(mlm_bias):
        model.mlm_bias = nn.Parameter(shard(mlm_bias, 0, group))
        mark_tensor_parallel(model.mlm_bias, 0)
    for table_name in plan.bias_tables:
        owner = model.get_submodule(table_name)  # the nn.Embedding(buckets, H)
        owner.weight = nn.Parameter(shard(owner.weight, 1, group))  # type: ignore[arg-type]  # (buckets, H/tp)
        mark_tensor_parallel(owner.weight, 1)

    def head_input_hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        if sp:
            return gather_from_sequence_parallel_region(out, group)  # (B, T/tp, C) -> (B, T, C)
        return copy_to_tp_region(out, group)  # (B, T, C)

    model.get_submodule(plan.head_input).register_forward_hook(head_input_hook)

    if sp:

        def scatter_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return (scatter_to_sequence_parallel_region(args[0], group), *args[1:])  # (B, T/tp, C)

        for entry in plan.sequence_entries:
            model.get_submodule(entry).register_forward_pre_hook(scatter_hook)
        for name, param in model.named_parameters():
            if name.startswith(plan.sequence_region) and not is_tensor_parallel(param):
                mark_sequence_parallel(param, group)
    return model


def gather_tensor_parallel(param: torch.Tensor, tensor: torch.Tensor, group: Group) -> torch.Tensor:
    """The full tensor of a sharded parameter (or its gradient): all-gathers along `partition_dim`.
    Replicated parameters come back unchanged. For tests, export and checkpoint consolidation."""
    if not is_tensor_parallel(param):
        return tensor
    import torch.distributed as dist

    size, _ = tp_world(group)
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=param.partition_dim)  # type: ignore[attr-defined]
