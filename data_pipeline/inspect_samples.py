"""What a model family sees: an objective applied to the first samples of a train split, measured and decoded.

`inspect_objective` runs the same packing (`PackedSamples`) and objective (`build_objective`) as training,
over the first N samples of the unshuffled train stream, and measures the objective from its outputs:

- gpt: tokens and documents per sample;
- bert: the fraction of eligible (non-special) tokens selected for prediction, and how the selected ones are
  shown (<mask> / a random token / unchanged; a random draw that equals the original counts as unchanged);
- t5: noise density (noise tokens / raw tokens), mean noise-span length, sentinels per sample, and the raw,
  encoder and decoder lengths.

Statistics are plain JSON values; `examples` holds a few decoded samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np

from data_pipeline.loader import PackedSamples, SplitStream
from data_pipeline.manifest import load_manifest
from data_pipeline.objectives import build_objective
from data_pipeline.objectives.mlm import IGNORE_INDEX, resolve_tokenizer_path, special_ids
from data_pipeline.tokenizer import Tokenizer

Family = Literal["gpt", "bert", "t5"]
_BATCH = 64  # samples per objective call
_EXAMPLE_CHARS = 400  # decoded text kept per example field


def _render(tok: Tokenizer, ids: np.ndarray, special: set[int]) -> str:
    """Decode `ids`, spelling special tokens (which sentencepiece drops or hides) as their pieces."""
    parts: list[str] = []
    run: list[int] = []
    for i in ids.tolist():
        if i in special:
            if run:
                parts.append(tok.decode(run))
                run = []
            parts.append(tok.id_to_piece(i))
        else:
            run.append(i)
    if run:
        parts.append(tok.decode(run))
    text = "".join(parts)
    return text if len(text) <= _EXAMPLE_CHARS else text[:_EXAMPLE_CHARS] + " ..."


def _documents_in(raw: np.ndarray, eos_id: int) -> np.ndarray:
    """(n,) number of documents (whole or cut) each raw packed sample (n, L) touches."""
    # Every <eos> except a final one starts another document.
    return 1 + (raw[:, :-1] == eos_id).sum(axis=1)


def inspect_objective(
    shards_dir: str | Path,
    family: Family,
    *,
    seq_len: int,
    samples: int,
    seed: int = 0,
    examples: int = 2,
    split: str = "train",
    **options: Any,
) -> dict[str, Any]:
    """Statistics of `family`'s objective over the first `samples` samples of `split` (at most one epoch),
    plus `examples` decoded samples under the key "examples". `options` go to the objective."""
    if samples < 1:
        raise ValueError(f"samples={samples} must be >= 1")
    record = dict(load_manifest(shards_dir)["tokenizer"])
    record["path"] = str(resolve_tokenizer_path(record["path"], shards_dir))
    tok = Tokenizer(record["path"])
    objective = build_objective(family, seq_len=seq_len, tokenizer=record, seed=seed, **options)
    stream = SplitStream.from_manifest(shards_dir, split)
    packed = PackedSamples(
        stream, sample_len=objective.sample_len, eos_id=int(record["eos_id"]), seed=seed, shuffle=False
    )
    n = min(samples, packed.samples_per_epoch)
    eos_id = int(record["eos_id"])
    special = {int(i) for i in special_ids(record)}
    sentinels = np.asarray(record.get("sentinel_ids", []), dtype=np.int64)

    totals: dict[str, float] = {}

    def add(key: str, value: float) -> None:
        totals[key] = totals.get(key, 0) + float(value)

    shown: list[dict[str, str]] = []
    for lo in range(0, n, _BATCH):
        idx = np.arange(lo, min(lo + _BATCH, n))
        raw = np.stack([packed[int(i)] for i in idx])  # (b, sample_len)
        out = objective(raw, idx)
        add("documents", _documents_in(raw, eos_id).sum())
        if family == "gpt":
            add("tokens", out["input_ids"].size)
        elif family == "bert":
            inp, lab = out["input_ids"], out["labels"]
            sel = lab != IGNORE_INDEX
            add("eligible", (~np.isin(np.where(sel, lab, inp), list(special))).sum())
            add("selected", sel.sum())
            add("masked", (sel & (inp == int(record["mask_id"]))).sum())
            add("kept", (sel & (inp == lab)).sum())
        elif family == "t5":
            inp, lab = out["input_ids"], out["labels"]
            spans = np.isin(inp, sentinels).sum(axis=1)  # (b,)
            add("spans", spans.sum())
            add("noise", (lab.shape[1] - 1) * len(idx) - np.isin(lab, sentinels).sum())
            add("raw_tokens", raw.size)
        for row in range(len(idx)):
            if len(shown) >= examples:
                break
            shown.append(_example(family, tok, special, raw[row], {k: v[row] for k, v in out.items()}))

    stats: dict[str, Any] = {
        "family": family,
        "split": split,
        "samples": n,
        "seq_len": seq_len,
        "sample_len": int(objective.sample_len),
        "documents_per_sample": totals["documents"] / n,
    }
    if family == "gpt":
        stats["tokens_per_sample"] = totals["tokens"] / n
        stats["tokens"] = int(totals["tokens"])
    elif family == "bert":
        selected = totals["selected"]
        stats.update(
            eligible_tokens=int(totals["eligible"]),
            selected_tokens=int(selected),
            selected_fraction=selected / totals["eligible"],
            mask_fraction=totals["masked"] / selected,
            random_fraction=(selected - totals["masked"] - totals["kept"]) / selected,
            keep_fraction=totals["kept"] / selected,
            selected_per_sample=selected / n,
        )
    elif family == "t5":
        stats.update(
            raw_length=int(objective.sample_len),
            inputs_length=int(objective.inputs_length),
            targets_length=int(objective.targets_length),
            noise_density=totals["noise"] / totals["raw_tokens"],
            mean_noise_span_length=totals["noise"] / totals["spans"],
            sentinels_per_sample=totals["spans"] / n,
        )
    stats["examples"] = shown
    return stats


def _example(
    family: Family, tok: Tokenizer, special: set[int], raw: np.ndarray, out: dict[str, np.ndarray]
) -> dict[str, str]:
    if family == "gpt":
        return {"input": _render(tok, out["input_ids"], special)}
    if family == "bert":
        sel = out["labels"] != IGNORE_INDEX
        predicted = " ".join(tok.id_to_piece(int(i)) for i in out["labels"][sel])
        return {
            "original": _render(tok, np.where(sel, out["labels"], out["input_ids"]), special),
            "input": _render(tok, out["input_ids"], special),
            "targets": predicted if len(predicted) <= _EXAMPLE_CHARS else predicted[:_EXAMPLE_CHARS] + " ...",
        }
    return {
        "original": _render(tok, raw, special),
        "input": _render(tok, out["input_ids"][out["attention_mask"] == 1], special),
        "targets": _render(tok, out["labels"], special),
    }


_LABELS = {
    "samples": "samples",
    "seq_len": "sequence length",
    "sample_len": "raw tokens per sample",
    "documents_per_sample": "documents per sample",
    "tokens_per_sample": "tokens per sample",
    "tokens": "tokens",
    "eligible_tokens": "eligible (non-special) tokens",
    "selected_tokens": "selected for prediction",
    "selected_fraction": "selected / eligible",
    "mask_fraction": "selected shown as <mask>",
    "random_fraction": "selected shown as a random token",
    "keep_fraction": "selected shown unchanged",
    "selected_per_sample": "selected per sample",
    "raw_length": "raw length",
    "inputs_length": "encoder inputs length",
    "targets_length": "decoder targets length",
    "noise_density": "noise density",
    "mean_noise_span_length": "mean noise-span length",
    "sentinels_per_sample": "sentinels per sample",
}


def format_report(stats: dict[str, Any]) -> str:
    """Decoded examples, then one statistic per line."""
    lines = [f"objective {stats['family']} on split {stats['split']!r}: first {stats['samples']} samples"]
    for i, ex in enumerate(stats.get("examples", [])):
        lines.append(f"--- example {i}")
        lines.extend(f"{field}: {text}" for field, text in ex.items())
    lines.append("--- statistics")
    for key, label in _LABELS.items():
        if key in stats:
            value = stats[key]
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            lines.append(f"{label + ':':<36} {shown}")
    return "\n".join(lines)
