"""Checkpointing: the one component that reads and writes checkpoint files.

Layout of `RUN/checkpoints/step-N/` (a DeepSpeed checkpoint tag directory plus Tandem's own files):
  mp_rank_*_model_states.pt, *_optim_states.pt   DeepSpeed's engine state (weights, optimizer, counters)
  tandem-rank-00000.pt ...                        per rank: loader position, RNG states, scheduler, step
  config.yaml                                     the resolved run config
  meta.json                                       step, consumed samples, layout, written last

  manifest.json                                   every file's size and sha256, layout, step, tokens, config hash

A checkpoint is written under `step-N.partial/`; after a barrier (every rank has written), rank 0 hashes the
files, writes manifest.json, fsyncs and renames the directory to `step-N/`. Only a directory named `step-N`
with a manifest is a checkpoint: a crash at any point leaves either the previous checkpoint or the new one,
never a half-written one that auto-resume would pick. `latest` is replaced by write-temp-then-rename.
Old checkpoints are renamed away before they are deleted, and the newest is never deleted.

Nothing here unpickles arbitrary objects: Tandem's own files are read with `torch.load(weights_only=True)`,
and DeepSpeed's engine files go through `SafeCheckpointEngine`, which allows only the handful of DeepSpeed
classes its optimizer states contain.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipeline.atomic import fsync_path, write_text_atomic
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


MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    pass


FAULT_ENV = "TANDEM_FAULT_INJECT"


def _fault_point(name: str, step: int) -> None:
    """Test hook: `TANDEM_FAULT_INJECT=NAME:STEP` SIGKILLs this process at that point of saving that step
    (no cleanup runs, as with a node failure). Points: shards, manifest, latest, prune."""
    want = os.environ.get(FAULT_ENV)
    if want and want == f"{name}:{step}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_manifest(directory: Path, meta: dict[str, Any]) -> dict[str, Any]:
    files = {}
    for f in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[str(f.relative_to(directory))] = {"bytes": f.stat().st_size, "sha256": _sha256(f)}
    return {"format": "tandem-checkpoint", "version": 1, **meta, "files": files}


def verify_checkpoint(directory: str | Path, *, hashes: bool = True) -> list[str]:
    """Problems with a checkpoint directory (empty = complete and intact): missing manifest, missing or
    extra files, sizes, and with `hashes` every file's sha256. Each problem names the file."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return [f"{manifest_path}: missing (the checkpoint was never completed)"]
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError) as exc:
        return [f"{manifest_path}: unreadable ({exc.__class__.__name__})"]
    problems = []
    for name, want in files.items():
        f = directory / name
        if not f.is_file():
            problems.append(f"{f}: listed in the manifest but missing")
        elif f.stat().st_size != want["bytes"]:
            problems.append(f"{f}: {f.stat().st_size} bytes, manifest says {want['bytes']}")
        elif hashes and _sha256(f) != want["sha256"]:
            problems.append(f"{f}: sha256 differs from the manifest (corrupted)")
    for f in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        if str(f.relative_to(directory)) not in files:
            problems.append(f"{f}: not in the manifest")
    return problems


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; {directory} is not a complete Tandem checkpoint")
    return json.loads(path.read_text(encoding="utf-8"))


