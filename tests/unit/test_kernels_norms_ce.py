"""Fused RMSNorm/LayerNorm and cross-entropy kernels against float64 references written out here.

Same conventions as test_kernels_attention.py: Triton's interpreter on CPU (TRITON_INTERPRET=1 set before
the kernel modules are imported), tiny shapes with widths that are not powers of two, every buffer a
kernel writes starts as NaN, fresh inputs each run (seed printed; replay with TANDEM_SEED).

Tolerances relative to max(1, max|reference|): fp32 1e-5 (row reductions over <= 100 elements, ~1e-7
each), fp16 4e-3 and bf16 3e-2 (the output is rounded to the input dtype: 2^-11 and 2^-8 relative).
"""

from __future__ import annotations

import importlib
import os
import sys
import time

import pytest
import torch
import torch.nn.functional as F

TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _import_kernels():
    """The kernel modules, interpreted when there is no GPU (re-imported if defined compiled)."""
    names = ["pretrain.kernels.flash_attention", "pretrain.kernels.norms", "pretrain.kernels.cross_entropy"]
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
        if names[0] in sys.modules and not sys.modules[names[0]].interpreting():
            for name in names:
                if name in sys.modules:
                    importlib.reload(sys.modules[name])
    return [importlib.import_module(n) for n in names[1:]]


norms, ce = _import_kernels()


@pytest.fixture(autouse=True)
def seed() -> int:
    value = int(os.environ.get("TANDEM_SEED", time.time_ns() % 2**31))
    print(f"seed={value} (rerun with TANDEM_SEED={value})")
    torch.manual_seed(value)
    return value


@pytest.fixture(autouse=True)
def poisoned(monkeypatch: pytest.MonkeyPatch) -> None:
    def nan_empty(shape, *, dtype, device, stride=None):
        out = torch.empty(shape, dtype=dtype, device=device) if stride is None else None
        out = out if out is not None else torch.empty_strided(shape, stride, dtype=dtype, device=device)
        return out.fill_(float("nan"))

    monkeypatch.setattr(norms, "_empty", nan_empty)
    monkeypatch.setattr(ce, "_empty", nan_empty)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert not got.isnan().any(), "NaN in the kernel's result: an element was never written"
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp(min=1.0)).item()


