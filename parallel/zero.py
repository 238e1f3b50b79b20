"""The DeepSpeed JSON for data parallelism with ZeRO, generated from Tandem's typed config, and the rules
for ZeRO-Offload / ZeRO-Infinity CPU offload.

This module never imports `pretrain` (DESIGN.md): it reads the run config duck-typed, through the
attributes below, so `pretrain.config.Config` (or any object with the same fields) works:

    cfg.train.global_batch_size, .micro_batch_size, .precision ("fp32" | "bf16" | "fp16")
    cfg.optimizer.grad_clip
    cfg.parallel.zero_stage, .offload_optimizer ("none" | "cpu"), .offload_param ("none" | "cpu"),
                 .offload_pin_memory, .cpu_adam

What DeepSpeed 0.19.8 does with the offload blocks (runtime/zero/offload_config.py, stage_1_and_2.py,
stage3.py, engine.py):

* `zero_optimization.offload_optimizer` (ZeRO-Offload, Ren et al. 2021) is read by the ZeRO optimizers
  of stages 1, 2 and 3; at stage 0 no ZeRO optimizer exists and the block would be ignored silently.
  The rank's fp32 master partition, its Adam moments, an fp32 copy of its gradient partition and a
  staging copy of its updated parameter partition live in host memory, and the optimizer step runs on
  the host.
* `zero_optimization.offload_param` (ZeRO-Infinity, Rajbhandari et al. 2021) is read only by the
  stage-3 optimizer, the only one that partitions parameters.
* With an offloaded optimizer the engine refuses a client optimizer that is not DeepSpeedCPUAdam
  unless `zero_force_ds_cpu_optimizer` is false. Tandem hands DeepSpeed its own torch.optim.AdamW (the
  update every other layout uses) and sets the flag to false, or, with `parallel.cpu_adam`, builds
  DeepSpeedCPUAdam (vectorized C++; compiled by DeepSpeed's op builder on first use).
* `pin_memory` (default true in DeepSpeed) page-locks the host buffers for asynchronous full-bandwidth
  copies; hosts with a low `ulimit -l` need it off. On a CPU accelerator it changes nothing.
"""

from __future__ import annotations

from typing import Any

ZERO_STAGES = (0, 1, 2, 3)


def engine_zero_stage(zero_stage: int, precision: str, pp: int) -> int:
    """The ZeRO stage DeepSpeed is asked to run: `parallel.zero_stage`, except that mixed precision at
    stage 0 runs DeepSpeed's ZeRO-1 optimizer (with bf16 under a pipeline, its BF16_Optimizer is used and
    stays).

    Why: at stage 0 without a pipeline DeepSpeed 0.19.8 wraps a client optimizer for bf16/fp16 in
    FP16_UnfusedOptimizer, whose constructor runs one `optimizer.step()` on zero gradients to create the
    Adam state. With torch.optim.AdamW that step counts: every later update has its bias correction one
    step late (the first real update is ~0.73 lr per parameter instead of ~1.0 lr) and weight decay is
    applied once before training. The ZeRO-1 optimizer creates its state without stepping; with dp = 1 it
    holds exactly what stage 0 would, and with dp > 1 it shards the optimizer state (less memory, the same
    communication volume). tests/integration/test_mixed_precision.py: bf16 at "zero_stage 0" now tracks
    fp32 within 1.1e-4 over 4 steps; the unfused path was 6e-3 off."""
    if zero_stage == 0 and (precision == "fp16" or (precision == "bf16" and pp == 1)):
        return 1
    return zero_stage


