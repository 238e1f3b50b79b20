"""Masked language modelling (BERT; Devlin et al. 2019, §3.1 and appendix A.1), with RoBERTa's dynamic masking.

A sample is `<cls>` followed by `seq_len - 1` packed stream tokens, whose <eos> document separators become
`<sep>` (RoBERTa's FULL-SENTENCES packing: contiguous text across documents, no next-sentence pairs).
Of the eligible (non-special) positions, `mask_prob` are selected for prediction; a selected position shows
`<mask>` with probability 1 - random_prob - keep_prob, a uniformly drawn non-special token with probability
`random_prob`, and its own token otherwise. The loss sees only the selected positions (labels -100 elsewhere).

Dynamic masking (Liu et al. 2019, RoBERTa §4.1): each sample's mask comes from a generator seeded with
(seed, global sample index). The loader's global index keeps growing across epochs, so a second visit to the
same text draws a new mask, while any dp layout, worker count or resume point draws the same one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

IGNORE_INDEX = -100  # labels value that torch's cross_entropy skips

_WHITESPACE_BYTES = frozenset(f"<0x{b:02X}>" for b in b"\t\n\v\f\r ")
_SPECIAL_KEYS = ("pad_id", "unk_id", "bos_id", "eos_id", "cls_id", "sep_id", "mask_id")


def special_ids(tokenizer: dict[str, Any]) -> np.ndarray:
    """Every reserved id of a manifest tokenizer record (the seven specials and the sentinels), sorted."""
    ids = {int(tokenizer[k]) for k in _SPECIAL_KEYS if k in tokenizer}
    ids.update(int(i) for i in tokenizer.get("sentinel_ids", ()))
    return np.array(sorted(ids), dtype=np.int64)


def resolve_tokenizer_path(path: str | Path, shards_dir: str | Path | None = None) -> Path:
    """The manifest records the path the shards were written with; a relative one may be relative to the
    working directory of that run or to the shards directory."""
    p = Path(path)
    if p.is_absolute() or p.exists() or shards_dir is None:
        return p
    return Path(shards_dir) / p


def word_boundary_tables(tokenizer_path: str | Path, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts_word, is_space), each (vocab_size,) bool. A piece starts a word when sentencepiece marked a
    preceding space on it ("▁..."); byte-fallback whitespace (newline, tab, ...) is a word of its own, so
    the piece after it starts a word too (this tokenizer has no "▁" after a newline)."""
    from data_pipeline.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_path)
    if tok.vocab_size != vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer_path} has {tok.vocab_size} pieces but the manifest says vocab_size={vocab_size}"
        )
    pieces = [tok.id_to_piece(i) for i in range(vocab_size)]
    is_space = np.array([p in _WHITESPACE_BYTES for p in pieces], dtype=bool)
    starts = np.array([p.startswith("▁") for p in pieces], dtype=bool) | is_space
    return starts, is_space


