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
backward sums each tile's dS per bucket and adds the sums into a (num_buckets, H) fp32 buffer with
one atomic add per (tile, bucket) (order of additions is not deterministic on a GPU; sums agree to fp32
rounding). q_pos is
bottom-right aligned like the causal mask (HF T5's positions with a KV cache).

Dropout on the attention probabilities (`dropout_p`), FlashAttention-style: the keep mask is never stored.
Each score element (b, h, i, j) draws a uniform number from Triton's counter-based Philox generator at
counter ((b * H + h) * LQ + i) * LK + j (LQ, LK: the grid's query and key lengths; 64-bit) under a seed
drawn once per call from PyTorch's generator of the tensors' device; the forward and both backward kernels
regenerate the same draw for the same element, whichever tile (or transposed tile) holds it. The softmax
normaliser sums the undropped probabilities; kept ones are scaled by 1 / (1 - dropout_p) (the forward
applies the factor once to the output rows). The backward uses delta = rowsum(dO * O), which still equals
rowsum(P * dP) with the dropped and rescaled P. Because the seed comes from PyTorch's generator, a
recompute under activation checkpointing (which restores the generator) redraws the same seed and mask.

Mask-free inner loops (as in the Triton fused-attention tutorial): each key loop is split into the key
blocks that need no masking at all (inside len_k, and when causal at or left of the diagonal of the
program's first query row), which run a body with no validity mask, no `tl.where` and no row masks on
their loads, and the boundary blocks (the causal diagonal, the partial last block) which run the general
masked body. The dK/dV kernel does the same over query blocks (the diagonal ones, the fully-seeing middle,
the partial last block), and works on transposed tiles (s^T = k q^T) so P^T and dS^T are the left
operands of their matmuls straight from registers. With a key padding mask or T5 bias every block takes
the general body. The head dim is a compile-time constant (HEAD_DIM), padded to BLOCK_D = next power of 2
(>= 16); when it already is one (EVEN_D) no load or store carries a head-dim mask at all, and otherwise
the mask against a constant still lets the tiles load as vectors through asynchronous copies.

Block sizes: on CUDA an autotuned list of Hopper-minded configs (forward BLOCK_M x BLOCK_N 128 x 128,
128 x 64, 128 x 32, 64 x 128, 64 x 64, 64 x 32, 4 or 8 warps, 2-4 stages; backward 64 x 64, 32 x 64,
64 x 32, 32 x 128, 128 x 32, 128 x 64, 64 x 128), measured one by one on an H200 with
bench/attention_configs.py (figures in docs/benchmarks.md and docs/kernels.md).
Under TRITON_INTERPRET=1 (CPU tests) fixed 16 x 16 blocks keep the interpreter quick and make small
odd lengths cross block edges (and lengths that are multiples of 16 leave no partial block).
"""

from __future__ import annotations

import math
import os
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
def _load_block(ptr, offs_t, offs_d, stride_t, len_t, head_dim, MASK_T: tl.constexpr, EVEN_D: tl.constexpr):
    """(len(offs_t), BLOCK_D) rows of a (T, D) slice. MASK_T: rows at or past len_t read as zeros (off: the
    caller knows every row is in range). Columns past head_dim read as zeros; with EVEN_D (BLOCK_D ==
    head_dim) there are none and that mask is gone at compile time."""
    ptrs = ptr + offs_t[:, None] * stride_t + offs_d[None, :]
    if MASK_T:
        if EVEN_D:
            x = tl.load(ptrs, mask=offs_t[:, None] < len_t, other=0.0)
        else:
            x = tl.load(ptrs, mask=(offs_t[:, None] < len_t) & (offs_d[None, :] < head_dim), other=0.0)
    else:
        x = tl.load(ptrs) if EVEN_D else tl.load(ptrs, mask=offs_d[None, :] < head_dim, other=0.0)
    return x


@triton.jit
def _store_block(ptr, x, offs_t, offs_d, stride_t, len_t, head_dim, EVEN_D: tl.constexpr):
    """Store (len(offs_t), BLOCK_D) rows of a (T, D) slice, only rows < len_t and columns < head_dim."""
    ptrs = ptr + offs_t[:, None] * stride_t + offs_d[None, :]
    if EVEN_D:
        tl.store(ptrs, x, mask=offs_t[:, None] < len_t)
    else:
        tl.store(ptrs, x, mask=(offs_t[:, None] < len_t) & (offs_d[None, :] < head_dim))


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. UPCAST (set only under the CPU interpreter for bf16, whose tl.dot
    there returns garbage for bf16 operands) multiplies in fp32 instead: a bf16 x bf16 product is exact
    in fp32, so this matches the GPU's bf16 tensor-core dot up to summation order."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _dropout_seed(SEED, DROPOUT: tl.constexpr):
    """The call's Philox seed (a constant 0, never used, without dropout)."""
    if DROPOUT:  # noqa: SIM108 (a statement-level constexpr branch: the form every Triton version compiles)
        seed = tl.load(SEED)
    else:
        seed = 0
    return seed


@triton.jit
def _rng_rows(b, h, num_heads, rows, rng_len_q, rng_len_k):
    """int64 Philox counters of query rows `rows` (any shape) of (b, h): ((b * H + h) * LQ + i) * LK, so
    element (i, j) draws at that plus j, unique while i < LQ and j < LK (the grid's lengths). The one
    formula the forward and both backward kernels share, so all three draw the same mask."""
    return ((b * num_heads + h).to(tl.int64) * rng_len_q + rows) * rng_len_k


@triton.jit
def _dropout_keep(seed, rng_rows, offs_cols, p_drop, scale_keep):
    """The dropout factor of a tile: scale_keep where the element is kept, 0 where it is dropped (keep iff its
    uniform draw >= p_drop). rng_rows: `_rng_rows` of the tile's query rows; offs_cols: the key columns j;
    both as 2-D index vectors that broadcast to the tile (transposed in the dK/dV kernel)."""
    keep = tl.rand(seed, rng_rows + offs_cols) >= p_drop
    return tl.where(keep, scale_keep, 0.0)


@triton.jit
def _masked_scores(
    s,
    q_idx,
    k_idx,
    len_q,
    len_k,
    h,
    num_heads,
    kpm_row_ptr,
    table_ptr,
    lut_ptr,
    max_distance,
    num_buckets_half,
    CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_T5: tl.constexpr,
    T5_BIDIR: tl.constexpr,
):
    """The general (masked) score tile: base-2 scores s = q k^T * scale * log2(e) plus the T5 bias * log2(e),
    -inf where masked; also the validity mask and the T5 bucket index (for the table gradient). q_idx and
    k_idx are the query rows and key columns as 2-D index vectors that broadcast to s's shape:
    (BLOCK_M, 1) and (1, BLOCK_N) for s, or (1, BLOCK_M) and (BLOCK_N, 1) for the dK/dV kernel's s^T."""
    valid = (q_idx < len_q) & (k_idx < len_k)
    if CAUSAL:
        valid = valid & (k_idx <= q_idx + (len_k - len_q))
    if HAS_KPM:
        keep = tl.load(kpm_row_ptr + k_idx, mask=k_idx < len_k, other=0)
        valid = valid & (keep != 0)
    bucket = tl.zeros([1, 1], dtype=tl.int32)
    if HAS_T5:
        rel = k_idx - (q_idx + (len_k - len_q))  # k_pos - q_pos, broadcast to s's shape
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
def _unmasked_key_end(start_m, len_q, len_k, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                      HAS_T5: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """For query block start_m: key blocks starting below the returned multiple of BLOCK_N need no mask at
    all (every key inside len_k and, when causal, at or left of the diagonal of the block's first row, so
    every row sees every key). 0 with a padding mask or T5 bias: those always take the general body."""
    end = len_k // BLOCK_N * BLOCK_N
    if CAUSAL:
        # Block [n, n + BLOCK_N) is fully seen iff n + BLOCK_N - 1 <= start_m * BLOCK_M + len_k - len_q.
        end = tl.minimum(end, tl.maximum(start_m * BLOCK_M + len_k - len_q + 1, 0) // BLOCK_N * BLOCK_N)
    if HAS_KPM:
        end = 0
    if HAS_T5:
        end = 0
    return end


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, lo, hi,
    offs_m, offs_n0, offs_d, len_q, len_k, head_dim, h, num_heads, kpm_row_ptr, TABLE, LUT,
    scale_log2, max_distance, num_buckets_half, seed, rng_rows, p_drop,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_T5: tl.constexpr,
    T5_BIDIR: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, EVEN_D: tl.constexpr,
    DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Key blocks lo, lo + BLOCK_N, ... < hi through the online softmax. MASKED=False is the fast body, for
    blocks that every row sees whole: no validity mask, no -inf guard, no row mask on the loads."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_block(k_base, offs_n, offs_d, stride_kt, len_k, head_dim, MASKED, EVEN_D)
        v = _load_block(v_base, offs_n, offs_d, stride_vt, len_k, head_dim, MASKED, EVEN_D)
        s = _dot(q, tl.trans(k), PRECISION, UPCAST) * scale_log2  # (BLOCK_M, BLOCK_N), base 2
        if MASKED:
            s, _valid, _bucket = _masked_scores(
                s, offs_m[:, None], offs_n[None, :], len_q, len_k, h, num_heads, kpm_row_ptr, TABLE, LUT,
                max_distance, num_buckets_half, CAUSAL, HAS_KPM, HAS_T5, T5_BIDIR,
            )  # fmt: skip
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # A row with every key so far masked has m_new = -inf; subtract 0 instead so exp2 gives 0, not NaN.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every score of the block is
            m_sub = m_new
        p = tl.exp2(s - m_sub[:, None])
        alpha = tl.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, axis=1)  # the normaliser counts dropped probabilities too
        if DROPOUT:  # zero the dropped ones; the 1 / (1 - p_drop) of the kept ones is applied at the end
            p = p * _dropout_keep(seed, rng_rows[:, None], offs_n[None, :], p_drop, 1.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, OUT, LSE, KPM, CU_Q, CU_K, TABLE, LUT, SEED,
    scale_log2, p_drop, rng_len_q, rng_len_k,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    stride_lb, stride_lh,
    stride_mb,
    num_heads, group, dense_len_q, dense_len_k, HEAD_DIM: tl.constexpr, max_distance, num_buckets_half,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_T5: tl.constexpr, T5_BIDIR: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
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
    q = _load_block(q_base, offs_m, offs_d, stride_qt, len_q, HEAD_DIM, True, EVEN_D)  # (BLOCK_M, BLOCK_D)
    kpm_row = KPM + b * stride_mb
    seed = _dropout_seed(SEED, DROPOUT)
    rng_rows = _rng_rows(b, h, num_heads, offs_m, rng_len_q, rng_len_k)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (base 2)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = len_k
    if CAUSAL:  # keys past the last row's diagonal are masked for the whole block: skip them
        hi = tl.minimum(len_k, (start_m + 1) * BLOCK_M + len_k - len_q)
    # [0, mid): blocks every row sees whole (mask-free body); [mid, hi): the diagonal and the len_k tail.
    mid = _unmasked_key_end(start_m, len_q, len_k, CAUSAL, HAS_KPM, HAS_T5, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, 0, mid,
        offs_m, offs_n0, offs_d, len_q, len_k, HEAD_DIM, h, num_heads, kpm_row, TABLE, LUT,
        scale_log2, max_distance, num_buckets_half, seed, rng_rows, p_drop,
        False, CAUSAL, HAS_KPM, HAS_T5, T5_BIDIR, PRECISION, UPCAST, EVEN_D, DROPOUT, BLOCK_N,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, mid, hi,
        offs_m, offs_n0, offs_d, len_q, len_k, HEAD_DIM, h, num_heads, kpm_row, TABLE, LUT,
        scale_log2, max_distance, num_buckets_half, seed, rng_rows, p_drop,
        True, CAUSAL, HAS_KPM, HAS_T5, T5_BIDIR, PRECISION, UPCAST, EVEN_D, DROPOUT, BLOCK_N,
    )  # fmt: skip

    empty = l_i == 0.0  # the row sees no key: output 0, and LSE = +inf makes its backward p = 0
    denom = tl.where(empty, 1.0, l_i)
    if DROPOUT:
        denom = denom * (1.0 - p_drop)  # the kept probabilities' 1 / (1 - p_drop), once per row
    acc = acc / denom[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    o_base = OUT + b * stride_ob + h * stride_oh + start_q * stride_ot
    _store_block(o_base, acc.to(OUT.dtype.element_ty), offs_m, offs_d, stride_ot, len_q, HEAD_DIM, EVEN_D)
    tl.store(LSE + b * stride_lb + h * stride_lh + start_q + offs_m, lse, mask=offs_m < len_q)


@triton.jit
def _dkdv_inner(
    dk, dv, k, v, q_base, do_base, LSE, DELTA, DTABLE, row_base, stride_qt, stride_ot, lo, hi,
    offs_m0, offs_n, offs_d, len_q, len_k, head_dim, h, num_heads, kpm_row_ptr, TABLE, LUT,
    scale_log2, max_distance, num_buckets_half, seed, b, rng_len_q, rng_len_k, p_drop, scale_keep,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_T5: tl.constexpr,
    T5_BIDIR: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, EVEN_D: tl.constexpr,
    DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Query blocks lo, lo + BLOCK_M, ... < hi of one query head into this key block's dK, dV. Works on the
    transposed tiles (s^T = k q^T, (BLOCK_N, BLOCK_M)) so P^T and dS^T, computed in registers, are the
    left operands of their matmuls as they are (no transpose of a register tile). MASKED=False is the fast
    body, for whole query blocks inside len_q whose every row sees every key of the block."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        q = _load_block(q_base, offs_m, offs_d, stride_qt, len_q, head_dim, MASKED, EVEN_D)
        do = _load_block(do_base, offs_m, offs_d, stride_ot, len_q, head_dim, MASKED, EVEN_D)
        s_t = _dot(k, tl.trans(q), PRECISION, UPCAST) * scale_log2  # (BLOCK_N, BLOCK_M), base 2
        if MASKED:
            lse = tl.load(LSE + row_base + offs_m, mask=offs_m < len_q, other=float("inf"))
            delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < len_q, other=0.0)
            s_t, valid, bucket = _masked_scores(
                s_t, offs_m[None, :], offs_n[:, None], len_q, len_k, h, num_heads, kpm_row_ptr, TABLE, LUT,
                max_distance, num_buckets_half, CAUSAL, HAS_KPM, HAS_T5, T5_BIDIR,
            )  # fmt: skip
        else:
            lse = tl.load(LSE + row_base + offs_m)
            delta = tl.load(DELTA + row_base + offs_m)
        p_t = tl.exp2(s_t - lse[None, :])  # softmax probabilities P^T (BLOCK_N, BLOCK_M); 0 where masked
        dp_t = _dot(v, tl.trans(do), PRECISION, UPCAST)  # dL/d(P after dropout)^T (BLOCK_N, BLOCK_M)
        if DROPOUT:
            # The forward's draws for these (i, j), on the transposed tile: rows j, columns i.
            rng_rows_t = _rng_rows(b, h, num_heads, offs_m[None, :], rng_len_q, rng_len_k)
            keep_t = _dropout_keep(seed, rng_rows_t, offs_n[:, None], p_drop, scale_keep)
            dv += _dot((p_t * keep_t).to(do.dtype), do, PRECISION, UPCAST)
            dp_t = dp_t * keep_t  # dL/dP^T
        else:
            dv += _dot(p_t.to(do.dtype), do, PRECISION, UPCAST)
        ds_t = p_t * (dp_t - delta[None, :])  # dL/d(score)^T in natural units, before the scale
        if MASKED:
            ds_t = tl.where(valid, ds_t, 0.0)
        dk += _dot(ds_t.to(q.dtype), q, PRECISION, UPCAST)
        if MASKED and HAS_T5:  # `bucket` exists only in the masked body
            _table_grad(DTABLE, bucket, valid, ds_t, h, num_heads)
    return dk, dv


@triton.jit
def _table_grad(DTABLE, bucket, valid, ds, h, num_heads):
    """Add this tile's dS into the (num_buckets, H) table gradient: one atomic add per bucket present in
    the tile, of the tile's dS summed over that bucket. An atomic per score element (the first version)
    ran the T5 backward at ~1.5 TFLOP/s on an H200: every program hammered the same 32 addresses. Buckets
    are monotone in the distance on each side of the diagonal, so a tile away from the diagonal spans a
    few (one, once distances pass max_distance); only tiles that straddle the diagonal span many."""
    b = tl.where(valid, bucket, 0)
    lo = tl.min(tl.where(valid, bucket, 1 << 30))
    hi = tl.max(tl.where(valid, bucket, -1))
    for bkt in range(lo, hi + 1):
        part = tl.sum(tl.where(valid & (b == bkt), ds, 0.0))
        tl.atomic_add(DTABLE + bkt * num_heads + h, part)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, KPM, CU_Q, CU_K, TABLE, LUT, DTABLE, SEED,
    scale_log2, scale, p_drop, rng_len_q, rng_len_k,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    stride_lb, stride_lh,
    stride_mb,
    num_heads, num_kv_heads, group, dense_len_q, dense_len_k, HEAD_DIM: tl.constexpr, max_distance, num_buckets_half,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_T5: tl.constexpr, T5_BIDIR: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
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
    k = _load_block(k_base, offs_n, offs_d, stride_kt, len_k, HEAD_DIM, True, EVEN_D)  # (BLOCK_N, BLOCK_D)
    v = _load_block(v_base, offs_n, offs_d, stride_vt, len_k, HEAD_DIM, True, EVEN_D)
    kpm_row = KPM + b * stride_mb
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Query blocks: [lo, mid) the causal diagonal (masked), [mid, full) mask-free, [full, len_q) the partial
    # last block (masked). Rows above lo see none of this block's keys; from mid on, every row sees all of
    # them. Mask-free needs this key block inside len_k, and no padding mask or T5 bias.
    lo = 0
    first_full = 0
    if CAUSAL:
        shift = len_k - len_q  # query i sees key j iff j <= i + shift
        lo = tl.maximum(0, start_n * BLOCK_N - shift) // BLOCK_M * BLOCK_M
        first_full = (tl.maximum(0, (start_n + 1) * BLOCK_N - 1 - shift) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    full = len_q // BLOCK_M * BLOCK_M
    full = tl.where((start_n + 1) * BLOCK_N <= len_k, full, lo)
    if HAS_KPM:
        full = lo
    if HAS_T5:
        full = lo
    mid = tl.maximum(lo, tl.minimum(first_full, full))
    full = tl.maximum(mid, full)
    seed = _dropout_seed(SEED, DROPOUT)
    scale_keep = 1.0 / (1.0 - p_drop)
    for g in range(0, group):
        h = hk * group + g
        q_base = Q + b * stride_qb + h * stride_qh + start_q * stride_qt
        do_base = DO + b * stride_ob + h * stride_oh + start_q * stride_ot
        row_base = b * stride_lb + h * stride_lh + start_q
        dk, dv = _dkdv_inner(
            dk, dv, k, v, q_base, do_base, LSE, DELTA, DTABLE, row_base, stride_qt, stride_ot, lo, mid,
            offs_m0, offs_n, offs_d, len_q, len_k, HEAD_DIM, h, num_heads, kpm_row, TABLE, LUT,
            scale_log2, max_distance, num_buckets_half, seed, b, rng_len_q, rng_len_k, p_drop, scale_keep,
            True, CAUSAL, HAS_KPM, HAS_T5, T5_BIDIR, PRECISION, UPCAST, EVEN_D, DROPOUT, BLOCK_M,
        )  # fmt: skip
        dk, dv = _dkdv_inner(
            dk, dv, k, v, q_base, do_base, LSE, DELTA, DTABLE, row_base, stride_qt, stride_ot, mid, full,
            offs_m0, offs_n, offs_d, len_q, len_k, HEAD_DIM, h, num_heads, kpm_row, TABLE, LUT,
            scale_log2, max_distance, num_buckets_half, seed, b, rng_len_q, rng_len_k, p_drop, scale_keep,
            False, CAUSAL, HAS_KPM, HAS_T5, T5_BIDIR, PRECISION, UPCAST, EVEN_D, DROPOUT, BLOCK_M,
        )  # fmt: skip
        dk, dv = _dkdv_inner(
            dk, dv, k, v, q_base, do_base, LSE, DELTA, DTABLE, row_base, stride_qt, stride_ot, full, len_q,
            offs_m0, offs_n, offs_d, len_q, len_k, HEAD_DIM, h, num_heads, kpm_row, TABLE, LUT,
            scale_log2, max_distance, num_buckets_half, seed, b, rng_len_q, rng_len_k, p_drop, scale_keep,
            True, CAUSAL, HAS_KPM, HAS_T5, T5_BIDIR, PRECISION, UPCAST, EVEN_D, DROPOUT, BLOCK_M,
        )  # fmt: skip
    dk = dk * scale
    dk_base = DK + b * stride_kb + hk * stride_kh + start_k * stride_kt
    dv_base = DV + b * stride_vb + hk * stride_vh + start_k * stride_vt
    _store_block(dk_base, dk.to(DK.dtype.element_ty), offs_n, offs_d, stride_kt, len_k, HEAD_DIM, EVEN_D)
    _store_block(dv_base, dv.to(DV.dtype.element_ty), offs_n, offs_d, stride_vt, len_k, HEAD_DIM, EVEN_D)


@triton.jit
def _dq_inner(
    dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, lo, hi,
    offs_m, offs_n0, offs_d, len_q, len_k, head_dim, h, num_heads, kpm_row_ptr, TABLE, LUT,
    scale_log2, max_distance, num_buckets_half, seed, rng_rows, p_drop, scale_keep,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_T5: tl.constexpr,
    T5_BIDIR: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, EVEN_D: tl.constexpr,
    DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Key blocks lo, lo + BLOCK_N, ... < hi into this query block's dQ; MASKED=False as in _fwd_inner."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_block(k_base, offs_n, offs_d, stride_kt, len_k, head_dim, MASKED, EVEN_D)
        v = _load_block(v_base, offs_n, offs_d, stride_vt, len_k, head_dim, MASKED, EVEN_D)
        s = _dot(q, tl.trans(k), PRECISION, UPCAST) * scale_log2
        if MASKED:
            s, valid, _bucket = _masked_scores(
                s, offs_m[:, None], offs_n[None, :], len_q, len_k, h, num_heads, kpm_row_ptr, TABLE, LUT,
                max_distance, num_buckets_half, CAUSAL, HAS_KPM, HAS_T5, T5_BIDIR,
            )  # fmt: skip
        p = tl.exp2(s - lse[:, None])
        dp = _dot(do, tl.trans(v), PRECISION, UPCAST)  # dL/d(P after dropout)
        if DROPOUT:
            dp = dp * _dropout_keep(seed, rng_rows[:, None], offs_n[None, :], p_drop, scale_keep)
        ds = p * (dp - delta[:, None])
        if MASKED:
            ds = tl.where(valid, ds, 0.0)
        dq += _dot(ds.to(k.dtype), k, PRECISION, UPCAST)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KPM, CU_Q, CU_K, TABLE, LUT, SEED,
    scale_log2, scale, p_drop, rng_len_q, rng_len_k,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    stride_lb, stride_lh,
    stride_mb,
    num_heads, group, dense_len_q, dense_len_k, HEAD_DIM: tl.constexpr, max_distance, num_buckets_half,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_T5: tl.constexpr, T5_BIDIR: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
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
    q = _load_block(q_base, offs_m, offs_d, stride_qt, len_q, HEAD_DIM, True, EVEN_D)
    do = _load_block(do_base, offs_m, offs_d, stride_ot, len_q, HEAD_DIM, True, EVEN_D)
    row_base = b * stride_lb + h * stride_lh + start_q
    # Rows past len_q: LSE +inf gives p = 0, so they add nothing (and are not stored).
    lse = tl.load(LSE + row_base + offs_m, mask=offs_m < len_q, other=float("inf"))
    delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < len_q, other=0.0)
    kpm_row = KPM + b * stride_mb
    seed = _dropout_seed(SEED, DROPOUT)
    rng_rows = _rng_rows(b, h, num_heads, offs_m, rng_len_q, rng_len_k)
    scale_keep = 1.0 / (1.0 - p_drop)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = len_k
    if CAUSAL:
        hi = tl.minimum(len_k, (start_m + 1) * BLOCK_M + len_k - len_q)
    mid = _unmasked_key_end(start_m, len_q, len_k, CAUSAL, HAS_KPM, HAS_T5, BLOCK_M, BLOCK_N)
    dq = _dq_inner(
        dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, 0, mid,
        offs_m, offs_n0, offs_d, len_q, len_k, HEAD_DIM, h, num_heads, kpm_row, TABLE, LUT,
        scale_log2, max_distance, num_buckets_half, seed, rng_rows, p_drop, scale_keep,
        False, CAUSAL, HAS_KPM, HAS_T5, T5_BIDIR, PRECISION, UPCAST, EVEN_D, DROPOUT, BLOCK_N,
    )  # fmt: skip
    dq = _dq_inner(
        dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, mid, hi,
        offs_m, offs_n0, offs_d, len_q, len_k, HEAD_DIM, h, num_heads, kpm_row, TABLE, LUT,
        scale_log2, max_distance, num_buckets_half, seed, rng_rows, p_drop, scale_keep,
        True, CAUSAL, HAS_KPM, HAS_T5, T5_BIDIR, PRECISION, UPCAST, EVEN_D, DROPOUT, BLOCK_N,
    )  # fmt: skip
    dq = dq * scale
    dq_base = DQ + b * stride_qb + h * stride_qh + start_q * stride_qt
    _store_block(dq_base, dq.to(DQ.dtype.element_ty), offs_m, offs_d, stride_qt, len_q, HEAD_DIM, EVEN_D)


# ------------------------------------------------------------------------------ launch configuration

# Hopper-minded candidates, not yet timed on a GPU; the autotuner picks per shape, and a config whose
# shared memory does not fit (fp32 inputs at head dim 128, say) fails to compile and is skipped by it.
# Every loop bound the kernels compute is a multiple of the config's BLOCK_M / BLOCK_N. Compiled ahead of
# time for sm_90 (bf16, head dims 64, 80, 128, causal and not), every config below fits in shared memory
# and none spills registers inside its inner loops in the kernel(s) it is meant for (noted where not all).
# Forward: a bf16 128-row K or V tile at head dim 128 is 32 KiB, so 128 x 128 with 3 stages takes 224 KiB
# of the 227 KiB a Hopper block may use. 128 x 64 is FlashAttention-2's and the Triton tutorial's H100
# tile; 64 x 32 is a small fallback (fp32 inputs).
CUDA_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
]
# The backward holds more tiles live (q, k, v, dO, and fp32 dK, dV or dQ): smaller tiles. The dK/dV and dQ
# kernels are tuned separately over this one list: a narrow query step under a wide key block (32 x 128,
# the Triton tutorial's dK/dV shape, here with 8 warps) suits the first, the transpose (128 x 32) and the
# 128-row query blocks the second (128 x 64, and above head dim 64 also 64 x 128 and 64 x 64 with 4 warps,
# spill in dK/dV).
CUDA_BWD_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=2),
]
INTERPRET_BLOCK = 16  # under TRITON_INTERPRET=1: small tiles so short test sequences cross block edges
AUTOTUNE_KEY = ["dense_len_q", "dense_len_k", "HEAD_DIM", "CAUSAL", "HAS_T5", "VARLEN", "DROPOUT"]

# TANDEM_ATTENTION_AUTOTUNE=0 launches the first config of each list without searching: every new
# (shape, flags) combination otherwise compiles and times all of them, which dominates short test runs.
ENV_AUTOTUNE = "TANDEM_ATTENTION_AUTOTUNE"
# Its config: modest tiles that fit shared memory for every dtype and flag set (the autotuner skips a
# config that does not fit; a single config cannot be skipped: 128 x 128 fp32 with the T5 bias needs
# 246 KB of the H200's 227 KB).
UNTUNED_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2)
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
        if os.environ.get(ENV_AUTOTUNE, "1") == "0":
            configs = [UNTUNED_CONFIG]  # no search: each new shape compiles and runs one config
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
    dropout_p: float = 0.0


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
        DROPOUT=pb.dropout_p > 0.0,
        UPCAST=dtype == torch.bfloat16 and interpreting(),
        CAUSAL=pb.causal,
        VARLEN=pb.varlen,
        HAS_KPM=kpm is not None,
        HAS_T5=t5 is not None,
        T5_BIDIR=bool(t5 is not None and t5.bidirectional),
        BLOCK_D=max(16, triton.next_power_of_2(pb.head_dim)),
        # Head dim a power of 2 (>= 16, as most are): no head-dim mask at all.
        EVEN_D=max(16, triton.next_power_of_2(pb.head_dim)) == pb.head_dim,
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


def draw_dropout_seed(device: torch.device) -> torch.Tensor:
    """int64 (1,) Philox seed for one attention call, drawn from PyTorch's generator of `device` (on the
    device, so no host sync): reproducible under torch.manual_seed, forked by the tensor-parallel RNG
    tracker, and redrawn identically by an activation-checkpointing recompute, which restores the generator."""
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)


def _forward(q, k, v, kpm, cu_q, cu_k, seed, pb: _Problem) -> tuple[torch.Tensor, torch.Tensor]:
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
        seed if seed is not None else dummy,
        pb.scale * LOG2E, pb.dropout_p, pb.grid_len_q, pb.grid_len_k,
        *_strides(q, pb.varlen), *_strides(k, pb.varlen), *_strides(v, pb.varlen), *_strides(o, pb.varlen),
        *_row_strides(pb, total_q),
        kpm.stride(0) if kpm is not None else 0,
        pb.num_heads, pb.num_heads // pb.num_kv_heads, pb.dense_len_q, pb.dense_len_k, pb.head_dim,
        max_distance, half,
        PRECISION=_precision(q.dtype), **_common_args(pb, kpm, q.dtype), **blocks,
    )  # fmt: skip
    return o, lse


def _backward(q, k, v, o, lse, do, kpm, cu_q, cu_k, seed, pb: _Problem):
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
        seed=seed if seed is not None else dummy,
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
        dtable if dtable is not None else dummy, ptrs["seed"],
        pb.scale * LOG2E, pb.scale, pb.dropout_p, pb.grid_len_q, pb.grid_len_k, *strides,
        pb.num_heads, pb.num_kv_heads, group, pb.dense_len_q, pb.dense_len_k, pb.head_dim, max_distance, half,
        PRECISION=precision, **common, **blocks,
    )  # fmt: skip
    kernel, blocks = _kernel("dq", device)
    grid_q = lambda meta: (triton.cdiv(pb.grid_len_q, meta["BLOCK_M"]), pb.batch * pb.num_heads)  # noqa: E731
    kernel[grid_q](
        q, k, v, do, lse, delta, dq, ptrs["kpm"], ptrs["cu_q"], ptrs["cu_k"], ptrs["table"], ptrs["lut"],
        ptrs["seed"], pb.scale * LOG2E, pb.scale, pb.dropout_p, pb.grid_len_q, pb.grid_len_k, *strides,
        pb.num_heads, group, pb.dense_len_q, pb.dense_len_k, pb.head_dim, max_distance, half,
        PRECISION=precision, **common, **blocks,
    )  # fmt: skip
    return dq, dk, dv, dtable


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, table, kpm, cu_q, cu_k, pb: _Problem):  # type: ignore[override]
        # The dropout mask is regenerated from this seed in the backward, never stored.
        seed = draw_dropout_seed(q.device) if pb.dropout_p > 0.0 else None
        o, lse = _forward(q, k, v, kpm, cu_q, cu_k, seed, pb)
        ctx.save_for_backward(q, k, v, o, lse, kpm, cu_q, cu_k, seed)
        ctx.pb = pb
        return o

    @staticmethod
    def backward(ctx, do):  # type: ignore[override]
        q, k, v, o, lse, kpm, cu_q, cu_k, seed = ctx.saved_tensors
        pb: _Problem = ctx.pb
        dq, dk, dv, dtable = _backward(q, k, v, o, lse, do, kpm, cu_q, cu_k, seed, pb)
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