def norm_reference(x, w, b, eps, rms: bool) -> torch.Tensor:
    x = x.double()
    if rms:
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    else:
        xc = x - x.mean(-1, keepdim=True)
        y = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    if w is not None:
        y = y * w.double()
    if b is not None:
        y = y + b.double()
    return y


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
@pytest.mark.parametrize(
    "kind", ["rms", "rms_no_weight", "layer", "layer_no_bias"], ids=lambda k: k.replace("_", "-")
)
def test_norm_forward_and_grads_match_fp64(kind: str, dtype: torch.dtype):
    rms = kind.startswith("rms")
    n = 100  # not a power of two: the 128-wide block is masked
    x = (torch.randn(3, 7, n, device=DEVICE) * 3 + 1).to(dtype).requires_grad_()  # (B, T, N); 21 rows
    w = None if kind == "rms_no_weight" else (torch.randn(n, device=DEVICE) + 1).to(dtype).requires_grad_()
    b = torch.randn(n, device=DEVICE).to(dtype).requires_grad_() if kind == "layer" else None
    if rms:
        y = norms.rms_norm(x, w, 1e-6, backend="triton")
    else:
        y = norms.layer_norm(x, w, b, 1e-5, backend="triton")
    dy = torch.randn_like(y)
    y.backward(dy)
    leaves = [t for t in (x, w, b) if t is not None]
    got = [y] + [t.grad for t in leaves]
    for t in leaves:
        t.grad = None
    want = norm_reference(x, w, b, 1e-6 if rms else 1e-5, rms)
    want.backward(dy.double())
    errs = [rel_err(g, t) for g, t in zip(got, [want] + [t.grad for t in leaves], strict=True)]
    # weight/bias grads sum 21 rows of products: allow 4x the per-element tolerance.
    assert errs[0] < TOL[dtype] and max(errs[1:]) < 4 * TOL[dtype], errs


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_fused_norm_modules_are_drop_in(kind: str):
    """The modules the models build: same state dict as torch's; with the norm backend forced to Triton
    (interpreted on CPU) output and every gradient match torch's module within the fp32 tolerance."""
    from pretrain.kernels import FusedLayerNorm, FusedRMSNorm, set_default_norm_backend

    fused, ref = (
        (FusedLayerNorm(40), torch.nn.LayerNorm(40))
        if kind == "layernorm"
        else (FusedRMSNorm(40, eps=1e-6), torch.nn.RMSNorm(40, eps=1e-6))
    )
    assert isinstance(fused, type(ref))
    with torch.no_grad():
        for p in fused.parameters():
            p.normal_()
    ref.load_state_dict(fused.state_dict())
    fused, ref = fused.to(DEVICE), ref.to(DEVICE)
    x = torch.randn(3, 7, 40, device=DEVICE, requires_grad=True)
    dy = torch.randn(3, 7, 40, device=DEVICE)
    previous = set_default_norm_backend("triton")
    try:
        got = fused(x)
        got.backward(dy)
    finally:
        set_default_norm_backend(previous)
    assert type(got.grad_fn).__name__ == "_FusedNormBackward"  # the kernels ran, not the fallback
    got_grads = [x.grad.clone(), *(p.grad for p in fused.parameters())]
    x.grad = None
    want = ref(x)
    want.backward(dy)
    want_grads = [x.grad, *(p.grad for p in ref.parameters())]
    assert rel_err(got, want) < TOL[torch.float32]
    # weight/bias grads sum 21 rows of products: 4x the per-element tolerance, as above.
    assert max(rel_err(g, w) for g, w in zip(got_grads, want_grads, strict=True)) < 4 * TOL[torch.float32]


def ce_reference(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.double(), targets, ignore_index=-100)


def make_targets(n: int, v: int) -> torch.Tensor:
    t = torch.randint(0, v, (n,), device=DEVICE)
    t[torch.rand(n, device=DEVICE) < 0.3] = -100  # padding / unmasked positions
    t[0], t[-1] = 0, v - 1  # the first and the last vocabulary column are targets somewhere
    return t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_cross_entropy_loss_and_grad_match_fp64(dtype: torch.dtype, inplace: bool):
    n, v = 13, 203  # v spans 4 interpreter blocks of 64, the last one partial
    logits = (torch.randn(n, v, device=DEVICE) * 4).to(dtype)
    targets = make_targets(n, v)
    leaf = logits.clone().requires_grad_()
    # inplace overwrites its input with the gradient: hand it a non-leaf copy
    loss = ce.cross_entropy(leaf * 1 if inplace else leaf, targets, inplace=inplace, backend="triton")
    loss.backward(torch.tensor(2.5, device=DEVICE))
    want_leaf = logits.double().requires_grad_()
    want = ce_reference(want_leaf, targets)
    (want * 2.5).backward()
    assert rel_err(loss, want) < TOL[dtype], (loss.item(), want.item())
    assert rel_err(leaf.grad, want_leaf.grad) < TOL[dtype]


