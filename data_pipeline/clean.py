"""C4's page-cleaning heuristics, each rule switchable and each removal counted by rule.

The rules and their defaults are those of the C4 definition (Raffel et al. 2020, "Exploring the
Limits of Transfer Learning with a Unified Text-to-Text Transformer", §2.2) as its reference
implementation applies them, line by line, in this order:

1. a line with a word longer than ``max_word_length`` (1000) characters is dropped (minified code,
   base64 blobs);
2. citation markers (``[1]``, ``[edit]``, ``[citation needed]``) are removed from the line;
3. a line that does not end in a terminal mark (``.`` ``?`` ``!`` ``"``), or ends in an ellipsis, is
   dropped: menus, headings and truncated teasers rarely end like sentences;
4. a line with fewer than ``min_words_per_line`` (5) words is dropped;
5. a kept line containing "lorem ipsum" drops the whole page (placeholder text);
6. a line containing "javascript" is dropped ("please enable JavaScript" notices);
7. a kept line containing ``{`` drops the whole page (likely code);
8. a line with policy boilerplate ("terms of use", "privacy policy", ...) is dropped.

Then the page is dropped if fewer than ``min_sentences`` (3) sentences remain, if it contains a word
from the user's bad-words list, or if the optional language filter rejects it.

As in the reference, the "lorem ipsum" and ``{`` page rules look only at lines that survived rules
1-4: a ``{`` in a navigation line that would be dropped anyway does not cost the whole page.

Sentences are counted with a punctuation splitter, not nltk's punkt as in the original, so an
abbreviation such as "Dr. Smith" counts as a sentence boundary here; the three-sentence minimum is
therefore met a little more easily than in C4. Nothing is downloaded or shipped: no bad-words list
and no language model (C4 used langdetect with probability >= 0.99; plug one in through
``language_filter``).

Counts use two prefixes: ``page_*`` rules remove a whole document, ``line_*`` rules one line, and
``citation_markers`` counts markers removed. Only ``page_*`` counts enter the reconciliation
"documents in = written + rejected + removed by cleaning" (:func:`pages_removed`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "POLICY_SUBSTRINGS",
    "CleanConfig",
    "CleanError",
    "clean_corpus",
    "clean_document",
    "config_to_dict",
    "load_bad_words",
    "pages_removed",
    "sentence_spans",
    "split_sentences",
]

# T5 paper §2.2 / its C4 implementation: the exact substrings, matched on the lower-cased line.
POLICY_SUBSTRINGS: tuple[str, ...] = (
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
)
_TERMINAL_MARKS: tuple[str, ...] = (".", "?", "!", '"')
_ELLIPSIS = "..."
# "[1]", "[23]", "[]" (C4 allows zero digits), "[edit]", "[citation needed]".
_CITATION_RE = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", re.IGNORECASE)
# A whole sentence: from a non-space up to a run of terminal punctuation, optionally followed by
# closing quotes or brackets, then whitespace or the end of the line (or up to the end of the line).
_SENTENCE_RE = re.compile(r"\S.*?(?:[.!?]+[\"')\]\u201d\u2019]*(?=\s|$)|$)")


class CleanError(ValueError):
    """A cleaning option is invalid; the message names the field and its value."""


@dataclass(frozen=True)
class CleanConfig:
    """Which C4 rules run and their thresholds; the defaults are C4's (T5 paper §2.2)."""

    terminal_punct: bool = True
    """keep only lines ending in . ? ! or " and not in an ellipsis"""
    min_words_per_line: int = 5
    """drop lines with fewer words (0 disables)"""
    max_word_length: int = 1000
    """drop lines with a longer word, in characters (0 disables)"""
    drop_javascript_lines: bool = True
    """drop lines containing "javascript" (any case)"""
    drop_policy_lines: bool = True
    """drop lines with policy/cookie boilerplate"""
    remove_citations: bool = True
    """remove [1], [edit], [citation needed] markers"""
    min_sentences: int = 3
    """drop pages with fewer sentences left (0 disables)"""
    drop_lorem_ipsum: bool = True
    """drop pages containing "lorem ipsum" """
    drop_curly_brace: bool = True
    """drop pages containing "{" (likely code)"""
    bad_words_path: str | None = None
    """file with one bad word or phrase per line; pages containing one are dropped (none shipped)"""
    language_filter: Callable[[str], bool] | None = field(default=None, compare=False)
    """optional callable text -> keep?; e.g. a langdetect wrapper (none shipped). Must be a
    module-level function so that worker processes can receive it."""
    dedupe_documents: bool = True
    """drop exact duplicate documents (after cleaning; see data_pipeline.dedupe)"""
    dedupe_spans: int = 3
    """remove repeated spans of this many sentences, keeping the first (0 disables)"""

    def __post_init__(self) -> None:
        problems = []
        for name in ("min_words_per_line", "max_word_length", "min_sentences", "dedupe_spans"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                problems.append(f"{name}={value!r} must be an integer >= 0")
        if self.bad_words_path is not None and not Path(self.bad_words_path).is_file():
            problems.append(f"bad_words_path={self.bad_words_path!r} is not a file")
        if self.language_filter is not None and not callable(self.language_filter):
            problems.append(f"language_filter={self.language_filter!r} is not callable")
        if problems:
            raise CleanError("invalid cleaning config: " + "; ".join(problems))


def config_to_dict(cfg: CleanConfig) -> dict:
    """JSON-able description for manifests and reports; the bad-words file is named with its sha256."""
    out = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    lang = cfg.language_filter
    out["language_filter"] = None if lang is None else f"{lang.__module__}.{lang.__qualname__}"
    if cfg.bad_words_path is not None:
        from data_pipeline.manifest import file_sha256

        out["bad_words_sha256"] = file_sha256(cfg.bad_words_path)
    return out


def load_bad_words(path: str | Path) -> list[str]:
    """One word or phrase per line, lower-cased; blank lines and ``#`` comments are ignored."""
    words = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        word = line.strip().lower()
        if word and not word.startswith("#"):
            words.append(word)
    return words


@functools.lru_cache(maxsize=8)
def _bad_words_regex(path: str) -> re.Pattern[str] | None:
    words = load_bad_words(path)
    if not words:
        return None
    # Whole words only, as in C4 (its list includes words that are innocent inside longer ones).
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?:\W|^)(?:{alternatives})(?:\W|$)")


