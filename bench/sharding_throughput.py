"""Sharding documents/s per worker against the work's own floor, 1 -> 2 worker scaling, and the CPU cost
of every stage of a cleaning job.

Why: a task of ``pretrain data shard`` reads its input file, parses the JSON, tokenizes and writes the
ids; everything Tandem adds around that (bad-input checks, the train/val split, tar members, sha256,
markers, the manifest) must cost little, or users pay for it on every corpus. The *floor* is a minimal
loop over the same files in one process: ``gzip`` + ``json.loads`` + ``SentencePieceProcessor.encode``
(batches of 256 as the shard writer's, one thread) + writing the ids as uint16 to a file. One invocation measures, in order:

* **floor**: that loop, documents/s;
* **shard, 1 worker**: ``shard_corpus(..., workers=1)``, everything included (goal: >= 0.9 of the floor);
* **shard, 2 workers**: the same on two processes (goal: >= 1.8x one worker on two idle cores), with the
  user+sys CPU seconds of the run and its children, so a slow wall time can be told from a busy machine;
* **shard + clean, 1 and 2 workers**: C4 cleaning and dedupe inside the tasks, and the CPU seconds per
  million documents of each stage (read, dedupe, write, merge), summed from the tasks' markers.

Each measurement is repeated ``--repeats`` times and the best run is kept (on a shared machine the best
run is the one least disturbed). ``--json`` prints the figures as one JSON line at the end.

Usage: ``python bench/sharding_throughput.py [--docs 40000] [--repeats 3] [--json]``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import sentencepiece as spm  # noqa: E402

from data_pipeline.clean import CleanConfig  # noqa: E402
from data_pipeline.jobs import shard_corpus  # noqa: E402
from data_pipeline.pipeline import ENCODE_BATCH, WORK_DIR  # noqa: E402
from data_pipeline.sample_corpus import write_sample_corpus  # noqa: E402
from data_pipeline.tokenizer import train_tokenizer  # noqa: E402


def _cpu_s() -> float:
    """user + sys seconds of this process and its waited-for children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _best(fn, repeats: int) -> tuple[float, float]:
    """(best wall seconds, CPU seconds of that run)."""
    runs = []
    for _ in range(repeats):
        c, t = _cpu_s(), time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t, _cpu_s() - c))
    return min(runs)


def floor_loop(files: list[Path], model: Path, out: Path) -> int:
    """The minimal loop: gunzip + JSON parse + encode (batches of ENCODE_BATCH) + write the ids."""
    sp = spm.SentencePieceProcessor(model_file=str(model))
    docs = 0
    with open(out, "wb") as f:
        for path in files:
            with gzip.open(path, "rt", encoding="utf-8") as lines:
                batch = []
                for line in lines:
                    batch.append(json.loads(line)["text"])
                    if len(batch) == ENCODE_BATCH:
                        for ids in sp.encode(batch, out_type=int, num_threads=1):
                            f.write(np.asarray(ids, dtype=np.uint16).tobytes())
                        docs += len(batch)
                        batch = []
                for ids in sp.encode(batch, out_type=int, num_threads=1):
                    f.write(np.asarray(ids, dtype=np.uint16).tobytes())
                docs += len(batch)
    return docs


