"""Tokenizer: reserved ids, exact round trips, byte fallback, both model types, determinism."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import sentencepiece as spm

from data_pipeline.corpus import iter_documents
from data_pipeline.sample_corpus import iter_sample_documents
from data_pipeline.tokenizer import (
    RESERVED_TOKENS,
    Tokenizer,
    TokenizerError,
    evaluate_tokenizer,
    reservoir_sample,
    train_tokenizer,
)

# Must match tests/unit/conftest.py (conftest modules are not importable without packages).
DP_VOCAB_SIZE = 512

ODD_TEXTS = [
    "",
    "  two leading spaces and two  inside  ",
    "tabs\tand\nnewlines\n\nand a trailing newline\n",
    "日本語 ☃ and émigré naïve café",
    "digits 12345 + 678 = 13023!",
    "Ünïcödé NFKC-foldable: ﬁ ① ｗｉｄｅ",
]


def test_reserved_ids(dp_tokenizer_path: Path) -> None:
    tok = Tokenizer(dp_tokenizer_path)
    assert tok.vocab_size == DP_VOCAB_SIZE
    ids = (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.cls_id, tok.sep_id, tok.mask_id)
    assert ids == (0, 1, 2, 3, 4, 5, 6)
    assert [tok.id_to_piece(i) for i in range(7)] == list(RESERVED_TOKENS)
    assert tok.sentinel_ids == list(range(7, 107))
    assert [tok.id_to_piece(i) for i in (7, 8, 106)] == ["<extra_id_0>", "<extra_id_1>", "<extra_id_99>"]
    assert tok.piece_to_id("<extra_id_42>") == 49
    assert tok.special_ids == frozenset(range(107))
    assert len(tok.sha256) == 64
    assert Tokenizer.load(dp_tokenizer_path).sha256 == tok.sha256
    assert dp_tokenizer_path.with_suffix(".vocab").read_text(encoding="utf-8").count("\n") == DP_VOCAB_SIZE


def test_reserved_tokens_in_text_are_single_pieces(dp_tokenizer_path: Path) -> None:
    tok = Tokenizer(dp_tokenizer_path)
    for piece in ["<cls>", "<sep>", "<mask>", "<extra_id_0>", "<extra_id_99>"]:
        ids = tok.encode(f"the plant<{piece[1:]} grows")
        assert tok.piece_to_id(piece) in ids, piece
        assert tok.encode(piece) == [tok.piece_to_id(piece)]


def test_round_trip_sample_documents(dp_tokenizer_path: Path, dp_corpus_paths: list[Path]) -> None:
    tok = Tokenizer(dp_tokenizer_path)
    texts = [d.text for d in iter_documents(dp_corpus_paths)][:50]
    encoded = tok.encode_batch(texts)
    assert encoded == [tok.encode(t) for t in texts]
    for text, ids in zip(texts, encoded, strict=True):
        assert tok.decode(ids) == text
        assert tok.unk_id not in ids
    # The vocabulary learned something: far fewer tokens than UTF-8 bytes.
    assert sum(map(len, encoded)) < 0.6 * sum(len(t.encode()) for t in texts)


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_round_trip_odd_text(dp_tokenizer_path: Path, text: str) -> None:
    tok = Tokenizer(dp_tokenizer_path)
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == text


def test_byte_fallback_for_unseen_characters(dp_tokenizer_path: Path) -> None:
    tok = Tokenizer(dp_tokenizer_path)
    pieces = [tok.id_to_piece(i) for i in tok.encode("☃")]
    assert pieces == ["<0xE2>", "<0x98>", "<0x83>"]  # UTF-8 of U+2603
    assert [tok.id_to_piece(i) for i in tok.encode("\n")] == ["<0x0A>"]


def test_bpe_and_custom_sentinels(dp_corpus_paths: list[Path], tmp_path: Path) -> None:
    path = train_tokenizer(
        dp_corpus_paths, vocab_size=400, out_prefix=tmp_path / "bpe", model_type="bpe", num_sentinels=3
    )
    tok = Tokenizer(path, num_sentinels=3)
    assert tok.sentinel_ids == [7, 8, 9]
    assert tok.special_ids == frozenset(range(10))
    assert tok.vocab_size == 400
    for text in [*ODD_TEXTS, next(iter_documents(dp_corpus_paths)).text]:
        assert tok.decode(tok.encode(text)) == text
    with pytest.raises(TokenizerError, match=r"<extra_id_3>.*id 10"):
        Tokenizer(path, num_sentinels=5)


def test_training_is_deterministic(dp_corpus_paths: list[Path], tmp_path: Path) -> None:
    a = train_tokenizer(dp_corpus_paths, vocab_size=DP_VOCAB_SIZE, out_prefix=tmp_path / "one" / "a")
    b = train_tokenizer(dp_corpus_paths, vocab_size=DP_VOCAB_SIZE, out_prefix=tmp_path / "two" / "b")
    assert a.read_bytes() == b.read_bytes()  # independent of the output path, too
    c = train_tokenizer(
        dp_corpus_paths, vocab_size=DP_VOCAB_SIZE, out_prefix=tmp_path / "c", seed=0, max_documents=100
    )
    assert Tokenizer(c).sha256 != Tokenizer(a).sha256


def test_bad_options_are_reported(dp_corpus_paths: list[Path], tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"vocab_size=300 is too small.*107 reserved.*>= 364"):
        train_tokenizer(dp_corpus_paths, vocab_size=300, out_prefix=tmp_path / "x")
    with pytest.raises(TokenizerError, match=r"model_type='word'"):
        train_tokenizer(dp_corpus_paths, vocab_size=600, out_prefix=tmp_path / "x", model_type="word")  # type: ignore[arg-type]
    # Fits the reserved and byte pieces but not the corpus's characters: sentencepiece's own error.
    with pytest.raises(TokenizerError, match=r"vocab_size=370"):
        train_tokenizer(dp_corpus_paths, vocab_size=370, out_prefix=tmp_path / "x")
    assert not (tmp_path / "x.model").exists()


def test_foreign_model_is_rejected(dp_corpus_paths: list[Path], tmp_path: Path) -> None:
    lines = [d.text.split("\n")[0] for d in iter_documents(dp_corpus_paths)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(tmp_path / "plain"), vocab_size=200, minloglevel=2
    )
    with pytest.raises(TokenizerError, match=r"'<pad>' must have id 0 but is absent \(id 0 holds '<unk>'\)"):
        Tokenizer(tmp_path / "plain.model")
    with pytest.raises(FileNotFoundError, match=r"nope\.model"):
        Tokenizer(tmp_path / "nope.model")


def test_reservoir_sample_is_uniform_bounded_and_deterministic() -> None:
    assert reservoir_sample(iter(["a", "b"]), 5, seed=0) == ["a", "b"]
    sample = reservoir_sample((str(i) for i in range(100_000)), 100, seed=3)
    assert len(sample) == 100 and sample == reservoir_sample((str(i) for i in range(100_000)), 100, seed=3)
    # Uniform: each half of the stream supplies about half of the sample (binomial sd 5).
    assert 30 <= sum(int(x) < 50_000 for x in sample) <= 70
    hits = Counter(x for seed in range(2000) for x in reservoir_sample(iter("abcdefghij"), 3, seed=seed))
    assert all(500 <= hits[c] <= 700 for c in "abcdefghij")  # each kept with p=0.3: 600 expected, sd 20


def test_reservoir_training_and_evaluation(dp_corpus_paths: list[Path], tmp_path: Path) -> None:
    kw = {"vocab_size": DP_VOCAB_SIZE, "sampling": "reservoir", "input_sentence_size": 500}
    path = train_tokenizer(dp_corpus_paths, out_prefix=tmp_path / "r", **kw)
    again = train_tokenizer(dp_corpus_paths, out_prefix=tmp_path / "r2", **kw)
    assert path.read_bytes() == again.read_bytes()
    held_out = [d["text"] for d in iter_sample_documents(docs=50, seed=99)]
    report = evaluate_tokenizer(Tokenizer(path), held_out)
    assert report["coverage"] > 0.99 and 1.2 < report["bytes_per_token"] < 10  # 512 pieces: short ones
    # A character never seen in training is spelled in bytes: coverage counts exactly those bytes.
    odd = evaluate_tokenizer(Tokenizer(path), ["☃☃"])
    assert odd["coverage"] == 0.0 and odd["tokens"] == 6 and odd["bytes_per_token"] == 1.0
    with pytest.raises(TokenizerError, match=r"sampling='all'.*input_sentence_size=0"):
        train_tokenizer(
            dp_corpus_paths,
            vocab_size=600,
            out_prefix=tmp_path / "x",
            sampling="all",
            input_sentence_size=0,  # type: ignore[arg-type]
        )
