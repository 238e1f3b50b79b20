"""bf16 training keeps fp32 master weights: its losses track the fp32 run's, at every ZeRO stage.

bf16 changes the forward and backward arithmetic (8-bit mantissas, so each matmul output carries ~2^-9
relative rounding) but, with fp32 master weights and Adam moments, not the update: Adam's first steps are
close to lr·sign(g), insensitive to gradient rounding. On gpt-tiny over 4 steps the bf16 losses stay
within ~1e-4 relative of fp32 (seen 1.1e-4 at step 4). A path that loses updates in bf16 is far outside:
DeepSpeed 0.19.8's ZeRO-0 bf16 optimizer (FP16_UnfusedOptimizer with bf16) was 6e-3 off at step 4,
which is why Tandem runs bf16 at zero_stage 0 on DeepSpeed's ZeRO-1 optimizer (parallel/zero.py). 1e-3
separates the two by 10x on each side. The chunked LM-head loss (train.loss_chunk_size) rounds where the
logits path does (bf16 matmuls, fp32 logits and loss), so it is held to the same bound."""

from __future__ import annotations

import pytest

from tests.conftest import train_in_process

RTOL = 1e-3
KEYS = {"train.steps": 4, "optimizer.grad_clip": 0.0, "model.tie_embeddings": "false"}


@pytest.fixture(scope="module")
def fp32_losses(shards_dir, tmp_path_factory):
    _, metrics = train_in_process(shards_dir, tmp_path_factory.mktemp("fp32") / "run", **KEYS)
    return {step: rec["loss"] for step, rec in metrics.items()}


@pytest.mark.parametrize(
    ("zero_stage", "loss_chunk_size"),
    [(0, 0), (1, 0), (0, 64)],  # the last: the LM head fused into the loss (bf16 matmuls, fp32 sums)
)
def test_bf16_tracks_fp32(shards_dir, tmp_path, fp32_losses, zero_stage, loss_chunk_size):
    keys = {
        "train.precision": "bf16",
        "parallel.zero_stage": zero_stage,
        "train.loss_chunk_size": loss_chunk_size,
    }
    _, metrics = train_in_process(shards_dir, tmp_path / "run", **KEYS, **keys)
    got = {step: rec["loss"] for step, rec in metrics.items()}
    assert sorted(got) == sorted(fp32_losses) == [1, 2, 3, 4]
    for step, ref in fp32_losses.items():
        assert abs(got[step] - ref) <= RTOL * ref, (
            f"zero_stage={zero_stage} step {step}: bf16 {got[step]} vs fp32 {ref}"
        )
