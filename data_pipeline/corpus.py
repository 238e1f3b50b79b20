"""Streaming readers for C4-style corpora: JSON lines (plain or gzip) and plain text.

Corpora are far larger than memory, so every reader here streams line by line and never loads a
file whole. Bad input never disappears silently: in strict mode the first bad record stops the run
with ``FILE:LINE: reason``; in lenient ("skip") mode it is skipped and counted by reason, and the
caller saves the counts (the shard manifest's ``rejected``).

Reasons: ``bad_utf8``, ``bad_json``, ``not_object``, ``missing_text`` (absent or not a string),
``bad_metadata``, ``nul_byte`` (a NUL character, raw or escaped: C strings and many tools truncate
at it), ``oversize`` (over ``max_document_bytes`` with ``oversize="skip"``), ``corrupt_gzip`` (a
truncated or damaged ``.gz``: counted once per file, the documents before the damage are kept) and
``empty_text`` (skipped and counted in both modes: well-formed, just empty).
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

__all__ = [
    "REJECT_REASONS",
    "SUPPORTED_SUFFIXES",
    "CorpusError",
    "Document",
    "expand_inputs",
    "iter_documents",
    "iter_range_documents",
    "split_text",
    "splittable",
]

REJECT_REASONS = (
    "bad_utf8",
    "bad_json",
    "not_object",
    "missing_text",
    "bad_metadata",
    "nul_byte",
    "oversize",
    "corrupt_gzip",
    "empty_text",
)

SUPPORTED_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz", ".txt", ".txt.gz")
_GLOB_CHARS = frozenset("*?[")
_NUL = b"\x00"


class CorpusError(ValueError):
    """A corpus file is unreadable or holds a bad record; the message starts with ``FILE:LINE:``."""


class Document(NamedTuple):
    """One corpus record. ``source`` and ``line`` say where it came from (line is 1-based).

    ``part`` is 0 except for the pieces of a record split for exceeding the size limit (0, 1, ...),
    so that records read = documents with ``part == 0`` + rejections. A named tuple, not a frozen
    dataclass: one is made per record, and a frozen dataclass costs ~6x as much to create.
    """

    text: str
    url: str | None
    timestamp: str | None
    source: str
    line: int
    part: int = 0


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


class _HashingReader(io.RawIOBase):
    """A raw file that hashes the bytes read through it: the manifest's input sha256 costs no
    second pass over a corpus that may be terabytes."""

    def __init__(self, path: Path) -> None:
        self._f = open(path, "rb")  # noqa: SIM115 - closed by close()
        self.sha256 = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        n = self._f.readinto(buffer)
        if n:
            self.sha256.update(memoryview(buffer)[:n])
        return n or 0

    def finish(self) -> str:
        """Hash whatever was not read (a reader stopped early, trailing bytes) and return the hex digest."""
        while block := self._f.read(1 << 20):
            self.sha256.update(block)
        return self.sha256.hexdigest()

    def close(self) -> None:
        self._f.close()
        super().close()


def _raw_lines(
    path: Path, reject: _Rejector, hashes: dict[str, str] | None, start: int = 0, end: int | None = None
) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line without its newline). A damaged gzip stream ends the file: fatal in
    strict mode, one ``corrupt_gzip`` in lenient mode (the lines before the damage were yielded).

    ``start``/``end`` (uncompressed files only) select the lines that *begin* in the byte range
    ``[start, end)``: a line cut by ``start`` belongs to the range before it, one cut by ``end`` to
    this one, so consecutive ranges cover every line exactly once. Line numbers stay the file's own.
    With ``hashes``, the file's sha256 is stored once the range is read (the rest is read to hash it).
    """
    lineno = 0
    raw_file = _HashingReader(path) if hashes is not None else open(path, "rb")  # noqa: SIM115
    try:
        buffered = io.BufferedReader(raw_file, buffer_size=1 << 20)
        if start or end is not None:
            if path.name.endswith(".gz"):
                raise CorpusError(f"{path}: a compressed file cannot be read from a byte range")
            lineno, offset = _seek_line(buffered, start)
            limit = end if end is not None else 1 << 62
            while offset < limit:
                raw = buffered.readline()
                if not raw:
                    break
                lineno += 1
                offset += len(raw)
                yield lineno, raw.rstrip(b"\r\n")
        else:
            f = gzip.GzipFile(fileobj=buffered, mode="rb") if path.name.endswith(".gz") else buffered
            try:
                for lineno, raw in enumerate(f, start=1):
                    yield lineno, raw.rstrip(b"\r\n")
            except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
                reject("corrupt_gzip", f"{path}:{lineno + 1}", f"truncated or corrupt gzip stream ({exc})")
        if hashes is not None:
            # Bytes still in the BufferedReader were already hashed when the raw file was read.
            hashes[str(path)] = raw_file.finish()  # type: ignore[union-attr]
    finally:
        raw_file.close()


