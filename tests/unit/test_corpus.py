"""Corpus readers: every format, strict and lenient bad-input handling, input expansion."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from data_pipeline.corpus import CorpusError, Document, expand_inputs, iter_documents, split_text
from data_pipeline.manifest import file_sha256


def _jsonl(records: list[object]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def _write(path: Path, data: str | bytes, *, gz: bool = False) -> Path:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    path.write_bytes(gzip.compress(raw, mtime=0) if gz else raw)
    return path


def test_all_formats(tmp_path: Path) -> None:
    rec = [{"text": "first doc", "url": "https://a.example/1", "timestamp": "2020-01-01T00:00:00Z"}]
    paths = [
        _write(tmp_path / "a.json", _jsonl(rec)),
        _write(tmp_path / "b.jsonl", "\n" + _jsonl([{"text": "second doc"}])),
        _write(tmp_path / "c.json.gz", _jsonl([{"text": "third"}, {"text": "fourth"}]), gz=True),
        _write(tmp_path / "d.jsonl.gz", _jsonl([{"text": "fifth"}]), gz=True),
        _write(tmp_path / "e.txt", "para one\nstill one\n\n\n\npara two\n"),
        _write(tmp_path / "f.txt.gz", "only para\n", gz=True),
    ]
    docs = list(iter_documents(paths))
    assert [d.text for d in docs] == [
        "first doc", "second doc", "third", "fourth", "fifth", "para one\nstill one", "para two", "only para",
    ]  # fmt: skip
    assert docs[0] == Document("first doc", "https://a.example/1", "2020-01-01T00:00:00Z", str(paths[0]), 1)
    assert (docs[1].line, docs[1].url, docs[1].timestamp) == (2, None, None)  # blank line 1 skipped
    assert [d.line for d in docs[5:7]] == [1, 6]
    assert docs[7].source == str(paths[5])


def test_custom_text_key(tmp_path: Path) -> None:
    p = _write(tmp_path / "a.jsonl", _jsonl([{"content": "hello"}]))
    assert [d.text for d in iter_documents([p], text_key="content")] == ["hello"]


def test_strict_error_names_file_and_line(tmp_path: Path) -> None:
    p = _write(tmp_path / "bad.jsonl", _jsonl([{"text": "ok"}, {"text": "ok"}]) + "{not json\n")
    docs = iter_documents([p])
    assert next(docs).text == "ok"  # streaming: good records come out before the bad one is reached
    next(docs)
    with pytest.raises(CorpusError, match=r"bad\.jsonl:3: bad_json"):
        next(docs)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"[1, 2]", "not_object"),
        (b'{"url": "x"}', "missing_text"),
        (b'{"text": 5}', "missing_text"),
        (b'{"text": "x", "url": 7}', "bad_metadata"),
        (b'{"text": "caf\xe9"}', "bad_utf8"),
    ],
)
def test_strict_reasons(tmp_path: Path, line: bytes, reason: str) -> None:
    p = _write(tmp_path / "x.jsonl", b'{"text": "fine"}\n' + line + b"\n")
    with pytest.raises(CorpusError, match=rf"x\.jsonl:2: {reason}"):
        list(iter_documents([p]))


def test_lenient_counts_by_reason(tmp_path: Path) -> None:
    lines = [
        b'{"text": "good one"}',
        b"{broken",
        b"[1]",
        b'"just a string"',
        b'{"title": "no text"}',
        b'{"text": null}',
        b'{"text": "   "}',
        b'{"text": "bad \xff byte"}',
        b'{"text": "good two"}',
    ]
    p = _write(tmp_path / "mixed.jsonl", b"\n".join(lines) + b"\n")
    counts: Counter = Counter()
    docs = list(iter_documents([p], strict=False, counts=counts))
    assert [(d.text, d.line) for d in docs] == [("good one", 1), ("good two", 9)]
    assert counts == Counter(bad_json=1, not_object=2, missing_text=2, empty_text=1, bad_utf8=1)


def test_lenient_text_with_bad_utf8_block(tmp_path: Path) -> None:
    p = _write(tmp_path / "t.txt", b"good\n\nbad \xff\nline two \xfe\n\nalso good\n")
    counts: Counter = Counter()
    assert [d.text for d in iter_documents([p], strict=False, counts=counts)] == ["good", "also good"]
    assert counts == Counter(bad_utf8=1)
    with pytest.raises(CorpusError, match=r"t\.txt:3: bad_utf8"):
        list(iter_documents([p]))


def test_empty_text_is_skipped_even_in_strict_mode(tmp_path: Path) -> None:
    p = _write(tmp_path / "e.jsonl", _jsonl([{"text": ""}, {"text": "x"}]))
    counts: Counter = Counter()
    assert [d.text for d in iter_documents([p], counts=counts)] == ["x"]
    assert counts == Counter(empty_text=1)


def test_corrupt_gzip_names_file(tmp_path: Path) -> None:
    records = [{"text": f"doc {i} " + "word " * 50} for i in range(2000)]
    data = gzip.compress(_jsonl(records).encode(), mtime=0)
    p = _write(tmp_path / "cut.json.gz", data[: len(data) // 2])
    with pytest.raises(CorpusError, match=r"cut\.json\.gz:\d+: corrupt_gzip: truncated"):
        list(iter_documents([p]))
    # Lenient: the documents before the cut are kept, the damaged file counts once, and the next
    # file is still read.
    good = _write(tmp_path / "good.jsonl", _jsonl([{"text": "after"}]))
    counts: Counter = Counter()
    docs = list(iter_documents([p, good], strict=False, counts=counts))
    assert counts == Counter(corrupt_gzip=1)
    assert 0 < len(docs) - 1 < 2000 and docs[-1].text == "after"
    assert [d.text for d in docs[:-1]] == [r["text"] for r in records[: len(docs) - 1]]
    q = _write(tmp_path / "notgz.json.gz", b"plain text, not gzip\n")
    with pytest.raises(CorpusError, match=r"notgz\.json\.gz:1: corrupt_gzip"):
        list(iter_documents([q]))


def test_nul_bytes(tmp_path: Path) -> None:
    p = _write(
        tmp_path / "n.jsonl", b'{"text": "raw \x00 nul"}\n{"text": "escaped \\u0000 nul"}\n{"text": "ok"}\n'
    )
    counts: Counter = Counter()
    assert [d.text for d in iter_documents([p], strict=False, counts=counts)] == ["ok"]
    assert counts == Counter(nul_byte=2)
    with pytest.raises(CorpusError, match=r"n\.jsonl:1: nul_byte"):
        list(iter_documents([p]))
    t = _write(tmp_path / "n.txt", b"good para\n\nbad\x00 para\nmore\n\nlast\n")
    counts = Counter()
    assert [d.text for d in iter_documents([t], strict=False, counts=counts)] == ["good para", "last"]
    assert counts == Counter(nul_byte=1)


def test_oversize_split_and_skip(tmp_path: Path) -> None:
    big = "\n".join(f"line {i:03d} " + "é" * 20 for i in range(40))  # 40 lines of 50 bytes
    one_long_line = "x" * 250
    p = _write(tmp_path / "o.jsonl", _jsonl([{"text": "small"}, {"text": big}, {"text": one_long_line}]))
    docs = list(iter_documents([p], max_document_bytes=200))
    assert [d.text for d in docs if d.line != 2 or d.part == 0][:1] == ["small"]
    pieces = [d for d in docs if d.line == 2]
    assert [d.part for d in pieces] == list(range(len(pieces))) and len(pieces) == 10
    assert "\n".join(d.text for d in pieces) == big  # split at line breaks, nothing lost
    assert all(len(d.text.encode()) <= 200 for d in docs)
    assert "".join(d.text for d in docs if d.line == 3) == one_long_line  # cut inside a line
    counts: Counter = Counter()
    assert [
        d.text
        for d in iter_documents([p], strict=False, counts=counts, max_document_bytes=200, oversize="skip")
    ] == ["small"]
    assert counts == Counter(oversize=2)
    with pytest.raises(CorpusError, match=r"o\.jsonl:2: oversize"):
        list(iter_documents([p], max_document_bytes=200, oversize="skip"))
    # Multi-byte characters are never cut in half.
    assert split_text("é" * 5, 3) == ["é", "é", "é", "é", "é"]


def test_input_hashes_while_streaming(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.json.gz", _jsonl([{"text": "x"}] * 3), gz=True)
    b = _write(tmp_path / "b.txt", "one\n\ntwo\n")
    hashes: dict[str, str] = {}
    list(iter_documents([a, b], hashes=hashes))
    assert hashes == {str(a): file_sha256(a), str(b): file_sha256(b)}


def test_expand_inputs(tmp_path: Path) -> None:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    names = ["d/b.jsonl", "d/a.json.gz", "d/sub/c.txt", "d/skip.csv", "e.txt"]
    for n in names:
        (tmp_path / n).write_text("x\n")
    d = tmp_path / "d"
    assert expand_inputs(d) == [d / "a.json.gz", d / "b.jsonl", d / "sub" / "c.txt"]
    assert expand_inputs(str(d / "*.json*")) == [d / "a.json.gz", d / "b.jsonl"]
    assert expand_inputs(f"{tmp_path / 'e.txt'},{d / 'b.jsonl'}") == [tmp_path / "e.txt", d / "b.jsonl"]
    assert expand_inputs([tmp_path / "e.txt", tmp_path / "e.txt"]) == [tmp_path / "e.txt"]
    with pytest.raises(FileNotFoundError, match=r"nothing-\*\.jsonl"):
        expand_inputs(str(tmp_path / "nothing-*.jsonl"))
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        expand_inputs(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match=r"skip\.csv.*unsupported"):
        expand_inputs(d / "skip.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        expand_inputs(tmp_path / "empty")


def test_sample_corpus_reads_cleanly(dp_corpus_paths: list[Path]) -> None:
    counts: Counter = Counter()
    docs = list(iter_documents(dp_corpus_paths, counts=counts))
    assert len(docs) == 300 and not counts
    assert all(d.url and d.timestamp for d in docs)
