"""The memory/throughput planner: ZeRO and activation formulas against numbers computed by hand (and the
ZeRO paper's own example), pipeline in-flight accounting, parameter counts against real models, GPT-3
175B on 1024 x 80 GB, and refusals with reasons."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from parallel.memory import (
    GB,
    Hardware,
    Layout,
    ModelShape,
    PlanError,
    activation_bytes_per_layer,
    estimate_memory,
    model_state_bytes,
    search_layouts,
)
from pretrain.config import load_config
from pretrain.planning import load_model_for_planning, model_shape
from pretrain.scaling_cli import register


@pytest.mark.parametrize(
    ("stage", "expected_gb"),
    # Rajbhandari et al. 2019, figure 1: Ψ = 7.5B, N_d = 64, K = 12 -> 120, 31.4, 16.6, 1.88 GB per device.
    [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.875)],
)
def test_zero_model_states_match_the_paper(stage: int, expected_gb: float) -> None:
    params, grads, optim, host = model_state_bytes(7.5e9, zero_stage=stage, dp=64)
    assert (params + grads + optim) / GB == pytest.approx(expected_gb, rel=0.01)
    assert host == 0


def test_zero_by_hand_and_offload() -> None:
    psi, dp = 1e9, 8
    # stage 1: 2Ψ + 2Ψ + 12Ψ/8 ; stage 2: 2Ψ + 14Ψ/8 ; fp32 stage 0: 4 + 4 + 8 = 16 bytes per parameter.
    assert sum(model_state_bytes(psi, zero_stage=1, dp=dp)[:3]) == 4e9 + 1.5e9
    assert sum(model_state_bytes(psi, zero_stage=2, dp=dp)[:3]) == 2e9 + 1.75e9
    assert sum(model_state_bytes(psi, zero_stage=0, dp=dp, precision="fp32")[:3]) == 16e9
    # fp32 under ZeRO: DeepSpeed keeps an fp32 partition besides Adam's moments (measured, distributed test).
    assert sum(model_state_bytes(psi, zero_stage=1, dp=dp, precision="fp32")[:3]) == 8e9 + 1.5e9
    # Optimizer offload (DeepSpeed 0.19.8, measured in the distributed memory test): the host holds the 12
    # bytes of states, an fp32 gradient copy (4) and a 2-byte parameter staging buffer per parameter of the
    # partition; the device keeps no gradient between steps at ZeRO-2.
    p, g, o, host = model_state_bytes(psi, zero_stage=2, dp=dp, offload_optimizer=True)
    assert (p, g, o, host) == (2e9, 0.0, 0.0, (12 + 4 + 2) * 1e9 / 8)
    # ZeRO-1 still accumulates the full gradient on the device before reducing it.
    p, g, o, host = model_state_bytes(psi, zero_stage=1, dp=dp, offload_optimizer=True)
    assert (p, g, o, host) == (2e9, 2e9, 0.0, (12 + 4 + 2) * 1e9 / 8)
    # ZeRO-3: the 2-byte gradient partition buffer is on the host, and parameter offload adds the 2-byte
    # parameter partition.
    p, g, o, host = model_state_bytes(psi, zero_stage=3, dp=dp, offload_optimizer=True, offload_params=True)
    assert (p, g, o, host) == (0.0, 0.0, 0.0, (12 + 4 + 2 + 2) * 1e9 / 8)
    with pytest.raises(PlanError, match="zero_stage=1"):
        model_state_bytes(psi, zero_stage=1, dp=dp, offload_params=True)


def test_activation_formulas_by_hand() -> None:
    # GPT-3 175B layer, s=2048, b=1, h=12288, a=96, t=8 (Korthikanti et al. 2022, table 2).
    s, b, h, a, t = 2048, 1, 12288, 96, 8
    sbh = s * b * h
    kw = dict(seq_len=s, micro_batch_size=b, hidden_size=h, num_heads=a)
    assert activation_bytes_per_layer(**kw) == sbh * (34 + 5 * a * s / h)
    assert activation_bytes_per_layer(**kw, tp=t) == pytest.approx(sbh * (10 + 24 / t + 5 * a * s / (h * t)))
    assert activation_bytes_per_layer(**kw, tp=t, sequence_parallel=True) == pytest.approx(
        sbh / t * (34 + 5 * a * s / h)
    )
    assert (
        activation_bytes_per_layer(**kw, tp=t, sequence_parallel=True, recompute="selective") == 34 * sbh / t
    )
    assert activation_bytes_per_layer(**kw, tp=t, recompute="full") == 2 * sbh
    # The paper's headline: SP + selective recompute at t=8 is 34/t vs 10 + 24/t + 5as/(ht) bytes per sbh.
    ratio = activation_bytes_per_layer(**kw, tp=t, sequence_parallel=True, recompute="selective") / (
        activation_bytes_per_layer(**kw, tp=t)
    )
    assert ratio == pytest.approx((34 / 8) / (10 + 3 + 80 / 8))


def test_activation_formulas_fp32_and_without_dropout_by_hand() -> None:
    s, b, h, a = 1024, 2, 512, 8
    sbh = s * b * h
    kw = dict(seq_len=s, micro_batch_size=b, hidden_size=h, num_heads=a)
    # fp32 with dropout: 16 values of 4 bytes + two 1-byte masks; per score 4 + 1 + 4 bytes.
    assert activation_bytes_per_layer(**kw, bytes_per_value=4) == sbh * (66 + 9 * a * s / h)
    # bf16 without dropout: no masks; per score only the 2-byte softmax output.
    assert activation_bytes_per_layer(**kw, dropout=False) == sbh * (32 + 2 * a * s / h)
    assert activation_bytes_per_layer(**kw, dropout=False, recompute="selective") == 32 * sbh
    assert activation_bytes_per_layer(**kw, bytes_per_value=4, recompute="full") == 4 * sbh


def _saved_activation_bytes_per_layer(preset: str, seq: int, batch: int) -> tuple[float, object]:
    """Bytes autograd keeps for the backward of a model's blocks, per block: every tensor saved during the
    forward (by storage, so a tensor saved by two ops counts once), the blocks' input excluded."""
    import torch

    from pretrain.models import build_model

    cfg = load_config(
        None,
        ["data.shards=unused", f"model.preset={preset}", "model.vocab_size=512", f"model.max_seq_len={seq}",
         "model.dropout=0.0"],
    ).model  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg).train()
    x = torch.randn(batch, seq, cfg.hidden_size, requires_grad=True)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = x
        for block in model.blocks:
            y = block(y, getattr(model, "rope", None), None)
    storages.pop(x.untyped_storage().data_ptr(), None)
    return sum(storages.values()) / len(model.blocks), cfg


