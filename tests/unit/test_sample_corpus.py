"""The sample corpus is deterministic, C4-shaped and internally consistent (so it is learnable)."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import re
from pathlib import Path

from data_pipeline.sample_corpus import _number_words, iter_sample_documents, write_sample_corpus

_WORD_TO_NUMBER = {_number_words(n): n for n in range(200)}


def _number(token: str) -> int:
    token = token.lower()
    return int(token) if token.isdigit() else _WORD_TO_NUMBER[token]


def test_writes_are_byte_identical_and_seed_dependent(tmp_path: Path) -> None:
    a = write_sample_corpus(tmp_path / "a", docs=50, seed=3, docs_per_file=20)
    b = write_sample_corpus(tmp_path / "b", docs=50, seed=3, docs_per_file=20)
    c = write_sample_corpus(tmp_path / "c", docs=50, seed=4, docs_per_file=20)
    assert [p.name for p in a] == ["sample-00000.json.gz", "sample-00001.json.gz", "sample-00002.json.gz"]
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert a[0].read_bytes() != c[0].read_bytes()
    lines = [gzip.decompress(p.read_bytes()).decode().splitlines() for p in a]
    assert [len(x) for x in lines] == [20, 20, 10]


def test_document_i_does_not_depend_on_corpus_size() -> None:
    assert list(iter_sample_documents(docs=3, seed=1)) == list(iter_sample_documents(docs=10, seed=1))[:3]


def test_records_look_like_c4(tmp_path: Path) -> None:
    (path,) = write_sample_corpus(tmp_path, docs=200, seed=0)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 200
    words = []
    for rec in records:
        assert set(rec) == {"text", "url", "timestamp"}
        assert re.fullmatch(r"https://www\.[a-z]+\.[a-z.]+/[a-z0-9-]+", rec["url"]), rec["url"]
        dt.datetime.strptime(rec["timestamp"], "%Y-%m-%dT%H:%M:%SZ")
        lines = rec["text"].split("\n")
        assert len(lines) >= 3
        for line in lines:
            # What C4 cleaning keeps: >= 5 words per line, terminal punctuation.
            assert len(line.split()) >= 5, line
            assert line[-1] in ".?!", line
        words.append(len(rec["text"].split()))
    mean = sum(words) / len(words)
    assert 100 <= mean <= 250, mean
    assert len({r["url"] for r in records}) == 200


def test_facts_are_consistent() -> None:
    """Arithmetic is right, counts run in order, announced list lengths match, names recur."""
    checked = 0
    for rec in iter_sample_documents(docs=300, seed=0):
        text = rec["text"]
        for a, op, b, c in re.findall(
            r"(\w+) (plus|minus|times) (\w+) (?:is|equals) ([\w-]+(?: hundred(?: and [\w-]+)?)?)\.", text
        ):
            a, b, c = _number(a), _number(b), _number(c)
            assert {"plus": a + b, "minus": a - b, "times": a * b}[op] == c, (a, op, b, c)
            checked += 1
        for n, items in re.findall(r"you will need ([\w-]+) things: ([^.]+)\.", text):
            assert len(re.findall(r"\bthe\b", items)) == _number(n)
        for seq in re.findall(r"counted the \w+: ([^.]+)\.", text):
            numbers = [_number(w) for w in seq.split(", ")]
            assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
        first = re.search(r"^([A-Z][a-z]+) [A-Z][a-z]+ is an? ", text, re.MULTILINE)
        assert first is not None
        assert text.count(first.group(1)) >= 2  # introduced, then referred back to
    assert checked > 100


def test_agreement_singular_and_plural() -> None:
    text = "\n".join(d["text"] for d in iter_sample_documents(docs=100, seed=0))
    singular = re.findall(r"The (gardener|chef|coach) (\w+) the", text)
    plural = re.findall(r"The (gardeners|chefs|coaches) (\w+) the", text)
    assert singular and plural
    assert all(verb.endswith("s") for _, verb in singular)
    assert not any(verb.endswith("s") and not verb.endswith("ss") for _, verb in plural)


def test_two_thousand_documents_are_fast() -> None:
    import time

    start = time.perf_counter()
    docs = list(iter_sample_documents(docs=2000, seed=0))
    assert len(docs) == 2000
    assert time.perf_counter() - start < 5.0
