"""Does a resumed run continue the run it resumed? `pretrain ckpt replay` and `train.verify_resume`.

A checkpoint of step N carries everything the steps after it depend on: weights, Adam moments, schedule,
loader position, RNG states. Retraining K steps from it must give what the original run logged for steps
N+1..N+K in its metrics.jsonl: bitwise at the same layout on CPU (DESIGN.md: same seed, data and layout ->
bitwise identical losses, across a kill-and-resume too), within `rtol` at another layout. A wrong loader
position shows at step N+1 (other samples), a lost or wrong Adam moment at step N+2 (step N+1's loss and
gradient are computed before its update), hence K=2 by default.

`ResumeCheck` runs inside `pretrain.train.train` (train.verify_resume=K): it reads the original records
past N before the resumed run's logger drops them (MetricsLogger truncates metrics.jsonl at N), compares
every step as soon as it is trained, and stops all ranks at the first difference, leaving the original
records in metrics.jsonl. `pretrain ckpt replay` starts that same code in a scratch run directory
(train.resume=CKPT, train.steps=N+K, no checkpoints) at the checkpoint's layout or another, and prints the
comparison the run wrote to SCRATCH/resume-check.json.

What is compared, per step: `loss` (a record's loss is the mean over its logging window; with
train.log_interval=L the original's records at steps L, 2L, ... are compared with the same mean of the
replayed steps, and a window that starts before N is left out, with a note), `grad_norm` (the step's
norm before clipping), `lr` and `consumed_samples` (bookkeeping that no layout changes: always exact).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Cross-layout tolerances (relative, on loss and grad_norm). fp32: DESIGN.md's parity invariant (every
# parallel layout matches the one-process run within 1e-5); reordered sums move tiny runs by ~1e-7
# (tests/distributed/test_parity_matrix.py) and real errors (wrong dropout masks) by 2e-5 and more. bf16/fp16:
# 8-bit mantissas; the whole change from fp32 arithmetic to bf16 moved gpt-tiny's losses by ~1e-4 over 4
# steps (tests/integration/test_mixed_precision.py), and a reordering of bf16 sums is a smaller change than
# that (a bf16 ZeRO-1 gpt-tiny checkpoint replayed at tp=2: loss 5e-5, grad_norm 2.1e-4 relative), so 1e-3 is
# above both and below a lost update (6e-3 there) or an Adam moment scaled by 1.5 (3e-3 at the next step).
RTOL = {"fp32": 1e-5, "bf16": 1e-3, "fp16": 1e-3}
CLOSE = ("loss", "grad_norm")  # within rtol at another layout
EXACT = ("lr", "consumed_samples")  # layout-independent: compared exactly everywhere
REPORT = "resume-check.json"  # written by rank 0 into the resumed run's directory


class ResumeMismatch(RuntimeError):
    """The resumed run differs from the run it resumed (raised on every rank alike)."""


class ReplayError(ValueError):
    """A replay that cannot be set up; the message names the file, option or value."""


# ----------------------------------------------------------------------------- the original run's records
def reference_path(checkpoint: Path) -> Path:
    """The metrics.jsonl of the run that saved `checkpoint` (RUN/checkpoints/step-N -> RUN/metrics.jsonl).
    A copy written by `pretrain ckpt reshard` names its source in meta.json (`resharded_from`)."""
    meta_file = checkpoint / "meta.json"
    source = checkpoint
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        source = Path((meta.get("resharded_from") or {}).get("path") or checkpoint)
    return source.parent.parent / "metrics.jsonl"


@dataclass
class Reference:
    path: Path
    records: dict[int, dict[str, Any]]  # training and skipped-step records by step (evaluation left out)
    later_lines: list[str]  # every line past the checkpoint's step, verbatim (restored after a mismatch)

    @classmethod
    def read(cls, path: Path, *, after: int) -> Reference:
        records: dict[int, dict[str, Any]] = {}
        later: list[str] = []
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                    continue
                if rec["step"] > after:
                    later.append(line if line.endswith("\n") else line + "\n")
                if "loss" in rec or "skipped" in rec:
                    records[rec["step"]] = rec
        return cls(path=path, records=records, later_lines=later)

    def last_step(self) -> int:
        return max(self.records, default=0)

    def window_start(self, step: int) -> int:
        """The first step a training record's loss averages: the one after the previous training record."""
        return max((s for s, r in self.records.items() if "loss" in r and s < step), default=0) + 1

    def first_comparable(self, *, after: int) -> int | None:
        """The first record past `after` that a run resumed at `after` can reproduce, if any."""
        for s in sorted(self.records):
            if s > after and ("loss" not in self.records[s] or self.window_start(s) > after):
                return s
        return None