@pytest.mark.parametrize(("preset", "seq", "batch"), [("gpt-mini", 256, 2), ("gpt-tiny", 128, 4)])
def test_measured_activation_bytes_within_25_percent_of_the_estimate(
    preset: str, seq: int, batch: int
) -> None:
    """fp32 on CPU, dropout off: PyTorch's CPU attention here keeps the softmax output (a score matrix of
    4-byte values), so the estimate without recompute applies, with 4-byte values. The 25% bar is the
    planning issue's; measured ratios were 1.09 (gpt-mini) and 0.93 (gpt-tiny: its small hidden size makes
    the per-row statistics the formula ignores weigh more). On an H200 in bf16 with Tandem's fused
    attention (no score matrix), bench/activation_memory.py measured 1.02x the selective estimate."""
    measured, cfg = _saved_activation_bytes_per_layer(preset, seq, batch)
    estimate = activation_bytes_per_layer(
        seq_len=seq, micro_batch_size=batch, hidden_size=cfg.hidden_size, num_heads=cfg.num_heads,
        recompute="none", bytes_per_value=4, dropout=False,
    )  # fmt: skip
    assert 0.75 <= measured / estimate <= 1.25, (measured, estimate, measured / estimate)


SHAPE = ModelShape(
    num_layers=8,
    hidden_size=1024,
    num_heads=16,
    vocab_size=32000,
    seq_len=1024,
    params_per_layer=12 * 1024**2,
    embedding_params=32000 * 1024,
    final_norm_params=2048,
)


def test_estimate_memory_adds_up_by_hand() -> None:
    est = estimate_memory(SHAPE, Layout(dp=4, zero_stage=1, micro_batch_size=2))
    psi = SHAPE.total_params
    assert est.params == 2 * psi and est.grads == 2 * psi and est.optimizer == 12 * psi / 4
    sbh = 1024 * 2 * 1024
    assert est.activations == 8 * sbh * (34 + 5 * 16 * 1024 / 1024)
    assert est.output_layer == 4 * sbh * (1 + 32000 / 1024)
    assert est.total == est.params + est.grads + est.optimizer + est.activations + est.output_layer


