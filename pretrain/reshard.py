"""Resharding a checkpoint to another tensor/pipeline/data-parallel layout (ZeRO stage 0, fp32).

A checkpoint saved at (tp, pp, dp) is rewritten as the checkpoint the same run would have saved at
(tp', pp', dp'), in Tandem's own format (DeepSpeed engine files, per-rank Tandem files, config, meta,
manifest), so the ordinary resume path loads it at the new layout:

1. Weights: `pretrain.consolidate` merges the TP shards (and pipeline layer files) into the full state
   dict; each target TP rank r takes the r-th of tp' contiguous blocks along the same dim
   (`split_state`). Replicated tensors are copied.
2. Optimizer: under ZeRO stage 0 with fp32 the engine's optimizer is torch's AdamW, whose state is per
   parameter and shaped like it (`exp_avg`, `exp_avg_sq`; `step` a scalar), so it merges and splits by
   the weights' rules. DeepSpeed stores it in `mp_rank_XX_model_states.pt` under `optimizer`, indexed by
   the position of the parameter in that rank's optimizer (param groups of
   `parallel.parallelize.param_groups`: matrices and embeddings decay, 1-D tensors do not). The file index
   is the TP rank without pipelines and `stage * tp + tp_rank` with them (DeepSpeed's model-parallel rank:
   tp is the fastest axis). Each stage's parameter order is its `PipelineModule`'s: tied modules first,
   then its layers in order; which layers a stage holds follows DeepSpeed's partitioning
   (`partition_balanced` over the per-layer parameter counts at that tp, or uniform), recomputed here.
   Every state's shape is checked against the parameter it is mapped to, so a wrong mapping is an error,
   never a silently wrong optimizer.
3. The LR schedule, step counter and loader position are global and carry over unchanged: the loader
   resumes from the global `consumed_samples`, so no sample is skipped or repeated at any dp'. A new rank
   beyond the saved world takes rank 0's RNG states.

Other ZeRO stages (partitioned optimizer states) and bf16/fp16 (fp32 masters inside DeepSpeed's
optimizer wrappers) are refused, naming both layouts; a dp-only change for those goes through
DeepSpeed's universal checkpoint (`Checkpointer.prepare_universal`).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from data_pipeline.atomic import write_text_atomic

OPTIMIZER_TENSORS = ("exp_avg", "exp_avg_sq")  # shaped like the parameter; everything else is copied


class ReshardError(ValueError):
    pass


def parse_layout(text: str) -> dict[str, int]:
    """`tp=1,pp=2,dp=2` -> {'tp': 1, 'pp': 2, 'dp': 2}; tp and pp are required, dp optional."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in ("tp", "pp", "dp") or not value.isdigit() or int(value) < 1:
            raise ReshardError(f"--to {text!r}: expected tp=N,pp=N[,dp=N] with N >= 1, got {part!r}")
        out[key] = int(value)
    missing = [k for k in ("tp", "pp") if k not in out]
    if missing:
        raise ReshardError(f"--to {text!r}: {', '.join(missing)} missing (tp=N,pp=N[,dp=N])")
    return out


# ----------------------------------------------------------------------------- split / merge
def split_tensor(full: torch.Tensor, dim: int, size: int, rank: int) -> torch.Tensor:
    """The rank-th of `size` contiguous blocks of `full` along `dim` (the inverse of concatenating them)."""
    if full.shape[dim] % size:
        raise ReshardError(f"dim {dim} of a {tuple(full.shape)} tensor does not split into {size} blocks")
    n = full.shape[dim] // size
    return full.narrow(dim, rank * n, n).clone()


def split_state(
    full: dict[str, torch.Tensor], dims: dict[str, int], size: int, rank: int
) -> dict[str, torch.Tensor]:
    """One TP rank's shard of a full state dict (`dims` from `consolidate.split_dims`)."""
    return {
        k: split_tensor(v, dims[k], size, rank) if k in dims and size > 1 else v.clone()
        for k, v in full.items()
    }


# ----------------------------------------------------------------------------- parameter order
@dataclass(frozen=True)
class _Layer:
    kind: str  # the adapter's class name
    tied: str | None  # TiedLayerSpec key
    saved: bool  # writes a layer file (the tied head's second use does not)
    keys: tuple[tuple[str, str], ...]  # (layer state-dict key, model name), state-dict order
    params: tuple[str, ...]  # model names of its parameters, in named_parameters order


