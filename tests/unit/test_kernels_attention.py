"""Tandem's Triton attention against a float64 softmax(q k^T * scale + bias + masks) v written out here.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before the kernel module is
imported: Triton picks interpreter or compiler when a kernel is defined). The interpreter is ~2000x
slower than SDPA, so shapes are tiny, mostly with lengths that are not multiples of the 16-wide
interpreter blocks (a partial last block) and some that are (none), so both the kernels' mask-free and
masked loop bodies run. Every buffer the kernels write starts as NaN, so an element a kernel forgets fails
the test.
Inputs are fresh each run (seed from the clock, printed so a failure can be replayed with TANDEM_SEED).

Tolerances, relative to max(1, max|reference|), against fp64 computed from the same (rounded) inputs:
fp32 2e-5 (IEEE fp32 products, ~1e-6 measured, sums over <= 48 keys); fp16 5e-3 (P is rounded to fp16
before P·V and dS before dS·K: unit roundoff 2^-11 ~ 5e-4, times a few accumulations); bf16 3e-2 (same
with 2^-8 ~ 4e-3).
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import time

import pytest
import torch

from pretrain.kernels import T5Bias, attention, get_default_backend, set_default_backend
from pretrain.kernels.t5_bias import t5_dense_bias, t5_relative_bucket

TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _import_kernels():
    """The kernel module, interpreted when there is no GPU (re-imported if it was defined compiled)."""
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
        name = "pretrain.kernels.flash_attention"
        if name in sys.modules and not sys.modules[name].interpreting():
            importlib.reload(sys.modules[name])
    return importlib.import_module("pretrain.kernels.flash_attention")


fa = _import_kernels()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def seed() -> int:
    value = int(os.environ.get("TANDEM_SEED", time.time_ns() % 2**31))
    print(f"seed={value} (rerun with TANDEM_SEED={value})")
    torch.manual_seed(value)
    return value


@pytest.fixture(autouse=True)
def poisoned(monkeypatch: pytest.MonkeyPatch) -> None:
    def nan_empty(shape, *, dtype, device, stride=None):
        out = torch.empty_strided(shape, stride, dtype=dtype, device=device) if stride else None
        out = out if out is not None else torch.empty(shape, dtype=dtype, device=device)
        return out.fill_(float("nan"))

    monkeypatch.setattr(fa, "_empty", nan_empty)


def reference(q, k, v, *, causal=False, kpm=None, bias=None, scale=None, varlen_cu=None) -> torch.Tensor:
    """fp64 attention. q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D); query head h reads kv head h // group;
    causal bottom-right aligned; rows that see no key give 0 (the kernel's convention)."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale  # (B, H, Tq, Tk)
    if bias is not None:
        s = s + bias.double()
    tq, tk = s.shape[-2:]
    allowed = torch.ones(tq, tk, dtype=torch.bool, device=q.device)
    if causal:
        allowed = (
            torch.arange(tk, device=q.device)[None] <= torch.arange(tq, device=q.device)[:, None] + tk - tq
        )
    allowed = allowed[None, None]
    if kpm is not None:
        allowed = allowed & kpm[:, None, None, :]
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    return p @ v


def table_grad_terms(q, k, v, dout, *, causal, kpm, bias, scale) -> torch.Tensor:
    """(num_buckets, H): for each bucket, the sum of |terms| that its gradient adds up, sum of P*(|dP| + |delta|)
    over the scores in that bucket (fp64). The table gradient itself is the signed sum of
    dS = P*(dP - delta), which cancels heavily (each softmax row of dS sums to zero), so its error can only
    be judged against the size of what was summed, not against the (possibly tiny) result."""
    with torch.no_grad():
        qd, kd, vd, dod = (x.detach().double() for x in (q, k, v, dout))
        scale = 1.0 / math.sqrt(qd.shape[-1]) if scale is None else scale
        tq, tk = qd.shape[-2], kd.shape[-2]
        s = qd @ kd.transpose(-1, -2) * scale + t5_dense_bias(bias, tq, tk).double()
        allowed = torch.ones(tq, tk, dtype=torch.bool, device=qd.device)
        if causal:
            allowed = (
                torch.arange(tk, device=qd.device)[None]
                <= torch.arange(tq, device=qd.device)[:, None] + tk - tq
            )
        allowed = allowed[None, None] if kpm is None else allowed[None, None] & kpm[:, None, None, :]
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
        dp = dod @ vd.transpose(-1, -2)
        delta = (p * dp).sum(-1, keepdim=True)
        mag = (p * (dp.abs() + delta.abs())).sum(0)  # (H, Tq, Tk)
        q_pos = torch.arange(tq, device=qd.device) + (tk - tq)
        buckets = t5_relative_bucket(
            torch.arange(tk, device=qd.device)[None, :] - q_pos[:, None],
            bidirectional=bias.bidirectional,
            num_buckets=bias.num_buckets,
            max_distance=bias.max_distance,
        ).flatten()
        return torch.stack(
            [
                torch.bincount(buckets, weights=mag[h].flatten(), minlength=bias.num_buckets)
                for h in range(mag.shape[0])
            ],
            dim=1,
        )


# Unit roundoff of each dtype: the kernel rounds P and dS to it before its matmuls, and inputs/outputs are
# rounded to it, so each summed term of the bias-table gradient carries a few u of relative error.
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
TABLE_TERMS_FACTOR = 8  # a few roundings per term (P, dP, delta, dS), with margin


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert not got.isnan().any(), "NaN in the kernel's result: an element was never written"
    return ((got.double() - want).abs().max() / want.abs().max().clamp(min=1.0)).item()


def take_grads(inputs: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """The kernel's gradients of `inputs`, cleared from them so the reference's backward fills them anew."""
    grads = [x.grad for x in inputs]
    for x in inputs:
        x.grad = None
    return grads


def errors_against(out, want, grads, inputs) -> dict[str, float]:
    """rel_err of the kernel's output and of each gradient (dq, dk, dv, dtable) against the reference's."""
    errs = {"out": rel_err(out, want)}
    for name, got, x in zip(["dq", "dk", "dv", "dtable"], grads, inputs, strict=False):
        errs[name] = rel_err(got, x.grad)
    return errs


CASES = {
    # name: (B, H, Hkv, Tq, Tk, D, causal, padding, t5 (bidirectional) or None, scale)
    "noncausal": (2, 2, 2, 37, 37, 32, False, False, None, None),
    "causal": (2, 2, 2, 37, 37, 32, True, False, None, None),
    "cross_tq_lt_tk": (1, 2, 2, 19, 45, 32, False, False, None, None),
    "causal_tq_lt_tk": (1, 2, 2, 19, 45, 32, True, False, None, None),
    "causal_tq_gt_tk": (1, 2, 2, 45, 19, 32, True, False, None, None),  # first 26 rows see no key
    "padding": (2, 2, 2, 29, 29, 32, False, True, None, None),
    "gqa_causal_padding": (2, 4, 2, 33, 33, 16, True, True, None, None),
    "mqa": (1, 4, 1, 21, 35, 16, False, False, None, None),
    "t5_bidirectional": (2, 2, 2, 37, 37, 32, False, True, True, None),
    "t5_causal_unidirectional": (1, 2, 2, 41, 41, 32, True, False, False, None),
    "head_dim_48_scale": (1, 2, 2, 23, 23, 48, True, False, None, 0.3),
    # Lengths that are multiples of the 16-wide interpreter blocks: no partial tail block, so the mask-free
    # bodies run up to the diagonal (or the end) and only diagonal blocks take the masked body.
    "causal_block_multiple": (1, 2, 2, 48, 48, 32, True, False, None, None),
    "causal_tq_lt_tk_block_multiple": (1, 2, 2, 32, 48, 32, True, False, None, None),
    "causal_tq_gt_tk_block_multiple": (1, 2, 2, 48, 32, 32, True, False, None, None),  # 16 rows see no key
    "gqa_block_multiple": (1, 4, 2, 32, 48, 16, False, False, None, None),
}


def run_case(case: str, dtype: torch.dtype) -> dict[str, float]:
    b, h, hkv, tq, tk, d, causal, padding, t5, scale = CASES[case]
    q = torch.randn(b, h, tq, d, device=DEVICE).to(dtype).requires_grad_()
    k = torch.randn(b, hkv, tk, d, device=DEVICE).to(dtype).requires_grad_()
    v = torch.randn(b, hkv, tk, d, device=DEVICE).to(dtype).requires_grad_()
    kpm = None
    if padding:  # right padding of random length plus a random hole, at least one real key per row
        kpm = torch.rand(b, tk, device=DEVICE) > 0.25
        kpm[:, 0] = True
        kpm[-1, tk - 5 :] = False
    bias = None
    if t5 is not None:
        # max_distance 20 < T so the log-spaced and saturated buckets are all exercised.
        table = torch.randn(32, h, device=DEVICE).to(dtype).requires_grad_()
        bias = T5Bias(table, bidirectional=t5, num_buckets=32, max_distance=20)
    out = attention(
        q, k, v, causal=causal, key_padding_mask=kpm, position_bias=bias, scale=scale, backend="triton"
    )
    dout = torch.randn_like(out)
    out.backward(dout)
    inputs = [q, k, v] + ([bias.table] if bias is not None else [])
    grads = take_grads(inputs)
    dense = t5_dense_bias(bias, tq, tk) if bias is not None else None
    want = reference(q, k, v, causal=causal, kpm=kpm, bias=dense, scale=scale)
    want.backward(dout.double())
    errs = errors_against(out, want, grads, inputs)
    if bias is not None and dtype != torch.float32:
        # Half precision: judge the table gradient against the terms it sums (see table_grad_terms), in
        # units of TABLE_TERMS_FACTOR x u, so the check passes at <= 1 whatever the cancellation.
        terms = table_grad_terms(q, k, v, dout, causal=causal, kpm=kpm, bias=bias, scale=scale)
        err = (grads[3].double() - bias.table.grad.double()).abs() if bias.table.grad is not None else None
        assert err is not None
        bound = TABLE_TERMS_FACTOR * UNIT_ROUNDOFF[dtype] * terms
        errs["dtable"] = (err / bound.clamp(min=1e-300)).max().item() * TOL[dtype]
    return errs


@pytest.mark.parametrize("case", list(CASES))
def test_attention_fp32_forward_and_grads_match_fp64(case: str):
    errs = run_case(case, torch.float32)
    assert max(errs.values()) < TOL[torch.float32], errs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "case", ["causal", "causal_block_multiple", "gqa_causal_padding", "t5_bidirectional"]
)
def test_attention_half_precision_forward_and_grads_match_fp64(case: str, dtype: torch.dtype):
    errs = run_case(case, dtype)
    assert max(errs.values()) < TOL[dtype], errs


# Sequence lengths (queries; keys when not causal): odd ones, and multiples of the interpreter's blocks.
PACKINGS = {"odd": ([5, 20, 33], [9, 17, 30]), "block_multiple": ([16, 48, 32], [32, 16, 48])}


@pytest.mark.parametrize("packing", list(PACKINGS))
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_varlen_packed_matches_each_sequence_alone(causal: bool, packing: str):
    lens_q, lens_k = PACKINGS[packing]
    lens_k = lens_q if causal else lens_k
    h, hkv, d = 4, 2, 16
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    q = torch.randn(sum(lens_q), h, d, device=DEVICE, requires_grad=True)  # (total_q, H, D)
    k = torch.randn(sum(lens_k), hkv, d, device=DEVICE, requires_grad=True)  # (total_k, Hkv, D)
    v = torch.randn(sum(lens_k), hkv, d, device=DEVICE, requires_grad=True)
    out = fa.varlen_attention(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal)
    dout = torch.randn_like(out)
    out.backward(dout)
    got = [out, q.grad, k.grad, v.grad]
    for x in (q, k, v):
        x.grad = None
    pieces = []
    for i in range(len(lens_q)):
        sq, sk = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        one = reference(*(x[s].transpose(0, 1)[None] for x, s in ((q, sq), (k, sk), (v, sk))), causal=causal)
        pieces.append(one[0].transpose(0, 1))  # (Tq_i, H, D)
    want = torch.cat(pieces)
    want.backward(dout.double())
    errs = [rel_err(g, w) for g, w in zip(got, [want, q.grad, k.grad, v.grad], strict=True)]
    assert max(errs) < TOL[torch.float32], errs


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_buckets_match_transformers(bidirectional: bool):
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    rel = torch.arange(-300, 300)
    for num_buckets, max_distance in [(32, 128), (16, 20), (8, 5)]:
        ours = t5_relative_bucket(
            rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
        )
        theirs = t5.T5Attention._relative_position_bucket(
            rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
        )
        assert torch.equal(ours, theirs), (num_buckets, max_distance)
    # The kernel's distance lookup table reproduces the full formula at every distance.
    bias = T5Bias(torch.zeros(32, 1), bidirectional, 32, 128)
    lut = fa._distance_bucket_lut(bias, torch.device("cpu"))
    dist = rel.abs().clamp(max=128)
    direction = (rel > 0).long() * 16 if bidirectional else 0
    via_lut = lut[dist].long() + direction if bidirectional else lut[(-rel).clamp(min=0, max=128)].long()
    want = t5_relative_bucket(rel, bidirectional=bidirectional, num_buckets=32, max_distance=128)
    assert torch.equal(via_lut, want)


def test_sdpa_path_with_t5_bias_matches_reference():
    q, k, v = (torch.randn(1, 2, 13, 16) for _ in range(3))
    bias = T5Bias(torch.randn(32, 2), True, 32, 20)
    got = attention(q, k, v, position_bias=bias, backend="sdpa")
    assert rel_err(got, reference(q, k, v, bias=t5_dense_bias(bias, 13, 13))) < TOL[torch.float32]


def test_dispatch_rules(monkeypatch: pytest.MonkeyPatch):
    q = torch.randn(1, 2, 8, 16)
    calls = []
    monkeypatch.setattr(fa, "flash_attention", lambda *a, **kw: calls.append(1) or q)
    if DEVICE == "cpu":
        attention(q, q, q)  # auto on CPU: SDPA
        assert calls == []
    previous = set_default_backend("triton")
    try:
        assert get_default_backend() == "triton"
        attention(q, q, q)  # auto now resolves to the forced default
        assert calls == [1]
        attention(q, q, q, backend="sdpa")  # an explicit backend wins over the default
        assert calls == [1]
    finally:
        set_default_backend(previous)
    if DEVICE == "cpu":
        attention(q, q, q, dropout_p=0.1)  # auto on CPU: SDPA, dropout or not
        assert calls == [1]
    with pytest.raises(ValueError, match="dense position_bias"):
        attention(q, q, q, position_bias=torch.zeros(8, 8), backend="triton")
    with pytest.raises(ValueError, match="head_dim"):
        attention(torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8), backend="triton")
    with pytest.raises(ValueError, match="backend"):
        set_default_backend("cuda")  # type: ignore[arg-type]