def stage_cpu(out: Path) -> dict[str, float]:
    """CPU seconds of each stage: the sum of its tasks' ``cpu_s`` (recorded in their done markers)."""
    totals = {}
    for stage in ("read", "dedupe", "write", "merge"):
        markers = list((out / WORK_DIR / stage / "done").glob("*.json"))
        if markers:
            totals[stage] = sum(json.loads(p.read_text())["cpu_s"] for p in markers)
    return totals


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=40_000, help="sample corpus documents (default 40000)")
    ap.add_argument(
        "--docs-per-file", type=int, default=10_000, help="documents per input file (default 10000)"
    )
    ap.add_argument("--vocab-size", type=int, default=1024, help="tokenizer vocabulary (default 1024)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best is kept")
    ap.add_argument(
        "--shard-size-mb", type=float, default=64.0, help="shard size (default 64 MB, the CLI default)"
    )
    ap.add_argument("--workdir", type=Path, default=None, help="keep files here (default: a temp dir)")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON line at the end")
    args = ap.parse_args(argv)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_data_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        corpus = write_sample_corpus(
            work / "corpus", docs=args.docs, seed=0, docs_per_file=args.docs_per_file
        )
        tok_path = train_tokenizer(corpus, vocab_size=args.vocab_size, out_prefix=work / "tok" / "sp")
        text_mb = sum(p.stat().st_size for p in corpus) / 1e6

        floor = _best(lambda: floor_loop(corpus, tok_path, work / "floor.bin"), args.repeats)

        def shard(workers: int, clean: CleanConfig | None = None) -> tuple[float, float]:
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

        s1, s2 = shard(1), shard(2)
        manifest = json.loads((work / "shards" / "manifest.json").read_text())
        tokens = sum(t["tokens"] for t in manifest["totals"].values())
        c1, c2 = shard(1, CleanConfig()), shard(2, CleanConfig())
        per_stage = stage_cpu(work / "shards")  # the last run: clean, 2 workers
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    n = args.docs
    rows = [
        ("floor: gunzip+json+encode+write, 1 process", floor),
        ("shard, 1 worker", s1),
        ("shard, 2 workers", s2),
        ("shard + C4 clean/dedupe, 1 worker", c1),
        ("shard + C4 clean/dedupe, 2 workers", c2),
    ]
    print(
        f"corpus: {n} sample documents in {len(corpus)} .json.gz files ({text_mb:.1f} MB compressed), "
        f"vocab {args.vocab_size}; best of {args.repeats}; {os.cpu_count()} CPUs"
    )
    print(f"{'what':<44} {'wall s':>7} {'cpu s':>7} {'docs/s':>9} {'vs floor':>9}")
    for name, (wall, cpu) in rows:
        print(f"{name:<44} {wall:>7.2f} {cpu:>7.2f} {n / wall:>9.0f} {floor[0] / wall:>9.2f}")
    ratio = floor[0] / s1[0]
    scaling, scaling_clean = s1[0] / s2[0], c1[0] / c2[0]
    print(f"per-worker throughput vs floor (1 worker): {ratio:.2f} (goal >= 0.9)")
    print(f"scaling 1 -> 2 workers: {scaling:.2f}x plain, {scaling_clean:.2f}x with cleaning (goal >= 1.8x)")
    print(
        f"{tokens} tokens ({tokens / n:.0f} per document). CPU seconds by stage (clean + dedupe, 2 workers):"
    )
    print(f"  {'stage':<7} {'per M docs':>10} {'per B tokens':>13}")
    for stage, cpu in per_stage.items():
        print(f"  {stage:<7} {cpu * 1e6 / n:>10.0f} {cpu * 1e9 / tokens:>13.0f}")
    plain_cpu = s1[1]
    print(
        f"  {'plain shard, whole run (1 worker)':<34} {plain_cpu * 1e6 / n:>10.0f} per M docs, {plain_cpu * 1e9 / tokens:.0f} per B tokens"
    )
    result = {
        "docs": n,
        "files": len(corpus),
        "floor_docs_per_s": round(n / floor[0]),
        "shard1_docs_per_s": round(n / s1[0]),
        "shard2_docs_per_s": round(n / s2[0]),
        "clean1_docs_per_s": round(n / c1[0]),
        "clean2_docs_per_s": round(n / c2[0]),
        "ratio_vs_floor_1": round(ratio, 3),
        "scaling_1_to_2": round(scaling, 3),
        "scaling_1_to_2_clean": round(scaling_clean, 3),
        "cpu_s": {name: round(cpu, 2) for name, (_, cpu) in rows},
        "tokens": tokens,
        "stage_cpu_s_per_million_docs": {k: round(v * 1e6 / n) for k, v in per_stage.items()},
        "stage_cpu_s_per_billion_tokens": {k: round(v * 1e9 / tokens) for k, v in per_stage.items()},
    }
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