# ----------------------------------------------------------------------------- comparison
@dataclass
class Observed:
    """One step of the resumed run, as its loop saw it (before any logging-window averaging)."""

    loss: float | None  # None when the step was skipped
    skipped: str | None
    grad_norm: float | None
    lr: float
    consumed_samples: int


@dataclass
class Row:
    step: int
    quantity: str
    original: Any
    replay: Any
    equal: bool


@dataclass
class Comparison:
    checkpoint: str
    reference: str
    start: int  # N, the checkpoint's step
    steps: int  # K
    mode: str  # "bitwise" or "rtol"
    rtol: float | None
    saved_layout: dict[str, Any]
    layout: dict[str, Any]
    quantities: list[str] = field(default_factory=lambda: [*CLOSE, *EXACT])
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    first_mismatch: Row | None = None
    done: bool = False

    @property
    def verdict(self) -> str:
        if self.first_mismatch is not None:
            return "differs"
        return "equal" if self.rows else "unchecked"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["verdict"] = self.verdict
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Comparison:
        data = {k: v for k, v in data.items() if k != "verdict"}
        rows = [Row(**r) for r in data.pop("rows")]
        first = data.pop("first_mismatch")
        return cls(**data, rows=rows, first_mismatch=Row(**first) if first else None)

    def message(self) -> str:
        """One paragraph: what was compared, and the first difference if any."""
        how = "bitwise" if self.mode == "bitwise" else f"within {self.rtol:g} relative"
        head = (
            f"resumed from {self.checkpoint} (step {self.start}, saved at {_fmt_layout(self.saved_layout)}) at "
            f"{_fmt_layout(self.layout)}"
        )
        row = self.first_mismatch
        if row is not None:
            diff = ""
            if isinstance(row.original, float) and isinstance(row.replay, float) and row.original:
                diff = f", relative difference {abs(row.replay - row.original) / abs(row.original):.3g}"
            return (
                f"{head}: step {row.step} {row.quantity} differs from the original run's {self.reference}: "
                f"{row.replay!r} now, {row.original!r} before{diff} (compared {how})"
            )
        if not self.rows:
            return f"{head}: nothing to compare: " + ("; ".join(self.notes) or "no records")
        steps = sorted({r.step for r in self.rows})
        notes = "".join(f"; {n}" for n in self.notes)
        span = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"
        return (
            f"{head}: {span} equal the original run's {self.reference} "
            f"({len(self.rows)} values, {how}){notes}"
        )


def _fmt_layout(layout: dict[str, Any]) -> str:
    return ", ".join(f"{k}={layout.get(k)}" for k in ("tp", "pp", "dp"))