def test_fused_loss_output_layer_by_hand() -> None:
    """loss_chunk_size: one chunk's logits (fp32 + the bf16 product) instead of the micro-batch's, plus the
    gradients the fused loss keeps (dhidden in bf16 in place of the head's input, dweight in fp32) and its
    bf16 dW product buffer."""
    sbh, v, h = 1024 * 16 * 1024, 32000, 1024
    est = estimate_memory(SHAPE, Layout(micro_batch_size=16, loss_chunk_size=2048))
    assert est.output_layer == 4 * sbh + 6 * 2048 * v + 6 * v * h
    full = estimate_memory(SHAPE, Layout(micro_batch_size=16))
    assert full.output_layer == 4 * sbh * (1 + v / h)
    # 2.1 GB of fp32 logits for 16k tokens -> one 2048-token chunk and the dW buffers: 0.66 GB in all.
    # (At a few thousand tokens per micro-batch the dW buffers, 6·v·h, eat most of the saving.)
    assert est.output_layer < full.output_layer / 3
    assert "loss-chunk=512" in Layout(loss_chunk_size=512).describe()
    with pytest.raises(PlanError, match="tp=1"):
        estimate_memory(SHAPE, Layout(tp=2, micro_batch_size=2, loss_chunk_size=512))


def test_search_fuses_the_loss_where_the_layout_allows() -> None:
    """search_layouts(loss_chunk_size=c): the tp=1 pp=1 layouts plan one chunk's logits (the others keep
    the full logits: the fused loss needs the whole vocabulary on one rank), and their output-layer bytes
    drop by the by-hand difference. On one 4.5 GB GPU (4.05 GB usable) at mbs 8 only the fused loss fits:
    4.31 GB with the 1.08 GB of fp32 logits of 8k tokens over 32k words, 3.85 GB with one 2048-token
    chunk's and the dW buffers (0.62 GB)."""
    c, v, h = 2048, 32000, 1024
    hw = Hardware(gpu_memory_gb=80)
    full = search_layouts(SHAPE, hw, num_gpus=4, global_batch_size=32)
    fused = search_layouts(SHAPE, hw, num_gpus=4, global_batch_size=32, loss_chunk_size=c)
    assert len(full.candidates) == len(fused.candidates)
    by_layout = {dataclasses.replace(x.layout, loss_chunk_size=0): x for x in full.candidates}
    assert any(x.layout.loss_chunk_size for x in fused.candidates)
    for cand in fused.candidates:
        lay = cand.layout
        plain = by_layout[dataclasses.replace(lay, loss_chunk_size=0)]
        if lay.tp == 1 and lay.pp == 1:
            sbh = SHAPE.seq_len * lay.micro_batch_size * h
            assert lay.loss_chunk_size == c and "loss fused with the LM head" in " ".join(cand.reasons)
            chunk = min(c, SHAPE.seq_len * lay.micro_batch_size)
            saved = 4 * sbh * v / h - (6 * chunk * v + 6 * v * h)
            assert plain.memory.output_layer - cand.memory.output_layer == pytest.approx(saved)
        else:
            assert lay.loss_chunk_size == 0 and cand.memory.total == plain.memory.total
    small = Hardware(gpu_memory_gb=4.5)
    mbs8 = {"micro_batch_sizes": (8,), "recompute": ("full",)}
    with pytest.raises(PlanError, match="nothing fits"):
        search_layouts(SHAPE, small, num_gpus=1, global_batch_size=8, **mbs8)
    fits = search_layouts(SHAPE, small, num_gpus=1, global_batch_size=8, loss_chunk_size=c, **mbs8)
    assert fits.candidates[0].layout.loss_chunk_size == c
    with pytest.raises(PlanError, match="loss_chunk_size=-1"):
        search_layouts(SHAPE, hw, num_gpus=4, global_batch_size=32, loss_chunk_size=-1)


def _saved_output_layer_bytes(chunk: int, seq: int = 128, batch: int = 4) -> tuple[float, object]:
    """Bytes autograd keeps for the backward of the final norm, LM head and loss of a tiny fp32 GPT (every
    label valid, so nothing is filtered), measured by saved-tensor hooks; parameters are not counted."""
    import torch

    from pretrain.losses import fused_token_cross_entropy, token_cross_entropy
    from pretrain.models import build_model

    cfg = load_config(
        None,
        ["data.shards=unused", "model.preset=gpt-tiny", "model.vocab_size=512", f"model.max_seq_len={seq}"],
    ).model
    torch.manual_seed(0)
    model = build_model(cfg).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    x = torch.randn(batch, seq, cfg.hidden_size, requires_grad=True)
    labels = torch.randint(0, cfg.vocab_size, (batch, seq))
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = model.final_norm(x)
        weight = model.embed.weight
        if chunk:
            fused_token_cross_entropy(hidden, weight, None, labels, chunk_size=chunk)
        else:
            token_cross_entropy(torch.nn.functional.linear(hidden, weight), labels)
    return float(sum(storages.values())), cfg


