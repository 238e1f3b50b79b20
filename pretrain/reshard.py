"""Resharding a checkpoint to another tensor/pipeline/data-parallel layout, every target rank its own slice.

A checkpoint saved at (tp, pp, dp) — fp32, bf16 or fp16, ZeRO stage 0, 1 or 2 — is rewritten as the checkpoint
the same run would have saved at (tp', pp', dp') (and the engine's ZeRO stage there), in Tandem's own format
(DeepSpeed engine files, per-rank Tandem files, config, meta, manifest), so the ordinary resume path loads it:

1. Placement (`build_layout`): each stage's parameters in the optimizer's order (param groups of
   `parallel.parallelize.param_groups`: matrices and embeddings decay, 1-D tensors do not; a stage's order is its
   `PipelineModule`'s: tied modules first, then its layers; which layers a stage holds follows DeepSpeed's
   partitioning at that tp, recomputed here), their engine names and shard shapes (`consolidate.split_dims`, the
   tensor plan's rules: rank r holds the r-th of tp contiguous blocks along the split dim). Each engine file's
   own `param_shapes` is checked against it, so a wrong mapping is an error, never a silently wrong optimizer.
2. Formats (`StateFormat`): ZeRO-0 fp32 keeps torch's AdamW state per parameter in `mp_rank_XX_model_states.pt`;
   everything else keeps DeepSpeed's flat per-group partitions, one `*_optim_states.pt` per dp rank.
3. Conversion (`convert_rank`): target rank (stage, tp rank, dp rank) allocates only what it writes and fills it
   in place from the pieces of the source shards that overlap it (`pieces`), opening only the source files that
   hold them, one at a time, memory-mapped. `Checkpointer.prepare_reshard` runs it on every rank of the resuming
   job; `reshard_checkpoint` (the `pretrain ckpt reshard` verb) runs it for every rank in turn; `seal` writes
   the config, meta and manifest last.
4. The LR schedule, step counter and loader position are global and carry over unchanged: the loader resumes
   from the global `consumed_samples`, so no sample is skipped or repeated at any dp'. A new rank beyond the
   saved world takes rank 0's RNG states. A vocabulary padding change keeps the rows both models have.

Refused, naming both layouts: ZeRO-3 (partitioned weights) and expert parallelism (docs/parallelism.md).
`consolidated_states` gives any checkpoint's full fp32 masters and moments, for comparing two of them.
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
from parallel.tensor_plan import VOCAB_PARALLEL_PARAMETERS
from pretrain.consolidate import PREFIX

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
    engine: list[dict[str, str]]  # per stage: model name -> the engine's parameter name

    def mp_rank(self, stage: int, tp_rank: int) -> int:
        return stage * self.tp + tp_rank

    def group_names(self, stage: int) -> list[list[str]]:
        """The optimizer's parameter groups of one stage (decay, no_decay), names in order."""
        n_decay = self.groups[stage][0]
        return [self.order[stage][:n_decay], self.order[stage][n_decay:]]

    def stage_of(self, name: str) -> int:
        """The first stage that holds `name` (a tied embedding is held by several; their copies are
        updated with the same all-reduced gradient, so any one of them is the parameter)."""
        for s, names in enumerate(self.order):
            if name in names:
                return s
        raise ReshardError(f"{name}: held by no pipeline stage")

    def layer_file(self, name: str, tp_rank: int) -> tuple[str, str] | None:
        """(pipeline layer file, key inside it) of the first saved layer holding `name`; None without pipelines."""
        if self.layers is None or self.parts is None:
            return None
        for idx, layer in enumerate(self.layers):
            for key, model_name in layer.keys:
                if model_name == name and layer.saved:
                    return f"layer_{idx:02d}-model_{tp_rank:02d}-model_states.pt", key
        raise ReshardError(f"{name}: written by no pipeline layer file")


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
    engine: list[dict[str, str]] = []
    if layers is None or parts is None:
        engine.append({n: PREFIX + n for n in order[0]})  # the training wrapper's attribute
    else:
        for s in range(pp):
            names_s: dict[str, str] = {}
            for idx in range(parts[s], parts[s + 1]):
                layer = layers[idx]
                # PipelineModule names a tied module's parameters after its key, the others after the layer's
                # global index (so they keep their names at any pp)
                prefix = f"tied_modules.{layer.tied}." if layer.tied is not None else f"{idx}."
                for key, model_name in layer.keys:
                    if model_name in layer.params:
                        names_s.setdefault(model_name, prefix + key)
            engine.append(names_s)
    return Layout(tp=tp, pp=pp, layers=layers, parts=parts, order=order, groups=groups, engine=engine)


# ----------------------------------------------------------------------------- state formats
StateKey = str  # "master" (the fp32 weight the optimizer updates), "exp_avg", "exp_avg_sq"
STATE_KEYS: tuple[StateKey, ...] = ("master", *OPTIMIZER_TENSORS)
# the tensors a vocabulary padding change resizes: the tensor plan's vocab-parallel ones and BART's output bias
VOCAB_TENSORS = (*VOCAB_PARALLEL_PARAMETERS, "final_logits_bias")