def sentence_spans(line: str) -> Iterator[tuple[int, int]]:
    """(start, end) offsets of the sentences of one line; a trailing fragment is a sentence too."""
    for m in _SENTENCE_RE.finditer(line):
        start, end = m.span()
        while end > start and line[end - 1].isspace():
            end -= 1
        if end > start:
            yield start, end


def _count_sentences(line: str) -> int:
    return len(_SENTENCE_RE.findall(line))


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text``; a newline always ends a sentence (C4 lines are paragraphs)."""
    return [line[a:b] for line in text.split("\n") for a, b in sentence_spans(line)]


def pages_removed(counts: Counter | dict) -> int:
    """Documents removed by cleaning and dedupe (the ``page_*`` counts)."""
    return sum(v for k, v in counts.items() if k.startswith("page_"))


def clean_document(text: str, cfg: CleanConfig, counts: Counter) -> str | None:
    """Apply C4's line and page rules to one document; return the cleaned text or None if dropped.

    Adds one to ``counts[rule]`` for every line or page a rule removes (``line_*`` / ``page_*``) and
    to ``counts["citation_markers"]`` per marker removed. Lines are stripped and re-joined with
    ``\\n``, as in C4. Dedupe is separate (:mod:`data_pipeline.dedupe`), since it needs state across
    documents.
    """
    kept: list[str] = []
    sentences = 0
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if not line:
            continue  # blank lines carry no text; not counted as a removal
        # Only a line longer than the limit can hold a longer word: skip the split for the rest.
        if (
            cfg.max_word_length
            and len(line) > cfg.max_word_length
            and max(map(len, line.split())) > cfg.max_word_length
        ):
            counts["line_long_word"] += 1
            continue
        if cfg.remove_citations:
            line, markers = _CITATION_RE.subn("", line)
            if markers:
                counts["citation_markers"] += markers
                line = line.strip()
        if cfg.terminal_punct and (not line.endswith(_TERMINAL_MARKS) or line.endswith(_ELLIPSIS)):
            counts["line_no_terminal_punct"] += 1
            continue
        if len(line.split()) < cfg.min_words_per_line:
            counts["line_too_few_words"] += 1
            continue
        lower = line.lower()
        if cfg.drop_lorem_ipsum and "lorem ipsum" in lower:
            counts["page_lorem_ipsum"] += 1
            return None
        if cfg.drop_javascript_lines and "javascript" in lower:
            counts["line_javascript"] += 1
            continue
        if cfg.drop_curly_brace and "{" in line:
            counts["page_curly_brace"] += 1
            return None
        if cfg.drop_policy_lines and any(p in lower for p in POLICY_SUBSTRINGS):
            counts["line_policy"] += 1
            continue
        sentences += _count_sentences(line)
        kept.append(line)
    if sentences < cfg.min_sentences or not kept:
        counts["page_too_few_sentences"] += 1
        return None
    cleaned = "\n".join(kept)
    if cfg.bad_words_path is not None:
        regex = _bad_words_regex(str(cfg.bad_words_path))
        if regex is not None and regex.search(cleaned.lower()):
            counts["page_bad_words"] += 1
            return None
    if cfg.language_filter is not None and not cfg.language_filter(cleaned):
        counts["page_language"] += 1
        return None
    return cleaned


# ------------------------------------------------------------------------------- whole corpus
def _clean_batch(batch: list[str], cfg: CleanConfig) -> tuple[list[str | None], Counter]:
    counts: Counter = Counter()
    return [clean_document(text, cfg, counts) for text in batch], counts


def clean_corpus(
    inputs: list[Path],
    out_dir: str | Path,
    *,
    cfg: CleanConfig | None = None,
    errors: Literal["strict", "skip"] = "strict",
    workers: int = 1,
    max_document_bytes: int | None = None,
    oversize: Literal["split", "skip"] = "split",
    docs_per_file: int = 100_000,
    batch_size: int = 256,
) -> dict:
    """Clean and dedupe ``inputs`` into ``out_dir/part-NNNNN.json.gz`` (C4's JSON lines format) and
    write ``out_dir/clean_report.json``; return the report.

    The line and page rules run in ``workers`` processes on batches of documents; results come back
    in corpus order and dedupe runs in this process, so the output is identical for any worker
    count. Output files are written to ``.tmp`` and renamed; gzip headers carry no name or time, so
    the bytes depend only on the input and the options.
    """
    import gzip
    import hashlib
    import json
    import multiprocessing
    import os

    from data_pipeline.corpus import iter_documents
    from data_pipeline.dedupe import Deduper
    from data_pipeline.manifest import file_sha256, tool_description

    cfg = cfg or CleanConfig()
    problems = []
    if errors not in ("strict", "skip"):
        problems.append(f"errors={errors!r} must be 'strict' or 'skip'")
    if workers < 1:
        problems.append(f"workers={workers} must be >= 1")
    if docs_per_file < 1:
        problems.append(f"docs_per_file={docs_per_file} must be >= 1")
    if problems:
        raise CleanError("cannot clean: " + "; ".join(problems))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = sorted(p.name for p in out_dir.glob("part-*.json.gz"))
    if stale:
        # Parts of an earlier run would mix with this one's (and a shorter run would leave extras).
        raise CleanError(
            f"{out_dir} already holds cleaned output ({', '.join(stale[:3])}{', ...' if len(stale) > 3 else ''}); "
            "use a fresh --out directory or delete those files"
        )
    started = time.monotonic()
    rejected: Counter = Counter()
    cleaning: Counter = Counter()
    hashes: dict[str, str] = {}
    deduper = Deduper(documents=cfg.dedupe_documents, span=cfg.dedupe_spans, min_sentences=cfg.min_sentences)
    records = split_records = split_pieces = written = 0
    outputs: list[dict] = []
    current: dict = {}

    def open_part() -> None:
        name = f"part-{len(outputs):05d}.json.gz"
        tmp = out_dir / (name + ".tmp")
        raw = open(tmp, "wb")  # noqa: SIM115 - closed in close_part
        current.update(
            name=name,
            tmp=tmp,
            raw=raw,
            gz=gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6),
            n=0,
        )

    def close_part() -> None:
        current["gz"].close()
        current["raw"].flush()
        os.fsync(current["raw"].fileno())
        current["raw"].close()
        final = out_dir / current["name"]
        os.replace(current["tmp"], final)
        outputs.append(
            {
                "path": current["name"],
                "documents": current["n"],
                "bytes": final.stat().st_size,
                "sha256": file_sha256(final),
            }
        )
        current.clear()

    def batches():
        nonlocal records, split_records, split_pieces
        batch: list = []
        stream = iter_documents(
            inputs,
            strict=errors == "strict",
            counts=rejected,
            max_document_bytes=max_document_bytes,
            oversize=oversize,
            hashes=hashes,
        )
        for doc in stream:
            if doc.part == 0:
                records += 1
            else:
                split_pieces += 1
                split_records += doc.part == 1
            batch.append(doc)
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    pool = None
    try:
        if workers > 1:
            pool = multiprocessing.get_context("spawn").Pool(workers)

            # Results come back in submission order; at most 2 * workers batches are in flight, which
            # keeps memory flat however large the corpus.
            def submit(b: list) -> Any:
                return pool.apply_async(_clean_batch, ([d.text for d in b], cfg))

            docs_and_results = _zip_lazy(batches(), submit, 2 * workers)
        else:
            docs_and_results = ((b, _clean_batch([d.text for d in b], cfg)) for b in batches())
        for batch, (texts, counts) in docs_and_results:
            cleaning.update(counts)
            for doc, text in zip(batch, texts, strict=True):
                if text is None:
                    continue
                text = deduper.process(text, cleaning)
                if text is None:
                    continue
                if not current:
                    open_part()
                record = {"text": text, "url": doc.url, "timestamp": doc.timestamp}
                current["gz"].write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
                current["n"] += 1
                written += 1
                if current["n"] == docs_per_file:
                    close_part()
        if current:
            close_part()
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if current:  # stopped by an error: no half-written part is left behind
            current["gz"].close()
            current["raw"].close()
            current["tmp"].unlink(missing_ok=True)

    report = {
        "tool": tool_description(),
        "inputs": [
            {"path": str(p), "bytes": Path(p).stat().st_size, "sha256": hashes.get(str(p))} for p in inputs
        ],
        "config": config_to_dict(cfg),
        "errors": errors,
        "max_document_bytes": max_document_bytes,
        "oversize": oversize,
        "documents_in": records + sum(rejected.values()),
        "documents_written": written,
        "rejected": {k: v for k, v in sorted(rejected.items()) if v},
        "cleaning": {k: v for k, v in sorted(cleaning.items()) if v},
        "cleaning_documents_removed": pages_removed(cleaning),
        "oversize_split": {"records": split_records, "extra_pieces": split_pieces},
        "dedupe_hashes": len(deduper),
        "dedupe_hash_bytes": deduper.nbytes,
        "outputs": outputs,
        "seconds": round(time.monotonic() - started, 3),
        "output_sha256": hashlib.sha256("".join(o["sha256"] for o in outputs).encode()).hexdigest(),
    }
    tmp = out_dir / "clean_report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / "clean_report.json")
    return report


def _zip_lazy(items, submit, ahead: int):
    """Yield ``(item, submit(item).get())`` in order, with at most ``ahead`` submissions in flight."""
    from collections import deque

    window: deque = deque()
    for item in items:
        window.append((item, submit(item)))
        if len(window) > ahead:
            first, result = window.popleft()
            yield first, result.get()
    while window:
        first, result = window.popleft()
        yield first, result.get()