@pytest.mark.parametrize("chunk", [0, 64])
def test_measured_output_layer_bytes_within_25_percent_of_the_estimate(chunk: int) -> None:
    """fp32 on CPU. What the backward keeps against the estimate's output layer (for chunk > 0 less the
    one chunk of logits, which is transient: formed and freed inside the forward). The estimate leaves out
    the per-row norm statistics and the labels (~1% here: measured 1.005 with chunking, 1.006 without);
    5% holds that with room, and a lost or doubled term would not (counting the head's fp32 input at 2
    bytes, as before this estimate knew fp32, gives 1.21)."""
    seq, batch = 128, 4
    measured, cfg = _saved_output_layer_bytes(chunk, seq, batch)
    shape = ModelShape(
        num_layers=1, hidden_size=cfg.hidden_size, num_heads=cfg.num_heads, vocab_size=cfg.vocab_size,
        seq_len=seq, params_per_layer=0, embedding_params=0, final_norm_params=0,
    )  # fmt: skip
    est = estimate_memory(shape, Layout(micro_batch_size=batch, loss_chunk_size=chunk), precision="fp32")
    expected = est.output_layer - (4 * chunk * cfg.vocab_size if chunk else 0)
    assert 0.97 <= measured / expected <= 1.05, (measured, expected, measured / expected)


