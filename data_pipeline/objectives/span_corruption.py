"""Span corruption (T5; Raffel et al. 2020, §3.1.4 and §3.3.4), the objective of T5's pretraining.

A raw packed sample of `raw_length` tokens is split into noise and non-noise by `random_spans_noise_mask`
(T5's algorithm, reimplemented here). The encoder input keeps the non-noise tokens and replaces each noise
span by the next sentinel (<extra_id_0>, <extra_id_1>, ...), then </s>; the target is each sentinel followed
by the span it replaced, then </s>:

    raw      a b c D E f g H I J            (capitals: noise, 2 spans)
    inputs   a b c <X0> f g <X1> </s>
    targets  <X0> D E <X1> H I J </s>

T5's segmentation starts with non-noise and ends with noise, so the last raw tokens are always noise.
Because the noise and span counts depend only on the raw length, every sample has the same encoder and
decoder lengths; `compute_input_and_target_lengths` picks the largest raw length whose encoder input fits
`seq_len` (T5's "inputs length" calculation: 512 -> raw 568, targets 114).

The randomness of sample i comes from a generator seeded with (seed, i), i the global sample index, so spans
are the same for any dp layout or resume point and differ between epochs.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def noise_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a raw sequence of `length` tokens, as in T5's `random_spans_noise_mask`."""
    # Python's round() rounds halves to even, as tf.round does in T5.
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = max(round(num_noise / mean_noise_span_length), 1)
    return num_noise, num_spans


def _random_composition(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """`total` split into `parts` positive integers, uniformly over all such compositions: (parts,) int64.

    A composition is fixed by which `parts - 1` of the `total - 1` gaps between items are cuts."""
    cuts = np.sort(rng.choice(total - 1, size=parts - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [total]]))


def random_spans_noise_mask(
    length: int, noise_density: float, mean_noise_span_length: float, rng: np.random.Generator
) -> np.ndarray:
    """(length,) bool, True at noise tokens: non-noise and noise spans alternate, starting with non-noise,
    with the span lengths of each kind a uniformly random composition (T5's `random_spans_noise_mask`)."""
    if length < 2:
        raise ValueError(f"random_spans_noise_mask: length={length} must be >= 2 (one noise, one non-noise)")
    num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
    num_nonnoise = length - num_noise
    if num_spans > num_nonnoise:
        raise ValueError(
            f"random_spans_noise_mask: length={length} gives {num_spans} noise spans but only {num_nonnoise} "
            "non-noise tokens to separate them; raise the length or lower noise_density"
        )
    noise_lengths = _random_composition(num_noise, num_spans, rng)  # (spans,)
    nonnoise_lengths = _random_composition(num_nonnoise, num_spans, rng)  # (spans,)
    interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)  # (2 * spans,)
    kinds = np.tile(np.array([False, True]), num_spans)  # non-noise, noise, non-noise, ...
    return np.repeat(kinds, interleaved)


def compute_input_and_target_lengths(
    inputs_length: int, noise_density: float, mean_noise_span_length: float
) -> tuple[int, int]:
    """(raw length, targets length): the largest raw length whose encoder input (non-noise tokens, one
    sentinel per span, </s>) has at most `inputs_length` tokens, and the decoder length it implies
    (noise tokens, one sentinel per span, </s>). T5 defaults: 512 -> (568, 114)."""

    def lengths(raw: int) -> tuple[int, int]:
        noise, spans = noise_counts(raw, noise_density, mean_noise_span_length)
        return raw - noise + spans + 1, noise + spans + 1

    if inputs_length < 3:
        raise ValueError(f"span corruption: inputs length {inputs_length} must be >= 3")
    # The encoder length grows by 0 or 1 per raw token, so walk up from a raw length that surely fits.
    raw = 2
    while lengths(raw + 1)[0] <= inputs_length:
        raw += 1
    return raw, lengths(raw)[1]


