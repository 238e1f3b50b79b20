"""Typed, validated run configuration: the single source of truth for a Tandem run.

A run is described by nested dataclasses (model, data, parallel, optimizer, train, checkpoint).
They are loaded from YAML (`configs/runs/*.yaml`), then dotted command-line overrides are applied
(`train.lr=3e-4`). Unknown keys, wrong types and broken rules are collected and raised together in
one `ConfigError` that names every field, its value and the rule. The DeepSpeed JSON is generated
from the config (`parallel.zero.deepspeed_config`), never written by hand.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from parallel.zero import deepspeed_config as deepspeed_config  # re-exported: the builder moved there

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field carrying the one-line help text shown by `pretrain train --help`."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    preset: str | None = _f(None, "name of a file in configs/models/ whose values this section starts from")
    family: Literal["gpt", "bert", "t5", "bart"] = _f(
        "gpt", "model family: decoder-only, encoder-only, or encoder-decoder (t5, bart)"
    )
    objective: str = _f(
        "",
        "pretraining objective (data_pipeline.objectives.OBJECTIVES); empty means the family's own: "
        "gpt causal LM, bert masked LM, t5 span corruption",
    )
    vocab_size: int = _f(
        0,
        "vocabulary size (embedding rows); 0 takes the shards' tokenizer's, rounded up to a multiple of "
        "make_vocab_size_divisible_by",
    )
    make_vocab_size_divisible_by: int = _f(
        1,
        "with vocab_size 0, pad the tokenizer's vocabulary up to a multiple of this (Megatron/GPT-NeoX name; "
        "e.g. 128 for tensor cores, or tp when tp does not divide it); padding rows are never emitted; "
        "1 = no padding",
    )
    tokenizer_vocab_size: int = _f(
        0,
        "recorded by training when vocab_size exceeds the shards' tokenizer: ids from here up to vocab_size "
        "are padding rows that decoding never emits; 0 = every row is a token",
    )
    hidden_size: int = _f(128, "width of the residual stream")
    num_layers: int = _f(2, "number of Transformer blocks")
    num_heads: int = _f(4, "attention heads per layer")
    num_kv_heads: int = _f(0, "key/value heads (grouped-query attention); 0 means num_heads")
    attention_head_dim: int = _f(
        0, "width of one attention head; 0 means hidden_size / num_heads (T5-11B uses 128)"
    )
    num_decoder_layers: int = _f(0, "decoder blocks of an encoder-decoder (T5); 0 means num_layers")
    ffn_hidden_size: int = _f(
        0, "MLP inner width; 0 means 4*hidden (gelu) or 8/3*hidden rounded to 64 (swiglu)"
    )
    max_seq_len: int = _f(1024, "longest sequence the position embedding supports")
    norm: Literal["layernorm", "rmsnorm"] = _f("layernorm", "normalization layer")
    norm_position: Literal["pre", "post"] = _f("pre", "pre-norm (GPT-2, T5) or post-norm (original BERT)")
    norm_eps: float = _f(1e-5, "epsilon of the normalization layers")
    activation: Literal["gelu", "gelu_tanh", "relu", "swiglu", "geglu"] = _f(
        "gelu", "MLP activation; swiglu (Llama) and geglu (T5 v1.1, tanh GELU) are gated"
    )
    position: Literal["learned", "rope", "relative", "relative_xl"] = _f(
        "learned",
        "learned absolute positions (GPT-2, BERT), rotary (RoPE), T5's relative position buckets, or "
        "Transformer-XL's sinusoidal relative encoding with per-layer projection and u/v biases (Gopher)",
    )
    rope_theta: float = _f(10000.0, "RoPE base frequency")
    relative_buckets: int = _f(32, "T5 relative-position buckets")
    relative_max_distance: int = _f(128, "T5: distances beyond this share the last bucket")
    type_vocab_size: int = _f(2, "BERT token-type (segment) embeddings; 0 disables them")
    embedding_size: int = _f(
        0, "BERT: token embedding width E, projected to hidden_size (ALBERT's factorization); 0 = hidden"
    )
    share_layers: Literal["none", "all", "attention", "ffn"] = _f(
        "none", "BERT: share every block's weights, or only attention or FFN ones, across layers (ALBERT)"
    )
    position_offset: int = _f(
        0, "BERT: position table rows before position 0 (RoBERTa/fairseq reserve 2: padding_idx + 1)"
    )
    bias: bool = _f(True, "biases in linear and norm layers")
    dropout: float = _f(0.0, "dropout on embeddings, attention probabilities and residual branches")
    tie_embeddings: bool = _f(True, "share the input embedding with the output projection")
    scale_embedding: bool = _f(False, "multiply token embeddings by sqrt(hidden_size) (bart family only)")
    parallel_block: bool = _f(
        False, "GPT: x + attn(norm(x)) + mlp(norm(x)) with one shared norm per block (GPT-J, PaLM)"
    )
    z_loss: float = _f(
        0.0, "GPT: adds z_loss * mean(log(Z)^2) of the softmax normalizer to the loss (PaLM 1e-4)"
    )
    local_attention_window: int = _f(
        0,
        "GPT: on the locally banded layers each query sees itself and the window-1 tokens before it "
        "(GPT-3's alternating dense / sparse layers); 0 = every layer dense",
    )
    local_attention_every: int = _f(
        2,
        "GPT: with local_attention_window > 0, layers i with (i + 1) % every == 0 are banded (2 = odd layers)",
    )
    init_std: float = _f(0.02, "std of the normal weight init; residual projections get /sqrt(2*num_layers)")
    # Switch Transformer (Fedus et al. 2021): top-1 routed experts replace the MLP on some layers.
    num_experts: int = _f(0, "experts per MoE layer (Switch top-1 routing); 0 = dense MLPs everywhere")
    moe_every: int = _f(
        2, "with num_experts > 0, layers 1, 1+k, 1+2k, ... (0-based) of each stack are MoE (Switch: k=2)"
    )
    capacity_factor: float = _f(
        1.0, "training: each expert takes at most ceil(factor * tokens / experts) tokens, the rest drop"
    )
    eval_capacity_factor: float = _f(2.0, "capacity factor in evaluation (Switch paper: 2.0)")
    moe_aux_loss_coef: float = _f(0.01, "alpha of the load-balancing loss alpha*N*sum_i f_i*P_i, per layer")
    router_z_loss_coef: float = _f(
        0.0, "weight of the router z-loss mean(logsumexp(router logits)^2) per layer (ST-MoE: 1e-3)"
    )
    # ELECTRA (objective electra) and DistilBERT (objective distill): pretrain/models/{electra,distill}.py
    generator_hidden_fraction: float = _f(
        0.25, "ELECTRA: generator width as a fraction of hidden_size (paper: 1/4 small, 1/3 base)"
    )
    discriminator_weight: float = _f(50.0, "ELECTRA: lambda, the replaced-token-detection loss weight")
    teacher_checkpoint: str = _f(
        "", "DistilBERT: the teacher's Tandem BERT checkpoint, or its run directory (newest checkpoint)"
    )
    distill_temperature: float = _f(2.0, "DistilBERT: softmax temperature T of the soft-target loss")
    distill_alpha_ce: float = _f(5.0, "DistilBERT: weight of the soft-target (T^2 * KL) loss")
    distill_alpha_mlm: float = _f(2.0, "DistilBERT: weight of the student's masked-LM loss")
    distill_alpha_cos: float = _f(1.0, "DistilBERT: weight of the hidden-state cosine loss")

    def is_moe_layer(self, index: int) -> bool:
        """Whether block `index` (0-based, within its stack) routes to experts: the Switch/HF convention
        puts the first expert layer second (index 1), then one every `moe_every` layers."""
        return self.num_experts > 0 and (self.moe_every == 1 or index % self.moe_every == 1)

    @property
    def objective_name(self) -> str:
        """The objective this model trains with: `objective` if set, else the family's default."""
        return self.objective or self.family

    @property
    def gated(self) -> bool:
        return self.activation in ("swiglu", "geglu")

    @property
    def decoder_layers(self) -> int:
        return self.num_decoder_layers or self.num_layers

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        if self.gated:
            # Keeps the gated MLP's parameter count at ~8h^2 like a 4h GELU MLP (Shazeer 2020).
            return 64 * math.ceil(8 * self.hidden_size / 3 / 64)
        return 4 * self.hidden_size

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def embed_size(self) -> int:
        """Width of BERT's token/position/type embeddings: embedding_size (ALBERT's E) or hidden_size."""
        return self.embedding_size or self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim or self.hidden_size // self.num_heads