def deepspeed_config(cfg: Any, *, dp_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON, generated from the Tandem config (never edited by hand)."""
    t, par = cfg.train, cfg.parallel
    gas = t.global_batch_size // (t.micro_batch_size * dp_size)
    zero: dict[str, Any] = {"stage": engine_zero_stage(par.zero_stage, t.precision, par.pp)}
    ds: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": cfg.optimizer.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {
            "enabled": t.precision == "fp16",
            "loss_scale": 0,  # dynamic loss scaling
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        # Tandem clips, logs and schedules itself; DeepSpeed's own console prints would duplicate it.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        # torch.optim.AdamW is handed to DeepSpeed as a client optimizer; ZeRO works with it.
        "zero_allow_untested_optimizer": True,
    }
    if par.zero_stage >= 2:
        zero.update({"overlap_comm": False, "contiguous_gradients": True})
    pin = bool(par.offload_pin_memory)
    if par.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
        # The client torch.optim.AdamW then runs on the host partition (see the module docstring).
        ds["zero_force_ds_cpu_optimizer"] = False
    if par.offload_param == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    return ds


def offload_problems(parallel: Any, *, num_experts: int = 0) -> list[str]:
    """Every reason the offload settings of `parallel` (a ParallelConfig) cannot run; empty when they can.
    Each message names the keys and values involved."""
    par = parallel
    opt, param, stage = par.offload_optimizer, par.offload_param, par.zero_stage
    p: list[str] = []
    if opt == "cpu" and stage == 0:
        p.append(
            "parallel.offload_optimizer='cpu' with parallel.zero_stage=0: optimizer offload moves the ZeRO "
            "optimizer's partition to the host, so it needs parallel.zero_stage 1, 2 or 3"
        )
    if param == "cpu" and stage in ZERO_STAGES and stage != 3:
        p.append(
            f"parallel.offload_param='cpu' with parallel.zero_stage={stage}: only ZeRO-3 partitions "
            "parameters, so parameter offload needs parallel.zero_stage=3"
        )
    if par.cpu_adam and opt != "cpu":
        p.append(
            f"parallel.cpu_adam=true with parallel.offload_optimizer={opt!r}: DeepSpeedCPUAdam updates "
            "the host-side partition, so it needs parallel.offload_optimizer='cpu'"
        )
    offloading = opt == "cpu" or param == "cpu"
    if offloading and isinstance(par.pp, int) and par.pp > 1:
        p.append(
            f"parallel.offload_optimizer={opt!r} / parallel.offload_param={param!r} with "
            f"parallel.pp={par.pp}: CPU offload is not verified with DeepSpeed's pipeline engine; use pp=1"
        )
    if offloading and num_experts > 0:
        p.append(
            f"parallel.offload_optimizer={opt!r} / parallel.offload_param={param!r} with "
            f"model.num_experts={num_experts}: CPU offload is not verified with the MoE layers; use "
            "offload 'none'"
        )
    return p


def engine_offload(engine: Any) -> dict[str, bool]:
    """What the built engine's ZeRO optimizer really offloads: {"optimizer": ..., "param": ...}. Read from
    DeepSpeed's optimizer objects (stage 1/2: `cpu_offload`; stage 3: `offload_optimizer`,
    `offload_param`), not from the JSON, so a block DeepSpeed ignored would show here as False."""
    zero = engine.optimizer
    return {
        "optimizer": bool(getattr(zero, "cpu_offload", False) or getattr(zero, "offload_optimizer", False)),
        "param": bool(getattr(zero, "offload_param", False)),
    }


def check_engine_offload(engine: Any, parallel: Any) -> str | None:
    """Raises if the engine does not offload what `parallel` asked for; returns a one-line description of
    the offload in effect (None without offload) for the run's console."""
    want = {"optimizer": parallel.offload_optimizer == "cpu", "param": parallel.offload_param == "cpu"}
    if not any(want.values()):
        return None
    got = engine_offload(engine)
    missing = [k for k in want if want[k] and not got[k]]
    if missing:
        keys = ", ".join(f"parallel.offload_{k}='cpu'" for k in missing)
        raise RuntimeError(
            f"{keys}: DeepSpeed's ZeRO-{parallel.zero_stage} optimizer ({type(engine.optimizer).__name__}) "
            "did not offload it; the run would not use the memory layout it was configured for"
        )
    moved = [name for key, name in (("optimizer", "optimizer states"), ("param", "parameters")) if got[key]]
    return f"ZeRO-{parallel.zero_stage}: {' and '.join(moved)} offloaded to cpu ({type(engine.optimizer).__name__})"
