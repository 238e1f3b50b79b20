"""Training tokens/s of Tandem against a bare PyTorch loop: same model, batch, optimizer, threads.

Why: every layer Tandem puts around `loss.backward(); optimizer.step()` (the DeepSpeed engine, the
loader, the LR scheduler, metrics) must cost next to nothing, or users pay for it on every step of
every run. This script measures that cost directly, in one invocation:

* **Tandem**: `python -m pretrain train --config configs/runs/smoke-gpt.yaml ...` in a subprocess
  with a hard timeout (DeepSpeed's process-group start-up then stays out of the baseline's process).
  Its tokens/s comes from its own RUN/metrics.jsonl, first logged window (the warm-up) excluded. That
  figure includes Tandem's loader (packing, objective, collation) inside the timed window; JSONL and
  TensorBoard writes happen after a window's clock stops, as in `pretrain.train.train`.
* **bare PyTorch**: another subprocess (this file with `--bare-worker`) builds the same model with
  `pretrain.models.build_model` from the same config and seed, `torch.optim.AdamW` with the same two
  parameter groups, lr, betas and eps (`foreach=False`; Tandem is pinned to the same for-loop AdamW,
  `optimizer.implementation=for-loop`), `clip_grad_norm_`, the same fp32
  cross-entropy and gradient accumulation. It trains on the *same* batches as Tandem, produced by
  Tandem's loader but pre-loaded into memory before the clock starts, so data loading is excluded
  from the baseline and the ratio is conservative (it charges Tandem for its loader).

Both sides use a constant learning rate (no warmup) so they do the same arithmetic; with the same
initialization and batches their per-window losses agree, which the report shows as a check that
the two sides really trained the same model. Both get the same OMP/MKL thread count.

Usage: `python bench/train_throughput.py [--model-preset gpt-mini] [--steps 20] [--json]`.
Results and the machine they were measured on belong in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RUN_CONFIG = REPO_ROOT / "configs" / "runs" / "smoke-gpt.yaml"
SAMPLE_DOCS = 1000  # ~260k tokens at vocab 1024: more than a default run consumes, built in ~1 s
VOCAB_SIZE = 1024  # as `pretrain smoke`
# Variables a launcher may have set; each side must start as a plain one-process run.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class SideResult:
    """One timed run of one side. Window figures exclude the warm-up window."""

    tokens_per_s: float
    window_tokens_per_s: list[float]
    window_losses: list[float]
    warmup_loss: float
    threads: int | None = None
    params: int | None = None
    flops_per_token: float | None = None


# ----------------------------------------------------------------------------- shared set-up


def config_overrides(args: argparse.Namespace, shards: Path) -> list[str]:
    """Overrides of the smoke config that both sides load, so they cannot drift apart."""
    return [
        f"data.shards={shards}",
        f"model.preset={args.model_preset}",
        f"model.max_seq_len={args.seq_len}",
        f"data.seq_len={args.seq_len}",
        "data.num_workers=0",
        f"train.micro_batch_size={args.micro_batch_size}",
        f"train.global_batch_size={args.global_batch_size}",
        f"train.steps={args.log_interval + args.steps}",
        f"train.log_interval={args.log_interval}",
        "train.precision=fp32",
        "optimizer.implementation=for-loop",  # the bare side's AdamW (foreach=False), also on a GPU
        "parallel.zero_stage=0",
        # A constant lr makes both sides do identical arithmetic (Tandem still runs its scheduler).
        "optimizer.warmup_steps=0",
        "optimizer.decay_style=constant",
    ]


def prepare_data(
    data_dir: Path, *, docs: int = SAMPLE_DOCS, vocab_size: int = VOCAB_SIZE, workers: int = 1
) -> Path:
    """Sample corpus -> tokenizer -> shards with the project's own functions (as `pretrain smoke`);
    reuses whatever an earlier run left in `data_dir`. Returns the shards directory (also bench/mfu.py's)."""
    from data_pipeline.corpus import expand_inputs
    from data_pipeline.sample_corpus import write_sample_corpus
    from data_pipeline.sharding import shard_corpus
    from data_pipeline.tokenizer import train_tokenizer

    corpus, tok_prefix, shards = data_dir / "corpus", data_dir / "tokenizer" / "sp", data_dir / "shards"
    if not any(corpus.glob("*.json.gz")):
        write_sample_corpus(corpus, docs=docs, seed=0)
    model_path = tok_prefix.with_suffix(".model")
    if not model_path.is_file():
        tok_prefix.parent.mkdir(parents=True, exist_ok=True)
        train_tokenizer(expand_inputs(str(corpus)), vocab_size=vocab_size, out_prefix=tok_prefix, seed=0)
    # Resumable: a rerun over finished shards only checks them.
    shard_corpus(
        expand_inputs(str(corpus)), tokenizer_path=model_path, out_dir=shards, workers=workers,
        shard_size_mb=0.25, seed=0,
    )  # fmt: skip
    return shards


def child_env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    return env


def _run_child(cmd: list[str], *, threads: int, timeout: float, what: str) -> str:
    """Runs one side; a hang or a crash stops the benchmark with the child's last words."""
    try:
        proc = subprocess.run(
            cmd, cwd=REPO_ROOT, env=child_env(threads), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise SystemExit(f"{what}: no result within --timeout={timeout:.0f} s (killed)") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise SystemExit(f"{what}: exited with status {proc.returncode}:\n{tail}")
    return proc.stdout


# ----------------------------------------------------------------------------- the two sides


def run_tandem(args: argparse.Namespace, shards: Path, run_dir: Path) -> SideResult:
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "pretrain",
        "train",
        "--config",
        str(RUN_CONFIG),
        *config_overrides(args, shards),
        f"train.out_dir={run_dir}",
        "train.eval_interval=0",
        "train.progress=false",
        "train.resume=never",
        "checkpoint.interval=0",
        "checkpoint.save_final=false",
    ]
    _run_child(cmd, threads=args.threads, timeout=args.timeout, what="Tandem run")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    warmup, *windows = [r for r in records if r.get("tokens_per_s") is not None]
    if len(windows) * args.log_interval != args.steps:
        raise SystemExit(
            f"Tandem run: expected {args.steps // args.log_interval} timed windows, got {windows}"
        )
    tokens = args.steps * args.global_batch_size * args.seq_len
    return SideResult(
        tokens_per_s=tokens / sum(r["elapsed_s"] for r in windows),
        window_tokens_per_s=[r["tokens_per_s"] for r in windows],
        window_losses=[r["loss"] for r in windows],
        warmup_loss=warmup["loss"],
    )


def run_bare(args: argparse.Namespace, shards: Path) -> SideResult:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--bare-worker",
        str(shards),
        *_forwarded_options(args),
    ]
    out = _run_child(cmd, threads=args.threads, timeout=args.timeout, what="bare PyTorch run")
    return SideResult(**json.loads(out.strip().splitlines()[-1]))


