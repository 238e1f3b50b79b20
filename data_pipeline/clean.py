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

Whole corpora are cleaned by :func:`data_pipeline.jobs.clean_corpus` (tasks over the input files,
dedupe in hash-partitioned stages: :mod:`data_pipeline.dedupe`).

Counts use two prefixes: ``page_*`` rules remove a whole document, ``line_*`` rules one line, and
``citation_markers`` counts markers removed. Only ``page_*`` counts enter the reconciliation
"documents in = written + rejected + removed by cleaning" (:func:`pages_removed`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.manifest import file_sha256

__all__ = [
    "POLICY_SUBSTRINGS",
    "SENTENCE_RE",
    "CleanConfig",
    "CleanError",
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
# Any of them as a substring: one scan of the line instead of six.
_POLICY_RE = re.compile("|".join(re.escape(p) for p in POLICY_SUBSTRINGS))
_TERMINAL_MARKS: tuple[str, ...] = (".", "?", "!", '"')
_ELLIPSIS = "..."
# "[1]", "[23]", "[]" (C4 allows zero digits), "[edit]", "[citation needed]".
_CITATION_RE = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", re.IGNORECASE)
# A whole sentence: from a non-space up to a run of terminal punctuation, optionally followed by
# closing quotes or brackets, then whitespace or the end of the line (or up to the end of the line).
SENTENCE_RE = re.compile(r"\S.*?(?:[.!?]+[\"')\]\u201d\u2019]*(?=\s|$)|$)")


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
    for m in SENTENCE_RE.finditer(line):
        start, end = m.span()
        while end > start and line[end - 1].isspace():
            end -= 1
        if end > start:
            yield start, end


def _count_sentences(line: str) -> int:
    return len(SENTENCE_RE.findall(line))


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
        if cfg.drop_policy_lines and _POLICY_RE.search(lower):
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
