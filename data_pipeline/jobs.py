"""The two data-preparation jobs, ``shard_corpus`` and ``clean_corpus``: plan, claim the output
directory, run the stages (:mod:`data_pipeline.pipeline`) on local processes, return the manifest.

:func:`prepare_job` alone plans and claims; the Slurm executor (``slurm.data_jobs``) uses it and then
submits the same stages as job arrays.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from data_pipeline.atomic import write_text_atomic
from data_pipeline.clean import CleanConfig, CleanError
from data_pipeline.corpus import CorpusError
from data_pipeline.executors import TaskFailed, run_local
from data_pipeline.manifest import MANIFEST_NAME
from data_pipeline.pipeline import (
    REPORT_NAME,
    WORK_DIR,
    Job,
    JobError,
    clean_fields,
    fingerprint_options,
    plan_pieces,
)
from data_pipeline.tokenizer import Tokenizer

__all__ = [
    "DEFAULT_BUCKETS",
    "DEFAULT_PIECE_MB",
    "ShardingError",
    "clean_corpus",
    "prepare_job",
    "shard_corpus",
]

DEFAULT_BUCKETS = 16
DEFAULT_PIECE_MB = 256.0
OPTIONS_NAMES = {"shard": ".shard_options.json", "clean": ".clean_options.json"}


class ShardingError(JobError):
    """The sharding run cannot proceed (bad options, or an out_dir owned by a different run)."""


def _validate(
    kind: str,
    inputs: Sequence[Path],
    *,
    workers: int,
    errors: str,
    max_document_bytes: int | None,
    oversize: str,
    buckets: int,
    piece_mb: float,
    extra: list[str],
) -> None:
    problems: list[str] = []
    if errors not in ("strict", "skip"):
        problems.append(f"errors={errors!r} must be 'strict' or 'skip'")
    if max_document_bytes is not None and max_document_bytes < 1:
        problems.append(f"max_document_bytes={max_document_bytes} must be >= 1 (or None for no limit)")
    if oversize not in ("split", "skip"):
        problems.append(f"oversize={oversize!r} must be 'split' or 'skip'")
    if not inputs:
        problems.append("inputs is empty")
    if workers < 1:
        problems.append(f"workers={workers} must be >= 1")
    if buckets < 1:
        problems.append(f"buckets={buckets} must be >= 1")
    if not piece_mb > 0:
        problems.append(f"piece_mb={piece_mb} must be > 0")
    problems += extra
    if problems:
        error = ShardingError if kind == "shard" else CleanError
        raise error(f"cannot {kind}: " + "; ".join(problems))


def _claim_out_dir(out_dir: Path, name: str, fingerprint: dict[str, Any], error: type[Exception]) -> None:
    """Record this job's fingerprint, or refuse if the directory belongs to a different job."""
    path = out_dir / name
    text = json.dumps(fingerprint, indent=2, sort_keys=True) + "\n"
    if path.is_file():
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise error(f"{path}: unreadable ({exc}); use a fresh out_dir") from exc
        if recorded == fingerprint:
            return
        if not any((out_dir / WORK_DIR).glob("*/done/*.json")):
            # A job that stopped before any task finished left nothing to mix: start it afresh.
            shutil.rmtree(out_dir / WORK_DIR, ignore_errors=True)
            write_text_atomic(path, text)
            return
        changed = sorted(
            k for k in fingerprint.keys() | recorded.keys() if fingerprint.get(k) != recorded.get(k)
        )
        details = "; ".join(f"{k}: was {recorded.get(k)!r}, now {fingerprint.get(k)!r}" for k in changed)
        raise error(
            f"{out_dir} holds output made with different settings ({details}). Resuming would mix "
            "them; use a fresh out_dir (or delete this one)."
        )
    # Output without a fingerprint: another tool's, or the single-reader sharding's (.progress.jsonl).
    names = (MANIFEST_NAME, REPORT_NAME, ".progress.jsonl")
    leftovers = sorted(
        [p.name for p in (*out_dir.glob("*.tar"), *out_dir.glob("part-*.json.gz"))]
        + [n for n in names if (out_dir / n).exists()]
    )
    if leftovers:
        shown = ", ".join(leftovers[:3]) + (", ..." if len(leftovers) > 3 else "")
        raise error(
            f"{out_dir} already holds output of unknown provenance ({shown}; no {name}); use a fresh out_dir"
        )
    write_text_atomic(path, text)


