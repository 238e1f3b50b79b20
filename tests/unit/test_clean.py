"""C4 cleaning rules one by one on hand-written pages, their switches and counts, and dedupe."""

from __future__ import annotations

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
from data_pipeline.dedupe import Deduper, HashSet64, hash64

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


def test_exact_document_dedupe() -> None:
    d = Deduper(span=0)
    counts: Counter = Counter()
    assert d.process("a page.", counts) == "a page."
    assert d.process("a page.", counts) is None
    assert d.process("a page!", counts) == "a page!"
    assert counts == Counter(page_duplicate=1)


def test_repeated_three_sentence_span_removed_keeping_first() -> None:
    d = Deduper(documents=True, span=3, min_sentences=3)
    counts: Counter = Counter()
    first = "One is here. Two is there.\nThree is near. Four is far."
    assert d.process(first, counts) == first
    # Shares "Two is there. / Three is near. / Four is far." (across a line break, as written).
    second = "Five is new. Two is there.\nThree is near. Four is far. Six is new. Seven too."
    assert d.process(second, counts) == "Five is new.\nSix is new. Seven too."
    assert counts == Counter(span_sentences_removed=3)
    # Two shared sentences are not a three-sentence span: nothing removed.
    third = "Eight. One is here. Two is there. Nine."
    assert d.process(third, counts) == third
    # A page left with fewer than min_sentences is dropped and counted.
    assert d.process("Zero is here. One is here. Two is there.\nThree is near.", counts) is None
    assert counts["page_too_few_sentences_after_dedupe"] == 1
    assert pages_removed(counts) == 1


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