def _same(a: Any, b: Any, *, quantity: str, rtol: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if rtol is None or quantity not in CLOSE:
        return bool(a == b)
    return abs(float(a) - float(b)) <= rtol * abs(float(b))


def compare_step(
    comparison: Comparison, reference: Reference, observed: dict[int, Observed], step: int
) -> list[Row]:
    """Rows for the original record at `step` (none if it logged nothing there), appended to
    `comparison`; sets `first_mismatch` at the first differing value."""
    ref = reference.records.get(step)
    now = observed[step]
    if ref is None:
        return []
    rtol = None if comparison.mode == "bitwise" else comparison.rtol
    rows: list[Row] = []
    if "skipped" in ref or now.skipped is not None:
        # The guard's verdict: both runs skip the step, or neither does (the reason names values that may
        # round differently at another layout, so only its presence is compared there).
        before, after = ref.get("skipped"), now.skipped
        same = before == after if rtol is None else (before is None) == (after is None)
        rows.append(Row(step, "skipped", before, after, same))
    else:
        window_start = reference.window_start(step)
        if window_start <= comparison.start:
            comparison.notes.append(
                f"step {step}: the original record averages steps {window_start}-{step}, which begin before "
                f"the checkpoint's step {comparison.start}; not compared (train.log_interval)"
            )
            return []
        window = [observed[s].loss for s in range(window_start, step + 1) if observed[s].skipped is None]
        total = 0.0
        for loss in window:  # summed in the loop's order, so the mean is the loop's float
            total += loss if loss is not None else math.nan
        mean = total / len(window) if window else None
        values = {
            "loss": (ref.get("loss"), _finite(mean)),
            "grad_norm": (ref.get("grad_norm"), _finite(now.grad_norm)),
            "lr": (ref.get("lr"), now.lr),
            "consumed_samples": (ref.get("consumed_samples"), now.consumed_samples),
        }
        for quantity, (a, b) in values.items():
            if quantity not in comparison.quantities or (a is None and quantity == "grad_norm"):
                continue  # not comparable here, or the original logged no norm at this step (log_interval)
            rows.append(Row(step, quantity, a, b, _same(a, b, quantity=quantity, rtol=rtol)))
    comparison.rows += rows
    for row in rows:
        if not row.equal and comparison.first_mismatch is None:
            comparison.first_mismatch = row
    return rows


def _finite(x: float | None) -> float | None:
    """As metrics.jsonl stores it: non-finite values are null."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


# ----------------------------------------------------------------------------- inside the training loop
class ResumeCheck:
    """train.verify_resume=K: compares the first K steps after a resume with the original records.

    Rank 0 reads the records and decides; every observed step ends in one all-reduce of a flag, so all
    ranks stop together at the first difference."""

    def __init__(
        self,
        comparison: Comparison,
        reference: Reference | None,
        *,
        rank: int,
        run_dir: Path,
    ):
        self.comparison, self.reference = comparison, reference
        self.rank, self.run_dir = rank, run_dir
        self.observed: dict[int, Observed] = {}

    @classmethod
    def open(
        cls,
        cfg: Any,
        *,
        checkpoint: Path | None,
        start: int,
        layout: dict[str, Any],
        same_layout: bool,
        rank: int,
    ) -> ResumeCheck | None:
        """None unless resuming with train.verify_resume > 0. Call before the run's MetricsLogger truncates
        metrics.jsonl. `cfg` is the run's Config."""
        steps = cfg.train.verify_resume
        if steps <= 0 or checkpoint is None:
            return None
        import torch

        from pretrain.checkpoint import read_manifest

        saved_layout = read_manifest(checkpoint).get("layout") or {}
        bitwise = same_layout and not torch.cuda.is_available()  # GPU kernels need not be deterministic
        path = reference_path(checkpoint)
        comparison = Comparison(
            checkpoint=str(checkpoint),
            reference=str(path),
            start=start,
            steps=steps,
            mode="bitwise" if bitwise else "rtol",
            rtol=None if bitwise else RTOL[cfg.train.precision],
            saved_layout={k: saved_layout.get(k) for k in ("tp", "pp", "dp")},
            layout={k: layout.get(k) for k in ("tp", "pp", "dp")},
        )
        if not same_layout and cfg.model.dropout > 0:
            # Dropout masks come from per-rank RNG streams (the tensor-parallel tracker, one stream per dp
            # rank), so another layout draws other masks: its losses differ by ~1e-4, not by rounding.
            comparison.quantities = list(EXACT)
            comparison.notes.append(
                f"loss and grad_norm not compared: model.dropout={cfg.model.dropout} draws other dropout masks "
                "at another layout (only lr and consumed_samples are)"
            )
        reference = Reference.read(path, after=start) if rank == 0 else None  # missing file: no records
        return cls(comparison, reference, rank=rank, run_dir=Path(cfg.train.out_dir))

    def observe(
        self,
        step: int,
        *,
        loss: float | None,
        skipped: str | None,
        grad_norm: Any,
        lr: float,
        consumed_samples: int,
        last_step: int,
    ) -> bool:
        """Records step `step` and compares it (collective). Raises ResumeMismatch on every rank at the first
        difference; returns True once the window is done (then the caller drops the check)."""
        c = self.comparison
        norm = None if grad_norm is None else float(grad_norm)
        self.observed[step] = Observed(loss, skipped, norm, float(lr), int(consumed_samples))
        differs = False
        if self.reference is not None:
            compare_step(c, self.reference, self.observed, step)
            differs = c.first_mismatch is not None
        if _world_any(differs):
            if self.rank == 0:
                c.done = True
                self._write()
                self._restore_metrics()
                raise ResumeMismatch(
                    f"train.verify_resume={c.steps}: {c.message()}; stopped instead of continuing a different "
                    f"run (report: {self.run_dir / REPORT})"
                )
            raise ResumeMismatch(f"train.verify_resume={c.steps}: rank 0 found a difference (see its log)")
        if step < c.start + c.steps and step < last_step:
            return False
        c.done = True
        if self.reference is not None and not c.rows:
            later = self.reference.first_comparable(after=c.start)
            hint = f" (the first is step {later}: compare {later - c.start} steps or more)" if later else ""
            c.notes.append(f"{self.reference.path}: no comparable record of steps {c.start + 1}-{step}{hint}")
        if self.rank == 0:
            self._write()
            print(f"train.verify_resume={c.steps}: {c.message()}", flush=True)
        return True

    def _write(self) -> None:
        from data_pipeline.atomic import write_text_atomic

        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.run_dir / REPORT, json.dumps(self.comparison.to_json(), indent=1) + "\n")

    def _restore_metrics(self) -> None:
        """When the original records are this run's own metrics.jsonl, put them back in place of the
        resumed attempt's: a rerun then compares with the original again, not with the attempt that
        differed."""
        assert self.reference is not None
        own = self.run_dir / "metrics.jsonl"
        if not own.is_file() or own.resolve() != self.reference.path.resolve():
            return
        kept = []
        for line in own.read_text(encoding="utf-8").splitlines(keepends=True):
            try:
                if json.loads(line).get("step", 0) <= self.comparison.start:
                    kept.append(line)
            except json.JSONDecodeError:
                continue
        tmp = own.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept + self.reference.later_lines), encoding="utf-8")
        tmp.replace(own)


