"""Train and load the sentencepiece tokenizer, with Tandem's reserved tokens at fixed ids.

All three objectives share one vocabulary, so the reserved ids are fixed once here and checked on
every load: ``<pad>``=0, ``<unk>``=1, ``<s>``=2, ``</s>``=3, ``<cls>``=4, ``<sep>``=5, ``<mask>``=6,
then the T5 sentinels ``<extra_id_0>`` .. ``<extra_id_{N-1}>`` at 7 .. 6+N. A model trained elsewhere
with other ids would silently mask the wrong token, hence the loud check in :class:`Tokenizer`.

Text round-trips exactly: ``decode(encode(text)) == text`` for any string. Training uses the
``identity`` normalization (no NFKC folding), keeps repeated/leading/trailing whitespace
(``remove_extra_whitespaces=False``) and adds no dummy prefix space, and ``byte_fallback`` spells any
character outside the vocabulary (newlines, tabs, rare scripts, emoji) as UTF-8 byte pieces instead of
``<unk>``. The cost: a word at the very start of a text is a different piece sequence than the same
word after a space, which is what byte-level GPT tokenizers do too. ``split_digits`` gives every digit
its own piece so arithmetic in the corpus is learnable.

The reserved tokens after ``</s>`` are sentencepiece *user-defined symbols*: they are never split, so
the literal text ``<mask>`` in a document also encodes to the mask id.
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import sentencepiece as spm

from data_pipeline.corpus import iter_documents
from data_pipeline.manifest import file_sha256

__all__ = [
    "RESERVED_TOKENS",
    "Tokenizer",
    "TokenizerError",
    "evaluate_tokenizer",
    "reserved_pieces",
    "reservoir_sample",
    "train_tokenizer",
]

# Tokens with fixed ids 0..6; the sentinels follow at 7...
RESERVED_TOKENS: tuple[str, ...] = ("<pad>", "<unk>", "<s>", "</s>", "<cls>", "<sep>", "<mask>")
_NUM_BYTE_PIECES = 256


class TokenizerError(ValueError):
    """A tokenizer model or training request is unusable; the message names the file or option."""


def reserved_pieces(num_sentinels: int) -> list[str]:
    """The reserved pieces in id order: ``RESERVED_TOKENS`` then ``<extra_id_0>`` ..."""
    return [*RESERVED_TOKENS, *(f"<extra_id_{i}>" for i in range(num_sentinels))]


def _training_sentences(inputs: Sequence[Path], *, max_documents: int, strict: bool) -> Iterator[str]:
    # sentencepiece trains on "sentences"; a C4 line (a paragraph) is the natural unit and keeps
    # lines short enough for its max_sentence_length.
    for n, doc in enumerate(iter_documents(inputs, strict=strict)):
        if n >= max_documents:
            return
        for line in doc.text.split("\n"):
            if line.strip():
                yield line


def reservoir_sample(items: Iterable[str], k: int, *, seed: int) -> list[str]:
    """A uniform sample of ``k`` items from a stream of unknown length, holding only ``k`` in memory.

    Vitter's Algorithm R: item ``i`` (0-based) replaces a random slot with probability ``k / (i+1)``.
    Deterministic for a given stream and seed. The sample keeps stream order of its slots, not of
    the corpus; sentencepiece shuffles its input anyway.
    """
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    rng = random.Random(seed)
    sample: list[str] = []
    for i, item in enumerate(items):
        if i < k:
            sample.append(item)
        else:
            j = rng.randrange(i + 1)
            if j < k:
                sample[j] = item
    return sample


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def train_tokenizer(
    inputs: Sequence[Path],
    *,
    vocab_size: int,
    out_prefix: str | Path,
    model_type: Literal["unigram", "bpe"] = "unigram",
    num_sentinels: int = 100,
    max_documents: int = 100_000,
    seed: int = 0,
    input_sentence_size: int = 2_000_000,
    character_coverage: float = 0.9995,
    num_threads: int = 1,
    strict: bool = True,
    sampling: Literal["first", "reservoir"] = "first",
) -> Path:
    """Train a sentencepiece model on the first ``max_documents`` documents of ``inputs``.

    Writes ``PREFIX.model`` and ``PREFIX.vocab`` (each atomically) and returns the
    ``.model`` path. Of the documents read, at most ``input_sentence_size`` lines are sampled
    (shuffled with ``seed``). Training is deterministic: the same inputs, seed and options give a
    byte-identical model file. ``num_threads`` is one of those options (it is recorded in the model
    and changes how pieces are scored), so keep it fixed when you need a reproducible hash.

    With ``sampling="first"`` (the default) the documents taken are the first ``max_documents`` in
    stream order, which reads only that prefix of the corpus; shuffle the input file order if the
    files are sorted by something that matters (site, date). ``sampling="reservoir"`` instead reads
    the whole corpus once (``max_documents`` is then ignored) and keeps a uniform sample of
    ``input_sentence_size`` lines (:func:`reservoir_sample`), so memory stays bounded by the sample,
    not the corpus.
    """
    reserved = reserved_pieces(num_sentinels)
    problems = []
    if model_type not in ("unigram", "bpe"):
        problems.append(f"model_type={model_type!r} must be 'unigram' or 'bpe'")
    if num_sentinels < 0:
        problems.append(f"num_sentinels={num_sentinels} must be >= 0")
    minimum = len(reserved) + _NUM_BYTE_PIECES + 1
    if vocab_size < minimum:
        problems.append(
            f"vocab_size={vocab_size} is too small: {len(reserved)} reserved tokens "
            f"({len(RESERVED_TOKENS)} specials + {num_sentinels} sentinels) and {_NUM_BYTE_PIECES} byte "
            f"pieces leave no room for learned pieces; use vocab_size >= {minimum} (in practice a few hundred more)"
        )
    if max_documents < 1:
        problems.append(f"max_documents={max_documents} must be >= 1")
    if sampling not in ("first", "reservoir"):
        problems.append(f"sampling={sampling!r} must be 'first' or 'reservoir'")
    if input_sentence_size < 1:
        problems.append(f"input_sentence_size={input_sentence_size} must be >= 1")
    if num_threads < 1:
        problems.append(f"num_threads={num_threads} must be >= 1")
    if problems:
        raise TokenizerError("cannot train tokenizer: " + "; ".join(problems))

    model_path = Path(f"{out_prefix}.model")
    vocab_path = Path(f"{out_prefix}.vocab")
    model_path.parent.mkdir(parents=True, exist_ok=True)
    # The model proto records its trainer options, including model_prefix; writing through
    # model_writer keeps output paths out of the file, so the bytes (and sha256) depend only on the
    # data and the options below.
    model_bytes = io.BytesIO()
    spm.set_random_generator_seed(seed)
    if sampling == "reservoir":
        lines = _training_sentences(inputs, max_documents=2**62, strict=strict)
        sentences: Iterator[str] = iter(reservoir_sample(lines, input_sentence_size, seed=seed))
    else:
        sentences = _training_sentences(inputs, max_documents=max_documents, strict=strict)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences,
            model_writer=model_bytes,
            model_type=model_type,
            vocab_size=vocab_size,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            pad_piece="<pad>",
            unk_piece="<unk>",
            bos_piece="<s>",
            eos_piece="</s>",
            user_defined_symbols=reserved[4:],
            byte_fallback=True,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            split_digits=True,
            character_coverage=character_coverage,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            max_sentence_length=1 << 16,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise TokenizerError(
            f"sentencepiece could not train a {model_type} model with vocab_size={vocab_size} "
            f"on {len(inputs)} input file(s): {exc}"
        ) from exc
    sp = spm.SentencePieceProcessor(model_proto=model_bytes.getvalue())
    # Same layout as sentencepiece's own .vocab: "piece<TAB>score" per id, for people to read.
    vocab_text = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
    _atomic_write(vocab_path, vocab_text.encode("utf-8"))
    _atomic_write(model_path, model_bytes.getvalue())
    # Fail now, not at the first training step, if sentencepiece placed a reserved piece elsewhere.
    Tokenizer(model_path, num_sentinels=num_sentinels)
    return model_path


class Tokenizer:
    """A loaded sentencepiece model with Tandem's reserved ids verified.

    ``num_sentinels`` is read from the model (the run of ``<extra_id_k>`` pieces from id 7); pass it
    to also require an exact count.
    """

    def __init__(self, path: str | Path, *, num_sentinels: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer model {self.path} does not exist")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(self.path))
        except (OSError, RuntimeError) as exc:
            raise TokenizerError(f"{self.path}: not a sentencepiece model ({exc})") from exc
        self.sha256 = file_sha256(self.path)
        self._check_reserved(num_sentinels)

    @classmethod
    def load(cls, path: str | Path, *, num_sentinels: int | None = None) -> Tokenizer:
        return cls(path, num_sentinels=num_sentinels)

    def _check_reserved(self, num_sentinels: int | None) -> None:
        sp = self._sp
        n = 0
        while len(RESERVED_TOKENS) + n < sp.get_piece_size() and sp.id_to_piece(len(RESERVED_TOKENS) + n) == (
            f"<extra_id_{n}>"
        ):
            n += 1
        expected = reserved_pieces(n if num_sentinels is None else num_sentinels)
        for want_id, piece in enumerate(expected):
            found = sp.piece_to_id(piece)
            # piece_to_id returns unk's id for unknown pieces, hence the second check.
            if found != want_id or sp.id_to_piece(want_id) != piece:
                found_text = "absent" if sp.id_to_piece(found) != piece else f"at id {found}"
                raise TokenizerError(
                    f"{self.path}: reserved token {piece!r} must have id {want_id} but is {found_text} "
                    f"(id {want_id} holds {sp.id_to_piece(want_id)!r}); train it with data_pipeline.tokenizer"
                )
        self._sentinel_ids = list(range(len(RESERVED_TOKENS), len(expected)))

    # Ids of the reserved tokens; fixed by RESERVED_TOKENS and verified at load.
    pad_id = property(lambda self: 0)
    unk_id = property(lambda self: 1)
    bos_id = property(lambda self: 2)
    eos_id = property(lambda self: 3)
    cls_id = property(lambda self: 4)
    sep_id = property(lambda self: 5)
    mask_id = property(lambda self: 6)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def sentinel_ids(self) -> list[int]:
        """``<extra_id_0>``, ``<extra_id_1>``, ... in that order (T5 uses them from the first)."""
        return list(self._sentinel_ids)

    @property
    def special_ids(self) -> frozenset[int]:
        """Every reserved id: never a target of MLM replacement or a sampled "random token"."""
        return frozenset(range(len(RESERVED_TOKENS))) | frozenset(self._sentinel_ids)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str], *, num_threads: int = 1) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        if not 0 <= token_id < self.vocab_size:
            raise IndexError(f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})")
        return self._sp.id_to_piece(int(token_id))

    def piece_to_id(self, piece: str) -> int:
        return self._sp.piece_to_id(piece)

    def describe(self) -> dict:
        """The JSON description stored in shard manifests and checkpoints."""
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "pad_id": self.pad_id,
            "unk_id": self.unk_id,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "cls_id": self.cls_id,
            "sep_id": self.sep_id,
            "mask_id": self.mask_id,
            "sentinel_ids": self.sentinel_ids,
        }

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]}...)"


def evaluate_tokenizer(tok: Tokenizer, texts: Iterable[str]) -> dict[str, float | int]:
    """Bytes per token and coverage of ``tok`` on held-out ``texts``.

    ``coverage`` is the fraction of UTF-8 bytes encoded by learned pieces rather than byte-fallback
    pieces (``<0xNN>``, one byte each): a tokenizer trained on too small or too different a sample
    falls back to bytes more often, which costs sequence length.
    """
    sp = tok._sp
    byte_ids = {i for i in range(tok.vocab_size) if sp.is_byte(i)}
    total_bytes = tokens = fallback = 0
    for text in texts:
        ids = tok.encode(text)
        total_bytes += len(text.encode("utf-8"))
        tokens += len(ids)
        fallback += sum(1 for i in ids if i in byte_ids)
    if not tokens:
        raise TokenizerError("evaluate_tokenizer: the held-out texts are empty")
    return {
        "bytes": total_bytes,
        "tokens": tokens,
        "bytes_per_token": total_bytes / tokens,
        "coverage": 1.0 - fallback / total_bytes,
    }