@dataclass
class DataConfig:
    shards: str = _f("", "directory with manifest.json written by `pretrain data shard`")
    sources: list = _f([], "weighted blend instead of data.shards: [{path: DIR, weight: W}, ...]")  # noqa: RUF009
    seq_len: int = _f(128, "tokens per training sequence")
    num_workers: int = _f(0, "DataLoader worker processes per rank")
    shuffle_shards: bool = _f(True, "visit the shards in a new seeded order every epoch")
    train_split: str = _f("train", "manifest split to train on")
    eval_split: str = _f("val", "manifest split for validation loss")


@dataclass
class ParallelConfig:
    tp: int = _f(1, "tensor-parallel degree")
    pp: int = _f(1, "pipeline-parallel degree")
    zero_stage: int = _f(0, "ZeRO stage: 0 off, 1 optimizer states, 2 + gradients, 3 + parameters")
    sequence_parallel: bool = _f(
        False, "with tp > 1, shard norms and dropout along the sequence (Korthikanti 2022)"
    )
    pp_partition: Literal["parameters", "uniform", "blocks"] = _f(
        "parameters",
        "with pp > 1, how layers are split into stages: balance parameters, equal layer counts, or equal "
        "Transformer-block counts",
    )
    ep: int = _f(1, "expert-parallel degree: each MoE layer's experts are split over ep data-parallel ranks")
    activation_checkpointing: Literal["none", "full", "selective"] = _f(
        "none",
        "recompute activations in backward: 'full' keeps only each block's input, 'selective' recomputes "
        "only the attention core (scores, softmax, dropout; Korthikanti et al. 2022); true means full",
    )
    offload_optimizer: Literal["none", "cpu"] = _f(
        "none",
        "ZeRO-Offload: keep each rank's optimizer partition (fp32 master, Adam moments, gradient copy) in "
        "host memory and run the update there; needs zero_stage >= 1",
    )
    offload_param: Literal["none", "cpu"] = _f(
        "none", "ZeRO-Infinity: keep each rank's parameter partition in host memory; needs zero_stage=3"
    )
    offload_pin_memory: bool = _f(
        True, "page-lock the offloaded host buffers (faster copies; turn off under a low `ulimit -l`)"
    )
    cpu_adam: bool = _f(
        False,
        "with offload_optimizer=cpu, update with DeepSpeedCPUAdam (vectorized C++, compiled on first use) "
        "instead of torch.optim.AdamW",
    )


@dataclass
class OptimizerConfig:
    lr: float = _f(3e-4, "peak learning rate")
    min_lr: float = _f(3e-5, "learning rate at the end of decay")
    warmup_steps: int = _f(0, "linear warmup steps from 0 to lr")
    decay_steps: int = _f(0, "steps over which lr decays to min_lr; 0 means train.steps")
    decay_style: Literal["cosine", "linear", "constant", "inverse-square-root", "WSD"] = _f(
        "cosine", "learning-rate decay shape (megatron-core OptimizerParamScheduler)"
    )
    wsd_decay_steps: int = _f(0, "final annealing steps of the WSD schedule")
    beta1: float = _f(0.9, "Adam beta1")
    beta2: float = _f(0.95, "Adam beta2 (GPT-3 used 0.95)")
    eps: float = _f(1e-8, "Adam epsilon")
    weight_decay: float = _f(0.1, "decoupled weight decay at the start (not applied to biases and norms)")
    weight_decay_end: float | None = _f(None, "weight decay at the end of the ramp; null means constant")
    weight_decay_style: Literal["constant", "linear", "cosine"] = _f("constant", "weight-decay ramp shape")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this; 0 disables")
    implementation: Literal["auto", "fused", "foreach", "for-loop"] = _f(
        "auto",
        "torch AdamW's kernels: 'fused' (one kernel per step over each tensor), 'foreach' (multi-tensor ops), "
        "'for-loop' (a few elementwise ops per tensor); 'auto' = fused on CUDA, for-loop elsewhere (parallel."
        "cpu_adam runs DeepSpeed's CPU Adam instead)",
    )


