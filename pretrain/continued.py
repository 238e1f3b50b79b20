"""Continued pretraining (`train.init_from=CHECKPOINT`): a new run that starts from another run's weights.

Only the weights come from the source checkpoint; the optimizer state, learning-rate schedule, step
counter, data stream and seed are the new run's own (Minerva-style further training on a new mixture).
The source may have been saved at another tensor-parallel layout: its shards are consolidated into the
full state dict (`pretrain.consolidate`), which is loaded into the freshly built model before
`parallelize()` shards it for the new layout.

Rules:
* The model must be the source's: every `model.*` field except those in `MAY_DIFFER` must be equal,
  otherwise the run stops before training with one error listing each differing field.
* The token ids must mean the same: the shards' tokenizer must be the checkpoint's `tokenizer.model`.
* The source is verified against its manifest (sizes and sha256) before its weights are read.
* Provenance: the run's config.yaml keeps `train.init_from`, and every checkpoint's meta.json (and so
  its manifest) records `init_from: {path, step, manifest_sha256, layout}`.
* A run directory that already holds a checkpoint resumes from it (`train.resume=auto`) and ignores
  `init_from` with a printed note, so a preempted continued-pretraining run continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import torch

from pretrain.config import Config, ConfigError, ModelConfig

# Fields that do not change the parameters or the function a checkpoint's weights compute. The vocabulary's
# padding recipe and the recorded tokenizer size are covered by model.vocab_size (compared) and by the
# tokenizer check below (compared by hash).
MAY_DIFFER = (
    "preset",
    "dropout",
    "init_std",
    "objective",
    "make_vocab_size_divisible_by",
    "tokenizer_vocab_size",
)


def model_mismatch(source: ModelConfig, target: ModelConfig) -> list[str]:
    """One line per `model.*` field whose value differs from the source checkpoint's."""
    out = []
    for f in dataclasses.fields(ModelConfig):
        if f.name in MAY_DIFFER:
            continue
        want, got = getattr(source, f.name), getattr(target, f.name)
        if want != got:
            out.append(f"model.{f.name}={got!r} (the checkpoint has {want!r})")
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_init_from(
    path: str | Path, cfg: Config, *, tokenizer_sha256: str | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """-> (the source's full state dict, the provenance record for this run's checkpoints).
    Raises ConfigError naming every reason the source cannot initialize `cfg.model`."""
    from pretrain.checkpoint import CheckpointError, read_manifest, verify_checkpoint
    from pretrain.export import _checkpoint_config, checkpoint_state_dict

    path = Path(path)
    field = f"train.init_from={str(path)!r}"
    problems = verify_checkpoint(path, hashes=cfg.checkpoint.verify_on_load)
    if problems:
        raise CheckpointError(f"{field}: will not load a damaged checkpoint:\n  " + "\n  ".join(problems))
    source = _checkpoint_config(path)
    errors = model_mismatch(source.model, cfg.model)
    if errors:
        errors = [f"{field}: the model differs from the checkpoint's: {e}" for e in errors]
    tokenizer = path / "tokenizer.model"
    if tokenizer_sha256 and tokenizer.is_file() and _sha256(tokenizer) != tokenizer_sha256:
        errors.append(
            f"{field}: the checkpoint's tokenizer.model differs from the shards' tokenizer "
            "(token ids would mean other pieces); shard the new data with the checkpoint's tokenizer"
        )
    if errors:
        raise ConfigError(errors)
    manifest = read_manifest(path)
    state, _ = checkpoint_state_dict(path)
    record = {
        "path": str(path.resolve()),
        "step": int(manifest.get("step", 0)),
        "manifest_sha256": _sha256(path / "manifest.json"),
        "layout": manifest.get("layout"),
    }
    return state, record


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Loads the source weights into the freshly built (not yet parallelized) model: every parameter of
    the model must come from the source and every source tensor must have a place (a different
    `model.objective` may add or drop heads; that is an error naming them, not a partial warm start)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    problems = []
    if missing:
        problems.append(
            f"train.init_from={str(path)!r}: the model has weights the checkpoint lacks: {missing}"
        )
    if unexpected:
        problems.append(
            f"train.init_from={str(path)!r}: the checkpoint has weights the model lacks: {unexpected}"
        )
    if problems:
        raise ConfigError(problems)
