"""SpanBERT's span masking (Joshi et al. 2020, §3.1), objective `span_mlm`; no next-sentence prediction.

A sample is `<cls>`, `seq_len - 2` packed stream tokens (document separators <eos> shown as `<sep>`), `<sep>`:
one contiguous segment, as SpanBERT trains on. Spans of whole words are drawn until the masking budget
(`mask_prob` = 15% of the non-special tokens, stochastically rounded per sample) is reached:

- a span length ℓ in words is drawn from Geometric(p = 0.2) truncated to [1, 10] and renormalized (the paper's
  "clipping at ℓmax = 10" with its stated mean of 3.8 words: the renormalized mean is 3.80; lumping the tail
  on 10 would give 4.46);
- its first word is drawn uniformly among the words where ℓ free words follow inside one run of ordinary
  tokens (spans never overlap and never cross a special token); if no such place is left, the longest
  window that fits is taken;
- a word is a sentencepiece piece marked with the word-boundary "▁" and the pieces after it up to the next
  such piece (whitespace byte pieces and special tokens also end words: `mlm.word_boundary_tables`).

Drawing stops at the first span that reaches the budget, and that span is kept whole ("until 15% is masked":
every sample masks at least its budget and less than budget + its last span). Keeping the last span whole
makes the realized lengths an unbiased sample of the truncated geometric (Wald's identity: the number of
spans is a stopping time), which trimming it would not be. 80/10/10 is decided per span: all tokens of a
span show <mask>, all show random tokens, or all keep their own.

Span-boundary targets (SBO, §3.2): at a masked position i of the span covering tokens s..e the batch holds
`span_left` = s - 1, `span_right` = e + 1 (both inside the sample: <cls> and the final <sep> are never
masked) and `span_position` = i - s; 0 at unmasked positions, where `labels` is -100.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from data_pipeline.objectives.mlm import IGNORE_INDEX, MaskedLM


def truncated_geometric(p: float, max_length: int) -> np.ndarray:
    """P(ℓ) for ℓ = 1..max_length of Geometric(p) renormalized to that range: (max_length,) float64."""
    lengths = np.arange(1, max_length + 1)
    probs = p * (1.0 - p) ** (lengths - 1)
    return probs / probs.sum()


def valid_starts(blocked: np.ndarray, run_last: np.ndarray, length: int) -> np.ndarray:
    """Units w where [w, w + length) holds no blocked unit and no run boundary before its last unit.

    blocked, run_last: (U,) bool; run_last[u] is True when unit u + 1 belongs to another run."""
    n = len(blocked)
    if length > n:
        return np.zeros(0, dtype=np.int64)
    cb = np.concatenate([[0], np.cumsum(blocked)])  # (U + 1,)
    cr = np.concatenate([[0], np.cumsum(run_last)])
    w = np.arange(n - length + 1)
    ok = (cb[w + length] == cb[w]) & (cr[w + length - 1] == cr[w])
    return w[ok]


def place_span(
    blocked: np.ndarray, run_last: np.ndarray, length: int, rng: np.random.Generator
) -> tuple[int, int]:
    """(first unit, length) of a span of `length` free units in one run, uniform over the places it fits;
    shortened to the longest window that still fits when there is none; (-1, 0) when nothing is free."""
    while length > 0:
        starts = valid_starts(blocked, run_last, length)
        if len(starts):
            return int(starts[rng.integers(len(starts))]), length
        length -= 1
    return -1, 0


class SpanMasking(MaskedLM):
    name = "span_mlm"

    def __init__(
        self,
        *,
        seq_len: int,
        tokenizer: dict[str, Any],
        seed: int,
        mask_prob: float = 0.15,
        random_prob: float = 0.1,
        keep_prob: float = 0.1,
        geometric_p: float = 0.2,
        max_span_words: int = 10,
    ):
        problems = []
        if seq_len < 3:
            problems.append(f"seq_len={seq_len} must be >= 3 (<cls>, a token, <sep>)")
        if not 0.0 < geometric_p <= 1.0:
            problems.append(f"geometric_p={geometric_p} must be in (0, 1]")
        if max_span_words < 1:
            problems.append(f"max_span_words={max_span_words} must be >= 1")
        if "path" not in tokenizer:
            problems.append("the tokenizer record lacks 'path' (spans are whole words: word-initial pieces)")
        if problems:
            raise ValueError("span masking objective: " + "; ".join(problems))
        super().__init__(
            seq_len=seq_len,
            tokenizer=tokenizer,
            seed=seed,
            mask_prob=mask_prob,
            random_prob=random_prob,
            keep_prob=keep_prob,
            whole_word=True,
        )
        self.geometric_p, self.max_span_words = geometric_p, max_span_words
        self.length_probs = truncated_geometric(geometric_p, max_span_words)  # (max_span_words,)

    @property
    def sample_len(self) -> int:
        # <cls> and the closing <sep> take two positions.
        return self.seq_len - 2

    def words(self, tokens: np.ndarray, eligible: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(first token, token count, run id) of every word of one sample, each (W,) int64."""
        assert self.word_tables is not None
        starts_word, is_space = self.word_tables
        prev_eligible = np.concatenate([[False], eligible[:-1]])
        after_space = np.concatenate([[False], is_space[tokens[:-1]]])
        starts = eligible & (starts_word[tokens] | after_space | ~prev_eligible)  # (L,)
        first = np.flatnonzero(starts)
        word = np.cumsum(starts) - 1  # (L,)
        counts = np.bincount(word[eligible], minlength=len(first))
        run = np.cumsum(eligible & ~prev_eligible) - 1  # (L,) run number of each eligible position
        return first, counts, run[first]

    def spans(
        self, tokens: np.ndarray, eligible: np.ndarray, rng: np.random.Generator
    ) -> list[tuple[int, int]]:
        """(first token, token count) of each masked span of one sample, in the order drawn."""
        first, counts, run = self.words(tokens, eligible)
        n_words = len(first)
        target = self._target_count(int(eligible.sum()), rng)
        if n_words == 0 or target == 0:
            return []
        blocked = np.zeros(n_words, dtype=bool)
        run_last = np.concatenate([run[1:] != run[:-1], [True]])
        out: list[tuple[int, int]] = []
        covered = 0
        while covered < target:
            length = int(rng.choice(self.max_span_words, p=self.length_probs)) + 1
            w, length = place_span(blocked, run_last, length, rng)
            if length == 0:
                break  # every word is masked already
            blocked[w : w + length] = True
            n_tokens = int(counts[w : w + length].sum())
            out.append((int(first[w]), n_tokens))
            covered += n_tokens
        return out

    def __call__(self, samples: np.ndarray, sample_indices: np.ndarray) -> dict[str, np.ndarray]:
        """samples: (n, seq_len - 2) int64 -> input_ids, labels, attention_mask, token_type_ids, span_left,
        span_right, span_position: (n, seq_len) int64."""
        n = samples.shape[0]
        if samples.shape[1] != self.sample_len or len(sample_indices) != n:
            raise ValueError(
                f"span masking objective: expected samples (n, {self.sample_len}) and n indices, got "
                f"{samples.shape} and {len(sample_indices)}"
            )
        tokens = np.empty((n, self.seq_len), dtype=np.int64)  # (n, seq_len)
        tokens[:, 0] = self.cls_id
        tokens[:, 1:-1] = np.where(samples == self.eos_id, self.sep_id, samples)
        tokens[:, -1] = self.sep_id
        inputs = tokens.copy()
        labels = np.full_like(tokens, IGNORE_INDEX)
        left, right, position = (np.zeros_like(tokens) for _ in range(3))
        eligible = ~self.is_special[tokens]  # (n, seq_len)
        p_mask = 1.0 - self.random_prob - self.keep_prob
        for row, index in enumerate(sample_indices):
            rng = np.random.default_rng([self.seed, int(index)])
            for start, count in self.spans(tokens[row], eligible[row], rng):
                pos = np.arange(start, start + count)
                labels[row, pos] = tokens[row, pos]
                left[row, pos], right[row, pos], position[row, pos] = start - 1, start + count, pos - start
                u = rng.random()  # one decision per span: <mask>, random tokens, or unchanged
                if u < p_mask:
                    inputs[row, pos] = self.mask_id
                elif u < p_mask + self.random_prob:
                    inputs[row, pos] = self.ordinary[rng.integers(len(self.ordinary), size=count)]
        return {
            "input_ids": inputs,
            "labels": labels,
            "attention_mask": np.ones_like(tokens),  # packed: no padding
            "token_type_ids": np.zeros_like(tokens),
            "span_left": left,
            "span_right": right,
            "span_position": position,
        }
