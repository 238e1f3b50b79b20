"""What people look at during a run: metrics.jsonl (one JSON object per logged step), TensorBoard event
files under tb/, and a console progress bar. Only rank 0 writes."""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch


def memory_gb() -> float:
    """Peak accelerator memory (GPU) or peak resident memory of this process (CPU), in GiB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


class MetricsLogger:
    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int, start_step: int, progress: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        self.bar = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(
            log_dir=str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None
        )
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps,
                initial=start_step,
                desc="train",
                unit="step",
                file=sys.stderr,
                dynamic_ncols=True,
                disable=None,
            )

    def _truncate_after(self, step: int) -> None:
        """On resume, drop records a crashed run wrote after its last checkpoint: they will be redone."""
        if not self.path.exists():
            return
        keep = []
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    if json.loads(line).get("step", 0) <= step:
                        keep.append(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(keep), encoding="utf-8")
        tmp.replace(self.path)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(clean) + "\n")
        step = record["step"]
        assert self.tb is not None  # enabled implies a writer
        assert self.tb is not None
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and value is not None:
                self.tb.add_scalar(
                    f"train/{key}" if not key.startswith("eval") else key.replace("_", "/", 1), value, step
                )
        if self.bar is not None and "loss" in record:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record.get('tokens_per_s', 0):.0f}")

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