class SpanCorruption:
    name = "span_corruption"

    def __init__(
        self,
        *,
        seq_len: int,
        tokenizer: dict[str, Any],
        seed: int,
        noise_density: float = 0.15,
        mean_noise_span_length: float = 3.0,
    ):
        problems = []
        if not 0.0 < noise_density < 1.0:
            problems.append(f"noise_density={noise_density} must be in (0, 1)")
        if mean_noise_span_length < 1.0:
            problems.append(f"mean_noise_span_length={mean_noise_span_length} must be >= 1")
        if seq_len < 3:
            problems.append(f"seq_len={seq_len} must be >= 3 (a token, a sentinel and </s>)")
        missing = [k for k in ("eos_id", "pad_id", "sentinel_ids") if k not in tokenizer]
        if missing:
            problems.append(f"the tokenizer record lacks {', '.join(missing)}")
        if problems:
            raise ValueError("span corruption objective: " + "; ".join(problems))

        self.seq_len, self.seed = seq_len, seed
        self.noise_density, self.mean_noise_span_length = noise_density, mean_noise_span_length
        self.eos_id, self.pad_id = int(tokenizer["eos_id"]), int(tokenizer["pad_id"])
        self.sentinels = np.asarray(tokenizer["sentinel_ids"], dtype=np.int64)
        self.raw_length, self.targets_length = compute_input_and_target_lengths(
            seq_len, noise_density, mean_noise_span_length
        )
        self.num_noise, self.num_spans = noise_counts(self.raw_length, noise_density, mean_noise_span_length)
        # Equal to seq_len for densities <= 0.5 (the encoder length then grows by at most one per raw
        # token); otherwise the few missing positions are padding.
        self.inputs_length = self.raw_length - self.num_noise + self.num_spans + 1
        if self.num_spans > len(self.sentinels):
            raise ValueError(
                f"span corruption objective: seq_len={seq_len} gives {self.num_spans} noise spans per sample "
                f"but the tokenizer has only {len(self.sentinels)} sentinels (<extra_id_k>); retrain it with "
                f"--num-sentinels >= {self.num_spans} or shorten seq_len"
            )
        if self.num_spans > self.raw_length - self.num_noise:
            raise ValueError(
                f"span corruption objective: seq_len={seq_len} gives {self.num_spans} noise spans but only "
                f"{self.raw_length - self.num_noise} non-noise tokens; lower noise_density"
            )

    @property
    def sample_len(self) -> int:
        return self.raw_length

    def noise_mask(self, sample_index: int) -> np.ndarray:
        """(raw_length,) bool noise mask of one global sample index."""
        rng = np.random.default_rng([self.seed, int(sample_index)])
        return random_spans_noise_mask(self.raw_length, self.noise_density, self.mean_noise_span_length, rng)

    def __call__(self, samples: np.ndarray, sample_indices: np.ndarray) -> dict[str, np.ndarray]:
        """samples: (n, raw_length) int64 -> input_ids, attention_mask: (n, seq_len); labels,
        decoder_input_ids: (n, targets_length)."""
        n, raw = samples.shape
        if raw != self.raw_length or len(sample_indices) != n:
            raise ValueError(
                f"span corruption objective: expected samples (n, {self.raw_length}) and n indices, got "
                f"{samples.shape} and {len(sample_indices)}"
            )
        noise = np.stack([self.noise_mask(int(i)) for i in sample_indices]) if n else np.zeros((0, raw), bool)
        prev = np.pad(noise, ((0, 0), (1, 0)), constant_values=False)[:, :-1]  # (n, raw) noise at t-1
        noise_start = noise & ~prev  # first token of each noise span
        # The first token is always non-noise, so its predecessor counts as noise here: non-noise span
        # starts (including position 0) get the sentinels of the targets.
        prev_for_target = np.pad(noise, ((0, 0), (1, 0)), constant_values=True)[:, :-1]
        nonnoise_start = ~noise & prev_for_target
        # Span k (0-based) of either kind takes sentinel k: the running count of span starts in the row.
        input_sentinel = self.sentinels[np.maximum(np.cumsum(noise_start, axis=1) - 1, 0)]  # (n, raw)
        target_sentinel = self.sentinels[np.maximum(np.cumsum(nonnoise_start, axis=1) - 1, 0)]  # (n, raw)

        # Every row keeps the same number of positions, so boolean selection reshapes back to (n, .).
        keep_in = ~noise | noise_start
        inputs = np.where(noise_start, input_sentinel, samples)[keep_in].reshape(n, -1)
        keep_tgt = noise | nonnoise_start
        targets = np.where(nonnoise_start, target_sentinel, samples)[keep_tgt].reshape(n, -1)
        eos = np.full((n, 1), self.eos_id, dtype=np.int64)
        inputs = np.concatenate([inputs, eos], axis=1)  # (n, inputs_length)
        labels = np.concatenate([targets, eos], axis=1)  # (n, targets_length)
        assert inputs.shape[1] == self.inputs_length and labels.shape[1] == self.targets_length

        input_ids = np.full((n, self.seq_len), self.pad_id, dtype=np.int64)
        input_ids[:, : self.inputs_length] = inputs
        attention_mask = np.zeros((n, self.seq_len), dtype=np.int64)
        attention_mask[:, : self.inputs_length] = 1
        # T5 starts decoding from the pad id: decoder inputs are the labels shifted right by one.
        decoder_input_ids = np.concatenate(
            [np.full((n, 1), self.pad_id, dtype=np.int64), labels[:, :-1]], axis=1
        )
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "decoder_input_ids": decoder_input_ids,
        }