def _pipeline_layers(model_cfg: Any) -> list[_Layer]:
    from parallel.pipeline import pipeline_layers
    from pretrain.models import build_model

    with torch.device("meta"):
        model = build_model(model_cfg)
        names = {id(t): n for n, t in model.state_dict(keep_vars=True).items()}
        out = []
        for spec in pipeline_layers(model):
            layer = spec.build()
            out.append(
                _Layer(
                    kind=spec.typename.__name__,
                    tied=getattr(spec, "key", None),
                    saved=getattr(spec, "forward_fn", None) is None,
                    keys=tuple((k, names[id(t)]) for k, t in layer.state_dict(keep_vars=True).items()),
                    params=tuple(names[id(p)] for p in layer.parameters() if p.requires_grad),
                )
            )
    return out


def _partition(layers: list[_Layer], numel: dict[str, int], pp: int, method: str) -> list[int]:
    """Stage boundaries as DeepSpeed's PipelineModule computes them (`parts[s]:parts[s+1]` is stage s)."""
    from deepspeed.runtime import utils as ds_utils

    if method == "uniform":
        return list(ds_utils.partition_uniform(num_items=len(layers), num_parts=pp))
    if method == "parameters":
        counts = [sum(numel[n] for n in layer.params) for layer in layers]
    elif method == "blocks":  # pipeline_engine's "type:BlockPipe": each transformer block counts 1
        counts = [int(bool(re.search("BlockPipe", layer.kind, re.IGNORECASE))) for layer in layers]
    else:
        raise ReshardError(f"parallel.pp_partition={method!r}: unknown")
    return list(ds_utils.partition_balanced(weights=counts, num_parts=pp))


@dataclass(frozen=True)
class Layout:
    """Where every parameter lives at one (tp, pp) layout."""

    tp: int
    pp: int
    layers: list[_Layer] | None  # None without pipelines
    parts: list[int] | None
    order: list[list[str]]  # per stage: parameter names in the optimizer's order (decay group first)
    groups: list[list[int]]  # per stage: how many of `order` fall in each group (decay, no_decay)

    def mp_rank(self, stage: int, tp_rank: int) -> int:
        return stage * self.tp + tp_rank


