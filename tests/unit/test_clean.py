"""C4 cleaning rules one by one on hand-written pages, their switches and counts, and dedupe."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.clean import (
    CleanConfig,
    CleanError,
    clean_document,
    config_to_dict,
    pages_removed,
    split_sentences,
)
from data_pipeline.dedupe import (
    SignatureWriter,
    apply_removals,
    document_signatures,
    hash64,
    read_removals,
    resolve_bucket,
)
from data_pipeline.pipeline import ordinal
from tests.oracle.serial_clean import Deduper, HashSet64

# Three sentences of five or more words each: a page that survives every rule.
GOOD = [
    "The river runs past the old mill every spring.",
    "Farmers bring their grain to the market on Fridays.",
    "Children play near the water when the weather is warm!",
]


def _page(*extra: str) -> str:
    return "\n".join([*GOOD, *extra])


def _clean(text: str, cfg: CleanConfig | None = None) -> tuple[str | None, Counter]:
    counts: Counter = Counter()
    return clean_document(text, cfg or CleanConfig(), counts), counts


def test_good_page_passes_unchanged() -> None:
    out, counts = _clean("  " + _page() + "  \n\n")
    assert out == _page() and counts == Counter()


@pytest.mark.parametrize(
    ("line", "rule"),
    [
        ("Click here to read more about the mill", "line_no_terminal_punct"),
        ("And then the story goes on and on...", "line_no_terminal_punct"),
        ("Too short a line.", "line_too_few_words"),
        ("Four words only here.", "line_too_few_words"),
        ("This page has a " + "x" * 1001 + " word in it.", "line_long_word"),
        ("Please enable JavaScript to view the comments here.", "line_javascript"),
        ("By using this site you agree to our Terms of Use.", "line_policy"),
        ("Read our privacy policy before you sign up today.", "line_policy"),
        ("See the cookie policy for the details of tracking.", "line_policy"),
        ("This website uses cookies to improve your experience.", "line_policy"),
        ("We explain our use of cookies in the long notice.", "line_policy"),
        ("We use cookies to remember the choices you make.", "line_policy"),
    ],
)
def test_line_rules(line: str, rule: str) -> None:
    out, counts = _clean(_page(line))
    assert out == _page(), rule
    assert counts == Counter({rule: 1})


def test_line_rule_boundaries() -> None:
    # Exactly five words, exactly 1000 characters, a closing quote and ? ! are all kept.
    kept = [
        "Five words make a line.",
        "A " + "y" * 1000 + " word is still fine here.",
        'He said that it was "fine"',
        "Is this a question we keep?",
    ]
    out, counts = _clean(_page(*kept))
    assert out == _page(*kept) and counts == Counter()


def test_citation_markers_removed() -> None:
    out, counts = _clean(
        _page("The mill was built in 1820.[1] It burned down once.[edit][23][citation needed]")
    )
    assert out == _page("The mill was built in 1820. It burned down once.")
    assert counts == Counter(citation_markers=4)
    # A marker at the end hides no terminal mark: removed first, then the line is judged.
    out, _ = _clean(_page("The mill was rebuilt in stone after that.[2]"))
    assert out == _page("The mill was rebuilt in stone after that.")


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        (_page("Lorem ipsum dolor sit amet, consectetur adipiscing."), "page_lorem_ipsum"),
        (_page("The function is defined as f(x) { return x; }."), "page_curly_brace"),
        ("\n".join(GOOD[:2]), "page_too_few_sentences"),
        ("menu\nhome\nabout us", "page_too_few_sentences"),
    ],
)
def test_page_rules(text: str, rule: str) -> None:
    out, counts = _clean(text)
    assert out is None and counts[rule] == 1
    assert pages_removed(counts) == 1


def test_curly_brace_only_counts_in_kept_lines() -> None:
    # As in C4's implementation: a "{" in a line that the line rules drop does not drop the page.
    out, counts = _clean(_page("var x = {}"))
    assert out == _page() and counts == Counter(line_no_terminal_punct=1)


def test_sentences_are_counted_within_lines() -> None:
    # One line holding three sentences is enough.
    line = "The mill is old. It still turns today. People visit it often."
    assert split_sentences(line) == ["The mill is old.", "It still turns today.", "People visit it often."]
    out, _ = _clean(line)
    assert out == line
    assert split_sentences('He asked "why?" and left. Then rain.\nNo end mark') == [
        'He asked "why?"',
        "and left.",
        "Then rain.",
        "No end mark",
    ]


def test_bad_words_whole_words_only(tmp_path: Path) -> None:
    words = tmp_path / "bad.txt"
    words.write_text("# comment\nmill\n\nold stone\n")
    cfg = CleanConfig(bad_words_path=str(words))
    out, counts = _clean(_page(), cfg)
    assert out is None and counts == Counter(page_bad_words=1)
    other = "\n".join(s.replace("mill", "windmill") for s in GOOD)  # "mill" inside a word: kept
    assert _clean(other, cfg)[0] == other
    assert _clean(other + "\nWe walked past the OLD STONE bridge.", cfg)[0] is None  # phrases, any case
    assert config_to_dict(cfg)["bad_words_sha256"]


def _english_only(text: str) -> bool:
    return "the" in text.split()


def test_language_filter_hook() -> None:
    cfg = CleanConfig(language_filter=_english_only)
    assert _clean(_page(), cfg)[0] == _page()
    german = "Der Fluss fließt an der Mühle vorbei.\nDie Bauern bringen das Korn zum Markt.\nDie Kinder spielen am Wasser heute."
    out, counts = _clean(german, cfg)
    assert out is None and counts == Counter(page_language=1)
    assert config_to_dict(cfg)["language_filter"].endswith("test_clean._english_only")


def test_every_rule_can_be_switched_off() -> None:
    off = CleanConfig(
        terminal_punct=False,
        min_words_per_line=0,
        max_word_length=0,
        drop_javascript_lines=False,
        drop_policy_lines=False,
        remove_citations=False,
        min_sentences=0,
        drop_lorem_ipsum=False,
        drop_curly_brace=False,
    )
    text = "menu\njavascript {x} lorem ipsum [1]\nprivacy policy\n" + "z" * 2000
    out, counts = _clean(text, off)
    assert out == text and counts == Counter()


def test_config_is_validated() -> None:
    with pytest.raises(CleanError, match=r"min_words_per_line=-1 .*bad_words_path='/nope'"):
        CleanConfig(min_words_per_line=-1, bad_words_path="/nope")


# ------------------------------------------------------------------------------------------- dedupe


def _staged(
    pieces: list[list[str]],
    tmp: Path,
    *,
    documents: bool = True,
    span: int = 3,
    min_sentences: int = 3,
    buckets: int = 4,
    chunk: int = 1 << 16,
    fan_in: int = 64,
    spill: int = 1 << 18,
) -> tuple[list[list[str | None]], Counter, int]:
    """The three dedupe stages of data_pipeline.pipeline on in-memory pieces (lists of cleaned
    documents, in corpus order), run with the real signature writer, bucket resolver and removal reader."""
    for t, docs in enumerate(pieces):
        sigs = SignatureWriter(tmp / "sig", t, buckets, spill_records=spill)
        for i, text in enumerate(docs):
            sigs.add(ordinal(0, t, i), document_signatures(text, documents=documents, span=span))
        sigs.flush()
    hashes = 0
    for b in range(buckets):
        runs = sorted((tmp / "sig" / f"b{b:05d}").glob("*.sig"))
        hashes += resolve_bucket(runs, tmp / "rm", b, budget=chunk, fan_in=fan_in, spill_records=spill)[
            "hashes"
        ]
    counts: Counter = Counter()
    out = []
    runs = sorted((tmp / "rm").glob("*.rm"))
    for t, docs in enumerate(pieces):
        lo = ordinal(0, t, 0)
        removals = read_removals(runs, lo, ordinal(0, t + 1, 0))
        out.append(
            [
                apply_removals(
                    text, removals.get(lo + i, ()), span=span, min_sentences=min_sentences, counts=counts
                )
                for i, text in enumerate(docs)
            ]
        )
    return out, counts, hashes


def test_exact_document_dedupe(tmp_path: Path) -> None:
    (out,), counts, _ = _staged([["a page.", "a page.", "a page!"]], tmp_path, span=0)
    assert out == ["a page.", None, "a page!"]
    assert counts == Counter(page_duplicate=1)


def test_repeated_three_sentence_span_removed_keeping_first(tmp_path: Path) -> None:
    first = "One is here. Two is there.\nThree is near. Four is far."
    # Shares "Two is there. / Three is near. / Four is far." (across a line break, as written).
    second = "Five is new. Two is there.\nThree is near. Four is far. Six is new. Seven too."
    # Two shared sentences are not a three-sentence span: nothing removed.
    third = "Eight. One is here. Two is there. Nine."
    # A page left with fewer than min_sentences is dropped and counted.
    fourth = "Zero is here. One is here. Two is there.\nThree is near."
    (out,), counts, _ = _staged([[first, second, third, fourth]], tmp_path)
    assert out == [first, "Five is new.\nSix is new. Seven too.", third, None]
    assert counts == Counter(span_sentences_removed=3 + 3, page_too_few_sentences_after_dedupe=1)
    assert pages_removed(counts) == 1


def test_first_copy_in_corpus_order_survives_whatever_the_partitioning(tmp_path: Path) -> None:
    """A span first seen in a later piece's text but an earlier piece's position: position wins. Within
    one document a repeated window goes too. The same decisions for any bucket count."""
    span = "Alpha rises early. Beta follows soon. Gamma ends it."
    early = f"Intro one here. {span} Outro one here."  # piece 0: the corpus-order first copy
    twice = f"{span} Middle part here. {span}"  # piece 1: once more, and repeated inside itself
    results = []
    for buckets in (1, 2, 5):
        out, counts, hashes = _staged([[early], ["Other words here. More words there. Last words now.", twice]],
                                      tmp_path / str(buckets), buckets=buckets)  # fmt: skip
        results.append((out, counts, hashes))
        assert out[0] == [early]
        assert out[1][1] is None  # only "Middle part here." would be left: fewer than 3 sentences
        assert counts["span_sentences_removed"] == 6  # both later copies of the span
    assert results[0] == results[1] == results[2]
    serial = Deduper()
    assert [serial.process(d, Counter()) for d in [early, "Other words here. More words there. Last words now.", twice]] == [
        early, "Other words here. More words there. Last words now.", None
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("buckets", "pieces", "chunk", "fan_in", "spill"),
    [(1, 1, 1 << 16, 64, 1 << 18), (3, 4, 7, 2, 5), (8, 7, 16, 3, 50)],
)
def test_staged_dedupe_equals_the_serial_pass(
    tmp_path: Path, buckets: int, pieces: int, chunk: int, fan_in: int, spill: int
) -> None:
    """Random pages over a small sentence vocabulary (many repeated spans and whole pages) through the
    staged dedupe, with tiny chunks, spills and fan-in so that groups cross chunks and runs are merged
    in several levels, against the serial oracle: the same pages, counts and hash count."""
    rng = np.random.default_rng(buckets)
    vocab = [f"Sentence number {i} is here." for i in range(12)]
    docs = []
    for _ in range(120):
        if docs and rng.random() < 0.1:
            docs.append(docs[int(rng.integers(len(docs)))])  # an exact duplicate page
            continue
        n = int(rng.integers(2, 9))
        sents = [vocab[int(j)] for j in rng.integers(0, len(vocab), size=n)]
        cut = int(rng.integers(1, n))
        docs.append(" ".join(sents[:cut]) + "\n" + " ".join(sents[cut:]))
    serial = Deduper(documents=True, span=3, min_sentences=3)
    serial_counts: Counter = Counter()
    expected = [serial.process(d, serial_counts) for d in docs]
    bounds = np.linspace(0, len(docs), pieces + 1).astype(int)
    split = [docs[a:b] for a, b in itertools.pairwise(bounds)]
    out, counts, hashes = _staged(split, tmp_path, buckets=buckets, chunk=chunk, fan_in=fan_in, spill=spill)
    assert [d for piece in out for d in piece] == expected
    assert counts == serial_counts and serial_counts["span_sentences_removed"] > 50
    assert hashes == len(serial)


def test_hash_set_matches_python_set() -> None:
    rng = np.random.default_rng(0)
    values = [int(v) for v in rng.integers(0, 2**63, size=5000, dtype=np.int64)]
    values += values[:1000]  # repeats
    hs = HashSet64(min_buffer=64)  # small buffer: many merges
    ref: set[int] = set()
    for v in values:
        assert hs.add(v) == (v not in ref)
        ref.add(v)
    assert len(hs) == len(ref) and all(v in hs for v in ref)
    assert 2**64 - 1 not in hs
    assert hs.nbytes < 20 * len(ref)
    assert hash64("x") == hash64("x") != hash64("y") and 0 <= hash64("x") < 2**64