def _allowed_deepspeed_globals() -> list[Any]:
    """The classes DeepSpeed pickles into its optimizer-state files (found with
    torch.serialization.get_unsafe_globals_in_checkpoint); nothing else may be unpickled."""
    allowed: list[Any] = []
    for module, names in (
        ("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
        ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
        ("deepspeed.utils.tensor_fragment", ("fragment_address",)),
    ):
        try:
            mod = __import__(module, fromlist=list(names))
        except ImportError:
            continue
        allowed += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return allowed


def install_safe_checkpoint_engine(engine: Any) -> None:
    """Replaces DeepSpeed's checkpoint engine (which loads with weights_only=False) by one that loads
    with weights_only=True and an explicit allow-list; a file carrying anything else is refused."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    allowed = _allowed_deepspeed_globals()

    class SafeCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            try:
                with torch.serialization.safe_globals(allowed):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except Exception as exc:  # pickle.UnpicklingError and friends: name the file, keep the reason
                raise CheckpointError(
                    f"{path}: refused to load (not plain tensors and allowed types): {exc}"
                ) from None

    current = getattr(engine, "checkpoint_engine", None)
    if current is None or type(current) is TorchCheckpointEngine:
        safe = SafeCheckpointEngine.__new__(SafeCheckpointEngine)
        if current is not None:
            safe.__dict__.update(current.__dict__)
        else:
            TorchCheckpointEngine.__init__(safe, None)
        engine.checkpoint_engine = safe


def _check_optimizer_shapes(engine: Any, path: Path) -> None:
    """After a resharded load: every Adam moment must be shaped like the parameter it was given to."""
    optimizer = getattr(engine, "optimizer", None)
    for group in getattr(optimizer, "param_groups", []):
        for p in group["params"]:
            state = optimizer.state.get(p, {})  # type: ignore[union-attr]
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state and state[key].shape != p.shape:
                    raise CheckpointError(
                        f"{path}: optimizer {key} of shape {tuple(state[key].shape)} was loaded for a parameter "
                        f"of shape {tuple(p.shape)}: the conversion's parameter order disagrees with this engine"
                    )


class Checkpointer:
    def __init__(
        self,
        run_dir: str | Path,
        engine: Any,
        *,
        rank: int,
        world_size: int,
        keep_last: int = 0,
        verify_on_load: bool = True,
    ):
        self.dir = Path(run_dir) / "checkpoints"
        self.engine, self.rank, self.world_size, self.keep_last = engine, rank, world_size, keep_last
        self.verify_on_load = verify_on_load
        self.reshard_reports: list[Any] = []  # per rank, from the last prepare_reshard
        if engine is not None:
            self.attach(engine)

    def attach(self, engine: Any) -> None:
        self.engine = engine
        install_safe_checkpoint_engine(engine)

    # ------------------------------------------------------------------ layout changes
    @staticmethod
    def reshard_plan(path: Path, layout: dict[str, Any]) -> str:
        """How to load `path` into `layout` ({tp, pp, dp, zero}, optionally precision and vocab_size): 'same'
        (plain load), 'plain' (only the number of data-parallel replicas changed and nothing is partitioned: a
        plain load works), 'reshard' (rewritten at the new layout by `pretrain.reshard`, every rank converting
        its own slice: any tp/pp/dp, fp32/bf16/fp16, ZeRO 0-2 and a change between them, a vocabulary padding
        change), 'universal' (a
        dp-only change of a ZeRO-3 run, through DeepSpeed's universal checkpoint). Raises for what cannot be
        converted, naming both layouts and why."""
        import yaml

        manifest = read_manifest(path)
        saved = {"tp": 1, "pp": 1, "dp": 1, "zero": 0, **(manifest.get("layout") or {})}
        config = path / "config.yaml"
        raw = (yaml.safe_load(config.read_text(encoding="utf-8")) if config.is_file() else None) or {}
        saved_vocab = int((raw.get("model") or {}).get("vocab_size") or 0)
        vocab_changed = bool(
            layout.get("vocab_size") and saved_vocab and saved_vocab != int(layout["vocab_size"])
        )
        # Another engine ZeRO stage or precision keeps the optimizer state in another format (torch's AdamW
        # state, or DeepSpeed's flat partitions of one optimizer or the other): converted like a layout change.
        # Only callers that state the precision (training, evaluation) ask for it.
        saved_precision = (raw.get("train") or {}).get("precision", "fp32")
        format_changed = "precision" in layout and (
            saved["zero"] != layout["zero"] or saved_precision != layout["precision"]
        )
        same_split = all(saved.get(k) == layout[k] for k in ("tp", "pp", "dp"))
        if (
            same_split
            and not vocab_changed
            and not (format_changed and 3 not in (saved["zero"], layout["zero"]))
        ):
            return "same"
        split_changed = saved["tp"] != layout["tp"] or saved["pp"] != layout["pp"] or vocab_changed
        if 3 in (saved["zero"], layout["zero"]):
            if split_changed or max(saved["pp"], layout["pp"]) > 1:
                raise CheckpointError(
                    f"{path}: saved at tp={saved['tp']}, pp={saved['pp']}, dp={saved['dp']}, zero={saved['zero']}; "
                    f"this run has tp={layout['tp']}, pp={layout['pp']}, dp={layout['dp']}, zero={layout['zero']}: "
                    "ZeRO stage 3 partitions the weights themselves and changes only its dp size on resume "
                    "(through DeepSpeed's universal checkpoint)"
                )
            return "universal"
        if layout.get("ep", 1) > 1 or saved.get("ep", 1) > 1:
            raise CheckpointError(
                f"{path}: expert-parallel (MoE) checkpoints resume only at their saved layout"
            )
        unpartitioned = saved["zero"] == 0 and layout["zero"] == 0
        if unpartitioned and not split_changed and max(saved["pp"], layout["pp"]) == 1:
            return "plain"
        return "reshard"

    def prepare_reshard(
        self,
        path: Path,
        layout: dict[str, Any],
        *,
        partition: str,
        model_cfg: Any = None,
        measure_memory: bool = False,
    ) -> Path:
        """Converts `path` once to `layout`, cached beside it as `step-N.reshard-tpX-ppY-dpZ/`. Collective and
        parallel: every rank writes its own slice (`pretrain.reshard.convert_rank`, reading only the source
        files that hold it) into `...tmp/`; rank 0 then writes the config, meta and the manifest from the
        ranks' own hashes, last, and renames it, so the directory appears under its name only when complete.
        `model_cfg`: this run's model (its vocabulary padding may differ from the checkpoint's). A cached copy
        converted for another ZeRO stage, precision or vocabulary is converted again. Every rank's report (files
        read and written, seconds, peak memory with `measure_memory`) is left in `self.reshard_reports`. Returns
        the converted checkpoint."""
        import torch.distributed as dist

        from pretrain.reshard import convert_rank, plan_conversion, seal

        out = path.with_name(f"{path.name}.reshard-tp{layout['tp']}-pp{layout['pp']}-dp{layout['dp']}")
        conv = plan_conversion(
            path,
            tp=layout["tp"],
            pp=layout["pp"],
            dp=layout["dp"],
            zero=layout["zero"],
            precision=layout.get("precision"),
            partition=partition,
            model_cfg=model_cfg,
            verify=self.verify_on_load,
        )
        if _converted_for(out, conv.want, conv.target.cfg.vocab_size, source=path):
            return out
        if conv.target.world != self.world_size:
            raise CheckpointError(
                f"{path}: converting to {layout} needs {conv.target.world} ranks, this job has {self.world_size}"
            )
        tmp = out.with_name(out.name + ".tmp")
        if self.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        barrier()
        report, error = None, None
        try:
            report = convert_rank(
                path,
                tmp,
                source=conv.source,
                target=conv.target,
                rank=self.rank,
                saved_world=conv.saved_world,
                measure_memory=measure_memory,
                hashes=conv.hashes,
            )
        except Exception as exc:  # reported by every rank after the gather, so none waits forever
            error = f"rank {self.rank}: {exc.__class__.__name__}: {exc}"
        results: list[Any] = [(report, error)]
        if dist.is_initialized() and dist.get_world_size() > 1:
            results = [None] * dist.get_world_size()
            dist.all_gather_object(results, (report, error))
        errors = [e for _, e in results if e]
        if errors:
            raise CheckpointError(f"{path}: the conversion to {layout} failed:\n  " + "\n  ".join(errors))
        self.reshard_reports = [r for r, _ in results]
        if self.rank == 0:
            seal(conv, tmp, out, self.reshard_reports)
        barrier()
        if not (out / MANIFEST).is_file():
            raise CheckpointError(f"{path}: the conversion to {layout} left no manifest in {out}")
        if self.rank == 0:
            slowest = max(results, key=lambda x: x[0].seconds)[0]
            print(
                f"resharded {path.name} to {out.name} on {len(results)} ranks in {slowest.seconds:.2f} s "
                f"(slowest rank {slowest.rank}: read {len(slowest.opened)} files)",
                flush=True,
            )
        return out

    def prepare_universal(self, path: Path) -> Path:
        """Converts `path` once with DeepSpeed's ds_to_universal (rank 0; cached beside it as
        `step-N.universal/`, marked complete by a file written last). Collective."""
        out = path.with_name(path.name + ".universal")
        done = out / "TANDEM_COMPLETE"
        if self.rank == 0 and not done.is_file():
            import subprocess
            import sys

            if out.exists():
                shutil.rmtree(out)
            cmd = [
                sys.executable,
                "-m",
                "deepspeed.checkpoint.ds_to_universal",
                "--input_folder",
                str(path),
                "--output_folder",
                str(out),
                "--inject_missing_state",
                "--num_extract_workers",
                "1",
                "--num_merge_workers",
                "1",
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "RANK": "0"})
            if proc.returncode != 0:
                raise CheckpointError(f"{path}: universal conversion failed:\n{proc.stderr[-3000:]}")
            write_text_atomic(done, path.name + "\n")
        barrier()
        return out

    # ------------------------------------------------------------------ queries
    def complete_checkpoints(self) -> list[Path]:
        """Checkpoints with a manifest, oldest first (partial and half-deleted ones are not named step-N)."""
        if not self.dir.is_dir():
            return []
        found = [
            (int(m.group(1)), p)
            for p in self.dir.iterdir()
            if p.is_dir() and (m := STEP_DIR.match(p.name)) and (p / MANIFEST).is_file()
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
        if not (path / MANIFEST).is_file():
            raise FileNotFoundError(
                f"train.resume={resume!r}: not a complete Tandem checkpoint (no {MANIFEST})"
            )
        return path

    # ------------------------------------------------------------------ save
    def save(
        self,
        step: int,
        *,
        state: dict[str, Any],
        meta: dict[str, Any],
        config_yaml: str,
        extra_files: dict[str, Path] | None = None,
    ) -> Path:
        """Collective: every rank calls it. `state` is this rank's own (loader, scheduler, counters);
        `extra_files` (name -> source) are copied in by rank 0 and sealed by the manifest like the rest."""
        final = self.dir / f"step-{step}"
        tag = f"step-{step}.partial"
        partial = self.dir / tag
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob("*.partial"):
                shutil.rmtree(stale, ignore_errors=True)  # left by a run that died while saving
            for stale in self.dir.glob(".deleting-*"):
                shutil.rmtree(stale, ignore_errors=True)  # left by a run that died while pruning
        barrier()
        self.engine.save_checkpoint(str(self.dir), tag=tag, client_state={}, save_latest=False)
        _fault_point("shards", step)
        own = {"state": state, "rng": rng_state(), "rank": self.rank, "world_size": self.world_size}
        own_file = partial / f"tandem-rank-{self.rank:05d}.pt"
        torch.save(own, own_file)
        fsync_path(own_file)
        barrier()
        if self.rank == 0:
            (partial / "config.yaml").write_text(config_yaml, encoding="utf-8")
            for name, source in (extra_files or {}).items():
                shutil.copyfile(source, partial / name)
            meta = {
                **meta,
                "step": step,
                "world_size": self.world_size,
                "saved_at": time.time(),
                "config_sha256": hashlib.sha256(config_yaml.encode()).hexdigest(),
            }
            (partial / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
            for f in partial.rglob("*"):
                if f.is_file():
                    fsync_path(f)
            write_text_atomic(partial / MANIFEST, json.dumps(build_manifest(partial, meta), indent=2))
            _fault_point("manifest", step)
            if final.exists():
                self._delete(final)
            partial.rename(final)
            fsync_path(self.dir)
            _fault_point("latest", step)
            write_text_atomic(self.dir / "latest", final.name + "\n")
            self._prune(step)
        barrier()
        return final

    def _delete(self, path: Path, step: int = -1) -> None:
        """Rename first, so a crash mid-delete never leaves a `step-N` directory missing files."""
        doomed = path.with_name(f".deleting-{path.name}")
        path.rename(doomed)
        _fault_point("prune", step)
        shutil.rmtree(doomed, ignore_errors=True)
        shutil.rmtree(path.with_name(path.name + ".universal"), ignore_errors=True)  # its converted copies
        for converted in path.parent.glob(f"{path.name}.reshard-*"):
            shutil.rmtree(converted, ignore_errors=True)

    def _prune(self, step: int = -1) -> None:
        if self.keep_last <= 0:
            return
        done = self.complete_checkpoints()
        for old in done[: -self.keep_last]:  # the newest complete checkpoint is never in this slice
            self._delete(old, step)

    # ------------------------------------------------------------------ load
    def load(
        self, path: Path, *, plan: str = "same", load_optimizer: bool = True
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restores engine and RNG; returns (this rank's state, meta). `plan` from `reshard_plan`: with
        'universal' the engine was initialized with load_universal and reads `step-N.universal/`; with
        'reshard' `path` is the converted checkpoint from `prepare_reshard`. `load_optimizer=False` reads the
        weights only (evaluation)."""
        problems = verify_checkpoint(path, hashes=self.verify_on_load)
        if problems:
            raise CheckpointError(f"{path}: will not load a damaged checkpoint:\n  " + "\n  ".join(problems))
        meta = read_manifest(path)
        if plan == "same" and meta.get("world_size") != self.world_size:
            raise CheckpointError(
                f"{path}: saved with world size {meta.get('world_size')} (layout {meta.get('layout')}), this run "
                f"has {self.world_size}; a plain DeepSpeed load cannot change the layout"
            )
        source = path.with_name(path.name + ".universal") if plan == "universal" else path
        load_path, _ = self.engine.load_checkpoint(
            str(source.parent),
            tag=source.name,
            load_optimizer_states=load_optimizer,
            load_lr_scheduler_states=False,
            load_module_strict=True,
        )
        if load_path is None:
            raise RuntimeError(f"{path}: DeepSpeed found no engine state to load")
        if load_optimizer:
            place_fused_optimizer_steps(self.engine.optimizer)
        if plan == "reshard":
            _check_optimizer_shapes(self.engine, path)
        # Loader position, schedule and counters are the same on every rank; after a layout change a rank
        # beyond the saved world takes rank 0's RNG stream (the run continues within 1e-5, not bitwise).
        saved_rank = self.rank if self.rank < int(meta.get("world_size", 1)) else 0
        own_file = path / f"tandem-rank-{saved_rank:05d}.pt"
        if not own_file.is_file():
            raise FileNotFoundError(f"{own_file}: missing; the checkpoint is incomplete")
        own = torch.load(own_file, weights_only=True)
        set_rng_state(own["rng"])
        return own["state"], meta


