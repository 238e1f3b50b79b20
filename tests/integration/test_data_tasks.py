"""Data preparation as tasks over input files (issue 21): byte-identical output for any number of local
workers or dedupe buckets, equal to the single-process pass (tests/oracle) document for document, with
the corpus-order first copy of every repeated span kept; and memory that does not grow with the corpus.

The Slurm executor runs the same tasks (tests/integration/test_data_slurm.py).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from data_pipeline.clean import CleanConfig, split_sentences
from data_pipeline.jobs import clean_corpus, shard_corpus
from data_pipeline.sample_corpus import write_sample_corpus
from data_pipeline.tokenizer import train_tokenizer
from tests.integration.test_data_scale import LIMIT, _faulty_corpus
from tests.oracle.serial_clean import serial_clean

REPO = Path(__file__).resolve().parents[2]
LENIENT = {"errors": "skip", "max_document_bytes": LIMIT, "oversize": "skip"}
PIECE_MB = 0.05  # b.jsonl (~150 kB, uncompressed) is cut into three pieces at line boundaries


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "url": f"https://{path.stem}.example/{i}"}) + "\n"
                            for i, t in enumerate(texts)))  # fmt: skip
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The faulty corpus of test_data_scale (bad records of every kind, pages cleaning removes, an
    exact duplicate page, a truncated .gz, a .jsonl larger than a piece) plus a file whose pages
    repeat 3-sentence spans of pages in other files and in itself, and copy a page of the first file."""
    root = tmp_path_factory.mktemp("tasks_corpus")
    files, base = _faulty_corpus(root)
    borrowed = [split_sentences(doc["text"]) for doc in base[150:160]]  # pages of b.jsonl
    fresh = [f"Fresh sentence number {i} stands here alone." for i in range(40)]
    pages = []
    for i, sents in enumerate(borrowed):
        if len(sents) < 4:
            continue
        span = " ".join(sents[1:4])
        pages.append(f"{fresh[2 * i]} {span}\n{fresh[2 * i + 1]} {fresh[(2 * i + 7) % 40]} {span}")
    pages.append(base[3]["text"])  # a page of a.jsonl.gz again
    return [*files, _jsonl(root / "d.jsonl", pages)]


def _digests(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file() and not p.name.startswith(".") and p.name != "clean_report.json"
    }


def _cleaned_records(out: Path, report: dict) -> list[dict]:
    return [
        json.loads(line)
        for o in report["outputs"]
        for line in gzip.decompress((out / o["path"]).read_bytes()).splitlines()
    ]


def test_clean_is_byte_identical_and_equals_the_serial_pass(corpus: list[Path], tmp_path: Path) -> None:
    records, cleaning, rejected, hashes = serial_clean(corpus, CleanConfig(), **LENIENT)
    assert (
        cleaning["span_sentences_removed"] >= 20 and cleaning["page_duplicate"] == 2
    )  # the dedupe is exercised
    runs = {}
    for workers, buckets in ((1, 1), (2, 5), (2, 16)):
        out = tmp_path / f"w{workers}b{buckets}"
        report = clean_corpus(
            corpus, out, workers=workers, buckets=buckets, piece_mb=PIECE_MB, docs_per_file=50, **LENIENT
        )
        assert _cleaned_records(out, report) == records
        assert report["cleaning"] == dict(sorted(cleaning.items())) and report["rejected"] == dict(
            sorted(rejected.items())
        )
        assert report["dedupe_hashes"] == hashes
        runs[workers, buckets] = (_digests(out), {k: v for k, v in report.items() if k != "seconds"})
    first = next(iter(runs.values()))
    assert all(r == first for r in runs.values())
    # Outputs are named after the input file and piece: b.jsonl (file 1) came in three pieces.
    assert {n.split("-")[1] for n in first[0]} == {"00000", "00001", "00002", "00003"}
    assert sorted({n[:15] for n in first[0] if n.startswith("part-00001-")}) == [
        "part-00001-0000", "part-00001-0001", "part-00001-0002"
    ]  # fmt: skip


def test_shards_are_byte_identical_for_any_workers_and_buckets(corpus: list[Path], tmp_path: Path) -> None:
    tok = train_tokenizer(
        write_sample_corpus(tmp_path / "tokc", docs=300, seed=1), vocab_size=512, out_prefix=tmp_path / "sp"
    )
    results = []
    for workers, buckets in ((1, 1), (2, 7)):
        out = tmp_path / f"s{workers}"
        manifest = shard_corpus(
            corpus,
            tokenizer_path=tok,
            out_dir=out,
            workers=workers,
            buckets=buckets,
            piece_mb=PIECE_MB,
            shard_size_mb=0.02,
            val_fraction=0.1,
            clean=CleanConfig(),
            **LENIENT,
        )
        results.append((_digests(out), manifest))
    assert results[0] == results[1]
    digests, manifest = results[0]
    assert {s["name"]: s["sha256"] for s in manifest["shards"]} == {
        n: d for n, d in digests.items() if n.endswith(".tar")
    }
    assert manifest["documents_in"] == (
        manifest["documents_written"]
        + sum(manifest["rejected"].values())
        + manifest["cleaning_documents_removed"]
        + sum(manifest["filtered"].values())
    )


