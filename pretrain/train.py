"""The training loop: build, then step / log / evaluate / checkpoint / stop, top to bottom."""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from data_pipeline.batch_ramp import BatchSizeRamp
from data_pipeline.loader import TrainLoader
from data_pipeline.manifest import load_manifest
from data_pipeline.objectives import build_objective
from parallel.parallelize import compile_counts, parallelize, param_groups
from parallel.tensor_plan import pad_vocab_size
from parallel.topology import Topology
from parallel.zero import check_engine_offload, deepspeed_config, engine_zero_stage
from pretrain.checkpoint import Checkpointer
from pretrain.config import (
    Config,
    ConfigError,
    OptimizerConfig,
    TrainConfig,
    config_to_dict,
    save_config,
    validation_problems,
)
from pretrain.distributed import init_distributed, launched_world_size
from pretrain.flops import device_peak_tflops, flops_per_sample
from pretrain.losses import LanguageModelLoss, token_cross_entropy
from pretrain.metrics import MetricsLogger, memory_gb
from pretrain.models import build_model
from pretrain.preemption import StopFlag, slurm_deadline
from pretrain.replay import ResumeCheck
from pretrain.step_guard import OptimizerGate, StepGuard, injected_fault


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    first_loss: float | None
    final_loss: float | None
    tokens_per_s: float | None
    checkpoint: Path | None
    losses: dict[int, float] = field(default_factory=dict)
    eval_loss: float | None = None
    stopped_early: str | None = None  # why the run stopped before train.steps (signal or time limit)


