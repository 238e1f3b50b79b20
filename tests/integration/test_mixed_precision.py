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


# AdamW's three torch implementations compute the same update with other operation orders (fused: one
# kernel per tensor, multiplying by the step size in another place); over 4 steps the losses drift by a
# few fp32 roundings. 1e-5 relative is the project's parity bound; a wrong update is far outside it
# (tried by hand: beta2 0.90 instead of 0.95 on the fused side moved a loss by 1.6e-4 relative).
IMPL_RTOL = 1e-5


@pytest.mark.parametrize(
    ("implementation", "precision", "zero_stage"),
    [("fused", "fp32", 0), ("foreach", "fp32", 0), ("fused", "bf16", 1)],
)
def test_adamw_implementations_train_alike(shards_dir, tmp_path, implementation, precision, zero_stage):
    """optimizer.implementation: 'fused' (the default on a GPU, also on DeepSpeed's flattened fp32
    master weights under bf16) and 'foreach' train like the for-loop (the CPU default)."""
    runs = {}
    for impl in (implementation, "for-loop"):
        keys = {
            "optimizer.implementation": impl,
            "train.precision": precision,
            "parallel.zero_stage": zero_stage,
        }
        _, metrics = train_in_process(shards_dir, tmp_path / impl, **KEYS, **keys)
        runs[impl] = {step: rec["loss"] for step, rec in metrics.items()}
    got, ref = runs[implementation], runs["for-loop"]
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4]
    for step in ref:
        assert abs(got[step] - ref[step]) <= IMPL_RTOL * ref[step], (step, got[step], ref[step])


def test_adamw_implementation_picks_the_kernels():
    import torch
    from deepspeed.accelerator import get_accelerator

    from pretrain.config import OptimizerConfig
    from pretrain.train import adamw

    params = [{"params": [torch.nn.Parameter(torch.zeros(3))], "weight_decay": 0.0}]
    flags = {}
    for impl in ("fused", "foreach", "for-loop", "auto"):
        d = adamw(params, OptimizerConfig(implementation=impl)).defaults
        flags[impl] = (bool(d["fused"]), bool(d["foreach"]))
    assert flags == {
        "fused": (True, False),
        "foreach": (False, True),
        "for-loop": (False, False),
        "auto": (True, False) if get_accelerator().device_name() == "cuda" else (False, False),
    }


def test_fused_adamw_step_counters_follow_their_parameters_after_a_load():
    """DeepSpeed's universal-checkpoint load writes Adam's `step` counters as loaded (on the host); the
    fused kernels need them on the parameter's device. Simulated without a GPU: parameters on the "meta"
    device (standing for the GPU), counters on the host, behind a wrapper like DeepSpeed's: moved for a
    fused group, left alone for a for-loop group."""
    import torch

    from pretrain.checkpoint import place_fused_optimizer_steps

    fused_p, loop_p = (torch.nn.Parameter(torch.zeros(3, device="meta")) for _ in range(2))
    fused = torch.optim.AdamW([fused_p], foreach=False)
    fused.param_groups[0]["fused"] = True  # torch refuses fused=True for meta tensors at construction
    loop = torch.optim.AdamW([loop_p], foreach=False)
    fused.state[fused_p]["step"] = torch.tensor(7.0)
    loop.state[loop_p]["step"] = torch.tensor(7.0)

    class Wrapper:  # DeepSpeed's ZeRO / bf16 optimizers keep the torch optimizer as `.optimizer`
        def __init__(self, inner):
            self.optimizer = inner

    place_fused_optimizer_steps(Wrapper(fused))
    place_fused_optimizer_steps(loop)
    assert fused.state[fused_p]["step"].device.type == "meta"
    assert loop.state[loop_p]["step"].device.type == "cpu"