def prepare_job(
    kind: Literal["shard", "clean"],
    inputs: Sequence[Path],
    out_dir: Path,
    *,
    workers: int = 1,
    tokenizer_path: Path | None = None,
    val_fraction: float = 0.0,
    shard_size_mb: float = 64.0,
    seed: int = 0,
    min_tokens: int = 1,
    docs_per_file: int = 100_000,
    errors: Literal["strict", "skip"] = "strict",
    clean: CleanConfig | None = None,
    max_document_bytes: int | None = None,
    oversize: Literal["split", "skip"] = "split",
    buckets: int = DEFAULT_BUCKETS,
    piece_mb: float = DEFAULT_PIECE_MB,
) -> Job:
    """Validate, plan the pieces, claim ``out_dir`` (or check it is this job's) and write the job file."""
    inputs = [Path(p) for p in inputs]
    extra = []
    if kind == "shard":
        if not 0.0 <= val_fraction < 1.0:
            extra.append(f"val_fraction={val_fraction} must be in [0, 1)")
        if not shard_size_mb > 0:
            extra.append(f"shard_size_mb={shard_size_mb} must be > 0")
        if min_tokens < 0:
            extra.append(f"min_tokens={min_tokens} must be >= 0")
    elif docs_per_file < 1:
        extra.append(f"docs_per_file={docs_per_file} must be >= 1")
    _validate(
        kind,
        inputs,
        workers=workers,
        errors=errors,
        max_document_bytes=max_document_bytes,
        oversize=oversize,
        buckets=buckets,
        piece_mb=piece_mb,
        extra=extra,
    )
    for p in inputs:
        if not p.is_file():
            raise CorpusError(f"{p}: no such corpus file")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    job = Job(
        kind=kind,
        out_dir=str(out_dir.resolve()),
        inputs=[{"path": str(p), "bytes": p.stat().st_size} for p in inputs],
        pieces=plan_pieces(inputs, max(1, int(piece_mb * 1_000_000))),
        buckets=buckets,
        errors=errors,
        max_document_bytes=max_document_bytes,
        oversize=oversize,
        clean=None if clean is None else clean_fields(clean),
        piece_mb=piece_mb,
        docs_per_file=docs_per_file,
        val_fraction=val_fraction,
        shard_size_mb=shard_size_mb,
        seed=seed,
        min_tokens=min_tokens,
        started=time.time(),
    )
    error: type[Exception] = CleanError
    if kind == "shard":
        if tokenizer_path is None:
            raise ShardingError("cannot shard: tokenizer_path is required")
        tok = Tokenizer(tokenizer_path)
        job.tokenizer = str(Path(tokenizer_path).resolve())
        job.dtype = "uint16" if tok.vocab_size <= 65536 else "uint32"
        error = ShardingError
    fingerprint = fingerprint_options(job, clean) | {"inputs": job.inputs}
    if kind == "shard":
        fingerprint |= {"tokenizer_sha256": tok.sha256, "dtype": job.dtype}
    _claim_out_dir(out_dir, OPTIONS_NAMES[kind], fingerprint, error)
    try:
        previous = Job.load(out_dir)
    except JobError:
        previous = None
    if previous is not None:
        if previous.buckets != job.buckets:
            raise error(
                f"{out_dir}: this job was started with buckets={previous.buckets}; resume it with the same "
                f"--buckets (now {job.buckets}) or use a fresh out_dir"
            )
        previous.tokenizer = job.tokenizer  # the same model by its sha256 (checked above), maybe moved
        return previous
    job.save()
    return job


