"""Causal language modelling (GPT): predict token t+1 from tokens <= t."""

from __future__ import annotations

from typing import Any

import numpy as np


class CausalLM:
    name = "causal_lm"

    def __init__(self, *, seq_len: int, tokenizer: dict[str, Any], seed: int):
        self.seq_len = seq_len
        self.seed = seed

    @property
    def sample_len(self) -> int:
        # One extra token so inputs and targets (shifted by one) both have seq_len tokens.
        return self.seq_len + 1

    def __call__(self, samples: np.ndarray, sample_indices: np.ndarray) -> dict[str, np.ndarray]:
        """samples: (n, seq_len + 1) int64 -> input_ids, labels: (n, seq_len)."""
        return {"input_ids": samples[:, :-1], "labels": samples[:, 1:]}
