"""Every launch config of the Triton attention kernels, one at a time: correct, and how fast.

The kernels are autotuned over `CUDA_CONFIGS` (forward) and `CUDA_BWD_CONFIGS` (dK/dV and dQ). This
script forces each config alone (no autotuning) and, for each:

* checks it: a small fp32 case with odd lengths against a float64 reference (out, dq, dk, dv; relative
  to the largest reference element), and a real-size bf16 case (batch 2, 16 heads, seq 2048, head dim
  128, causal and not) against SDPA's math backend run in fp32 on the same bf16 inputs;
* times it: forward, and backward alone, at batch 4, 16 heads, seq 4096, head dim 128, bf16, causal
  and not, in TFLOP/s (FlashAttention's convention, see bench/attention.py).

Output: one table per kernel, best first. Use it to choose the autotune lists (predict, change,
measure). Needs CUDA.

Usage: python bench/attention_configs.py [--seq 4096] [--head-dim 128] [--skip-check]
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    if got.isnan().any():
        return float("nan")
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp(min=1.0)).item()


def small_fp32_errors(attention) -> dict[str, float]:
    """(2, 2, 37, 32) fp32, non-causal and causal, against float64."""
    worst: dict[str, float] = {}
    for causal in (False, True):
        q, k, v = (torch.randn(2, 2, 37, 32, device="cuda", requires_grad=True) for _ in range(3))
        out = attention(q, k, v, causal=causal, backend="triton")
        dout = torch.randn_like(out)
        got = [out, *torch.autograd.grad(out, (q, k, v), dout)]
        q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
        s = q64 @ k64.transpose(-1, -2) / math.sqrt(32)
        if causal:
            s = s.masked_fill(torch.ones(37, 37, device="cuda", dtype=torch.bool).triu(1), float("-inf"))
        ref = torch.softmax(s, -1) @ v64
        want = [ref, *torch.autograd.grad(ref, (q64, k64, v64), dout.double())]
        for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
            worst[name] = max(worst.get(name, 0.0), rel(g, w))
    return worst


def real_bf16_errors(attention) -> dict[str, float]:
    """(2, 16, 2048, 128) bf16 against SDPA math on the same inputs upcast to fp32."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    worst: dict[str, float] = {}
    for causal in (False, True):
        q, k, v = (
            torch.randn(2, 16, 2048, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(3)
        )
        out = attention(q, k, v, causal=causal, backend="triton")
        dout = torch.randn_like(out)
        got = [out, *torch.autograd.grad(out, (q, k, v), dout)]
        q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
        with sdpa_kernel(SDPBackend.MATH):
            ref = F.scaled_dot_product_attention(q32, k32, v32, is_causal=causal)
        want = [ref, *torch.autograd.grad(ref, (q32, k32, v32), dout.float())]
        for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
            worst[name] = max(worst.get(name, 0.0), rel(g, w))
    return worst


def tflops(attention, *, seq: int, head_dim: int, causal: bool, mode: str) -> float:
    import triton.testing

    heads, batch = 2048 // head_dim, max(1, 16384 // seq)
    q, k, v = (
        torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )
    if mode == "fwd":
        fn = lambda: attention(q, k, v, causal=causal, backend="triton")  # noqa: E731
        factor = 1.0
    else:
        out = attention(q, k, v, causal=causal, backend="triton")
        dout = torch.randn_like(out)
        fn = lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)  # noqa: E731
        factor = 2.5
    ms = triton.testing.do_bench(fn, warmup=25, rep=200)
    flops = 4 * batch * seq * seq * heads * head_dim / (2 if causal else 1) * factor
    return flops / ms / 1e9


def describe(cfg) -> str:
    kw = cfg.kwargs
    return f"M{kw['BLOCK_M']} N{kw['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--only", choices=["fwd", "bwd"], help="sweep one kernel's list only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/attention_configs.py: needs CUDA; skipped")
        return
    from pretrain.kernels import attention
    from pretrain.kernels import flash_attention as fa

    fwd_all, bwd_all = list(fa.CUDA_CONFIGS), list(fa.CUDA_BWD_CONFIGS)
    for which, configs in (("fwd", fwd_all), ("bwd", bwd_all)):
        if args.only and which != args.only:
            continue
        rows = []
        for cfg in configs:
            # Force this one config (the other kernel keeps its first, known-good entry).
            fa.CUDA_CONFIGS = [cfg] if which == "fwd" else fwd_all[:1]
            fa.CUDA_BWD_CONFIGS = [cfg] if which == "bwd" else bwd_all[:1]
            fa._tuned.clear()
            try:
                errs = {} if args.skip_check else {**small_fp32_errors(attention)}
                errs_bf16 = {} if args.skip_check else real_bf16_errors(attention)
                rates = [
                    tflops(attention, seq=args.seq, head_dim=args.head_dim, causal=c, mode=which)
                    for c in (False, True)
                ]
                rows.append((describe(cfg), max(errs.values(), default=0.0),
                             max(errs_bf16.values(), default=0.0), *rates))  # fmt: skip
            except Exception as exc:  # a config may not compile or fit: report it and go on
                rows.append((describe(cfg), float("nan"), float("nan"), 0.0, 0.0))
                print(f"{which} {describe(cfg)}: {type(exc).__name__}: {str(exc)[:200]}")
        rows.sort(key=lambda r: -(r[3] + r[4]))
        print(f"\n# {which}: seq {args.seq}, hd {args.head_dim}, bf16 TFLOP/s; errors: fp32 small vs fp64, "
              f"bf16 2048x128 vs fp32 SDPA math (max rel over out/dq/dk/dv)")  # fmt: skip
        print(f"{'config':>18} | {'fp32 err':>9} | {'bf16 err':>9} | {'non-causal':>10} | {'causal':>8}")
        for name, e32, e16, r0, r1 in rows:
            print(f"{name:>18} | {e32:9.1e} | {e16:9.1e} | {r0:10.1f} | {r1:8.1f}")
    fa.CUDA_CONFIGS, fa.CUDA_BWD_CONFIGS = fwd_all, bwd_all
    fa._tuned.clear()


if __name__ == "__main__":
    main()
