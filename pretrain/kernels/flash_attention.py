"""FlashAttention-2-style fused attention in Triton: forward, backward, and the autograd wrapper.

Entry points (the models reach them through `pretrain.kernels.attention(..., backend=...)`):

* `flash_attention(q, k, v, *, causal, key_padding_mask, t5_bias, scale)` — q: (B, H, Tq, D),
  k, v: (B, Hkv, Tk, D), H a multiple of Hkv (GQA/MQA).
* `varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal, ...)`
  — packed sequences: q: (total_q, H, D), k, v: (total_k, Hkv, D); sequence i owns rows
  cu_seqlens[i]:cu_seqlens[i+1] and never attends across a document boundary.

What the kernels do: one program per (query block, batch, head) streams key blocks through an online
softmax (running max and sum, in base 2 so the exponentials are `exp2`), never forming the Tq x Tk
score matrix, and saves the row log-sum-exp for the backward. The backward recomputes the scores:
one kernel per (key block, batch, kv head) accumulates dK and dV over every query head of its group
(so GQA needs no atomics and no extra reduction), a second per (query block, batch, head) forms dQ.

Masks, all applied inside the kernels: out-of-range rows/columns, causal aligned to the bottom right
(query i of Tq sees key j of Tk iff j <= i + Tk - Tq, as FlashAttention-2 and a KV cache), a key
padding mask (B, Tk) with True = real key. A query row that sees no key at all returns zeros (and
contributes no gradient), where SDPA would return NaN.

T5's relative position bias is fused: the bucket of (k_pos - q_pos) is computed per score element
from the distance through a (max_distance + 1)-entry table of T5's log-spaced buckets (an exact
integer lookup, so the bucket never differs from the float32 reference at a bucket edge), plus the
direction bit when bidirectional; the bias is then read from the small (num_buckets, H) table. The
backward accumulates the table's gradient with fp32 atomic adds of dS into a (num_buckets, H)
buffer (order of additions is not deterministic on a GPU; sums agree to fp32 rounding). q_pos is
bottom-right aligned like the causal mask (HF T5's positions with a KV cache).

Dropout is not implemented here: `attention(..., dropout_p > 0)` runs on SDPA.

Block sizes: on CUDA an autotuned list of Hopper-minded configs (BLOCK_M 64/128, BLOCK_N 32/64,
num_warps 4/8, num_stages 2/3) — untuned, since no GPU has run this code yet (see docs/kernels.md).
Under TRITON_INTERPRET=1 (CPU tests) fixed 16 x 16 blocks keep the interpreter quick and make small
odd lengths cross block edges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pretrain.kernels.attention import MAX_HEAD_DIM, MIN_HEAD_DIM, SUPPORTED_DTYPES
from pretrain.kernels.t5_bias import T5Bias, t5_relative_bucket

LOG2E = 1.4426950408889634  # log2(e): scores are kept in base 2 so the kernels use exp2


def _distance_bucket_lut(bias: T5Bias, device: torch.device) -> torch.Tensor:
    """int32 (max_distance + 1,): bucket of each non-negative distance (capped at max_distance, where
    T5's bucket saturates at its last one), without the direction offset the kernel adds itself."""
    distance = torch.arange(bias.max_distance + 1, device=device)
    # k_pos - q_pos = -distance: the side with no direction offset in either mode.
    return t5_relative_bucket(
        -distance,
        bidirectional=bias.bidirectional,
        num_buckets=bias.num_buckets,
        max_distance=bias.max_distance,
    ).to(torch.int32)


# ----------------------------------------------------------------------------------------- kernels


@triton.jit
def _load_block(ptr, offs_t, offs_d, stride_t, len_t, head_dim):
    """(len(offs_t), BLOCK_D) rows of a (T, D) slice; zeros outside [0, len_t) x [0, head_dim)."""
    mask = (offs_t[:, None] < len_t) & (offs_d[None, :] < head_dim)
    return tl.load(ptr + offs_t[:, None] * stride_t + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. UPCAST (set only under the CPU interpreter for bf16, whose tl.dot
    there returns garbage for bf16 operands) multiplies in fp32 instead: a bf16 x bf16 product is exact
    in fp32, so this matches the GPU's bf16 tensor-core dot up to summation order."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _scores(
    q,
    k,
    offs_m,
    offs_n,
    len_q,
    len_k,
    h,
    num_heads,
    kpm_row_ptr,
    table_ptr,
    lut_ptr,
    scale_log2,
    max_distance,
    num_buckets_half,
    CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_T5: tl.constexpr,
    T5_BIDIR: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Base-2 scores (BLOCK_M, BLOCK_N) = (q k^T * scale + bias) * log2(e), -inf where masked; also the
    validity mask and the T5 bucket index (for the table gradient)."""
    s = _dot(q, tl.trans(k), PRECISION, UPCAST) * scale_log2
    valid = (offs_m[:, None] < len_q) & (offs_n[None, :] < len_k)
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None] + (len_k - len_q))
    if HAS_KPM:
        keep = tl.load(kpm_row_ptr + offs_n, mask=offs_n < len_k, other=0)
        valid = valid & (keep[None, :] != 0)
    bucket = tl.zeros([1, 1], dtype=tl.int32)
    if HAS_T5:
        rel = offs_n[None, :] - (offs_m[:, None] + (len_k - len_q))  # k_pos - q_pos, (BLOCK_M, BLOCK_N)
        if T5_BIDIR:
            dist = tl.minimum(tl.abs(rel), max_distance)
            bucket = tl.load(lut_ptr + dist) + tl.where(rel > 0, num_buckets_half, 0)
        else:
            dist = tl.minimum(tl.maximum(-rel, 0), max_distance)
            bucket = tl.load(lut_ptr + dist)
        bias = tl.load(table_ptr + bucket * num_heads + h, mask=valid, other=0.0).to(tl.float32)
        s = s + bias * 1.4426950408889634
    s = tl.where(valid, s, float("-inf"))
    return s, valid, bucket


@triton.jit
def _seq_bounds(b, cu_q_ptr, cu_k_ptr, dense_len_q, dense_len_k, VARLEN: tl.constexpr):
    """(first row, length) of sequence b for queries and keys: packed offsets or the dense lengths."""
    if VARLEN:
        start_q = tl.load(cu_q_ptr + b)
        len_q = tl.load(cu_q_ptr + b + 1) - start_q
        start_k = tl.load(cu_k_ptr + b)
        len_k = tl.load(cu_k_ptr + b + 1) - start_k
    else:
        start_q = 0
        len_q = dense_len_q
        start_k = 0
        len_k = dense_len_k
    return start_q, len_q, start_k, len_k


@triton.jit
def _fwd_kernel(
    Q, K, V, OUT, LSE, KPM, CU_Q, CU_K, TABLE, LUT,
    scale_log2,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    stride_lb, stride_lh,
    stride_mb,
    num_heads, group, dense_len_q, dense_len_k, head_dim, max_distance, num_buckets_half,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_T5: tl.constexpr, T5_BIDIR: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    start_q, len_q, start_k, len_k = _seq_bounds(b, CU_Q, CU_K, dense_len_q, dense_len_k, VARLEN)
    if start_m * BLOCK_M >= len_q:
        return  # varlen: this sequence is shorter than the longest one the grid was sized for
    hk = h // group
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + b * stride_qb + h * stride_qh + start_q * stride_qt
    k_base = K + b * stride_kb + hk * stride_kh + start_k * stride_kt
    v_base = V + b * stride_vb + hk * stride_vh + start_k * stride_vt
    q = _load_block(q_base, offs_m, offs_d, stride_qt, len_q, head_dim)  # (BLOCK_M, BLOCK_D)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (base 2)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = len_k
    if CAUSAL:  # keys past the last row's diagonal are masked for the whole block: skip them
        hi = tl.minimum(len_k, (start_m + 1) * BLOCK_M + len_k - len_q)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_block(k_base, offs_n, offs_d, stride_kt, len_k, head_dim)  # (BLOCK_N, BLOCK_D)
        v = _load_block(v_base, offs_n, offs_d, stride_vt, len_k, head_dim)
        s, _valid, _bucket = _scores(
            q, k, offs_m, offs_n, len_q, len_k, h, num_heads, KPM + b * stride_mb, TABLE, LUT,
            scale_log2, max_distance, num_buckets_half, CAUSAL, HAS_KPM, HAS_T5, T5_BIDIR, PRECISION, UPCAST,
        )  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row with every key so far masked has m_new = -inf; subtract 0 instead so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new

    empty = l_i == 0.0  # the row sees no key: output 0, and LSE = +inf makes its backward p = 0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    o_base = OUT + b * stride_ob + h * stride_oh + start_q * stride_ot
    o_mask = (offs_m[:, None] < len_q) & (offs_d[None, :] < head_dim)
    tl.store(
        o_base + offs_m[:, None] * stride_ot + offs_d[None, :], acc.to(OUT.dtype.element_ty), mask=o_mask
    )
    tl.store(LSE + b * stride_lb + h * stride_lh + start_q + offs_m, lse, mask=offs_m < len_q)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, KPM, CU_Q, CU_K, TABLE, LUT, DTABLE,
    scale_log2, scale,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    stride_lb, stride_lh,
    stride_mb,
    num_heads, num_kv_heads, group, dense_len_q, dense_len_k, head_dim, max_distance, num_buckets_half,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_T5: tl.constexpr, T5_BIDIR: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per (key block, batch, kv head): dK, dV summed over the kv head's query-head group.
    DO shares O's strides; DK, DV share K's and V's (the wrapper allocates them like k and v)."""
    start_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_kv_heads
    hk = bh % num_kv_heads
    start_q, len_q, start_k, len_k = _seq_bounds(b, CU_Q, CU_K, dense_len_q, dense_len_k, VARLEN)
    if start_n * BLOCK_N >= len_k:
        return
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k_base = K + b * stride_kb + hk * stride_kh + start_k * stride_kt
    v_base = V + b * stride_vb + hk * stride_vh + start_k * stride_vt
    k = _load_block(k_base, offs_n, offs_d, stride_kt, len_k, head_dim)  # (BLOCK_N, BLOCK_D)
    v = _load_block(v_base, offs_n, offs_d, stride_vt, len_k, head_dim)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo = 0
    if CAUSAL:  # query rows above this key block's first diagonal see none of its keys
        lo = tl.maximum(0, start_n * BLOCK_N - (len_k - len_q)) // BLOCK_M * BLOCK_M
    for g in range(0, group):
        h = hk * group + g
        q_base = Q + b * stride_qb + h * stride_qh + start_q * stride_qt
        do_base = DO + b * stride_ob + h * stride_oh + start_q * stride_ot
        row_base = b * stride_lb + h * stride_lh + start_q
        for start_m in range(lo, len_q, BLOCK_M):
            offs_m = start_m + offs_m0
            q = _load_block(q_base, offs_m, offs_d, stride_qt, len_q, head_dim)  # (BLOCK_M, BLOCK_D)
            do = _load_block(do_base, offs_m, offs_d, stride_ot, len_q, head_dim)
            lse = tl.load(LSE + row_base + offs_m, mask=offs_m < len_q, other=float("inf"))
            delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < len_q, other=0.0)
            s, valid, bucket = _scores(
                q, k, offs_m, offs_n, len_q, len_k, h, num_heads, KPM + b * stride_mb, TABLE, LUT,
                scale_log2, max_distance, num_buckets_half, CAUSAL, HAS_KPM, HAS_T5, T5_BIDIR, PRECISION, UPCAST,
            )  # fmt: skip
            p = tl.exp2(s - lse[:, None])  # softmax probabilities (BLOCK_M, BLOCK_N); 0 where masked
            dv += _dot(tl.trans(p.to(do.dtype)), do, PRECISION, UPCAST)
            dp = _dot(do, tl.trans(v), PRECISION, UPCAST)  # dL/dP (BLOCK_M, BLOCK_N)
            ds = p * (dp - delta[:, None])  # dL/d(score) in natural units, before the scale
            ds = tl.where(valid, ds, 0.0)
            dk += _dot(tl.trans(ds.to(q.dtype)), q, PRECISION, UPCAST)
            if HAS_T5:
                tl.atomic_add(DTABLE + bucket * num_heads + h, ds, mask=valid)
    dk = dk * scale
    kv_mask = (offs_n[:, None] < len_k) & (offs_d[None, :] < head_dim)
    dk_ptr = DK + b * stride_kb + hk * stride_kh + start_k * stride_kt
    dv_ptr = DV + b * stride_vb + hk * stride_vh + start_k * stride_vt
    tl.store(dk_ptr + offs_n[:, None] * stride_kt + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + offs_n[:, None] * stride_vt + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KPM, CU_Q, CU_K, TABLE, LUT,
    scale_log2, scale,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    stride_lb, stride_lh,
    stride_mb,
    num_heads, group, dense_len_q, dense_len_k, head_dim, max_distance, num_buckets_half,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_T5: tl.constexpr, T5_BIDIR: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per (query block, batch, head): dQ. DQ shares Q's strides."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    start_q, len_q, start_k, len_k = _seq_bounds(b, CU_Q, CU_K, dense_len_q, dense_len_k, VARLEN)
    if start_m * BLOCK_M >= len_q:
        return
    hk = h // group
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + b * stride_qb + h * stride_qh + start_q * stride_qt
    k_base = K + b * stride_kb + hk * stride_kh + start_k * stride_kt
    v_base = V + b * stride_vb + hk * stride_vh + start_k * stride_vt
    do_base = DO + b * stride_ob + h * stride_oh + start_q * stride_ot
    q = _load_block(q_base, offs_m, offs_d, stride_qt, len_q, head_dim)
    do = _load_block(do_base, offs_m, offs_d, stride_ot, len_q, head_dim)
    row_base = b * stride_lb + h * stride_lh + start_q
    lse = tl.load(LSE + row_base + offs_m, mask=offs_m < len_q, other=float("inf"))
    delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < len_q, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = len_k
    if CAUSAL:
        hi = tl.minimum(len_k, (start_m + 1) * BLOCK_M + len_k - len_q)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_block(k_base, offs_n, offs_d, stride_kt, len_k, head_dim)
        v = _load_block(v_base, offs_n, offs_d, stride_vt, len_k, head_dim)
        s, valid, _bucket = _scores(
            q, k, offs_m, offs_n, len_q, len_k, h, num_heads, KPM + b * stride_mb, TABLE, LUT,
            scale_log2, max_distance, num_buckets_half, CAUSAL, HAS_KPM, HAS_T5, T5_BIDIR, PRECISION, UPCAST,
        )  # fmt: skip
        p = tl.exp2(s - lse[:, None])
        dp = _dot(do, tl.trans(v), PRECISION, UPCAST)
        ds = tl.where(valid, p * (dp - delta[:, None]), 0.0)
        dq += _dot(ds.to(k.dtype), k, PRECISION, UPCAST)
    dq = dq * scale
    dq_ptr = DQ + b * stride_qb + h * stride_qh + start_q * stride_qt
    mask = (offs_m[:, None] < len_q) & (offs_d[None, :] < head_dim)
    tl.store(dq_ptr + offs_m[:, None] * stride_qt + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------ launch configuration

# Hopper-minded starting points, untuned: no GPU has run these kernels yet. BLOCK_M x BLOCK_N tiles of
# 128 x 64 at head dim 128 are what FlashAttention-2 and the Triton tutorial use on H100.
CUDA_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
]
# The backward holds more tiles live (q, k, v, dO, dK, dV): smaller tiles.
CUDA_BWD_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3),
]
INTERPRET_BLOCK = 16  # under TRITON_INTERPRET=1: small tiles so short test sequences cross block edges
AUTOTUNE_KEY = ["dense_len_q", "dense_len_k", "head_dim", "CAUSAL", "HAS_T5", "VARLEN"]

