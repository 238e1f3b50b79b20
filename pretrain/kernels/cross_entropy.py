"""Fused cross-entropy (mean over non-ignored targets, ignore_index=-100), forward and backward.

Two entry points:

* `cross_entropy(logits, targets)` — logits (N, V). A Triton kernel per row streams the vocabulary in
  blocks with an online log-sum-exp (running max and sum), then writes the row's gradient
  (softmax - onehot) / n_valid in the same call, so the backward is one multiply by the incoming
  scalar. `inplace=True` writes that gradient over the logits buffer (no second (N, V) tensor); only
  use it when nothing else needs the logits afterwards. Under torch.no_grad no gradient is formed (one
  pass over each row instead of two) and the logits are never written.
* `linear_cross_entropy(hidden, weight, targets, bias=None, chunk_size=...)` — hidden (N, C), weight
  (V, C), bias (V,) or None: the LM head and the loss together (what `train.loss_chunk_size` trains with). Tokens are processed in chunks of `chunk_size` rows: each chunk's fp32
  logits (chunk, V) are formed, turned into loss and dlogits (by the kernel above in place, or PyTorch),
  and immediately folded into dhidden = dlogits @ W and dW += dlogits^T @ hidden (matmuls in the
  operands' dtype with fp32 accumulation, like F.linear; dW summed over chunks in fp32). The full (N, V) fp32
  logits never exist: one chunk's are, 4 x chunk x V bytes (4096 x 50k = 800 MiB, against 6.4 GiB for
  N = 32k tokens at once), plus, with 16-bit operands, their 16-bit product or copy (2 x chunk x V) and
  the (V, C) fp32 dW sum and 16-bit product buffer (6 x V x C).

With no non-ignored target the loss is 0 with zero gradients (PyTorch's mean would give NaN): a
fully padded micro batch must not poison a run.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

CEBackend = Literal["auto", "triton", "torch"]
IGNORE_INDEX = -100


@triton.jit
def _ce_kernel(
    LOGITS, GRAD, TARGETS, LOSS, LSE,
    stride_l, stride_g, n_cols, grad_scale, z_coef, ignore_index,
    BLOCK_V: tl.constexpr, NEED_GRAD: tl.constexpr,
):  # fmt: skip
    """Row r: LOSS[r] = logsumexp(logits_r) - logits_r[t], LSE[r] = logsumexp(logits_r); GRAD[r] =
    (softmax(logits_r) * (1 + 2 z_coef LSE[r]) - onehot(t)) * grad_scale, the gradient of the loss plus
    z_coef * LSE[r]^2 (PaLM's z-loss); all 0 for an ignored row. GRAD may alias LOGITS (each block is read
    before written). Without NEED_GRAD (validation) GRAD is neither read nor written: one pass over the
    row instead of two, and the logits stay as they were."""
    row = tl.program_id(0)
    target = tl.load(TARGETS + row)
    cols0 = tl.arange(0, BLOCK_V)
    logits_row = LOGITS + row.to(tl.int64) * stride_l
    grad_row = GRAD + row.to(tl.int64) * stride_g
    if target == ignore_index:
        if NEED_GRAD:
            for start in range(0, n_cols, BLOCK_V):
                cols = start + cols0
                tl.store(grad_row + cols, tl.zeros([BLOCK_V], dtype=tl.float32).to(GRAD.dtype.element_ty),
                         mask=cols < n_cols)  # fmt: skip
        tl.store(LOSS + row, 0.0)
        tl.store(LSE + row, 0.0)
    else:
        m = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)  # per-lane running max
        s = tl.zeros([BLOCK_V], dtype=tl.float32)  # per-lane running sum of exp(x - m)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + cols0
            x = tl.load(logits_row + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # lanes with no column yet
            s = s * tl.exp(m - m_safe) + tl.exp(x - m_safe)
            m = m_new
        m_row = tl.max(m, axis=0)
        lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), axis=0))
        x_target = tl.load(logits_row + target).to(tl.float32)
        tl.store(LOSS + row, lse - x_target)
        tl.store(LSE + row, lse)
        if NEED_GRAD:
            p_scale = 1.0 + 2.0 * z_coef * lse  # d(z lse^2)/dx = 2 z lse softmax(x)
            for start in range(0, n_cols, BLOCK_V):
                cols = start + cols0
                x = tl.load(logits_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
                g = tl.exp(x - lse) * p_scale - tl.where(cols == target, 1.0, 0.0)
                tl.store(grad_row + cols, (g * grad_scale).to(GRAD.dtype.element_ty), mask=cols < n_cols)


def _empty(shape, *, dtype: torch.dtype, device: torch.device, stride=None) -> torch.Tensor:
    """torch.empty / empty_strided for every buffer a kernel writes; the tests swap in a NaN-filled
    version so an element a kernel forgets to write shows up."""
    if stride is not None:
        return torch.empty_strided(shape, stride, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _ce_rows(
    logits: torch.Tensor,
    targets: torch.Tensor,
    grad_scale: float,
    *,
    inplace: bool,
    use_triton: bool,
    z_coef: float = 0.0,
    need_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per-row losses (N,) and log-sum-exps (N,), fp32, and dlogits (N, V) = (softmax (1 + 2 z_coef lse) -
    onehot) * grad_scale (the gradient of loss + z_coef lse^2); all 0 on ignored rows. need_grad=False:
    dlogits is None, and the logits are left as they were even with `inplace`."""
    if use_triton:
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        # Without a gradient wanted the kernel neither reads nor writes GRAD: the logits stand in for it.
        grad = (
            logits
            if inplace or not need_grad
            else _empty(logits.shape, device=logits.device, dtype=logits.dtype)
        )
        losses = _empty((logits.shape[0],), device=logits.device, dtype=torch.float32)
        lse = _empty((logits.shape[0],), device=logits.device, dtype=torch.float32)
        block_v = min(triton.next_power_of_2(logits.shape[1]), 4096 if logits.is_cuda else 64)
        opts = {"num_warps": 8} if logits.is_cuda else {}  # untuned
        _ce_kernel[(logits.shape[0],)](
            logits, grad, targets, losses, lse, logits.stride(0), grad.stride(0), logits.shape[1],
            grad_scale, z_coef, IGNORE_INDEX, BLOCK_V=block_v, NEED_GRAD=need_grad, **opts,
        )  # fmt: skip
        return losses, grad if need_grad else None, lse
    # In place on one fp32 (N, V) buffer, as the kernel: the logits themselves when they are fp32 and may be
    # overwritten, else one copy.
    x = logits.float()
    keep = targets != IGNORE_INDEX
    lse = torch.logsumexp(x, dim=-1)  # (N,)
    safe_t = targets.clamp(min=0)
    losses = (lse - x.gather(1, safe_t[:, None]).squeeze(1)) * keep
    if not need_grad:
        return losses, None, lse * keep
    grad = x.clone() if x is logits and not inplace else x  # the caller's fp32 logits stay as they were
    grad.sub_(lse[:, None]).exp_()  # softmax
    if z_coef:
        grad.mul_(1.0 + 2.0 * z_coef * lse[:, None])
    grad.scatter_add_(1, safe_t[:, None], -torch.ones_like(grad[:, :1]))
    grad.mul_(keep[:, None] * grad_scale)
    lse = lse * keep
    if inplace and grad is not logits:
        logits.copy_(grad)
        return losses, logits, lse
    return losses, grad.to(logits.dtype), lse


