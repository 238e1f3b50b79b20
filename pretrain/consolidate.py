"""Consolidating a tensor-parallel checkpoint into one full state dict.

A run at `parallel.tp=N` saves one DeepSpeed model file per TP rank, `mp_rank_XX_model_states.pt`
(`parallel.topology.Topology.as_mpu` names them by TP rank; data-parallel replicas do not write their
own). Each holds that rank's shard of every split parameter under the full model's names, as
`parallel.tensor_plan.apply_tensor_parallel` left them:

* column-parallel linears (`q/k/v_proj`, `gate/up_proj`): weight and bias split along dim 0;
* row-parallel linears (`o_proj`, `down_proj`): weight split along dim 1, bias replicated;
* the vocab-parallel embedding, an untied `lm_head` and BERT's `mlm_bias`: split along dim 0 (vocab);
* T5's relative-position tables (buckets, H): split along dim 1 (heads);
* everything else (norms, positions, poolers) replicated.

Each split is contiguous and rank r holds the r-th block, so the full tensor is the concatenation of the
ranks' shards in rank order along the split dimension. That dimension is read from the plan's own
module-name rules, and checked against the full model's shapes (built on the meta device from the
checkpoint's config): a shard that does not fit is an error naming the parameter, never a silently
wrong model.

Pipeline-parallel checkpoints (`pp > 1`, `parallel.pipeline`): DeepSpeed's pipeline engine writes one
`layer_XX-model_NN-model_states.pt` per pipeline layer XX and TP rank NN, holding that layer adapter's
own state dict (`block.attn.q_proj.weight`, `module.weight`, ...); the second copy of a tied embedding
is not written. The adapters wrap the model's own modules, so building the model and its layer list on
the meta device and matching tensors by identity maps each layer key back to the model's name; each TP
rank's layers are then one per-rank state dict for `merge_shards`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

PREFIX = "model."  # the training wrapper's attribute holding the network (pretrain/losses.py)


def _strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(PREFIX) :] if k.startswith(PREFIX) else k: v for k, v in state.items()}


def split_dims(model_cfg: Any) -> dict[str, int]:
    """Parameter name -> the dimension tensor parallelism splits it along; replicated ones are absent.

    Uses the tensor plan's rules (`parallel.tensor_plan`) on the names of the model the config builds."""
    from parallel.tensor_plan import _COLUMN, _ROW, PLANS, VOCAB_PARALLEL_PARAMETERS
    from pretrain.models import build_model

    with torch.device("meta"):
        model = build_model(model_cfg)
    tables = PLANS[model_cfg.family].bias_tables if model_cfg.family in PLANS else ()
    dims: dict[str, int] = {}
    for name, _ in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if _COLUMN.search(owner):
            dims[name] = 0
        elif _ROW.search(owner):
            if leaf == "weight":
                dims[name] = 1
        elif name in VOCAB_PARALLEL_PARAMETERS:
            dims[name] = 0
        elif owner in tables:
            dims[name] = 1
    return dims


def full_shapes(model_cfg: Any) -> dict[str, tuple[int, ...]]:
    from pretrain.models import build_model

    with torch.device("meta"):
        model = build_model(model_cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def merge_shards(
    shards: list[dict[str, torch.Tensor]], model_cfg: Any, *, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Per-TP-rank state dicts (rank order, wrapper prefix already stripped) -> the full state dict."""
    tp = len(shards)
    dims = split_dims(model_cfg)
    shapes = full_shapes(model_cfg)
    names = list(shards[0])
    problems = []
    for r, s in enumerate(shards[1:], start=1):
        if set(s) != set(names):
            diff = sorted(set(s) ^ set(names))
            problems.append(f"tp rank {r} holds other parameters than tp rank 0: {diff[:5]}")
    if problems:
        raise ValueError(f"{source}: cannot consolidate: " + "; ".join(problems))
    out: dict[str, torch.Tensor] = {}
    for name in names:
        parts = [s[name] for s in shards]
        dim = dims.get(name)
        full = torch.cat(parts, dim=dim) if dim is not None and tp > 1 else parts[0]
        want = shapes.get(name)
        if want is not None and tuple(full.shape) != want:
            how = f"split along dim {dim}" if dim is not None else "replicated"
            problems.append(
                f"{name}: {tp} shards of {tuple(parts[0].shape)} ({how}) give {tuple(full.shape)}, "
                f"the config's model has {want}"
            )
        out[name] = full
    if problems:
        raise ValueError(f"{source}: cannot consolidate tp={tp} shards:\n  " + "\n  ".join(problems))
    return out


def consolidate_tensor_parallel(checkpoint: str | Path, model_cfg: Any) -> dict[str, torch.Tensor]:
    """The full model weights of a checkpoint saved at tp >= 1, pp = 1, in the precision the module
    files hold (fp32 for fp32 runs; under bf16/fp16 the module copy, not the optimizer's fp32 masters)."""
    checkpoint = Path(checkpoint)
    meta = json.loads((checkpoint / "meta.json").read_text(encoding="utf-8"))
    layout = meta.get("layout") or {}
    tp, pp = int(layout.get("tp", 1)), int(layout.get("pp", 1))
    if pp > 1:
        shards = [_pipeline_rank_state(checkpoint, model_cfg, r) for r in range(tp)]
        return merge_shards(shards, model_cfg, source=str(checkpoint))
    files = [checkpoint / f"mp_rank_{r:02d}_model_states.pt" for r in range(tp)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{checkpoint}: saved at tp={tp} but {', '.join(missing)} missing")
    shards = [_strip(torch.load(f, map_location="cpu", weights_only=True)["module"]) for f in files]
    return merge_shards(shards, model_cfg, source=str(checkpoint))


def pipeline_layer_names(model_cfg: Any) -> list[dict[str, str] | None]:
    """Per pipeline layer: its state-dict keys -> the model's names (None: a layer that writes no file,
    the tied embedding's second use)."""
    try:
        from parallel.pipeline import pipeline_layers
    except ImportError:
        raise NotImplementedError(
            "consolidating a pipeline-parallel checkpoint needs parallel.pipeline, absent here"
        ) from None
    from pretrain.models import build_model

    with torch.device("meta"):
        model = build_model(model_cfg)
        specs = pipeline_layers(model)
        names = {id(t): n for n, t in model.state_dict(keep_vars=True).items()}
        out: list[dict[str, str] | None] = []
        for spec in specs:
            if getattr(spec, "forward_fn", None) is not None:
                out.append(None)
                continue
            layer = spec.build()
            out.append({k: names[id(t)] for k, t in layer.state_dict(keep_vars=True).items()})
    return out


def _pipeline_rank_state(checkpoint: Path, model_cfg: Any, tp_rank: int) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for idx, names in enumerate(pipeline_layer_names(model_cfg)):
        if names is None:
            continue
        f = checkpoint / f"layer_{idx:02d}-model_{tp_rank:02d}-model_states.pt"
        if not f.is_file():
            raise FileNotFoundError(
                f"{checkpoint}: pipeline layer {idx} of tp rank {tp_rank}: {f.name} missing"
            )
        for key, value in torch.load(f, map_location="cpu", weights_only=True).items():
            if key not in names:
                raise ValueError(f"{f}: {key!r} is not a parameter of pipeline layer {idx}")
            state[names[key]] = value
    return state
