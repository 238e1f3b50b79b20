"""Fused RMSNorm and LayerNorm (forward + backward) in Triton, with a PyTorch fallback.

`rms_norm(x, weight, eps)` and `layer_norm(x, weight, bias, eps)` normalize over the last dim of x
(..., N). The Triton forward reads each row once and saves only the per-row statistics (mean for
LayerNorm, 1/rms) in fp32; the backward recomputes x_hat from them, writes dx per row and reduces the
weight/bias gradients per program into an fp32 (programs, N) buffer that the host sums, which is
deterministic (no atomics). The modules the models build, `FusedRMSNorm` / `FusedLayerNorm`
(pretrain.kernels.norm_layers, drop-in subclasses of torch's), call these.

backend="auto" uses Triton for CUDA tensors and PyTorch otherwise; "triton" forces the kernels (on a
CPU tensor only under TRITON_INTERPRET=1, see pretrain.kernels.attention); "torch" forces the fallback.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

NormBackend = Literal["auto", "triton", "torch"]
MAX_FUSED_N = 65536  # one row must fit one program's registers/SRAM
CUDA_BWD_PROGRAMS = (
    512  # backward programs on a GPU (~4 per H200 SM); `bench/kernels.py --sweep-norms` times others
)


@triton.jit
def _norm_fwd_kernel(
    X, W, B, Y, MEAN, RSTD,
    stride_x, stride_y, n_cols, eps,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_N,)
    if IS_RMS:
        mean = 0.0
        xc = x
    else:
        mean = tl.sum(x, axis=0) / n_cols
        xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / n_cols + eps)
    y = xc * rstd
    if HAS_W:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _norm_bwd_kernel(
    X, W, DY, DX, MEAN, RSTD, DW_PART, DB_PART,
    stride_x, stride_dy, stride_dx, n_rows, n_cols, rows_per_program,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Rows [pid * rows_per_program, ...): dx per row; this program's partial dw, db in one buffer row."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    w = tl.full([BLOCK_N], 1.0, dtype=tl.float32)
    if HAS_W:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    for row in range(first, last):
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        if IS_RMS:  # noqa: SIM108 (a constexpr branch: only one side is compiled)
            x_hat = x * rstd
        else:
            x_hat = tl.where(mask, (x - tl.load(MEAN + row)) * rstd, 0.0)
        g = dy * w  # dL/dx_hat
        # dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)); RMSNorm has no mean subtraction, so no mean(g).
        c2 = tl.sum(g * x_hat, axis=0) / n_cols
        if IS_RMS:
            dx = (g - x_hat * c2) * rstd
        else:
            c1 = tl.sum(g, axis=0) / n_cols
            dx = (g - c1 - x_hat * c2) * rstd
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * x_hat
        db += dy
    if HAS_W:
        tl.store(DW_PART + pid * n_cols + cols, dw, mask=mask)
    if HAS_B:
        tl.store(DB_PART + pid * n_cols + cols, db, mask=mask)


def _launch_opts(x: torch.Tensor, block_n: int) -> dict:
    if x.device.type != "cuda":
        return {}
    # Untuned defaults: more warps for wider rows so each thread holds <= ~16 elements.
    return {"num_warps": min(max(block_n // 512, 4), 16)}


def _empty(shape, *, dtype: torch.dtype, device: torch.device, stride=None) -> torch.Tensor:
    """torch.empty / empty_strided for every buffer a kernel writes; the tests swap in a NaN-filled
    version so an element a kernel forgets to write shows up."""
    if stride is not None:
        return torch.empty_strided(shape, stride, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


class _FusedNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, is_rms: bool):  # type: ignore[override]
        n = x.shape[-1]
        x2 = x.reshape(-1, n)  # (rows, N)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        rows = x2.shape[0]
        y = _empty((rows, n), device=x.device, dtype=x.dtype)
        mean = _empty((rows,), device=x.device, dtype=torch.float32)
        rstd = _empty((rows,), device=x.device, dtype=torch.float32)
        block_n = triton.next_power_of_2(n)
        dummy = x2
        _norm_fwd_kernel[(rows,)](
            x2, weight if weight is not None else dummy, bias if bias is not None else dummy,
            y, mean, rstd, x2.stride(0), y.stride(0), n, eps,
            IS_RMS=is_rms, HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_N=block_n,
            **_launch_opts(x, block_n),
        )  # fmt: skip
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.meta = (is_rms, bias is not None, x.shape)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x2, weight, mean, rstd = ctx.saved_tensors
        is_rms, has_bias, shape = ctx.meta
        rows, n = x2.shape
        dy2 = dy.reshape(rows, n)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = _empty(x2.shape, device=x2.device, dtype=x2.dtype)
        # Enough programs to fill a GPU (~4 per SM on an H200's 132), each reducing a slice of rows.
        programs = min(rows, CUDA_BWD_PROGRAMS if x2.device.type == "cuda" else 4)
        rows_per_program = triton.cdiv(rows, programs)
        programs = triton.cdiv(rows, rows_per_program)
        dw_part = _empty((programs, n), device=x2.device, dtype=torch.float32)
        db_part = _empty((programs, n), device=x2.device, dtype=torch.float32) if has_bias else dw_part
        block_n = triton.next_power_of_2(n)
        _norm_bwd_kernel[(programs,)](
            x2, weight if weight is not None else x2, dy2, dx, mean, rstd, dw_part, db_part,
            x2.stride(0), dy2.stride(0), dx.stride(0), rows, n, rows_per_program,
            IS_RMS=is_rms, HAS_W=weight is not None, HAS_B=has_bias, BLOCK_N=block_n,
            **_launch_opts(x2, block_n),
        )  # fmt: skip
        dw = dw_part.sum(0).to(weight.dtype) if weight is not None else None
        db = db_part.sum(0).to(weight.dtype if weight is not None else dx.dtype) if has_bias else None
        return dx.view(shape), dw, db, None, None


def _use_triton(x: torch.Tensor, backend: NormBackend) -> bool:
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend={backend!r}: must be 'auto', 'triton' or 'torch'")
    if backend == "torch" or (backend == "auto" and x.device.type != "cuda"):
        return False
    if x.shape[-1] > MAX_FUSED_N:
        if backend == "triton":
            raise ValueError(f"fused norm: last dim {x.shape[-1]} > {MAX_FUSED_N}")
        return False
    if x.device.type != "cuda":
        from pretrain.kernels.flash_attention import check_runnable

        check_runnable(x.device)
    return True


# Run eagerly inside a torch.compile region (train.compile=blocks): one graph break each, rather than
# TorchDynamo tracing the launch code (as pretrain.kernels.flash_attention does).
@torch.compiler.disable
def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float = 1e-6,
    *,
    backend: NormBackend = "auto",
) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim; x: (..., N), weight: (N,) or None."""
    if _use_triton(x, backend):
        return _FusedNorm.apply(x, weight, None, eps, True)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


@torch.compiler.disable
def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    *,
    backend: NormBackend = "auto",
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dim; x: (..., N)."""
    if _use_triton(x, backend):
        return _FusedNorm.apply(x, weight, bias, eps, False)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