def _world_any(flag: bool) -> bool:
    import torch
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# ----------------------------------------------------------------------------- `pretrain ckpt replay`
def register(csub: argparse._SubParsersAction) -> None:
    p = csub.add_parser(
        "replay",
        help="retrain K steps from a checkpoint and compare them with what the original run logged",
        description="Rebuild the run from CHECKPOINT (step N) in a scratch run directory, at its own layout or "
        "--layout, train K steps with `pretrain train` (train.resume=CHECKPOINT, train.verify_resume=K, no "
        "checkpoints) and compare each step's loss, grad_norm, lr and consumed_samples with the original "
        "run's RUN/metrics.jsonl for steps N+1..N+K: bitwise at the same layout on CPU, else within 1e-5 "
        "relative (fp32) or 1e-3 (bf16/fp16). Prints a table; exit 0 if equal, 1 naming the first step and "
        "quantity that differs, 2 if the replay could not run or found nothing to compare.",
    )
    p.add_argument("checkpoint", type=Path, help="a checkpoint directory (RUN/checkpoints/step-N)")
    p.add_argument("--steps", type=int, default=2, help="steps to retrain (default 2)")
    p.add_argument(
        "--layout",
        metavar="tp=N,pp=N,dp=N",
        help="replay at another layout (axes left out: the checkpoint's); started on this machine with "
        "tp x pp x dp processes",
    )
    p.add_argument("--json", action="store_true", help="print the comparison as one JSON object")
    p.add_argument(
        "--out", type=Path, help="scratch run directory (kept); default a temporary one, removed afterwards"
    )
    p.add_argument("--launcher", choices=["deepspeed", "torchrun"], default="deepspeed", help="world > 1")
    p.add_argument("--master-port", type=int, default=29500, help="rank 0's TCP port when world > 1")
    p.add_argument("--timeout-s", type=float, default=0.0, help="give up after this many seconds; 0 = never")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="SECTION.KEY=VALUE",
        help="applied to the checkpoint's config.yaml, e.g. data.shards=NEW when the shards moved",
    )
    p.set_defaults(func=cmd_ckpt_replay)


