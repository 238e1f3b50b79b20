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


def test_fused_norm_modules_are_drop_in():
    ln = norms.FusedLayerNorm(40).to(DEVICE)
    ref = torch.nn.LayerNorm(40).to(DEVICE)
    ref.load_state_dict(ln.state_dict())
    x = torch.randn(5, 40, device=DEVICE)
    assert torch.allclose(ln(x), ref(x), atol=1e-5)  # torch fallback on CPU, the kernel on CUDA
    rms = norms.FusedRMSNorm(40, eps=1e-6).to(DEVICE)
    assert torch.allclose(rms(x), torch.nn.RMSNorm(40, eps=1e-6).to(DEVICE)(x), atol=1e-5)


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
