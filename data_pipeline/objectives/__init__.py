"""Load-time objective transforms: packed token samples -> model batches.

Every objective sees the same packed stream of documents (separated by <eos>); it says how many raw tokens
one sample needs (`sample_len`) and turns a (n, sample_len) block into arrays. Any randomness is drawn from
a generator seeded by (seed, global sample index), so batches do not depend on ranks, workers or resumes.

Interface of an objective class: `__init__(*, seq_len, tokenizer, seed, **options)`, a `sample_len`
property, and `__call__(samples, sample_indices) -> dict[str, np.ndarray]`.
"""

from __future__ import annotations

from typing import Any

from data_pipeline.objectives.causal_lm import CausalLM
from data_pipeline.objectives.denoising import Denoising
from data_pipeline.objectives.mlm import MaskedLM
from data_pipeline.objectives.replaced_token import ReplacedTokenDetection
from data_pipeline.objectives.sentence_order import SentenceOrder
from data_pipeline.objectives.span_corruption import SpanCorruption
from data_pipeline.objectives.span_masking import SpanMasking

OBJECTIVES: dict[str, type] = {"gpt": CausalLM, "bert": MaskedLM, "t5": SpanCorruption}
OBJECTIVES["span_mlm"] = SpanMasking  # SpanBERT: geometric whole-word spans + span-boundary targets
OBJECTIVES["bart"] = Denoising  # BART: sentence permutation + text infilling (the bart family's default)
OBJECTIVES["electra"] = ReplacedTokenDetection  # ELECTRA: MLM input for the generator + sampling seeds
OBJECTIVES["distill"] = MaskedLM  # DistilBERT: the teacher's masked LM
OBJECTIVES["sop"] = SentenceOrder  # ALBERT: sentence-order prediction + MLM


def build_objective(
    family: str, *, seq_len: int, tokenizer: dict[str, Any], seed: int, **options: Any
) -> Any:
    """The objective of a model family. `tokenizer` is the manifest's tokenizer record (`vocab_size`, the
    special ids `pad_id`, `eos_id`, `cls_id`, `sep_id`, `mask_id`, ..., `sentinel_ids`, `path`)."""
    try:
        cls = OBJECTIVES[family]
    except KeyError:
        raise ValueError(
            f"no objective for model family {family!r}; available: {', '.join(OBJECTIVES)}"
        ) from None
    return cls(seq_len=seq_len, tokenizer=tokenizer, seed=seed, **options)
