"""Megatron-style tensor parallelism on plain torch.distributed (any backend, gloo included).

The layers keep Megatron-LM's names and semantics (Shoeybi et al. 2019, "Megatron-LM"; sequence
parallelism from Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models"). megatron-core's own layers hard-code CUDA, so these are written on torch.distributed.

Conventions: activations are batch-first, (B, T, C); the sequence dim is 1. A "TP region" is the span
between a column-parallel and a row-parallel linear where every rank holds a slice of the features.
Each communication op below comes in a conjugate pair: what one does in forward, the other does in
backward. Sharded parameters carry Megatron's attributes (`tensor_model_parallel`, `partition_dim`,
`partition_stride`) so that DeepSpeed's gradient-norm code counts each of them once per TP group;
replicated parameters used on sequence-sharded activations carry `sequence_parallel = True` and have
their gradients all-reduced over the TP group by a hook (each rank saw only its T/tp tokens).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

Group = Any  # a torch.distributed ProcessGroup (or None for the default group)
InitMethod = Callable[[torch.Tensor], Any]


def tp_world(group: Group) -> tuple[int, int]:
    """(size, rank) of this process in the TP group; (1, 0) when torch.distributed is not initialized."""
    if not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


# ---------------------------------------------------------------------------------------------------
# Primitive collectives (out of place, so autograd never sees an input modified under it).


def _all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    if tp_world(group)[0] == 1:
        return x
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


def _all_gather(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    size, _ = tp_world(group)
    if size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def _split(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    size, rank = tp_world(group)
    if size == 1:
        return x
    if x.shape[dim] % size:
        raise ValueError(f"cannot split dim {dim} of size {x.shape[dim]} evenly across {size} TP ranks")
    return x.chunk(size, dim=dim)[rank].contiguous()


def _reduce_scatter(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    size, rank = tp_world(group)
    if size == 1:
        return x
    if x.shape[dim] % size:
        raise ValueError(f"cannot reduce-scatter dim {dim} of size {x.shape[dim]} across {size} TP ranks")
    if dist.get_backend(group) == "nccl":
        chunks = [c.contiguous() for c in x.chunk(size, dim=dim)]
        out = torch.empty_like(chunks[rank])
        dist.reduce_scatter(out, chunks, group=group)
        return out
    # gloo has no reduce-scatter: an all-reduce then a local slice gives the same numbers for twice the
    # traffic, which only matters on real interconnects (where nccl takes the branch above).
    return _split(_all_reduce(x, group), dim, group)


# ---------------------------------------------------------------------------------------------------
# Conjugate autograd functions (Megatron-LM `mappings.py` semantics).


class _CopyToTP(torch.autograd.Function):
    """Entering a TP region: every rank needs the full input, and each rank's input gradient is only
    the part flowing through its own slice of the features, so backward sums them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """Leaving a TP region: partial sums become the full output; its gradient is already replicated."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    """Keep this rank's slice of the last dim; backward all-gathers the slices' gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return _split(x, -1, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_gather(grad, -1, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    """All-gather the last dim; backward keeps this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return _all_gather(x, -1, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _split(grad, -1, ctx.group), None


class _ScatterToSequence(torch.autograd.Function):
    """Replicated (B, T, C) -> this rank's (B, T/tp, C); backward all-gathers along the sequence."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return _split(x, 1, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_gather(grad, 1, ctx.group), None


class _GatherFromSequence(torch.autograd.Function):
    """(B, T/tp, C) -> (B, T, C) before a column-parallel linear (Korthikanti et al. 2022, the `g`
    operator). The gathered tensor feeds only this rank's feature slice, so its gradient is a partial
    sum: backward reduce-scatters it back to (B, T/tp, C)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return _all_gather(x, 1, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _reduce_scatter(grad, 1, ctx.group), None


class _ReduceScatterToSequence(torch.autograd.Function):
    """Partial sums (B, T, C) -> summed (B, T/tp, C) after a row-parallel linear (the `g-bar` operator);
    backward all-gathers the sequence shards of the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return _reduce_scatter(x, 1, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_gather(grad, 1, ctx.group), None


def copy_to_tp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _CopyToTP.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _ReduceFromTP.apply(x, group)


def scatter_to_tp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _ScatterToTP.apply(x, group)


def gather_from_tp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _GatherFromTP.apply(x, group)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _ScatterToSequence.apply(x, group)


def gather_from_sequence_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _GatherFromSequence.apply(x, group)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _ReduceScatterToSequence.apply(x, group)


# ---------------------------------------------------------------------------------------------------
# Parameter bookkeeping and TP-aware initialization.


def mark_tensor_parallel(param: nn.Parameter, dim: int) -> None:
    """Megatron's attribute names: DeepSpeed's clip/norm code reads `tensor_model_parallel`."""
    param.tensor_model_parallel = True  # type: ignore[attr-defined]
    param.partition_dim = dim  # type: ignore[attr-defined]
    param.partition_stride = 1  # type: ignore[attr-defined]


def is_tensor_parallel(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def mark_sequence_parallel(param: nn.Parameter, group: Group) -> None:
    """A replicated parameter applied to sequence shards: each rank's gradient covers only its T/tp
    tokens, so the TP group sums them (Megatron does this in `finalize_model_grads`; a tensor hook does it
    here, before the gradient is accumulated, so neither the engine nor the train loop need to know).
    The hook runs once per backward with the parameter's summed gradient, in the same order on every
    rank (same graph), so the collectives line up."""
    if getattr(param, "sequence_parallel", False) or tp_world(group)[0] == 1:
        return
    param.sequence_parallel = True  # type: ignore[attr-defined]
    param.register_hook(lambda grad: _all_reduce(grad, group))


def shard(full: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """This rank's contiguous slice of `full` along `dim` (a copy, detached)."""
    return _split(full.detach(), dim, group).clone()


def init_sharded_(
    param: nn.Parameter, full_shape: tuple[int, ...], dim: int, group: Group, init_method: InitMethod
) -> None:
    """Initializes the full tensor identically on every rank (same RNG state), then keeps this rank's
    slice: concatenating the shards gives exactly the one-process model's weight for the same seed.
    Costs one full-size temporary per layer at construction; Megatron's `_initialize_affine_weight_cpu`
    makes the same trade for bit-reproducible initialization."""
    full = torch.empty(full_shape, dtype=param.dtype, device=param.device)
    init_method(full)
    with torch.no_grad():
        param.copy_(_split(full, dim, group))


def _linear_default_init(fan_in: int) -> tuple[InitMethod, InitMethod]:
    """nn.Linear's default (Kaiming-uniform weight, uniform bias) on the full, unsharded fan-in."""
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return (
        lambda w: nn.init.kaiming_uniform_(w, a=math.sqrt(5)),
        lambda b: nn.init.uniform_(b, -bound, bound),
    )


# from_* constructors overwrite every value with a slice of an existing layer: skip the random init so
# converting a model does not advance the RNG (which would shift every later dropout mask).
_NO_INIT: dict[str, InitMethod] = {"init_method": nn.init.zeros_, "bias_init_method": nn.init.zeros_}

# ---------------------------------------------------------------------------------------------------
# Layers.


class ColumnParallelLinear(nn.Module):
    """Y = X A^T + b with A split along its output dim: rank r holds rows r·out/tp.. of A (and of b).

    Input (B, T, C) replicated, or (B, T/tp, C) with sequence_parallel; output (B, T, out/tp), or the
    all-gathered (B, T, out) with gather_output. `input_is_gathered`: the caller already applied
    `gather_from_sequence_parallel_region` (whose backward reduce-scatters, i.e. already sums the input
    gradient over the TP group), so this layer adds no communication; used when several projections
    share one gathered input (q, k, v), which saves two all-gathers as Megatron's fused QKV does."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group: Group = None,
        *,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        input_is_gathered: bool = False,
        init_method: InitMethod | None = None,
        bias_init_method: InitMethod | None = None,
    ):
        super().__init__()
        size, _ = tp_world(group)
        if out_features % size:
            raise ValueError(f"ColumnParallelLinear: out_features={out_features} not divisible by tp={size}")
        if gather_output and sequence_parallel:
            raise ValueError("ColumnParallelLinear: gather_output and sequence_parallel exclude each other")
        self.in_features, self.out_features = in_features, out_features
        self.group, self.gather_output, self.sequence_parallel = group, gather_output, sequence_parallel
        self.input_is_gathered = input_is_gathered
        self.weight = nn.Parameter(torch.empty(out_features // size, in_features))
        self.bias = nn.Parameter(torch.empty(out_features // size)) if bias else None
        w_init, b_init = _linear_default_init(in_features)
        init_sharded_(self.weight, (out_features, in_features), 0, group, init_method or w_init)
        mark_tensor_parallel(self.weight, 0)
        if self.bias is not None:
            init_sharded_(self.bias, (out_features,), 0, group, bias_init_method or b_init)
            mark_tensor_parallel(self.bias, 0)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: Group, **kw: Any) -> ColumnParallelLinear:
        """The shard of an already-initialized full linear (exact parity with the one-process model)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group, **kw, **_NO_INIT)  # type: ignore[arg-type]
        with torch.no_grad():
            layer.weight.copy_(shard(linear.weight, 0, group))
            if layer.bias is not None and linear.bias is not None:
                layer.bias.copy_(shard(linear.bias, 0, group))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_is_gathered:
            pass  # (B, T, C), gathered by the caller
        elif self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, self.group)  # (B, T/tp, C) -> (B, T, C)
        else:
            x = copy_to_tp_region(x, self.group)  # (B, T, C)
        y = F.linear(x, self.weight, self.bias)  # (B, T, out/tp)
        return gather_from_tp_region(y, self.group) if self.gather_output else y

    def extra_repr(self) -> str:
        size, _ = tp_world(self.group)
        return (
            f"in={self.in_features}, out={self.out_features}/tp{size}, bias={self.bias is not None}, "
            f"sequence_parallel={self.sequence_parallel}"
        )


class RowParallelLinear(nn.Module):
    """Y = X A^T + b with A split along its input dim: rank r holds columns r·in/tp.. of A; b is
    replicated and added once, after the partial products are summed.

    Input (B, T, in/tp) (input_is_parallel) or (B, T, in); output (B, T, C) replicated, or this rank's
    (B, T/tp, C) with sequence_parallel."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group: Group = None,
        *,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
        init_method: InitMethod | None = None,
        bias_init_method: InitMethod | None = None,
    ):
        super().__init__()
        size, _ = tp_world(group)
        if in_features % size:
            raise ValueError(f"RowParallelLinear: in_features={in_features} not divisible by tp={size}")
        if sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear: sequence_parallel needs input_is_parallel=True")
        self.in_features, self.out_features = in_features, out_features
        self.group, self.input_is_parallel, self.sequence_parallel = (
            group,
            input_is_parallel,
            sequence_parallel,
        )
        self.weight = nn.Parameter(torch.empty(out_features, in_features // size))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        w_init, b_init = _linear_default_init(in_features)
        init_sharded_(self.weight, (out_features, in_features), 1, group, init_method or w_init)
        mark_tensor_parallel(self.weight, 1)
        if self.bias is not None:
            with torch.no_grad():
                (bias_init_method or b_init)(self.bias)  # replicated: the same draw on every rank
            if sequence_parallel:
                mark_sequence_parallel(self.bias, group)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: Group, **kw: Any) -> RowParallelLinear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group, **kw, **_NO_INIT)  # type: ignore[arg-type]
        with torch.no_grad():
            layer.weight.copy_(shard(linear.weight, 1, group))
            if layer.bias is not None and linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp_region(x, self.group)  # (B, T, in) -> (B, T, in/tp)
        partial = F.linear(x, self.weight)  # (B, T, C), this rank's share of the sum
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(partial, self.group)  # (B, T/tp, C)
        else:
            y = reduce_from_tp_region(partial, self.group)  # (B, T, C)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        size, _ = tp_world(self.group)
        return (
            f"in={self.in_features}/tp{size}, out={self.out_features}, bias={self.bias is not None}, "
            f"sequence_parallel={self.sequence_parallel}"
        )


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocab split in contiguous ranges: rank r holds rows
    [r·V/tp, (r+1)·V/tp). Ids outside the range look up zeros; an all-reduce sums the one non-zero row.

    `weight` is the local (V/tp, C) shard, so a tied LM head `F.linear(x, embed.weight)` yields this
    rank's vocab slice of the logits, the input of `vocab_parallel_cross_entropy`."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        group: Group = None,
        *,
        init_method: InitMethod | None = None,
    ):
        super().__init__()
        size, rank = tp_world(group)
        if num_embeddings % size:
            raise ValueError(f"VocabParallelEmbedding: vocab={num_embeddings} not divisible by tp={size}")
        self.num_embeddings, self.embedding_dim, self.group = num_embeddings, embedding_dim, group
        per_rank = num_embeddings // size
        self.vocab_start, self.vocab_end = rank * per_rank, (rank + 1) * per_rank
        self.weight = nn.Parameter(torch.empty(per_rank, embedding_dim))
        init_sharded_(self.weight, (num_embeddings, embedding_dim), 0, group, init_method or nn.init.normal_)
        mark_tensor_parallel(self.weight, 0)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, group: Group) -> VocabParallelEmbedding:
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, group, init_method=nn.init.zeros_)
        with torch.no_grad():
            layer.weight.copy_(shard(embedding.weight, 0, group))
        return layer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)  # (B, T)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        x = F.embedding(local, self.weight)  # (B, T, C); rows of foreign ids are junk until masked
        x = x.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp_region(x, self.group)  # (B, T, C)

    def extra_repr(self) -> str:
        return f"vocab={self.num_embeddings} [{self.vocab_start}, {self.vocab_end}), dim={self.embedding_dim}"


# ---------------------------------------------------------------------------------------------------
# Vocab-parallel cross-entropy.


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token -log softmax(logits)[target] from vocab-sharded logits, never materializing (N, V):
    three all-reduces of (N,) vectors (max, target logit, sum of exps) instead of a (N, V) gather."""

    @staticmethod
    def forward(
        ctx, logits: torch.Tensor, targets: torch.Tensor, group: Group, vocab_start: int, ignore_index: int
    ) -> torch.Tensor:
        v_local = logits.shape[-1]
        x = logits.reshape(-1, v_local)  # (N, V/tp)
        t = targets.reshape(-1)  # (N,)
        # The global max keeps exp() in range; softmax does not depend on it, so it needs no gradient.
        row_max = x.max(dim=-1).values
        if tp_world(group)[0] > 1:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = x - row_max.unsqueeze(-1)  # (N, V/tp)
        valid = t != ignore_index
        local_t = t - vocab_start
        mine = valid & (local_t >= 0) & (local_t < v_local)  # the target column lives on this rank
        idx = local_t.masked_fill(~mine, 0)
        target_logit = shifted.gather(1, idx.unsqueeze(1)).squeeze(1).masked_fill(~mine, 0.0)  # (N,)
        exp = shifted.exp()  # (N, V/tp)
        sum_exp = exp.sum(dim=-1)  # (N,)
        target_logit = _all_reduce(target_logit, group)
        sum_exp = _all_reduce(sum_exp, group)
        loss = (sum_exp.log() - target_logit).masked_fill(~valid, 0.0)
        softmax = exp.div_(sum_exp.unsqueeze(-1))  # in place: exp is not needed any more
        ctx.save_for_backward(softmax, idx, mine, valid)
        ctx.logits_shape = logits.shape
        return loss.view(targets.shape)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        softmax, idx, mine, valid = ctx.saved_tensors
        # d(-log p_t)/d logit_j = softmax_j - [j == t]; the one-hot lives on the target's rank only.
        grad = softmax.clone()  # (N, V/tp)
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, idx] -= mine.to(grad.dtype)
        grad *= (grad_loss.reshape(-1) * valid.to(grad.dtype)).unsqueeze(-1)
        return grad.view(ctx.logits_shape), None, None, None, None


def vocab_parallel_cross_entropy(
    local_logits: torch.Tensor,
    targets: torch.Tensor,
    group: Group,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy from this rank's vocab slice of the logits.

    local_logits: (..., V/tp), rank r holding vocab columns [r·V/tp, (r+1)·V/tp); targets: (...) global
    ids. reduction "mean" (over non-ignored targets, like F.cross_entropy, but 0 if all are ignored),
    "sum" or "none" (per-token, 0 at ignored positions). Identical on every TP rank."""
    _, rank = tp_world(group)
    vocab_start = rank * local_logits.shape[-1]
    losses = _VocabParallelCrossEntropy.apply(local_logits, targets, group, vocab_start, ignore_index)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        return losses.sum() / (targets != ignore_index).sum().clamp(min=1)
    raise ValueError(f"reduction={reduction!r}: expected 'mean', 'sum' or 'none'")


# ---------------------------------------------------------------------------------------------------
# RNG tracker.


class TPRngTracker:
    """Named RNG states to fork into, so that dropout inside a TP region differs across TP ranks while
    dropout on replicated activations agrees (Megatron's `CudaRNGStatesTracker`, CPU and CUDA).

    The default generator (the one the train loop seeds) must be seeded identically on every TP rank:
    it drives dropout outside TP regions (embeddings, residual branches), which must agree because each
    rank holds the same activations. Inside a TP region each rank holds different heads/features, so
    `fork()` switches to a stream seeded by `seed + 2718 + tp_rank` (Megatron's offset) and back.
    With sequence parallelism the residual dropout also runs on different tokens per rank: the plan
    forks there as well."""

    TP_STREAM = "tensor-parallel"

    def __init__(self) -> None:
        self._states: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @staticmethod
    def _capture() -> tuple[torch.Tensor, torch.Tensor | None]:
        cuda = (
            torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        )
        return torch.get_rng_state(), cuda

    @staticmethod
    def _restore(state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1])

    def add(self, name: str, seed: int) -> None:
        if name in self._states:
            raise ValueError(f"RNG stream {name!r} already exists")
        outer = self._capture()
        torch.manual_seed(seed)
        self._states[name] = self._capture()
        self._restore(outer)

    def seed_tensor_parallel(self, seed: int, tp_rank: int) -> None:
        self.add(self.TP_STREAM, seed + 2718 + tp_rank)

    @contextlib.contextmanager
    def fork(self, name: str = TP_STREAM) -> Iterator[None]:
        if name not in self._states:
            raise KeyError(f"RNG stream {name!r} was never added (call seed_tensor_parallel first)")
        outer = self._capture()
        self._restore(self._states[name])
        try:
            yield
        finally:
            self._states[name] = self._capture()
            self._restore(outer)

    def state_dict(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """For checkpoints: resuming must continue each stream, not reseed it."""
        return dict(self._states)

    def load_state_dict(self, states: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        self._states = dict(states)
