"""Fine-tuning pretrained checkpoints on labelled tasks, every parameter updated.

- BERT classification (Devlin et al. 2019, §3.2 and §4.1): the pooled `<cls>` representation (dense + tanh,
  `BERT.pooled`) feeds a new dropout + linear layer; single sentences are `<cls> a <sep>` with token type 0,
  pairs `<cls> a <sep> b <sep>` with type 1 on the second segment. Task files: `{"text", "label"}` or
  `{"text", "text_pair", "label"}`. Metrics: accuracy and macro-F1.
- T5 text-to-text (Raffel et al. 2020, §2.4): the task is named by a prefix in the input
  (`{"input": "summarize: ...", "target": "..."}`), no new layers; trained with teacher forcing, evaluated by
  greedy decoding: exact match and ROUGE-L (F-measure of the longest common subsequence of words).

This is a plain PyTorch loop in one process (AdamW, linear warmup then linear decay as in BERT): it does not
use the DeepSpeed engine, parallel layouts or the training loop's checkpointing yet. With the same seed,
data and machine it is deterministic.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config import Config

IGNORE_INDEX = -100


@dataclass(frozen=True)
class FinetuneOptions:
    epochs: int = 3
    """passes over the training file"""
    lr: float = 5e-5
    """peak learning rate (BERT's fine-tuning range is 2e-5..5e-5 for base-sized models)"""
    batch_size: int = 16
    """examples per optimizer step"""
    seed: int = 0
    """seed of the new head's initialization, dropout and the shuffling of the training examples"""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay (not applied to biases and norms)"""
    warmup_fraction: float = 0.1
    """fraction of the steps with linear warmup from 0; the rest decays linearly to 0"""
    max_len: int = 128
    """input tokens per example (clipped to model.max_seq_len); longer inputs are truncated"""
    max_target_len: int = 64
    """text2text: target tokens per example, and the longest greedy decode"""
    dropout: float = 0.1
    """classify: dropout on the pooled representation before the new linear layer"""
    num_beams: int = 1
    """text2text: beam width of the evaluation decode; 1 is greedy"""

    def problems(self) -> list[str]:
        p = []
        for name in ("epochs", "batch_size", "max_len", "max_target_len", "num_beams"):
            if getattr(self, name) < 1:
                p.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.lr <= 0:
            p.append(f"lr={self.lr} must be > 0")
        if not 0.0 <= self.warmup_fraction < 1.0:
            p.append(f"warmup_fraction={self.warmup_fraction} must be in [0, 1)")
        if not 0.0 <= self.dropout < 1.0:
            p.append(f"dropout={self.dropout} must be in [0, 1)")
        return p


# ----------------------------------------------------------------------------- shared loop


def _param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Biases, norm gains and embeddings of size-1 dims are not decayed, as in BERT's optimizer.
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _batches(n: int, batch_size: int, generator: torch.Generator | None) -> Iterator[list[int]]:
    order = torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def _train(
    module: nn.Module,
    n_train: int,
    loss_of: Callable[[list[int]], torch.Tensor],
    evaluate: Callable[[], dict[str, float]],
    opts: FinetuneOptions,
    log: Callable[[str], None],
) -> list[dict[str, float]]:
    """Epochs of shuffled mini-batches; `evaluate()` after each. Returns the per-epoch records."""
    steps = opts.epochs * math.ceil(n_train / opts.batch_size)
    warmup = int(opts.warmup_fraction * steps)
    optimizer = torch.optim.AdamW(_param_groups(module, opts.weight_decay), lr=opts.lr, foreach=False)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / (warmup + 1) if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup)),
    )
    generator = torch.Generator().manual_seed(opts.seed)
    history = []
    for epoch in range(1, opts.epochs + 1):
        module.train()
        t0, losses = time.perf_counter(), []
        for idx in _batches(n_train, opts.batch_size, generator):
            loss = loss_of(idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        module.eval()
        record = {"epoch": epoch, "train_loss": sum(losses) / len(losses), **evaluate()}
        record["seconds"] = time.perf_counter() - t0
        history.append(record)
        log(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
    return history


def _save(module: nn.Module, cfg: Config, out_dir: Path, info: dict[str, Any]) -> Path:
    """out_dir/model.safetensors (every weight, the new head included), config.yaml, metrics.json."""
    from safetensors.torch import save_file

    from pretrain.config import save_config

    out_dir.mkdir(parents=True, exist_ok=True)
    # Tied weights share storage and safetensors refuses shared storage: store independent copies.
    state = {k: v.detach().contiguous().clone().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt", "producer": "tandem"})
    save_config(cfg, out_dir / "config.yaml")
    path = out_dir / "metrics.json"
    path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- BERT classification


class SequenceClassifier(nn.Module):
    """BERT + dropout + linear on the pooled <cls> representation (Devlin et al. 2019, §4.1)."""

    def __init__(self, bert: nn.Module, num_labels: int, *, dropout: float):
        super().__init__()
        self.bert = bert
        self.drop = nn.Dropout(dropout)
        hidden = int(bert.config.hidden_size)  # type: ignore[union-attr, arg-type]
        self.head = nn.Linear(hidden, num_labels)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        """(B, T) each -> logits (B, num_labels)."""
        hidden = self.bert.encode(input_ids, attention_mask, token_type_ids)  # type: ignore[operator]
        return self.head(self.drop(self.bert.pooled(hidden)))  # type: ignore[operator]


def encode_classification(
    tokenizer: Any, text: str, text_pair: str | None, max_len: int
) -> tuple[list[int], list[int]]:
    """-> (ids, token types): <cls> a <sep> [b <sep>], types 0 up to the first <sep> and 1 after it.

    Too long inputs lose tokens from the end of the longer segment first, so a long first sentence cannot
    push the second out entirely (BERT's truncation)."""
    a = tokenizer.encode(text)
    b = tokenizer.encode(text_pair) if text_pair is not None else None
    room = max_len - (3 if b is not None else 2)
    if room < 2:
        raise ValueError(f"max_len={max_len} leaves no room for text")
    if b is None:
        a = a[:room]
    else:
        while len(a) + len(b) > room:
            if len(a) >= len(b):
                a = a[:-1]
            else:
                b = b[:-1]
    cls, sep = int(tokenizer.cls_id), int(tokenizer.sep_id)
    ids = [cls, *a, sep]
    types = [0] * len(ids)
    if b is not None:
        ids += [*b, sep]
        types += [1] * (len(b) + 1)
    return ids, types


def _pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
    return out


def classification_metrics(pred: Sequence[int], gold: Sequence[int], num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1: the unweighted mean over labels of 2PR/(P+R), a label with no true and no
    predicted example left out of the mean (it has no F1), one never predicted scoring 0."""
    if len(pred) != len(gold) or not gold:
        raise ValueError(f"{len(pred)} predictions for {len(gold)} gold labels")
    acc = sum(p == g for p, g in zip(pred, gold)) / len(gold)
    f1s = []
    for c in range(num_labels):
        tp = sum(p == c and g == c for p, g in zip(pred, gold))
        fp = sum(p == c and g != c for p, g in zip(pred, gold))
        fn = sum(p != c and g == c for p, g in zip(pred, gold))
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": acc, "macro_f1": sum(f1s) / len(f1s)}


def finetune_classify(
    model: nn.Module,
    cfg: Config,
    tokenizer: Any,
    train_rows: Sequence[dict[str, Any]],
    eval_rows: Sequence[dict[str, Any]],
    opts: FinetuneOptions,
    *,
    out_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> tuple[SequenceClassifier, dict[str, Any]]:
    """Fine-tunes a BERT (all parameters) with a new classification head; returns it and the metrics."""
    if cfg.model.family != "bert":
        raise ValueError(
            f"--task classify needs a BERT checkpoint; this one is model.family={cfg.model.family!r}"
        )
    problems = opts.problems()
    if problems:
        raise ValueError("fine-tuning options: " + "; ".join(problems))
    # Labels in sorted order of their text: the index of a label does not depend on the order of the file.
    labels = sorted({str(r["label"]) for r in train_rows})
    index = {lab: i for i, lab in enumerate(labels)}
    unknown = sorted({str(r["label"]) for r in eval_rows} - set(index))
    if unknown:
        raise ValueError(f"evaluation labels {unknown} never occur in the training file (labels: {labels})")
    max_len = min(opts.max_len, int(cfg.model.max_seq_len))

    def encode(rows: Sequence[dict[str, Any]]) -> tuple[list[list[int]], list[list[int]], torch.Tensor]:
        pairs = [encode_classification(tokenizer, r["text"], r.get("text_pair"), max_len) for r in rows]
        gold = torch.tensor([index[str(r["label"])] for r in rows])
        return [p[0] for p in pairs], [p[1] for p in pairs], gold

    tr_ids, tr_types, tr_gold = encode(train_rows)
    ev_ids, ev_types, ev_gold = encode(eval_rows)
    pad = int(tokenizer.pad_id)
    torch.manual_seed(opts.seed)
    clf = SequenceClassifier(model, len(labels), dropout=opts.dropout)

    def forward(ids: list[list[int]], types: list[list[int]]) -> torch.Tensor:
        x = _pad(ids, pad)  # (B, T)
        mask = _pad([[1] * len(r) for r in ids], 0)
        return clf(x, mask, _pad(types, 0))  # (B, L)

    def loss_of(idx: list[int]) -> torch.Tensor:
        logits = forward([tr_ids[i] for i in idx], [tr_types[i] for i in idx])
        return F.cross_entropy(logits, tr_gold[idx])

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        pred: list[int] = []
        losses = 0.0
        for idx in _batches(len(ev_ids), opts.batch_size, None):
            logits = forward([ev_ids[i] for i in idx], [ev_types[i] for i in idx])
            losses += F.cross_entropy(logits, ev_gold[idx], reduction="sum").item()
            pred += logits.argmax(-1).tolist()
        return {
            "eval_loss": losses / len(ev_ids),
            **classification_metrics(pred, ev_gold.tolist(), len(labels)),
        }

    history = _train(clf, len(tr_ids), loss_of, evaluate, opts, log)
    info: dict[str, Any] = {
        "task": "classify",
        "labels": labels,
        "train_examples": len(tr_ids),
        "eval_examples": len(ev_ids),
        **{k: v for k, v in history[-1].items() if k not in ("epoch", "seconds")},
        "history": history,
        "options": asdict(opts),
    }
    if out_dir is not None:
        _save(clf, cfg, Path(out_dir), info)
    return clf, info


# ----------------------------------------------------------------------------- T5 text-to-text


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (Lin 2004) over whitespace-separated words: longest common subsequence based."""
    p, r = prediction.split(), reference.split()
    if not p or not r:
        return float(p == r)
    # One row of the LCS dynamic programme at a time: O(len(p) * len(r)) time, O(len(r)) memory.
    prev = [0] * (len(r) + 1)
    for a in p:
        cur = [0]
        for j, b in enumerate(r):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


@torch.no_grad()
def greedy_decode_t5(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_len: int,
    eos_id: int,
    pad_id: int,
    start_id: int | None = None,
) -> list[list[int]]:
    """Batched greedy decoding from the start token of pretraining (`start_id`; T5's is the pad id, the
    default; BART's is <eos>), each row up to and excluding its
    first <eos>. The encoder runs once; the decoder re-reads its prefix every step (T5 has no cached decode
    path here; targets are short)."""
    encoded = model.encode(input_ids, attention_mask)  # type: ignore[operator]  # (B, S, C)
    start = pad_id if start_id is None else start_id
    out = torch.full((input_ids.shape[0], 1), start, dtype=torch.long, device=input_ids.device)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_len):
        logits = model.decode(out, encoded, attention_mask=attention_mask)  # type: ignore[operator]
        token = logits[:, -1].argmax(-1)  # (B,)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        out = torch.cat([out, token[:, None]], dim=1)
        done |= token == eos_id
        if bool(done.all()):
            break
    rows = []
    for row in out[:, 1:].tolist():
        rows.append(row[: row.index(eos_id)] if eos_id in row else row)
    return rows


@torch.no_grad()
def beam_decode_t5(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    num_beams: int,
    max_len: int,
    eos_id: int,
    pad_id: int,
    start_id: int | None = None,
) -> list[list[int]]:
    """Beam search (`pretrain.generate.beam_search`) per row from the pad start token, each result up to and
    excluding its <eos>. The encoder runs once per row; every beam re-reads its decoder prefix each step."""
    rows = []
    for i in range(input_ids.shape[0]):
        keep = attention_mask[i].bool()
        ids = _beam_decode_row(
            model,
            input_ids[i : i + 1, keep],
            attention_mask[i : i + 1, keep],
            num_beams=num_beams,
            max_len=max_len,
            eos_id=eos_id,
            pad_id=pad_id if start_id is None else start_id,
        )
        rows.append(ids[: ids.index(eos_id)] if eos_id in ids else ids)
    return rows


def _beam_decode_row(
    model: nn.Module,
    src: torch.Tensor,
    src_mask: torch.Tensor,
    *,
    num_beams: int,
    max_len: int,
    eos_id: int,
    pad_id: int,
) -> list[int]:
    from pretrain.generate import beam_search

    encoded = model.encode(src, src_mask)  # type: ignore[operator]  # (1, S, C)
    prefix = torch.full((1, 1), pad_id, dtype=torch.long, device=src.device)  # (K, t) decoder inputs

    def logprobs(rows: torch.Tensor) -> torch.Tensor:
        k = rows.shape[0]
        ctx, mask = encoded.expand(k, -1, -1), src_mask.expand(k, -1)
        logits = model.decode(rows, ctx, attention_mask=mask)[:, -1]  # type: ignore[operator]
        return torch.log_softmax(logits.float(), dim=-1)  # (K, V)

    def step(origin: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        nonlocal prefix
        prefix = torch.cat([prefix[origin], tokens[:, None]], dim=1)
        return logprobs(prefix)

    return beam_search(logprobs(prefix)[0], step, num_beams=num_beams, max_new_tokens=max_len, eos_id=eos_id)


def finetune_text2text(
    model: nn.Module,
    cfg: Config,
    tokenizer: Any,
    train_rows: Sequence[dict[str, Any]],
    eval_rows: Sequence[dict[str, Any]],
    opts: FinetuneOptions,
    *,
    out_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tunes a T5 (all parameters, no new layers) on input -> target pairs; returns it and the metrics."""
    if cfg.model.family not in TASKS["text2text"]:
        raise ValueError(
            f"--task text2text needs a T5 or BART checkpoint; this one is model.family={cfg.model.family!r}"
        )
    problems = opts.problems()
    if problems:
        raise ValueError("fine-tuning options: " + "; ".join(problems))
    eos, pad = int(tokenizer.eos_id), int(tokenizer.pad_id)
    start = eos if cfg.model.family == "bart" else pad  # the decoder start token of pretraining
    max_len = min(opts.max_len, int(cfg.model.max_seq_len))

    def encode(rows: Sequence[dict[str, Any]]) -> tuple[list[list[int]], list[list[int]]]:
        # Both sides end with </s>, as the span-corruption inputs and targets did in pretraining.
        src = [[*tokenizer.encode(r["input"])[: max_len - 1], eos] for r in rows]
        tgt = [[*tokenizer.encode(r["target"])[: opts.max_target_len - 1], eos] for r in rows]
        return src, tgt

    tr_src, tr_tgt = encode(train_rows)
    ev_src, ev_tgt = encode(eval_rows)
    torch.manual_seed(opts.seed)

    def loss_sum(src: list[list[int]], tgt: list[list[int]]) -> tuple[torch.Tensor, int]:
        x = _pad(src, pad)
        mask = _pad([[1] * len(r) for r in src], 0)
        labels = _pad(tgt, IGNORE_INDEX)  # (B, U)
        # Teacher forcing: the decoder reads the target shifted right behind the start token.
        dec_in = _pad([[start, *t[:-1]] for t in tgt], pad)
        logits = model(x, dec_in, attention_mask=mask)  # (B, U, V)
        loss = F.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return loss, int((labels != IGNORE_INDEX).sum())

    def loss_of(idx: list[int]) -> torch.Tensor:
        total, n = loss_sum([tr_src[i] for i in idx], [tr_tgt[i] for i in idx])
        return total / n

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        total, count, exact, rouge = 0.0, 0, 0, 0.0
        for idx in _batches(len(ev_src), opts.batch_size, None):
            src = [ev_src[i] for i in idx]
            s, n = loss_sum(src, [ev_tgt[i] for i in idx])
            total, count = total + s.item(), count + n
            x, mask = _pad(src, pad), _pad([[1] * len(r) for r in src], 0)
            if opts.num_beams > 1:
                decoded = beam_decode_t5(
                    model,
                    x,
                    mask,
                    num_beams=opts.num_beams,
                    max_len=opts.max_target_len,
                    eos_id=eos,
                    pad_id=pad,
                    start_id=start,
                )
            else:
                decoded = greedy_decode_t5(
                    model, x, mask, max_len=opts.max_target_len, eos_id=eos, pad_id=pad, start_id=start
                )
            for i, ids in zip(idx, decoded):
                text, ref = tokenizer.decode(ids).strip(), str(eval_rows[i]["target"]).strip()
                exact += text == ref
                rouge += rouge_l(text, ref)
        n_ev = len(ev_src)
        return {"eval_loss": total / count, "exact_match": exact / n_ev, "rouge_l": rouge / n_ev}

    history = _train(model, len(tr_src), loss_of, evaluate, opts, log)
    info: dict[str, Any] = {
        "task": "text2text",
        "train_examples": len(tr_src),
        "eval_examples": len(ev_src),
        **{k: v for k, v in history[-1].items() if k not in ("epoch", "seconds")},
        "history": history,
        "options": asdict(opts),
    }
    if out_dir is not None:
        _save(model, cfg, Path(out_dir), info)
    return model, info


# task -> the model families it fine-tunes
TASKS: dict[str, tuple[str, ...]] = {"classify": ("bert",), "text2text": ("t5", "bart")}