_tuned: dict[str, object] = {}


def interpreting() -> bool:
    """True when Triton's kernels were created by its CPU interpreter (TRITON_INTERPRET=1 before import)."""
    return not isinstance(_fwd_kernel, triton.runtime.JITFunction)


def _kernel(name: str, device: torch.device):
    """The kernel to launch: autotuned over CUDA_CONFIGS on a GPU, the plain interpreted one on CPU."""
    base = {"fwd": _fwd_kernel, "dkdv": _bwd_dkdv_kernel, "dq": _bwd_dq_kernel}[name]
    if device.type != "cuda":
        return base, {"BLOCK_M": INTERPRET_BLOCK, "BLOCK_N": INTERPRET_BLOCK}
    if name not in _tuned:
        configs = CUDA_CONFIGS if name == "fwd" else CUDA_BWD_CONFIGS
        # The table-gradient buffer is accumulated with atomics: zero it before each trial run.
        reset = ["DTABLE"] if name == "dkdv" else None
        _tuned[name] = triton.autotune(configs, key=AUTOTUNE_KEY, reset_to_zero=reset)(base)
    return _tuned[name], {}


def check_runnable(device: torch.device) -> None:
    """Raise a clear error where the Triton kernels cannot run."""
    if device.type == "cuda":
        return
    if not interpreting():
        raise RuntimeError(
            f"Triton attention on a {device.type} tensor needs the Triton interpreter: set "
            "TRITON_INTERPRET=1 in the environment before Python imports triton (it is read when the "
            "kernels are defined), or use backend='sdpa'"
        )