class MaskedLM:
    name = "masked_lm"

    def __init__(
        self,
        *,
        seq_len: int,
        tokenizer: dict[str, Any],
        seed: int,
        mask_prob: float = 0.15,
        random_prob: float = 0.1,
        keep_prob: float = 0.1,
        whole_word: bool = False,
    ):
        problems = []
        if seq_len < 2:
            problems.append(f"seq_len={seq_len} must be >= 2 (<cls> plus at least one token)")
        if not 0.0 < mask_prob < 1.0:
            problems.append(f"mask_prob={mask_prob} must be in (0, 1)")
        if random_prob < 0 or keep_prob < 0 or random_prob + keep_prob > 1:
            problems.append(
                f"random_prob={random_prob} and keep_prob={keep_prob} must be >= 0 and sum to at most 1"
            )
        missing = [k for k in ("vocab_size", "cls_id", "sep_id", "eos_id", "mask_id") if k not in tokenizer]
        if missing:
            problems.append(f"the tokenizer record lacks {', '.join(missing)}")
        if whole_word and "path" not in tokenizer:
            problems.append("whole_word=True needs the tokenizer record's 'path' to find word-initial pieces")
        if problems:
            raise ValueError("masked LM objective: " + "; ".join(problems))

        self.seq_len, self.seed = seq_len, seed
        self.mask_prob, self.random_prob, self.keep_prob = mask_prob, random_prob, keep_prob
        self.whole_word = whole_word
        self.vocab_size = int(tokenizer["vocab_size"])
        self.cls_id, self.sep_id = int(tokenizer["cls_id"]), int(tokenizer["sep_id"])
        self.eos_id, self.mask_id = int(tokenizer["eos_id"]), int(tokenizer["mask_id"])
        self.special = special_ids(tokenizer)
        is_special = np.zeros(self.vocab_size, dtype=bool)
        is_special[self.special[self.special < self.vocab_size]] = True
        self.is_special = is_special  # (vocab,)
        self.ordinary = np.flatnonzero(~is_special)  # ids a "random token" is drawn from
        if len(self.ordinary) == 0:
            raise ValueError("masked LM objective: the vocabulary has no non-special tokens")
        self.word_tables = (
            word_boundary_tables(resolve_tokenizer_path(tokenizer["path"]), self.vocab_size)
            if whole_word
            else None
        )

    @property
    def sample_len(self) -> int:
        # <cls> takes the first position.
        return self.seq_len - 1

    def _target_count(self, n_eligible: int, rng: np.random.Generator) -> int:
        # Stochastic rounding: E[count] = mask_prob * n_eligible exactly, and the count is within one of it.
        # round() would be biased by up to 0.5 / n_eligible on every sample of the same length (0.8% at
        # seq_len 64), a fixed offset that no number of samples averages away.
        x = self.mask_prob * n_eligible
        base = int(np.floor(x))
        return base + int(rng.random() < x - base)

    def _select_tokens(self, eligible: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(positions to predict (k,), their group (k,)): each token is its own group."""
        positions = np.flatnonzero(eligible)
        k = self._target_count(len(positions), rng)
        chosen = np.sort(rng.choice(positions, size=k, replace=False))
        return chosen, np.arange(k)

    def _select_words(
        self, tokens: np.ndarray, eligible: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Whole-word masking (BERT's 2019 release): a word is a run of eligible tokens that begins at a
        "▁" piece, at or after a whitespace byte piece, or right after a special token. Words are taken in random order until the selected token
        count is as close as possible to the target, so a word is always selected whole; its tokens share
        a group (one mask/random/keep decision, so an unmasked piece cannot give the word away)."""
        assert self.word_tables is not None
        starts_word, is_space = self.word_tables
        prev_eligible = np.concatenate([[False], eligible[:-1]])
        after_space = np.concatenate([[False], is_space[tokens[:-1]]])
        starts = eligible & (starts_word[tokens] | after_space | ~prev_eligible)  # (L,)
        word = np.cumsum(starts) - 1  # (L,) word number of each eligible position
        lengths = np.bincount(word[eligible], minlength=int(starts.sum()))  # (W,)
        target = self._target_count(int(eligible.sum()), rng)
        order = rng.permutation(len(lengths))
        cum = np.cumsum(lengths[order])
        take = int(np.searchsorted(cum, target, side="right"))  # the running total stays <= target
        # Add the word that crosses the target when that lands closer to it, so the mean is not biased low.
        if take < len(order) and cum[take] - target < target - (cum[take - 1] if take else 0):
            take += 1
        chosen_words = np.zeros(len(lengths), dtype=bool)
        chosen_words[order[:take]] = True
        positions = np.flatnonzero(eligible & chosen_words[np.maximum(word, 0)])
        return positions, word[positions]

    def __call__(self, samples: np.ndarray, sample_indices: np.ndarray) -> dict[str, np.ndarray]:
        """samples: (n, seq_len - 1) int64 -> input_ids, labels, attention_mask, token_type_ids: (n, seq_len)."""
        n = samples.shape[0]
        if samples.shape[1] != self.sample_len or len(sample_indices) != n:
            raise ValueError(
                f"masked LM objective: expected samples (n, {self.sample_len}) and n indices, got "
                f"{samples.shape} and {len(sample_indices)}"
            )
        tokens = np.empty((n, self.seq_len), dtype=np.int64)  # (n, seq_len)
        tokens[:, 0] = self.cls_id
        tokens[:, 1:] = np.where(samples == self.eos_id, self.sep_id, samples)
        inputs = tokens.copy()
        labels = np.full_like(tokens, IGNORE_INDEX)
        eligible = ~self.is_special[tokens]  # (n, seq_len)
        p_mask = 1.0 - self.random_prob - self.keep_prob
        for row, index in enumerate(sample_indices):
            rng = np.random.default_rng([self.seed, int(index)])
            if self.whole_word:
                pos, group = self._select_words(tokens[row], eligible[row], rng)
            else:
                pos, group = self._select_tokens(eligible[row], rng)
            if len(pos) == 0:
                continue
            # One uniform draw per group decides <mask> / random / unchanged; groups are numbered from 0 up
            # (a word's number among all words; draws for unselected words are simply unused).
            u_tok = rng.random(int(group.max()) + 1)[group]  # (k,)
            labels[row, pos] = tokens[row, pos]
            to_mask = pos[u_tok < p_mask]
            to_random = pos[(u_tok >= p_mask) & (u_tok < p_mask + self.random_prob)]
            inputs[row, to_mask] = self.mask_id
            inputs[row, to_random] = self.ordinary[rng.integers(len(self.ordinary), size=len(to_random))]
        return {
            "input_ids": inputs,
            "labels": labels,
            "attention_mask": np.ones_like(tokens),  # packed: no padding
            "token_type_ids": np.zeros_like(tokens),
        }
