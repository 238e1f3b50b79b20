"""Exact dedupe of documents and C4's repeated three-sentence spans, in hash-partitioned stages.

C4 (T5 paper §2.2) "discarded all but one of any three-sentence span occurring more than once in
the data set". Tandem keeps the copy that comes *first in corpus order* (input file order, then line,
then position in the document), the rule a single reader applies when it streams the corpus with one
seen-hash set. Here no process sees the whole corpus:

1. **signatures** (one task per input piece): every cleaned document emits one record for its
   text and one per window of ``span`` consecutive sentences: ``(kind, hash, unit, k)``, where
   ``hash`` is the first 8 bytes of the blake2b digest, ``unit`` the document's corpus-order
   ordinal (:func:`data_pipeline.pipeline.ordinal`) and ``k`` the window's index in it. Records go to
   bucket ``hash % B`` and are written as sorted runs (:class:`SignatureWriter`), spilled at a fixed
   record count, so a task's memory depends on that count, not on its input.
2. **resolve** (one task per bucket): the bucket's runs are merged in key order, streaming fixed-size
   chunks (:func:`resolve_bucket`; more runs than ``fan_in`` are first merged in groups on disk), so
   memory is ``fan_in x chunk`` records whatever the corpus. In each group of equal ``(kind, hash)``
   every record but the first is a removal; removals are written as runs sorted by ``unit``.
3. **apply** (one task per piece): the piece reads its slice of every removal run (a binary search
   on the memory-mapped run, :func:`read_removals`), drops duplicate documents and the sentences of
   repeated windows (:func:`apply_removals`).

Why this equals the serial rule exactly: the serial pass records a document's hash for every cleaned
document and the hashes of its windows unless the document is itself a duplicate. Including the
windows of duplicate documents changes nothing: such a document is an exact copy of an earlier one,
whose window ``k`` has the same hash at an earlier position, so a duplicate's windows are never the
first of their group. A window repeated inside one document is caught too, since ``k`` orders it.

With 64-bit hashes the chance that any two of 10^9 distinct spans collide (and one is wrongly removed)
is about 3%, and then only one span is lost: the serial pass had the same odds.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from data_pipeline.clean import SENTENCE_RE, sentence_spans

__all__ = [
    "DOC",
    "REMOVAL_DTYPE",
    "SIG_DTYPE",
    "SPAN",
    "SignatureWriter",
    "apply_removals",
    "document_signatures",
    "hash64",
    "read_removals",
    "resolve_bucket",
]

DOC, SPAN = 0, 1  # record kinds: whole-document hashes and window hashes live in separate namespaces
# Packed records, stored as raw little-endian bytes (no header): a run is appended in chunks.
SIG_DTYPE = np.dtype([("kind", "u1"), ("hash", "<u8"), ("unit", "<u8"), ("k", "<u4")])
REMOVAL_DTYPE = np.dtype([("unit", "<u8"), ("kind", "u1"), ("k", "<u4")])


def hash64(text: str) -> int:
    """First 8 bytes of the blake2b digest of ``text`` (UTF-8), as an unsigned int."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def _sentences(text: str) -> tuple[list[str], list[tuple[int, int, int]]]:
    lines = text.split("\n")
    # (line index, start, end) of every sentence; windows cross line boundaries, as C4's do.
    return lines, [(i, a, b) for i, line in enumerate(lines) for a, b in sentence_spans(line)]


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()


def document_signatures(text: str, *, documents: bool, span: int) -> tuple[bytes | None, list[bytes]]:
    """The 8-byte digests of a cleaned document: of its text (if ``documents``), and of each window of
    ``span`` consecutive sentences (window k starts at sentence k), joined by ``\\n``. As little-endian
    integers these are :func:`hash64` of the same strings."""
    doc = _digest(text) if documents else None
    if not span:
        return doc, []
    # sentence_spans' sentences are the regex's matches with trailing whitespace removed.
    sents = [m.rstrip() for line in text.split("\n") for m in SENTENCE_RE.findall(line)]
    return doc, [_digest("\n".join(sents[k : k + span])) for k in range(len(sents) - span + 1)]


