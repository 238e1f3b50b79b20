"""Tokenize a corpus into webdataset tar shards plus a manifest, in parallel and resumably.

Layout of ``out_dir``::

    train-000000.tar, train-000001.tar, ..., val-000000.tar, ...
    manifest.json          written last; its presence means the run finished
    .shard_options.json    options, inputs and tokenizer hash of the run that owns this directory
    .progress.jsonl        one JSON line per finished shard (what a rerun skips)

One sample per document: ``__key__`` is the document's ordinal in the corpus stream (10 digits),
``tokens.npy`` its token ids without ``</s>`` (the loader adds the separator), ``meta.json`` its url,
timestamp, source file and line. Shards are objective-agnostic: GPT, BERT and T5 all read them.

Why it is built this way:

* The main process alone reads the corpus, so document ordinals, the train/val assignment and the
  cut into shards depend only on the input, never on the worker count. Workers only tokenize and
  write whole shards, and tar headers are pinned (mtime 0, fixed user, group and mode), so the shard
  files are byte-identical for any ``workers``.
* Documents cross to workers through ``multiprocessing`` queues (pickled in memory, between our own
  processes); nothing pickled is ever written to disk.
* A shard is written to ``NAME.tar.tmp``, fsynced, then renamed, and only then recorded in
  ``.progress.jsonl``; so a kill at any moment leaves at worst a stray ``.tmp`` and a rerun redoes
  only the unrecorded shards. A rerun still streams the whole corpus (ordinals must line up) but
  skips tokenizing and writing the recorded shards.
* Optional C4 cleaning and dedupe (``clean=CleanConfig()``) run in the main process before ordinals
  are assigned: dedupe keeps the first copy in stream order, which needs one sequential owner of the
  seen-hash set, and cleaning there keeps the output independent of the worker count.
* Memory is bounded whatever the corpus size: at most ``2 * workers + 2`` shards' documents are in
  flight (one buffer per split in the main process plus the queued jobs), and dedupe remembers 8-byte
  hashes only (:mod:`data_pipeline.dedupe`).

Every input record is accounted for in the manifest: ``documents_in`` (records read) equals
``documents_written`` + the ``rejected`` counts (malformed input, by reason) + the documents removed
by cleaning (``page_*`` counts in ``cleaning``) + ``filtered`` (``too_short``) - the extra pieces of
records split for size (``oversize_split``).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import multiprocessing
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from data_pipeline.atomic import fsync_path, write_text_atomic
from data_pipeline.clean import CleanConfig, clean_document, config_to_dict, pages_removed
from data_pipeline.corpus import iter_documents
from data_pipeline.dedupe import Deduper
from data_pipeline.manifest import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    file_sha256,
    tool_description,
)
from data_pipeline.tokenizer import Tokenizer

__all__ = ["ShardingError", "assign_split", "shard_corpus"]

OPTIONS_NAME = ".shard_options.json"
PROGRESS_NAME = ".progress.jsonl"
_SPLITS = ("train", "val")


class ShardingError(RuntimeError):
    """The sharding run cannot proceed (bad options, or an out_dir owned by a different run)."""


def _unit_hash(seed: int, ordinal: int) -> float:
    digest = hashlib.blake2b(f"{seed}:{ordinal}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def assign_split(ordinal: int, *, seed: int, val_fraction: float) -> str:
    """``"val"`` for about ``val_fraction`` of the documents, chosen by a hash of (seed, ordinal).

    A hash instead of a running RNG keeps the choice for one document independent of every other,
    so it survives resumes and any reordering of work. A non-zero fraction must yield a validation
    set even for tiny corpora, so when document 0 went to train, document 1 goes to val whatever its
    hash says: one decision made while streaming, without knowing the corpus size.
    """
    if val_fraction <= 0.0:
        return "train"
    if _unit_hash(seed, ordinal) < val_fraction:
        return "val"
    if ordinal == 1 and _unit_hash(seed, 0) >= val_fraction:
        return "val"
    return "train"


# ---------------------------------------------------------------- worker side
# One tokenizer per process, loaded by the pool initializer (or lazily in-process for workers=1).
_WORKER_TOKENIZERS: dict[str, Tokenizer] = {}


def _worker_tokenizer(path: str) -> Tokenizer:
    tok = _WORKER_TOKENIZERS.get(path)
    if tok is None:
        tok = _WORKER_TOKENIZERS[path] = Tokenizer(path)
    return tok


def _init_worker(tokenizer_path: str) -> None:
    _worker_tokenizer(tokenizer_path)


_BLOCK = 512
_RECORD = 20 * _BLOCK  # tarfile pads an archive to a multiple of its 20-block record


def _octal(value: int, width: int) -> bytes:
    # tarfile's format for numeric fields: zero-padded octal digits then one NUL.
    return b"%0*o\0" % (width - 1, value)


def _tar_header(name: str, size: int) -> bytes:
    """A ustar header with the pinned fields (mode 0444, uid/gid 0, user/group "tandem", mtime 0).

    Byte-identical to ``tarfile.TarInfo.tobuf(tarfile.USTAR_FORMAT)`` for these fields (a unit test
    checks it), but ~10x cheaper: with sentencepiece encoding a short document in ~50 us, building
    two headers per document through tarfile (and webdataset's encoder and copies) cost more than
    the tokenizing itself.
    """
    raw = name.encode("utf-8")
    if len(raw) > 100:
        raise ShardingError(f"tar member name {name!r} is longer than 100 bytes")
    header = b"".join(
        [
            raw.ljust(100, b"\0"),
            _octal(0o444, 8),
            _octal(0, 8),  # uid
            _octal(0, 8),  # gid
            _octal(size, 12),
            _octal(0, 12),  # mtime
            b" " * 8,  # checksum placeholder
            b"0",  # regular file
            b"\0" * 100,  # linkname
            b"ustar\x0000",
            b"tandem".ljust(32, b"\0"),
            b"tandem".ljust(32, b"\0"),
            b"\0" * 16,  # devmajor, devminor: empty for regular files, as tarfile writes them
            b"\0" * 155,  # prefix
            b"\0" * 12,
        ]
    )
    checksum = sum(header)
    return header[:148] + b"%06o\0 " % checksum + header[156:]


@functools.lru_cache(maxsize=4096)
def _npy_header(descr: str, length: int) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": (length,)})
    return buf.getvalue()


class _TarShardWriter:
    """Writes tar members straight to a file: the same bytes webdataset's TarWriter wrote with
    pinned metadata (members of a sample in sorted suffix order), without its per-member overhead."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.offset = 0

    def add(self, name: str, data: bytes) -> None:
        pad = -len(data) % _BLOCK
        self.f.write(_tar_header(name, len(data)))
        self.f.write(data)
        if pad:
            self.f.write(b"\0" * pad)
        self.offset += _BLOCK + len(data) + pad

    def close(self) -> None:
        end = self.offset + 2 * _BLOCK
        self.f.write(b"\0" * (2 * _BLOCK + (-end % _RECORD)))


def _write_shard(job: dict[str, Any]) -> dict[str, Any]:
    """Tokenize one shard's documents and write ``out_dir/NAME`` atomically; return its stats."""
    tok = _worker_tokenizer(job["tokenizer_path"])
    out_dir = Path(job["out_dir"])
    name = job["name"]
    dtype = np.dtype(job["dtype"])
    docs = job["documents"]  # [(ordinal, text, meta)]
    ids_per_doc = tok.encode_batch([text for _, text, _ in docs])
    final = out_dir / name
    tmp = out_dir / (name + ".tmp")
    documents = tokens = too_short = 0
    descr = dtype.str
    with open(tmp, "wb", buffering=1 << 20) as f:
        # Pinned header fields make the tar a function of its contents only.
        writer = _TarShardWriter(f)
        for (ordinal, _, meta), ids in zip(docs, ids_per_doc, strict=True):
            if len(ids) < job["min_tokens"]:
                too_short += 1
                continue
            key = f"{ordinal:010d}"
            writer.add(f"{key}.meta.json", json.dumps(meta).encode("utf-8"))
            writer.add(
                f"{key}.tokens.npy", _npy_header(descr, len(ids)) + np.asarray(ids, dtype=dtype).tobytes()
            )
            documents += 1
            tokens += len(ids)
        writer.close()
        f.flush()
        os.fsync(f.fileno())
    digest = file_sha256(tmp)
    size = tmp.stat().st_size
    os.replace(tmp, final)
    fsync_path(out_dir)
    return {
        "name": name,
        "split": job["split"],
        "index": job["index"],
        "documents": documents,
        "tokens": tokens,
        "bytes": size,
        "sha256": digest,
        "skipped_too_short": too_short,
        "input_documents": len(docs),
        "first_ordinal": docs[0][0],
    }


# ---------------------------------------------------------------- main side
def _validate(
    inputs: Sequence[Path],
    workers: int,
    val_fraction: float,
    shard_size_mb: float,
    min_tokens: int,
    errors: str,
    max_document_bytes: int | None,
    oversize: str,
) -> None:
    problems = []
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
    if not 0.0 <= val_fraction < 1.0:
        problems.append(f"val_fraction={val_fraction} must be in [0, 1)")
    if not shard_size_mb > 0:
        problems.append(f"shard_size_mb={shard_size_mb} must be > 0")
    if min_tokens < 0:
        problems.append(f"min_tokens={min_tokens} must be >= 0")
    if problems:
        raise ShardingError("cannot shard: " + "; ".join(problems))


def _claim_out_dir(out_dir: Path, fingerprint: dict[str, Any]) -> None:
    """Record this run's fingerprint, or refuse if the directory belongs to a different run."""
    path = out_dir / OPTIONS_NAME
    if path.is_file():
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ShardingError(f"{path}: unreadable ({exc}); shard into a fresh out_dir") from exc
        if recorded != fingerprint:
            changed = sorted(
                k for k in fingerprint.keys() | recorded.keys() if fingerprint.get(k) != recorded.get(k)
            )
            details = "; ".join(f"{k}: was {recorded.get(k)!r}, now {fingerprint.get(k)!r}" for k in changed)
            raise ShardingError(
                f"{out_dir} holds shards made with different settings ({details}). Resuming would mix "
                "them; shard into a fresh out_dir (or delete this one)."
            )
        return
    if (out_dir / PROGRESS_NAME).exists() or (out_dir / MANIFEST_NAME).exists():
        raise ShardingError(
            f"{out_dir} holds shards of unknown provenance (no {OPTIONS_NAME}); use a fresh out_dir"
        )
    write_text_atomic(path, json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")


def _load_progress(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Finished shards by name. A torn last line (killed mid-append) is ignored, since its shard will
    simply be redone; a bad line elsewhere means someone edited the file, which is an error."""
    path = out_dir / PROGRESS_NAME
    if not path.is_file():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    done: dict[str, dict[str, Any]] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            if lineno == len(lines):
                break
            raise ShardingError(
                f"{path}:{lineno}: not valid JSON ({exc}); shard into a fresh out_dir"
            ) from exc
        done[entry["name"]] = entry
    return done


class _ProgressLog:
    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, stats: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(stats, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())


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
) -> dict:
    """Tokenize ``inputs`` into ``out_dir`` and return the manifest (also written to manifest.json).

    Documents are cut into shards of about ``shard_size_mb`` MB of raw UTF-8 text per split; about
    ``val_fraction`` of them go to the validation split (see :func:`assign_split`). Documents with
    fewer than ``min_tokens`` tokens are left out and counted as ``too_short``. ``errors="strict"``
    stops at the first malformed record with its file and line; ``"skip"`` skips and counts it by
    reason (``strict`` is the older spelling: ``strict=False`` means ``errors="skip"``). ``clean``
    applies C4 cleaning and dedupe (off by default: sharding keeps every valid document unless
    asked). Documents over ``max_document_bytes`` are split or skipped (``oversize``). Rerunning with
    the same inputs, tokenizer and options resumes; other settings are refused. ``workers`` does not
    change the output and may differ between a run and its resume.
    """
    if strict is not None:
        errors = "strict" if strict else "skip"
    inputs = [Path(p) for p in inputs]
    _validate(inputs, workers, val_fraction, shard_size_mb, min_tokens, errors, max_document_bytes, oversize)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(tokenizer_path)
    dtype = "uint16" if tok.vocab_size <= 65536 else "uint32"
    options: dict[str, Any] = {
        "val_fraction": val_fraction,
        "shard_size_mb": shard_size_mb,
        "seed": seed,
        "strict": errors == "strict",
        "min_tokens": min_tokens,
    }
    # New options enter the fingerprint only when used, so directories sharded before they existed
    # still resume.
    if clean is not None:
        options["clean"] = config_to_dict(clean)
    if max_document_bytes is not None:
        options["max_document_bytes"] = max_document_bytes
        options["oversize"] = oversize
    input_list: list[dict[str, Any]] = [{"path": str(p), "bytes": p.stat().st_size} for p in inputs]
    _claim_out_dir(out_dir, options | {"inputs": input_list, "tokenizer_sha256": tok.sha256, "dtype": dtype})
    done = _load_progress(out_dir)
    progress = _ProgressLog(out_dir / PROGRESS_NAME)

    shard_bytes = int(shard_size_mb * 1_000_000)
    buffers: dict[str, list[tuple[int, str, dict]]] = {s: [] for s in _SPLITS}
    buffered_bytes = dict.fromkeys(_SPLITS, 0)
    next_index = dict.fromkeys(_SPLITS, 0)
    results: dict[str, dict[str, Any]] = {}
    pending: deque = deque()
    rejected: Counter = Counter()
    cleaning: Counter = Counter()
    hashes: dict[str, str] = {}
    deduper = (
        Deduper(documents=clean.dedupe_documents, span=clean.dedupe_spans, min_sentences=clean.min_sentences)
        if clean is not None
        else None
    )
    documents_read = records = split_records = split_pieces = 0
    ordinal = 0
    bytes_read = 0

    pool = None
    if workers > 1:
        # spawn, not fork: the parent may hold threads (sentencepiece, tqdm, torch) that fork would copy.
        ctx = multiprocessing.get_context("spawn")
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=(str(tokenizer_path),))

    bar = tqdm(desc="sharding", unit="doc", file=sys.stderr, disable=None, mininterval=1.0)
    started = time.monotonic()
    tokens_done = 0

    def finish(stats: dict[str, Any]) -> None:
        nonlocal tokens_done
        progress.append(stats)
        results[stats["name"]] = stats
        tokens_done += stats["tokens"]

    def drain(limit: int) -> None:
        while len(pending) > limit:
            finish(pending.popleft().get())

    def dispatch(split: str) -> None:
        docs = buffers[split]
        index = next_index[split]
        next_index[split] += 1
        buffers[split], buffered_bytes[split] = [], 0
        name = f"{split}-{index:06d}.tar"
        old = done.get(name)
        if (
            old is not None
            and (out_dir / name).is_file()
            and (out_dir / name).stat().st_size == old["bytes"]
            and old["input_documents"] == len(docs)
            and old["first_ordinal"] == docs[0][0]
        ):
            results[name] = old
            return
        job = {
            "name": name,
            "split": split,
            "index": index,
            "documents": docs,
            "tokenizer_path": str(tokenizer_path),
            "out_dir": str(out_dir),
            "dtype": dtype,
            "min_tokens": min_tokens,
        }
        if pool is None:
            finish(_write_shard(job))
        else:
            pending.append(pool.apply_async(_write_shard, (job,)))
            drain(2 * workers)  # bound the documents held in flight

    try:
        stream = iter_documents(
            inputs,
            strict=errors == "strict",
            counts=rejected,
            max_document_bytes=max_document_bytes,
            oversize=oversize,
            hashes=hashes,
        )
        for doc in stream:
            documents_read += 1
            if doc.part == 0:
                records += 1
            else:
                split_pieces += 1
                split_records += doc.part == 1
            text = doc.text
            bytes_read += len(doc.text)  # characters: close enough to bytes for a rate display
            bar.update()
            if not bar.disable and documents_read % 1000 == 0:
                elapsed = max(time.monotonic() - started, 1e-9)
                bar.set_postfix_str(
                    f"{tokens_done} tokens, {bytes_read / 1e6 / elapsed:.1f} MB/s", refresh=False
                )
            if clean is not None and deduper is not None:
                cleaned = clean_document(doc.text, clean, cleaning)
                if cleaned is not None:
                    cleaned = deduper.process(cleaned, cleaning)
                if cleaned is None:
                    continue
                text = cleaned
            split = assign_split(ordinal, seed=seed, val_fraction=val_fraction)
            meta: dict[str, Any] = {
                "url": doc.url,
                "timestamp": doc.timestamp,
                "source": doc.source,
                "line": doc.line,
            }
            if doc.part:
                meta["part"] = doc.part
            buffers[split].append((ordinal, text, meta))
            ordinal += 1
            buffered_bytes[split] += len(text.encode("utf-8"))
            if buffered_bytes[split] >= shard_bytes:
                dispatch(split)
        for split in _SPLITS:
            if buffers[split]:
                dispatch(split)
        drain(0)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()

    shards = [results[n] for n in sorted(results, key=lambda n: (_SPLITS.index(results[n]["split"]), n))]
    too_short = sum(s["skipped_too_short"] for s in shards)
    totals = {
        split: {
            "shards": sum(1 for s in shards if s["split"] == split),
            "documents": sum(s["documents"] for s in shards if s["split"] == split),
            "tokens": sum(s["tokens"] for s in shards if s["split"] == split),
        }
        for split in _SPLITS
    }
    written = totals["train"]["documents"] + totals["val"]["documents"]
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "tool": tool_description(),
        "tokenizer": tok.describe(),
        "dtype": dtype,
        "options": options,
        "inputs": [entry | {"sha256": hashes.get(entry["path"])} for entry in input_list],
        "shards": [
            {k: s[k] for k in ("name", "split", "documents", "tokens", "bytes", "sha256")} for s in shards
        ],
        "totals": totals,
        # Records read, i.e. JSON lines / text blocks, whether valid or not.
        "documents_in": records + sum(rejected.values()),
        "documents_read": documents_read,
        "documents_written": written,
        "rejected": {k: v for k, v in sorted(rejected.items()) if v},
        "filtered": {"too_short": too_short} if too_short else {},
    }
    if clean is not None:
        manifest["cleaning"] = {k: v for k, v in sorted(cleaning.items()) if v}
        manifest["cleaning_documents_removed"] = pages_removed(cleaning)
        # Dedupe's memory grows with this (~12 bytes each, data_pipeline.dedupe); the rest is flat.
        manifest["dedupe_hashes"] = len(deduper) if deduper is not None else 0
    if split_pieces:
        manifest["oversize_split"] = {"records": split_records, "extra_pieces": split_pieces}
    write_text_atomic(out_dir / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    return manifest