def _converted_for(out: Path, want: dict[str, Any], vocab_size: int, *, source: Path) -> bool:
    """Whether `out` is a complete conversion of `source` as it is now (its manifest's sha256: a checkpoint
    re-sealed in place since is converted again) to exactly `want` (tp, pp, dp, zero, precision) and
    vocabulary."""
    if not (out / MANIFEST).is_file() or not (source / MANIFEST).is_file():
        return False
    import yaml

    manifest = read_manifest(out)
    if (manifest.get("resharded_from") or {}).get("manifest_sha256") != _sha256(source / MANIFEST):
        return False
    layout = manifest.get("layout") or {}
    raw = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8")) or {}
    return (
        all(layout.get(k) == want[k] for k in ("tp", "pp", "dp", "zero"))
        and (raw.get("train") or {}).get("precision") == want["precision"]
        and int((raw.get("model") or {}).get("vocab_size") or 0) == int(vocab_size)
    )


def place_fused_optimizer_steps(optimizer: Any) -> None:
    """Moves each Adam `step` counter onto its parameter's device in groups that run torch's fused AdamW
    (optimizer.implementation=fused), which requires it there. torch's own `load_state_dict` does this, but
    DeepSpeed's universal-checkpoint load writes the optimizer state directly, with tensors loaded to the
    host. `optimizer` may be DeepSpeed's wrapper (its `.optimizer` is unwrapped) or the torch optimizer."""
    inner = optimizer
    while not isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "optimizer"):
        inner = inner.optimizer
    if not isinstance(inner, torch.optim.Optimizer):
        return
    for group in inner.param_groups:
        if not group.get("fused"):
            continue
        for p in group["params"]:
            state = inner.state.get(p, {})
            step = state.get("step")
            if torch.is_tensor(step) and step.device != p.device:
                state["step"] = step.to(p.device)
