"""Load-time objective transforms: packed token samples -> model batches.

Every objective sees the same packed stream of documents (separated by <eos>); it says how many raw tokens
one sample needs (`sample_len`) and turns a (n, sample_len) block into tensors. Any randomness is drawn from
a generator seeded by (seed, global sample index), so batches do not depend on ranks, workers or resumes.
"""

from __future__ import annotations

from data_pipeline.objectives.causal_lm import CausalLM

OBJECTIVES = {"gpt": CausalLM}


def build_objective(family: str, *, seq_len: int, special_ids: dict[str, int], seed: int):
    try:
        cls = OBJECTIVES[family]
    except KeyError:
        raise ValueError(
            f"no objective for model family {family!r}; available: {', '.join(OBJECTIVES)}"
        ) from None
    return cls(seq_len=seq_len, special_ids=special_ids, seed=seed)