class _LiveBytes:
    """Peak bytes of the tensors created while it is active (a TorchDispatchMode over every op; each new
    storage counts from the op that makes it until the tensor that owns it is collected). Storages that
    exist before (inputs, parameters) and views of anything already counted are not counted again."""

    def __init__(self, known: list) -> None:
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self
        self.known = {t.untyped_storage().data_ptr() for t in known}
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if not hasattr(t, "untyped_storage"):
                        continue
                    key, size = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
                    if size == 0 or key in tracker.known or key in tracker.live:
                        continue
                    tracker.live[key] = size
                    tracker.current += size
                    tracker.peak = max(tracker.peak, tracker.current)
                    weakref.finalize(t, tracker.free, key)
                return out

        self.mode = Mode()

    def free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_measured_peak_of_the_fused_loss_matches_the_estimate(dtype: str) -> None:
    """The transient side of the fused loss's estimate, measured: while linear_cross_entropy runs (torch
    path, CPU), the peak bytes of what it allocates against the planner's terms for it: one chunk's logits
    (6·c·V in bf16: fp32 plus the 16-bit product or copy; 4·c·V in fp32), the dW sum and product buffer
    (6·V·h; 4·V·h in fp32) and dhidden (its s·b·h values, inside the planner's 2·s·b·h·bytes). Per-row
    vectors (losses, log-sum-exps) are the rest: measured 1.001x (bf16) and 1.025x (fp32); before the chunk
    buffers were freed early, 1.97x and 3.18x. A chunk's logits held one chunk too
    long, or a (V, h) temporary per chunk, would be +30% or more here."""
    import torch

    from pretrain.kernels.cross_entropy import linear_cross_entropy

    n, c, v, chunk = 512, 32, 1000, 128
    torch_dtype, value_bytes = (torch.bfloat16, 2) if dtype == "bf16" else (torch.float32, 4)
    hidden = torch.randn(n, c, dtype=torch_dtype, requires_grad=True)
    weight = torch.randn(v, c, dtype=torch_dtype, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    live = _LiveBytes([hidden, weight, targets])
    with live.mode:
        loss = linear_cross_entropy(hidden, weight, targets, chunk_size=chunk, backend="torch")
    del loss
    logit_bytes = 4 + (value_bytes if value_bytes < 4 else 0)
    expected = (
        logit_bytes * chunk * v + (4 + (value_bytes if value_bytes < 4 else 0)) * v * c + value_bytes * n * c
    )
    assert 0.95 <= live.peak / expected <= 1.1, (live.peak, expected, live.peak / expected)


def test_pipeline_first_stage_holds_pp_micro_batches() -> None:
    one = activation_bytes_per_layer(seq_len=1024, micro_batch_size=1, hidden_size=1024, num_heads=16)
    first = estimate_memory(SHAPE, Layout(pp=4, num_micro_batches=16))
    assert first.stage == "first"
    assert first.activations == one * (8 // 4) * 4  # L/p layers x p micro-batches in flight (1F1B)
    few = estimate_memory(SHAPE, Layout(pp=4, num_micro_batches=2))
    assert few.activations == one * 2 * 2  # never more in flight than there are micro-batches
    with pytest.raises(PlanError, match="pp=3 does not divide num_layers=8"):
        estimate_memory(SHAPE, Layout(pp=3))


@pytest.mark.parametrize("preset", ["gpt-tiny", "llama-tiny"])
def test_model_shape_counts_match_the_real_model(preset: str) -> None:
    from pretrain.models import build_model

    cfg = load_config(None, [f"model.preset={preset}", "model.vocab_size=300", "data.shards=x"]).model
    shape = model_shape(cfg, seq_len=64)
    assert shape.total_params == sum(p.numel() for p in build_model(cfg).parameters())


def _gpt3() -> ModelShape:
    cfg, seq_len, _ = load_model_for_planning("gpt-175b")
    assert cfg.model.vocab_size == 50257 and seq_len == 2048
    return model_shape(cfg.model, seq_len=seq_len)


def test_gpt3_175b_on_1024_a100_80gb_fits() -> None:
    shape = _gpt3()
    assert shape.total_params == pytest.approx(175e9, rel=0.01)
    hw = Hardware(gpu_memory_gb=80)
    result = search_layouts(shape, hw, num_gpus=1024, global_batch_size=1536)
    best = result.candidates[0]
    assert best.fits and best.memory.total <= hw.usable_bytes
    assert best.layout.world_size == 1024 and best.layout.tp <= 8
    assert best.layout.pp > 1  # 175B does not fit without a pipeline on 80 GB cards
    assert 0.2 < best.mfu < 0.6 and best.reasons


def test_impossible_requests_are_refused_with_a_reason() -> None:
    shape = _gpt3()
    with pytest.raises(PlanError, match="nothing fits in 80 GB per GPU"):
        search_layouts(shape, Hardware(gpu_memory_gb=80), num_gpus=8, global_batch_size=64)
    with pytest.raises(PlanError, match="no valid layout"):
        search_layouts(shape, Hardware(gpu_memory_gb=80), num_gpus=1024, global_batch_size=3)
    with pytest.raises(PlanError, match="gpus=0"):
        search_layouts(shape, Hardware(gpu_memory_gb=80), num_gpus=0, global_batch_size=64)


def _cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="verb")
    register(sub)
    args = p.parse_args(argv)
    return args.func(args)


def test_plan_verb(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "--model", "configs/models/gpt-175b.yaml", "--gpus", "1024", "--gpu-memory", "80"]
    assert _cli([*argv, "--global-batch-size", "1536", "--json"]) == 0
    out = capsys.readouterr().out
    best = json.loads(out.strip().splitlines()[-1])
    assert best["fits"] and best["memory"]["total_gb"] <= 72 and best["tp"] * best["pp"] * best["dp"] == 1024
    assert "layouts fit on 1024 x 80 GB" in out
    assert _cli(["plan", "--model", "gpt-175b", "--gpus", "8", "--gpu-memory", "80"]) == 2
    assert "cannot plan gpt-175b on 8 x 80 GB: nothing fits" in capsys.readouterr().err


def test_plan_verb_takes_the_fused_loss_from_the_run_config(tmp_path, capsys) -> None:
    """A run config's train.loss_chunk_size is planned with (on a layout that can fuse the loss);
    --loss-chunk-size overrides it; a negative one is refused naming the value."""
    import yaml

    from tests.conftest import SMOKE_CONFIG

    run = yaml.safe_load(SMOKE_CONFIG.read_text(encoding="utf-8"))
    run.setdefault("train", {})["loss_chunk_size"] = 1024
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run), encoding="utf-8")
    argv = ["plan", "--model", str(path), "--gpus", "1", "--gpu-memory", "80", "--json"]
    chunks = []
    for extra in ([], ["--loss-chunk-size", "0"]):
        assert _cli([*argv, *extra]) == 0
        chunks.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss_chunk_size"])
    assert chunks == [1024, 0]
    assert _cli([*argv, "--loss-chunk-size", "-1"]) == 2
    assert "loss_chunk_size=-1: must be >= 0" in capsys.readouterr().err