def _run(job: Job, workers: int) -> None:
    try:
        run_local(job, workers=workers)
    except TaskFailed as exc:
        # Bad input (strict mode) surfaces as the reader's own error: FILE:LINE: reason.
        if isinstance(exc.cause, (CorpusError, CleanError, JobError)):
            raise exc.cause from None
        raise


def shard_corpus(
    inputs: Sequence[Path],
    *,
    tokenizer_path: Path,
    out_dir: Path,
    workers: int = 1,
    val_fraction: float = 0.0,
    shard_size_mb: float = 64.0,
    seed: int = 0,
    errors: Literal["strict", "skip"] = "strict",
    strict: bool | None = None,
    min_tokens: int = 1,
    clean: CleanConfig | None = None,
    max_document_bytes: int | None = None,
    oversize: Literal["split", "skip"] = "split",
    buckets: int = DEFAULT_BUCKETS,
    piece_mb: float = DEFAULT_PIECE_MB,
) -> dict:
    """Tokenize ``inputs`` into ``out_dir`` and return the manifest (also written to manifest.json).

    Each input file's documents (or each piece of a file larger than ``piece_mb``) become that file's
    own shards, ``train-FFFFF-PPPP-KKKK.tar`` / ``val-...``, of about ``shard_size_mb`` MB of raw
    UTF-8 text per split; about ``val_fraction`` of the documents go to the validation split
    (:func:`data_pipeline.pipeline.assign_split`). Documents with fewer than ``min_tokens`` tokens are
    left out and counted as ``too_short``. ``errors="strict"`` stops at the first malformed record
    with its file and line; ``"skip"`` skips and counts it by reason (``strict=False`` is the older
    spelling of ``errors="skip"``). ``clean`` applies C4 cleaning and dedupe (``buckets`` hash
    partitions). Documents over ``max_document_bytes`` are split or skipped (``oversize``). Rerunning
    with the same inputs, tokenizer and options resumes (only unfinished tasks run); other settings
    are refused. ``workers`` and ``buckets`` do not change the output."""
    if strict is not None:
        errors = "strict" if strict else "skip"
    job = prepare_job(
        "shard",
        inputs,
        Path(out_dir),
        workers=workers,
        tokenizer_path=tokenizer_path,
        val_fraction=val_fraction,
        shard_size_mb=shard_size_mb,
        seed=seed,
        min_tokens=min_tokens,
        errors=errors,
        clean=clean,
        max_document_bytes=max_document_bytes,
        oversize=oversize,
        buckets=buckets,
        piece_mb=piece_mb,
    )
    _run(job, workers)
    return json.loads((Path(out_dir) / MANIFEST_NAME).read_text(encoding="utf-8"))


def clean_corpus(
    inputs: Sequence[Path],
    out_dir: str | Path,
    *,
    cfg: CleanConfig | None = None,
    errors: Literal["strict", "skip"] = "strict",
    workers: int = 1,
    max_document_bytes: int | None = None,
    oversize: Literal["split", "skip"] = "split",
    docs_per_file: int = 100_000,
    buckets: int = DEFAULT_BUCKETS,
    piece_mb: float = DEFAULT_PIECE_MB,
) -> dict:
    """Clean and dedupe ``inputs`` into ``out_dir/part-FFFFF-PPPP-KKKK.json.gz`` (C4's JSON lines,
    ``docs_per_file`` documents each, named after the input file and piece) and write
    ``out_dir/clean_report.json``; return the report. The output is identical for any ``workers``,
    ``buckets`` or executor; a rerun resumes."""
    job = prepare_job(
        "clean",
        inputs,
        Path(out_dir),
        workers=workers,
        docs_per_file=docs_per_file,
        errors=errors,
        clean=cfg or CleanConfig(),
        max_document_bytes=max_document_bytes,
        oversize=oversize,
        buckets=buckets,
        piece_mb=piece_mb,
    )
    _run(job, workers)
    return json.loads((Path(out_dir) / REPORT_NAME).read_text(encoding="utf-8"))
