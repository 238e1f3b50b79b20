"""Where a training step's time goes, and what `train.compile=blocks` changes: one model's forward+backward
in this process, eager against compiled blocks (the same weights), each timed as the median of --steps
steps after warm-up, and the eager step's profile split into matmuls, attention and everything else (the
norms, activations, bias and residual adds, dropout, copies: what TorchInductor can fuse).

The split predicts the compiled/eager ratio: compilation can only shrink the third share.

Usage: python bench/step_profile.py [--model-preset gpt-mini] [--seq-len 512] [--batch 4] [--steps 8]
       [--threads N] [--dtype fp32|bf16]   (CUDA when present, else the CPU)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from parallel.parallelize import apply_compile
from pretrain.config import load_config
from pretrain.models import build_model

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")


def step(model: torch.nn.Module, ids: torch.Tensor) -> None:
    loss = F.cross_entropy(model(ids).flatten(0, 1).float(), ids.flatten())
    loss.backward()


def timed(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> float:
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    for _ in range(3):  # compilation, allocator and autotuning warm-up
        step(model, ids)
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        step(model, ids)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def shares(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, float]:
    """The eager step's self time per kind of op (profiler, 3 steps)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ids.is_cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step(model, ids)
    split = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for event in prof.key_averages():
        spent = event.self_device_time_total if ids.is_cuda else event.self_cpu_time_total
        kind = (
            "matmul" if event.key in MATMUL else "attention" if "scaled_dot_product" in event.key else "other"
        )
        split[kind] += spent
    total = sum(split.values()) or 1.0
    return {k: v / total for k, v in split.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-preset", default="gpt-mini")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="the weights' dtype")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    overrides = [
        "data.shards=unused",
        f"model.preset={args.model_preset}",
        f"model.vocab_size={args.vocab_size}",
    ]
    cfg = load_config(
        None, [*overrides, f"model.max_seq_len={args.seq_len}", f"data.seq_len={args.seq_len}"]
    ).model
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    eager = build_model(cfg).to(device, dtype)
    compiled = build_model(cfg).to(device, dtype)
    compiled.load_state_dict(eager.state_dict())
    apply_compile(compiled, "blocks")
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), device=device)
    split = shares(eager, ids)
    t_eager, t_compiled = timed(eager, ids, args.steps), timed(compiled, ids, args.steps)
    where = (
        torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"\n# fwd+bwd, {args.model_preset}, batch {args.batch} x seq {args.seq_len}, {args.dtype}, {where}")
    print(
        f"eager step: matmul {split['matmul']:.0%}, attention {split['attention']:.0%}, other {split['other']:.0%}"
    )
    print(f"{'blocks':>9} | {'ms/step':>8} | vs eager")
    for name, t in (("eager", t_eager), ("compiled", t_compiled)):
        print(f"{name:>9} | {t * 1e3:8.1f} | {t_eager / t:8.3f}")


if __name__ == "__main__":
    main()
