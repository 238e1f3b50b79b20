"""Read and check the shard manifest, and read documents back out of shards.

``manifest.json`` (written by :mod:`data_pipeline.sharding`) is the contract between sharding and
training: the loader trusts its shard list, token counts and tokenizer hash, so this module is the
one place that reads it and the one place that can prove the shards on disk still match it.

Shards are read through webdataset's tar iterators on a local file, never through ``WebDataset``'s
node/worker splitters: the training loader assigns whole shards to data-parallel ranks and loader
workers itself (deterministically, and as part of its checkpointed state), so webdataset must neither
split them a second time nor refuse to run under ``torch.distributed``. Token arrays are ``.npy`` and
are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "ManifestError",
    "file_sha256",
    "iter_shard_documents",
    "load_manifest",
    "shard_paths",
    "tool_description",
    "unigram_entropy",
    "verify_shards",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "tandem-shards"
# Version 2 added provenance (tool, input sha256, cleaning) and renamed ``skipped`` to ``rejected``
# (malformed input) + ``filtered`` (too_short); version 1 manifests are still read, converted.
MANIFEST_VERSION = 2
_READABLE_VERSIONS = (1, 2)
SPLITS = ("train", "val")
_REQUIRED_KEYS = ("format", "version", "tokenizer", "dtype", "shards", "totals")


class ManifestError(ValueError):
    """A manifest is missing, unreadable or inconsistent; the message names the file."""


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(shards_dir: str | Path) -> dict:
    """Load ``shards_dir/manifest.json`` and check its format, version and required fields."""
    path = Path(shards_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"{path}: no shard manifest (run the sharding step first; an interrupted run leaves none)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{path}: format={manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    if manifest.get("version") not in _READABLE_VERSIONS:
        raise ManifestError(
            f"{path}: version={manifest.get('version')!r}, this code reads {_READABLE_VERSIONS}"
        )
    missing = [k for k in _REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ManifestError(f"{path}: missing field(s) {', '.join(missing)}")
    for i, shard in enumerate(manifest["shards"]):
        for key in ("name", "split", "documents", "tokens", "bytes", "sha256"):
            if key not in shard:
                raise ManifestError(f"{path}: shards[{i}] lacks {key!r}")
        if shard["split"] not in SPLITS:
            raise ManifestError(f"{path}: shards[{i}].split={shard['split']!r}, expected one of {SPLITS}")
    if "skipped" in manifest and "rejected" not in manifest:
        # Version 1 mixed malformed input and the min_tokens filter under one name.
        skipped = dict(manifest.pop("skipped"))
        too_short = skipped.pop("too_short", 0)
        manifest["rejected"] = skipped
        manifest["filtered"] = {"too_short": too_short} if too_short else {}
    return manifest


def tool_description() -> dict[str, str]:
    """Name and installed version of the tool that wrote the shards, for the manifest's provenance."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        tool_version = version("tandem")
    except PackageNotFoundError:
        tool_version = "unknown"
    return {"name": "tandem", "version": tool_version}


def shard_paths(manifest: dict, shards_dir: str | Path, split: str) -> list[Path]:
    """Paths of ``split``'s shards in manifest order (by shard index)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}")
    return [Path(shards_dir) / s["name"] for s in manifest["shards"] if s["split"] == split]


def iter_shard_documents(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(key, tokens)`` for each document of one tar shard, in stored order.

    ``tokens`` is the 1-D integer array as stored (uint16 or uint32). Reads the file sequentially
    once; only ``tokens.npy`` members are decoded (``meta.json`` is skipped).
    """
    # Imported here: webdataset imports torch (~2 s), which sharding's spawned workers never need.
    from webdataset.tariterators import group_by_keys, tar_file_expander

    path = Path(path)
    with open(path, "rb") as stream:
        files = tar_file_expander([{"url": str(path), "stream": stream}])
        for sample in group_by_keys(files):
            key = sample["__key__"]
            data = sample.get("tokens.npy")
            if data is None:
                raise ManifestError(f"{path}: document {key!r} has no tokens.npy member")
            tokens = np.load(io.BytesIO(data), allow_pickle=False)
            if tokens.ndim != 1 or tokens.dtype.kind != "u":
                raise ManifestError(
                    f"{path}: document {key!r} tokens have shape {tokens.shape} dtype {tokens.dtype}, "
                    "expected a 1-D unsigned integer array"
                )
            yield key, tokens


