"""`pretrain embed`: a frozen BERT or T5 encoder's representations of texts, for downstream systems
(Imagen-style: a pretrained text encoder conditions another model).

Input: JSON Lines, one object per line with the text under `--field` (default "text"); blank lines are
skipped. Each text is tokenized with the checkpoint's own `tokenizer.model` and framed as in pretraining:
BERT `<cls> text <sep>`, T5 `text </s>`, truncated to `--max-length` tokens (default model.max_seq_len)
with the framing kept. The encoder (`BERT.encode` / `T5.encode`) runs in eval mode (no dropout) on padded
batches with an attention mask, so padding never changes a text's representation.

Output: `--out FILE` is a NumPy `.npz` archive (readable with `numpy.load` alone) holding
  token_embeddings  float32 (total_tokens, C)  every text's per-token vectors, concatenated in input order
  offsets           int64   (N + 1,)           text i is rows offsets[i]:offsets[i+1]
  input_ids         int64   (total_tokens,)    the token ids those rows encode (framing tokens included)
  pooled            float32 (N, C)             one vector per text: `mean` = mean of its token vectors
                                               (framing tokens included), `cls` = the BERT <cls> vector
and `FILE.json` beside it describes them (checkpoint, step, family, pooling, shapes, truncated count).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.config import Config

POOLING = ("mean", "cls")


class EmbedError(ValueError):
    pass


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed",
        help="write a BERT/T5 encoder's per-token and pooled representations of JSONL texts",
        description="Encode the texts of a JSON Lines file with a BERT or T5 checkpoint's encoder (eval mode) "
        "and write FILE (.npz: token_embeddings concatenated with offsets, input_ids, pooled) plus FILE.json "
        "describing it. The texts are tokenized with the checkpoint's tokenizer.model.",
    )
    p.add_argument(
        "--checkpoint", required=True, type=Path, help="a BERT or T5 checkpoint (RUN/checkpoints/step-N)"
    )
    p.add_argument("--input", required=True, type=Path, help="JSON Lines file, one object per text")
    p.add_argument(
        "--out", required=True, type=Path, help="output .npz file (FILE.json is written beside it)"
    )
    p.add_argument("--field", default="text", help="the JSON field holding the text (default text)")
    p.add_argument("--batch-size", type=int, default=16, help="texts per forward pass (default 16)")
    p.add_argument(
        "--max-length", type=int, default=0, help="tokens per text incl. framing (default max_seq_len)"
    )
    p.add_argument("--pooling", choices=POOLING, default="mean", help="pooled vector (default mean)")
    p.set_defaults(func=cmd_embed)


def read_texts(path: Path, field: str) -> list[str]:
    """The `field` of every non-blank line; errors name the file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"--input {path}: no such file")
    texts = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EmbedError(f"{path}:{n}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict) or field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise EmbedError(f"{path}:{n}: no {field!r} field (--field); found {keys}")
            if not isinstance(record[field], str):
                raise EmbedError(f"{path}:{n}: {field!r} is a {type(record[field]).__name__}, not a string")
            texts.append(record[field])
    if not texts:
        raise EmbedError(f"{path}: no texts (every line is blank)")
    return texts


def frame(ids: list[int], family: str, tokenizer: Any, max_length: int) -> tuple[list[int], bool]:
    """Pretraining's framing, truncated to max_length tokens: -> (ids, whether text was cut)."""
    if family == "bert":
        body = max_length - 2
        return [tokenizer.cls_id, *ids[:body], tokenizer.sep_id], len(ids) > body
    body = max_length - 1
    return [*ids[:body], tokenizer.eos_id], len(ids) > body


@torch.no_grad()
def encode_batches(
    model: Any, sequences: list[list[int]], *, batch_size: int, pad_id: int
) -> list[torch.Tensor]:
    """Each sequence's encoder output (T_i, C), from right-padded batches with an attention mask."""
    out: list[torch.Tensor] = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, s in enumerate(chunk):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        hidden = model.encode(ids, attention_mask=mask)  # (B, T, C)
        out += [hidden[i, : len(s)].float() for i, s in enumerate(chunk)]
    return out


def _encoder_config(checkpoint: Path) -> Config:
    from pretrain.export import _checkpoint_config

    cfg = _checkpoint_config(checkpoint)
    if cfg.model.family not in ("bert", "t5"):
        raise EmbedError(
            f"--checkpoint {checkpoint}: model.family={cfg.model.family!r} has no encoder; "
            "embed needs a BERT or T5 checkpoint"
        )
    return cfg


def embed(
    checkpoint: Path,
    input_path: Path,
    out: Path,
    *,
    field: str = "text",
    batch_size: int = 16,
    max_length: int = 0,
    pooling: str = "mean",
) -> dict[str, Any]:
    """Writes `out` (.npz) and `out`.json; returns the sidecar's content."""
    from data_pipeline.tokenizer import Tokenizer
    from pretrain.evaluate import locate_tokenizer
    from pretrain.export import load_model

    checkpoint = Path(checkpoint)
    cfg = _encoder_config(checkpoint)
    family = cfg.model.family
    if pooling not in POOLING:
        raise EmbedError(f"--pooling {pooling!r}: must be one of {', '.join(POOLING)}")
    if pooling == "cls" and family != "bert":
        raise EmbedError("--pooling cls needs a BERT checkpoint (T5 inputs have no <cls> token); use mean")
    if batch_size <= 0:
        raise EmbedError(f"--batch-size {batch_size}: must be > 0")
    limit = max_length or cfg.model.max_seq_len
    if not 3 <= limit <= cfg.model.max_seq_len:
        raise EmbedError(
            f"--max-length {max_length}: must be in [3, model.max_seq_len={cfg.model.max_seq_len}]"
        )
    texts = read_texts(Path(input_path), field)
    own = checkpoint / "tokenizer.model"
    tokenizer = Tokenizer(own if own.is_file() else locate_tokenizer(cfg, checkpoint=checkpoint))
    model, cfg = load_model(checkpoint)
    if not callable(getattr(model, "encode", None)):
        raise EmbedError(f"--checkpoint {checkpoint}: {type(model).__name__} has no encode(); cannot embed")

    framed = [frame(tokenizer.encode(t), family, tokenizer, limit) for t in texts]
    sequences = [ids for ids, _ in framed]
    hidden = encode_batches(model, sequences, batch_size=batch_size, pad_id=tokenizer.pad_id)
    if pooling == "mean":
        pooled = torch.stack([h.mean(dim=0) for h in hidden])
    else:
        pooled = torch.stack([h[0] for h in hidden])
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as fh:  # a file object: numpy does not append ".npz" to the name
        np.savez(
            fh,
            token_embeddings=torch.cat(hidden).numpy().astype(np.float32),
            offsets=offsets,
            input_ids=np.concatenate([np.array(s, dtype=np.int64) for s in sequences]),
            pooled=pooled.numpy().astype(np.float32),
        )
    meta_path = checkpoint / "meta.json"
    step = json.loads(meta_path.read_text(encoding="utf-8")).get("step") if meta_path.is_file() else None
    sidecar = {
        "format": "tandem-embeddings",
        "version": 1,
        "checkpoint": str(checkpoint),
        "step": step,
        "family": family,
        "input": str(input_path),
        "field": field,
        "texts": len(texts),
        "tokens": int(offsets[-1]),
        "hidden_size": int(pooled.shape[1]),
        "max_length": limit,
        "truncated": sum(cut for _, cut in framed),
        "pooling": pooling,
        "framing": "<cls> text <sep>" if family == "bert" else "text </s>",
        "arrays": {
            "token_embeddings": "float32 (tokens, hidden_size); text i = rows offsets[i]:offsets[i+1]",
            "offsets": "int64 (texts + 1,)",
            "input_ids": "int64 (tokens,)",
            "pooled": "float32 (texts, hidden_size); "
            + ("mean of the text's token vectors" if pooling == "mean" else "the <cls> token's vector"),
        },
    }
    Path(str(out) + ".json").write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    return sidecar


def cmd_embed(args: argparse.Namespace) -> int:
    import sys

    try:
        info = embed(
            args.checkpoint,
            args.input,
            args.out,
            field=args.field,
            batch_size=args.batch_size,
            max_length=args.max_length,
            pooling=args.pooling,
        )
    except EmbedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.out}: {info['texts']} texts, {info['tokens']} tokens, hidden size {info['hidden_size']} "
        f"({info['pooling']} pooling; {info['truncated']} truncated); description in {args.out}.json"
    )
    return 0
