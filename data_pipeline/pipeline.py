"""Data preparation as stages of independent tasks over the input files: no central reader.

A job (``pretrain data shard`` or ``pretrain data clean``) is planned once into ``OUT/.work/job.json``:
the inputs, cut into *pieces* (a file is one piece, except an uncompressed JSON lines file larger than
``piece_mb``, which is cut into byte ranges at line boundaries, see
:func:`data_pipeline.corpus.iter_range_documents`), and the options. Then stages run in order, each a
set of numbered tasks that any process on any machine may run (:func:`run_task`):

=========  ===========  ==============================================================================
stage      tasks        work
=========  ===========  ==============================================================================
read       one a piece  parse, check and clean the piece's documents; keep the survivors in a scratch
                        file; emit dedupe signatures into ``buckets`` hash partitions (dedupe only)
dedupe     one a bucket merge the bucket's sorted signature runs; the first copy in corpus order stays
                        (:mod:`data_pipeline.dedupe`)
write      one a piece  apply the piece's removals (or, without dedupe, read and clean the piece here),
                        then tokenize into shards (``shard``) or write C4 JSON lines (``clean``)
merge      one          the manifest (or clean report): per-task records concatenated in input order
=========  ===========  ==============================================================================

Without dedupe the job is just ``write`` and ``merge``.

Why the output is byte-identical for any number of tasks, workers, buckets or machines: every output is
named after its input file and piece (``train-FFFFF-PPPP-KKKK.tar``, ``part-FFFFF-PPPP-KKKK.json.gz``),
never after a task or worker; a document's key and train/val assignment come from its corpus-order
ordinal (:func:`ordinal`: file, piece, position); dedupe keeps the corpus-order first copy whatever the
partitioning; and the merge concatenates records in input order.

Why a killed run loses only its unfinished tasks: a task writes its outputs to ``.tmp`` names and
renames them, then writes its marker ``.work/STAGE/done/TTTTTT.json`` (holding its counts) atomically;
a rerun runs only the tasks without a marker. ``running/`` and ``failed/`` markers say who holds a task
and why it stopped (``pretrain data status``).

Bad input: strict mode stops the task at the first bad record with ``FILE:LINE``; skip mode counts by
reason, per task, summed by the merge, so ``documents_in`` = written + rejected + removed by cleaning +
filtered - extra pieces of split records, exactly as one reader counts it.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib
import json
import os
import shutil
import socket
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _encode_string  # json.dumps' own
from pathlib import Path
from typing import Any, Literal

import numpy as np

from data_pipeline.atomic import fsync_path, write_text_atomic
from data_pipeline.clean import CleanConfig, clean_document, config_to_dict, pages_removed
from data_pipeline.corpus import Document, iter_range_documents, splittable
from data_pipeline.dedupe import (
    SignatureWriter,
    apply_removals,
    document_signatures,
    read_removals,
    resolve_bucket,
)
from data_pipeline.manifest import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    file_sha256,
    tool_description,
)
from data_pipeline.shard_writer import TarShardWriter, npy_header
from data_pipeline.tokenizer import Tokenizer

__all__ = [
    "STAGES",
    "WORK_DIR",
    "Job",
    "JobError",
    "Piece",
    "assign_split",
    "is_done",
    "ordinal",
    "plan_pieces",
    "run_task",
    "task_ids",
]

WORK_DIR = ".work"
JOB_NAME = "job.json"
STAGES = ("read", "dedupe", "write", "merge")
REPORT_NAME = "clean_report.json"
# Layout of the outputs; a directory made by a different layout (the single-reader one) is refused.
LAYOUT = "per-input-v3"
_SPLITS = ("train", "val")
# A document's ordinal: file << 40 | piece << 28 | position. 2^28 documents per piece, 4096 pieces per file.
_FILE_SHIFT, _PIECE_SHIFT = 40, 28
_MAX_PIECES, _MAX_DOCS = 1 << (_FILE_SHIFT - _PIECE_SHIFT), 1 << _PIECE_SHIFT
# Documents per sentencepiece call: measured on 2 cores, a call of 10,000 documents cost 1.3x the CPU
# of 40 calls of 256 (its result lists outgrow the caches), and a shard's ids are never all held.
ENCODE_BATCH = 256


class JobError(RuntimeError):
    """The job cannot proceed (bad options, or an out_dir owned by a different job)."""


def ordinal(file: int, piece: int, position: int) -> int:
    """A document's corpus-order ordinal: input file, piece of the file, position in the piece."""
    return (file << _FILE_SHIFT) | (piece << _PIECE_SHIFT) | position