def build_layout(model_cfg: Any, *, tp: int, pp: int, partition: str) -> Layout:
    from pretrain.consolidate import full_shapes, split_dims
    from pretrain.models import build_model

    dims = split_dims(model_cfg)
    shapes = full_shapes(model_cfg)
    ndim = {k: len(s) for k, s in shapes.items()}
    numel = {k: int(torch.Size(s).numel()) // (tp if k in dims else 1) for k, s in shapes.items()}
    stages: list[list[str]] = []
    layers = parts = None
    if pp == 1:
        with torch.device("meta"):
            model = build_model(model_cfg)
        stages.append([n for n, p in model.named_parameters() if p.requires_grad])
    else:
        layers = _pipeline_layers(model_cfg)
        parts = _partition(layers, numel, pp, partition)
        for s in range(pp):
            mine = layers[parts[s] : parts[s + 1]]
            tied_first: list[str] = []
            seen_keys: set[str] = set()
            for layer in mine:  # PipelineModule registers tied modules before its layers
                if layer.tied is not None and layer.tied not in seen_keys:
                    seen_keys.add(layer.tied)
                    tied_first += layer.params
            rest = [n for layer in mine if layer.tied is None for n in layer.params]
            names = list(dict.fromkeys(tied_first + rest))  # named_parameters yields a shared tensor once
            stages.append(names)
    order, groups = [], []
    for names in stages:
        decay = [n for n in names if ndim[n] >= 2]
        no_decay = [n for n in names if ndim[n] < 2]
        order.append(decay + no_decay)
        groups.append([len(decay), len(no_decay)])
    return Layout(tp=tp, pp=pp, layers=layers, parts=parts, order=order, groups=groups)


# ----------------------------------------------------------------------------- reading
def _load_engine_file(path: Path) -> dict[str, Any]:
    from pretrain.checkpoint import _allowed_deepspeed_globals

    with torch.serialization.safe_globals(_allowed_deepspeed_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def _read_optimizer(
    checkpoint: Path, layout: Layout, model_cfg: Any
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Full per-parameter optimizer states {name: {step, exp_avg, exp_avg_sq}} and the group settings."""
    from pretrain.consolidate import full_shapes, merge_shards, split_dims

    dims, shapes = split_dims(model_cfg), full_shapes(model_cfg)
    per_rank: list[dict[str, dict[str, Any]]] = [{} for _ in range(layout.tp)]
    hyper: list[dict[str, Any]] = []
    for s in range(layout.pp):
        for t in range(layout.tp):
            f = checkpoint / f"mp_rank_{layout.mp_rank(s, t):02d}_model_states.pt"
            if not f.is_file():
                raise FileNotFoundError(f"{checkpoint}: {f.name} missing (stage {s}, tp rank {t})")
            opt = _load_engine_file(f).get("optimizer")
            if not opt or "param_groups" not in opt:
                raise ReshardError(f"{f}: holds no optimizer state (only ZeRO stage 0 keeps it here)")
            got = [len(g["params"]) for g in opt["param_groups"]]
            if got != layout.groups[s]:
                raise ReshardError(
                    f"{f}: optimizer groups hold {got} parameters; the layout's stage {s} has "
                    f"{layout.groups[s]} (decay, no_decay): another partition or optimizer setup?"
                )
            if not hyper:
                hyper = [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]]
            indices = [i for g in opt["param_groups"] for i in g["params"]]
            for i, name in zip(indices, layout.order[s], strict=True):
                state = opt["state"].get(i)
                if state is None or name in per_rank[t]:
                    continue  # never stepped, or a tied copy already read on an earlier stage
                want = list(shapes[name])
                if name in dims and layout.tp > 1:
                    want[dims[name]] //= layout.tp
                for key in OPTIMIZER_TENSORS:
                    if key in state and list(state[key].shape) != want:
                        raise ReshardError(
                            f"{f}: state {i} {key} is {tuple(state[key].shape)}; mapped to {name}, whose shard "
                            f"is {tuple(want)}"
                        )
                per_rank[t][name] = state
    names = list(per_rank[0])
    full: dict[str, dict[str, Any]] = {n: {} for n in names}
    for key in OPTIMIZER_TENSORS:
        merged = merge_shards(
            [{n: r[n][key] for n in names} for r in per_rank], model_cfg, source=str(checkpoint)
        )
        for n in names:
            full[n][key] = merged[n]
    for n in names:
        for key, value in per_rank[0][n].items():
            full[n].setdefault(key, value)  # step (a scalar, the same on every rank)
    return full, hyper


# ----------------------------------------------------------------------------- the conversion
def _refusal(saved: dict[str, Any], want: dict[str, int], why: str) -> ReshardError:
    def fmt(lay: dict[str, Any]) -> str:
        return ", ".join(f"{k}={lay.get(k)}" for k in ("tp", "pp", "dp", "zero"))

    return ReshardError(f"cannot reshard from ({fmt(saved)}) to ({fmt(want)}): {why}")


def reshard_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    tp: int,
    pp: int,
    dp: int | None = None,
    partition: str | None = None,
) -> Path:
    """Writes `checkpoint` re-laid-out at (tp, pp, dp) to `out` (a complete, verifiable Tandem checkpoint;
    written under a temporary name and renamed, so `out` exists only when complete). Returns `out`."""
    from parallel.tensor_plan import tensor_parallel_problems
    from pretrain.checkpoint import MANIFEST, build_manifest, read_manifest, verify_checkpoint
    from pretrain.config import config_from_dict
    from pretrain.consolidate import PREFIX, consolidate_tensor_parallel, split_dims

    src, out = Path(checkpoint), Path(out)
    problems = verify_checkpoint(src)
    if problems:
        raise ReshardError(f"{src}: will not convert a damaged checkpoint:\n  " + "\n  ".join(problems))
    meta = read_manifest(src)
    meta.pop("files", None)
    for key in ("format", "version"):
        meta.pop(key, None)
    saved = {"tp": 1, "pp": 1, "dp": 1, "zero": 0, **(meta.get("layout") or {})}
    raw = yaml.safe_load((src / "config.yaml").read_text(encoding="utf-8"))
    cfg = config_from_dict(raw, validate=False, source=str(src / "config.yaml"))
    want = {"tp": tp, "pp": pp, "dp": dp or int(saved["dp"]), "zero": int(saved["zero"])}
    if int(saved["zero"]) != 0:
        raise _refusal(
            saved, want, "only ZeRO stage 0 checkpoints are resharded (optimizer states unpartitioned)"
        )
    if cfg.train.precision != "fp32":
        raise _refusal(
            saved, want, f"train.precision={cfg.train.precision}: only fp32 checkpoints are resharded"
        )
    if cfg.parallel.ep > 1:
        raise _refusal(
            saved, want, f"parallel.ep={cfg.parallel.ep}: expert-parallel checkpoints are not resharded"
        )
    bad = tensor_parallel_problems(cfg.model, tp)
    if bad:
        raise _refusal(saved, want, "; ".join(bad))
    partition = partition or cfg.parallel.pp_partition
    source = build_layout(
        cfg.model, tp=int(saved["tp"]), pp=int(saved["pp"]), partition=cfg.parallel.pp_partition
    )
    target = build_layout(cfg.model, tp=tp, pp=pp, partition=partition)

    weights = consolidate_tensor_parallel(src, cfg.model)
    opt_full, hyper = _read_optimizer(src, source, cfg.model)
    dims = split_dims(cfg.model)
    template = _load_engine_file(src / "mp_rank_00_model_states.pt")
    world = tp * pp * want["dp"]

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for t in range(tp):
        w = split_state(weights, dims, tp, t)
        states = {
            n: {
                k: split_tensor(v, dims[n], tp, t)
                if k in OPTIMIZER_TENSORS and n in dims and tp > 1
                else v.clone()
                for k, v in st.items()
            }
            for n, st in opt_full.items()
        }
        for s in range(pp):
            order, (n_decay, _) = target.order[s], target.groups[s]
            optimizer = {
                "state": {i: states[n] for i, n in enumerate(order) if n in states},
                "param_groups": [
                    {**hyper[0], "params": list(range(n_decay))},
                    {**hyper[1], "params": list(range(n_decay, len(order)))},
                ],
            }
            engine_state = {
                **template,
                "module": None if pp > 1 else {PREFIX + k: v for k, v in w.items()},
                "optimizer": optimizer,
                "dp_world_size": want["dp"],
                "mp_world_size": tp * pp,
            }
            if "checkpoint_parallel_dimensions" in template:
                engine_state["checkpoint_parallel_dimensions"] = {"pp_degree": pp, "tp_degree": tp}
            torch.save(engine_state, tmp / f"mp_rank_{target.mp_rank(s, t):02d}_model_states.pt")
            if pp > 1:
                assert target.layers is not None and target.parts is not None
                for idx in range(target.parts[s], target.parts[s + 1]):
                    layer = target.layers[idx]
                    if layer.saved:
                        torch.save(
                            {k: w[n] for k, n in layer.keys},
                            tmp / f"layer_{idx:02d}-model_{t:02d}-model_states.pt",
                        )

    saved_world = int(meta.get("world_size", 1))
    for r in range(world):
        own = torch.load(src / f"tandem-rank-{(r if r < saved_world else 0):05d}.pt", weights_only=True)
        own.update(rank=r, world_size=world)
        torch.save(own, tmp / f"tandem-rank-{r:05d}.pt")
    raw.setdefault("parallel", {}).update(tp=tp, pp=pp, pp_partition=partition)
    config_yaml = yaml.safe_dump(raw, sort_keys=False)
    (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
    own_kinds = ("mp_rank_", "layer_", "tandem-rank-")
    for f in src.iterdir():  # the tokenizer and anything else that travels with the checkpoint
        if (
            f.is_file()
            and not f.name.startswith(own_kinds)
            and f.name not in (MANIFEST, "meta.json", "config.yaml")
        ):
            shutil.copyfile(f, tmp / f.name)
    meta.update(
        layout=want,
        world_size=world,
        config_sha256=hashlib.sha256(config_yaml.encode()).hexdigest(),
        resharded_from={"path": str(src), "layout": saved, "world_size": saved_world},
    )
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    write_text_atomic(tmp / MANIFEST, json.dumps(build_manifest(tmp, meta), indent=2))  # written last
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