def test_cross_entropy_all_ignored_is_zero_not_nan():
    logits = torch.randn(4, 70, device=DEVICE, requires_grad=True)
    loss = ce.cross_entropy(logits, torch.full((4,), -100, device=DEVICE), backend="triton")
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cross_entropy_without_grad_leaves_the_logits(backend: str):
    """Under torch.no_grad (validation) the kernel forms no gradient: the loss is the same, and even
    `inplace=True` leaves the logits as they were (with a gradient wanted it writes dlogits over them).
    The chunked loss's evaluation pass goes through the same row function: no dlogits, logits intact."""
    n, v = 11, 203
    logits = torch.randn(n, v, device=DEVICE) * 4
    targets = make_targets(n, v)
    kept = logits.clone()
    with torch.no_grad():
        loss = ce.cross_entropy(logits, targets, inplace=True, backend=backend)
    assert torch.equal(logits, kept), "the logits were overwritten under no_grad"
    assert rel_err(loss, ce_reference(logits.double(), targets)) < TOL[torch.float32]
    losses, grad, lse = ce._ce_rows(logits, targets, 1.0, inplace=True, use_triton=backend == "triton",
                                    need_grad=False)  # fmt: skip
    keep = targets != -100
    want_lse = torch.logsumexp(logits.double(), -1) * keep
    assert grad is None and torch.equal(logits, kept)
    assert rel_err(lse, want_lse) < TOL[torch.float32]
    assert rel_err(losses.sum() / keep.sum(), ce_reference(logits.double(), targets)) < TOL[torch.float32]
    with_grad = logits.clone().requires_grad_()
    ce.cross_entropy(with_grad * 1, targets, backend=backend).backward()  # the same call, gradient wanted
    assert with_grad.grad is not None and with_grad.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_linear_cross_entropy_matches_fp64_without_full_logits(backend: str):
    n, c, v = 23, 24, 150
    hidden = torch.randn(n, c, device=DEVICE, requires_grad=True)  # (N, C)
    weight = (torch.randn(v, c, device=DEVICE) * 0.3).requires_grad_()  # (V, C)
    targets = make_targets(n, v)
    # chunk 8 rows: 3 chunks, the last one partial
    loss = ce.linear_cross_entropy(hidden, weight, targets, chunk_size=8, backend=backend)
    loss.backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    want = ce_reference(h64 @ w64.t(), targets)
    want.backward()
    errs = [rel_err(loss, want), rel_err(hidden.grad, h64.grad), rel_err(weight.grad, w64.grad)]
    assert max(errs) < TOL[torch.float32], errs


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_linear_cross_entropy_with_bias_matches_fp64(backend: str):
    """BERT's MLM bias / BART's final_logits_bias: logits = h W^T + b; the bias gradient is the column sum
    of dlogits over every chunk."""
    n, c, v = 21, 16, 70
    hidden = torch.randn(n, c, device=DEVICE, requires_grad=True)
    weight = (torch.randn(v, c, device=DEVICE) * 0.3).requires_grad_()
    bias = torch.randn(v, device=DEVICE).requires_grad_()
    targets = make_targets(n, v)
    loss = ce.linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=8, backend=backend)
    loss.backward()
    leaves64 = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    want = ce_reference(leaves64[0] @ leaves64[1].t() + leaves64[2], targets)
    want.backward()
    errs = [rel_err(loss, want)] + [
        rel_err(t.grad, r.grad) for t, r in zip((hidden, weight, bias), leaves64, strict=True)
    ]
    assert max(errs) < TOL[torch.float32], errs


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_linear_cross_entropy_with_z_loss_matches_fp64(backend: str):
    """PaLM's z-loss folded into the same pass: loss = CE + c * mean(lse^2) over the non-ignored rows, its
    gradient 2 c lse softmax added to the CE's; the metric is mean(lse^2). c = 0.3 (PaLM uses 1e-4) so
    the z-term carries a visible share of every gradient."""
    n, c, v, coef = 21, 16, 70, 0.3
    hidden = torch.randn(n, c, device=DEVICE, requires_grad=True)
    weight = (torch.randn(v, c, device=DEVICE) * 0.5).requires_grad_()
    targets = make_targets(n, v)
    loss, z = ce.linear_cross_entropy(
        hidden, weight, targets, chunk_size=8, backend=backend, z_loss=coef, return_z=True
    )
    loss.backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    logits = h64 @ w64.t()
    keep = targets != -100
    z_want = (torch.logsumexp(logits, -1)[keep] ** 2).mean()
    want = ce_reference(logits, targets) + coef * z_want
    want.backward()
    assert z.grad_fn is None and rel_err(z, z_want) < TOL[torch.float32]
    errs = [rel_err(loss, want), rel_err(hidden.grad, h64.grad), rel_err(weight.grad, w64.grad)]
    assert max(errs) < TOL[torch.float32], errs