def verify_shards(shards_dir: str | Path, *, deep: bool = True) -> list[str]:
    """Check the shards on disk against the manifest; return the problems found (empty means ok).

    Always checks each listed shard's existence, size and sha256, and that no unlisted ``.tar`` sits
    beside them. With ``deep`` it also reads every shard back and checks document and token counts,
    dtype and token range, and that keys increase (documents keep corpus order).
    """
    shards_dir = Path(shards_dir)
    try:
        manifest = load_manifest(shards_dir)
    except ManifestError as exc:
        return [str(exc)]
    problems: list[str] = []
    dtype = np.dtype(manifest["dtype"])
    vocab_size = int(manifest["tokenizer"]["vocab_size"])
    listed = {s["name"] for s in manifest["shards"]}
    for extra in sorted(p.name for p in shards_dir.glob("*.tar") if p.name not in listed):
        problems.append(f"{extra}: shard file is not listed in {MANIFEST_NAME}")
    for shard in manifest["shards"]:
        name = shard["name"]
        path = shards_dir / name
        if not path.is_file():
            problems.append(f"{name}: listed in {MANIFEST_NAME} but missing")
            continue
        size = path.stat().st_size
        if size != shard["bytes"]:
            problems.append(f"{name}: {size} bytes on disk, manifest says {shard['bytes']}")
        digest = file_sha256(path)
        if digest != shard["sha256"]:
            problems.append(f"{name}: sha256 {digest} does not match manifest {shard['sha256']}")
        if not deep:
            continue
        documents = tokens = 0
        previous_key = ""
        try:
            for key, array in iter_shard_documents(path):
                documents += 1
                tokens += int(array.size)
                if array.dtype != dtype:
                    problems.append(f"{name}: document {key} has dtype {array.dtype}, manifest says {dtype}")
                    break
                if array.size and int(array.max()) >= vocab_size:
                    problems.append(
                        f"{name}: document {key} has token {int(array.max())} >= vocab_size {vocab_size}"
                    )
                    break
                if key <= previous_key:
                    problems.append(f"{name}: key {key} does not follow {previous_key} (order broken)")
                    break
                previous_key = key
        except Exception as exc:  # a damaged tar or npy can fail in many ways; report, don't crash
            problems.append(f"{name}: unreadable after {documents} documents ({type(exc).__name__}: {exc})")
            continue
        if documents != shard["documents"]:
            problems.append(f"{name}: {documents} documents read, manifest says {shard['documents']}")
        if tokens != shard["tokens"]:
            problems.append(f"{name}: {tokens} tokens read, manifest says {shard['tokens']}")
    return problems


def unigram_entropy(shards_dir: str | Path, *, split: str = "train", include_eos: bool = True) -> float:
    """Entropy in nats of the split's empirical token distribution.

    This is the loss of the best model that ignores context, so a model that learned anything ends
    below it. With ``include_eos`` each document contributes one ``</s>``, matching the loader, which
    separates packed documents with it.
    """
    manifest = load_manifest(shards_dir)
    vocab_size = int(manifest["tokenizer"]["vocab_size"])
    counts = np.zeros(vocab_size, dtype=np.int64)
    documents = 0
    for path in shard_paths(manifest, shards_dir, split):
        for _, tokens in iter_shard_documents(path):
            counts += np.bincount(tokens, minlength=vocab_size)
            documents += 1
    if include_eos:
        counts[int(manifest["tokenizer"]["eos_id"])] += documents
    total = int(counts.sum())
    if total == 0:
        raise ManifestError(f"{Path(shards_dir) / MANIFEST_NAME}: split {split!r} has no tokens")
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())