@dataclass(frozen=True)
class StateFormat:
    """Where one layout's engine (DeepSpeed 0.19.8) keeps the fp32 masters and Adam moments.

    * torch: ZeRO stage 0 with fp32. torch's AdamW state, per parameter and shaped like it, inside
      `mp_rank_XX_model_states.pt` (`optimizer`); the masters are the module's own weights.
    * flat: everything else Tandem runs (ZeRO 1-2 at any precision: DeepSpeedZeroOptimizer; bf16 at stage 0
      under a pipeline: BF16_Optimizer). Per (stage, tp rank) and optimizer group, the parameters in group order
      are concatenated into one flat buffer, zero-padded at the end to a multiple of 2·dp, and cut into dp equal
      partitions; dp rank d's `[bf16_]zero_pp_rank_d_mp_rank_XX_optim_states.pt` holds its partition of the fp32
      masters (`single_partition_of_fp32_groups`) and of both moments (`base_optimizer_state`, one flat
      "parameter" per group). The module files hold the bf16/fp16 copy, which is the masters rounded.
    """

    precision: str  # fp32 | bf16 | fp16
    zero: int  # the engine's stage (parallel.zero.engine_zero_stage), as the checkpoint's layout records it
    pp: int

    @property
    def flat(self) -> bool:
        return not (self.zero == 0 and self.precision == "fp32")

    @property
    def bf16_optimizer(self) -> bool:
        return self.zero == 0 and self.precision == "bf16"

    @property
    def module_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]

    def optim_file(self, dp_rank: int, mp_rank: int) -> str:
        prefix = "bf16_" if self.precision == "bf16" else ""
        return f"{prefix}zero_pp_rank_{dp_rank}_mp_rank_{mp_rank:02d}_optim_states.pt"