def bare_loop(args: argparse.Namespace, shards: Path) -> SideResult:
    """The baseline: nothing between the batches and `optimizer.step()` but PyTorch."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from data_pipeline.loader import TrainLoader
    from data_pipeline.manifest import load_manifest
    from data_pipeline.objectives import build_objective
    from parallel.parallelize import param_groups
    from pretrain.config import load_config
    from pretrain.flops import flops_per_token
    from pretrain.models import build_model

    torch.set_num_threads(args.threads)
    cfg = load_config(RUN_CONFIG, config_overrides(args, shards))
    tok = load_manifest(shards)["tokenizer"]
    cfg.model.vocab_size = int(tok["vocab_size"])
    special = {k: int(v) for k, v in tok.items() if k.endswith("_id")}
    t, o = cfg.train, cfg.optimizer
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # Tandem's batches, in Tandem's order, produced before the clock starts.
    objective = build_objective(
        cfg.model.objective_name, seq_len=cfg.data.seq_len, tokenizer=tok, seed=t.seed
    )
    loader = TrainLoader(
        shards,
        objective,
        split=cfg.data.train_split,
        micro_batch_size=t.micro_batch_size,
        global_batch_size=t.global_batch_size,
        seed=t.seed,
        shuffle_shards=cfg.data.shuffle_shards,
        eos_id=special["eos_id"],
    )
    gas = loader.gas
    batches = [{k: v.to(device) for k, v in next(loader).items()} for _ in range(t.steps * gas)]

    # Seeded exactly as `pretrain.train.train` seeds before building, so the initial weights match.
    torch.manual_seed(t.seed)
    np.random.seed(t.seed % 2**32)
    random.seed(t.seed)
    model = build_model(cfg.model).to(device)
    optimizer = torch.optim.AdamW(
        param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, foreach=False
    )

    model.train()
    step_times, step_losses = [], []
    for step in range(t.steps):
        start = time.perf_counter()
        loss_sum = 0.0
        for micro in range(gas):
            batch = batches[step * gas + micro]
            logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))  # (B, T, V)
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
            (loss / gas if gas > 1 else loss).backward()
            loss_sum += loss.item()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - start)
        step_losses.append(loss_sum / gas)

    w = t.log_interval
    tokens_per_step = t.global_batch_size * cfg.data.seq_len
    windows = range(1, t.steps // w)  # window 0 is the warm-up, as on Tandem's side
    return SideResult(
        tokens_per_s=(t.steps - w) * tokens_per_step / sum(step_times[w:]),
        window_tokens_per_s=[w * tokens_per_step / sum(step_times[i * w : (i + 1) * w]) for i in windows],
        window_losses=[statistics.fmean(step_losses[i * w : (i + 1) * w]) for i in windows],
        warmup_loss=statistics.fmean(step_losses[:w]),
        threads=torch.get_num_threads(),
        params=sum(p.numel() for p in model.parameters()),
        flops_per_token=flops_per_token(model, cfg.model, cfg.data.seq_len),
    )


# ----------------------------------------------------------------------------- command line


def _forwarded_options(args: argparse.Namespace) -> list[str]:
    return [
        f"--model-preset={args.model_preset}",
        f"--seq-len={args.seq_len}",
        f"--micro-batch-size={args.micro_batch_size}",
        f"--global-batch-size={args.global_batch_size}",
        f"--steps={args.steps}",
        f"--log-interval={args.log_interval}",
        f"--threads={args.threads}",
    ]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Tandem's training tokens/s against a bare PyTorch loop (same model, batch, optimizer, "
        "threads), measured in the same invocation.",
    )
    p.add_argument("--model-preset", default="gpt-mini", help="configs/models/ preset (default gpt-mini)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--micro-batch-size", type=int, default=16, help="sequences per forward (default 16)")
    p.add_argument(
        "--global-batch-size",
        type=int,
        default=16,
        help="sequences per optimizer step; above the micro batch both sides accumulate (default 16)",
    )
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run (default 20)")
    p.add_argument(
        "--log-interval",
        type=int,
        default=5,
        help="steps per timing window; one extra window runs first as warm-up (default 5)",
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="runs of each side, alternated; medians reported (default 3)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="intra-op threads of both sides (default: all)",
    )
    p.add_argument("--workdir", type=Path, default=None, help="keep data and runs here (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before one side's run is killed")
    p.add_argument("--json", action="store_true", help="print the results as one JSON line, last")
    p.add_argument("--bare-worker", type=Path, default=None, metavar="SHARDS", help=argparse.SUPPRESS)
    return p


def check_args(args: argparse.Namespace) -> list[str]:
    problems = []
    for name in (
        "seq_len",
        "micro_batch_size",
        "global_batch_size",
        "steps",
        "log_interval",
        "repeats",
        "threads",
    ):
        if getattr(args, name) <= 0:
            problems.append(f"--{name.replace('_', '-')}={getattr(args, name)}: must be > 0")
    if args.global_batch_size % args.micro_batch_size:
        problems.append(
            f"--global-batch-size={args.global_batch_size}: must be a multiple of "
            f"--micro-batch-size={args.micro_batch_size}"
        )
    if args.log_interval > 0 and args.steps % args.log_interval:
        problems.append(
            f"--steps={args.steps}: must be a multiple of --log-interval={args.log_interval} "
            "(whole timing windows)"
        )
    return problems


def _si(x: float) -> str:
    exp = min(int(math.log10(abs(x)) // 3), 4) if x else 0
    return f"{x / 10 ** (3 * exp):.2f}{['', 'K', 'M', 'G', 'T'][exp]}"


def _load() -> float | None:
    """1-minute load average: a benchmark on a busy machine says so."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _spread(runs: list[SideResult]) -> float:
    values = [r.tokens_per_s for r in runs]
    return (max(values) - min(values)) / statistics.median(values)