def _seek_line(f: io.BufferedIOBase, start: int) -> tuple[int, int]:
    """Position ``f`` at the first line that begins at or after byte ``start``; return (lines before
    it, its offset). Counting newlines in 1 MiB blocks costs a memchr pass, not a parse."""
    if start == 0:
        return 0, 0
    newlines = 0
    remaining = start - 1  # the byte before ``start`` tells whether a line begins exactly there
    while remaining:
        block = f.read(min(remaining, 1 << 20))
        if not block:
            return newlines, start - 1 - remaining
        newlines += block.count(b"\n")
        remaining -= len(block)
    before = f.read(1)
    offset = start
    if before and before != b"\n":
        rest = f.readline()  # the tail of a line that began in the previous range
        newlines += 1 if rest.endswith(b"\n") else 0
        offset += len(rest)
    else:
        newlines += 1 if before else 0
    return newlines, offset


def split_text(text: str, max_bytes: int) -> list[str]:
    """Cut ``text`` into pieces of at most ``max_bytes`` UTF-8 bytes, at line breaks where possible,
    else at a character boundary (never inside a multi-byte character)."""
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for line in text.split("\n"):
        n = len(line.encode("utf-8")) + 1
        if current and size + n > max_bytes:
            pieces.append("\n".join(current))
            current, size = [], 0
        while n - 1 > max_bytes:  # one line alone is too long: cut it at a character boundary
            head = line.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
            pieces.append(head)
            line = line[len(head) :]
            n = len(line.encode("utf-8")) + 1
        current.append(line)
        size += n
    if current and any(current):
        pieces.append("\n".join(current))
    return [p for p in pieces if p.strip()]


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


def _json_documents(
    path: Path, lines: Iterator[tuple[int, bytes]], reject: _Rejector, text_key: str
) -> Iterator[Document]:
    source = str(path)
    for lineno, raw in lines:
        where = f"{path}:{lineno}"
        if not raw or raw.isspace():  # blank; no copy of the line
            continue
        if b"\x00" in raw:
            reject("nul_byte", where, f"raw NUL byte at offset {raw.index(_NUL)}")
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
        if "\x00" in text:
            reject("nul_byte", where, f"text holds a NUL character at index {text.index(chr(0))}")
            continue
        if not text or text.isspace():  # i.e. not text.strip(), without copying the text
            # A well-formed but empty record is not an input error; skip it in both modes, counted.
            reject("empty_text", where, "text is empty", always_skip=True)
            continue
        yield Document(text=text, url=meta["url"], timestamp=meta["timestamp"], source=source, line=lineno)


def _text_documents(path: Path, lines: Iterator[tuple[int, bytes]], reject: _Rejector) -> Iterator[Document]:
    """Plain text: a document is a block of lines between blank lines; ``line`` is its first line."""
    source = str(path)
    block: list[str] = []
    start = 0
    bad = False

    def flush() -> Iterator[Document]:
        if block and not bad:
            yield Document(text="\n".join(block), url=None, timestamp=None, source=source, line=start)

    for lineno, raw in lines:
        if not raw or raw.isspace():  # blank; no copy of the line
            yield from flush()
            block, bad = [], False
            continue
        if not block and not bad:
            start = lineno
        if bad:
            continue
        if b"\x00" in raw:
            reject("nul_byte", f"{path}:{lineno}", f"raw NUL byte at offset {raw.index(_NUL)}")
            bad, block = True, []  # count a damaged block once, not once per line
            continue
        try:
            block.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            reject("bad_utf8", f"{path}:{lineno}", f"invalid UTF-8 at byte {exc.start}")
            bad, block = True, []
    yield from flush()