@dataclass
class TrainConfig:
    out_dir: str = _f("runs/default", "run directory: config.yaml, metrics.jsonl, tb/, checkpoints/")
    steps: int = _f(100, "optimizer steps to train for")
    seed: int = _f(1234, "seed for init, data order, dropout and masking")
    micro_batch_size: int = _f(8, "sequences per rank per forward pass")
    global_batch_size: int = _f(8, "sequences per optimizer step over all ranks (grad accumulation fills it)")
    batch_size_ramp: dict | None = _f(  # noqa: RUF009
        None,
        "GPT-3's batch-size ramp (Megatron --rampup-batch-size): {start: S, increment: I, samples: N} starts "
        "at S sequences per step and adds I every N / ((global_batch_size - S) / I) consumed samples, "
        "reaching global_batch_size after N samples; S and I multiples of micro_batch_size x dp, pp=1 only; "
        "null = fixed batch",
    )
    log_interval: int = _f(10, "steps between metric records")
    eval_interval: int = _f(0, "steps between validation-loss evaluations; 0 disables")
    eval_batches: int = _f(4, "micro-batches per validation-loss evaluation")
    resume: str = _f("auto", "'auto' (newest checkpoint in out_dir), 'never', or a checkpoint directory")
    verify_resume: int = _f(
        0,
        "K > 0: after a resume from step N, compare steps N+1..N+K (loss, grad_norm, lr, consumed_samples) with "
        "the records the checkpoint's run logged there before, bitwise at the same layout on CPU, else within "
        "1e-5 relative (fp32) or 1e-3 (bf16/fp16), and stop at the first difference (pretrain/replay.py); 0 = off",
    )
    init_from: str = _f(
        "",
        "continued pretraining: start from this checkpoint's weights (any tp layout) with a fresh optimizer, "
        "schedule and step 0; ignored when out_dir already has a checkpoint to resume",
    )
    precision: Literal["fp32", "bf16", "fp16"] = _f(
        "fp32", "training precision (bf16/fp16 keep fp32 masters)"
    )
    peak_tflops: float = _f(0.0, "peak FLOP/s per device for MFU; 0 looks the device up in a table")
    attention_backend: Literal["auto", "triton", "sdpa"] = _f(
        "auto",
        "attention kernels: 'triton' (Tandem's fused kernels; on a CPU only under TRITON_INTERPRET=1, for "
        "tests), 'sdpa' (PyTorch scaled_dot_product_attention), 'auto' (Triton for CUDA tensors it supports, "
        "else SDPA; the environment variable TANDEM_ATTENTION_BACKEND, if set, decides instead)",
    )
    norm_backend: Literal["auto", "triton", "torch"] = _f(
        "auto",
        "RMSNorm/LayerNorm kernels: 'triton' (Tandem's fused forward+backward; on a CPU only under "
        "TRITON_INTERPRET=1, for tests), 'torch' (PyTorch's), 'auto' (the environment variable "
        "TANDEM_NORM_BACKEND if set, else 'torch' until the kernels are measured faster on a GPU)",
    )
    loss_chunk_size: int = _f(
        0,
        "0: the model's logits, then the cross-entropy; N > 0: the output projection and the cross-entropy "
        "fused, N labelled tokens at a time (Triton on CUDA), so the (tokens x vocab) fp32 logits are never "
        "held (GPT, BERT, T5/BART with their plain objectives, z-loss included; tp=1, pp=1, zero_stage < 3)",
    )
    compile: Literal["none", "blocks"] = _f(
        "none",
        "'blocks': torch.compile each Transformer block (regional compilation, as torchtitan does: blocks of "
        "one shape share a compiled graph; TorchInductor fuses the norms, activations, bias adds, dropout and "
        "residual adds around the matmuls; Tandem's Triton kernels stay opaque calls inside). The first steps "
        "pay the compilation (a C++ compiler is needed on a CPU). 'none': eager",
    )
    progress: bool = _f(True, "console progress bar on rank 0")
    loss_spike_factor: float = _f(0.0, "skip a step whose loss exceeds this x the running mean; 0 disables")
    max_skipped_in_a_row: int = _f(10, "stop (after saving) when this many steps in a row were skipped")
    collective_timeout_s: float = _f(1800.0, "seconds a collective waits for a peer before the run fails")
    time_limit_s: float = _f(0.0, "stop (saving a checkpoint) this many seconds after start; 0 = no limit")
    stop_grace_s: float = _f(
        120.0, "save and stop when less than this remains of the time limit or Slurm job"
    )


@dataclass
class CheckpointConfig:
    interval: int = _f(0, "steps between checkpoints; 0 saves only at the end")
    keep_last: int = _f(3, "complete checkpoints to keep (older ones are deleted); 0 keeps all")
    save_final: bool = _f(True, "save a checkpoint after the last step")
    verify_on_load: bool = _f(True, "re-hash every file against the checkpoint manifest before resuming")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(Config)}  # type: ignore[misc]
_SECTION_TYPES = {
    "model": ModelConfig,
    "data": DataConfig,
    "parallel": ParallelConfig,
    "optimizer": OptimizerConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
}