# ---------------------------------------------------------------------------------- host-side wrapper


@dataclass(frozen=True)
class _Problem:
    """Shapes and options shared by the three kernels of one call."""

    batch: int  # batch size, or number of packed sequences
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dense_len_q: int  # Tq (dense) / 0 (varlen: lengths come from cu_seqlens)
    dense_len_k: int
    grid_len_q: int  # the longest query sequence: the grid covers it
    grid_len_k: int
    varlen: bool
    causal: bool
    scale: float
    t5: T5Bias | None


def _strides(x: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, token) strides of (B, H, T, D), or of packed (total, H, D) with batch stride 0."""
    if varlen:
        return 0, x.stride(1), x.stride(0)
    return x.stride(0), x.stride(1), x.stride(2)


def _row_strides(pb: _Problem, total_q: int) -> tuple[int, int]:
    """LSE/delta are (B, H, Tq) fp32, or (H, total_q) when packed."""
    if pb.varlen:
        return 0, total_q
    return pb.num_heads * pb.dense_len_q, pb.dense_len_q


def _common_args(pb: _Problem, kpm: torch.Tensor | None, dtype: torch.dtype) -> dict:
    t5 = pb.t5
    return dict(
        UPCAST=dtype == torch.bfloat16 and interpreting(),
        CAUSAL=pb.causal,
        VARLEN=pb.varlen,
        HAS_KPM=kpm is not None,
        HAS_T5=t5 is not None,
        T5_BIDIR=bool(t5 is not None and t5.bidirectional),
        BLOCK_D=max(16, triton.next_power_of_2(pb.head_dim)),
    )


def _t5_args(pb: _Problem, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None, int, int]:
    t5 = pb.t5
    if t5 is None:
        return None, None, 0, 0
    lut = _distance_bucket_lut(t5, device)
    half = t5.num_buckets // 2 if t5.bidirectional else 0
    return t5.table.contiguous(), lut, t5.max_distance, half


def _empty(shape, *, dtype: torch.dtype, device: torch.device, stride=None) -> torch.Tensor:
    """torch.empty / empty_strided for every buffer a kernel writes; the tests swap in a NaN-filled
    version so an element a kernel forgets to write shows up."""
    if stride is not None:
        return torch.empty_strided(shape, stride, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (no TF32) so an fp32 model is as accurate as SDPA's math path.
    return "ieee" if dtype == torch.float32 else "tf32"


def _forward(q, k, v, kpm, cu_q, cu_k, pb: _Problem) -> tuple[torch.Tensor, torch.Tensor]:
    device = q.device
    o = _empty(q.shape, device=device, dtype=q.dtype)  # contiguous: dO is made contiguous to match
    total_q = q.shape[0] if pb.varlen else 0
    lse_shape = (pb.num_heads, total_q) if pb.varlen else (pb.batch, pb.num_heads, pb.dense_len_q)
    lse = _empty(lse_shape, device=device, dtype=torch.float32)
    table, lut, max_distance, half = _t5_args(pb, device)
    dummy = q  # pointer for an unused argument; never dereferenced (its constexpr flag is off)
    kernel, blocks = _kernel("fwd", device)
    grid = lambda meta: (triton.cdiv(pb.grid_len_q, meta["BLOCK_M"]), pb.batch * pb.num_heads)  # noqa: E731
    kernel[grid](
        q, k, v, o, lse,
        kpm if kpm is not None else dummy,
        cu_q if cu_q is not None else dummy, cu_k if cu_k is not None else dummy,
        table if table is not None else dummy, lut if lut is not None else dummy,
        pb.scale * LOG2E,
        *_strides(q, pb.varlen), *_strides(k, pb.varlen), *_strides(v, pb.varlen), *_strides(o, pb.varlen),
        *_row_strides(pb, total_q),
        kpm.stride(0) if kpm is not None else 0,
        pb.num_heads, pb.num_heads // pb.num_kv_heads, pb.dense_len_q, pb.dense_len_k, pb.head_dim,
        max_distance, half,
        PRECISION=_precision(q.dtype), **_common_args(pb, kpm, q.dtype), **blocks,
    )  # fmt: skip
    return o, lse


def _backward(q, k, v, o, lse, do, kpm, cu_q, cu_k, pb: _Problem):
    device = q.device
    do = do.contiguous()  # the kernels read dO with O's (contiguous) strides
    # delta_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij: the softmax backward's per-row term.
    delta = (do.float() * o.float()).sum(-1)  # (B, H, Tq) or (total, H)
    if pb.varlen:
        delta = delta.t()  # (H, total) like LSE
    delta = delta.contiguous()
    # Gradients laid out exactly like their inputs: the kernels store them with q's, k's, v's strides.
    dq, dk, dv = (_empty(x.shape, stride=x.stride(), device=device, dtype=x.dtype) for x in (q, k, v))
    total_q = q.shape[0] if pb.varlen else 0
    table, lut, max_distance, half = _t5_args(pb, device)
    dtable = torch.zeros_like(table, dtype=torch.float32) if table is not None else None
    dummy = q
    common = _common_args(pb, kpm, q.dtype)
    precision = _precision(q.dtype)
    ptrs = dict(
        kpm=kpm if kpm is not None else dummy,
        cu_q=cu_q if cu_q is not None else dummy,
        cu_k=cu_k if cu_k is not None else dummy,
        table=table if table is not None else dummy,
        lut=lut if lut is not None else dummy,
    )
    strides = (
        *_strides(q, pb.varlen), *_strides(k, pb.varlen), *_strides(v, pb.varlen), *_strides(o, pb.varlen),
        *_row_strides(pb, total_q),
        kpm.stride(0) if kpm is not None else 0,
    )  # fmt: skip
    group = pb.num_heads // pb.num_kv_heads
    kernel, blocks = _kernel("dkdv", device)
    grid_kv = lambda meta: (triton.cdiv(pb.grid_len_k, meta["BLOCK_N"]), pb.batch * pb.num_kv_heads)  # noqa: E731
    kernel[grid_kv](
        q, k, v, do, lse, delta, dk, dv, ptrs["kpm"], ptrs["cu_q"], ptrs["cu_k"], ptrs["table"], ptrs["lut"],
        dtable if dtable is not None else dummy,
        pb.scale * LOG2E, pb.scale, *strides,
        pb.num_heads, pb.num_kv_heads, group, pb.dense_len_q, pb.dense_len_k, pb.head_dim, max_distance, half,
        PRECISION=precision, **common, **blocks,
    )  # fmt: skip
    kernel, blocks = _kernel("dq", device)
    grid_q = lambda meta: (triton.cdiv(pb.grid_len_q, meta["BLOCK_M"]), pb.batch * pb.num_heads)  # noqa: E731
    kernel[grid_q](
        q, k, v, do, lse, delta, dq, ptrs["kpm"], ptrs["cu_q"], ptrs["cu_k"], ptrs["table"], ptrs["lut"],
        pb.scale * LOG2E, pb.scale, *strides,
        pb.num_heads, group, pb.dense_len_q, pb.dense_len_k, pb.head_dim, max_distance, half,
        PRECISION=precision, **common, **blocks,
    )  # fmt: skip
    return dq, dk, dv, dtable


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, table, kpm, cu_q, cu_k, pb: _Problem):  # type: ignore[override]
        o, lse = _forward(q, k, v, kpm, cu_q, cu_k, pb)
        ctx.save_for_backward(q, k, v, o, lse, kpm, cu_q, cu_k)
        ctx.pb = pb
        return o

    @staticmethod
    def backward(ctx, do):  # type: ignore[override]
        q, k, v, o, lse, kpm, cu_q, cu_k = ctx.saved_tensors
        pb: _Problem = ctx.pb
        dq, dk, dv, dtable = _backward(q, k, v, o, lse, do, kpm, cu_q, cu_k, pb)
        dtable = dtable.to(pb.t5.table.dtype) if dtable is not None and pb.t5 is not None else None
        return dq, dk, dv, dtable, None, None, None, None


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_axis: int) -> None:
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"Triton attention: q, k, v must share one of {SUPPORTED_DTYPES}, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")  # fmt: skip
    d = q.shape[-1]
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM or k.shape[-1] != d or v.shape[-1] != d:
        raise ValueError(
            f"Triton attention: head_dim={d} (k {k.shape[-1]}, v {v.shape[-1]}) must be equal and in "
            f"[{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]"
        )
    h, hk = q.shape[head_axis], k.shape[head_axis]
    if h % hk != 0 or v.shape[head_axis] != hk:
        raise ValueError(f"Triton attention: {h} query heads are not a multiple of {hk} kv heads")
    check_runnable(q.device)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    t5_bias: T5Bias | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Fused attention. q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D); key_padding_mask: (B, Tk) bool, True
    = real key; t5_bias: T5's relative position bias fused in-kernel. Returns (B, H, Tq, D)."""
    _check(q, k, v, head_axis=1)
    b, h, tq, d = q.shape
    tk = k.shape[2]
    # The kernels assume unit stride along head_dim; anything else is copied once.
    q, k, v = (_kernel_ready(x) for x in (q, k, v))
    kpm = None
    if key_padding_mask is not None:
        if key_padding_mask.shape != (b, tk):
            raise ValueError(f"key_padding_mask shape {tuple(key_padding_mask.shape)} != (B, Tk) = {(b, tk)}")
        kpm = key_padding_mask.to(torch.int8).contiguous()  # (B, Tk)
    _check_t5(t5_bias, h)
    pb = _Problem(b, h, k.shape[1], d, tq, tk, tq, tk, False, causal,
                  scale if scale is not None else 1.0 / math.sqrt(d), t5_bias)  # fmt: skip
    table = t5_bias.table if t5_bias is not None else None
    return _FlashAttention.apply(q, k, v, table, kpm, None, None, pb)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    t5_bias: T5Bias | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Fused attention over packed sequences (FlashAttention's varlen interface).

    q: (total_q, H, D); k, v: (total_k, Hkv, D); cu_seqlens_*: int32 (num_seqs + 1,) cumulative lengths
    starting at 0; max_seqlen_*: the longest sequence (sizes the grid). Sequence i's queries attend only
    to sequence i's keys; causal is bottom-right aligned per sequence. Returns (total_q, H, D)."""
    _check(q, k, v, head_axis=1)
    if cu_seqlens_q.shape != cu_seqlens_k.shape or cu_seqlens_q.dim() != 1:
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be 1-D and of the same length (num_seqs + 1)")
    _check_t5(t5_bias, q.shape[1])
    q, k, v = (_kernel_ready(x) for x in (q, k, v))
    d = q.shape[-1]
    pb = _Problem(cu_seqlens_q.numel() - 1, q.shape[1], k.shape[1], d, 0, 0, int(max_seqlen_q),
                  int(max_seqlen_k), True, causal, scale if scale is not None else 1.0 / math.sqrt(d),
                  t5_bias)  # fmt: skip
    cu_q = cu_seqlens_q.to(device=q.device, dtype=torch.int32).contiguous()
    cu_k = cu_seqlens_k.to(device=q.device, dtype=torch.int32).contiguous()
    table = t5_bias.table if t5_bias is not None else None
    return _FlashAttention.apply(q, k, v, table, None, cu_q, cu_k, pb)


def _kernel_ready(x: torch.Tensor) -> torch.Tensor:
    """The kernels need unit stride along head_dim, and the gradients are allocated with the input's
    strides, so a broadcast (stride-0) view is copied once."""
    return x if x.stride(-1) == 1 and 0 not in x.stride() else x.contiguous()


def _check_t5(t5: T5Bias | None, num_heads: int) -> None:
    if t5 is None:
        return
    if t5.table.shape != (t5.num_buckets, num_heads):
        raise ValueError(
            f"T5Bias.table shape {tuple(t5.table.shape)} != (num_buckets, heads) = {(t5.num_buckets, num_heads)}"
        )