def iter_documents(
    paths: Sequence[Path],
    *,
    strict: bool = True,
    counts: Counter | None = None,
    text_key: str = "text",
    max_document_bytes: int | None = None,
    oversize: Literal["split", "skip"] = "split",
    hashes: dict[str, str] | None = None,
) -> Iterator[Document]:
    """Stream the documents of ``paths`` in order.

    JSON lines files hold one object per line with a string ``text_key``; blank lines are skipped.
    ``.txt`` files hold documents separated by one or more blank lines. Strict mode raises
    :class:`CorpusError` (``FILE:LINE: reason: detail``) at the first bad record; lenient mode skips it
    and adds one to ``counts[reason]`` (reasons: see the module docstring). Empty texts are skipped in
    both modes and counted as ``empty_text``.

    A document over ``max_document_bytes`` UTF-8 bytes is split into pieces (``oversize="split"``,
    at line breaks; the pieces share ``source`` and ``line`` and number ``part`` 0, 1, ...) or
    rejected as ``oversize`` (``"skip"``). With ``hashes``, each file's sha256 (of its bytes on disk)
    is stored there once the file has been read, computed from the bytes streamed.
    """
    for p in paths:
        yield from iter_range_documents(
            Path(p),
            0,
            None,
            strict=strict,
            counts=counts,
            text_key=text_key,
            max_document_bytes=max_document_bytes,
            oversize=oversize,
            hashes=hashes,
        )


def splittable(path: Path) -> bool:
    """Whether ``path`` may be read in byte ranges (:func:`iter_range_documents`): uncompressed JSON
    lines. A compressed stream cannot be entered mid-way, and a plain-text document spans lines."""
    return path.name.endswith((".json", ".jsonl"))


def iter_range_documents(
    path: Path,
    start: int,
    end: int | None,
    *,
    strict: bool = True,
    counts: Counter | None = None,
    text_key: str = "text",
    max_document_bytes: int | None = None,
    oversize: Literal["split", "skip"] = "split",
    hashes: dict[str, str] | None = None,
) -> Iterator[Document]:
    """The documents of the lines of ``path`` that begin in bytes ``[start, end)`` (the whole file
    for ``0, None``), exactly as :func:`iter_documents` yields them for that stretch of the file: the
    same checks, counts, line numbers and splitting. Ranges other than the whole file need an
    uncompressed JSON lines file (:func:`splittable`)."""
    if max_document_bytes is not None and max_document_bytes < 1:
        raise ValueError(f"max_document_bytes={max_document_bytes} must be >= 1 (or None for no limit)")
    if oversize not in ("split", "skip"):
        raise ValueError(f"oversize={oversize!r} must be 'split' or 'skip'")
    if (start or end is not None) and not splittable(path):
        raise CorpusError(f"{path}: only uncompressed JSON lines files can be read in byte ranges")
    reject = _Rejector(strict, counts)
    if not path.is_file():
        raise CorpusError(f"{path}: no such corpus file")
    if not _is_supported(path):
        raise CorpusError(f"{path}: unsupported suffix (supported: {', '.join(SUPPORTED_SUFFIXES)})")
    lines = _raw_lines(path, reject, hashes, start, end)
    if path.name.endswith((".txt", ".txt.gz")):
        docs = _text_documents(path, lines, reject)
    else:
        docs = _json_documents(path, lines, reject, text_key)
    if max_document_bytes is None:
        yield from docs
        return
    for doc in docs:
        size = len(doc.text.encode("utf-8"))
        if size <= max_document_bytes:
            yield doc
        elif oversize == "skip":
            reject(
                "oversize",
                f"{doc.source}:{doc.line}",
                f"{size} bytes > max_document_bytes={max_document_bytes}",
            )
        else:
            for part, piece in enumerate(split_text(doc.text, max_document_bytes)):
                yield Document(piece, doc.url, doc.timestamp, doc.source, doc.line, part)
