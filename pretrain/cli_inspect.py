"""`pretrain data inspect`: decoded examples and measured statistics of a model family's objective."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register_inspect(data_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `inspect` verb to the `pretrain data` subparsers; returns its parser."""
    p = data_subparsers.add_parser(
        "inspect",
        help="show what a model family sees: decoded samples and the objective's statistics",
        description="Apply an objective (gpt: causal LM, bert: masked LM, t5: span corruption) to the first "
        "samples of the train split and print decoded examples and measured statistics (BERT: selected "
        "fraction and the mask/random/keep split; T5: noise density, mean span length, sentinels per sample).",
    )
    p.add_argument("--shards", required=True, type=Path, help="shards directory (with manifest.json)")
    p.add_argument("--objective", required=True, choices=["gpt", "bert", "t5"], help="model family")
    p.add_argument(
        "--samples", type=int, default=256, help="samples measured (default 256, at most one epoch)"
    )
    p.add_argument(
        "--seq-len", type=int, default=512, help="model sequence length (T5: encoder inputs; default 512)"
    )
    p.add_argument("--seed", type=int, default=0, help="objective seed (default 0)")
    p.add_argument("--examples", type=int, default=2, help="decoded examples shown (default 2)")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the statistics")
    p.set_defaults(func=cmd_data_inspect)
    return p


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from data_pipeline.inspect_samples import format_report, inspect_objective

    stats = inspect_objective(
        args.shards,
        args.objective,
        seq_len=args.seq_len,
        samples=args.samples,
        seed=args.seed,
        examples=args.examples,
    )
    print(format_report(stats))
    if args.json:
        print(json.dumps({k: v for k, v in stats.items() if k != "examples"}, sort_keys=True))
    return 0
