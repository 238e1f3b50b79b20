"""End-to-end training MFU of `pretrain train` on one GPU: Tandem's fused kernels against PyTorch's.

Each side is a real `python -m pretrain train` run in a subprocess (DeepSpeed engine, Tandem's loader,
bf16, LR schedule, metrics) on the built-in sample corpus; only the kernels differ:

* `sdpa`: PyTorch scaled_dot_product_attention, PyTorch norms, full logits then the cross-entropy;
* `triton`: Tandem's Triton attention, otherwise as sdpa;
* `fused`: Triton attention, Triton RMSNorm/LayerNorm (train.norm_backend=triton) and the LM head fused
  into the loss (train.loss_chunk_size, default 4096 tokens a chunk: no (tokens x vocab) fp32 logits);
* `compiled`: as sdpa, with each Transformer block under torch.compile (train.compile=blocks: TorchInductor
  fuses the norms, GELU, bias and residual adds around the matmuls, SDPA inside the graph); the only
  difference from sdpa, so the pair measures the compilation alone;
* `fused-compiled`: as fused, compiled, with PyTorch's norms (Inductor fuses those; a Triton norm would be
  a graph break of its own), Triton attention an opaque call between the compiled graphs;
* `sdpa-loop`: as sdpa with AdamW's for-loop kernels (optimizer.implementation=for-loop, what the
  2026-11-26 figures ran) instead of the fused AdamW every other variant gets on a GPU.
 The figures are read from the run's own metrics.jsonl:
tokens/s and MFU per logged window, the first window (compilation, autotuning, allocator warm-up)
excluded, median over the rest. MFU is model FLOPs (pretrain/flops.py: 6·N + 12·L·H·d·T per token,
PaLM's convention, attention not halved for causal) over the peak given by --peak-tflops (default 790:
an 8192³ bf16 matmul measured on an H200; the datasheet's 989 would give 0.80x these MFUs).

The model defaults to gpt-350m (GPT-3 Medium: 24 layers, d_model 1024, 16 heads) at seq 2048 with a
GPT-2-sized vocabulary (50304, padded beyond the sample tokenizer's pieces, so the LM head costs what it
costs in a real run).

Usage: python bench/mfu.py [--model-preset gpt-350m] [--seq-len 2048] [--micro-batch-size 16]
       [--steps 40] [--backends compiled,fused-compiled,fused,sdpa] [--loss-chunk-size 4096]
Needs CUDA; on a machine without it the script says so and exits 0, unless --cpu asks for the CPU
(`python bench/mfu.py --cpu --precision fp32 --backends compiled,sdpa --model-preset gpt-mini ...`: the
throughput ratio of the variants there, no MFU). Results go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from train_throughput import prepare_data  # bench/ is on sys.path when a bench script runs

REPO_ROOT = Path(__file__).resolve().parents[1]
RUN_CONFIG = REPO_ROOT / "configs" / "runs" / "smoke-gpt.yaml"


def variant_overrides(name: str, args: argparse.Namespace) -> list[str]:
    variants = {
        "sdpa": ["train.attention_backend=sdpa", "train.norm_backend=torch", "train.loss_chunk_size=0"],
        "sdpa-loop": [
            "train.attention_backend=sdpa",
            "train.norm_backend=torch",
            "train.loss_chunk_size=0",
            "optimizer.implementation=for-loop",
        ],
        "triton": ["train.attention_backend=triton", "train.norm_backend=torch", "train.loss_chunk_size=0"],
        "fused": [
            "train.attention_backend=triton",
            "train.norm_backend=triton",
            f"train.loss_chunk_size={args.loss_chunk_size}",
        ],
        "compiled": [
            "train.attention_backend=sdpa",
            "train.norm_backend=torch",
            "train.loss_chunk_size=0",
            "train.compile=blocks",
        ],
        "fused-compiled": [
            "train.attention_backend=triton",
            "train.norm_backend=torch",
            f"train.loss_chunk_size={args.loss_chunk_size}",
            "train.compile=blocks",
        ],
    }
    if name not in variants:
        raise SystemExit(f"--backends: {name!r} is not one of {', '.join(variants)}")
    return variants[name]


def run_side(backend: str, args: argparse.Namespace, shards: Path, out: Path) -> dict:
    overrides = [
        *variant_overrides(backend, args),
        f"data.shards={shards}",
        f"model.preset={args.model_preset}",
        f"model.max_seq_len={args.seq_len}",
        f"model.vocab_size={args.vocab_size}",
        f"data.seq_len={args.seq_len}",
        f"data.num_workers={0 if args.cpu else 2}",  # on a CPU, loader workers take cores from training
        f"train.micro_batch_size={args.micro_batch_size}",
        f"train.global_batch_size={args.micro_batch_size}",
        f"train.steps={args.steps}",
        f"train.log_interval={args.log_interval}",
        "train.eval_interval=0",
        f"train.precision={args.precision}",
        f"train.peak_tflops={0.0 if args.cpu else args.peak_tflops}",
        f"parallel.activation_checkpointing={args.activation_checkpointing}",
        f"train.out_dir={out}",
        "checkpoint.interval=0",
        f"optimizer.warmup_steps={min(10, args.steps // 2)}",
    ]
    cmd = [sys.executable, "-m", "pretrain", "train", "--config", str(RUN_CONFIG)]
    cmd += overrides
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.cpu:
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    for name in ("TANDEM_ATTENTION_BACKEND", "TANDEM_NORM_BACKEND"):  # the config keys decide
        env.pop(name, None)
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, text=True, capture_output=True, timeout=args.timeout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-6000:])
        raise SystemExit(f"{backend}: pretrain train exited {proc.returncode}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    windows = [r for r in records if "tokens_per_s" in r][1:]  # first window: warm-up (and compilation)
    if not windows:
        raise SystemExit(f"{backend}: no timed window after the warm-up in {out / 'metrics.jsonl'}")
    return {
        "backend": backend,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in windows),
        "tflops": statistics.median(r["tflops_per_device"] for r in windows),
        "mfu": statistics.median(r["mfu"] for r in windows) if windows[0]["mfu"] is not None else None,
        "loss": windows[-1]["loss"],
        "windows": len(windows),
        "memory_gb": max((r.get("memory_gb") or 0.0) for r in records) or None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-preset", default="gpt-350m")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--vocab-size", type=int, default=50304)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=790.0)
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="train on the CPU (tokens/s and the ratios only: no peak, so no MFU); the variants without "
        "Triton kernels (compiled, sdpa, sdpa-loop) run there",
    )
    parser.add_argument("--activation-checkpointing", choices=("none", "full", "selective"), default="none")
    parser.add_argument(
        "--backends",
        default="compiled,fused-compiled,fused,sdpa",
        help="compiled | fused-compiled | fused | triton | sdpa | sdpa-loop; the last is the base",
    )
    parser.add_argument("--loss-chunk-size", type=int, default=4096, help="train.loss_chunk_size of `fused`")
    parser.add_argument("--docs", type=int, default=20000)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per training run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("bench/mfu.py: no CUDA device on this machine; MFU is a GPU measurement, skipped")
        return
    with tempfile.TemporaryDirectory(prefix="tandem-mfu-") as tmp:
        shards = prepare_data(Path(tmp), docs=args.docs, vocab_size=1024, workers=4)
        results = []
        for i, b in enumerate(args.backends.split(",")):  # a variant may repeat (run-to-run spread)
            results.append(run_side(b, args, shards, Path(tmp) / f"run-{i}-{b}"))
            # Each run's figures as soon as it ends, so a time limit that stops the script keeps them.
            print(json.dumps(results[-1]), flush=True)
    base = results[-1]
    device = f"CPU ({os.cpu_count()} cores)" if args.cpu else torch.cuda.get_device_name()
    peak = "" if args.cpu else f", peak {args.peak_tflops:g} TFLOP/s"
    print(f"\n# pretrain train, {args.model_preset}, seq {args.seq_len}, micro batch {args.micro_batch_size}, "
          f"{args.precision}, {device}{peak}")  # fmt: skip
    print(
        f"{'kernels':>14} | {'tokens/s':>10} | {'TFLOP/s':>8} | {'MFU':>6} | {'vs ' + base['backend']:>8} | loss"
    )
    for r in results:
        ratio = r["tokens_per_s"] / base["tokens_per_s"]
        mfu = f"{r['mfu']:6.1%}" if r["mfu"] is not None else f"{'-':>6}"
        print(f"{r['backend']:>14} | {r['tokens_per_s']:10,.0f} | {r['tflops']:8.1f} | {mfu} | "
              f"{ratio:8.3f} | {r['loss']:.3f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