def test_triton_on_cpu_without_interpreter_says_how_to_fix(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(fa, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fa.check_runnable(torch.device("cpu"))


@pytest.mark.parametrize(
    ("getter", "var", "value"),
    [
        ("get_default_backend", "TANDEM_ATTENTION_BACKEND", "sdpa"),
        ("get_default_norm_backend", "TANDEM_NORM_BACKEND", "torch"),
    ],
)
def test_env_var_sets_default_backend(getter: str, var: str, value: str):
    import subprocess

    code = f"from pretrain.kernels import {getter} as g; print(g())"
    env = {**os.environ, var: value}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == value
    env[var] = "bogus"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and f"{var}='bogus'" in bad.stderr


@pytest.mark.parametrize("preset", ["gpt-tiny", "llama-tiny", "bert-tiny", "t5-tiny"])
def test_model_loss_and_grads_same_with_triton_and_sdpa(preset: str):
    """GPT (learned positions, MHA), the Llama variant (RoPE, GQA), BERT (bidirectional, padding) and T5
    (fused relative-position bias in encoder and causal decoder, cross-attention with padding) through the
    entry point, with a padded batch: same loss and gradients on either backend (fp32; the kernels' ~1e-6
    per attention call, through 2 layers)."""
    from pretrain.config import load_config
    from pretrain.models import build_model

    cfg = load_config(
        None,
        ["data.shards=/tmp/shards", f"model.preset={preset}", "model.vocab_size=97", "model.dropout=0.0"],
    ).model
    model = build_model(cfg).to(DEVICE)
    ids = torch.randint(0, 97, (2, 21), device=DEVICE)
    mask = torch.ones(2, 21, dtype=torch.long, device=DEVICE)
    mask[1, 15:] = 0
    results = {}
    for backend in ("sdpa", "triton"):
        previous = set_default_backend(backend)
        try:
            model.zero_grad()
            if cfg.family == "t5":
                dec = ids[:, :9]
                logits = model(ids, decoder_input_ids=dec, attention_mask=mask)
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:10].flatten())
            else:
                logits = model(ids, attention_mask=mask)
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
        finally:
            set_default_backend(previous)
        # BERT's pooler takes no part in the MLM loss and has no gradient.
        results[backend] = (loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
    (loss_s, grads_s), (loss_t, grads_t) = results["sdpa"], results["triton"]
    assert abs(loss_s - loss_t) < 1e-5 * abs(loss_s)
    for gs, gt in zip(grads_s, grads_t, strict=True):
        assert rel_err(gt, gs.double()) < 1e-4


# ------------------------------------------------------------------------ GPU, real sizes (a future session)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("seq", [2048, 4096])
def test_gpu_real_size_bf16_matches_sdpa_fp32(causal: bool, seq: int):
    b, h, d = 2, 16, 128
    q, k, v = (
        torch.randn(b, h, seq, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
    )
    out = attention(q, k, v, causal=causal, backend="triton")
    dout = torch.randn_like(out)
    out.backward(dout)
    got = [out, q.grad, k.grad, v.grad]
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    want = attention(q32, k32, v32, causal=causal, backend="sdpa")
    want.backward(dout.float())
    for g, w in zip(got, [want, q32.grad, k32.grad, v32.grad], strict=True):
        assert rel_err(g, w) < TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_t5_bias_and_varlen_bf16():
    h, d = 8, 128
    q, k, v = (
        torch.randn(2, h, 2048, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
    )
    table = torch.randn(32, h, device="cuda", requires_grad=True)
    bias = T5Bias(table, True, 32, 128)
    out = attention(q, k, v, position_bias=bias, backend="triton")
    out.sum().backward()
    want = attention(q.float(), k.float(), v.float(), position_bias=bias, backend="sdpa")
    assert rel_err(out, want.detach()) < TOL[torch.bfloat16]
    assert table.grad is not None and torch.isfinite(table.grad).all()


# ------------------------------------------------------------------------------------- attention dropout

# The kernels draw each score element's keep/drop from a Philox seed taken from PyTorch's generator, so
# resetting the generator to RNG_STATE before a call replays the call's mask exactly (whatever q, k, v are).
DROPOUT_P = 0.3


def rng_state() -> torch.Tensor:
    """The state of the generator the kernels draw their seed from: the device's."""
    return torch.cuda.get_rng_state() if DEVICE == "cuda" else torch.get_rng_state()


def set_rng_state(state: torch.Tensor) -> None:
    (torch.cuda.set_rng_state if DEVICE == "cuda" else torch.set_rng_state)(state)


def read_keep_mask(shape, *, causal, kpm, hkv, p, rng_state) -> torch.Tensor:
    """(B, H, Tq, Tk) float 0/1: the keep mask of the Triton forward for this shape and flags, read from the
    forward's own output, not from any code of the kernel module. With q = 0 (and no bias) every visible key
    of row i gets the same probability 1/n_i, so with v = the identity on a chunk of D keys,
    O[i, d] = keep[i, c·D + d] / (n_i (1 - p)); one call per chunk of D keys, each after the same reset of
    the generator. Entries a row cannot see come back 0 (they carry no probability either way)."""
    b, h, tq, tk, d = shape
    visible = allowed_mask(tq, tk, causal=causal, kpm=kpm)  # (B or 1, 1, Tq, Tk)
    n = visible.sum(-1, keepdim=True).clamp(min=1).double()  # (B or 1, 1, Tq, 1)
    q = torch.zeros(b, h, tq, d, device=DEVICE)
    chunks = []
    for start in range(0, tk, d):
        v = torch.zeros(b, hkv, tk, d, device=DEVICE)
        width = min(d, tk - start)
        v[:, :, start : start + width, :width] = torch.eye(width, device=DEVICE)
        set_rng_state(rng_state)
        with torch.no_grad():
            out = attention(q, torch.zeros_like(v), v, causal=causal, key_padding_mask=kpm,
                            dropout_p=p, backend="triton")  # fmt: skip
        chunks.append(out[..., :width].double())
    keep = torch.cat(chunks, dim=-1) * n * (1 - p)  # (B, H, Tq, Tk), 0 or 1 up to fp32 rounding
    assert ((keep - keep.round()).abs() < 1e-4).all(), (
        "the forward's kept weights are not multiples of 1/(1-p)"
    )
    keep = keep.round() * visible
    # Exactly 0 or 1: a key counted twice (a block visited twice) would show as 2 and must not pass on.
    assert ((keep == 0) | (keep == 1)).all(), "the forward's kept weights are not 0 or 1/(1-p)"
    return keep


def allowed_mask(tq, tk, *, causal, kpm) -> torch.Tensor:
    allowed = torch.ones(tq, tk, dtype=torch.bool, device=DEVICE)
    if causal:
        allowed = torch.arange(tk, device=DEVICE)[None] <= torch.arange(tq, device=DEVICE)[:, None] + tk - tq
    allowed = allowed[None, None]
    return allowed if kpm is None else allowed & kpm[:, None, None, :]


def reference_dropout(q, k, v, keep, p, *, causal=False, kpm=None, bias=None) -> torch.Tensor:
    """fp64 attention with dropout: softmax over every visible key, then P * keep / (1 - p), then @ v."""
    qd, kd, vd = q.double(), k.double(), v.double()
    group = qd.shape[1] // kd.shape[1]
    kd, vd = kd.repeat_interleave(group, 1), vd.repeat_interleave(group, 1)
    s = qd @ kd.transpose(-1, -2) / math.sqrt(qd.shape[-1])
    if bias is not None:
        s = s + bias.double()
    allowed = allowed_mask(s.shape[-2], s.shape[-1], causal=causal, kpm=kpm)
    probs = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    return (probs * keep / (1 - p)) @ vd


DROPOUT_CASES = {
    # name: (B, H, Hkv, Tq, Tk, D, causal, padding, t5 bidirectional)
    "noncausal": (2, 2, 2, 37, 37, 32, False, False, None),
    "causal_block_multiple": (1, 2, 2, 48, 48, 32, True, False, None),  # mask-free bodies
    "causal_tq_gt_tk": (1, 2, 2, 45, 19, 32, True, False, None),  # rows that see nothing
    "gqa_causal_padding": (2, 4, 2, 33, 33, 16, True, True, None),
    "t5_bidirectional_padding": (2, 2, 2, 37, 37, 32, False, True, True),
}


@pytest.mark.parametrize("case", list(DROPOUT_CASES))
def test_attention_dropout_forward_and_grads_match_fp64_with_the_kernels_mask(case: str):
    """The mask read off the forward (read_keep_mask) makes the fp64 reference; the real call, after the same
    generator reset, must match it in output and in every gradient, so the backward kernels regenerated
    exactly the forward's mask (a wrong draw anywhere moves dq, dk, dv or the table gradient by O(1))."""
    errs = run_dropout_case(*DROPOUT_CASES[case], dtype=torch.float32)
    assert max(errs.values()) < TOL[torch.float32], errs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_attention_dropout_half_precision(dtype: torch.dtype):
    """The kept probabilities are rounded to the input dtype before P·V, like the plain kernel's (same TOL)."""
    errs = run_dropout_case(*DROPOUT_CASES["gqa_causal_padding"], dtype=dtype)
    assert max(errs.values()) < TOL[dtype], errs


def run_dropout_case(b, h, hkv, tq, tk, d, causal, padding, t5, *, dtype) -> dict[str, float]:
    kpm = None
    if padding:
        kpm = torch.rand(b, tk, device=DEVICE) > 0.25
        kpm[:, 0] = True
    state = rng_state()
    keep = read_keep_mask((b, h, tq, tk, d), causal=causal, kpm=kpm, hkv=hkv, p=DROPOUT_P, rng_state=state)
    q = torch.randn(b, h, tq, d, device=DEVICE).to(dtype).requires_grad_()
    k = torch.randn(b, hkv, tk, d, device=DEVICE).to(dtype).requires_grad_()
    v = torch.randn(b, hkv, tk, d, device=DEVICE).to(dtype).requires_grad_()
    bias = None
    if t5 is not None:
        bias = T5Bias(torch.randn(32, h, device=DEVICE, requires_grad=True), t5, 32, 20)
    dout = torch.randn(b, h, tq, d, device=DEVICE).to(dtype)
    set_rng_state(state)
    out = attention(q, k, v, causal=causal, key_padding_mask=kpm, position_bias=bias, dropout_p=DROPOUT_P,
                    backend="triton")  # fmt: skip
    out.backward(dout)
    inputs = [q, k, v] + ([bias.table] if bias is not None else [])
    grads = take_grads(inputs)
    dense = t5_dense_bias(bias, tq, tk) if bias is not None else None
    want = reference_dropout(q, k, v, keep, DROPOUT_P, causal=causal, kpm=kpm, bias=dense)
    want.backward(dout.double())
    errs = errors_against(out, want, grads, inputs)
    # The same call without dropout differs: the mask really was applied.
    plain = reference(q, k, v, causal=causal, kpm=kpm, bias=dense)
    assert rel_err(out.detach(), plain.detach()) > 1e-2
    return errs


def test_attention_dropout_mask_statistics():
    """Keep rate 1 - p within 5 binomial standard deviations; heads, batch rows and successive calls draw
    different masks (two independent masks agree on p² + (1 - p)² of their entries, not on all)."""
    b, h, tq, tk, d = 2, 2, 40, 64, 32
    state = rng_state()
    keep = read_keep_mask((b, h, tq, tk, d), causal=False, kpm=None, hkv=h, p=DROPOUT_P, rng_state=state)
    n = keep.numel()
    sigma = math.sqrt(n * DROPOUT_P * (1 - DROPOUT_P))
    assert abs(keep.sum().item() - n * (1 - DROPOUT_P)) < 5 * sigma, keep.mean().item()
    agree = 1 - 2 * DROPOUT_P * (1 - DROPOUT_P)  # 0.58 at p = 0.3
    for other in (keep[0, 1], keep[1, 0]):  # another head, another batch row
        same = (keep[0, 0] == other).double().mean().item()
        assert abs(same - agree) < 0.06, same  # 2560 entries: std of the rate ~0.01
    # The same generator state replays the mask; a later state draws a new one.
    assert torch.equal(keep, read_keep_mask((b, h, tq, tk, d), causal=False, kpm=None, hkv=h, p=DROPOUT_P,
                                            rng_state=state))  # fmt: skip
    torch.rand(1, device=DEVICE)
    later = read_keep_mask((b, h, tq, tk, d), causal=False, kpm=None, hkv=h, p=DROPOUT_P,
                           rng_state=rng_state())  # fmt: skip
    assert abs((later == keep).double().mean().item() - agree) < 0.06


def test_attention_dropout_under_activation_checkpointing_replays_the_mask():
    """torch's checkpoint restores the generator before the recompute, so the kernel redraws the same seed:
    the gradients equal those of the run without checkpointing, bit for bit."""
    from torch.utils.checkpoint import checkpoint

    q, k, v = (torch.randn(1, 2, 21, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    dout = torch.randn(1, 2, 21, 16, device=DEVICE)

    def core(q, k, v):
        return attention(q, k, v, causal=True, dropout_p=0.2, backend="triton") * 2.0

    state = rng_state()
    results = []
    for wrap in (False, True):
        set_rng_state(state)
        out = checkpoint(core, q, k, v, use_reentrant=False) if wrap else core(q, k, v)
        out.backward(dout)
        results.append([out.detach().clone()] + [x.grad.clone() for x in (q, k, v)])
        for x in (q, k, v):
            x.grad = None
    for plain, recomputed in zip(*results, strict=True):
        assert torch.equal(plain, recomputed)


def test_attention_dropout_rejects_bad_probability():
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match=r"dropout_p=1\.0"):
        attention(q, q, q, dropout_p=1.0, backend="triton")
    with pytest.raises(ValueError, match=r"dropout_p=-0\.1"):
        fa.flash_attention(q, q, q, dropout_p=-0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_gpu_dropout_real_size_bf16(causal: bool):
    """Real tile sizes (the autotuned blocks, 64-128 wide, not the interpreter's 16): the mask read off the
    forward reproduces output and gradients through an fp64 reference, in bf16."""
    errs = run_dropout_case(1, 4, 2, 1024, 1024, 128, causal, False, None, dtype=torch.bfloat16)
    assert max(errs.values()) < TOL[torch.bfloat16], errs


def test_varlen_dropout_draws_as_the_padded_dense_batch():
    """Packed sequence i draws at batch row i of the (max_q, max_k) grid, so non-causal varlen attention with
    dropout equals the dense call on the right-padded batch with a key padding mask (whose mask the test
    above checks against fp64), rows < len_q_i, in output and gradients, after the same generator reset."""
    lens_q, lens_k, h, d = [5, 20, 13], [9, 17, 30], 2, 16
    mq, mk = max(lens_q), max(lens_k)
    q, k, v = (torch.randn(3, h, t, d, device=DEVICE) for t in (mq, mk, mk))  # (B, H, T, D), padded
    kpm = torch.arange(mk, device=DEVICE)[None] < torch.tensor(lens_k, device=DEVICE)[:, None]
    dout = torch.randn(3, h, mq, d, device=DEVICE)
    rows_q = torch.arange(mq, device=DEVICE)[None] < torch.tensor(lens_q, device=DEVICE)[:, None]  # (B, Tq)
    dout = dout * rows_q[:, None, :, None]  # padded query rows carry no gradient
    state = rng_state()
    dense_in = [x.clone().requires_grad_() for x in (q, k, v)]
    set_rng_state(state)
    dense = attention(*dense_in, key_padding_mask=kpm, dropout_p=DROPOUT_P, backend="triton")
    dense.backward(dout)

    def pack(x, lens):  # (B, H, T, D) -> (sum(lens), H, D)
        return torch.cat([x[i, :, :n].transpose(0, 1) for i, n in enumerate(lens)])

    packed_in = [pack(q, lens_q), pack(k, lens_k), pack(v, lens_k)]
    packed_in = [x.clone().requires_grad_() for x in packed_in]
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    set_rng_state(state)
    packed = fa.varlen_attention(*packed_in, cu_q, cu_k, mq, mk, dropout_p=DROPOUT_P)
    packed.backward(pack(dout, lens_q))
    # Same draws, same scores; only the order of a few fp32 sums may differ: fp32 tolerance.
    assert rel_err(packed, pack(dense, lens_q).double()) < TOL[torch.float32]
    for got, x, lens in zip([p.grad for p in packed_in], dense_in, [lens_q, lens_k, lens_k], strict=True):
        assert rel_err(got, pack(x.grad, lens).double()) < TOL[torch.float32]


def test_train_kernel_backends_set_the_defaults_for_each_run(monkeypatch: pytest.MonkeyPatch):
    """train.attention_backend / train.norm_backend: an explicit value becomes the process default; 'auto'
    returns to what the environment variable names (else auto), so a later run in the same process never
    inherits an earlier one's choice."""
    from pretrain.config import ConfigError, TrainConfig
    from pretrain.kernels import get_default_norm_backend, set_default_norm_backend
    from pretrain.train import _apply_kernel_backends

    previous = get_default_backend(), get_default_norm_backend()
    try:
        _apply_kernel_backends(TrainConfig(attention_backend="sdpa", norm_backend="torch"))
        assert (get_default_backend(), get_default_norm_backend()) == ("sdpa", "torch")
        monkeypatch.delenv("TANDEM_ATTENTION_BACKEND", raising=False)
        monkeypatch.delenv("TANDEM_NORM_BACKEND", raising=False)
        _apply_kernel_backends(TrainConfig())  # the built-in defaults: Triton attention on CUDA, torch norms
        assert (get_default_backend(), get_default_norm_backend()) == ("auto", "torch")
        monkeypatch.setenv("TANDEM_ATTENTION_BACKEND", "sdpa")
        monkeypatch.setenv("TANDEM_NORM_BACKEND", "torch")
        _apply_kernel_backends(TrainConfig())
        assert (get_default_backend(), get_default_norm_backend()) == ("sdpa", "torch")
        if DEVICE == "cpu":
            monkeypatch.setenv("TRITON_INTERPRET", "0")
            with pytest.raises(ConfigError) as err:
                _apply_kernel_backends(TrainConfig(attention_backend="triton", norm_backend="triton"))
            assert "train.attention_backend='triton'" in str(err.value)
            assert "train.norm_backend='triton'" in str(err.value)
            assert (get_default_backend(), get_default_norm_backend()) == ("sdpa", "torch")  # untouched
            monkeypatch.setenv("TANDEM_NORM_BACKEND", "triton")  # `auto` defers to it: refused just the same
            with pytest.raises(
                ConfigError, match=r"TANDEM_NORM_BACKEND \(train\.norm_backend=auto\)='triton'"
            ):
                _apply_kernel_backends(TrainConfig())
    finally:
        set_default_backend(previous[0])
        set_default_norm_backend(previous[1])