class ConfigError(ValueError):
    """Every problem found in a configuration, one per line."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        head = f"invalid configuration{f' ({source})' if source else ''}: {len(problems)} problem(s)"
        super().__init__("\n  - ".join([head, *problems]))


# ----------------------------------------------------------------------------- loading


def _coerce(value: Any, tp: Any, name: str, problems: list[str]) -> Any:
    """Checks `value` against the annotation `tp`; returns the (possibly converted) value."""
    origin = typing.get_origin(tp)
    if tp is list or origin is list:
        if not isinstance(value, list):
            problems.append(f"{name}={value!r}: must be a list")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{name}={value!r}: must be a mapping")
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            problems.append(f"{name}={value!r}: must be one of {', '.join(map(repr, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], name, problems)
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{name}={value!r}: must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            problems.append(f"{name}={value!r}: must be an integer")
        return value
    if tp is float:
        # YAML 1.1 reads `3e-4` (no dot) as a string; accept any spelling Python parses as a float.
        if isinstance(value, bool):
            problems.append(f"{name}={value!r}: must be a number")
            return value
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        problems.append(f"{name}={value!r}: must be a number")
        return value
    if tp is str:
        if not isinstance(value, str):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            problems.append(f"{name}={value!r}: must be a string")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {name}")


# Keys that changed section: named in the error so an old config is fixed in one edit.
_MOVED = {
    ("train", "activation_checkpointing"): "parallel.activation_checkpointing (none, full or selective)",
}


def _build_section(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{prefix}: must be a mapping of keys to values, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if (prefix, key) in _MOVED:
            problems.append(f"{prefix}.{key}: moved to {_MOVED[prefix, key]}")
            continue
        if (prefix, key) == ("parallel", "activation_checkpointing") and isinstance(value, bool):
            value = "full" if value else "none"  # the DeepSpeed/NeoX habit: a boolean switch
        if key not in known:
            close = [k for k in known if k.replace("_", "") == str(key).replace("_", "").lower()]
            close = close or difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.75)
            hint = f" (did you mean {prefix}.{close[0]}?)" if close else ""
            problems.append(f"{prefix}.{key}: unknown key{hint}; known keys: {', '.join(sorted(known))}")
            continue
        kwargs[key] = _coerce(value, hints[key], f"{prefix}.{key}", problems)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any, problems: list[str]) -> None:
    parts = dotted.split(".")
    if len(parts) != 2 or not all(parts):
        problems.append(f"override {dotted!r}: expected SECTION.KEY=VALUE, e.g. train.steps=50")
        return
    section, key = parts
    if section not in _SECTION_TYPES:
        problems.append(
            f"override {dotted!r}: unknown section {section!r}; sections: {', '.join(_SECTION_TYPES)}"
        )
        return
    node = tree.setdefault(section, {})
    if not isinstance(node, dict):
        problems.append(f"override {dotted!r}: section {section!r} in the file is not a mapping")
        return
    node[key] = value


def parse_overrides(items: list[str]) -> tuple[dict, list[str]]:
    """`["train.steps=5", "model.norm=rmsnorm"]` -> nested dict; values are parsed as YAML scalars."""
    tree: dict = {}
    problems: list[str] = []
    for item in items:
        if "=" not in item:
            problems.append(f"override {item!r}: expected SECTION.KEY=VALUE")
            continue
        key, _, text = item.partition("=")
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError as exc:
            problems.append(f"override {item!r}: value is not valid YAML ({exc.__class__.__name__})")
            continue
        _set_dotted(tree, key.strip(), value, problems)
    return tree, problems


def resolve_preset(name: str, *, base_dir: Path | None = None) -> Path:
    """Finds configs/models/NAME.yaml (NAME may also be a path to a YAML file)."""
    candidates = [Path(name)]
    if base_dir is not None:
        candidates.append(base_dir / name)
    for root in (Path.cwd() / "configs" / "models", CONFIG_DIR / "models"):
        candidates += [root / name, root / f"{name}.yaml"]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"model.preset={name!r}: no such preset; available: {', '.join(available_presets())}"
    )


def available_presets() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "models").glob("*.yaml"))


def _read_yaml(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: top level must be a mapping of sections, got {type(data).__name__}"])
    return data


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    world_size: int | None = None,
    validate: bool = True,
) -> Config:
    """YAML file + dotted overrides -> validated `Config`. Raises one ConfigError listing every problem."""
    raw: dict = {}
    base_dir = None
    source = None
    if path is not None:
        path = Path(path)
        raw = _read_yaml(path)
        base_dir = path.parent
        source = str(path)
    over, problems = parse_overrides(list(overrides or []))
    raw = _merge(raw, over)
    return config_from_dict(
        raw, world_size=world_size, validate=validate, base_dir=base_dir, problems=problems, source=source
    )


def config_from_dict(
    raw: dict,
    *,
    world_size: int | None = None,
    validate: bool = True,
    base_dir: Path | None = None,
    problems: list[str] | None = None,
    source: str | None = None,
) -> Config:
    problems = list(problems or [])
    for key in raw:
        if key not in _SECTION_TYPES:
            problems.append(f"{key}: unknown section; sections: {', '.join(_SECTION_TYPES)}")
    model_raw = raw.get("model") or {}
    if isinstance(model_raw, dict) and model_raw.get("preset"):
        try:
            preset_raw = _read_yaml(resolve_preset(str(model_raw["preset"]), base_dir=base_dir))
            if "model" in preset_raw:
                preset_raw = preset_raw["model"]
            preset_raw.pop("preset", None)
            model_raw = _merge(preset_raw, model_raw)
        except FileNotFoundError as exc:
            problems.append(str(exc))
    sections = {}
    for name, cls in _SECTION_TYPES.items():
        section_raw = model_raw if name == "model" else raw.get(name)
        sections[name] = _build_section(cls, section_raw, name, problems)
    cfg = Config(**sections)
    if validate:
        problems += validation_problems(cfg, world_size=world_size)
    if problems:
        raise ConfigError(problems, source)
    return cfg


# ----------------------------------------------------------------------------- validation


def _loss_chunk_problems(cfg: Config) -> list[str]:
    """train.loss_chunk_size > 0 fuses the output projection into the loss on the model's own head
    (`lm_head_inputs`): the layouts and objectives that compute the loss elsewhere, or need the logits, are
    refused rather than silently trained the other way."""
    size, m, par = cfg.train.loss_chunk_size, cfg.model, cfg.parallel
    if not _ints(size):
        return []
    if size < 0:
        return [f"train.loss_chunk_size={size}: must be >= 0 (0 = full logits)"]
    if size == 0:
        return []
    head = f"train.loss_chunk_size={size}"
    p = []
    if _ints(par.tp) and par.tp > 1:
        p.append(f"{head} with parallel.tp={par.tp}: the vocabulary-parallel loss needs the logits; use 0")
    if _ints(par.pp) and par.pp > 1:
        p.append(
            f"{head} with parallel.pp={par.pp}: the last pipeline stage computes the loss from logits; use 0"
        )
    if par.zero_stage == 3:
        p.append(
            f"{head} with parallel.zero_stage=3: not verified under ZeRO-3's parameter partitioning (the "
            "head's weight gradient is formed during the forward); use 0"
        )
    from pretrain.models import OBJECTIVE_MODELS

    if m.objective in OBJECTIVE_MODELS:
        p.append(
            f"{head} with model.objective={m.objective!r}: that objective computes its own losses; use 0"
        )
    return p


def _compile_problems(cfg: Config) -> list[str]:
    """train.compile: the layouts where compiling each block would not be what it claims."""
    mode, par = cfg.train.compile, cfg.parallel
    if mode == "none":
        return []
    if par.zero_stage == 3:
        return [
            f"train.compile={mode!r} with parallel.zero_stage=3: ZeRO-3 gathers each submodule's parameters "
            "in hooks TorchDynamo cannot trace, which cut every block into per-layer graphs with nothing left "
            "to fuse (seen: 95 frames for a 2-layer GPT); use zero_stage <= 2 or compile=none"
        ]
    return []


def validation_problems(cfg: Config, *, world_size: int | None = None) -> list[str]:
    """Every broken rule, each naming the field, its value and the rule."""
    p: list[str] = []
    m, d, par, o, t, c = cfg.model, cfg.data, cfg.parallel, cfg.optimizer, cfg.train, cfg.checkpoint

    def positive(name: str, value: int | float) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
            p.append(f"{name}={value}: must be > 0")

    def nonneg(name: str, value: int | float) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            p.append(f"{name}={value}: must be >= 0")

    for name in ("hidden_size", "num_layers", "num_heads", "max_seq_len"):
        positive(f"model.{name}", getattr(m, name))
    for name in ("vocab_size", "num_kv_heads", "ffn_hidden_size", "tokenizer_vocab_size"):
        nonneg(f"model.{name}", getattr(m, name))
    p += _vocab_padding_problems(m)
    positive("model.norm_eps", m.norm_eps)
    if m.objective:
        from data_pipeline.objectives import OBJECTIVES

        if m.objective not in OBJECTIVES:
            p.append(f"model.objective={m.objective!r}: unknown; available: {', '.join(sorted(OBJECTIVES))}")
    positive("model.init_std", m.init_std)
    if isinstance(m.dropout, float) and not 0.0 <= m.dropout < 1.0:
        p.append(f"model.dropout={m.dropout}: must be in [0, 1)")
    explicit_head_dim = _ints(m.attention_head_dim) and m.attention_head_dim > 0
    if (
        _ints(m.hidden_size, m.num_heads)
        and m.num_heads > 0
        and m.hidden_size % m.num_heads
        and not explicit_head_dim
    ):
        p.append(f"model.hidden_size={m.hidden_size}: must be divisible by model.num_heads={m.num_heads}")
    if _ints(m.num_heads, m.num_kv_heads) and m.num_kv_heads > 0 and m.num_heads % m.num_kv_heads:
        p.append(f"model.num_kv_heads={m.num_kv_heads}: must divide model.num_heads={m.num_heads}")
    rope_heads = m.position == "rope" and _ints(m.hidden_size, m.num_heads) and m.num_heads > 0
    if rope_heads and (m.hidden_size // m.num_heads) % 2:
        p.append(f"model.position=rope: head dim {m.hidden_size // m.num_heads} must be even")
    for name in ("attention_head_dim", "num_decoder_layers", "type_vocab_size"):
        nonneg(f"model.{name}", getattr(m, name))
    positive("model.relative_buckets", m.relative_buckets)
    positive("model.relative_max_distance", m.relative_max_distance)
    if m.family == "t5" and m.position != "relative":
        p.append(f"model.position={m.position!r}: T5 uses position=relative (relative position buckets)")
    if m.family != "t5" and m.position == "relative":
        p.append(f"model.position='relative' with model.family={m.family!r}: only T5 uses relative buckets")
    nonneg("model.embedding_size", m.embedding_size)
    nonneg("model.position_offset", m.position_offset)
    for bert_option, setting, off in (
        ("embedding_size", m.embedding_size, 0),
        ("share_layers", m.share_layers, "none"),
        ("position_offset", m.position_offset, 0),
    ):
        if m.family != "bert" and setting != off:
            p.append(
                f"model.{bert_option}={setting!r} with model.family={m.family!r}: only BERT implements it"
            )
    if m.position_offset and m.position != "learned":
        p.append(f"model.position_offset={m.position_offset}: needs model.position='learned'")
    if m.objective == "sop" and m.family != "bert":
        p.append(
            f"model.objective='sop' with model.family={m.family!r}: sentence-order prediction needs bert"
        )
    albert = m.objective == "sop" or m.embedding_size or m.share_layers != "none"
    if albert and _ints(par.tp) and par.tp > 1:
        p.append(
            f"parallel.tp={par.tp}: ALBERT's options (model.objective=sop, embedding_size, share_layers) "
            "are supported with tp=1 only"
        )
    if m.family == "bart" and m.position != "learned":
        p.append(f"model.position={m.position!r}: BART uses position=learned (absolute position tables)")
    if m.scale_embedding and m.family != "bart":
        p.append(f"model.scale_embedding=true with model.family={m.family!r}: only the bart family scales")
    if m.objective == "span_mlm" and m.family != "bert":
        p.append(
            f"model.objective='span_mlm' with model.family={m.family!r}: SpanBERT is a BERT (family bert)"
        )
    if m.objective == "bart" and m.family not in ("t5", "bart"):
        p.append(
            f"model.objective='bart' with model.family={m.family!r}: denoising needs an encoder-decoder "
            "(family bart or t5)"
        )
    if m.family == "gpt" and m.norm_position == "post":
        p.append("model.norm_position='post' with model.family='gpt': GPT blocks are pre-norm")
    if m.objective in ("electra", "distill"):
        if m.family != "bert":
            p.append(f"model.objective={m.objective!r} with model.family={m.family!r}: needs family bert")
        if _ints(par.tp) and par.tp > 1:
            p.append(
                f"parallel.tp={par.tp} with model.objective={m.objective!r}: the second network "
                "(generator or teacher) is not tensor-parallel; use tp=1"
            )
    if _nums(m.generator_hidden_fraction) and not 0.0 < m.generator_hidden_fraction <= 1.0:
        p.append(f"model.generator_hidden_fraction={m.generator_hidden_fraction}: must be in (0, 1]")
    nonneg("model.discriminator_weight", m.discriminator_weight)
    positive("model.distill_temperature", m.distill_temperature)
    for name in ("distill_alpha_ce", "distill_alpha_mlm", "distill_alpha_cos"):
        nonneg(f"model.{name}", getattr(m, name))
    if m.teacher_checkpoint:
        if m.objective != "distill":
            p.append(f"model.teacher_checkpoint={m.teacher_checkpoint!r}: only objective distill uses it")
        elif not Path(m.teacher_checkpoint).is_dir():
            p.append(f"model.teacher_checkpoint={m.teacher_checkpoint!r}: no such checkpoint directory")
    nonneg("model.z_loss", m.z_loss)
    nonneg("model.local_attention_window", m.local_attention_window)
    positive("model.local_attention_every", m.local_attention_every)
    for name, value, default in (
        ("parallel_block", m.parallel_block, False),
        ("z_loss", m.z_loss, 0.0),
        ("local_attention_window", m.local_attention_window, 0),
    ):
        if m.family != "gpt" and value != default:
            p.append(f"model.{name}={value!r} with model.family={m.family!r}: only GPT implements it")
    if m.position == "relative_xl" and m.family != "gpt":
        p.append(f"model.position='relative_xl' with model.family={m.family!r}: only GPT implements it")
    if _ints(par.tp) and par.tp > 1 and m.position == "relative_xl":
        p.append(f"model.position='relative_xl' with parallel.tp={par.tp}: W_R and u/v have no TP split yet")
    if _ints(par.tp) and par.tp > 1 and _nums(m.z_loss) and m.z_loss > 0:
        p.append(f"model.z_loss={m.z_loss} with parallel.tp={par.tp}: needs the normalizer over vocab shards")

    if not d.shards and not d.sources:
        p.append(
            "data.shards='': must name a directory written by `pretrain data shard` (or set data.sources)"
        )
    if d.shards and d.sources:
        p.append(
            "data.shards and data.sources are both set: use one (data.sources blends several directories)"
        )
    for i, src in enumerate(d.sources if isinstance(d.sources, list) else []):
        if not isinstance(src, dict) or set(src) != {"path", "weight"}:
            p.append(f"data.sources[{i}]={src!r}: must be a mapping with exactly the keys path and weight")
        elif not isinstance(src["path"], str) or not src["path"]:
            p.append(f"data.sources[{i}].path={src['path']!r}: must be a directory with manifest.json")
        elif not _nums(src["weight"]) or src["weight"] <= 0:
            p.append(f"data.sources[{i}].weight={src['weight']!r}: must be a number > 0")
    positive("data.seq_len", d.seq_len)
    nonneg("data.num_workers", d.num_workers)
    if _ints(d.seq_len, m.max_seq_len) and m.position == "learned" and d.seq_len > m.max_seq_len:
        p.append(f"data.seq_len={d.seq_len}: exceeds model.max_seq_len={m.max_seq_len} (learned positions)")

    positive("parallel.tp", par.tp)
    positive("parallel.pp", par.pp)
    if par.zero_stage not in (0, 1, 2, 3):
        p.append(f"parallel.zero_stage={par.zero_stage}: must be 0, 1, 2 or 3")
    if _ints(par.zero_stage, par.pp) and par.zero_stage >= 2 and par.pp > 1:
        p.append(
            f"parallel.zero_stage={par.zero_stage} with parallel.pp={par.pp}: DeepSpeed's pipeline engine "
            "supports ZeRO stage 0 or 1 only"
        )
    if _ints(par.pp) and par.pp > 1:
        p += [f"parallel.pp={par.pp}: {x}" for x in _pipeline_problems(m, par.pp)]
    if _ints(par.tp) and par.tp > 1:
        from parallel.tensor_plan import tensor_parallel_problems

        if m.vocab_size:  # 0 = from the tokenizer: checked again once it is known
            p += [f"parallel.tp={par.tp}: {x}" for x in tensor_parallel_problems(m, par.tp)]
        else:
            p += [
                f"parallel.tp={par.tp}: {x}" for x in tensor_parallel_problems(m, par.tp) if "vocab" not in x
            ]
        if par.zero_stage == 3:
            p.append(f"parallel.zero_stage=3 with parallel.tp={par.tp}: ZeRO-3 is supported with tp=1 only")
        if par.sequence_parallel and _ints(d.seq_len) and d.seq_len % par.tp:
            p.append(
                f"data.seq_len={d.seq_len}: must be divisible by parallel.tp={par.tp} with sequence_parallel"
            )
    if par.sequence_parallel and _ints(par.tp) and par.tp == 1:
        p.append("parallel.sequence_parallel=true: needs parallel.tp > 1")
    if _ints(par.zero_stage, m.num_experts):
        from parallel.zero import offload_problems

        p += offload_problems(par, num_experts=m.num_experts)

    p += _moe_problems(cfg, world_size)
    p += _loss_chunk_problems(cfg)
    p += _compile_problems(cfg)

    positive("optimizer.lr", o.lr)
    nonneg("optimizer.min_lr", o.min_lr)
    if _nums(o.lr, o.min_lr) and o.min_lr > o.lr:
        p.append(f"optimizer.min_lr={o.min_lr}: must be <= optimizer.lr={o.lr}")
    nonneg("optimizer.warmup_steps", o.warmup_steps)
    nonneg("optimizer.decay_steps", o.decay_steps)
    for name in ("beta1", "beta2"):
        value = getattr(o, name)
        if isinstance(value, float) and not 0.0 <= value < 1.0:
            p.append(f"optimizer.{name}={value}: must be in [0, 1)")
    positive("optimizer.eps", o.eps)
    nonneg("optimizer.weight_decay", o.weight_decay)
    nonneg("optimizer.grad_clip", o.grad_clip)
    decay_steps = o.decay_steps or t.steps
    if _ints(o.warmup_steps, decay_steps) and o.warmup_steps >= decay_steps > 0:
        p.append(
            f"optimizer.warmup_steps={o.warmup_steps}: must be < decay steps ({decay_steps}; "
            "optimizer.decay_steps or else train.steps)"
        )
    wd_end = o.weight_decay_end
    wd_down = wd_end is not None and _nums(o.weight_decay, wd_end) and wd_end < o.weight_decay
    if not wd_down and wd_end is not None and o.weight_decay_style == "constant" and wd_end != o.weight_decay:
        p.append(
            f"optimizer.weight_decay_end={wd_end}: differs from optimizer.weight_decay={o.weight_decay} but "
            "optimizer.weight_decay_style='constant'; choose 'linear' or 'cosine' to ramp it"
        )
    if wd_down:
        p.append(
            f"optimizer.weight_decay_end={o.weight_decay_end}: must be >= optimizer.weight_decay="
            f"{o.weight_decay} (the scheduler ramps weight decay up, never down)"
        )
    if o.decay_style == "WSD" and _ints(o.wsd_decay_steps) and o.wsd_decay_steps <= 0:
        p.append(f"optimizer.wsd_decay_steps={o.wsd_decay_steps}: must be > 0 with decay_style=WSD")

    positive("train.steps", t.steps)
    positive("train.micro_batch_size", t.micro_batch_size)
    positive("train.global_batch_size", t.global_batch_size)
    positive("train.log_interval", t.log_interval)
    nonneg("train.eval_interval", t.eval_interval)
    nonneg("train.verify_resume", t.verify_resume)
    positive("train.eval_batches", t.eval_batches)
    nonneg("train.peak_tflops", t.peak_tflops)
    if not t.out_dir:
        p.append("train.out_dir='': must name the run directory")
    if isinstance(t.init_from, str) and t.init_from and not (Path(t.init_from) / "manifest.json").is_file():
        p.append(
            f"train.init_from={t.init_from!r}: not a complete Tandem checkpoint directory (no manifest.json)"
        )
    if isinstance(t.resume, str) and t.resume not in ("auto", "never") and not Path(t.resume).is_dir():
        p.append(f"train.resume={t.resume!r}: must be 'auto', 'never' or an existing checkpoint directory")
    batch_ints = _ints(t.global_batch_size, t.micro_batch_size) and t.micro_batch_size > 0
    if batch_ints and t.global_batch_size % t.micro_batch_size:
        p.append(
            f"train.global_batch_size={t.global_batch_size}: must be a multiple of "
            f"train.micro_batch_size={t.micro_batch_size}"
        )
    if world_size is not None and _ints(par.tp, par.pp, t.global_batch_size, t.micro_batch_size):
        model_parallel = par.tp * par.pp
        if model_parallel > 0 and world_size % model_parallel:
            p.append(
                f"world size {world_size}: not divisible by tp={par.tp} x pp={par.pp} = {model_parallel}"
            )
        elif model_parallel > 0:
            dp = world_size // model_parallel
            if t.global_batch_size % (t.micro_batch_size * dp):
                p.append(
                    f"train.global_batch_size={t.global_batch_size}: must be a multiple of "
                    f"train.micro_batch_size={t.micro_batch_size} x dp={dp} (world {world_size} / "
                    f"tp {par.tp} / pp {par.pp})"
                )

    p += _ramp_problems(cfg, world_size)

    nonneg("checkpoint.interval", c.interval)
    nonneg("checkpoint.keep_last", c.keep_last)
    return p


def _vocab_padding_problems(m: ModelConfig) -> list[str]:
    """model.make_vocab_size_divisible_by and model.tokenizer_vocab_size against model.vocab_size."""
    multiple, vocab, real = m.make_vocab_size_divisible_by, m.vocab_size, m.tokenizer_vocab_size
    if not _ints(multiple, vocab, real):
        return []
    p = []
    if multiple < 1:
        p.append(f"model.make_vocab_size_divisible_by={multiple}: must be >= 1 (1 = no padding)")
    elif vocab > 0 and vocab % multiple:
        p.append(
            f"model.vocab_size={vocab}: not a multiple of model.make_vocab_size_divisible_by={multiple}; set "
            f"model.vocab_size=0 to pad the tokenizer's vocabulary, or a multiple such as "
            f"{-(-vocab // multiple) * multiple}"
        )
    if real > 0 and vocab > 0 and real > vocab:
        p.append(f"model.tokenizer_vocab_size={real}: exceeds model.vocab_size={vocab}")
    return p


def _ramp_problems(cfg: Config, world_size: int | None) -> list[str]:
    """train.batch_size_ramp (data_pipeline/batch_ramp.py): Megatron's --rampup-batch-size rules."""
    t, par = cfg.train, cfg.parallel
    ramp = t.batch_size_ramp
    if not ramp or not isinstance(ramp, dict):
        return []
    name = "train.batch_size_ramp"
    if set(ramp) != {"start", "increment", "samples"}:
        return [f"{name}={ramp!r}: must be a mapping with exactly the keys start, increment and samples"]
    p = [
        f"{name}.{k}={ramp[k]!r}: must be an integer > 0" for k in ramp if not _ints(ramp[k]) or ramp[k] <= 0
    ]
    if p or not _ints(t.global_batch_size, t.micro_batch_size, par.tp, par.pp) or t.micro_batch_size <= 0:
        return p
    start, inc, gbs = ramp["start"], ramp["increment"], t.global_batch_size
    if start >= gbs:
        p.append(f"{name}.start={start}: must be < train.global_batch_size={gbs} (the batch it ramps up to)")
    elif (gbs - start) % inc:
        p.append(
            f"{name}.increment={inc}: must divide train.global_batch_size - start = {gbs} - {start} = "
            f"{gbs - start}"
        )
    unit, unit_text = t.micro_batch_size, f"train.micro_batch_size={t.micro_batch_size}"
    if world_size is not None and par.tp * par.pp > 0 and world_size % (par.tp * par.pp) == 0:
        dp = world_size // (par.tp * par.pp)
        unit, unit_text = unit * dp, f"{unit_text} x dp={dp}"
    for key in ("start", "increment"):
        if ramp[key] % unit:
            p.append(
                f"{name}.{key}={ramp[key]}: must be a multiple of {unit_text} (every step's batch splits "
                "into whole micro batches on every data-parallel rank)"
            )
    if par.pp > 1:
        p.append(
            f"{name} with parallel.pp={par.pp}: not supported; the pipeline engine schedules a fixed number "
            "of micro batches per step (train_batch), so the batch cannot change during the run"
        )
    return p


