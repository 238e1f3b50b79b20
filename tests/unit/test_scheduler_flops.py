"""The learning-rate / weight-decay schedule (megatron-core's OptimizerParamScheduler as Tandem builds
and steps it) against formulas written out here, and FLOPs per token against parameter counts by hand
and the published Megatron-LM formula."""

from __future__ import annotations

import math

import pytest
import torch

from parallel.parallelize import param_groups
from pretrain.config import Config, ConfigError, load_config
from pretrain.flops import flops_per_token
from pretrain.models.gpt import GPT
from pretrain.train import build_scheduler

SHARDS = "data.shards=/tmp/shards"


def _config(*overrides: str) -> Config:
    return load_config(None, [SHARDS, *overrides])


def _optimizer(cfg: Config) -> tuple[torch.optim.Optimizer, torch.nn.Module]:
    """AdamW over Tandem's own param groups (decay / no-decay with wd_mult), as train() builds it."""
    torch.manual_seed(0)
    model = GPT(load_config(None, [SHARDS, "model.preset=gpt-tiny", "model.vocab_size=50"]).model)
    o = cfg.optimizer
    return torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr), model


def _tandem_lrs(cfg: Config) -> tuple[float, list[float], list[list[float]]]:
    """The lr before the first step and, for updates k = 1..steps, the lr and each group's weight decay.
    Tandem calls scheduler.step(1) before each optimizer step, so update k runs with num_steps = k."""
    optimizer, _ = _optimizer(cfg)
    scheduler = build_scheduler(optimizer, cfg)
    initial = optimizer.param_groups[0]["lr"]
    lrs, wds = [], []
    for _ in range(cfg.train.steps):
        scheduler.step(1)
        assert len({g["lr"] for g in optimizer.param_groups}) == 1  # no per-group lr overrides
        lrs.append(optimizer.param_groups[0]["lr"])
        wds.append([g["weight_decay"] for g in optimizer.param_groups])
    return initial, lrs, wds


