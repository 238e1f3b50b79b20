"""`pretrain data clean`, and the cleaning / bad-input flags of `pretrain data shard`.

Wired into pretrain/cli.py by ``register_clean(dsub)`` (the data sub-parsers), and for the shard
verb by ``add_shard_cleaning_args(p)`` on its parser plus ``shard_kwargs_from_args(args)`` and
``report_shard(manifest, seconds, as_json=...)`` in ``cmd_data_shard``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

__all__ = [
    "add_shard_cleaning_args",
    "cmd_data_clean",
    "cmd_data_shard",
    "register_clean",
    "report_shard",
    "shard_kwargs_from_args",
    "summary",
]


def _add_common(p: argparse.ArgumentParser, *, clean_flag: bool) -> None:
    if clean_flag:
        p.add_argument(
            "--clean",
            action="store_true",
            help="apply C4 cleaning and dedupe before tokenizing (off by default: every valid document is kept)",
        )
    p.add_argument(
        "--errors",
        choices=["strict", "skip"],
        default=None,
        help="malformed input: stop with FILE:LINE (strict, default) or skip and count by reason",
    )
    p.add_argument("--lenient", action="store_true", help="same as --errors skip")
    p.add_argument(
        "--bad-words", type=Path, default=None, help="file of bad words, one per line (none shipped)"
    )
    p.add_argument(
        "--max-doc-mb",
        type=float,
        default=None,
        help="documents over this many MB of UTF-8 are split or skipped (default: no limit)",
    )
    p.add_argument(
        "--oversize",
        choices=["split", "skip"],
        default="split",
        help="what to do with documents over --max-doc-mb (default split, at line breaks)",
    )
    p.add_argument("--json", action="store_true", help="make the last printed line a JSON summary")


def add_shard_cleaning_args(p: argparse.ArgumentParser) -> None:
    """Flags for `pretrain data shard`: --clean, --errors (with --lenient as its alias), --bad-words,
    --max-doc-mb, --oversize, --json. Call it on the shard parser instead of adding --lenient."""
    _add_common(p, clean_flag=True)


def _errors(args: argparse.Namespace) -> str:
    if args.lenient and args.errors == "strict":
        raise SystemExit("error: --lenient contradicts --errors strict")
    return "skip" if args.lenient else (args.errors or "strict")


def _clean_config(args: argparse.Namespace) -> Any:
    from data_pipeline.clean import CleanConfig

    return CleanConfig(bad_words_path=None if args.bad_words is None else str(args.bad_words))


def _max_bytes(args: argparse.Namespace) -> int | None:
    return None if args.max_doc_mb is None else max(1, int(args.max_doc_mb * 1_000_000))


def shard_kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for ``shard_corpus`` from the flags of :func:`add_shard_cleaning_args`."""
    if args.bad_words is not None and not args.clean:
        raise SystemExit("error: --bad-words needs --clean")
    return {
        "errors": _errors(args),
        "clean": _clean_config(args) if args.clean else None,
        "max_document_bytes": _max_bytes(args),
        "oversize": args.oversize,
    }


def summary(record: dict, seconds: float) -> dict[str, Any]:
    """The one-line JSON summary of a shard manifest or a clean report."""
    tokens = None
    if "totals" in record:
        tokens = sum(t["tokens"] for t in record["totals"].values())
    return {
        "documents_in": record.get("documents_in"),
        "documents_written": record.get("documents_written"),
        "rejected": record.get("rejected", {}),
        "cleaned_away": record.get("cleaning_documents_removed", 0),
        "filtered": record.get("filtered", {}),
        "tokens": tokens,
        "seconds": round(seconds, 3),
    }


def report_shard(manifest: dict, seconds: float, *, out: Path, as_json: bool) -> None:
    """What `pretrain data shard` prints: per-split totals, rejections and cleaning counts, then
    (with ``as_json``) the JSON summary as the last line."""
    for split, tot in manifest["totals"].items():
        print(f"{split}: {tot['shards']} shard(s), {tot['documents']} documents, {tot['tokens']} tokens")
    if manifest.get("rejected"):
        print(f"rejected: {json.dumps(manifest['rejected'])}")
    if manifest.get("filtered"):
        print(f"filtered: {json.dumps(manifest['filtered'])}")
    if manifest.get("cleaning"):
        print(f"cleaning: {json.dumps(manifest['cleaning'])}")
    print(f"manifest: {out / 'manifest.json'}")
    if as_json:
        print(json.dumps(summary(manifest, seconds), sort_keys=True))


def register_clean(dsub: argparse._SubParsersAction) -> None:
    """Add `pretrain data clean` to the data verbs."""
    p = dsub.add_parser(
        "clean",
        help="C4-clean and dedupe a corpus into the same JSON lines format",
        description="Apply C4's cleaning heuristics (T5 paper §2.2: terminal punctuation, >= 5 words per "
        "line, no 1000+ character words, no javascript or policy lines, citation markers removed; pages with "
        '< 3 sentences, "lorem ipsum", "{" or a bad word dropped), exact document dedupe and removal of '
        "repeated 3-sentence spans. Writes OUT/part-NNNNN.json.gz and OUT/clean_report.json (documents "
        "in, written, rejected by reason, removed by rule).",
    )
    p.add_argument("--input", required=True, help="files, directories or globs (comma-separated)")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument(
        "--workers", type=int, default=1, help="cleaning processes (default 1; output is identical)"
    )
    p.add_argument("--docs-per-file", type=int, default=100_000, help="documents per output file")
    _add_common(p, clean_flag=False)
    p.set_defaults(func=cmd_data_clean)


def cmd_data_clean(args: argparse.Namespace) -> int:
    from data_pipeline.clean import CleanError
    from data_pipeline.jobs import clean_corpus
    from data_pipeline.corpus import CorpusError, expand_inputs

    started = time.monotonic()
    try:
        report = clean_corpus(
            expand_inputs(args.input),
            args.out,
            cfg=_clean_config(args),
            errors=_errors(args),  # type: ignore[arg-type]
            workers=args.workers,
            max_document_bytes=_max_bytes(args),
            oversize=args.oversize,
            docs_per_file=args.docs_per_file,
        )
    except (CorpusError, CleanError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"cleaned {report['documents_in']} documents: {report['documents_written']} written to "
        f"{len(report['outputs'])} file(s) in {args.out}"
    )
    if report["rejected"]:
        print(f"rejected: {json.dumps(report['rejected'])}")
    print(f"cleaning: {json.dumps(report['cleaning'])}")
    print(f"report: {args.out / 'clean_report.json'}")
    if args.json:
        print(json.dumps(summary(report, time.monotonic() - started), sort_keys=True))
    return 0


def cmd_data_shard(args: argparse.Namespace) -> int:
    """A drop-in body for pretrain/cli.py's ``cmd_data_shard`` with the flags above: shards, prints
    the totals, and turns a malformed-input stop into ``error: FILE:LINE: reason`` and exit 2."""
    from data_pipeline.corpus import CorpusError, expand_inputs
    from data_pipeline.sharding import shard_corpus

    started = time.monotonic()
    try:
        manifest = shard_corpus(
            expand_inputs(args.input),
            tokenizer_path=args.tokenizer,
            out_dir=args.out,
            workers=args.workers,
            val_fraction=args.val_fraction,
            shard_size_mb=args.shard_size_mb,
            seed=args.seed,
            **shard_kwargs_from_args(args),
        )
    except CorpusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report_shard(manifest, time.monotonic() - started, out=args.out, as_json=args.json)
    return 0