def build_scheduler(optimizer: Any, cfg: Config) -> Any:
    """megatron-core's OptimizerParamScheduler: warmup, decay (cosine/linear/WSD/...), weight-decay ramp."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o, steps = cfg.optimizer, cfg.train.steps
    wd_end = o.weight_decay if o.weight_decay_end is None else o.weight_decay_end
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=o.decay_steps or steps,
        lr_decay_style=o.decay_style,
        start_wd=o.weight_decay,
        end_wd=wd_end,
        wd_incr_steps=steps,
        wd_incr_style=o.weight_decay_style,
        wsd_decay_steps=o.wsd_decay_steps or None,
        lr_wsd_decay_style="linear" if o.decay_style == "WSD" else None,
    )


def resolve_vocab_size(cfg: Config, tokenizer_vocab: int) -> list[str]:
    """Sets model.vocab_size from the shards' tokenizer when it is 0, padded up to a multiple of
    model.make_vocab_size_divisible_by, and records the tokenizer's size in model.tokenizer_vocab_size when
    the model has more rows than the tokenizer has pieces (decoding then never emits the extra ids).
    Returns the problems found (in place; nothing is changed when there are any)."""
    m = cfg.model
    if m.vocab_size and m.vocab_size < tokenizer_vocab:
        return [
            f"model.vocab_size={m.vocab_size}: smaller than the shards' tokenizer vocabulary ({tokenizer_vocab})"
        ]
    if m.tokenizer_vocab_size and m.tokenizer_vocab_size != tokenizer_vocab:
        return [
            f"model.tokenizer_vocab_size={m.tokenizer_vocab_size}: the shards' tokenizer has {tokenizer_vocab} "
            "pieces (the key is recorded by training; leave it 0)"
        ]
    if m.vocab_size == 0:
        m.vocab_size = pad_vocab_size(tokenizer_vocab, m.make_vocab_size_divisible_by)
    if m.vocab_size > tokenizer_vocab:
        m.tokenizer_vocab_size = tokenizer_vocab
    return []


def train(cfg: Config) -> TrainResult:
    # Every rule, including those about the world size, is checked before any process group exists.
    problems = validation_problems(cfg, world_size=launched_world_size())
    if problems:
        raise ConfigError(problems)
    t_cfg = cfg.train

    # --- data and model shapes (read before any process group: the vocabulary's rules depend on them)
    # One shards directory, or a weighted blend of several sharded with the same tokenizer.
    blend: list[tuple[str | Path, float]] = [(s["path"], float(s["weight"])) for s in cfg.data.sources]
    data_source: str | list[tuple[str | Path, float]] = list(blend) or cfg.data.shards
    eval_shards = cfg.data.shards or blend[0][0]
    manifest = load_manifest(eval_shards)
    for path, _ in blend[1:]:
        other = load_manifest(path)["tokenizer"]["sha256"]
        if other != manifest["tokenizer"]["sha256"]:
            raise ConfigError(
                [f"data.sources: {path} was tokenized with another tokenizer than {blend[0][0]}"]
            )
    tok = manifest["tokenizer"]
    problems = resolve_vocab_size(cfg, int(tok["vocab_size"]))
    problems = problems or validation_problems(cfg, world_size=launched_world_size())  # now with the vocab
    if problems:
        raise ConfigError(problems)
    _apply_kernel_backends(t_cfg)
    rank, world, _ = init_distributed(timeout_s=cfg.train.collective_timeout_s)
    topo = Topology.build(tp=cfg.parallel.tp, pp=cfg.parallel.pp)
    dp, dp_rank = topo.dims.dp, topo.dp_rank
    special = {k: int(v) for k, v in tok.items() if k.endswith("_id")}
    objective = build_objective(
        cfg.model.objective_name, seq_len=cfg.data.seq_len, tokenizer=tok, seed=t_cfg.seed
    )

    run_dir = Path(t_cfg.out_dir)
    if rank == 0:
        save_config(cfg, run_dir / "config.yaml")

    # --- model, optimizer, engine
    torch.manual_seed(t_cfg.seed)
    np.random.seed(t_cfg.seed % 2**32)
    random.seed(t_cfg.seed)
    model = build_model(cfg.model)
    o = cfg.optimizer
    gates: list[OptimizerGate] = []

    def make_optimizer(module: nn.Module) -> torch.optim.Optimizer:
        optimizer: torch.optim.Optimizer
        if cfg.parallel.cpu_adam:  # the host-side update of ZeRO-Offload, vectorized (parallel/zero.py)
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(
                param_groups(module, o.weight_decay),
                lr=o.lr,
                betas=(o.beta1, o.beta2),
                eps=o.eps,
                adamw_mode=True,
            )
        else:
            optimizer = adamw(param_groups(module, o.weight_decay), o)
        gates.append(OptimizerGate(optimizer))
        return optimizer

    # --- where to resume from, and whether the saved layout must be converted first
    checkpointer = Checkpointer(
        run_dir,
        None,
        rank=rank,
        world_size=world,
        keep_last=cfg.checkpoint.keep_last,
        verify_on_load=cfg.checkpoint.verify_on_load,
    )
    resume_from = checkpointer.resolve(t_cfg.resume)
    layout = {
        "tp": topo.dims.tp,
        "pp": topo.dims.pp,
        "dp": dp,
        # what DeepSpeed runs (and writes), which a resume at another dp must know
        "zero": engine_zero_stage(cfg.parallel.zero_stage, t_cfg.precision, topo.dims.pp),
        "precision": t_cfg.precision,
        "vocab_size": cfg.model.vocab_size,  # a change of make_vocab_size_divisible_by is a layout change
    }
    ds_config = deepspeed_config(cfg, dp_size=dp)
    plan = "same"
    load_from = resume_from
    if resume_from is not None:
        plan = checkpointer.reshard_plan(resume_from, layout)
        if plan == "reshard":
            # Converted once, every rank its own slice, cached beside the original; the loader resumes by
            # sample count.
            load_from = checkpointer.prepare_reshard(
                resume_from, layout, partition=cfg.parallel.pp_partition, model_cfg=cfg.model
            )
        elif plan == "universal":
            checkpointer.prepare_universal(resume_from)
            ds_config["checkpoint"] = {"load_universal": True}
        if plan != "same" and rank == 0:
            print(f"resuming {resume_from} at a new layout {layout} ({plan} load)", flush=True)

    # --- continued pretraining: the source's full weights go into the model before parallelize() shards it
    init_record: dict[str, Any] | None = None
    if t_cfg.init_from and resume_from is not None:
        if rank == 0:
            print(f"train.init_from={t_cfg.init_from} ignored: resuming {resume_from}", flush=True)
    elif t_cfg.init_from:
        from pretrain.continued import load_init_from, load_into

        init_state, init_record = load_init_from(t_cfg.init_from, cfg, tokenizer_sha256=tok.get("sha256"))
        load_into(model, init_state, t_cfg.init_from)
        del init_state
        if rank == 0:
            print(f"initialized from {t_cfg.init_from} (step {init_record['step']})", flush=True)

    engine, tp_rng = parallelize(
        model,
        topology=topo,
        ds_config=ds_config,
        make_optimizer=make_optimizer,
        wrap=lambda m: LanguageModelLoss(
            m, tp_group=topo.tp_group, tp_size=topo.dims.tp, loss_chunk_size=t_cfg.loss_chunk_size
        ),
        activation_checkpointing=cfg.parallel.activation_checkpointing,
        compile_blocks=t_cfg.compile,
        sequence_parallel=cfg.parallel.sequence_parallel,
        seed=t_cfg.seed,
        expert_parallel=cfg.parallel.ep,
        pipeline_partition=cfg.parallel.pp_partition,
        pipeline_loss=lambda logits, labels: token_cross_entropy(
            logits, labels, tp_group=topo.tp_group, tp_size=topo.dims.tp
        ),
    )
    module, gate = engine.module, gates[0]
    offload = check_engine_offload(engine, cfg.parallel)
    if offload and rank == 0:
        print(offload, flush=True)
    guard = StepGuard(spike_factor=t_cfg.loss_spike_factor, max_in_a_row=t_cfg.max_skipped_in_a_row)
    pipe = None
    if topo.dims.pp > 1:  # engine.train_batch runs the micro-batches; the guard decides inside it
        from parallel.pipeline import PipelineStep

        pipe = PipelineStep(
            engine,
            topology=topo,
            family=cfg.model.family,
            guard=guard,
            gate=gate,
            world_size=world,
            own_clip=getattr(engine, "tandem_clip", 0.0),
            measure_norm=cfg.parallel.zero_stage == 0 and t_cfg.precision == "fp32",
        )
    if world == 1 and layout["zero"] == 0:
        # One rank has nothing to average, but DeepSpeed still flattens every gradient through a one-rank
        # all-reduce each step (~1% of a small model's step, measured by bench/train_throughput.py).
        engine.enable_backward_allreduce = False
    scheduler = build_scheduler(engine.optimizer, cfg)
    checkpointer.attach(engine)

    # --- resume
    step, consumed = 0, 0
    if load_from is not None:
        state, resumed_meta = checkpointer.load(load_from, plan=plan)
        init_record = resumed_meta.get("init_from")  # a resumed continued-pretraining run keeps its source
        scheduler.load_state_dict(state["scheduler"])
        guard.load_state_dict(state.get("guard", {}))
        if tp_rng is not None and "tp_rng" in state:
            tp_rng.load_state_dict(state["tp_rng"])
        step, consumed = int(state["step"]), int(state["loader"]["consumed_samples"])
    ramp = BatchSizeRamp.from_config(t_cfg.batch_size_ramp, t_cfg.global_batch_size)
    loader = TrainLoader(
        data_source,
        objective,
        split=cfg.data.train_split,
        micro_batch_size=t_cfg.micro_batch_size,
        global_batch_size=t_cfg.global_batch_size,
        dp_rank=dp_rank,
        dp_size=dp,
        seed=t_cfg.seed,
        shuffle_shards=cfg.data.shuffle_shards,
        eos_id=special["eos_id"],
        num_workers=cfg.data.num_workers,
        consumed_samples=consumed,
        batch_size_ramp=ramp,
    )
    if resume_from is not None:
        mismatch = TrainLoader.check_resumable(
            state["loader"],
            fingerprint=loader.fingerprint,
            sample_len=objective.sample_len,
            global_batch_size=t_cfg.global_batch_size,
            seed=t_cfg.seed,
            shuffle_shards=cfg.data.shuffle_shards,
            batch_size_ramp=ramp,
        )
        if mismatch:
            raise RuntimeError(
                f"{resume_from}: cannot continue the data stream exactly: " + "; ".join(mismatch)
            )

    # --- bookkeeping (per sample: with a batch-size ramp the samples per step change)
    target_len = getattr(objective, "targets_length", None)
    flops_sample = flops_per_sample(model, cfg.model, cfg.data.seq_len, target_len)
    peak = t_cfg.peak_tflops or device_peak_tflops(t_cfg.precision)
    # train.verify_resume: reads the records past the checkpoint before the logger drops them from metrics.jsonl.
    check = ResumeCheck.open(
        cfg, checkpoint=resume_from, start=step, layout=layout, same_layout=plan == "same", rank=rank
    )
    logger = MetricsLogger(
        run_dir, enabled=rank == 0, total_steps=t_cfg.steps, start_step=step, progress=t_cfg.progress
    )
    result = TrainResult(
        run_dir=run_dir,
        steps=step,
        first_loss=None,
        final_loss=None,
        tokens_per_s=None,
        checkpoint=resume_from,
    )
    config_yaml = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    # The tokenizer travels with every checkpoint, so export and evaluation work after the shards move.
    tokenizer_file = Path(str(tok.get("path", "")))
    extra_files = {"tokenizer.model": tokenizer_file} if tokenizer_file.is_file() else {}

    def save(at_step: int) -> Path:
        state = {
            "step": at_step,
            "loader": loader.state_dict(),
            "scheduler": scheduler.state_dict(),
            "guard": guard.state_dict(),
        }
        if tp_rng is not None:
            state["tp_rng"] = tp_rng.state_dict()
        meta = {
            "consumed_samples": loader.consumed_samples,
            "tokens": loader.consumed_samples * cfg.data.seq_len,
            "layout": {"tp": topo.dims.tp, "pp": topo.dims.pp, "dp": dp, "zero": layout["zero"]},
            "family": cfg.model.family,
        }
        if init_record is not None:
            meta["init_from"] = init_record
        return checkpointer.save(
            at_step, state=state, meta=meta, config_yaml=config_yaml, extra_files=extra_files
        )

    # DeepSpeed records the gradient norm only inside its ZeRO and mixed-precision optimizers.
    own_grad_norm = cfg.parallel.zero_stage == 0 and t_cfg.precision == "fp32"

    # --- stop requests: signals (preemption, Slurm's --signal) and time limits, agreed at step boundaries
    deadline = slurm_deadline()
    if t_cfg.time_limit_s:
        own = time.time() + t_cfg.time_limit_s
        deadline = min(deadline, own) if deadline else own
    stop = StopFlag(deadline=deadline, grace_s=t_cfg.stop_grace_s).install()

    compiling = t_cfg.compile != "none"
    compile_start = compile_counts() if compiling else {}
    if init_record is not None and resume_from is None:
        # The source model's validation loss, before any update: step 0 of the new run.
        result.eval_loss = evaluate(engine, cfg, objective, special["eos_id"], topo, shards=eval_shards)
        if result.eval_loss is not None:
            logger.log(
                {"step": 0, "eval_loss": result.eval_loss, "eval_ppl": math.exp(min(result.eval_loss, 50.0))}
            )

    # --- the loop
    engine.train()
    window_loss, window_steps, window_samples, window_start = 0.0, 0, 0, time.perf_counter()
    window_extra: dict[str, list[float]] = {}  # the model's own metrics (pretraining_loss), per micro batch
    total_time, total_samples_timed = 0.0, 0
    while step < t_cfg.steps:
        # This step's global batch and micro batches per rank: fixed, or the ramp's at the samples consumed.
        batch_size, gas = loader.batch_size, loader.gas
        if ramp is not None:
            # DeepSpeed scales the loss by 1/gas and decides the accumulation boundary from its own counter
            # of micro steps, which assumes a fixed gas: give it this step's gas and the boundary explicitly.
            engine.set_train_batch_size(batch_size)
        scheduler.step(1)  # lr for update number step+1 (warmup starts above zero)
        rng_before = torch.get_rng_state()
        losses: list[float] = []
        log_now = (step + 1) % t_cfg.log_interval == 0 or step + 1 == t_cfg.steps
        grad_norm = None
        fault = injected_fault(step + 1, rank)
        for micro in range(gas if pipe is None else 0):
            if ramp is not None:
                engine.set_gradient_accumulation_boundary(micro == gas - 1)
            loss = engine(next(loader))
            if fault:
                loss = loss * (float("nan") if fault == "nan" else 100.0)
            engine.backward(loss)
            losses.append(loss.item())
            for key, value in engine.module.metrics.items():
                window_extra.setdefault(key, []).append(value)
            if micro == gas - 1:
                if own_grad_norm:
                    grad_norm = _grad_norm(module, topo)  # all-reduced by now, not yet clipped
                # Collective: every rank reaches the same verdict before the optimizer update.
                skip_reason, step_loss = guard.verdict(losses, grad_norm, world_size=world)
                gate.closed = skip_reason is not None
            engine.step()
        if pipe is not None:
            skip_reason, step_loss, grad_norm = pipe([next(loader) for _ in range(gas)], fault)
        gate.closed = False
        step += 1
        guard.record(skip_reason, step_loss)
        logger.advance()
        if skip_reason is not None:
            # Untouched weights; give back the dropout randomness and the schedule step this update used.
            torch.set_rng_state(rng_before)
            scheduler.step(-1)
            result.losses[step] = math.nan
            logger.log({"step": step, "skipped": skip_reason, "skipped_total": guard.skipped})
            if guard.exhausted:
                result.checkpoint = save(step)
                raise RuntimeError(
                    f"{guard.in_a_row} steps in a row skipped (last at step {step}: {skip_reason}); stopped "
                    f"after saving {result.checkpoint} (weights of the last good step)"
                )
        else:
            result.losses[step] = step_loss
            if result.first_loss is None:
                result.first_loss = step_loss
            window_loss += step_loss
            window_steps += 1
            window_samples += batch_size
        if check is not None and check.observe(
            step,
            loss=None if skip_reason else step_loss,
            skipped=skip_reason,
            grad_norm=grad_norm if own_grad_norm else engine.get_global_grad_norm(),
            lr=engine.optimizer.param_groups[0]["lr"],
            consumed_samples=loader.consumed_samples,
            last_step=t_cfg.steps,
        ):  # collective; raises ResumeMismatch on every rank at the first step that differs
            check = None

        if (step % t_cfg.log_interval == 0 or step == t_cfg.steps) and window_steps:
            elapsed = time.perf_counter() - window_start
            tokens_per_s = window_samples * cfg.data.seq_len / elapsed
            tflops = window_samples * flops_sample / elapsed / 1e12 / world
            if not own_grad_norm:
                grad_norm = engine.get_global_grad_norm()
            elif not log_now:
                grad_norm = None
            record = {
                "step": step,
                "loss": window_loss / window_steps,
                "lr": engine.optimizer.param_groups[0]["lr"],
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens_per_s": tokens_per_s,
                "tflops_per_device": tflops,
                "mfu": tflops / peak if peak else None,
                "memory_gb": memory_gb(),
                "consumed_samples": loader.consumed_samples,
                "global_batch_size": batch_size,  # of this record's last step
                "skipped_total": guard.skipped,
                "source_samples": loader.source_samples(),
                "elapsed_s": elapsed,
            }
            record.update({k: sum(v) / len(v) for k, v in window_extra.items()})
            window_extra = {}
            logger.log(record)
            result.final_loss, result.tokens_per_s = record["loss"], tokens_per_s
            total_time += elapsed
            total_samples_timed += window_samples
            window_loss, window_steps, window_samples = 0.0, 0, 0

        if t_cfg.eval_interval and (step % t_cfg.eval_interval == 0 or step == t_cfg.steps):
            result.eval_loss = evaluate(engine, cfg, objective, special["eos_id"], topo, shards=eval_shards)
            if result.eval_loss is not None:
                logger.log(
                    {
                        "step": step,
                        "eval_loss": result.eval_loss,
                        "eval_ppl": math.exp(min(result.eval_loss, 50.0)),
                    }
                )

        interval = cfg.checkpoint.interval
        if (interval and step % interval == 0) or (step == t_cfg.steps and cfg.checkpoint.save_final):
            result.checkpoint = save(step)
        window_start = time.perf_counter() if window_steps == 0 else window_start

        if step < t_cfg.steps and stop.agreed(topo.dp_group, dp):
            result.stopped_early = stop.local_reason() or "another rank's request"
            if result.checkpoint is None or not result.checkpoint.name.endswith(f"-{step}"):
                result.checkpoint = save(step)
            break

    stop.uninstall()
    logger.close()
    if compiling and rank == 0:
        # Graph breaks are where eager code runs between compiled graphs: the Triton kernels' calls on
        # purpose (one each), anything else is fusion lost (TORCH_LOGS=graph_breaks names each). This
        # process's counts (with pp > 1, the first stage's).
        made = {k: v - compile_start[k] for k, v in compile_counts().items()}
        print(
            f"train.compile={t_cfg.compile}: {made['graphs']} graphs compiled, {made['graph_breaks']} graph "
            f"breaks, {made['eager_frames']} frames left eager",
            flush=True,
        )
    result.steps = step
    if total_samples_timed:
        result.tokens_per_s = total_samples_timed * cfg.data.seq_len / total_time
    return result


def _apply_kernel_backends(t_cfg: TrainConfig) -> None:
    """train.attention_backend and train.norm_backend -> the process-wide defaults the models' attention
    and norm modules resolve through. 'auto' takes what the environment variable names now
    (TANDEM_ATTENTION_BACKEND, TANDEM_NORM_BACKEND), else the built-in default (attention: 'auto', Triton on
    CUDA; norms: 'torch'), so a run never inherits an earlier run's choice in the same process. 'triton'
    without CUDA needs Triton's interpreter, which must be on before the kernels are defined: refused here,
    before any process group, rather than at the first forward."""
    from pretrain.kernels.attention import BACKEND_DEFAULT
    from pretrain.kernels.norm_layers import NORM_BACKEND_DEFAULT

    no_triton = not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    keys = (
        ("attention_backend", t_cfg.attention_backend, BACKEND_DEFAULT, "sdpa"),
        ("norm_backend", t_cfg.norm_backend, NORM_BACKEND_DEFAULT, "torch"),
    )
    resolved = [default.configured() if value == "auto" else value for _, value, default, _ in keys]
    problems = [
        f"{f'train.{key}' if value == 'triton' else f'{default.env} (train.{key}=auto)'}='triton': no CUDA "
        "device here, and Triton's CPU interpreter is off (set TRITON_INTERPRET=1 in the environment before "
        f"starting: orders of magnitude slower, for tests), or use '{other}'"
        for (key, value, default, other), chosen in zip(keys, resolved, strict=True)
        if chosen == "triton" and no_triton
    ]
    if problems:
        raise ConfigError(problems)
    for (_, _, default, _), chosen in zip(keys, resolved, strict=True):
        default.set(chosen)


def adamw(groups: list[dict], o: OptimizerConfig) -> torch.optim.AdamW:
    """torch AdamW with optimizer.implementation's kernels. 'auto' is fused when DeepSpeed trains on a GPU
    (the parameters are still on the host here; the engine moves them): one kernel per tensor instead of
    ~10 elementwise ones, which matters most for the flattened fp32 master weights DeepSpeed's ZeRO/bf16
    optimizers hand it. Elsewhere the for-loop stays the default: the bare-PyTorch baseline
    (bench/train_throughput.py) and the CPU parity and resume checks were set up with it."""
    impl = o.implementation
    if impl == "auto":
        from deepspeed.accelerator import get_accelerator

        impl = "fused" if get_accelerator().device_name() == "cuda" else "for-loop"
    kernels = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[impl]
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, **kernels)


@torch.no_grad()
def _grad_norm(module: nn.Module, topo: Topology) -> float:
    """Global L2 norm of the gradients: tensor-parallel shards summed over the tp group, replicated
    parameters counted once."""
    from parallel.tensor import is_tensor_parallel

    sharded = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    for p in module.parameters():
        if p.grad is not None:
            sq = p.grad.detach().double().pow(2).sum()
            if is_tensor_parallel(p):
                sharded += sq
            else:
                replicated += sq
    if topo.dims.tp > 1:
        torch.distributed.all_reduce(sharded, group=topo.tp_group)
    return (sharded + replicated).sqrt().item()


@torch.no_grad()
def evaluate(
    engine: Any, cfg: Config, objective: Any, eos_id: int, topo: Topology, *, shards: str | Path
) -> float | None:
    """Token-weighted mean loss over the first `train.eval_batches` micro batches of the validation split,
    shared out over the dp ranks (None if absent): the code `pretrain eval` runs (pretrain/evaluate.py)."""
    from pretrain.evaluate import engine_validation, validation_batches

    try:
        batches, counted = validation_batches(
            shards,
            objective,
            split=cfg.data.eval_split,
            micro_batch_size=cfg.train.micro_batch_size,
            num_batches=cfg.train.eval_batches,
            eos_id=eos_id,
            dp_rank=topo.dp_rank,
            dp_size=topo.dims.dp,
        )
    except ValueError:
        return None  # no validation shards (or too few tokens for one sample)
    total, count, _ = engine_validation(
        engine, topo, family=cfg.model.family, batches=batches, counted=counted
    )
    return total / count if count else None
