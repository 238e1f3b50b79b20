"""Activation memory of a GPT layer, measured on a GPU, against the planner's estimate.

`parallel/memory.py` estimates activation bytes per layer with Korthikanti et al. 2022 (table 2):
s·b·h·(34 + 5·a·s/h) with no recompute (the 5·a·s/h term is the attention score matrix, its softmax and
dropout mask), 34·s·b·h with "selective" recompute (scores not kept), which is also what a fused
FlashAttention-style kernel keeps (q, k, v, the output and a per-row log-sum-exp, no scores).

Measured here: `torch.cuda.memory_allocated()` growth over the forward of k GPT blocks (`pretrain.models`,
the gpt-350m shape: h 1024, a 16) in bf16 with autograd recording, divided by k; the block input and the
output are excluded. Cases:

* Tandem's Triton attention with dropout 0 -> estimate `selective`, which counts two 1-byte
  residual-dropout masks (2·s·b·h) that a dropout-free layer does not keep: the expected ratio is
  32/34 = 0.94;
* Tandem's Triton attention with dropout 0.1 -> estimate `selective` as well: the fused attention dropout
  regenerates its mask in the backward and keeps none (the residual dropouts keep theirs);
* SDPA's math backend (materializes the scores), dropout 0.1 everywhere -> estimate `none`.

Within 25% is the bar in the planning issue. Needs CUDA; on CPU it says so and exits 0.

Usage: python bench/activation_memory.py [--seq 2048] [--micro-batch-size 4] [--layers 4]
"""

from __future__ import annotations

import argparse
import contextlib

import torch


def measure(blocks, x: torch.Tensor, rope, backend: str) -> float:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pretrain.kernels import set_default_backend

    previous = set_default_backend("triton" if backend == "triton" else "sdpa")
    ctx = sdpa_kernel(SDPBackend.MATH) if backend == "math" else contextlib.nullcontext()
    try:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with ctx:
            y = x
            for block in blocks:
                y = block(y, rope, None)
        torch.cuda.synchronize()
        grown = torch.cuda.memory_allocated() - before - y.numel() * y.element_size()  # output excluded
        del y
        return grown / len(blocks)
    finally:
        set_default_backend(previous)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-preset", default="gpt-350m")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(
            "bench/activation_memory.py: needs CUDA (CPU runs keep fp32 scores in SDPA's math path); skipped"
        )
        return
    from parallel.memory import activation_bytes_per_layer
    from pretrain.config import load_config
    from pretrain.models import build_model

    rows = []
    cases = (("triton", 0.0, "selective"), ("triton", 0.1, "selective"), ("math", 0.1, "none"))
    for backend, dropout, recompute in cases:
        cfg = load_config(
            None,
            ["data.shards=unused", f"model.preset={args.model_preset}", "model.vocab_size=1024",
             f"model.num_layers={args.layers}", f"model.max_seq_len={args.seq}", f"model.dropout={dropout}"],
        ).model  # fmt: skip
        model = build_model(cfg).to(device="cuda", dtype=torch.bfloat16).train()
        x = torch.randn(args.micro_batch_size, args.seq, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
        x.requires_grad_()
        measured = measure(model.blocks, x, getattr(model, "rope", None), backend)
        estimate = activation_bytes_per_layer(
            seq_len=args.seq, micro_batch_size=args.micro_batch_size, hidden_size=cfg.hidden_size,
            num_heads=cfg.num_heads, recompute=recompute,
        )  # fmt: skip
        rows.append((backend, dropout, recompute, measured, estimate))
        del model, x
        torch.cuda.empty_cache()
    sbh = args.seq * args.micro_batch_size * cfg.hidden_size
    print(f"\n# activation bytes per GPT layer ({args.model_preset} shape, s {args.seq}, b {args.micro_batch_size}, "
          f"bf16, {torch.cuda.get_device_name()}); s·b·h = {sbh:,}")  # fmt: skip
    print(f"{'attention':>10} | {'dropout':>7} | {'estimate':>10} | {'MiB est.':>9} | {'MiB meas.':>9} | "
          f"{'meas/sbh':>8} | {'ratio':>6}")  # fmt: skip
    for backend, dropout, recompute, measured, estimate in rows:
        print(f"{backend:>10} | {dropout:7.1f} | {recompute:>10} | {estimate / 2**20:9.1f} | "
              f"{measured / 2**20:9.1f} | {measured / sbh:8.2f} | {measured / estimate:6.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
