"""Measured per-rank model-state bytes under DeepSpeed (2 gloo ranks, fp32, CPU) against
`parallel.memory.model_state_bytes`: optimizer states (Adam moments plus ZeRO's fp32 partition) for ZeRO
0, 1 and 3, and the parameter shard for ZeRO-3. Activations are not measured here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from parallel.memory import model_state_bytes
from tests.conftest import free_port, spawn_with_deadline

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# The estimate is per-parameter arithmetic; DeepSpeed pads flat partitions to alignment boundaries and
# keeps a few scalar states (step counters), so a small excess is expected. The bound is 10%.
RTOL = 0.10


def _worker(rank: int, world: int, stage: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    import deepspeed

    from pretrain.config import load_config
    from pretrain.models import build_model

    cfg = load_config(None, ["model.preset=gpt-mini", "model.vocab_size=512", "data.shards=x"]).model
    torch.manual_seed(0)
    model = build_model(cfg)
    num_params = sum(p.numel() for p in model.parameters())
    ds = {
        "train_batch_size": 2 * world,
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds, dist_init_required=False)
    x = torch.randint(0, 512, (2, 32))  # (B, T)
    loss = torch.nn.functional.cross_entropy(engine(x).flatten(0, 1), x.flatten())
    engine.backward(loss)
    engine.step()  # Adam moments exist only after the first step

    seen: set[int] = set()

    def nbytes(tensors) -> int:
        total = 0
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.numel() and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total

    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    optim = nbytes(v for s in inner.state.values() for v in s.values())
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        optim += nbytes(getattr(engine.optimizer, attr, None) or [])
    params = sum(
        (p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() * p.element_size() for p in model.parameters()
    )
    Path(out, f"rank{rank}.json").write_text(json.dumps({"n": num_params, "optim": optim, "params": params}))
    torch.distributed.barrier()  # both ranks have written their figures
    # Leave without interpreter teardown: destroying the DeepSpeed engine's cloned gloo groups at exit
    # aborted a rank now and then in clean-clone runs ("terminate called without an active exception",
    # SIGABRT, 2 runs of 4, after the figures were written); the measurement is complete here.
    os._exit(0)


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_measured_model_states_match_estimate(stage: int, tmp_path: Path) -> None:
    # A hard limit: ~30 s on an idle 2-core machine (DeepSpeed start-up included), 240 s under load.
    spawn_with_deadline(
        _worker, (2, stage, free_port(), str(tmp_path)), nprocs=2, timeout=240, what=f"ZeRO-{stage} workers"
    )
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        params, _, optim, _ = model_state_bytes(got["n"], zero_stage=stage, dp=2, precision="fp32")
        assert got["optim"] == pytest.approx(optim, rel=RTOL), f"rank {rank} optimizer bytes"
        assert got["params"] == pytest.approx(params, rel=RTOL), f"rank {rank} parameter bytes"
