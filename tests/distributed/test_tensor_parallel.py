"""Tensor parallelism at TP=2 (2 gloo processes) against the one-process computation.

Each worker computes the one-process reference itself (same seed, same full model, one thread), then
the TP=2 shard of it, so the comparison is between two computations on the same machine and inputs.

Tolerances. Where a TP rank computes a slice of what the one-process run computes, with the same
reduction length (column-parallel outputs and weight gradients, row-parallel weight gradients), the
result is compared bitwise. Where partial sums are added across ranks (row-parallel outputs, input
gradients after an all-reduce, the three all-reduces of the vocab-parallel loss) the fp32 summation
order changes: errors of a few ulp of the largest term, so 1e-6 (absolute on O(1) values) for layers
and 1e-5 relative (the project's parity bound, DESIGN.md) for whole models, whose gradients go through
tens of such sums (seen: <= ~1e-6).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.conftest import free_port, spawn_with_deadline

pytestmark = pytest.mark.distributed

WORLD = 2
LAYER_ATOL = 1e-6
MODEL_RTOL = 1e-5
# Some gradients are mathematically zero and come out as rounding noise (~1e-10): the key-projection
# bias, because softmax is invariant to a shift shared by all keys of a query. Relative error means
# nothing there; 1e-8 absolute is far below every real gradient of these models (>= 1e-4 in max norm).
GRAD_NOISE_FLOOR = 1e-8


# ------------------------------------------------------------------------------------------------
# Harness: 2 spawned workers, a hard timeout, exceptions re-raised in the test process.


def _worker(rank: int, port: int, case: str, arg: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        CASES[case](rank, arg)
    finally:
        dist.destroy_process_group()


def _spawn(case: str, arg: str = "", timeout: float = 60.0) -> None:
    spawn_with_deadline(
        _worker, (free_port(), case, arg), nprocs=WORLD, timeout=timeout, what=f"{case}({arg})"
    )


# Sharded matmuls do the same dot products as the full one, but the CPU GEMM may block a 6-wide output
# differently from a 12-wide one and round differently (seen in clean-clone runs: 2.4e-7 off on values
# ~1, 1.9e-6 on a weight gradient ~10, both about 2 ulp): 8 ulp of the largest value, not bitwise.
GEMM_ULPS = 8 * 2.0**-23


def _close(got: torch.Tensor, ref: torch.Tensor, what: str, *, atol: float = 0.0, rel: bool = False) -> None:
    """max |got - ref| <= atol, or <= atol * max|ref| with rel=True (a few ulp of the largest value)."""
    err = (got - ref).abs().max().item() if ref.numel() else 0.0
    bound = atol * max(1.0, ref.abs().max().item()) if rel and ref.numel() else atol
    assert got.shape == ref.shape and err <= bound, f"{what}: max |diff| {err:.3g} > {bound:g}"


# ------------------------------------------------------------------------------------------------
# Cases (run inside the workers).


def _layers_case(rank: int, _: str) -> None:
    from parallel.tensor import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        gather_from_sequence_parallel_region,
        scatter_to_sequence_parallel_region,
    )

    group = dist.group.WORLD
    torch.manual_seed(1)
    x = torch.randn(2, 8, 16, requires_grad=True)  # (B, T, C), the same on both ranks
    g = torch.randn(2, 8, 12)  # upstream gradient of the full output

    # Column-parallel: same seed -> the shard of nn.Linear's init (bitwise).
    torch.manual_seed(0)
    full = torch.nn.Linear(16, 12)
    torch.manual_seed(0)
    col = ColumnParallelLinear(16, 12, True, group)
    sl = slice(6 * rank, 6 * (rank + 1))
    assert torch.equal(col.weight, full.weight[sl]) and torch.equal(col.bias, full.bias[sl])
    ref = full(x)
    ref.backward(g)
    ref_dx, x.grad = x.grad.clone(), None
    y = col(x)  # (B, T, 12/tp): a slice of the same dot products, no reduction
    _close(y, ref[..., sl], "column forward", atol=GEMM_ULPS, rel=True)
    y.backward(g[..., sl])
    _close(col.weight.grad, full.weight.grad[sl], "column dW", atol=GEMM_ULPS, rel=True)
    # db sums the same 16 tokens, but the vectorized column reduction is blocked by the tensor's width
    # (6 vs 12 columns), which reorders the fp32 adds: seen 4.8e-7.
    _close(col.bias.grad, full.bias.grad[sl], "column db", atol=LAYER_ATOL)
    _close(x.grad, ref_dx, "column dX (all-reduced)", atol=LAYER_ATOL)
    x.grad = None

    # gather_output gives the full output on every rank.
    gathered = ColumnParallelLinear.from_linear(full, group, gather_output=True)(x)
    _close(gathered, ref, "column gather_output", atol=GEMM_ULPS, rel=True)

    # Row-parallel, input already split (the usual case) and replicated input (scatter inside).
    torch.manual_seed(0)
    full_row = torch.nn.Linear(12, 16)
    torch.manual_seed(0)
    row = RowParallelLinear(12, 16, True, group)
    assert torch.equal(row.weight, full_row.weight[:, sl]) and torch.equal(row.bias, full_row.bias)
    h = torch.randn(2, 8, 12, generator=torch.Generator().manual_seed(3), requires_grad=True)
    gy = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(4))
    ref = full_row(h)
    ref.backward(gy)
    ref_dh, h.grad = h.grad.clone(), None
    local_h = h.detach()[..., sl].clone().requires_grad_()
    y = row(local_h)
    _close(y, ref, "row forward (all-reduced)", atol=LAYER_ATOL)
    y.backward(gy)
    _close(row.weight.grad, full_row.weight.grad[:, sl], "row dW", atol=GEMM_ULPS, rel=True)
    _close(row.bias.grad, full_row.bias.grad, "row db")
    _close(local_h.grad, ref_dh[..., sl], "row dX", atol=GEMM_ULPS, rel=True)
    row_scatter = RowParallelLinear.from_linear(full_row, group, input_is_parallel=False)
    y = row_scatter(h)
    y.backward(gy)
    _close(y, ref, "row forward, scattered input", atol=LAYER_ATOL)
    _close(h.grad, ref_dh, "row dX, scattered input (gathered)", atol=GEMM_ULPS, rel=True)
    h.grad = None

    # Sequence parallel: column(all-gather) -> row(reduce-scatter) equals the full two-layer MLP.
    full.zero_grad(set_to_none=True)
    full_row.zero_grad(set_to_none=True)
    mlp_ref = full_row(F.gelu(full(x)))
    mlp_ref.backward(torch.ones_like(mlp_ref))
    ref_dx, x.grad = x.grad.clone(), None
    ref_db = full_row.bias.grad.clone()
    col_sp = ColumnParallelLinear.from_linear(full, group, sequence_parallel=True)
    row_sp = RowParallelLinear.from_linear(full_row, group, sequence_parallel=True)
    x_shard = scatter_to_sequence_parallel_region(x, group)  # (B, T/tp, C)
    y_shard = row_sp(F.gelu(col_sp(x_shard)))  # (B, T/tp, C)
    y = gather_from_sequence_parallel_region(y_shard, group)
    _close(y_shard, mlp_ref[:, 4 * rank : 4 * (rank + 1)], "SP shard forward", atol=LAYER_ATOL)
    y_shard.backward(torch.ones_like(y_shard))
    _close(x.grad, ref_dx, "SP dX", atol=LAYER_ATOL)
    _close(row_sp.bias.grad, ref_db, "SP row bias grad (summed over TP by the hook)", atol=LAYER_ATOL)
    assert y.shape == mlp_ref.shape

    # Vocab-parallel embedding: the masked local lookup + all-reduce returns exact rows (one non-zero
    # term per token); the weight gradient rows are those of the full embedding.
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 4)
    torch.manual_seed(0)
    vemb = VocabParallelEmbedding(10, 4, group)
    assert torch.equal(vemb.weight, emb.weight[5 * rank : 5 * (rank + 1)])
    ids = torch.tensor([[0, 9, 4, 5, 5, 2]])
    ge = torch.randn(1, 6, 4, generator=torch.Generator().manual_seed(5))
    ref = emb(ids)
    ref.backward(ge)
    out = vemb(ids)
    out.backward(ge)
    _close(out, ref, "vocab embedding forward")
    _close(vemb.weight.grad, emb.weight.grad[5 * rank : 5 * (rank + 1)], "vocab embedding dW")


def _rng_tracker_checks(rank: int) -> None:
    """Dropout streams: the default one agrees across TP ranks and is not advanced by a fork; the TP
    stream differs across ranks and continues where it left off."""
    from parallel.tensor import TPRngTracker

    torch.manual_seed(123)
    tracker = TPRngTracker()
    tracker.seed_tensor_parallel(123, rank)
    outside = torch.rand(8)
    with tracker.fork():
        inside = torch.rand(8)
    after = torch.rand(8)
    with tracker.fork():
        inside_again = torch.rand(8)
    torch.manual_seed(123)
    assert torch.equal(torch.cat([outside, after]), torch.rand(16)), "fork advanced the default stream"
    both = [torch.empty(8) for _ in range(WORLD)]
    dist.all_gather(both, inside)
    assert not torch.equal(both[0], both[1]), "TP stream must differ across TP ranks"
    dist.all_gather(both, outside)
    assert torch.equal(both[0], both[1]), "default stream must agree across TP ranks"
    torch.manual_seed(123 + 2718 + rank)
    assert torch.equal(torch.cat([inside, inside_again]), torch.rand(16))


def _cross_entropy_case(rank: int, _: str) -> None:
    _rng_tracker_checks(rank)
    from parallel.tensor import vocab_parallel_cross_entropy

    group = dist.group.WORLD
    gen = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(3, 5, 32, generator=gen)).requires_grad_()  # (B, T, V)
    targets = torch.randint(0, 32, (3, 5), generator=gen)
    targets[0, :2] = -100
    targets[2, 4] = -100
    ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    ref.backward()
    sl = slice(16 * rank, 16 * (rank + 1))
    local = logits.detach()[..., sl].clone().requires_grad_()  # (B, T, V/tp)
    loss = vocab_parallel_cross_entropy(local, targets, group, ignore_index=-100)
    loss.backward()
    _close(loss, ref, "vocab-parallel CE loss", atol=LAYER_ATOL)
    _close(local.grad, logits.grad[..., sl], "vocab-parallel CE grad", atol=LAYER_ATOL)
    none = vocab_parallel_cross_entropy(local.detach(), targets, group, reduction="none")
    ref_none = F.cross_entropy(logits.detach().flatten(0, 1), targets.flatten(), reduction="none")
    _close(none.flatten(), ref_none, "per-token CE (0 at ignored)", atol=LAYER_ATOL)


def _inputs(family: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 256, (2, 16), generator=gen)
    if family == "gpt":
        labels = torch.roll(ids, -1, dims=1)
        labels[:, -1] = -100
        return {"input_ids": ids, "labels": labels}
    if family == "bert":
        mask = torch.ones(2, 16, dtype=torch.long)
        mask[1, 12:] = 0  # padding: key-padding masks must work on the sharded heads too
        labels = torch.full((2, 16), -100)
        labels[:, ::3] = ids[:, ::3]
        types = torch.zeros(2, 16, dtype=torch.long)
        types[:, 8:] = 1
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels}
    dec = torch.randint(0, 256, (2, 8), generator=gen)
    return {"input_ids": ids, "decoder_input_ids": dec, "labels": torch.roll(dec, -1, dims=1)}


def _model_case(rank: int, preset: str) -> None:
    from parallel.tensor import vocab_parallel_cross_entropy
    from parallel.tensor_plan import apply_tensor_parallel, gather_tensor_parallel
    from pretrain.config import load_config
    from pretrain.models import build_model

    group = dist.group.WORLD
    cfg = load_config(None, ["data.shards=x", f"model.preset={preset}", "model.vocab_size=256"]).model
    torch.manual_seed(0)
    full = build_model(cfg)
    batch = _inputs(cfg.family)
    labels = batch.pop("labels")

    logits = full(**batch)  # (B, T, V)
    ref_loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in full.named_parameters()}

    losses: dict[bool, float] = {}
    worst = {False: 0.0, True: 0.0}
    for sp in (False, True):
        model = copy.deepcopy(full)
        model.zero_grad(set_to_none=True)
        apply_tensor_parallel(model, group=group, tp_size=WORLD, tp_rank=rank, sequence_parallel=sp)
        local_logits = model(**batch)  # (B, T, V/tp)
        assert local_logits.shape[-1] == 256 // WORLD
        loss = vocab_parallel_cross_entropy(local_logits, labels, group, ignore_index=-100)
        loss.backward()
        losses[sp] = loss.item()
        rel = abs(loss.item() - ref_loss.item()) / abs(ref_loss.item())
        assert rel <= MODEL_RTOL, f"{preset} sp={sp}: loss {loss.item()} vs {ref_loss.item()} ({rel:.2g})"
        names = set()
        for name, p in model.named_parameters():
            names.add(name)
            ref = ref_grads[name]
            if ref is None:  # unused in the forward (BERT's pooler)
                assert p.grad is None, name
                continue
            got = gather_tensor_parallel(p, p.grad, group)
            scale = ref.abs().max().item()
            err = (got - ref).abs().max().item()
            assert got.shape == ref.shape, f"{name}: {tuple(got.shape)} vs {tuple(ref.shape)}"
            worst[sp] = max(worst[sp], err / max(scale, GRAD_NOISE_FLOOR / MODEL_RTOL))
            assert err <= MODEL_RTOL * scale + GRAD_NOISE_FLOOR, (
                f"{preset} sp={sp} {name}: {err:.3g} vs max {scale:.3g}"
            )
        assert names == set(ref_grads), f"parameter names changed: {names ^ set(ref_grads)}"
    assert abs(losses[True] - losses[False]) <= MODEL_RTOL * abs(losses[False])
    if rank == 0:
        print(
            f"PARITY {preset}: loss rel {{sp: %s}}, worst grad rel %s"
            % ({sp: abs(v - ref_loss.item()) / abs(ref_loss.item()) for sp, v in losses.items()}, worst)
        )


def _validation_case(rank: int, _: str) -> None:
    from parallel.tensor_plan import apply_tensor_parallel
    from pretrain.config import load_config
    from pretrain.models import build_model

    overrides = ["data.shards=x", "model.preset=llama-tiny", "model.vocab_size=255", "model.num_kv_heads=1"]
    model = build_model(load_config(None, overrides).model)
    with pytest.raises(ValueError) as info:
        apply_tensor_parallel(model, group=dist.group.WORLD, tp_size=WORLD, tp_rank=rank)
    msg = str(info.value)
    assert "model.num_kv_heads=1" in msg and "model.vocab_size=255" in msg, msg


def _checkpointing_case(rank: int, preset: str) -> None:
    """TP2 with dropout 0.1 everywhere and sequence parallelism: full and selective activation
    checkpointing give this rank the loss and gradients of the run without checkpointing, bit for bit
    (the same kernels on the same numbers, the dropout masks replayed); a full recompute that does not
    restore the TP RNG stream draws other attention-dropout masks and gets other gradients, which is what
    `tracker_restoring_context` prevents."""
    from parallel.parallelize import apply_activation_checkpointing
    from parallel.tensor import TPRngTracker, vocab_parallel_cross_entropy
    from parallel.tensor_plan import apply_tensor_parallel
    from pretrain.config import load_config
    from pretrain.models import build_model

    group = dist.group.WORLD
    overrides = ["data.shards=x", f"model.preset={preset}", "model.vocab_size=256", "model.dropout=0.1"]
    cfg = load_config(None, overrides).model
    torch.manual_seed(0)
    full = build_model(cfg).train()
    batch = _inputs(cfg.family)
    labels = batch.pop("labels")

    def run(mode: str, restore: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model = copy.deepcopy(full)
        tracker = TPRngTracker()
        tracker.seed_tensor_parallel(1234, rank)
        apply_tensor_parallel(
            model, group=group, tp_size=WORLD, tp_rank=rank, sequence_parallel=True, rng_tracker=tracker
        )
        if mode != "none":
            apply_activation_checkpointing(model, mode, tracker if restore else None)
        torch.manual_seed(1234)
        loss = vocab_parallel_cross_entropy(model(**batch), labels, group, ignore_index=-100)
        loss.backward()
        strip = "._checkpoint_wrapped_module"
        return loss.detach(), {n.replace(strip, ""): p.grad for n, p in model.named_parameters()}

    ref_loss, ref_grads = run("none", True)
    for mode in ("full", "selective"):
        loss, grads = run(mode, True)
        assert torch.equal(loss, ref_loss), f"{preset} {mode}: loss {loss} vs {ref_loss}"
        for name, g in ref_grads.items():
            assert torch.equal(grads[name], g), f"{preset} {mode}: gradient of {name} differs"
    _, stale = run("full", False)
    differs = [n for n, g in ref_grads.items() if not torch.equal(stale[n], g)]
    assert differs, f"{preset}: recompute without the tracker's states matched: the test cannot fail"


CASES: dict[str, Callable[[int, str], None]] = {
    "checkpointing": _checkpointing_case,
    "layers": _layers_case,
    "cross_entropy": _cross_entropy_case,
    "model": _model_case,
    "validation": _validation_case,
}


# ------------------------------------------------------------------------------------------------
# Tests.


def test_layers_match_one_process() -> None:
    _spawn("layers")


def test_vocab_parallel_cross_entropy_matches_f_cross_entropy() -> None:
    _spawn("cross_entropy")


@pytest.mark.parametrize("preset", ["gpt-tiny", "llama-tiny", "bert-tiny", "t5-tiny"])
def test_model_tp2_matches_one_process(preset: str) -> None:
    """Loss and every gathered gradient, with sequence parallelism off and on."""
    _spawn("model", preset)


@pytest.mark.parametrize("preset", ["gpt-tiny", "t5-tiny"])
def test_activation_checkpointing_replays_tensor_parallel_dropout(preset: str) -> None:
    _spawn("checkpointing", preset)


def test_indivisible_sizes_raise_one_error_naming_each() -> None:
    _spawn("validation")