def warmup_cosine(k: int, *, lr: float, min_lr: float, warmup: int, decay_end: int) -> float:
    """Linear 0 -> lr over `warmup` updates, then half a cosine from lr to min_lr at update decay_end,
    then min_lr (GPT-3, Brown et al. 2020, appendix B)."""
    if k <= warmup:
        return lr * k / warmup
    if k >= decay_end:
        return min_lr
    progress = (k - warmup) / (decay_end - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


# Both sides evaluate the same closed form in float64; only the operation order differs, so they agree
# to a few ulps. 1e-12 relative is ~5000 ulps: tight enough that an off-by-one step (a change of
# >= 1% of lr per step here) can never pass.
REL = 1e-12


@pytest.mark.parametrize(
    ("steps", "warmup", "decay_steps"),
    [(12, 3, 0), (10, 1, 0), (15, 4, 9)],  # decay over train.steps; one warmup step; decay ends early
)
def test_warmup_cosine_every_step(steps: int, warmup: int, decay_steps: int):
    cfg = _config(
        "optimizer.lr=1e-3",
        "optimizer.min_lr=1e-4",
        f"optimizer.warmup_steps={warmup}",
        f"optimizer.decay_steps={decay_steps}",
        "optimizer.decay_style=cosine",
        f"train.steps={steps}",
    )
    initial, lrs, _ = _tandem_lrs(cfg)
    assert initial == 0.0
    decay_end = decay_steps or steps
    want = [
        warmup_cosine(k, lr=1e-3, min_lr=1e-4, warmup=warmup, decay_end=decay_end)
        for k in range(1, steps + 1)
    ]
    for k, (got, expected) in enumerate(zip(lrs, want), start=1):
        assert math.isclose(got, expected, rel_tol=REL), (k, got, expected)
    assert lrs[0] == pytest.approx(1e-3 / warmup, rel=REL)  # the first update already moves
    assert lrs[warmup - 1] == pytest.approx(1e-3, rel=REL)  # the peak is reached at update `warmup`
    assert lrs[-1] == pytest.approx(1e-4, rel=REL)  # and min_lr at the last update


def test_linear_decay_every_step():
    cfg = _config(
        "optimizer.lr=2e-3",
        "optimizer.min_lr=0",
        "optimizer.warmup_steps=2",
        "optimizer.decay_style=linear",
        "train.steps=8",
    )
    _, lrs, _ = _tandem_lrs(cfg)
    want = [1e-3, 2e-3] + [2e-3 * (1 - (k - 2) / 6) for k in range(3, 9)]
    assert lrs == pytest.approx(want, rel=REL, abs=1e-18)


def test_weight_decay_only_on_matrices_and_embeddings():
    cfg = _config("optimizer.weight_decay=0.1", "optimizer.warmup_steps=2", "train.steps=5")
    optimizer, model = _optimizer(cfg)
    decay_group, no_decay_group = optimizer.param_groups
    decay_ids = {id(p) for p in decay_group["params"]}
    no_decay_ids = {id(p) for p in no_decay_group["params"]}
    for name, p in model.named_parameters():
        # Biases and norm gains are 1-D; embeddings and projection matrices are 2-D.
        if name.endswith("bias") or "norm" in name:
            assert id(p) in no_decay_ids and id(p) not in decay_ids, name
        else:
            assert id(p) in decay_ids and id(p) not in no_decay_ids, name
    assert no_decay_group["wd_mult"] == 0.0
    _, _, wds = _tandem_lrs(cfg)
    assert all(wd == [0.1, 0.0] for wd in wds), wds


def test_weight_decay_linear_ramp():
    cfg = _config(
        "optimizer.weight_decay=0.1",
        "optimizer.weight_decay_end=0.3",
        "optimizer.weight_decay_style=linear",
        "optimizer.warmup_steps=1",
        "train.steps=4",
    )
    _, _, wds = _tandem_lrs(cfg)
    for k, (decay, no_decay) in enumerate(wds, start=1):
        assert decay == pytest.approx(0.1 + 0.2 * k / 4, rel=REL)  # ramp over train.steps updates
        assert no_decay == 0.0


def test_scheduler_resumes_where_it_stopped():
    cfg = _config("optimizer.warmup_steps=3", "train.steps=10")
    _, full, _ = _tandem_lrs(cfg)
    optimizer, _ = _optimizer(cfg)
    first = build_scheduler(optimizer, cfg)
    for _ in range(4):
        first.step(1)
    state = first.state_dict()
    optimizer, _ = _optimizer(cfg)
    resumed = build_scheduler(optimizer, cfg)
    resumed.load_state_dict(state)
    rest = []
    for _ in range(6):
        resumed.step(1)
        rest.append(optimizer.param_groups[0]["lr"])
    assert rest == full[4:]


def test_every_valid_optimizer_config_builds_a_scheduler():
    try:
        cfg = _config("optimizer.weight_decay=0.1", "optimizer.weight_decay_end=0.2")
    except ConfigError:
        return  # rejected up front with a message: also acceptable
    optimizer, _ = _optimizer(cfg)
    build_scheduler(optimizer, cfg)


# ----------------------------------------------------------------------------- FLOPs


def _meta_model(preset: str, vocab: int) -> tuple[GPT, Config]:
    cfg = load_config(None, [SHARDS, f"model.preset={preset}", f"model.vocab_size={vocab}"])
    with torch.device("meta"):  # shapes only: no 500 MB of fp32 weights to allocate and initialize
        return GPT(cfg.model), cfg


def test_flops_per_token_gpt_125m():
    model, cfg = _meta_model("gpt-125m", 50257)
    L, h, heads, V, T = 12, 768, 12, 50257, 2048  # the papers' symbols
    per_layer = (
        2 * h  # LayerNorm before attention
        + (4 * h * h + 4 * h)  # q, k, v, o with biases
        + 2 * h  # LayerNorm before the MLP
        + (4 * h * h + 4 * h)  # up_proj (h -> 4h)
        + (4 * h * h + h)  # down_proj (4h -> h)
    )  # = 12h^2 + 13h
    n = L * per_layer + 2 * h + h * V  # + final LayerNorm + the (tied) LM-head matmul
    attention_flops = 12 * L * heads * (h // heads) * T
    got = flops_per_token(model, cfg.model, seq_len=T)
    assert got == 6 * n + attention_flops

    # Order of magnitude as usually quoted: 12·L·h^2 ≈ 85M block weights and h·V ≈ 38.6M head weights.
    assert 12 * L * h * h == pytest.approx(85e6, rel=0.01)
    assert h * V == pytest.approx(38.6e6, rel=0.01)
    assert 6 * n == pytest.approx(6 * (85e6 + 38.6e6), rel=0.01)
    # Megatron-LM (Narayanan et al. 2021, eq. 3) per token: 72·L·h^2·(1 + T/(6h) + V/(12·L·h)), which
    # omits biases and norms; those are 13·L·h + 2·h = 0.1% of N here.
    megatron = 72 * L * h * h * (1 + T / (6 * h) + V / (12 * L * h))
    assert got == pytest.approx(megatron, rel=2e-3)
    assert got == pytest.approx(0.968e9, rel=1e-3)


def test_flops_per_token_untied_head_counted_once():
    model, cfg = _meta_model("llama-tiny", 500)
    L, h, V, T, kv_width, ffn = 2, 128, 500, 256, 64, 384
    per_layer = h + 2 * h * h + 2 * h * kv_width + h + 3 * h * ffn  # RMSNorm, q/k/v/o, norm, swiglu
    n = L * per_layer + h + h * V  # final RMSNorm + lm_head (its own weights, counted once)
    assert flops_per_token(model, cfg.model, seq_len=T) == 6 * n + 12 * L * 4 * 32 * T