def test_linear_cross_entropy_without_grad_is_the_loss_only():
    """Under torch.no_grad (validation) only the logits matmul runs, one per chunk (with gradients wanted
    there are three: logits, dhidden, dweight); the loss is the same."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMatmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func.overloadpacket in (
                torch.ops.aten.mm,
                torch.ops.aten.addmm,
                torch.ops.aten.addmm_,
            )
            return func(*args, **(kwargs or {}))

    n, c, v = 19, 16, 50
    hidden = torch.randn(n, c, device=DEVICE, requires_grad=True)
    weight = torch.randn(v, c, device=DEVICE, requires_grad=True)
    targets = make_targets(n, v)
    counts = []
    for grad in (True, False):
        with torch.set_grad_enabled(grad), CountMatmuls() as mode:
            loss = ce.linear_cross_entropy(hidden, weight, targets, chunk_size=4, backend="torch")
        counts.append(mode.count)
    assert counts == [15, 5], counts  # 5 chunks of <= 4 rows
    assert loss.grad_fn is None
    want = ce_reference(hidden.detach().double() @ weight.detach().double().t(), targets)
    assert rel_err(loss, want) < TOL[torch.float32]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_linear_cross_entropy_fp16_under_a_loss_scale(backend: str):
    """fp16 training multiplies the loss by a scale (DeepSpeed starts at 2^16) so that small gradients
    survive fp16. The fused loss forms its gradients in the forward: it must round them to fp16 unscaled
    (|softmax - onehot| <= 1) and apply dloss / n_valid in fp32 in the backward; scaled by 1/n_valid first
    they fall below fp16's normal range (~1e-3 / 2048 here), and 2^16 itself is inf in fp16.

    Tolerance: relative to each gradient's largest element (they are ~1e-3, so the usual max(1, .) floor
    would hide everything): fp16 rounding of dlogits and of the result, 2^-11 each, with fp32 sums: 4e-3."""
    n, c, v = 2048, 32, 300
    hidden = torch.randn(n, c, device=DEVICE).half().requires_grad_()
    weight = (torch.randn(v, c, device=DEVICE) * 0.3).half().requires_grad_()
    targets = make_targets(n, v)
    loss = ce.linear_cross_entropy(hidden, weight, targets, chunk_size=512, backend=backend)
    (loss * 2.0**16).backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    want = ce_reference(h64 @ w64.t(), targets)
    want.backward()
    assert rel_err(loss, want) < TOL[torch.float16]
    for got, ref in ((hidden.grad, h64.grad), (weight.grad, w64.grad)):
        assert got.dtype == torch.float16 and torch.isfinite(got).all()
        err = ((got.double() / 2.0**16 - ref).abs().max() / ref.abs().max()).item()
        assert err < TOL[torch.float16], err


def test_linear_cross_entropy_bf16_matches_fp64():
    """bf16 operands: the matmuls run in bf16 with fp32 accumulation (as F.linear), dW summed in fp32."""
    n, c, v = 40, 32, 300
    hidden = torch.randn(n, c, device=DEVICE).bfloat16().requires_grad_()
    weight = (torch.randn(v, c, device=DEVICE) * 0.3).bfloat16().requires_grad_()
    targets = make_targets(n, v)
    loss = ce.linear_cross_entropy(hidden, weight, targets, chunk_size=16)
    loss.backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    want = ce_reference(h64 @ w64.t(), targets)
    want.backward()
    errs = [rel_err(loss, want), rel_err(hidden.grad, h64.grad), rel_err(weight.grad, w64.grad)]
    assert max(errs) < TOL[torch.bfloat16], errs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_real_size_norms_and_ce_bf16():
    x = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = norms.rms_norm(x, w, 1e-6)
    y.sum().backward()
    assert rel_err(y, norm_reference(x, w, None, 1e-6, True)) < TOL[torch.bfloat16]
    hidden = torch.randn(8192, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(50304, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True) * 0.02
    targets = torch.randint(0, 50304, (8192,), device="cuda")
    loss = ce.linear_cross_entropy(hidden, weight, targets)
    want = F.cross_entropy(hidden.float() @ weight.float().t(), targets)
    assert abs(loss.item() - want.item()) < 1e-3 * want.item()


# ----------------------------------------------------------------------------- the models on these paths

# (preset, extra overrides): tied and untied heads of every family, biases on the head (BERT's MLM bias,
# BART's final_logits_bias), MoE auxiliary losses, and dropout (masks drawn in the same order on both paths).
MODEL_CASES = {
    "gpt-tied": ("gpt-tiny", ["model.dropout=0.1"]),
    "llama-untied": ("llama-tiny", []),
    "gpt-moe": ("gpt-moe-tiny", []),
    "bert-tied": ("bert-tiny", ["model.dropout=0.1"]),
    "bert-untied": ("bert-tiny", ["model.tie_embeddings=false"]),
    "t5-tied": ("t5-tiny", []),
    "t5-untied": ("t5-tiny", ["model.tie_embeddings=false", "model.dropout=0.1"]),
    "bart-tied": ("bart-tiny", []),
    "palm-z-loss": ("palm-tiny", ["model.z_loss=0.1"]),  # 1e-4 in the preset; 0.1 to weigh in the gradients
}


def tiny_model_and_batch(case: str, seed: int):
    """A tiny model of the case (vocab 96) and one batch of its objective's shape: causal LM labels
    (GPT), 15% masked labels (BERT), a target sequence (T5/BART); some labels are IGNORE (-100)."""
    from pretrain.config import load_config
    from pretrain.models import build_model

    preset, extra = MODEL_CASES[case]
    overrides = ["data.shards=unused", f"model.preset={preset}", "model.vocab_size=96", *extra]
    cfg = load_config(None, overrides).model
    torch.manual_seed(seed)
    model = build_model(cfg).to(DEVICE)
    b, t = 2, 12
    ids = torch.randint(0, 96, (b, t), device=DEVICE)
    if cfg.family == "gpt":
        batch = {"input_ids": ids, "labels": torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)}
    elif cfg.family == "bert":
        labels = torch.where(torch.rand(b, t, device=DEVICE) < 0.15, ids, torch.full_like(ids, -100))
        labels[0, 0] = ids[0, 0]  # at least one labelled token
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    else:
        target = torch.randint(0, 96, (b, 7), device=DEVICE)
        labels = target.clone()
        labels[1, 5:] = -100  # a shorter second target
        batch = {"input_ids": ids, "decoder_input_ids": target, "labels": labels}
    return model, batch


def loss_and_grads(
    model, batch, seed: int, **loss_kw
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, float]]:
    """The loss, every parameter's gradient, and the loss's extra metrics (z_loss, MoE routing)."""
    from pretrain.losses import LanguageModelLoss

    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks on both paths
    wrapped = LanguageModelLoss(model, **loss_kw)
    loss = wrapped(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, dict(wrapped.metrics)


# fp32 against fp32 with the same operations in another order (chunked dW sums, unlabelled rows dropped
# before the head, the norm kernels' row reductions): seen up to 2e-6 (T5's gradients, through two stacks
# and the cross-attention) over several seeds, 1e-7 typical. Each gradient is compared
# relative to its own largest element (these gradients are ~1e-2, so rel_err's floor of 1 would make the
# bound absolute), with a floor of 1e-3 x the model's largest gradient for tensors whose gradient is
# nearly zero (a key bias's is exactly 0 in exact arithmetic). 1e-5 is the project's parity bound.
MODEL_TOL = 1e-5


def grad_errors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, float]:
    assert sorted(got) == sorted(want)
    floor = 1e-3 * max(g.abs().max().item() for g in want.values())
    return {
        n: ((got[n].double() - want[n].double()).abs().max() / max(want[n].abs().max().item(), floor)).item()
        for n in want
    }


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs() / want.double().abs()).item()


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_chunked_loss_trains_like_full_logits(case: str, seed: int):
    """train.loss_chunk_size: the output projection fused into the loss (5 labelled tokens a chunk) gives
    the loss and every parameter gradient of logits-then-cross-entropy: tied and untied heads, T5's
    rescaled tied head, BERT's MLM bias, BART's final_logits_bias, the MoE auxiliary losses, PaLM's z-loss
    (and the metrics they report), dropout."""
    from pretrain.losses import LanguageModelLoss

    model, batch = tiny_model_and_batch(case, seed)
    want_loss, want, want_metrics = loss_and_grads(model, batch, seed)
    got_loss, got, got_metrics = loss_and_grads(model, batch, seed, loss_chunk_size=5)
    assert rel(got_loss, want_loss) < MODEL_TOL
    assert sorted(got_metrics) == sorted(want_metrics)
    for key, value in want_metrics.items():
        assert abs(got_metrics[key] - value) <= MODEL_TOL * max(abs(value), 1e-6), (
            key,
            got_metrics[key],
            value,
        )
    errs = grad_errors(got, want)
    assert max(errs.values()) < MODEL_TOL, max(errs.items(), key=lambda kv: kv[1])
    from pretrain.losses import token_cross_entropy

    with torch.no_grad():  # validation: the loss only (no gradient formed), the plain cross-entropy (no
        # z-loss, no MoE auxiliary losses), as the logits path's
        wrapped = LanguageModelLoss(model, loss_chunk_size=5).eval()
        plain = token_cross_entropy(
            model(**{k: x for k, x in batch.items() if k != "labels"}), batch["labels"]
        )
        assert rel(wrapped(batch), plain) < MODEL_TOL
        assert rel(LanguageModelLoss(model).eval()(batch), plain) < MODEL_TOL


@pytest.mark.parametrize("chunk", [0, 5])
@pytest.mark.parametrize("case", ["gpt-tied", "bert-tied", "t5-untied"])
def test_a_micro_batch_without_labels_gives_zero_loss_on_both_paths(case: str, chunk: int, seed: int):
    """No labelled token in the micro-batch: loss 0 and no gradient, the same with the chunked loss (chunk
    5) and the logits path (0), where F.cross_entropy's mean is NaN (0/0) and would make the step guard
    skip the whole step. Exact: a sum over no token is 0."""
    model, batch = tiny_model_and_batch(case, seed)
    batch["labels"] = torch.full_like(batch["labels"], -100)
    loss, grads, _ = loss_and_grads(model, batch, seed, loss_chunk_size=chunk)
    assert loss.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads.values())
    from parallel.tensor import vocab_parallel_cross_entropy

    # The loss under tensor parallelism, at one rank (no process group): 0, and a zero gradient (the NaN
    # reached the backward too, as 1/0 times the per-token gradient).
    with torch.no_grad():
        logits = model(**{k: x for k, x in batch.items() if k != "labels"}).float()
    logits.requires_grad_()
    tp_loss = vocab_parallel_cross_entropy(logits, batch["labels"], None)
    tp_loss.backward()
    assert tp_loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0


@pytest.mark.parametrize("case", ["llama-untied", "bert-untied", "t5-tied", "bart-tied"])
def test_fused_norms_train_like_torch_norms(case: str, seed: int):
    """train.norm_backend=triton: every RMSNorm (Llama, T5) / LayerNorm (BERT, BART: embedding, block,
    MLM-head norms) of the model runs the kernels (interpreted on CPU); loss and gradients as torch's."""
    from pretrain.kernels import set_default_norm_backend

    model, batch = tiny_model_and_batch(case, seed)
    want_loss, want, _ = loss_and_grads(model, batch, seed)
    previous = set_default_norm_backend("triton")
    try:
        got_loss, got, _ = loss_and_grads(model, batch, seed)
    finally:
        set_default_norm_backend(previous)
    assert rel(got_loss, want_loss) < MODEL_TOL
    errs = grad_errors(got, want)
    assert max(errs.values()) < MODEL_TOL, max(errs.items(), key=lambda kv: kv[1])
    assert any(not torch.equal(got[n], want[n]) for n in want)  # other sums: the kernels really ran
