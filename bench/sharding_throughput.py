"""Sharding tokens/s per worker against raw sentencepiece encoding of the same text, and 1 -> 2 workers.

Why: tokenizing is the only real work in sharding; everything Tandem adds around it (streaming gzip
and JSON, bad-input checks, the train/val split, tar writing, sha256, the manifest, optional C4
cleaning) must cost little, or users pay for it on every corpus. One invocation measures, on the same
corpus and tokenizer, in this order:

* **raw sentencepiece**: the texts pre-loaded into memory (not timed), then
  ``SentencePieceProcessor.encode(texts, out_type=int)`` on one thread: the ceiling of one worker;
* **shard, 1 worker**: ``shard_corpus(..., workers=1)`` from the .json.gz files (everything included);
* **shard, 2 workers**: the same with two tokenizer processes (spawn start-up included);
* **shard + clean, 1 worker**: with C4 cleaning and dedupe inline (``--clean``);
* **clean only**: ``clean_corpus`` documents/s (no tokenizing).

Each is repeated ``--repeats`` times and the best run is reported (on a shared machine the best run is
the one least disturbed by other work). Ratios: shard tokens/s per worker ÷ raw tokens/s (target
>= 0.9), and 2-worker ÷ 1-worker tokens/s (target >= 1.8x, which needs two free cores: the main
process reads and parses the corpus while the workers tokenize).

Usage: ``python bench/sharding_throughput.py [--docs 20000] [--repeats 3] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import sentencepiece as spm  # noqa: E402

from data_pipeline.clean import CleanConfig  # noqa: E402
from data_pipeline.jobs import clean_corpus  # noqa: E402
from data_pipeline.corpus import iter_documents  # noqa: E402
from data_pipeline.sample_corpus import write_sample_corpus  # noqa: E402
from data_pipeline.sharding import shard_corpus  # noqa: E402
from data_pipeline.tokenizer import train_tokenizer  # noqa: E402


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=20_000, help="sample corpus documents (default 20000)")
    ap.add_argument("--vocab-size", type=int, default=1024, help="tokenizer vocabulary (default 1024)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best is kept")
    ap.add_argument("--shard-size-mb", type=float, default=1.0, help="shard size (default 1 MB)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep files here (default: a temp dir)")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON line at the end")
    args = ap.parse_args(argv)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_data_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        corpus = write_sample_corpus(work / "corpus", docs=args.docs, seed=0, docs_per_file=2000)
        tok_path = train_tokenizer(corpus, vocab_size=args.vocab_size, out_prefix=work / "tok" / "sp")
        texts = [d.text for d in iter_documents(corpus)]
        text_mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        sp = spm.SentencePieceProcessor(model_file=str(tok_path))
        tokens = sum(len(ids) for ids in sp.encode(texts, out_type=int))
        raw_s = _best(lambda: sp.encode(texts, out_type=int, num_threads=1), args.repeats)

        def shard(workers: int, clean: CleanConfig | None = None) -> float:
            def run() -> None:
                out = work / "shards"
                shutil.rmtree(out, ignore_errors=True)
                shard_corpus(
                    corpus,
                    tokenizer_path=tok_path,
                    out_dir=out,
                    workers=workers,
                    shard_size_mb=args.shard_size_mb,
                    clean=clean,
                )

            return _best(run, args.repeats)

        s1 = shard(1)
        s2 = shard(2)
        s1c = shard(1, CleanConfig())

        def clean_only() -> None:
            out = work / "cleaned"
            shutil.rmtree(out, ignore_errors=True)
            clean_corpus(corpus, out)

        c_s = _best(clean_only, args.repeats)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    raw_tps = tokens / raw_s
    rows = [
        ("raw sentencepiece (1 thread, in memory)", raw_s, raw_tps, raw_tps, 1.0),
        ("shard, 1 worker", s1, tokens / s1, tokens / s1, tokens / s1 / raw_tps),
        ("shard, 2 workers", s2, tokens / s2, tokens / s2 / 2, tokens / s2 / 2 / raw_tps),
        ("shard + C4 clean, 1 worker", s1c, tokens / s1c, tokens / s1c, tokens / s1c / raw_tps),
    ]
    print(
        f"corpus: {args.docs} sample documents, {text_mb:.1f} MB of text, {tokens} tokens "
        f"(vocab {args.vocab_size}); best of {args.repeats}; {os.cpu_count()} CPUs"
    )
    print(f"{'what':<42} {'seconds':>8} {'tokens/s':>10} {'per worker':>11} {'vs raw':>7}")
    for name, sec, tps, per_worker, ratio in rows:
        print(f"{name:<42} {sec:>8.2f} {tps:>10.0f} {per_worker:>11.0f} {ratio:>7.2f}")
    scaling = s1 / s2
    print(f"scaling 1 -> 2 workers: {scaling:.2f}x")
    print(f"clean only (clean_corpus, 1 worker): {args.docs / c_s:.0f} documents/s, {text_mb / c_s:.1f} MB/s")
    result = {
        "docs": args.docs,
        "tokens": tokens,
        "text_mb": round(text_mb, 3),
        "raw_tokens_per_s": round(raw_tps),
        "shard1_tokens_per_s": round(tokens / s1),
        "shard2_tokens_per_s": round(tokens / s2),
        "shard1_clean_tokens_per_s": round(tokens / s1c),
        "ratio_per_worker_1": round(tokens / s1 / raw_tps, 3),
        "ratio_per_worker_2": round(tokens / s2 / 2 / raw_tps, 3),
        "scaling_1_to_2": round(scaling, 3),
        "clean_docs_per_s": round(args.docs / c_s),
    }
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