def report(
    args: argparse.Namespace, tandem: list[SideResult], bare: list[SideResult], loads: list[float | None]
) -> dict[str, Any]:
    """Prints the table and the checks behind it; returns everything as one JSON-able dict."""
    t_med = statistics.median(r.tokens_per_s for r in tandem)
    b_med = statistics.median(r.tokens_per_s for r in bare)
    # Other work on the machine only ever slows a window down, so the fastest window of each side is the
    # steadiest estimate of its speed on a busy machine (timeit's reasoning); both figures are reported.
    t_best = max(w for r in tandem for w in r.window_tokens_per_s)
    b_best = max(w for r in bare for w in r.window_tokens_per_s)
    ref = bare[0]
    ratio, ratio_best = t_med / b_med, t_best / b_best
    warmup_gap = abs(tandem[0].warmup_loss - ref.warmup_loss)
    window_gap = max(abs(a - b) for a, b in zip(tandem[0].window_losses, ref.window_losses, strict=True))
    gas = args.global_batch_size // args.micro_batch_size
    print(
        f"model {args.model_preset}, seq_len {args.seq_len}, micro batch {args.micro_batch_size}, global batch "
        f"{args.global_batch_size} (accumulation {gas}), fp32, {args.threads} thread(s) per side "
        f"(bare side: torch.get_num_threads() = {ref.threads})"
    )
    print(
        f"{args.log_interval} warm-up + {args.steps} timed steps per run, {args.repeats} run(s) per side, "
        "alternated; tokens/s is the median over runs"
    )
    print()
    print(
        f"| run | params | FLOPs/token | tokens/s | ratio | tokens/s, best {args.log_interval}-step window "
        "| ratio, best window |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, value, best in (
        ("bare PyTorch loop", b_med, b_best),
        ("Tandem (`pretrain train`)", t_med, t_best),
    ):
        print(
            f"| {name} | {_si(ref.params or 0)} | {_si(ref.flops_per_token or 0)} | {value:,.0f} | "
            f"{value / b_med:.3f} | {best:,.0f} | {best / b_best:.3f} |"
        )
    print()
    print("tokens/s per run: Tandem " + ", ".join(f"{r.tokens_per_s:,.0f}" for r in tandem))
    print("                  bare   " + ", ".join(f"{r.tokens_per_s:,.0f}" for r in bare))
    print(
        f"same work: warm-up window loss {tandem[0].warmup_loss:.6f} (Tandem) vs {ref.warmup_loss:.6f} (bare), "
        f"|diff| {warmup_gap:.1e}; timed windows differ by <= {window_gap:.1e} (DeepSpeed's and torch's "
        "gradient clipping round the global norm differently; training amplifies last-bit differences)"
    )
    print(
        "Tandem's figure includes its loader; the bare loop's batches were pre-loaded (conservative ratio)."
    )
    known = [x for x in loads if x is not None]
    if known:
        print(f"1-minute load average before/after: {' / '.join(f'{x:.2f}' for x in known)}")
    if max(_spread(tandem), _spread(bare)) > 0.10:
        print(
            "warning: runs of one side differ by more than 10%: the machine is busy (compare the load "
            "average with the core count); with other work on the cores, --threads 1 measures more steadily"
        )
    for label, value in (("ratio (median runs)", ratio), ("ratio (best windows)", ratio_best)):
        print(f"{label} {value:.3f}: {'meets' if value >= 0.95 else 'BELOW'} the 0.95 target")
    return {
        "model_preset": args.model_preset,
        "seq_len": args.seq_len,
        "micro_batch_size": args.micro_batch_size,
        "global_batch_size": args.global_batch_size,
        "warmup_steps": args.log_interval,
        "steps": args.steps,
        "repeats": args.repeats,
        "threads": args.threads,
        "params": ref.params,
        "flops_per_token": ref.flops_per_token,
        "tandem_tokens_per_s": t_med,
        "bare_tokens_per_s": b_med,
        "ratio": ratio,
        "tandem_best_window_tokens_per_s": t_best,
        "bare_best_window_tokens_per_s": b_best,
        "ratio_best_window": ratio_best,
        "warmup_loss_gap": warmup_gap,
        "window_loss_gap": window_gap,
        "load_average": known,
        "tandem_runs": [asdict(r) for r in tandem],
        "bare_runs": [asdict(r) for r in bare],
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problems = check_args(args)
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return 2
    if args.bare_worker is not None:
        print(json.dumps(asdict(bare_loop(args, args.bare_worker))))
        return 0

    with tempfile.TemporaryDirectory(prefix="tandem-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        started = time.perf_counter()
        shards = prepare_data(workdir / "data")
        loads = [_load()]
        tandem: list[SideResult] = []
        bare: list[SideResult] = []
        for i in range(args.repeats):
            # Alternating the sides spreads slow drifts of the machine (other load, heat) over both.
            tandem.append(run_tandem(args, shards, workdir / "runs" / f"tandem-{i}"))
            bare.append(run_bare(args, shards))
        loads.append(_load())
        results = report(args, tandem, bare, loads)
        print(f"wall time {time.perf_counter() - started:.0f} s")
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
