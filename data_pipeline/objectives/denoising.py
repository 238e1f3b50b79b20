"""BART's denoising objective (Lewis et al. 2020, §2.2 and §3.1: text infilling + sentence permutation, the
combination BART-large was pretrained with), objective `bart` (the bart family's default).

A raw sample is `seq_len - 1` packed stream tokens (documents separated by <eos>); the target is that text
followed by <eos>. The encoder reads a corrupted copy:

1. sentence permutation: the sample is cut after every sentence end (a piece ending in ".", "!" or "?",
   and every <eos>) and the sentences are shuffled (the last, unfinished one is a sentence too);
2. text infilling: span lengths are drawn from Poisson(λ = 3) and each span is replaced by ONE <mask> token;
   a length-0 span inserts a <mask>. Spans are drawn until `mask_ratio` = 30% of the sample's non-special
   tokens (stochastically rounded) are masked; the span that reaches the budget is kept whole, so a
   sample masks at least its budget and less than budget + its last span, and the realized lengths stay an
   unbiased Poisson sample (Wald's identity; trimming the last span as fairseq does would bias it short).
   A span starts uniformly among the places where it fits on unmasked tokens without crossing an <eos>
   or an inserted <mask> (the longest window that fits if there is none); an insertion goes before a
   uniformly chosen unmasked token (or at the end) that has none yet. Spans therefore never overlap, and
   every <mask> of the input stands for exactly one span.

The encoder input is the corrupted text + <eos>, right-padded with <pad> to `seq_len` (attention_mask marks
the real tokens); labels are the original text + <eos>; the decoder reads the labels shifted right behind
<eos>, BART's decoder start token. Randomness is drawn from a generator seeded by (seed, global sample index).
Masking is per token (BART's fairseq code masks whole GPT-2 words; the issue asks for tokens).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from data_pipeline.objectives.mlm import resolve_tokenizer_path, special_ids
from data_pipeline.objectives.span_masking import place_span

SENTENCE_END = (".", "!", "?")


def sentence_end_table(tokenizer_path: Any, vocab_size: int) -> np.ndarray:
    """(vocab_size,) bool: pieces whose text ends a sentence."""
    from data_pipeline.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_path)
    if tok.vocab_size != vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer_path} has {tok.vocab_size} pieces but the manifest says vocab_size={vocab_size}"
        )
    return np.array(
        [tok.id_to_piece(i).replace("▁", "").endswith(SENTENCE_END) for i in range(vocab_size)], dtype=bool
    )


class Denoising:
    name = "bart"

    def __init__(
        self,
        *,
        seq_len: int,
        tokenizer: dict[str, Any],
        seed: int,
        mask_ratio: float = 0.3,
        poisson_lambda: float = 3.0,
        permute_sentences: bool = True,
    ):
        problems = []
        if seq_len < 3:
            problems.append(f"seq_len={seq_len} must be >= 3")
        if not 0.0 <= mask_ratio < 1.0:
            problems.append(f"mask_ratio={mask_ratio} must be in [0, 1)")
        if poisson_lambda <= 0:
            problems.append(f"poisson_lambda={poisson_lambda} must be > 0")
        missing = [k for k in ("vocab_size", "pad_id", "eos_id", "mask_id") if k not in tokenizer]
        if missing:
            problems.append(f"the tokenizer record lacks {', '.join(missing)}")
        if permute_sentences and "path" not in tokenizer:
            problems.append(
                "permute_sentences=True needs the tokenizer record's 'path' to find sentence ends"
            )
        if problems:
            raise ValueError("BART denoising objective: " + "; ".join(problems))
        self.seq_len, self.seed = seq_len, seed
        self.mask_ratio, self.poisson_lambda = mask_ratio, poisson_lambda
        self.permute_sentences = permute_sentences
        self.vocab_size = int(tokenizer["vocab_size"])
        self.pad_id, self.eos_id = int(tokenizer["pad_id"]), int(tokenizer["eos_id"])
        self.mask_id = int(tokenizer["mask_id"])
        special = special_ids(tokenizer)
        self.is_special = np.zeros(self.vocab_size, dtype=bool)
        self.is_special[special[special < self.vocab_size]] = True
        self.ends_sentence = (
            sentence_end_table(resolve_tokenizer_path(tokenizer["path"]), self.vocab_size)
            if permute_sentences
            else np.zeros(self.vocab_size, dtype=bool)
        )
        self.ends_sentence[self.eos_id] = True
        self.targets_length = seq_len

    @property
    def sample_len(self) -> int:
        return self.seq_len - 1  # + <eos>

    def permute(self, sample: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The sample's sentences in a random order: (L,) -> (L,)."""
        if not self.permute_sentences:
            return sample
        cuts = np.flatnonzero(self.ends_sentence[sample[:-1]]) + 1  # a sentence starts after each end
        sentences = np.split(sample, cuts)
        return np.concatenate([sentences[i] for i in rng.permutation(len(sentences))])

    def _target_count(self, n: int, rng: np.random.Generator) -> int:
        # Stochastic rounding: E[count] = mask_ratio * n exactly (see mlm.MaskedLM._target_count).
        x = self.mask_ratio * n
        base = int(np.floor(x))
        return base + int(rng.random() < x - base)

    def noise(self, sample: np.ndarray, sample_index: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """(permuted sample (L,), spans): each span is (first position in the permuted sample, length); a
        length-0 span is an insertion before that position (L: at the end). In the order drawn."""
        rng = np.random.default_rng([self.seed, int(sample_index)])
        tokens = self.permute(sample, rng)
        unit_pos = np.flatnonzero(~self.is_special[tokens])  # maskable positions (U,)
        n_units = len(unit_pos)
        target = self._target_count(n_units, rng)
        spans: list[tuple[int, int]] = []
        if n_units == 0 or target == 0:
            return tokens, spans
        blocked = np.zeros(n_units, dtype=bool)
        # A window may not cross a special token (<eos>) or an inserted <mask>: both end a "run".
        run_last = np.concatenate([unit_pos[1:] != unit_pos[:-1] + 1, [True]])
        inserted = np.zeros(n_units + 1, dtype=bool)  # insertion before unit g (g = U: after the last)
        covered = 0
        while covered < target:
            length = int(rng.poisson(self.poisson_lambda))
            if length == 0:
                gaps = np.flatnonzero(~np.concatenate([blocked, [False]]) & ~inserted)
                if len(gaps) == 0:
                    break
                g = int(gaps[rng.integers(len(gaps))])
                inserted[g] = True
                if g > 0:
                    run_last[g - 1] = True
                spans.append((int(unit_pos[g]) if g < n_units else len(tokens), 0))
                continue
            w, length = place_span(blocked, run_last, length, rng)
            if length == 0:
                break  # every token is masked already
            blocked[w : w + length] = True
            spans.append((int(unit_pos[w]), length))
            covered += length
        return tokens, spans

    def corrupt(self, tokens: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
        """The encoder's text: each span replaced by one <mask>, insertions added. (L,) -> (L',)."""
        n = len(tokens)
        # Slots: [insertions before 0, token 0, insertions before 1, token 1, ..., insertions at the end].
        inserts = np.zeros(n + 1, dtype=np.int64)
        keep = np.ones(n, dtype=np.int64)
        value = tokens.copy()
        for start, length in spans:
            if length == 0:
                inserts[start] += 1
            else:
                value[start] = self.mask_id
                keep[start + 1 : start + length] = 0
        values = np.empty(2 * n + 1, dtype=np.int64)
        counts = np.empty(2 * n + 1, dtype=np.int64)
        values[0::2], counts[0::2] = self.mask_id, inserts
        values[1::2], counts[1::2] = value, keep
        return np.repeat(values, counts)

    def __call__(self, samples: np.ndarray, sample_indices: np.ndarray) -> dict[str, np.ndarray]:
        """samples: (n, seq_len - 1) int64 -> input_ids, attention_mask, labels, decoder_input_ids: (n, seq_len)."""
        n = samples.shape[0]
        if samples.shape[1] != self.sample_len or len(sample_indices) != n:
            raise ValueError(
                f"BART denoising objective: expected samples (n, {self.sample_len}) and n indices, got "
                f"{samples.shape} and {len(sample_indices)}"
            )
        input_ids = np.full((n, self.seq_len), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((n, self.seq_len), dtype=np.int64)
        for row, index in enumerate(sample_indices):
            tokens, spans = self.noise(samples[row], int(index))
            # Insertions can only outgrow the sample when almost nothing is masked (tiny seq_len): cut the tail.
            corrupted = self.corrupt(tokens, spans)[: self.seq_len - 1]
            input_ids[row, : len(corrupted)] = corrupted
            input_ids[row, len(corrupted)] = self.eos_id
            attention_mask[row, : len(corrupted) + 1] = 1
        labels = np.concatenate([samples, np.full((n, 1), self.eos_id, dtype=np.int64)], axis=1)
        decoder_input_ids = np.concatenate(
            [np.full((n, 1), self.eos_id, dtype=np.int64), labels[:, :-1]], axis=1
        )
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "decoder_input_ids": decoder_input_ids,
        }