# Both entry points run eagerly inside a torch.compile region (train.compile=blocks): an opaque call, one
# graph break between the compiled graphs before and after it, rather than TorchDynamo tracing the
# autograd.Function's launch code and the autotuner. (Decorating imports torch._dynamo, which imports
# Triton: harmless here, where Triton is imported already, but not in pretrain.kernels.attention.)
@torch.compiler.disable
def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    t5_bias: T5Bias | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Fused attention. q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D); key_padding_mask: (B, Tk) bool, True
    = real key; t5_bias: T5's relative position bias fused in-kernel; dropout_p: dropout on the attention
    probabilities (seed from PyTorch's generator of q's device). Returns (B, H, Tq, D)."""
    _check(q, k, v, head_axis=1)
    _check_dropout(dropout_p)
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
                  scale if scale is not None else 1.0 / math.sqrt(d), t5_bias, float(dropout_p))  # fmt: skip
    table = t5_bias.table if t5_bias is not None else None
    return _FlashAttention.apply(q, k, v, table, kpm, None, None, pb)


@torch.compiler.disable
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
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Fused attention over packed sequences (FlashAttention's varlen interface).

    q: (total_q, H, D); k, v: (total_k, Hkv, D); cu_seqlens_*: int32 (num_seqs + 1,) cumulative lengths
    starting at 0; max_seqlen_*: the longest sequence (sizes the grid). Sequence i's queries attend only
    to sequence i's keys; causal is bottom-right aligned per sequence; dropout_p as in `flash_attention`
    (sequence i draws as batch row i at the max lengths). Returns (total_q, H, D)."""
    _check(q, k, v, head_axis=1)
    _check_dropout(dropout_p)
    if cu_seqlens_q.shape != cu_seqlens_k.shape or cu_seqlens_q.dim() != 1:
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be 1-D and of the same length (num_seqs + 1)")
    _check_t5(t5_bias, q.shape[1])
    q, k, v = (_kernel_ready(x) for x in (q, k, v))
    d = q.shape[-1]
    pb = _Problem(cu_seqlens_q.numel() - 1, q.shape[1], k.shape[1], d, 0, 0, int(max_seqlen_q),
                  int(max_seqlen_k), True, causal, scale if scale is not None else 1.0 / math.sqrt(d),
                  t5_bias, float(dropout_p))  # fmt: skip
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


def _check_dropout(dropout_p: float) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"Triton attention: dropout_p={dropout_p} must be in [0, 1)")