def _moe_problems(cfg: Config, world_size: int | None) -> list[str]:
    """Switch MoE options and expert parallelism (pretrain/models/moe.py, parallel/expert.py)."""
    m, par = cfg.model, cfg.parallel
    p: list[str] = []
    if not _ints(m.num_experts, m.moe_every, par.ep):
        return p
    if m.num_experts < 0:
        p.append(f"model.num_experts={m.num_experts}: must be >= 0 (0 = dense)")
    if par.ep < 1:
        p.append(f"parallel.ep={par.ep}: must be >= 1")
    if m.num_experts <= 0:
        if par.ep > 1:
            p.append(f"parallel.ep={par.ep}: expert parallelism needs model.num_experts > 0")
        return p
    if m.moe_every < 1:
        p.append(f"model.moe_every={m.moe_every}: must be >= 1")
    for name in ("capacity_factor", "eval_capacity_factor"):
        if _nums(getattr(m, name)) and getattr(m, name) <= 0:
            p.append(f"model.{name}={getattr(m, name)}: must be > 0")
    for name in ("moe_aux_loss_coef", "router_z_loss_coef"):
        if _nums(getattr(m, name)) and getattr(m, name) < 0:
            p.append(f"model.{name}={getattr(m, name)}: must be >= 0")
    if m.family == "bert":
        p.append(
            f"model.num_experts={m.num_experts} with model.family='bert': MoE layers exist for gpt and t5"
        )
    if par.ep >= 1 and m.num_experts % par.ep:
        p.append(f"parallel.ep={par.ep}: must divide model.num_experts={m.num_experts}")
    if _ints(par.tp) and par.tp > 1:
        p.append(
            f"parallel.tp={par.tp} with model.num_experts={m.num_experts}: MoE layers are not tensor-parallel "
            "in this version; use tp=1 and expert parallelism (parallel.ep)"
        )
    if _ints(par.pp) and par.pp > 1:
        p.append(f"parallel.pp={par.pp} with model.num_experts={m.num_experts}: MoE needs pp=1")
    if par.zero_stage == 3:
        p.append(
            f"parallel.zero_stage=3 with model.num_experts={m.num_experts}: DeepSpeed's MoE layer supports "
            "ZeRO stage 0, 1 or 2"
        )
    if world_size is not None and _ints(par.tp, par.pp) and par.tp * par.pp > 0 and par.ep >= 1:
        dp = world_size // (par.tp * par.pp)
        if dp % par.ep:
            p.append(
                f"parallel.ep={par.ep}: must divide the data-parallel degree dp={dp} (world {world_size} / "
                f"tp {par.tp} / pp {par.pp}); experts are split over data-parallel ranks"
            )
    return p