def test_the_corpus_order_first_copy_of_a_span_survives(tmp_path: Path) -> None:
    """A span in file 1 (late in a large file, so its task ends last) and again in file 3 (whose small
    task ends first), repeated inside one page of file 3 and again later in file 1: only file 1's first
    copy stays, for any number of workers and buckets."""
    span = "The north gate opens at dawn. Traders wait in a long line. Guards check every cart."
    filler = [f"Line {i} tells a plain story here." for i in range(2000)]
    f0 = _jsonl(
        tmp_path / "f0.jsonl", ["Nothing in this page repeats at all. It has three sentences. All are new."]
    )
    f1_pages = [f"{filler[i]} {filler[i + 1]} {filler[i + 2]}" for i in range(0, 1500, 3)]
    f1_pages.append(f"Before the span comes this. {span} After the span comes that.")
    f1_pages.append(f"Again the span appears here. {span} And then it ends now.")
    f1 = _jsonl(tmp_path / "f1.jsonl", f1_pages)
    f2 = _jsonl(
        tmp_path / "f2.jsonl", ["Unrelated words make this page. Nothing else to see. The end is here."]
    )
    f3 = _jsonl(
        tmp_path / "f3.jsonl", [f"Start of file three here. {span} Middle of it here. {span} Close it."]
    )
    inputs = [f0, f1, f2, f3]
    expected, _, _, _ = serial_clean(inputs, CleanConfig())
    kept = [r["text"] for r in expected if "north gate" in r["text"]]
    assert kept == [f"Before the span comes this. {span} After the span comes that."]
    for workers, buckets in ((1, 1), (2, 3), (2, 8)):
        out = tmp_path / f"o{workers}{buckets}"
        report = clean_corpus(inputs, out, workers=workers, buckets=buckets, piece_mb=0.02)
        assert _cleaned_records(out, report) == expected


# ------------------------------------------------------------------------------------------ memory
_STAGE_CHILD = textwrap.dedent(
    """
    import resource, subprocess, sys
    subprocess.run([sys.executable, "-m", "data_pipeline.executors", *sys.argv[1:]], check=True)
    print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    """
)


def _stage_peaks_kb(corpus_dir: Path, tokenizer: Path, out: Path, buckets: int) -> dict[str, int]:
    """Peak RSS of each stage: its tasks run one after another in one process (the largest task
    sets the peak); a wrapper process per stage, since RUSAGE_CHILDREN keeps the maximum ever seen."""
    from data_pipeline.jobs import prepare_job
    from data_pipeline.pipeline import Job

    prepare_job("shard", sorted(corpus_dir.glob("*.json.gz")), out, tokenizer_path=tokenizer,
                shard_size_mb=0.5, clean=CleanConfig(), buckets=buckets)  # fmt: skip
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    peaks = {}
    for stage, _ in Job.load(out).stages():
        proc = subprocess.run([sys.executable, "-c", _STAGE_CHILD, str(out), stage, "--stride", "1", "--offset", "0"],
                              capture_output=True, text=True, check=True, cwd=REPO, env=env, timeout=600)  # fmt: skip
        peaks[stage] = int(proc.stdout.strip().splitlines()[-1])
    return peaks


@pytest.mark.slow
def test_peak_memory_of_every_stage_is_flat_in_the_corpus_size(tmp_path: Path) -> None:
    small = write_sample_corpus(tmp_path / "small", docs=4000, seed=0, docs_per_file=1000)
    write_sample_corpus(tmp_path / "large", docs=40_000, seed=0, docs_per_file=1000)
    tok = train_tokenizer(small, vocab_size=1024, out_prefix=tmp_path / "sp")
    # At a fixed bucket size (buckets grow with the corpus, as a user would set them), every stage's
    # task handles the same amount of data whatever the corpus size.
    peaks = {
        size: _stage_peaks_kb(tmp_path / size, tok, tmp_path / f"out_{size}", buckets)
        for size, buckets in (("small", 4), ("large", 40))
    }
    print({size: {k: f"{v / 1024:.1f} MiB" for k, v in p.items()} for size, p in peaks.items()})
    # Every task's memory is set by the piece size, the bucket size (and the merge budget, which caps
    # it) and the spill sizes, never by the corpus: 10x the corpus may cost at most 10% more at any stage.
    for stage, small_kb in peaks["small"].items():
        assert peaks["large"][stage] <= 1.1 * small_kb, (stage, peaks)