def _unit_hash(seed: int, ordinal: int) -> float:
    digest = hashlib.blake2b(f"{seed}:{ordinal}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def assign_split(ordinal: int, *, seed: int, val_fraction: float) -> str:
    """``"val"`` for about ``val_fraction`` of the documents, chosen by a hash of (seed, ordinal).

    A hash instead of a running RNG keeps the choice for one document independent of every other,
    so it survives resumes and any division of the work. A non-zero fraction must yield a validation
    set even for tiny corpora, so when document 0 went to train, document 1 (the second document of
    the first input) goes to val whatever its hash says.
    """
    if val_fraction <= 0.0:
        return "train"
    if _unit_hash(seed, ordinal) < val_fraction:
        return "val"
    if ordinal == 1 and _unit_hash(seed, 0) >= val_fraction:
        return "val"
    return "train"


@dataclass(frozen=True)
class Piece:
    """One read task's input: lines of ``path`` beginning in bytes ``[start, end)`` (end None: to EOF)."""

    index: int  # position among all pieces of the job (the task number of read and write)
    file: int
    piece: int  # position among the pieces of its file
    path: str
    start: int
    end: int | None

    @property
    def tag(self) -> str:
        return f"{self.file:05d}-{self.piece:04d}"


def plan_pieces(inputs: Sequence[Path], piece_bytes: int) -> list[Piece]:
    """Cut the inputs into pieces of about ``piece_bytes`` (only uncompressed JSON lines files split)."""
    pieces: list[Piece] = []
    for f, path in enumerate(inputs):
        size = Path(path).stat().st_size
        n = max(1, -(-size // piece_bytes)) if splittable(Path(path)) else 1
        if n > _MAX_PIECES:
            raise JobError(f"{path}: {n} pieces of {piece_bytes} bytes exceed {_MAX_PIECES}; raise piece_mb")
        for j in range(n):
            start = j * piece_bytes if n > 1 else 0
            end = min((j + 1) * piece_bytes, size) if n > 1 else None
            pieces.append(Piece(len(pieces), f, j, str(path), start, end))
    return pieces


# ------------------------------------------------------------------------------------- the job
_JOB_CACHE: dict[tuple[str, int, int], Job] = {}


@dataclass
class Job:
    """What ``OUT/.work/job.json`` holds: everything a task needs, on any machine."""

    kind: Literal["shard", "clean"]
    out_dir: str
    inputs: list[dict[str, Any]]
    pieces: list[Piece]
    buckets: int
    errors: Literal["strict", "skip"]
    max_document_bytes: int | None
    oversize: Literal["split", "skip"]
    clean: dict[str, Any] | None  # CleanConfig fields; language_filter as "module:qualname"
    piece_mb: float
    tokenizer: str | None = None
    dtype: str | None = None
    val_fraction: float = 0.0
    shard_size_mb: float = 64.0
    seed: int = 0
    min_tokens: int = 1
    docs_per_file: int = 100_000
    started: float = 0.0

    # ---- persistence
    @property
    def work(self) -> Path:
        return Path(self.out_dir) / WORK_DIR

    def save(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        data = dataclasses.asdict(self)
        write_text_atomic(self.work / JOB_NAME, json.dumps(data, indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, out_dir: str | Path) -> Job:
        """The job of ``out_dir`` (parsed once per process while the file is unchanged)."""
        path = Path(out_dir) / WORK_DIR / JOB_NAME
        try:
            stat = path.stat()
        except FileNotFoundError:
            stat = None
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size) if stat else None
        if key is not None and key in _JOB_CACHE:
            return dataclasses.replace(_JOB_CACHE[key])
        job = cls._parse(out_dir, path)
        _JOB_CACHE.clear()
        if key is not None:
            _JOB_CACHE[key] = job
        return dataclasses.replace(job)

    @classmethod
    def _parse(cls, out_dir: str | Path, path: Path) -> Job:
        if not path.is_file():
            raise JobError(
                f"{path}: no job here (start it with `pretrain data shard` or `pretrain data clean`)"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            data["pieces"] = [Piece(**p) for p in data["pieces"]]
            # Where the job file is now, not where it was written: a directory may be moved or copied.
            data["out_dir"] = str(Path(out_dir).resolve())
            return cls(**data)
        except (json.JSONDecodeError, TypeError, KeyError) as exc:
            raise JobError(f"{path}: unreadable job description ({exc}); start in a fresh out_dir") from exc

    # ---- derived
    def clean_config(self) -> CleanConfig | None:
        if self.clean is None:
            return None
        fields = dict(self.clean)
        lang = fields.pop("language_filter", None)
        if lang is not None:
            module, _, name = lang.partition(":")
            obj: Any = importlib.import_module(module)
            for attr in name.split("."):
                obj = getattr(obj, attr)
            fields["language_filter"] = obj
        return CleanConfig(**fields)

    @property
    def dedupe(self) -> bool:
        return self.clean is not None and bool(self.clean["dedupe_documents"] or self.clean["dedupe_spans"])

    def stages(self) -> list[tuple[str, int]]:
        """(stage, number of tasks) in the order they run."""
        n = len(self.pieces)
        if self.dedupe:
            return [("read", n), ("dedupe", self.buckets), ("write", n), ("merge", 1)]
        return [("write", n), ("merge", 1)]


def clean_fields(cfg: CleanConfig) -> dict[str, Any]:
    """CleanConfig as JSON for the job file (the language filter by import path)."""
    out = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    lang = cfg.language_filter
    out["language_filter"] = None if lang is None else f"{lang.__module__}:{lang.__qualname__}"
    return out


def fingerprint_options(job: Job, cfg: CleanConfig | None) -> dict[str, Any]:
    """The options that decide the output (recorded in the manifest; a rerun must match them)."""
    options: dict[str, Any] = {"strict": job.errors == "strict", "layout": LAYOUT, "piece_mb": job.piece_mb}
    if job.kind == "shard":
        options |= {
            "val_fraction": job.val_fraction,
            "shard_size_mb": job.shard_size_mb,
            "seed": job.seed,
            "min_tokens": job.min_tokens,
        }
    else:
        options["docs_per_file"] = job.docs_per_file
    if cfg is not None:
        options["clean"] = config_to_dict(cfg)
    if job.max_document_bytes is not None:
        options["max_document_bytes"] = job.max_document_bytes
        options["oversize"] = job.oversize
    return options


# ------------------------------------------------------------------------------------ markers
def _marker(job_or_dir: Job | Path, stage: str, state: str, task: int) -> Path:
    work = job_or_dir.work if isinstance(job_or_dir, Job) else Path(job_or_dir) / WORK_DIR
    return work / stage / state / f"{task:06d}.json"


def is_done(out_dir: Path, stage: str, task: int) -> bool:
    return _marker(Path(out_dir), stage, "done", task).is_file()


def task_ids(job: Job, stage: str, *, pending_only: bool = True) -> list[int]:
    n = dict(job.stages())[stage]
    return [t for t in range(n) if not (pending_only and is_done(Path(job.out_dir), stage, t))]


def _done_record(job: Job, stage: str, task: int) -> dict[str, Any]:
    path = _marker(job, stage, "done", task)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise JobError(f"{path}: {stage} task {task} has not finished; run the job again") from exc


def run_task(out_dir: str | Path, stage: str, task: int) -> dict[str, Any]:
    """Run one task of a stage (a no-op returning its record if it is already done)."""
    job = Job.load(out_dir)
    stages = dict(job.stages())
    if stage not in stages:
        raise JobError(f"stage {stage!r} is not part of this job (stages: {', '.join(stages)})")
    if not 0 <= task < stages[stage]:
        raise JobError(f"task {task} of stage {stage!r} does not exist (0..{stages[stage] - 1})")
    done = _marker(job, stage, "done", task)
    if done.is_file():
        return _done_record(job, stage, task)
    running, failed = _marker(job, stage, "running", task), _marker(job, stage, "failed", task)
    running.parent.mkdir(parents=True, exist_ok=True)
    done.parent.mkdir(parents=True, exist_ok=True)
    where = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
    slurm = {
        k: os.environ[k]
        for k in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")
        if k in os.environ
    }
    write_text_atomic(running, json.dumps(where | slurm) + "\n", durable=False)  # advisory: who runs it
    try:
        started = time.process_time()
        record = _TASKS[stage](job, task)
        record["cpu_s"] = round(time.process_time() - started, 3)
    except BaseException as exc:
        failed.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(
            failed, json.dumps(where | slurm | {"error": f"{type(exc).__name__}: {exc}"}) + "\n"
        )
        running.unlink(missing_ok=True)
        raise
    write_text_atomic(done, json.dumps(record, sort_keys=True) + "\n")
    failed.unlink(missing_ok=True)
    running.unlink(missing_ok=True)
    return record


# --------------------------------------------------------------------------------- documents
def _piece_documents(job: Job, piece: Piece, rejected: Counter, hashes: dict | None) -> Iterator[Document]:
    return iter_range_documents(
        Path(piece.path),
        piece.start,
        piece.end,
        strict=job.errors == "strict",
        counts=rejected,
        max_document_bytes=job.max_document_bytes,
        oversize=job.oversize,
        hashes=hashes,
    )


class _Reading:
    """Reads a piece and keeps the counts every read makes: records, rejections, split pieces, hash."""

    def __init__(self, job: Job, piece: Piece) -> None:
        self.job, self.piece = job, piece
        self.rejected: Counter = Counter()
        self.hashes: dict[str, str] | None = {} if piece.start == 0 else None
        self.records = self.documents_read = self.split_records = self.split_pieces = 0

    def __iter__(self) -> Iterator[tuple[int, Document]]:
        for position, doc in enumerate(_piece_documents(self.job, self.piece, self.rejected, self.hashes)):
            if position >= _MAX_DOCS:
                raise JobError(f"{self.piece.path}: over {_MAX_DOCS} documents in one piece; lower piece_mb")
            self.documents_read += 1
            if doc.part == 0:
                self.records += 1
            else:
                self.split_pieces += 1
                self.split_records += doc.part == 1
            yield position, doc

    def record(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "documents_read": self.documents_read,
            "split_records": self.split_records,
            "split_pieces": self.split_pieces,
            "rejected": dict(self.rejected),
            "sha256": None if self.hashes is None else self.hashes.get(self.piece.path),
        }


def _scratch(job: Job, piece: Piece) -> Path:
    return job.work / "read" / "docs" / f"{piece.index:06d}.jsonl"


def _read_task(job: Job, task: int) -> dict[str, Any]:
    piece = job.pieces[task]
    cfg = job.clean_config()
    assert cfg is not None  # the read stage exists only with cleaning + dedupe
    reading = _Reading(job, piece)
    cleaning: Counter = Counter()
    sigs = SignatureWriter(job.work / "sig", piece.index, job.buckets)
    path = _scratch(job, piece)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    kept = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for position, doc in reading:
            text = clean_document(doc.text, cfg, cleaning)
            if text is None:
                continue
            unit = ordinal(piece.file, piece.piece, position)
            f.write(
                json.dumps([position, text, doc.url, doc.timestamp, doc.line, doc.part], ensure_ascii=False)
            )
            f.write("\n")
            sigs.add(unit, document_signatures(text, documents=cfg.dedupe_documents, span=cfg.dedupe_spans))
            kept += 1
    sigs.flush()
    os.replace(tmp, path)
    return reading.record() | {"cleaning": dict(cleaning), "kept": kept}


def _dedupe_task(job: Job, task: int) -> dict[str, Any]:
    runs = sorted((job.work / "sig" / f"b{task:05d}").glob("*.sig"))
    return resolve_bucket(runs, job.work / "dedupe" / "removals", task)


def _fresh_documents(job: Job, reading: _Reading, cleaning: Counter) -> Iterator[tuple[int, Document]]:
    """Without dedupe: the piece's documents read and (if asked) cleaned here, with their positions."""
    cfg = job.clean_config()
    for position, doc in reading:
        if cfg is None:
            yield position, doc
            continue
        text = clean_document(doc.text, cfg, cleaning)
        if text is not None:
            yield position, doc._replace(text=text)


def _deduped_documents(job: Job, piece: Piece, cleaning: Counter) -> Iterator[tuple[int, Document]]:
    """With dedupe: the read stage's survivors of the piece, with its removals applied."""
    cfg = job.clean_config()
    assert cfg is not None
    lo = ordinal(piece.file, piece.piece, 0)
    runs = sorted((job.work / "dedupe" / "removals").glob("*.rm"))
    removals = read_removals(runs, lo, lo + _MAX_DOCS)
    with open(_scratch(job, piece), encoding="utf-8") as f:
        for line in f:
            position, text, url, timestamp, lineno, part = json.loads(line)
            out = apply_removals(
                text,
                removals.get(lo + position, ()),
                span=cfg.dedupe_spans,
                min_sentences=cfg.min_sentences,
                counts=cleaning,
            )
            if out is not None:
                yield position, Document(out, url, timestamp, piece.path, lineno, part)


def _write_task(job: Job, task: int) -> dict[str, Any]:
    piece = job.pieces[task]
    cleaning: Counter = Counter()
    reading = None if job.dedupe else _Reading(job, piece)
    if reading is None:
        docs = _deduped_documents(job, piece, cleaning)
    else:
        docs = _fresh_documents(job, reading, cleaning)
    outputs = _write_shards(job, piece, docs) if job.kind == "shard" else _write_parts(job, piece, docs)
    record: dict[str, Any] = {"outputs": outputs, "cleaning": dict(cleaning)}
    return record | (reading.record() if reading is not None else {})


# ----------------------------------------------------------------------------- shard outputs
_WORKER_TOKENIZERS: dict[str, Tokenizer] = {}


def _tokenizer(path: str) -> Tokenizer:
    tok = _WORKER_TOKENIZERS.get(path)
    if tok is None:
        tok = _WORKER_TOKENIZERS[path] = Tokenizer(path)
    return tok


def _atomic_binary(path: Path) -> Any:
    return open(path.with_name(path.name + ".tmp"), "wb", buffering=1 << 20)


def _seal(path: Path, f: Any) -> dict[str, Any]:
    """fsync and rename ``path.tmp`` into place; return its name, bytes and sha256."""
    f.flush()
    os.fsync(f.fileno())
    f.close()
    tmp = path.with_name(path.name + ".tmp")
    digest = file_sha256(tmp)
    size = tmp.stat().st_size
    os.replace(tmp, path)
    return {"name": path.name, "bytes": size, "sha256": digest}


def _json_str(value: str | None) -> str:
    return "null" if value is None else _encode_string(value)


def _meta_json(doc: Document, source: str) -> bytes:
    """``json.dumps({"url", "timestamp", "source", "line"[, "part"]})``, byte for byte, built without
    a dict and the generic encoder (it ran once per document)."""
    part = f', "part": {doc.part}' if doc.part else ""
    return (
        f'{{"url": {_json_str(doc.url)}, "timestamp": {_json_str(doc.timestamp)}, '
        f'"source": {source}, "line": {doc.line}{part}}}'
    ).encode("ascii")


class _ShardStream:
    """One split's shards of one piece, written as documents arrive: ids are encoded ENCODE_BATCH
    documents at a time and appended to the open shard, which is sealed once it holds shard_size_mb of
    text. A task holds at most ENCODE_BATCH documents per split, whatever the shard size."""

    def __init__(self, job: Job, piece: Piece, split: str) -> None:
        assert job.tokenizer is not None and job.dtype is not None
        self.job, self.piece, self.split = job, piece, split
        self.tok = _tokenizer(job.tokenizer)
        self.shard_bytes = int(job.shard_size_mb * 1_000_000)
        self.dtype = np.dtype(job.dtype)
        self.descr = self.dtype.str
        self.source = _json_str(piece.path)
        self.shards: list[dict[str, Any]] = []
        self.pending: list[tuple[int, Document]] = []
        self.f: Any = None

    def add(self, unit: int, doc: Document) -> None:
        if self.f is None:
            self.path = Path(self.job.out_dir) / f"{self.split}-{self.piece.tag}-{len(self.shards):04d}.tar"
            self.f = _atomic_binary(self.path)
            self.writer = TarShardWriter(self.f)
            self.text_bytes = self.documents = self.tokens = self.too_short = 0
        self.pending.append((unit, doc))
        text = doc.text
        self.text_bytes += len(text) if text.isascii() else len(text.encode("utf-8"))
        if len(self.pending) == ENCODE_BATCH:
            self._encode()
        if self.text_bytes >= self.shard_bytes:
            self.seal()

    def _encode(self) -> None:
        # The per-document loop of sharding: everything it can look up once is looked up here.
        texts = [d.text for _, d in self.pending]
        prefix, mask, dtype, descr = f"{self.piece.tag}-", _MAX_DOCS - 1, self.dtype, self.descr
        min_tokens, source, add_sample = self.job.min_tokens, self.source, self.writer.add_sample
        documents = tokens = 0
        for (unit, doc), ids in zip(self.pending, self.tok.encode_batch(texts), strict=True):
            n = len(ids)
            if n < min_tokens:
                self.too_short += 1
                continue
            add_sample(
                f"{prefix}{unit & mask:09d}",
                [
                    (".meta.json", _meta_json(doc, source)),
                    (".tokens.npy", npy_header(descr, n) + np.asarray(ids, dtype=dtype).tobytes()),
                ],
            )
            documents += 1
            tokens += n
        self.documents += documents
        self.tokens += tokens
        self.pending = []

    def seal(self) -> None:
        if self.f is None:
            return
        self._encode()
        self.writer.close()
        counts = {"documents": self.documents, "tokens": self.tokens, "too_short": self.too_short}
        self.shards.append(_seal(self.path, self.f) | {"split": self.split} | counts)
        self.f = None


def _write_shards(job: Job, piece: Piece, docs: Iterator[tuple[int, Document]]) -> list[dict[str, Any]]:
    """Tokenize the piece's documents into ``SPLIT-FFFFF-PPPP-KKKK.tar`` shards of about shard_size_mb."""
    streams = {split: _ShardStream(job, piece, split) for split in _SPLITS}
    for position, doc in docs:
        unit = ordinal(piece.file, piece.piece, position)
        streams[assign_split(unit, seed=job.seed, val_fraction=job.val_fraction)].add(unit, doc)
    for stream in streams.values():
        stream.seal()
    fsync_path(Path(job.out_dir))
    return [s for stream in streams.values() for s in stream.shards]


def _write_parts(job: Job, piece: Piece, docs: Iterator[tuple[int, Document]]) -> list[dict[str, Any]]:
    """Cleaned documents as C4 JSON lines, ``part-FFFFF-PPPP-KKKK.json.gz`` of docs_per_file each; gzip
    headers carry no name or time, so the bytes depend only on the documents."""
    out_dir = Path(job.out_dir)
    parts: list[dict[str, Any]] = []
    current: dict[str, Any] = {}

    def close() -> None:
        current["gz"].close()
        parts.append(_seal(current["path"], current["raw"]) | {"documents": current["n"]})
        current.clear()

    for _, doc in docs:
        if not current:
            path = out_dir / f"part-{piece.tag}-{len(parts):04d}.json.gz"
            raw = _atomic_binary(path)
            gz = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6)
            current.update(path=path, raw=raw, gz=gz, n=0)
        record = {"text": doc.text, "url": doc.url, "timestamp": doc.timestamp}
        current["gz"].write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        current["n"] += 1
        if current["n"] == job.docs_per_file:
            close()
    if current:
        close()
    return parts


# ------------------------------------------------------------------------------------- merge
def _merge_task(job: Job, task: int) -> dict[str, Any]:
    """Concatenate the tasks' records in input order into the manifest (shard) or report (clean)."""
    n = len(job.pieces)
    writes = [_done_record(job, "write", t) for t in range(n)]
    reads = [_done_record(job, "read", t) for t in range(n)] if job.dedupe else writes
    buckets = [_done_record(job, "dedupe", b) for b in range(job.buckets)] if job.dedupe else []
    rejected: Counter = Counter()
    cleaning: Counter = Counter()
    for r in reads:
        rejected.update(r["rejected"])
        cleaning.update(r.get("cleaning", {}))
    if job.dedupe:
        for w in writes:
            cleaning.update(w["cleaning"])
    sha = {job.pieces[t].path: r["sha256"] for t, r in enumerate(reads) if r["sha256"] is not None}
    records = sum(r["records"] for r in reads)
    split_records = sum(r["split_records"] for r in reads)
    split_pieces = sum(r["split_pieces"] for r in reads)
    cfg = job.clean_config()
    options = fingerprint_options(job, cfg)
    inputs = [entry | {"sha256": sha.get(entry["path"])} for entry in job.inputs]
    outputs = [o for w in writes for o in w["outputs"]]
    hashes = sum(b["hashes"] for b in buckets)
    if job.kind == "shard":
        assert job.tokenizer is not None
        result = _manifest(job, options, inputs, outputs, rejected, cleaning, cfg, hashes)
        result["documents_in"] = records + sum(rejected.values())
        result["documents_read"] = sum(r["documents_read"] for r in reads)
        if split_pieces:
            result["oversize_split"] = {"records": split_records, "extra_pieces": split_pieces}
        write_text_atomic(Path(job.out_dir) / MANIFEST_NAME, json.dumps(_ordered(result), indent=2) + "\n")
    else:
        assert cfg is not None
        result = {
            "tool": tool_description(),
            "inputs": inputs,
            "config": config_to_dict(cfg),
            "errors": job.errors,
            "max_document_bytes": job.max_document_bytes,
            "oversize": job.oversize,
            "documents_in": records + sum(rejected.values()),
            "documents_written": sum(o["documents"] for o in outputs),
            "rejected": {k: v for k, v in sorted(rejected.items()) if v},
            "cleaning": {k: v for k, v in sorted(cleaning.items()) if v},
            "cleaning_documents_removed": pages_removed(cleaning),
            "oversize_split": {"records": split_records, "extra_pieces": split_pieces},
            "dedupe_hashes": hashes,
            "outputs": [
                {"path": o["name"], "documents": o["documents"], "bytes": o["bytes"], "sha256": o["sha256"]}
                for o in outputs
            ],
            "seconds": round(time.time() - job.started, 3),
            "output_sha256": hashlib.sha256("".join(o["sha256"] for o in outputs).encode()).hexdigest(),
        }
        write_text_atomic(Path(job.out_dir) / REPORT_NAME, json.dumps(result, indent=2) + "\n")
    # The scratch files are spent; the markers (small) stay, so a rerun sees a finished job.
    for name in ("read/docs", "sig", "dedupe/removals"):
        shutil.rmtree(job.work / name, ignore_errors=True)
    return {"written": result["documents_written"]}


def _manifest(
    job: Job,
    options: dict[str, Any],
    inputs: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
    rejected: Counter,
    cleaning: Counter,
    cfg: CleanConfig | None,
    hashes: int,
) -> dict[str, Any]:
    assert job.tokenizer is not None
    shards = sorted(outputs, key=lambda s: (_SPLITS.index(s["split"]), s["name"]))
    too_short = sum(s["too_short"] for s in shards)
    totals = {
        split: {
            "shards": sum(1 for s in shards if s["split"] == split),
            "documents": sum(s["documents"] for s in shards if s["split"] == split),
            "tokens": sum(s["tokens"] for s in shards if s["split"] == split),
        }
        for split in _SPLITS
    }
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "tool": tool_description(),
        "tokenizer": _tokenizer(job.tokenizer).describe(),
        "dtype": job.dtype,
        "options": options,
        "inputs": inputs,
        "shards": [
            {k: s[k] for k in ("name", "split", "documents", "tokens", "bytes", "sha256")} for s in shards
        ],
        "totals": totals,
        "documents_written": totals["train"]["documents"] + totals["val"]["documents"],
        "rejected": {k: v for k, v in sorted(rejected.items()) if v},
        "filtered": {"too_short": too_short} if too_short else {},
    }
    if cfg is not None:
        manifest["cleaning"] = {k: v for k, v in sorted(cleaning.items()) if v}
        manifest["cleaning_documents_removed"] = pages_removed(cleaning)
        manifest["dedupe_hashes"] = hashes
    return manifest


_KEY_ORDER = (
    "format", "version", "tool", "tokenizer", "dtype", "options", "inputs", "shards", "totals",
    "documents_in", "documents_read", "documents_written", "rejected", "filtered",
)  # fmt: skip


def _ordered(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest's keys in their documented order (counts first, extras after)."""
    head = {k: manifest[k] for k in _KEY_ORDER if k in manifest}
    return head | {k: v for k, v in manifest.items() if k not in head}


_TASKS = {"read": _read_task, "dedupe": _dedupe_task, "write": _write_task, "merge": _merge_task}