def _pipeline_problems(m: ModelConfig, pp: int) -> list[str]:
    """What pipeline parallelism (parallel/pipeline.py) does not cover for this model."""
    from pretrain.models import OBJECTIVE_MODELS

    p = []
    if m.family not in ("gpt", "bert", "t5", "bart"):
        p.append(
            f"pipeline parallelism is available for model.family gpt, bert, t5 and bart, not {m.family!r}"
        )
    if getattr(m, "share_layers", "none") != "none":
        p.append(f"model.share_layers={m.share_layers!r}: a module shared by layers cannot sit on two stages")
    if m.objective in OBJECTIVE_MODELS:
        p.append(f"model.objective={m.objective!r} builds its own network, which has no pipeline layers")
    if getattr(m, "num_experts", 0):
        p.append("model.num_experts > 0: the experts' auxiliary losses are not carried through a pipeline")
    if getattr(m, "z_loss", 0.0):
        p.append("model.z_loss > 0: the pipeline's last stage computes the plain cross-entropy only")
    blocks = m.num_layers
    if m.family in ("t5", "bart") and _ints(m.num_layers, m.decoder_layers):
        blocks = m.num_layers + m.decoder_layers  # encoder and decoder blocks share the stages
    if _ints(blocks) and blocks < pp:
        p.append(f"model.num_layers={m.num_layers}: fewer Transformer blocks than pipeline stages")
    return p


def _ints(*values: Any) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def _nums(*values: Any) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


# ----------------------------------------------------------------------------- output


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Writes the resolved config as YAML; the file is usable again as `--config`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        yaml.safe_dump(config_to_dict(cfg), fh, sort_keys=False)
    tmp.replace(path)


def config_help() -> str:
    """Every key with its type, default and help line, for `pretrain train --help`."""
    lines = []
    for section, cls in _SECTION_TYPES.items():
        lines.append(f"{section}:")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc,operator]
            tp = _type_name(hints[f.name])
            lines.append(f"  {section}.{f.name} ({tp}, default {default!r}): {f.metadata.get('help', '')}")
    return "\n".join(lines)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(map(str, typing.get_args(tp)))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))
