"""Fused norm and cross-entropy kernels against their PyTorch counterparts: time and memory.

* RMSNorm / LayerNorm forward+backward over (tokens, hidden) bf16 rows: Tandem's Triton kernels vs
  torch.nn.functional (GB/s of the bytes each must move: read x and dy, write y and dx).
* Cross-entropy over a GPT-2-sized vocabulary (50304): `linear_cross_entropy` (chunked LM head + loss,
  never all fp32 logits) vs `F.linear` + `F.cross_entropy` in fp32: milliseconds and peak memory.
* Attention: see bench/attention.py.

On a machine without CUDA the script checks the kernels on tiny shapes in Triton's interpreter and
says that timing was skipped.

Usage: python bench/kernels.py [--tokens 16384] [--hidden 4096] [--vocab 50304]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F


def bench_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=50)


def warm_up_gpu(seconds: float = 2.0) -> None:
    """Matmuls until the clocks have ramped up: an idle H200 sits at 345 MHz, and the first figures of a
    run timed before this came out up to 1.7x low (rmsnorm 1030 GB/s, then 1730 in the same run)."""
    import time

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a @ a
        torch.cuda.synchronize()


def bench_norms(tokens: int, hidden: int) -> None:
    from pretrain.kernels import layer_norm, rms_norm

    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.zeros(hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    moved = 4 * x.numel() * x.element_size()  # x, y forward; x, dy, dx backward (~4 passes minimum)
    print(f"# norms fwd+bwd, bf16, {tokens} x {hidden} ({torch.cuda.get_device_name()})")
    print(f"{'norm':>10} | {'tandem GB/s':>12} | {'torch GB/s':>12} | {'ratio':>6}")
    cases = {
        "rmsnorm": (lambda be: rms_norm(x, w, 1e-6, backend=be)),
        "layernorm": (lambda be: layer_norm(x, w, b, 1e-5, backend=be)),
    }
    for name, fn in cases.items():
        rates = [
            moved / bench_ms(lambda be=be, fn=fn: fn(be).backward(dy)) / 1e6 for be in ("triton", "torch")
        ]
        print(f"{name:>10} | {rates[0]:12.1f} | {rates[1]:12.1f} | {rates[0] / rates[1]:6.2f}")


def sweep_norms(tokens: int, hidden: int) -> None:
    """RMSNorm backward launch options: warps per program x number of programs (forward fixed)."""
    from pretrain.kernels import norms, rms_norm

    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    moved = 4 * x.numel() * x.element_size()
    base_opts, base_programs = norms._launch_opts, norms.CUDA_BWD_PROGRAMS
    torch_rate = moved / bench_ms(lambda: rms_norm(x, w, 1e-6, backend="torch").backward(dy)) / 1e6
    print(f"\n# rmsnorm fwd+bwd sweep, bf16, {tokens} x {hidden}; torch {torch_rate:.1f} GB/s")
    print(f"{'warps':>6} | {'programs':>8} | {'GB/s':>8} | {'vs torch':>8}")
    for warps in (4, 8, 16, 32):
        for programs in (264, 528, 1056, 2112):
            norms._launch_opts = lambda x_, b_, w_=warps: {"num_warps": w_}
            norms.CUDA_BWD_PROGRAMS = programs
            try:
                rate = moved / bench_ms(lambda: rms_norm(x, w, 1e-6, backend="triton").backward(dy)) / 1e6
                print(f"{warps:6d} | {programs:8d} | {rate:8.1f} | {rate / torch_rate:8.2f}")
            except Exception as exc:  # a launch option may not compile: report and go on
                print(f"{warps:6d} | {programs:8d} | failed: {type(exc).__name__}")
    norms._launch_opts, norms.CUDA_BWD_PROGRAMS = base_opts, base_programs


def bench_cross_entropy(tokens: int, hidden: int, vocab: int) -> None:
    from pretrain.kernels import linear_cross_entropy

    h = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(vocab, hidden, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    t = torch.randint(0, vocab, (tokens,), device="cuda")

    def fused():
        linear_cross_entropy(h, w, t).backward()

    def unfused():
        F.cross_entropy(F.linear(h, w).float(), t).backward()

    print(f"\n# LM head + cross-entropy fwd+bwd, bf16 weights, {tokens} tokens, vocab {vocab}")
    print(f"{'':>10} | {'ms':>8} | {'peak GiB':>9}")
    for name, fn in (("fused", fused), ("torch", unfused)):
        torch.cuda.reset_peak_memory_stats()
        ms = bench_ms(fn)
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"{name:>10} | {ms:8.2f} | {peak:9.2f}")


def cpu_correctness_check() -> None:
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules are imported
    from pretrain.kernels import fused_cross_entropy, layer_norm, linear_cross_entropy, rms_norm

    torch.manual_seed(0)
    x = torch.randn(6, 50)
    w, b = torch.randn(50), torch.randn(50)
    errs = {
        "rmsnorm": (rms_norm(x, w, backend="triton") - rms_norm(x, w, backend="torch")).abs().max(),
        "layernorm": (layer_norm(x, w, b, backend="triton") - layer_norm(x, w, b, backend="torch"))
        .abs()
        .max(),
    }
    logits, t = torch.randn(6, 150), torch.randint(0, 150, (6,))
    errs["cross_entropy"] = (
        fused_cross_entropy(logits, t, backend="triton") - F.cross_entropy(logits, t)
    ).abs()
    hw = torch.randn(150, 50)
    errs["linear_ce"] = (
        linear_cross_entropy(x, hw, t, chunk_size=4, backend="triton") - F.cross_entropy(x @ hw.t(), t)
    ).abs()
    worst = max(e.item() for e in errs.values())
    print(
        "correctness (Triton interpreter vs torch, fp32): "
        + ", ".join(f"{k} {v.item():.1e}" for k, v in errs.items())
    )
    if worst > 1e-4:
        sys.exit("FAILED: the kernels disagree with PyTorch")
    print("timing skipped: no CUDA device on this machine")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--sweep-norms", action="store_true", help="also time norm launch options")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        cpu_correctness_check()
        return
    warm_up_gpu()
    bench_norms(args.tokens, args.hidden)
    if args.sweep_norms:
        sweep_norms(args.tokens, args.hidden)
    bench_cross_entropy(args.tokens, min(args.hidden, 2048), args.vocab)


if __name__ == "__main__":
    main()
