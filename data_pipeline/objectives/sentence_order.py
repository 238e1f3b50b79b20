"""Sentence-order prediction with masked language modelling (ALBERT; Lan et al. 2020, §3.1 and §4.1).

A sample is a pair of segments `[CLS] A [SEP] B [SEP]`, padded to `seq_len`: A and B are consecutive text
of one document. With probability `swap_prob` (the paper's 50%) the order is swapped to `B, A` and the
sentence-order label is 1; otherwise it is 0. Token types are 0 for `[CLS] A [SEP]` and 1 for `B [SEP]`.

Segments come from the packed stream: of the `seq_len - 3` raw tokens of a sample, the longest run that
contains no document separator (<eos>) is the document text (the first such run on ties), and a split
point drawn uniformly inside it makes A and B (each at least one token). The stream has no sentence
boundaries, so unlike the paper's segments the split may fall inside a sentence. Text of the sample's other
documents is not used, and the pair is shorter than `seq_len - 3` when documents end inside the window;
the rest is <pad> (attention_mask 0).

MLM on top is `MaskedLM`'s masking, run on the pair with the same options (`mask_prob`, `random_prob`,
`keep_prob`, `whole_word`): plain token masking by default; ALBERT's n-gram masking is not implemented.
The masks are dynamic as in `MaskedLM` (seeded by (seed, global sample index)); the pair's split and swap
come from a separate generator seeded by (seed, global sample index, 1), so they are independent of it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from data_pipeline.objectives.mlm import MaskedLM

_SOP_STREAM = 1  # third seed word of the split/swap generator (MaskedLM's masking uses two words)


def longest_document_run(tokens: np.ndarray, separator: int) -> tuple[int, int]:
    """(start, end) of the longest run of `tokens` (1-D) without `separator`; the first one on ties."""
    cuts = np.flatnonzero(tokens == separator)
    starts = np.concatenate([[0], cuts + 1])
    ends = np.concatenate([cuts, [len(tokens)]])
    best = int(np.argmax(ends - starts))
    return int(starts[best]), int(ends[best])


class SentenceOrder:
    name = "sentence_order"

    def __init__(
        self,
        *,
        seq_len: int,
        tokenizer: dict[str, Any],
        seed: int,
        swap_prob: float = 0.5,
        **mlm_options: Any,
    ):
        problems = []
        if seq_len < 5:
            problems.append(f"seq_len={seq_len} must be >= 5 ([CLS] A [SEP] B [SEP] with one token each)")
        if not 0.0 <= swap_prob <= 1.0:
            problems.append(f"swap_prob={swap_prob} must be in [0, 1]")
        if "pad_id" not in tokenizer:
            problems.append("the tokenizer record lacks pad_id")
        if problems:
            raise ValueError("sentence-order objective: " + "; ".join(problems))
        # MaskedLM prepends <cls> to a (seq_len - 1)-token row and masks its non-special tokens.
        self.mlm = MaskedLM(seq_len=seq_len, tokenizer=tokenizer, seed=seed, **mlm_options)
        self.seq_len, self.seed, self.swap_prob = seq_len, seed, swap_prob
        self.pad_id, self.sep_id, self.eos_id = int(tokenizer["pad_id"]), self.mlm.sep_id, self.mlm.eos_id

    @property
    def sample_len(self) -> int:
        # [CLS], and [SEP] after each segment.
        return self.seq_len - 3

    def __call__(self, samples: np.ndarray, sample_indices: np.ndarray) -> dict[str, np.ndarray]:
        """samples: (n, seq_len - 3) int64 -> input_ids, labels, attention_mask, token_type_ids: (n, seq_len),
        sop_labels: (n,)."""
        n = samples.shape[0]
        if samples.shape[1] != self.sample_len or len(sample_indices) != n:
            raise ValueError(
                f"sentence-order objective: expected samples (n, {self.sample_len}) and n indices, got "
                f"{samples.shape} and {len(sample_indices)}"
            )
        rows = np.full((n, self.seq_len - 1), self.pad_id, dtype=np.int64)  # A [SEP] B [SEP] <pad>...
        types = np.zeros((n, self.seq_len), dtype=np.int64)
        sop_labels = np.zeros(n, dtype=np.int64)
        for row, index in enumerate(sample_indices):
            rng = np.random.default_rng([self.seed, int(index), _SOP_STREAM])
            start, end = longest_document_run(samples[row], self.eos_id)
            text = samples[row, start:end]
            if len(text) < 2:  # no document of two tokens in the window: an empty pair (all padding)
                rows[row, 0:2] = self.sep_id
                continue
            split = int(rng.integers(1, len(text)))  # A = text[:split], B = text[split:], both non-empty
            first, second = text[:split], text[split:]
            if rng.random() < self.swap_prob:
                first, second, sop_labels[row] = second, first, 1
            a = len(first)
            rows[row, :a] = first
            rows[row, a] = self.sep_id
            rows[row, a + 1 : len(text) + 1] = second
            rows[row, len(text) + 1] = self.sep_id
            types[row, a + 2 : len(text) + 3] = 1  # B and its [SEP], after [CLS] A [SEP]
        batch = self.mlm(rows, sample_indices)  # <pad> and [SEP] are special: never selected for prediction
        real = np.concatenate([np.ones((n, 1), dtype=bool), rows != self.pad_id], axis=1)  # [CLS] + pair
        batch["attention_mask"] = real.astype(np.int64)
        batch["token_type_ids"] = types
        batch["sop_labels"] = sop_labels
        return batch