def _use_triton(x: torch.Tensor, backend: CEBackend) -> bool:
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend={backend!r}: must be 'auto', 'triton' or 'torch'")
    if backend == "torch" or (backend == "auto" and x.device.type != "cuda"):
        return False
    if x.device.type != "cuda":
        from pretrain.kernels.flash_attention import check_runnable

        check_runnable(x.device)
    return True


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, inplace: bool, use_triton: bool, need_grad: bool):  # type: ignore[override]
        n_valid = int((targets != IGNORE_INDEX).sum())
        losses, grad, _ = _ce_rows(
            logits,
            targets,
            1.0 / max(n_valid, 1),
            inplace=inplace,
            use_triton=use_triton,
            need_grad=need_grad,
        )
        if grad is not None:
            ctx.save_for_backward(grad)
        return losses.sum() / max(n_valid, 1)

    @staticmethod
    def backward(ctx, dloss):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * dloss.to(grad.dtype), None, None, None, None


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    inplace: bool = False,
    backend: CEBackend = "auto",
) -> torch.Tensor:
    """Mean cross-entropy of logits (N, V) against targets (N,) (ignore_index=-100), fp32 scalar. The
    gradient is formed in the forward only when one is wanted (grad mode on, logits requiring it); under
    torch.no_grad the logits stay as they were, `inplace` or not."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"logits {tuple(logits.shape)} / targets {tuple(targets.shape)}: need (N, V) / (N,)")
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    return _CrossEntropy.apply(logits, targets.contiguous(), inplace, _use_triton(logits, backend), need_grad)


fused_cross_entropy = (
    cross_entropy  # the package-level name (`pretrain.kernels.cross_entropy` is this module)
)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, hidden, weight, bias, targets, chunk_size: int, use_triton: bool, need_grads: bool, z_coef: float
    ):
        """-> (mean CE + z_coef * mean lse^2, mean lse^2), both over the non-ignored rows; the second is a
        metric (not differentiable)."""
        n = hidden.shape[0]
        n_valid = int((targets != IGNORE_INDEX).sum())
        scale = 1.0 / max(n_valid, 1)
        total = torch.zeros((), device=hidden.device, dtype=torch.float32)
        z_total = torch.zeros((), device=hidden.device, dtype=torch.float32)
        # The matmuls run in the operands' dtype with fp32 accumulation, as F.linear does: bf16 weights
        # use the tensor cores (an fp32 matmul of the same size runs ~10x slower on an H100/H200). The
        # logits are rounded to fp32 once formed, and dlogits back to the operands' dtype for the two
        # gradient matmuls, exactly where F.linear(h, w, b).float() + F.cross_entropy round them.
        w = weight.to(hidden.dtype)
        b = bias.to(hidden.dtype) if bias is not None else None
        chunks = [
            (s, hidden[s : s + chunk_size], targets[s : s + chunk_size]) for s in range(0, n, chunk_size)
        ]
        # The gradients are formed here unscaled, dlogits = softmax (1 + 2 z lse) - onehot (|x| <= 1 + 2 z
        # lse), and multiplied by dloss / n_valid only in the backward, in fp32: scaled here they would be
        # rounded to fp16 before the loss scale reaches them (1e-4 / 16k tokens is below fp16's normal
        # range), which is what the loss scale exists to prevent.
        dhidden = torch.empty_like(hidden) if need_grads else None
        dweight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_grads else None
        dbias = (
            torch.zeros(bias.shape, device=bias.device, dtype=torch.float32)
            if need_grads and bias is not None
            else None
        )
        # Half-precision operands: each chunk's dW product lands in this one buffer, then is added to the fp32
        # sum in place (no fresh (V, C) product and fp32 copy per chunk).
        product = (
            torch.empty(weight.shape, device=weight.device, dtype=hidden.dtype)
            if need_grads and hidden.dtype != torch.float32
            else None
        )
        for start, h, t in chunks:
            logits = F.linear(h, w, b).float()  # (chunk, V) fp32: the only logits ever held
            losses, dlogits, lse = _ce_rows(
                logits, t, 1.0, inplace=True, use_triton=use_triton, z_coef=z_coef, need_grad=need_grads
            )
            total += losses.sum()
            z_total += lse.square().sum()
            if dlogits is None or dhidden is None or dweight is None:  # evaluation: the loss only
                del logits  # before the next chunk's are formed
                continue
            if dbias is not None:
                dbias += dlogits.sum(0)  # fp32, before the rounding the matmuls see
            dlogits = dlogits.to(hidden.dtype)  # a no-op for fp32 operands
            # The fp32 chunk goes before the matmuls (for fp32 operands dlogits is the same tensor).
            del logits
            dhidden[start : start + chunk_size] = dlogits @ w
            if product is None:
                dweight.addmm_(dlogits.t(), h)
            else:  # a half-precision product rounded once, summed over chunks in fp32
                torch.mm(dlogits.t(), h, out=product)
                dweight += product
            del dlogits
        z_mean = z_total * scale
        ctx.mark_non_differentiable(z_mean)
        if dhidden is not None:
            ctx.save_for_backward(dhidden, dweight, dbias)
            ctx.scale = scale
            ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total * scale + z_coef * z_mean, z_mean

    @staticmethod
    def backward(ctx, dloss, _dz):  # type: ignore[override]
        if not ctx.saved_tensors:  # the forward ran without gradients wanted
            return None, None, None, None, None, None, None, None
        factor = dloss.float() * ctx.scale  # fp32: an fp16 loss scale of 2^16 would overflow to inf
        grads = [
            (g.float() * factor).to(dtype) if g is not None else None
            for g, dtype in zip(ctx.saved_tensors, ctx.dtypes, strict=True)
        ]
        return (*grads, None, None, None, None, None)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = 4096,
    backend: CEBackend = "auto",
    z_loss: float = 0.0,
    return_z: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of F.linear(hidden, weight, bias) against targets, never holding all the logits.

    hidden: (N, C) or (B, T, C); weight: (V, C) (the LM head / tied embedding); bias: (V,) or None;
    targets: (N,) or (B, T), ignore_index=-100. `z_loss` > 0 adds z_loss * mean(logsumexp^2) (PaLM's z-loss)
    over the same rows, its gradient folded into the same pass; `return_z=True` also returns that mean
    (before the coefficient, not differentiable) as a second value. When gradients are wanted they are
    computed during the forward, chunk by chunk (the backward only scales them); under torch.no_grad only
    the loss is."""
    c = hidden.shape[-1]
    hidden2, targets2 = hidden.reshape(-1, c), targets.reshape(-1)
    if (
        weight.dim() != 2
        or weight.shape[1] != c
        or targets2.shape[0] != hidden2.shape[0]
        or (bias is not None and bias.shape != weight.shape[:1])
    ):
        raise ValueError(
            f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, targets {tuple(targets.shape)}"
            f"{'' if bias is None else f', bias {tuple(bias.shape)}'}: need (N, C), (V, C), (N,), bias (V,)"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: must be >= 1")
    if z_loss < 0:
        raise ValueError(f"z_loss={z_loss}: must be >= 0")
    need_grads = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (hidden, weight, bias)
    )
    loss, z_mean = _LinearCrossEntropy.apply(
        hidden2, weight, bias, targets2.contiguous(), chunk_size, _use_triton(hidden2, backend), need_grads,
        float(z_loss),
    )  # fmt: skip
    return (loss, z_mean) if return_z else loss


def reference_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """PyTorch's F.cross_entropy (mean, ignore_index=-100) in fp32: the unfused baseline."""
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)