def apply_removals(
    text: str, removals: Sequence[tuple[int, int]], *, span: int, min_sentences: int, counts: Counter
) -> str | None:
    """The document after dedupe, or None if it goes. ``removals`` are its ``(kind, k)`` records that
    were not first in their group. Counts as the serial pass did: ``page_duplicate`` (an exact copy of
    an earlier document), ``span_sentences_removed`` (sentences inside a repeated window),
    ``page_too_few_sentences_after_dedupe`` (fewer than ``min_sentences`` left)."""
    if not removals:
        return text
    if any(kind == DOC for kind, _ in removals):
        counts["page_duplicate"] += 1
        return None
    lines, sentences = _sentences(text)
    drop = [False] * len(sentences)
    for _, k in removals:
        for j in range(k, k + span):
            drop[j] = True
    removed = sum(drop)
    counts["span_sentences_removed"] += removed
    if len(sentences) - removed < min_sentences:
        counts["page_too_few_sentences_after_dedupe"] += 1
        return None
    kept_lines: list[list[str]] = [[] for _ in lines]
    for (i, a, b), gone in zip(sentences, drop, strict=True):
        if not gone:
            kept_lines[i].append(lines[i][a:b])
    return "\n".join(" ".join(parts) for parts in kept_lines if parts)


def _write_run(path: Path, records: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(records.tobytes())
    os.replace(tmp, path)


def _sig_order(a: np.ndarray) -> np.ndarray:
    return np.lexsort((a["k"], a["unit"], a["hash"], a["kind"]))


class SignatureWriter:
    """Buffers one task's signature records and writes them as sorted runs, one file per bucket per
    spill: ``DIR/bBBBBB/TTTTTT-RRR.sig``. At most ``spill_records`` records are held (in one array)."""

    def __init__(self, directory: Path, task: int, buckets: int, *, spill_records: int = 1 << 18) -> None:
        self.directory, self.task, self.buckets = Path(directory), task, buckets
        self._buf = np.empty(spill_records, dtype=SIG_DTYPE)
        self._n = 0
        self._runs = 0

    def add(self, unit: int, signatures: tuple[bytes | None, list[bytes]]) -> None:
        """Record one document's signatures (:func:`document_signatures`) under its ordinal ``unit``."""
        doc, windows = signatures
        if doc is not None:
            self._put(DOC, doc, unit, 0)
        if windows:
            self._put(SPAN, b"".join(windows), unit, 0)

    def _put(self, kind: int, digests: bytes, unit: int, k0: int) -> None:
        hashes = np.frombuffer(digests, dtype="<u8")
        while len(hashes):
            room = len(self._buf) - self._n
            take = hashes[:room]
            a = self._buf[self._n : self._n + len(take)]
            a["kind"], a["hash"], a["unit"] = kind, take, unit
            a["k"] = np.arange(k0, k0 + len(take), dtype=np.uint32)
            self._n += len(take)
            hashes, k0 = hashes[room:], k0 + len(take)
            if self._n == len(self._buf):
                self.flush()

    def flush(self) -> None:
        if not self._n:
            return
        a = self._buf[: self._n]
        a = a[_sig_order(a)]
        bucket = a["hash"] % np.uint64(self.buckets)
        for b in np.unique(bucket):
            d = self.directory / f"b{int(b):05d}"
            d.mkdir(parents=True, exist_ok=True)
            _write_run(d / f"{self.task:06d}-{self._runs:03d}.sig", a[bucket == b])
        self._runs += 1
        self._n = 0


# --------------------------------------------------------------------------- resolve one bucket
def _le(a: np.ndarray, key: np.void) -> int:
    """How many records of the sorted ``a`` are <= ``key`` in (kind, hash, unit, k) order."""
    kind, h, unit, k = (key[f] for f in ("kind", "hash", "unit", "k"))
    below = (a["kind"] < kind) | (
        (a["kind"] == kind)
        & (
            (a["hash"] < h)
            | ((a["hash"] == h) & ((a["unit"] < unit) | ((a["unit"] == unit) & (a["k"] <= k))))
        )
    )
    return int(np.count_nonzero(below))


def _merged(paths: Sequence[Path], budget: int) -> Iterator[np.ndarray]:
    """The records of the sorted runs ``paths`` as consecutive sorted arrays (their concatenation is
    the merge), holding about ``budget`` records of all runs together at a time."""
    chunk = max(16, budget // max(1, len(paths)))
    files = [open(p, "rb") for p in paths]  # noqa: SIM115 - closed below
    try:
        bufs = [np.fromfile(f, dtype=SIG_DTYPE, count=chunk) for f in files]
        more = [len(b) == chunk for b in bufs]
        while any(len(b) for b in bufs):
            # Every record up to the smallest last-loaded key among runs with more to read is final.
            limits = [b[-1] for b, m in zip(bufs, more, strict=True) if m and len(b)]
            if limits:
                limit = min(limits, key=lambda r: (r["kind"], r["hash"], r["unit"], r["k"]))
                cuts = [_le(b, limit) for b in bufs]
            else:
                cuts = [len(b) for b in bufs]
            out = np.concatenate([b[:c] for b, c in zip(bufs, cuts, strict=True)])
            yield out[_sig_order(out)]
            for i, (f, b, c) in enumerate(zip(files, bufs, cuts, strict=True)):
                rest = b[c:]
                if not len(rest) and more[i]:
                    rest = np.fromfile(f, dtype=SIG_DTYPE, count=chunk)
                    more[i] = len(rest) == chunk
                bufs[i] = rest
    finally:
        for f in files:
            f.close()


def resolve_bucket(
    runs: Sequence[Path],
    out_dir: Path,
    bucket: int,
    *,
    budget: int = 1 << 16,
    fan_in: int = 64,
    spill_records: int = 1 << 18,
) -> dict[str, int]:
    """Merge one bucket's signature runs and write its removals as unit-sorted runs
    ``OUT_DIR/BBBBB-RRRR.rm``. Returns ``{"hashes": distinct (kind, hash) groups, "removals": n}``.

    Memory is fixed by the options, never by the bucket's size: about ``budget`` records are loaded
    at a time across the runs being merged (at most ``fan_in`` of them: more runs are first merged
    in groups into scratch runs on disk, so no read chunk gets tiny), plus a removal buffer of
    ``spill_records``. Records are 21 bytes; the defaults hold ~1.4 MB + 3.4 MB."""
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = out_dir / f"b{bucket:05d}.merge"
    runs = list(runs)
    level = 0
    while len(runs) > fan_in:
        scratch.mkdir(exist_ok=True)
        merged_runs = []
        for g in range(0, len(runs), fan_in):
            path = scratch / f"{level:02d}-{g // fan_in:06d}.sig"
            with open(path, "wb") as f:
                for part in _merged(runs[g : g + fan_in], budget):
                    f.write(part.tobytes())
            merged_runs.append(path)
        for old in runs:
            if old.parent == scratch:
                old.unlink()
        runs, level = merged_runs, level + 1

    groups = removed = 0
    pending: list[np.ndarray] = []
    held = spilled = 0
    last: tuple[int, int] | None = None

    def spill() -> None:
        nonlocal held, spilled
        if not pending:
            return
        r = np.concatenate(pending)
        r = r[np.lexsort((r["k"], r["kind"], r["unit"]))]
        _write_run(out_dir / f"{bucket:05d}-{spilled:04d}.rm", r)
        pending.clear()
        held, spilled = 0, spilled + 1

    for part in _merged(runs, budget):
        kh_same = (part["kind"][1:] == part["kind"][:-1]) & (part["hash"][1:] == part["hash"][:-1])
        first = np.ones(len(part), dtype=bool)
        first[1:] = ~kh_same
        if last is not None and (int(part["kind"][0]), int(part["hash"][0])) == last:
            first[0] = False  # the group began in the previous chunk
        last = (int(part["kind"][-1]), int(part["hash"][-1]))
        groups += int(np.count_nonzero(first))
        dup = part[~first]
        if len(dup):
            r = np.empty(len(dup), dtype=REMOVAL_DTYPE)
            r["unit"], r["kind"], r["k"] = dup["unit"], dup["kind"], dup["k"]
            pending.append(r)
            held += len(r)
            removed += len(r)
            if held >= spill_records:
                spill()
    spill()
    if scratch.exists():
        for p in scratch.iterdir():
            p.unlink()
        scratch.rmdir()
    return {"hashes": groups, "removals": removed}


def _bisect(units: np.ndarray, value: int) -> int:
    """First index whose unit is >= value, in a memory-mapped sorted column (touches log2(n) pages)."""
    lo, hi = 0, len(units)
    while lo < hi:
        mid = (lo + hi) // 2
        if int(units[mid]) < value:
            lo = mid + 1
        else:
            hi = mid
    return lo


def read_removals(runs: Sequence[Path], lo: int, hi: int) -> dict[int, list[tuple[int, int]]]:
    """``unit -> [(kind, k), ...]`` for the units in ``[lo, hi)``, read from the removal runs by binary
    search, so a piece reads only its own slice of each."""
    out: dict[int, list[tuple[int, int]]] = {}
    for path in runs:
        if path.stat().st_size == 0:
            continue
        mm = np.memmap(path, dtype=REMOVAL_DTYPE, mode="r")
        units = mm["unit"]
        a, b = _bisect(units, lo), _bisect(units, hi)
        if a == b:
            continue
        part = np.array(mm[a:b])
        for unit, kind, k in zip(
            part["unit"].tolist(), part["kind"].tolist(), part["k"].tolist(), strict=True
        ):
            out.setdefault(unit, []).append((kind, k))
        del mm
    return out
