"""Checkpointing: the one component that reads and writes checkpoint files.

Layout of `RUN/checkpoints/step-N/` (a DeepSpeed checkpoint tag directory plus Tandem's own files):
  mp_rank_*_model_states.pt, *_optim_states.pt   DeepSpeed's engine state (weights, optimizer, counters)
  tandem-rank-00000.pt ...                        per rank: loader position, RNG states, scheduler, step
  config.yaml                                     the resolved run config
  meta.json                                       step, consumed samples, layout, written last

A checkpoint is written under `step-N.partial/` and renamed to `step-N/` by rank 0 only after every rank
has finished writing (a barrier), so a directory named `step-N` is always complete. `latest` names the
newest one. Tandem's own per-rank files hold only tensors and plain values and are read back with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.distributed import barrier

STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    np_state: tuple[Any, ...] = np.random.get_state()  # type: ignore[assignment]
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": py_version,
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss": py_gauss,
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["internal"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    def __init__(self, run_dir: str | Path, engine: Any, *, rank: int, world_size: int, keep_last: int = 0):
        self.dir = Path(run_dir) / "checkpoints"
        self.engine, self.rank, self.world_size, self.keep_last = engine, rank, world_size, keep_last

    # ------------------------------------------------------------------ queries
    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [
            (int(m.group(1)), p)
            for p in self.dir.iterdir()
            if p.is_dir() and (m := STEP_DIR.match(p.name)) and (p / "meta.json").is_file()
        ]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        done = self.complete_checkpoints()
        return done[-1] if done else None

    def resolve(self, resume: str) -> Path | None:
        """`train.resume` -> the checkpoint directory to load, or None to start fresh."""
        if resume == "never":
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if not (path / "meta.json").is_file():
            raise FileNotFoundError(
                f"train.resume={resume!r}: not a complete Tandem checkpoint (no meta.json)"
            )
        return path

    # ------------------------------------------------------------------ save
    def save(self, step: int, *, state: dict[str, Any], meta: dict[str, Any], config_yaml: str) -> Path:
        """Collective: every rank calls it. `state` is this rank's own (loader, scheduler, counters)."""
        final = self.dir / f"step-{step}"
        tag = f"step-{step}.partial"
        partial = self.dir / tag
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            if partial.exists():
                shutil.rmtree(partial)  # left by a run that died while saving
        barrier()
        self.engine.save_checkpoint(str(self.dir), tag=tag, client_state={}, save_latest=False)
        own = {"state": state, "rng": rng_state(), "rank": self.rank, "world_size": self.world_size}
        torch.save(own, partial / f"tandem-rank-{self.rank:05d}.pt")
        barrier()
        if self.rank == 0:
            (partial / "config.yaml").write_text(config_yaml, encoding="utf-8")
            meta = {**meta, "step": step, "world_size": self.world_size, "saved_at": time.time()}
            (partial / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
            if final.exists():
                shutil.rmtree(final)
            partial.rename(final)
            (self.dir / "latest").write_text(final.name + "\n", encoding="utf-8")
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for old in self.complete_checkpoints()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def load(self, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restores engine, RNG and returns (this rank's state, meta). Same layout only."""
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        if meta.get("world_size") != self.world_size:
            raise RuntimeError(
                f"{path}: saved with world size {meta.get('world_size')} (layout {meta.get('layout')}), this run "
                f"has {self.world_size}; a plain DeepSpeed load cannot change the layout"
            )
        load_path, _ = self.engine.load_checkpoint(
            str(path.parent),
            tag=path.name,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
            load_module_strict=True,
        )
        if load_path is None:
            raise RuntimeError(f"{path}: DeepSpeed found no engine state to load")
        own_file = path / f"tandem-rank-{self.rank:05d}.pt"
        if not own_file.is_file():
            raise FileNotFoundError(f"{own_file}: missing; the checkpoint is incomplete")
        own = torch.load(own_file, weights_only=True)
        set_rng_state(own["rng"])
        return own["state"], meta