def parse_layout(text: str, saved: dict[str, Any]) -> dict[str, int]:
    """`tp=2,dp=1` -> {tp, pp, dp}; axes not named keep the checkpoint's."""
    out = {k: int(saved.get(k) or 1) for k in ("tp", "pp", "dp")}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in out or not value.isdigit() or int(value) < 1:
            raise ReplayError(f"--layout {text!r}: expected tp=N,pp=N,dp=N with N >= 1, got {part!r}")
        out[key] = int(value)
    return out


def cmd_ckpt_replay(args: argparse.Namespace) -> int:
    try:
        comparison = replay(
            args.checkpoint,
            steps=args.steps,
            layout=args.layout,
            out=args.out,
            launcher=args.launcher,
            master_port=args.master_port,
            timeout_s=args.timeout_s,
            overrides=list(args.overrides),
        )
    except ReplayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(comparison.to_json()))
    else:
        print(format_table(comparison))
    if comparison.verdict == "differs":
        print(f"replay DIFFERS: {comparison.message()}", file=sys.stderr)  # stdout keeps only the JSON
        return 1
    if comparison.verdict == "unchecked":
        print(f"error: {comparison.message()}", file=sys.stderr)
        return 2
    return 0


def format_table(c: Comparison) -> str:
    how = "bitwise" if c.mode == "bitwise" else f"rtol {c.rtol:g} on loss and grad_norm"
    lines = [
        f"replay of {c.checkpoint} (step {c.start}, {_fmt_layout(c.saved_layout)}) at {_fmt_layout(c.layout)}, "
        f"{c.steps} step(s), {how}; original: {c.reference}",
        f"{'step':>6}  {'quantity':<16} {'original':>24} {'replay':>24}  ",
    ]
    for r in c.rows:
        lines.append(
            f"{r.step:>6}  {r.quantity:<16} {_cell(r.original):>24} {_cell(r.replay):>24}  "
            f"{'equal' if r.equal else 'DIFFERS'}"
        )
    lines += [f"note: {n}" for n in c.notes]
    lines.append(f"{c.verdict}: {c.message()}")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return "-" if value is None else repr(value) if isinstance(value, float) else str(value)


def replay(
    checkpoint: Path,
    *,
    steps: int = 2,
    layout: str | None = None,
    out: Path | None = None,
    launcher: str = "deepspeed",
    master_port: int = 29500,
    timeout_s: float = 0.0,
    overrides: list[str] | None = None,
) -> Comparison:
    """Runs the replay; returns the comparison the resumed run wrote (its log: SCRATCH/replay.log)."""
    from pretrain.checkpoint import CheckpointError, read_manifest

    if steps < 1:
        raise ReplayError(f"--steps {steps}: must be at least 1")
    if out is not None and out.exists() and (not out.is_dir() or any(out.iterdir())):
        # The replay writes a run there (config.yaml, metrics.jsonl, tb/): never into an existing run.
        raise ReplayError(f"--out {out}: exists and is not an empty directory; give a new one")
    try:
        meta = read_manifest(checkpoint)
    except CheckpointError as exc:
        raise ReplayError(str(exc)) from None
    config = checkpoint / "config.yaml"
    if not config.is_file():
        raise ReplayError(f"{config}: missing; {checkpoint} holds no run config to rebuild the run from")
    start = int(meta.get("step", 0))
    saved = {"tp": 1, "pp": 1, "dp": 1, **(meta.get("layout") or {})}
    want = parse_layout(layout or "", saved)
    ref_path = reference_path(checkpoint)
    reference = Reference.read(ref_path, after=start)
    if not ref_path.is_file():
        raise ReplayError(f"{ref_path}: missing; the original run's metrics are needed to compare with")
    first = reference.first_comparable(after=start)
    if first is None:
        raise ReplayError(
            f"{ref_path}: no record past step {start} that a resume from it can reproduce (last record: step "
            f"{reference.last_step() or 'none'}); nothing to compare the replay with"
        )
    if first > start + steps:
        raise ReplayError(
            f"--steps {steps}: {ref_path} has no comparable record of steps {start + 1}-{start + steps} "
            f"(train.log_interval); the first is step {first}: give --steps {first - start} or more"
        )
    world = want["tp"] * want["pp"] * want["dp"]
    scratch = out or Path(tempfile.mkdtemp(prefix="tandem-replay-"))
    scratch.mkdir(parents=True, exist_ok=True)
    train_args = replay_train_args(
        checkpoint, start=start, steps=steps, layout=want, out_dir=scratch, overrides=overrides or []
    )
    log = scratch / "replay.log"
    try:
        code = _run(
            train_args, world=world, launcher=launcher, master_port=master_port, log=log, timeout_s=timeout_s
        )
        report = scratch / REPORT
        if not report.is_file():
            tail = log.read_text(encoding="utf-8", errors="replace")[-3000:] if log.is_file() else ""
            raise ReplayError(
                f"the replay run (world {world}) exited {code} before comparing anything; its log:\n{tail}"
            )
        comparison = Comparison.from_json(json.loads(report.read_text(encoding="utf-8")))
        if comparison.verdict != "differs" and code != 0:
            tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
            raise ReplayError(f"the replay run (world {world}) exited {code}; its log:\n{tail}")
    finally:
        if out is None:
            shutil.rmtree(scratch, ignore_errors=True)
    return comparison


