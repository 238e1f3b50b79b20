"""ELECTRA's input (Clark et al. 2020, §2): masked-LM samples for the generator, plus a per-sample seed for
the replacement sampling done in the model.

Masking is `MaskedLM`'s, with the paper's choice as the default: 15% of the positions are selected and
every selected position shows `<mask>` (no random or kept tokens: the generator's samples supply the
replacements). `sample_seed` (n,) is drawn from (seed, global sample index) like the mask, so the
model's replacement sampling (pretrain/models/electra.py) is the same for any rank layout or resume.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from data_pipeline.objectives.mlm import MaskedLM

# Separates the sampling seed's stream from the masking stream of the same (seed, index).
_SAMPLING_STREAM = 0x454C


class ReplacedTokenDetection(MaskedLM):
    name = "replaced_token_detection"

    def __init__(
        self,
        *,
        seq_len: int,
        tokenizer: dict[str, Any],
        seed: int,
        mask_prob: float = 0.15,
        random_prob: float = 0.0,
        keep_prob: float = 0.0,
        whole_word: bool = False,
    ):
        super().__init__(
            seq_len=seq_len,
            tokenizer=tokenizer,
            seed=seed,
            mask_prob=mask_prob,
            random_prob=random_prob,
            keep_prob=keep_prob,
            whole_word=whole_word,
        )

    def __call__(self, samples: np.ndarray, sample_indices: np.ndarray) -> dict[str, np.ndarray]:
        out = super().__call__(samples, sample_indices)
        out["sample_seed"] = np.array(
            [
                np.random.default_rng([self.seed, int(i), _SAMPLING_STREAM]).integers(2**62)
                for i in sample_indices
            ],
            dtype=np.int64,
        )  # (n,)
        return out
