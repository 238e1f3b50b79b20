"""Streaming readers for C4-style corpora: JSON lines (plain or gzip) and plain text.

Corpora are far larger than memory, so every reader here streams line by line and never loads a
file whole. Bad input never disappears silently: in strict mode the first bad record stops the run
with ``FILE:LINE: reason``; in lenient mode it is skipped and counted by reason, and the caller saves
the counts (the shard manifest's ``skipped``).
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SUPPORTED_SUFFIXES", "CorpusError", "Document", "expand_inputs", "iter_documents"]

SUPPORTED_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz", ".txt", ".txt.gz")
_GLOB_CHARS = frozenset("*?[")


class CorpusError(ValueError):
    """A corpus file is unreadable or holds a bad record; the message starts with ``FILE:LINE:``."""


@dataclass(frozen=True)
class Document:
    """One corpus record. ``source`` and ``line`` say where it came from (line is 1-based)."""

    text: str
    url: str | None
    timestamp: str | None
    source: str
    line: int


def _is_supported(path: Path) -> bool:
    return path.name.endswith(SUPPORTED_SUFFIXES)


def _files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and _is_supported(p))


def expand_inputs(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """Turn a user's input spec into a sorted, de-duplicated list of corpus files.

    ``spec`` may be a file, a directory (every supported file below it), a glob, a comma-separated
    list of those, or a sequence of them. A pattern that matches nothing is an error rather than an
    empty corpus, because a typo in a path should not produce a run that trains on nothing.
    """
    if isinstance(spec, (str, Path)):
        text = str(spec)
        # A path that exists wins over comma splitting, so names containing commas still work.
        parts = [text] if Path(text).exists() else [p.strip() for p in text.split(",") if p.strip()]
    else:
        parts = [str(p) for p in spec]
    if not parts:
        raise ValueError(f"no corpus inputs given (spec={spec!r})")

    result: list[Path] = []
    seen: set[Path] = set()
    for part in parts:
        path = Path(part)
        if any(c in part for c in _GLOB_CHARS):
            matches: list[Path] = []
            for hit in sorted(glob.glob(part, recursive=True)):
                hp = Path(hit)
                matches.extend(_files_under(hp) if hp.is_dir() else [hp] if _is_supported(hp) else [])
            if not matches:
                raise FileNotFoundError(
                    f"corpus pattern {part!r} matches no supported file (suffixes: {', '.join(SUPPORTED_SUFFIXES)})"
                )
        elif path.is_dir():
            matches = _files_under(path)
            if not matches:
                raise FileNotFoundError(
                    f"corpus directory {part!r} holds no supported file (suffixes: {', '.join(SUPPORTED_SUFFIXES)})"
                )
        elif path.is_file():
            if not _is_supported(path):
                raise ValueError(
                    f"corpus file {part!r} has an unsupported suffix (supported: {', '.join(SUPPORTED_SUFFIXES)})"
                )
            matches = [path]
        else:
            raise FileNotFoundError(f"corpus input {part!r} does not exist")
        for m in matches:
            if m not in seen:
                seen.add(m)
                result.append(m)
    return result


def _open_binary(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _raw_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line without its newline); a damaged gzip stream is always fatal."""
    lineno = 0
    try:
        with _open_binary(path) as f:
            for lineno, raw in enumerate(f, start=1):
                yield lineno, raw.rstrip(b"\r\n")
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise CorpusError(f"{path}:{lineno + 1}: corrupt gzip stream ({exc})") from exc


class _Rejector:
    """Raises in strict mode, counts by reason in lenient mode."""

    def __init__(self, strict: bool, counts: Counter | None) -> None:
        self.strict = strict
        self.counts = counts

    def __call__(self, reason: str, where: str, detail: str, *, always_skip: bool = False) -> None:
        if self.strict and not always_skip:
            raise CorpusError(f"{where}: {reason}: {detail}")
        if self.counts is not None:
            self.counts[reason] += 1


def _json_documents(path: Path, reject: _Rejector, text_key: str) -> Iterator[Document]:
    source = str(path)
    for lineno, raw in _raw_lines(path):
        where = f"{path}:{lineno}"
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            reject("bad_utf8", where, f"invalid UTF-8 at byte {exc.start}")
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            reject("bad_json", where, f"{exc.msg} at column {exc.colno} (line starts {line[:60]!r})")
            continue
        if not isinstance(obj, dict):
            reject("not_object", where, f"expected a JSON object, got {type(obj).__name__}")
            continue
        if text_key not in obj:
            reject("missing_text", where, f"no {text_key!r} field (keys: {sorted(obj)[:10]})")
            continue
        text = obj[text_key]
        if not isinstance(text, str):
            reject("missing_text", where, f"field {text_key!r} is {type(text).__name__}, not a string")
            continue
        meta: dict[str, str | None] = {}
        bad_meta = False
        for key in ("url", "timestamp"):
            value = obj.get(key)
            if value is not None and not isinstance(value, str):
                reject("bad_metadata", where, f"field {key!r}={value!r} is not a string")
                bad_meta = True
                break
            meta[key] = value
        if bad_meta:
            continue
        if not text.strip():
            # A well-formed but empty record is not an input error; skip it in both modes, counted.
            reject("empty_text", where, "text is empty", always_skip=True)
            continue
        yield Document(text=text, url=meta["url"], timestamp=meta["timestamp"], source=source, line=lineno)


def _text_documents(path: Path, reject: _Rejector) -> Iterator[Document]:
    """Plain text: a document is a block of lines between blank lines; ``line`` is its first line."""
    source = str(path)
    block: list[str] = []
    start = 0
    bad = False

    def flush() -> Iterator[Document]:
        if block and not bad:
            yield Document(text="\n".join(block), url=None, timestamp=None, source=source, line=start)

    for lineno, raw in _raw_lines(path):
        if not raw.strip():
            yield from flush()
            block, bad = [], False
            continue
        if not block and not bad:
            start = lineno
        try:
            block.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            if not bad:  # count a damaged block once, not once per line
                reject("bad_utf8", f"{path}:{lineno}", f"invalid UTF-8 at byte {exc.start}")
            bad = True
            block = []
    yield from flush()


def iter_documents(
    paths: Sequence[Path],
    *,
    strict: bool = True,
    counts: Counter | None = None,
    text_key: str = "text",
) -> Iterator[Document]:
    """Stream the documents of ``paths`` in order.

    JSON lines files hold one object per line with a string ``text_key``; blank lines are skipped.
    ``.txt`` files hold documents separated by one or more blank lines. Strict mode raises
    :class:`CorpusError` (``FILE:LINE: reason: detail``) at the first bad record; lenient mode skips it
    and adds one to ``counts[reason]`` (reasons: bad_utf8, bad_json, not_object, missing_text,
    bad_metadata). Empty texts are skipped in both modes and counted as ``empty_text``. A corrupt gzip
    stream is fatal in both modes: the rest of that file cannot be read.
    """
    reject = _Rejector(strict, counts)
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise CorpusError(f"{path}: no such corpus file")
        if not _is_supported(path):
            raise CorpusError(f"{path}: unsupported suffix (supported: {', '.join(SUPPORTED_SUFFIXES)})")
        if path.name.endswith((".txt", ".txt.gz")):
            yield from _text_documents(path, reject)
        else:
            yield from _json_documents(path, reject, text_key)
