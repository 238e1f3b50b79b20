"""parallel.cpu_adam: DeepSpeed's vectorized CPU Adam, the host-side update of ZeRO-Offload, built the way
pretrain.train builds it (AdamW mode: decoupled weight decay, bias correction), against torch.optim.AdamW
in float64 over ten steps with per-group weight decay and a learning rate changed between steps, as the
schedule changes it.

Its first use compiles the op with the host's C++ compiler (about 1 to 3 minutes on 2 cores, then cached
under ~/.cache/torch_extensions), hence the marker. Run beside the distributed tests by `make test`, it
also builds the op before the ZeRO-Offload run that uses it needs it (torch's extension builder takes a
file lock, so two processes never build it at once)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow

SHAPES = [(1000,), (37, 13), (5,)]  # odd sizes: the vectorized loop's tail
HYPER = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
STEPS = 10

# fp32 against fp64: each step rounds the parameter once to fp32 (half an ulp, <= 2.4e-7 for |p| < 8;
# these are N(0, 1) draws, |p| < 5) and its update in fp32 arithmetic; ten steps stay below 2.4e-6 in the
# worst case. Seen: 9.2e-7 for DeepSpeed's CPU Adam, 7.0e-7 for torch's fp32 AdamW. The same update with
# L2 instead of decoupled decay, or without bias correction, is off by 3e-2 and 1e-2: the bound separates
# a right update from a wrong one by four orders of magnitude.
TOL = 5e-6


def _train(make_optimizer, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(parameters after STEPS steps, parameters before), both as float64."""
    init = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(SHAPES)]
    params = [torch.nn.Parameter(p.to(dtype).clone()) for p in init]
    opt = make_optimizer(
        [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}]
    )
    grads = torch.Generator().manual_seed(100)
    for step in range(STEPS):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=grads) * (step + 1)).to(dtype)
        for group in opt.param_groups:
            group["lr"] = HYPER["lr"] * 0.8**step
        opt.step()
    return [p.detach().double() for p in params], [p.double() for p in init]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def test_cpu_adam_matches_float64_adamw():
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    want, before = _train(lambda groups: torch.optim.AdamW(groups, **HYPER), torch.float64)
    assert _max_diff(want, before) > 1e-2  # the parameters did move: the comparison is not vacuous
    got, _ = _train(lambda groups: DeepSpeedCPUAdam(groups, adamw_mode=True, **HYPER), torch.float32)
    assert _max_diff(got, want) < TOL, _max_diff(got, want)
    # L2-regularized Adam (adamw_mode=False) is a different update: the bound must tell them apart.
    l2, _ = _train(lambda groups: DeepSpeedCPUAdam(groups, adamw_mode=False, **HYPER), torch.float32)
    assert _max_diff(l2, want) > 100 * TOL