def flat_geometry(numels: list[int], dp: int) -> tuple[list[int], int, int]:
    """(offset of each parameter in the flat group, the group's length without padding, the partition size):
    DeepSpeed pads the group to a multiple of nccl_start_alignment_factor (2) x dp and cuts it into dp equal
    partitions (parameter_alignment off, its default)."""
    offsets, at = [], 0
    for n in numels:
        offsets.append(at)
        at += n
    align = 2 * dp
    return offsets, at, (-(-at // align) * align) // dp


@dataclass
class Side:
    """One end of a conversion: model config, parameter placement, optimizer format, dp size."""

    cfg: Any
    layout: Layout
    fmt: StateFormat
    dp: int
    shapes: dict[str, tuple[int, ...]]
    dims: dict[str, int]

    @classmethod
    def build(
        cls, model_cfg: Any, *, tp: int, pp: int, dp: int, zero: int, precision: str, partition: str
    ) -> Side:
        from pretrain.consolidate import full_shapes, split_dims

        return cls(
            cfg=model_cfg,
            layout=build_layout(model_cfg, tp=tp, pp=pp, partition=partition),
            fmt=StateFormat(precision=precision, zero=zero, pp=pp),
            dp=dp,
            shapes=full_shapes(model_cfg),
            dims=split_dims(model_cfg),
        )

    @property
    def world(self) -> int:
        return self.layout.tp * self.layout.pp * self.dp

    def shard_shape(self, name: str) -> tuple[int, ...]:
        shape = list(self.shapes[name])
        if name in self.dims:
            shape[self.dims[name]] //= self.layout.tp
        return tuple(shape)

    def numel(self, name: str) -> int:
        return int(torch.Size(self.shard_shape(name)).numel())

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(stage, tp rank, dp rank) of a global rank: tp is the fastest axis, then dp, then pp."""
        tp = self.layout.tp
        return rank // (tp * self.dp), rank % tp, (rank // tp) % self.dp

    def rank(self, stage: int, tp_rank: int, dp_rank: int) -> int:
        return (stage * self.dp + dp_rank) * self.layout.tp + tp_rank

    def groups(self, stage: int) -> list[tuple[list[str], list[int], int, int]]:
        """Per optimizer group of a stage: (names, flat offsets, unpadded length, partition size)."""
        out = []
        for names in self.layout.group_names(stage):
            offsets, total, part = flat_geometry([self.numel(n) for n in names], self.dp)
            out.append((names, offsets, total, part))
        return out


# A piece: which block of source tp rank `src_tp`'s shard of a parameter lands where in the target shard.
# Each (dim, src_start, dst_start, length) narrows both sides; dims not listed are taken whole.
@dataclass(frozen=True)
class Piece:
    src_tp: int
    narrows: tuple[tuple[int, int, int, int], ...]


def pieces(name: str, source: Side, target: Side, tgt_tp: int) -> list[Piece]:
    """The source shards that make up target tp rank `tgt_tp`'s shard of `name`, and where. Both sides cut the
    split dim into contiguous blocks (rank r holds block r); a vocabulary tensor whose padded size changed keeps
    the rows both sides have (new rows stay zero: weight, both moments)."""
    src_full, tgt_full = source.shapes[name], target.shapes[name]
    vocab_dim = None
    if src_full != tgt_full:
        differ = [d for d, (a, b) in enumerate(zip(src_full, tgt_full, strict=True)) if a != b]
        if name not in VOCAB_TENSORS or len(differ) != 1:
            raise ReshardError(
                f"{name}: the checkpoint's model has shape {src_full}, this run's {tgt_full}; only the vocabulary "
                "padding (model.make_vocab_size_divisible_by) may change"
            )
        vocab_dim = differ[0]
    dim = source.dims.get(name)
    if dim is None or (source.layout.tp == 1 and target.layout.tp == 1):
        narrows: tuple[tuple[int, int, int, int], ...] = ()
        if vocab_dim is not None:
            common = min(src_full[vocab_dim], tgt_full[vocab_dim])
            narrows = ((vocab_dim, 0, 0, common),)
        return [Piece(0, narrows)]
    b_src = src_full[dim] // source.layout.tp
    b_tgt = tgt_full[dim] // target.layout.tp
    limit = min(src_full[dim], tgt_full[dim])
    lo, hi = tgt_tp * b_tgt, min((tgt_tp + 1) * b_tgt, limit)
    out = []
    for t in range(source.layout.tp):
        a, b = max(lo, t * b_src), min(hi, (t + 1) * b_src)
        if a < b:
            extra: tuple[tuple[int, int, int, int], ...] = ()
            if vocab_dim is not None and vocab_dim != dim:
                common = min(src_full[vocab_dim], tgt_full[vocab_dim])
                extra = ((vocab_dim, 0, 0, common),)
            out.append(Piece(t, ((dim, a - t * b_src, a - lo, b - a), *extra)))
    return out


# ----------------------------------------------------------------------------- reading the source
class SourceReader:
    """Opens source files one at a time (memory-mapped), and records each one it opened. With `files` (the
    manifest's table) each file's sha256 is checked first, by the rank that reads it: no rank hashes a file it
    does not need."""

    def __init__(self, directory: Path, files: dict[str, dict[str, Any]] | None = None):
        self.dir = directory
        self.files = files
        self.opened: list[str] = []

    def load(self, name: str) -> dict[str, Any]:
        from pretrain.checkpoint import _allowed_deepspeed_globals

        path = self.dir / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: missing; the checkpoint's layout says it holds part of the model"
            )
        self.opened.append(name)
        if self.files is not None:
            from pretrain.checkpoint import _sha256

            want = (self.files.get(name) or {}).get("sha256")
            if want is None:
                raise ReshardError(f"{path}: not in the checkpoint's manifest")
            if _sha256(path) != want:
                raise ReshardError(f"{path}: sha256 differs from the manifest (corrupted)")
        with torch.serialization.safe_globals(_allowed_deepspeed_globals()):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # a legacy (non-zip) file cannot be memory-mapped
                return torch.load(path, map_location="cpu", weights_only=True)


def _check_param_shapes(f: str, state: dict[str, Any], side: Side, stage: int, tp_rank: int) -> None:
    """The engine file's own record of its optimizer groups must be the layout's: a wrong mapping is an error
    naming the file, never a silently wrong optimizer."""
    recorded = state.get("param_shapes")
    if recorded is None:
        return
    engine = side.layout.engine[stage]
    want = [
        [(engine[n], tuple(side.shard_shape(n))) for n in names] for names in side.layout.group_names(stage)
    ]
    got = [[(k, tuple(v)) for k, v in group.items()] for group in recorded]
    if got != want:
        raise ReshardError(
            f"{f}: its optimizer groups {[[k for k, _ in g] for g in got]} (shapes {[[s for _, s in g] for g in got]}) "
            f"are not the layout's {[[k for k, _ in g] for g in want]} ({[[s for _, s in g] for g in want]}) at stage "
            f"{stage}, tp rank {tp_rank}: another partition, model or optimizer setup?"
        )


# ----------------------------------------------------------------------------- one target rank
@dataclass
class RankReport:
    """What one target rank's conversion did: for tests, logs and docs/benchmarks.md."""

    rank: int
    opened: list[str]  # source files, in the order read
    written: dict[str, dict[str, Any]]  # file -> {bytes, sha256}
    seconds: float
    rss_before: int  # bytes resident when the conversion began
    rss_peak: int  # the process's peak resident bytes during the conversion (VmHWM after a reset), or 0

    @property
    def written_bytes(self) -> int:
        return sum(int(v["bytes"]) for v in self.written.values())


def _rss() -> tuple[int, int]:
    """(resident, peak resident) bytes of this process from /proc (0, 0 where there is none)."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return 0, 0
    values = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.MULTILINE))
    return int(values.get("VmRSS", 0)) * 1024, int(values.get("VmHWM", 0)) * 1024


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS
        return True
    except OSError:
        return False


class _Target:
    """The tensors one target rank writes, allocated once and filled in place from source pieces."""

    def __init__(self, side: Side, stage: int, tp_rank: int, dp_rank: int):
        self.side, self.stage, self.tp_rank, self.dp_rank = side, stage, tp_rank, dp_rank
        fmt = side.fmt
        self.writes_module = dp_rank == 0  # one copy of the weights per (stage, tp rank)
        self.views: dict[tuple[str, StateKey], torch.Tensor] = {}  # where each delivered piece is copied
        self.pending: list[
            tuple[str, int, int, int]
        ] = []  # (name, group, flat start, count) straddling a cut
        self.flat: list[dict[StateKey, torch.Tensor]] = []
        self.bounds: list[tuple[int, int, int]] = []  # per group: (partition start, partition size, unpadded)
        self.module: dict[str, torch.Tensor] = {}
        names_all = side.layout.order[stage]
        if fmt.flat:
            for g, (names, offsets, total, part) in enumerate(side.groups(stage)):
                start = dp_rank * part
                bufs = {k: torch.zeros(part, dtype=torch.float32) for k in STATE_KEYS}
                self.flat.append(bufs)
                self.bounds.append((start, part, total))
                for n, off in zip(names, offsets, strict=True):
                    k = side.numel(n)
                    a, b = max(off, start), min(off + k, start + part)
                    if a >= b:
                        continue
                    if a == off and b == off + k:  # wholly inside: its shard is a view of the partition
                        for key in STATE_KEYS:
                            self.views[(n, key)] = bufs[key][off - start : off - start + k].view(
                                side.shard_shape(n)
                            )
                    else:
                        for key in STATE_KEYS:
                            self.views[(n, key)] = torch.zeros(side.shard_shape(n), dtype=torch.float32)
                        self.pending.append((n, g, off, k))
            if self.writes_module:
                for n in names_all:
                    if (n, "master") not in self.views:
                        self.module[n] = torch.zeros(side.shard_shape(n), dtype=fmt.module_dtype)
                        self.views[(n, "module")] = self.module[n]
        elif self.writes_module:  # torch format: per-parameter tensors; the module's weights are the masters
            for n in names_all:
                for key in STATE_KEYS:
                    self.views[(n, key)] = torch.zeros(side.shard_shape(n), dtype=torch.float32)

    def wanted(self) -> dict[str, set[StateKey]]:
        out: dict[str, set[StateKey]] = {}
        for n, key in self.views:
            out.setdefault(n, set()).add("master" if key == "module" else key)
        return out

    def deliver(self, name: str, key: StateKey, piece: Piece, shard: torch.Tensor) -> int:
        """Copies `piece` of a source shard of `name` into this rank's tensors; returns the elements copied."""
        copied = 0
        for k in (key, "module") if key == "master" else (key,):
            dst = self.views.get((name, k))
            if dst is None:
                continue
            src = shard
            for dim, s0, d0, length in piece.narrows:
                src, dst = src.narrow(dim, s0, length), dst.narrow(dim, d0, length)
            dst.copy_(
                src
            )  # a bf16/fp16 module tensor rounds the fp32 master, as the engine does after a step
            copied = src.numel()
        return copied

    def finish(self) -> None:
        for n, g, off, k in self.pending:  # straddlers: copy the part inside this partition
            start, part, _ = self.bounds[g]
            a, b = max(off, start), min(off + k, start + part)
            for key in STATE_KEYS:
                self.flat[g][key][a - start : b - start].copy_(
                    self.views[(n, key)].reshape(-1)[a - off : b - off]
                )
        if self.writes_module and self.side.fmt.flat:
            dtype = self.side.fmt.module_dtype
            for n in self.side.layout.order[self.stage]:
                if n not in self.module:
                    self.module[n] = self.views[(n, "master")].to(dtype).clone()
        elif self.writes_module:
            for n in self.side.layout.order[self.stage]:
                self.module[n] = self.views[(n, "master")]


def _source_plan(
    source: Side, target: Side, want: dict[str, set[StateKey]], tgt_tp: int
) -> dict[str, list[Any]]:
    """Which source file holds which piece of the wanted parameters: file -> [(kind, name, src tp, ...)]."""
    plan: dict[str, list[Any]] = {}
    lay = source.layout
    flat_index: dict[tuple[int, int], dict[str, tuple[int, int, int]]] = {}
    for name in want:
        s = lay.stage_of(name)
        for piece in pieces(name, source, target, tgt_tp):
            t = piece.src_tp
            mp_file = f"mp_rank_{lay.mp_rank(s, t):02d}_model_states.pt"
            plan.setdefault(mp_file, [])  # its param_shapes check the layout; its counters are global
            if source.fmt.flat:
                if (s, t) not in flat_index:
                    flat_index[(s, t)] = {}
                    for g, (names, offsets, _, part) in enumerate(source.groups(s)):
                        for n, off in zip(names, offsets, strict=True):
                            flat_index[(s, t)][n] = (g, off, part)
                g, off, part = flat_index[(s, t)][name]
                k = source.numel(name)
                for d in range(off // part, (off + k - 1) // part + 1):
                    f = source.fmt.optim_file(d, lay.mp_rank(s, t))
                    plan.setdefault(f, []).append(("flat", name, piece, s, t, d, g, off, part))
            else:
                plan[mp_file].append(("torch", name, piece, s, t))
                located = lay.layer_file(name, t)
                if located is not None:
                    plan.setdefault(located[0], []).append(("layer", name, piece, located[1]))
    return plan


def _file_order(name: str) -> tuple[int, str]:
    # model-state files first (they check the layout before any state is read), then the optimizer files in
    # (mp rank, dp rank) order so that a parameter cut between two dp partitions is completed by the next file
    m = re.match(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$", name)
    if m:
        return 1, f"{int(m.group(2)):06d}-{int(m.group(1)):06d}"
    return 0, name


@torch.no_grad()
def read_rank(
    src: Path,
    *,
    source: Side,
    target: Side,
    rank: int,
    hashes: dict[str, dict[str, Any]] | None = None,
) -> tuple[_Target, dict[str, Any], dict[str, Any], SourceReader]:
    """Target `rank`'s tensors, filled from the source files that hold them (read one at a time,
    memory-mapped; with `hashes`, the manifest's file table, each checked first): (its tensors, the engine
    file's counters, the optimizer's global settings, the reader, which lists the files it opened)."""
    stage, tp_rank, dp_rank = target.coords(rank)
    tgt = _Target(target, stage, tp_rank, dp_rank)
    want = tgt.wanted()
    plan = _source_plan(source, target, want, tp_rank)
    reader = SourceReader(src, hashes)
    template: dict[str, Any] | None = None
    global_state: dict[str, Any] = {}  # step, group settings, loss scaler: the same in every source file
    got: dict[tuple[str, StateKey], int] = {}
    partial: dict[tuple[str, int, StateKey], tuple[torch.Tensor, list[int]]] = {}  # shards cut between files

    def take(name: str, key: StateKey, piece: Piece, shard: torch.Tensor) -> None:
        if key in want.get(name, ()):
            n = tgt.deliver(name, key, piece, shard)
            got[(name, key)] = got.get((name, key), 0) + n

    for f in sorted(plan, key=_file_order):
        state = reader.load(f)
        entries = plan[f]
        if f.startswith("mp_rank_"):
            s, t = divmod(int(f[len("mp_rank_") : len("mp_rank_") + 2]), source.layout.tp)
            _check_param_shapes(f, state, source, s, t)
            if template is None:
                template = {k: v for k, v in state.items() if k not in ("module", "optimizer")}
            if not source.fmt.flat:
                opt = state.get("optimizer")
                if not opt or "param_groups" not in opt:
                    raise ReshardError(
                        f"{src / f}: holds no optimizer state (ZeRO stage 0, fp32 keeps it here)"
                    )
                global_state.setdefault(
                    "hyper", [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]]
                )
                index = {n: i for i, n in enumerate(source.layout.order[s])}
                module = state.get("module") or {}
                for _, name, piece, *_ in entries:
                    st = opt["state"].get(index[name])
                    if st is None:
                        raise ReshardError(f"{src / f}: no optimizer state for {name} (never stepped?)")
                    global_state.setdefault("step", _step_tensor(st.get("step")))
                    for key in OPTIMIZER_TENSORS:
                        _expect(st[key], source.shard_shape(name), f, f"{name} {key}")
                        take(name, key, piece, st[key])
                    if module:
                        w = module[PREFIX + name]
                        _expect(w, source.shard_shape(name), f, name)
                        take(name, "master", piece, w)
        elif f.startswith("layer_"):
            for _, name, piece, key in entries:
                _expect(state[key], source.shard_shape(name), f, key)
                take(name, "master", piece, state[key])
        else:  # a flat optimizer partition
            osd = state["optimizer_state_dict"]
            base = osd["base_optimizer_state"]
            global_state.setdefault(
                "hyper", [{k: v for k, v in g.items() if k != "params"} for g in base["param_groups"]]
            )
            for key in ("loss_scaler", "dynamic_loss_scale", "overflow", "clip_grad"):
                if key in osd:
                    global_state.setdefault(key, osd[key])
            for _, name, piece, _, t, d, g, off, part in entries:
                st = base["state"][base["param_groups"][g]["params"][0]]
                global_state.setdefault("step", _step_tensor(st.get("step")))
                arrays = {
                    "master": osd["single_partition_of_fp32_groups"][g],
                    "exp_avg": st["exp_avg"],
                    "exp_avg_sq": st["exp_avg_sq"],
                }
                k = source.numel(name)
                a, b = max(off, d * part), min(off + k, (d + 1) * part)
                for key, flat in arrays.items():
                    if flat.numel() < b - d * part:
                        raise ReshardError(
                            f"{src / f}: group {g} {key} holds {flat.numel()} elements; {name} needs up to "
                            f"{b - d * part} (another dp size or layout than the manifest says?)"
                        )
                    chunk = flat[a - d * part : b - d * part]
                    if a == off and b == off + k:
                        take(name, key, piece, chunk.view(source.shard_shape(name)))
                        continue
                    buf, filled = partial.setdefault(
                        (name, t, key), (torch.empty(k, dtype=torch.float32), [0])
                    )
                    buf[a - off : b - off].copy_(chunk)
                    filled[0] += b - a
                    if filled[0] == k:
                        take(name, key, piece, buf.view(source.shard_shape(name)))
                        del partial[(name, t, key)]
        del state

    if template is None:  # a rank whose partition is all padding still needs the counters
        template = {
            k: v
            for k, v in reader.load("mp_rank_00_model_states.pt").items()
            if k not in ("module", "optimizer")
        }
    if "hyper" not in global_state or "step" not in global_state:
        first = source.fmt.optim_file(0, 0) if source.fmt.flat else "mp_rank_00_model_states.pt"
        for gk, gv in _globals_of(reader.load(first), source.fmt).items():
            global_state.setdefault(gk, gv)
    for (name, key), n in ((k, v) for k, v in got.items()):
        want_n = _common_numel(name, source, target, tp_rank)
        if n != want_n:
            raise ReshardError(f"{name} {key}: {n} elements converted, {want_n} expected (a mapping error)")
    missing = [
        (n, k)
        for n, keys in want.items()
        for k in keys
        if (n, k) not in got and _common_numel(n, source, target, tp_rank)
    ]
    if missing:
        raise ReshardError(f"{src}: no source data found for {missing[:5]}")
    tgt.finish()
    return tgt, template, global_state, reader


def convert_rank(
    src: Path,
    out: Path,
    *,
    source: Side,
    target: Side,
    rank: int,
    saved_world: int,
    measure_memory: bool = False,
    hashes: dict[str, dict[str, Any]] | None = None,
) -> RankReport:
    """Writes target `rank`'s own files of the converted checkpoint into `out` (an existing directory), reading
    only the source files that hold its slice, one at a time: its optimizer partition
    (`*_optim_states.pt`, flat formats), its (stage, tp rank)'s weights when it is dp rank 0 (the model-state and
    pipeline layer files; under ZeRO-0 fp32 also the optimizer state), and its `tandem-rank-NNNNN.pt`.

    Every rank of a job calls it for itself (`Checkpointer.prepare_reshard`); `reshard_checkpoint` calls it for
    every rank in turn. Returns what it read and wrote, with its time and peak memory."""
    import time

    if measure_memory:
        _reset_peak_rss()
    rss_before, _ = _rss()
    began = time.perf_counter()
    stage, tp_rank, dp_rank = target.coords(rank)
    tgt, template, global_state, reader = read_rank(
        src, source=source, target=target, rank=rank, hashes=hashes
    )
    written: dict[str, dict[str, Any]] = {}

    def save(obj: Any, name: str) -> None:
        from pretrain.checkpoint import _sha256

        torch.save(obj, out / name)
        written[name] = {"bytes": (out / name).stat().st_size, "sha256": _sha256(out / name)}

    mp = target.layout.mp_rank(stage, tp_rank)
    same_precision = source.fmt.precision == target.fmt.precision
    hyper = global_state["hyper"]
    if target.fmt.flat:
        save(
            {
                "optimizer_state_dict": _flat_state(tgt, target, stage, global_state, same_precision),
                "ds_config": template.get("ds_config"),
                "ds_version": template.get("ds_version"),
            },
            target.fmt.optim_file(dp_rank, mp),
        )
    if tgt.writes_module:
        engine = target.layout.engine[stage]
        model_state = {
            **template,
            "module": {PREFIX + n: tgt.module[n] for n in target.layout.order[stage]}
            if target.layout.pp == 1
            else None,
            "optimizer": None,
            "param_shapes": [
                {engine[n]: torch.Size(target.shard_shape(n)) for n in names}
                for names in target.layout.group_names(stage)
            ],
            "dp_world_size": target.dp,
            "mp_world_size": target.layout.tp * target.layout.pp,
        }
        if "checkpoint_parallel_dimensions" in template or target.layout.pp > 1:
            model_state["checkpoint_parallel_dimensions"] = {
                "pp_degree": target.layout.pp,
                "tp_degree": target.layout.tp,
            }
        if not target.fmt.flat:
            order = target.layout.order[stage]
            step = _step_tensor(global_state["step"])
            n_decay = target.layout.groups[stage][0]
            model_state["optimizer"] = {
                "state": {
                    i: {"step": step.clone(), **{k: tgt.views[(n, k)] for k in OPTIMIZER_TENSORS}}
                    for i, n in enumerate(order)
                },
                "param_groups": [
                    {**hyper[0], "params": list(range(n_decay))},
                    {**hyper[1], "params": list(range(n_decay, len(order)))},
                ],
            }
        save(model_state, f"mp_rank_{mp:02d}_model_states.pt")
        lay = target.layout
        if lay.layers is not None and lay.parts is not None:
            for idx in range(lay.parts[stage], lay.parts[stage + 1]):
                layer = lay.layers[idx]
                if layer.saved:
                    save(
                        {k: tgt.module[n] for k, n in layer.keys},
                        f"layer_{idx:02d}-model_{tp_rank:02d}-model_states.pt",
                    )
    own = dict(reader.load(f"tandem-rank-{(rank if rank < saved_world else 0):05d}.pt"))
    own.update(rank=rank, world_size=target.world)
    save(own, f"tandem-rank-{rank:05d}.pt")
    _, peak = _rss()
    return RankReport(
        rank=rank,
        opened=reader.opened,
        written=written,
        seconds=time.perf_counter() - began,
        rss_before=rss_before,
        rss_peak=peak if measure_memory else 0,
    )


def _expect(t: torch.Tensor, shape: tuple[int, ...], f: str, what: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ReshardError(f"{f}: {what} is {tuple(t.shape)}; the layout's shard is {tuple(shape)}")


def _common_numel(name: str, source: Side, target: Side, tgt_tp: int) -> int:
    total = 0
    for piece in pieces(name, source, target, tgt_tp):
        shape = list(source.shard_shape(name))
        for dim, _, _, length in piece.narrows:
            shape[dim] = length
        total += int(torch.Size(shape).numel())
    return total


def _step_tensor(step: Any) -> torch.Tensor:
    # a copy: a tensor of a memory-mapped file keeps the whole file mapped (and resident) while it lives
    return step.clone() if torch.is_tensor(step) else torch.tensor(float(step))


def _globals_of(state: dict[str, Any], fmt: StateFormat) -> dict[str, Any]:
    """Step and group settings from one source file (for a rank that read no state of its own)."""
    if fmt.flat:
        osd = state["optimizer_state_dict"]
        base = osd["base_optimizer_state"]
        out: dict[str, Any] = {
            "hyper": [{k: v for k, v in g.items() if k != "params"} for g in base["param_groups"]]
        }
        out["step"] = _step_tensor(next(iter(base["state"].values())).get("step"))
        for key in ("loss_scaler", "dynamic_loss_scale", "overflow", "clip_grad"):
            if key in osd:
                out[key] = osd[key]
        return out
    opt = state["optimizer"]
    return {
        "hyper": [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]],
        "step": _step_tensor(next(iter(opt["state"].values())).get("step")),
    }


def _flat_state(
    tgt: _Target, target: Side, stage: int, global_state: dict[str, Any], same_precision: bool
) -> dict[str, Any]:
    """The optimizer_state_dict DeepSpeedZeroOptimizer / BF16_Optimizer save (non-elastic), for this partition."""
    import deepspeed
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    step = _step_tensor(global_state["step"])
    hyper = global_state["hyper"]
    groups = target.groups(stage)
    engine = target.layout.engine[stage]
    paddings, fp32, mappings = [], [], []
    for g, (names, offsets, total, part) in enumerate(groups):
        start = tgt.dp_rank * part
        if target.fmt.bf16_optimizer:  # padding on the last partition only; the partition is saved padded
            pad = part * target.dp - total if tgt.dp_rank == target.dp - 1 else 0
            fp32.append(tgt.flat[g]["master"])
        else:
            pad = part if total <= start else max(0, start + part - total)
            fp32.append(tgt.flat[g]["master"][: part - pad])
        paddings.append(pad)
        mapping = {}
        for n, off in zip(names, offsets, strict=True):
            a, b = max(off, start), min(off + target.numel(n), start + part)
            if a < b:
                mapping[engine[n]] = fragment_address(numel=b - a, start=a - start)
        mappings.append(mapping)
    base = {
        "state": {
            g: {
                "step": step.clone(),
                "exp_avg": tgt.flat[g]["exp_avg"],
                "exp_avg_sq": tgt.flat[g]["exp_avg_sq"],
            }
            for g in range(len(groups))
        },
        "param_groups": [{**hyper[g], "params": [g]} for g in range(len(groups))],
    }
    osd: dict[str, Any] = {}
    if not target.fmt.bf16_optimizer and same_precision:
        for key in ("loss_scaler", "dynamic_loss_scale", "overflow"):
            if key in global_state:
                osd[key] = global_state[key]
    if "clip_grad" in global_state:
        osd["clip_grad"] = global_state["clip_grad"]
    osd["base_optimizer_state"] = base
    osd["single_partition_of_fp32_groups"] = fp32
    if not target.fmt.bf16_optimizer:
        osd["zero_stage"] = ZeroStageEnum(max(1, target.fmt.zero))
        osd["param_alignment_paddings"] = [[0] * len(names) for names, *_ in groups]
    osd["group_paddings"] = paddings
    osd["partition_count"] = [target.dp] * len(groups)
    osd["ds_version"] = deepspeed.__version__
    osd["param_slice_mappings"] = mappings
    return osd


# ----------------------------------------------------------------------------- the whole conversion
@dataclass
class Conversion:
    """A checked conversion of `src` to another layout; the same on every rank (built from small files)."""

    src: Path
    source: Side
    target: Side
    saved: dict[str, Any]  # the checkpoint's layout
    want: dict[str, Any]  # the target layout
    meta: dict[str, Any]  # the checkpoint's manifest, less its file list
    raw: dict[str, Any]  # the checkpoint's config, as saved
    partition: str
    hashes: dict[str, dict[str, Any]] | None  # the manifest's file table, when each reader checks its files

    @property
    def saved_world(self) -> int:
        return int(self.meta.get("world_size", self.source.world))


def _refusal(saved: dict[str, Any], want: dict[str, Any], why: str) -> ReshardError:
    def fmt(lay: dict[str, Any]) -> str:
        return ", ".join(f"{k}={lay.get(k)}" for k in ("tp", "pp", "dp", "zero", "precision"))

    return ReshardError(f"cannot reshard from ({fmt(saved)}) to ({fmt(want)}): {why}")


def plan_conversion(
    checkpoint: str | Path,
    *,
    tp: int,
    pp: int,
    dp: int | None = None,
    zero: int | None = None,
    precision: str | None = None,
    partition: str | None = None,
    model_cfg: Any = None,
    verify: bool = True,
) -> Conversion:
    """Checks that `checkpoint` can be rewritten at (tp, pp, dp[, engine ZeRO stage, precision]) and returns
    the conversion. `model_cfg` is the resuming run's model (only its vocabulary padding may differ from the
    checkpoint's); by default the checkpoint's own. With `verify`, every file must be present at its manifest
    size here, and each rank checks the sha256 of the files it reads (`Conversion.hashes`). Raises ReshardError
    naming both layouts otherwise."""
    from parallel.tensor_plan import tensor_parallel_problems
    from parallel.zero import engine_zero_stage
    from pretrain.checkpoint import read_manifest, verify_checkpoint
    from pretrain.config import config_from_dict

    src = Path(checkpoint)
    problems = verify_checkpoint(src, hashes=False)  # sizes only: a file's hash is checked by its reader
    if problems:
        raise ReshardError(f"{src}: will not convert a damaged checkpoint:\n  " + "\n  ".join(problems))
    meta = read_manifest(src)
    files = meta.get("files") or {}
    for key in ("files", "format", "version"):
        meta.pop(key, None)
    raw = yaml.safe_load((src / "config.yaml").read_text(encoding="utf-8"))
    cfg = config_from_dict(raw, validate=False, source=str(src / "config.yaml"))
    saved: dict[str, Any] = {"tp": 1, "pp": 1, "dp": 1, "zero": 0, **(meta.get("layout") or {})}
    saved["precision"] = cfg.train.precision
    precision = precision or cfg.train.precision
    partition = partition or cfg.parallel.pp_partition
    # the stage the engine runs (mixed precision at stage 0 runs stage 1 outside BF16_Optimizer's pipelines)
    zero = engine_zero_stage(cfg.parallel.zero_stage if zero is None else zero, precision, pp)
    want: dict[str, Any] = {
        "tp": tp,
        "pp": pp,
        "dp": dp or int(saved["dp"]),
        "zero": zero,
        "precision": precision,
    }
    if 3 in (int(saved["zero"]), zero):
        raise _refusal(
            saved,
            want,
            "ZeRO stage 3 partitions the weights themselves (zero_pp_rank_*_model_states.pt), which this converter "
            "does not read or write; a dp-only change of a ZeRO-3 run goes through DeepSpeed's universal checkpoint",
        )
    if zero >= 2 and pp > 1:
        raise _refusal(
            saved, want, f"ZeRO stage {zero} cannot run with pipeline parallelism (DeepSpeed asserts)"
        )
    if cfg.parallel.ep > 1:
        raise _refusal(
            saved,
            want,
            f"parallel.ep={cfg.parallel.ep}: expert-parallel checkpoints keep expert parameters in optimizer groups "
            "of their own (expp_rank_* files) that this converter does not map",
        )
    target_cfg = model_cfg if model_cfg is not None else cfg.model
    bad = tensor_parallel_problems(target_cfg, tp)
    if bad:
        raise _refusal(saved, want, "; ".join(bad))
    source = Side.build(
        cfg.model,
        tp=int(saved["tp"]),
        pp=int(saved["pp"]),
        dp=int(saved["dp"]),
        zero=int(saved["zero"]),
        precision=cfg.train.precision,
        partition=cfg.parallel.pp_partition,
    )
    target = Side.build(
        target_cfg, tp=tp, pp=pp, dp=want["dp"], zero=zero, precision=precision, partition=partition
    )
    empty = [s for s, names in enumerate(target.layout.order) if not names]
    if empty:
        n_layers = len(target.layout.layers or [])
        raise _refusal(
            saved,
            want,
            f"pp={pp}: stages {empty} would hold no parameters ({n_layers} pipeline layers, "
            f"parallel.pp_partition={partition})",
        )
    if set(source.shapes) != set(target.shapes):
        raise _refusal(saved, want, "the run's model has other parameters than the checkpoint's")
    return Conversion(
        hashes=files if verify else None,
        src=src,
        source=source,
        target=target,
        saved=saved,
        want=want,
        meta=meta,
        raw=raw,
        partition=partition,
    )


def seal(conv: Conversion, tmp: Path, out: Path, reports: list[RankReport]) -> Path:
    """Rank 0, after every rank has written its files into `tmp`: config, meta, the files that travel with the
    checkpoint (tokenizer), and the manifest (from the ranks' own hashes: nothing is read twice), written last;
    then `tmp` is renamed to `out`."""
    from pretrain.checkpoint import MANIFEST, _sha256

    src = conv.src
    raw = json.loads(json.dumps(conv.raw))  # a copy
    raw.setdefault("parallel", {}).update(tp=conv.want["tp"], pp=conv.want["pp"], pp_partition=conv.partition)
    raw.setdefault("train", {})["precision"] = conv.want["precision"]
    if conv.target.cfg is not conv.source.cfg:
        raw.setdefault("model", {})["vocab_size"] = conv.target.cfg.vocab_size
    config_yaml = yaml.safe_dump(raw, sort_keys=False)
    (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
    own_kinds = ("mp_rank_", "layer_", "tandem-rank-", "zero_pp_rank_", "bf16_zero_pp_rank_")
    for f in src.iterdir():  # the tokenizer and anything else that travels with the checkpoint
        if (
            f.is_file()
            and not f.name.startswith(own_kinds)
            and f.name not in (MANIFEST, "meta.json", "config.yaml")
        ):
            shutil.copyfile(f, tmp / f.name)
    meta = dict(conv.meta)
    meta.update(
        layout={k: conv.want[k] for k in ("tp", "pp", "dp", "zero")},
        world_size=conv.target.world,
        config_sha256=hashlib.sha256(config_yaml.encode()).hexdigest(),
        resharded_from={
            "path": str(src),
            "layout": conv.saved,
            "world_size": conv.saved_world,
            # A cached conversion is reused only while its source is this same sealed checkpoint.
            "manifest_sha256": _sha256(src / MANIFEST),
        },
    )
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    files: dict[str, dict[str, Any]] = {}
    for r in reports:
        files.update(r.written)
    for f in tmp.iterdir():
        if f.is_file() and f.name not in files and f.name != MANIFEST:
            files[f.name] = {"bytes": f.stat().st_size, "sha256": _sha256(f)}
    on_disk = {f.name for f in tmp.iterdir() if f.is_file()} - {MANIFEST}
    if on_disk != set(files):
        raise ReshardError(
            f"{tmp}: files {sorted(on_disk ^ set(files))} were not reported by the ranks that wrote them"
        )
    manifest = {"format": "tandem-checkpoint", "version": 1, **meta, "files": dict(sorted(files.items()))}
    write_text_atomic(tmp / MANIFEST, json.dumps(manifest, indent=2))  # written last
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def reshard_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    tp: int,
    pp: int,
    dp: int | None = None,
    partition: str | None = None,
    zero: int | None = None,
    precision: str | None = None,
    model_cfg: Any = None,
) -> Path:
    """Writes `checkpoint` re-laid-out at (tp, pp, dp) to `out` (a complete, verifiable Tandem checkpoint;
    written under a temporary name and renamed, so `out` exists only when complete), converting one target
    rank after another in this process (each reads only its own source files). Returns `out`."""
    out = Path(out)
    conv = plan_conversion(
        checkpoint,
        tp=tp,
        pp=pp,
        dp=dp,
        zero=zero,
        precision=precision,
        partition=partition,
        model_cfg=model_cfg,
    )
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    reports = [
        convert_rank(
            conv.src,
            tmp,
            source=conv.source,
            target=conv.target,
            rank=r,
            saved_world=conv.saved_world,
            hashes=conv.hashes,
        )
        for r in range(conv.target.world)
    ]
    return seal(conv, tmp, out, reports)


def consolidated_states(checkpoint: str | Path, *, verify: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """The full (unsharded) fp32 master weight and both Adam moments of every parameter of a checkpoint, at any
    layout, precision and ZeRO stage 0-2: {name: {"master", "exp_avg", "exp_avg_sq"}}. For comparing two
    checkpoints tensor by tensor (tests, a resume check); holds the whole model's states in memory."""
    conv = plan_conversion(checkpoint, tp=1, pp=1, dp=1, zero=0, precision="fp32", verify=verify)
    tgt, *_ = read_rank(conv.src, source=conv.source, target=conv.target, rank=0, hashes=conv.hashes)
    return {n: {k: tgt.views[(n, k)] for k in STATE_KEYS} for n in conv.target.layout.order[0]}
