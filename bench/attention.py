"""Attention TFLOP/s: Tandem's Triton kernels against PyTorch SDPA with each of its backends.

FLOP convention (FlashAttention's benchmark): forward
4·batch·seq²·heads·head_dim, halved for causal; backward 2.5x forward; forward+backward 3.5x.
Grid: seq 512..16k, head dim 64 and 128, causal and not, bf16, batch·seq fixed at 16k tokens and
heads = 2048 / head_dim (FlashAttention's setup), plus the T5-bias kernel against the unfused
SDPA-with-dense-bias path it replaces. Every row prints the ratio to the best SDPA backend.

On a machine without CUDA the script runs a small correctness check of the kernels (in Triton's
interpreter) and says that timing was skipped.

`--dropout P` times every kernel with attention dropout P (the same P for each SDPA backend; a backend
without dropout shows '-').

Usage: python bench/attention.py [--seqs 512,1024,...] [--head-dims 64,128] [--mode fwd|bwd|fwd_bwd]
                                 [--dropout 0.1]
Results belong in docs/benchmarks.md with date, command and machine.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

TOKENS = 16384  # batch * seq held constant
HIDDEN = 2048  # heads * head_dim held constant
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")


def attention_flops(batch: int, seq: int, heads: int, head_dim: int, *, causal: bool, mode: str) -> float:
    fwd = 4 * batch * seq * seq * heads * head_dim / (2 if causal else 1)
    return fwd * {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}[mode]


def time_ms(fn, *, warmup: int = 3, reps: int = 10) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=reps * 10)  # median ms


def _run(fn, q, k, v, mode: str):
    """A callable doing mode's work: the forward, the backward alone (of a kept graph), or both."""
    if mode == "fwd":
        return lambda: fn(q, k, v)
    out = fn(q, k, v)
    dout = torch.randn_like(out)
    if mode == "bwd":
        return lambda: out.backward(dout, retain_graph=True)
    return lambda: fn(q, k, v).backward(dout)


def sdpa_fn(backend_name: str, causal: bool, dropout_p: float = 0.0):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[backend_name]

    def fn(q, k, v):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=causal, dropout_p=dropout_p
            )

    return fn


def benchmark(seqs: list[int], head_dims: list[int], mode: str, dropout_p: float = 0.0) -> None:
    from pretrain.kernels import attention

    drop = f", dropout {dropout_p:g}" if dropout_p else ""
    print(f"# attention {mode}, bf16{drop}, TFLOP/s ({torch.cuda.get_device_name()})")
    header = ["seq", "hd", "causal", "tandem", *SDPA_BACKENDS, "best sdpa", "ratio"]
    print(" | ".join(f"{h:>9}" for h in header))
    for head_dim in head_dims:
        heads = HIDDEN // head_dim
        for causal in (False, True):
            for seq in seqs:
                batch = max(1, TOKENS // seq)
                q, k, v = (
                    torch.randn(
                        batch, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True
                    )
                    for _ in range(3)
                )
                flops = attention_flops(batch, seq, heads, head_dim, causal=causal, mode=mode)
                results: dict[str, float | None] = {}
                tandem = lambda q, k, v, c=causal: attention(  # noqa: E731
                    q, k, v, causal=c, dropout_p=dropout_p, backend="triton"
                )
                candidates = {"tandem": tandem, **{b: sdpa_fn(b, causal, dropout_p) for b in SDPA_BACKENDS}}
                for name, fn in candidates.items():
                    if name == "math" and seq > 4096:
                        results[name] = None  # materializes (B, H, T, T): minutes and tens of GiB
                        continue
                    try:
                        results[name] = flops / time_ms(_run(fn, q, k, v, mode)) / 1e9
                    except (RuntimeError, ValueError):  # backend not available for this shape
                        results[name] = None
                    finally:
                        q.grad = k.grad = v.grad = None
                best = max((r for n, r in results.items() if n != "tandem" and r is not None), default=None)
                ratio = results["tandem"] / best if best and results["tandem"] else None
                cells = [seq, head_dim, causal, *(results[n] for n in candidates), best, ratio]
                print(" | ".join(_fmt(c) for c in cells))
                del q, k, v
                torch.cuda.empty_cache()


def benchmark_t5_bias(seqs: list[int], mode: str) -> None:
    """The fused T5-bias kernel against the unfused path (dense (1, H, T, T) bias into SDPA)."""
    from pretrain.kernels import T5Bias, attention

    head_dim, heads = 64, 12  # T5-base
    print(f"\n# T5 relative position bias, {mode}, bf16, hd {head_dim}, {heads} heads, TFLOP/s")
    print(" | ".join(f"{h:>9}" for h in ["seq", "fused", "unfused", "speedup"]))
    for seq in seqs:
        batch = max(1, TOKENS // seq)
        q, k, v = (
            torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(3)
        )
        table = torch.randn(32, heads, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        bias = T5Bias(table, True, 32, 128)
        flops = attention_flops(batch, seq, heads, head_dim, causal=False, mode=mode)
        rates = []
        for backend in ("triton", "sdpa"):
            fn = lambda q, k, v, b=backend, pb=bias: attention(q, k, v, position_bias=pb, backend=b)  # noqa: E731
            try:
                rates.append(flops / time_ms(_run(fn, q, k, v, mode)) / 1e9)
            except (RuntimeError, torch.OutOfMemoryError):
                rates.append(None)
        speedup = rates[0] / rates[1] if all(rates) else None
        print(" | ".join(_fmt(c) for c in [seq, *rates, speedup]))


def _fmt(cell) -> str:
    if cell is None:
        return f"{'-':>9}"
    if isinstance(cell, float):
        return f"{cell:9.2f}"
    return f"{cell!s:>9}"


def cpu_correctness_check() -> None:
    """Tiny shapes through the interpreted kernels against SDPA (fp32), forward and gradients."""
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module is imported
    from pretrain.kernels import T5Bias, attention

    torch.manual_seed(0)
    worst = 0.0
    for causal, hkv, bias in [(False, 2, False), (True, 1, False), (False, 2, True)]:
        q = torch.randn(1, 2, 27, 32, requires_grad=True)
        k, v = (torch.randn(1, hkv, 27, 32, requires_grad=True) for _ in range(2))
        pb = T5Bias(torch.randn(32, 2), True, 32, 16) if bias else None
        results = []
        for backend in ("triton", "sdpa"):
            out = attention(q, k, v, causal=causal, position_bias=pb, backend=backend)
            out.sum().backward()
            results.append([out.detach(), q.grad, k.grad, v.grad])
            q.grad = k.grad = v.grad = None
        worst = max(worst, *((a - b).abs().max().item() for a, b in zip(*results, strict=True)))
    print(f"correctness (Triton interpreter vs SDPA, fp32, fwd + dq/dk/dv): max abs diff {worst:.2e}")
    if worst > 1e-4:
        sys.exit("FAILED: the kernels disagree with SDPA")
    print("timing skipped: no CUDA device on this machine (the interpreter's speed means nothing)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seqs", default="512,1024,2048,4096,8192,16384")
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--mode", choices=["fwd", "bwd", "fwd_bwd"], default="fwd_bwd")
    parser.add_argument("--dropout", type=float, default=0.0, help="attention dropout for every kernel")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        cpu_correctness_check()
        return
    seqs = [int(s) for s in args.seqs.split(",")]
    benchmark(seqs, [int(d) for d in args.head_dims.split(",")], args.mode, args.dropout)
    if args.dropout:
        return
    benchmark_t5_bias([s for s in seqs if s <= 4096], args.mode)


if __name__ == "__main__":
    main()
