"""The single-process C4 dedupe and clean pass that Tandem shipped before its data preparation ran as
tasks: a test oracle only (users cannot reach it).

The staged pipeline (data_pipeline.pipeline, data_pipeline.dedupe) must reproduce exactly what this
serial pass decides: one owner of a seen-hash set, documents visited in corpus order, the first copy of
a document or a 3-sentence span kept. Tests compare the cleaned records, counts and hashes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data_pipeline.clean import CleanConfig, clean_document, sentence_spans
from data_pipeline.corpus import iter_documents
from data_pipeline.dedupe import hash64


class HashSet64:
    """A set of 64-bit hashes at ~12 bytes each (vs ~70 for a Python set of ints)."""

    def __init__(self, *, min_buffer: int = 1 << 16) -> None:
        self._sorted = np.empty(0, dtype=np.uint64)
        self._recent: set[int] = set()
        self._min_buffer = min_buffer

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)

    def __contains__(self, h: int) -> bool:
        if h in self._recent:
            return True
        arr = self._sorted
        if not len(arr):
            return False
        i = int(np.searchsorted(arr, np.uint64(h)))
        return i < len(arr) and int(arr[i]) == h

    def add(self, h: int) -> bool:
        """Insert ``h``; return True if it was new."""
        if h in self:
            return False
        self._recent.add(h)
        # Merging when the buffer reaches 1/8 of the array keeps the total merge work O(n log n).
        if len(self._recent) >= max(self._min_buffer, len(self._sorted) // 8):
            self._merge()
        return True

    def _merge(self) -> None:
        recent = np.fromiter(self._recent, dtype=np.uint64, count=len(self._recent))
        recent.sort()
        self._sorted = np.concatenate([self._sorted, recent])
        self._sorted.sort(kind="stable")  # two sorted runs: timsort-like merge in numpy's radix/merge sort
        self._recent = set()

    @property
    def nbytes(self) -> int:
        """Approximate bytes held: the array plus ~90 bytes per buffered Python int."""
        return int(self._sorted.nbytes) + 90 * len(self._recent)


class Deduper:
    """Exact document dedupe and repeated-span removal over one stream of documents.

    Call :meth:`process` on each cleaned document in corpus order. Counts: ``page_duplicate`` (an
    exact copy of an earlier document), ``span_sentences_removed`` (sentences inside a repeated
    span), ``page_too_few_sentences_after_dedupe`` (a page left with fewer than ``min_sentences``).
    """

    def __init__(self, *, documents: bool = True, span: int = 3, min_sentences: int = 3) -> None:
        if span < 0 or min_sentences < 0:
            raise ValueError(f"span={span} and min_sentences={min_sentences} must be >= 0")
        self.documents = documents
        self.span = span
        self.min_sentences = min_sentences
        self._docs = HashSet64()
        self._spans = HashSet64()

    @property
    def nbytes(self) -> int:
        return self._docs.nbytes + self._spans.nbytes

    def __len__(self) -> int:
        """Hashes remembered (documents + spans): what dedupe memory grows with."""
        return len(self._docs) + len(self._spans)

    def process(self, text: str, counts: Counter) -> str | None:
        if self.documents and not self._docs.add(hash64(text)):
            counts["page_duplicate"] += 1
            return None
        if not self.span:
            return text
        lines = text.split("\n")
        # (line index, start, end) of every sentence; spans cross line boundaries, as C4's do.
        sentences = [(i, a, b) for i, line in enumerate(lines) for a, b in sentence_spans(line)]
        drop = [False] * len(sentences)
        for k in range(len(sentences) - self.span + 1):
            window = "\n".join(lines[i][a:b] for i, a, b in sentences[k : k + self.span])
            if not self._spans.add(hash64(window)):
                for j in range(k, k + self.span):
                    drop[j] = True
        removed = sum(drop)
        if not removed:
            return text
        counts["span_sentences_removed"] += removed
        kept_lines: list[list[str]] = [[] for _ in lines]
        for (i, a, b), gone in zip(sentences, drop, strict=True):
            if not gone:
                kept_lines[i].append(lines[i][a:b])
        if len(sentences) - removed < self.min_sentences:
            counts["page_too_few_sentences_after_dedupe"] += 1
            return None
        return "\n".join(" ".join(parts) for parts in kept_lines if parts)


def serial_clean(
    inputs: Sequence[Path],
    cfg: CleanConfig,
    *,
    errors: str = "strict",
    max_document_bytes: int | None = None,
    oversize: str = "split",
) -> tuple[list[dict], Counter, Counter, int]:
    """(records {text, url, timestamp} in corpus order, cleaning counts, rejected counts, hashes held)."""
    rejected: Counter = Counter()
    cleaning: Counter = Counter()
    deduper = Deduper(documents=cfg.dedupe_documents, span=cfg.dedupe_spans, min_sentences=cfg.min_sentences)
    out = []
    for doc in iter_documents(
        inputs,
        strict=errors == "strict",
        counts=rejected,
        max_document_bytes=max_document_bytes,
        oversize=oversize,  # type: ignore[arg-type]
    ):
        text = clean_document(doc.text, cfg, cleaning)
        if text is not None:
            text = deduper.process(text, cleaning)
        if text is not None:
            out.append({"text": text, "url": doc.url, "timestamp": doc.timestamp})
    return out, cleaning, rejected, len(deduper)