def replay_train_args(
    checkpoint: Path, *, start: int, steps: int, layout: dict[str, int], out_dir: Path, overrides: list[str]
) -> list[str]:
    """`pretrain train` arguments that resume `checkpoint` (step `start`) into `out_dir` at `layout` and stop
    after `steps` steps with train.verify_resume on and nothing saved."""
    import yaml

    raw = yaml.safe_load((checkpoint / "config.yaml").read_text(encoding="utf-8")) or {}
    original_steps = int((raw.get("train") or {}).get("steps") or 0)
    pinned = []
    if not (raw.get("optimizer") or {}).get("decay_steps") and original_steps:
        # The schedule is restored from the checkpoint (megatron-core takes the saved decay and weight-decay
        # steps over the constructor's), so train.steps may end the replay early; but "decay over train.steps"
        # must keep naming the original length, or a warmup longer than N+K fails validation.
        pinned.append(f"optimizer.decay_steps={original_steps}")
    return [
        "train",
        "--config",
        str(checkpoint / "config.yaml"),
        *pinned,
        *overrides,
        f"train.out_dir={out_dir}",
        f"train.resume={checkpoint}",
        f"train.steps={start + steps}",
        f"train.verify_resume={steps}",
        f"parallel.tp={layout['tp']}",
        f"parallel.pp={layout['pp']}",
        "train.progress=false",
        "train.time_limit_s=0",
        "checkpoint.interval=0",
        "checkpoint.save_final=false",
    ]


def _run(
    train_args: list[str], *, world: int, launcher: str, master_port: int, log: Path, timeout_s: float
) -> int:
    """`pretrain train ...` in its own process group (one process, or `world` under the launcher), output to
    `log`; past `timeout_s` the whole group is killed."""
    if world == 1:
        argv, env = [sys.executable, "-m", "pretrain", *train_args], dict(os.environ)
    else:
        from launch import LaunchError, LaunchSpec, build_command, detect_device

        try:
            cmd = build_command(
                LaunchSpec(
                    nodes=1,
                    procs_per_node=world,
                    launcher=launcher,  # type: ignore[arg-type]
                    master_port=master_port,
                    device=detect_device(),
                ),
                train_args,
            )
        except LaunchError as exc:
            raise ReplayError(str(exc)) from None
        argv, env = cmd.argv, cmd.full_env()
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(key, None)  # a replay started inside another job's environment sets up its own world
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout_s if timeout_s > 0 else None
        try:
            while proc.poll() is None:
                if deadline is not None and time.monotonic() > deadline:
                    raise ReplayError(
                        f"the replay run did not finish within --timeout-s {timeout_s:g}; stopped"
                    )
                time.sleep(0.1)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    return proc.returncode
