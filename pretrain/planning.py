"""Glue between Tandem configs and the layout planner in `parallel/memory.py` (which never imports pretrain).

`model_shape` turns a `ModelConfig` into the plain numbers the estimator takes, counting parameters on a
model built on the meta device so the counts are exact for every option (GQA, SwiGLU, biases, tying).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from parallel.memory import Hardware, Layout, ModelShape, Precision, SearchResult, search_layouts
from pretrain.config import Config, ModelConfig, load_config, resolve_preset

GPT2_VOCAB = 50257  # GPT-2/GPT-3 BPE vocabulary, used when a model preset leaves vocab_size at 0


def model_shape(cfg: ModelConfig, *, seq_len: int) -> ModelShape:
    """Per-block, embedding, head and final-norm parameter counts of `cfg` (built on the meta device)."""
    import torch

    from pretrain.models import build_model

    if cfg.vocab_size <= 0:
        raise ValueError(f"model.vocab_size={cfg.vocab_size}: must be set (> 0) to plan a layout")
    if cfg.family != "gpt":
        raise ValueError(f"model.family={cfg.family!r}: the planner models decoder-only (gpt) stacks only")
    # One block is enough: the others are identical, and the estimator multiplies by num_layers.
    with torch.device("meta"):
        model = build_model(dataclasses.replace(cfg, num_layers=1))
    per_layer = sum(p.numel() for p in model.blocks[0].parameters())  # type: ignore[index,union-attr]
    embed = sum(p.numel() for n, p in model.named_parameters() if "embed" in n)
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("lm_head"))
    final_norm = sum(p.numel() for n, p in model.named_parameters() if n.startswith("final_norm"))
    return ModelShape(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_heads=cfg.num_heads,
        vocab_size=cfg.vocab_size,
        seq_len=seq_len,
        params_per_layer=per_layer,
        embedding_params=embed,
        head_params=head,
        final_norm_params=final_norm,
        dropout=cfg.dropout > 0,
    )


def load_model_for_planning(
    model: str | Path, *, vocab_size: int | None = None, seq_len: int | None = None
) -> tuple[Config, int, bool]:
    """A run config (YAML with sections) or a model preset (name or configs/models file) -> (Config,
    seq_len, is_run_config). Presets get the GPT-2 vocabulary and their max_seq_len unless told otherwise."""
    path = Path(model)
    is_run = False
    if path.is_file():
        import yaml

        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        is_run = isinstance(raw, dict) and "model" in raw
    overrides = ["data.shards=unused-for-planning"]
    if is_run:
        cfg = load_config(path, overrides, validate=False)
    else:
        preset = str(path) if path.is_file() else str(resolve_preset(str(model)))
        cfg = load_config(None, [*overrides, f"model.preset={preset}"], validate=False)
    if vocab_size:
        cfg.model.vocab_size = vocab_size
    elif cfg.model.vocab_size <= 0:
        from parallel.tensor_plan import pad_vocab_size

        cfg.model.vocab_size = pad_vocab_size(GPT2_VOCAB, max(1, cfg.model.make_vocab_size_divisible_by))
    if seq_len is None:
        seq_len = cfg.data.seq_len if is_run else cfg.model.max_seq_len
    return cfg, seq_len, is_run


def plan_layouts(
    cfg: Config,
    *,
    seq_len: int,
    num_gpus: int,
    hardware: Hardware,
    global_batch_size: int,
    precision: Precision = "bf16",
    allow_offload: bool = False,
    loss_chunk_size: int = 0,
) -> tuple[ModelShape, SearchResult]:
    shape = model_shape(cfg.model, seq_len=seq_len)
    result = search_layouts(
        shape,
        hardware,
        num_gpus=num_gpus,
        global_batch_size=global_batch_size,
        precision=precision,
        allow_offload=allow_offload,
        loss_chunk_size=loss_chunk_size,
    )
    return shape, result


def format_table(result: SearchResult, *, top: int = 10) -> str:
    """The best `top` layouts, one per line, with the estimate behind each."""
    head = f"{'#':>3} {'tp':>3} {'pp':>3} {'dp':>5} {'zero':>4} {'mbs':>3} {'m':>5} {'sp':>3} {'recompute':>9} {'offload':>7} "
    head += f"{'GB/GPU':>7} {'tok/s':>10} {'MFU':>5}  why"
    lines = [head]
    for i, c in enumerate(result.candidates[:top], start=1):
        lay = c.layout
        lines.append(
            f"{i:>3} {lay.tp:>3} {lay.pp:>3} {lay.dp:>5} {lay.zero_stage:>4} {lay.micro_batch_size:>3} "
            f"{lay.num_micro_batches:>5} {'y' if lay.sequence_parallel else 'n':>3} {lay.recompute:>9} {_offload(lay):>7} "
            f"{c.memory.total / 1e9:>7.1f} {c.tokens_per_s:>10.3g} {c.mfu:>5.2f}  {'; '.join(c.reasons)}"
        )
    return "\n".join(lines)


def _offload(layout: Layout) -> str:
    if layout.offload_params:
        return "opt+par"
    return "opt" if layout.offload_optimizer else "-"
