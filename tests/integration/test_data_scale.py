"""The data pipeline end to end on a corpus with every kind of injected fault, and its memory bound.

Acceptance of issue 8: lenient counts equal the injected numbers exactly and reconcile
(documents in = written + rejected by reason + removed by cleaning); strict mode names the file and
line; cleaning inline in `shard` gives identical shards for 1 and 2 workers; sharding 10x the sample
keeps peak memory within 1.2x (slow; now per stage in test_data_tasks.py).
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from data_pipeline.clean import pages_removed
from data_pipeline.corpus import CorpusError, iter_documents
from data_pipeline.jobs import clean_corpus
from data_pipeline.sample_corpus import iter_sample_documents, write_sample_corpus
from data_pipeline.sharding import shard_corpus
from data_pipeline.tokenizer import train_tokenizer
from pretrain.cli_data_clean import add_shard_cleaning_args, register_clean, shard_kwargs_from_args

REPO = Path(__file__).resolve().parents[2]
LIMIT = 4000  # bytes; the injected oversize documents are larger, no sample document is

# Malformed records (raw JSON lines) by the reason lenient mode must count them under.
FAULTS: dict[str, list[bytes]] = {
    "bad_json": [b'{"text": "unterminated', b"{broken", b'{"text": "x",}'],
    "not_object": [b"[1, 2, 3]", b'"a string"'],
    "missing_text": [b'{"url": "https://x.example/"}', b'{"text": null}', b'{"text": 42}'],
    "bad_metadata": [b'{"text": "fine text here.", "url": 7}'],
    "bad_utf8": [b'{"text": "caf\xe9 au lait"}', b'{"text": "\xff\xfe"}'],
    "nul_byte": [b'{"text": "raw \x00 nul"}', b'{"text": "escaped \\u0000 nul"}'],
    "empty_text": [b'{"text": ""}', b'{"text": "  \\n\\t "}'],
    "oversize": [json.dumps({"text": "Big line of words here. " * 400}).encode()],
}
# Well-formed pages that cleaning removes, by the rule that must count them.
GOOD = "The river runs past the old mill every spring. Farmers bring grain to the market. Children play near the water."
CLEANED_AWAY = {
    "page_lorem_ipsum": [GOOD + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit."],
    "page_curly_brace": [GOOD + "\nThe code reads function f() { return 1; } in the end."],
    "page_too_few_sentences": ["Home\nAbout us\nContact", "Only one sentence has five words here."],
}


def _faulty_corpus(root: Path, docs: int = 300) -> tuple[list[Path], list[dict]]:
    """Sample documents with every fault interleaved, in a .jsonl.gz, a .jsonl and a truncated .gz."""
    root.mkdir(parents=True, exist_ok=True)
    base = list(iter_sample_documents(docs=docs, seed=0))
    injected = [line for lines in FAULTS.values() for line in lines]
    injected += [json.dumps({"text": t}).encode() for pages in CLEANED_AWAY.values() for t in pages]
    injected.append(json.dumps(base[5]).encode())  # an exact duplicate of an earlier page
    lines: list[bytes] = []
    step = max(1, len(base) // (len(injected) + 1))
    for i, rec in enumerate(base):
        lines.append(json.dumps(rec).encode())
        if i % step == step - 1 and injected:
            lines.append(injected.pop(0))
    lines += injected
    half = len(lines) // 2
    a = root / "a.jsonl.gz"
    a.write_bytes(gzip.compress(b"\n".join(lines[:half]) + b"\n", mtime=0))
    b = root / "b.jsonl"
    b.write_bytes(b"\n".join(lines[half:]) + b"\n")
    # A truncated .gz whose own documents are plain sample pages (counted as one corrupt_gzip).
    others = iter_sample_documents(docs=200, seed=1)  # another seed: no duplicates of the pages above
    tail = gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in others), mtime=0)
    c = root / "c.jsonl.gz"
    c.write_bytes(tail[: len(tail) * 2 // 3])
    return [a, b, c], base


def _expected_rejected() -> Counter:
    want = Counter({reason: len(lines) for reason, lines in FAULTS.items()})
    want["corrupt_gzip"] = 1
    return want


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return _faulty_corpus(tmp_path_factory.mktemp("faulty"))[0]


def test_lenient_clean_counts_reconcile_exactly(corpus: list[Path], tmp_path: Path) -> None:
    report = clean_corpus(corpus, tmp_path / "out", errors="skip", max_document_bytes=LIMIT, oversize="skip")
    assert Counter(report["rejected"]) == _expected_rejected()
    cleaning = Counter(report["cleaning"])
    # The sample pages pass every rule, so the page removals are exactly the injected ones.
    assert {k: v for k, v in cleaning.items() if k.startswith("page_")} == {
        **{rule: len(pages) for rule, pages in CLEANED_AWAY.items()},
        "page_duplicate": 1,
    }
    assert report["documents_in"] == (
        report["documents_written"] + sum(report["rejected"].values()) + pages_removed(cleaning)
    )
    written = [
        json.loads(line)
        for out in report["outputs"]
        for line in gzip.decompress((tmp_path / "out" / out["path"]).read_bytes()).splitlines()
    ]
    assert len(written) == report["documents_written"]
    assert set(written[0]) == {"text", "url", "timestamp"}  # C4's format
    # The report names every input with its size and sha256.
    assert [i["path"] for i in report["inputs"]] == [str(p) for p in corpus]
    assert all(len(i["sha256"]) == 64 for i in report["inputs"])
    assert (
        json.loads((tmp_path / "out" / "clean_report.json").read_text())["documents_in"]
        == report["documents_in"]
    )


def test_clean_output_is_independent_of_workers(corpus: list[Path], tmp_path: Path) -> None:
    kw = {"errors": "skip", "max_document_bytes": LIMIT, "oversize": "skip", "docs_per_file": 100}
    one = clean_corpus(corpus, tmp_path / "w1", workers=1, **kw)
    two = clean_corpus(corpus, tmp_path / "w2", workers=2, **kw)
    assert one["output_sha256"] == two["output_sha256"] and len(one["outputs"]) > 1
    assert one["cleaning"] == two["cleaning"] and one["rejected"] == two["rejected"]


def test_strict_mode_names_file_and_line(corpus: list[Path], tmp_path: Path) -> None:
    for reason, lines in FAULTS.items():
        if reason == "empty_text":
            continue  # skipped and counted in both modes
        path = tmp_path / f"{reason}.jsonl"
        path.write_bytes(b'{"text": "A fine first line of text."}\n' + lines[0] + b"\n")
        with pytest.raises(CorpusError, match=rf"{reason}\.jsonl:2: {reason}"):
            list(iter_documents([path], max_document_bytes=LIMIT, oversize="skip"))
    with pytest.raises(CorpusError, match=r"c\.jsonl\.gz:\d+: corrupt_gzip"):
        list(iter_documents([corpus[2]]))


def test_clean_cli(corpus: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    register_clean(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(["clean", "--input", str(corpus[1]), "--out", str(tmp_path / "o"), "--json"])
    assert args.func(args) == 2  # strict by default: the first bad record stops the run
    assert f"{corpus[1]}:" in capsys.readouterr().err
    # No output, and no half-written part: only the job's bookkeeping (.work/, .clean_options.json).
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [".clean_options.json", ".work"]
    args = parser.parse_args(
        ["clean", "--input", ",".join(map(str, corpus)), "--out", str(tmp_path / "o"), "--json", "--lenient",
         "--max-doc-mb", str(LIMIT / 1e6), "--oversize", "skip"]
    )  # fmt: skip
    assert args.func(args) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert Counter(last["rejected"]) == _expected_rejected()
    assert (
        last["documents_in"]
        == last["documents_written"] + sum(last["rejected"].values()) + last["cleaned_away"]
    )
    report = (tmp_path / "o" / "clean_report.json").read_text()
    assert args.func(args) == 0  # the same job again: finished, nothing reruns
    assert (
        json.loads(capsys.readouterr().out.strip().splitlines()[-1])["documents_written"]
        == last["documents_written"]
    )
    assert (tmp_path / "o" / "clean_report.json").read_text() == report
    args.lenient = False  # other settings into the same directory are refused, naming the difference
    assert args.func(args) == 2
    assert "strict: was False, now True" in capsys.readouterr().err


def test_shard_inline_clean_reconciles_and_ignores_workers(corpus: list[Path], tmp_path: Path) -> None:
    tok = train_tokenizer(
        write_sample_corpus(tmp_path / "tokc", docs=300, seed=1), vocab_size=512, out_prefix=tmp_path / "sp"
    )
    parser = argparse.ArgumentParser()
    add_shard_cleaning_args(parser)
    args = parser.parse_args(
        ["--clean", "--errors", "skip", "--max-doc-mb", str(LIMIT / 1e6), "--oversize", "skip"]
    )
    kwargs = shard_kwargs_from_args(args)
    manifests = []
    for workers in (1, 2):
        out = tmp_path / f"s{workers}"
        manifests.append(
            shard_corpus(
                corpus, tokenizer_path=tok, out_dir=out, workers=workers, shard_size_mb=0.02, **kwargs
            )
        )
    m1, m2 = manifests
    assert m1 == m2
    assert {p.name: p.read_bytes() for p in (tmp_path / "s1").glob("*.tar")} == {
        p.name: p.read_bytes() for p in (tmp_path / "s2").glob("*.tar")
    }
    assert Counter(m1["rejected"]) == _expected_rejected()
    assert m1["documents_in"] == (
        m1["documents_written"]
        + sum(m1["rejected"].values())
        + m1["cleaning_documents_removed"]
        + sum(m1["filtered"].values())
    )
    assert m1["options"]["clean"]["min_words_per_line"] == 5
    # Without --clean the same corpus keeps every valid document.
    plain = shard_corpus(
        corpus,
        tokenizer_path=tok,
        out_dir=tmp_path / "plain",
        errors="skip",
        max_document_bytes=LIMIT,
        oversize="skip",
    )
    assert "cleaning" not in plain
    assert plain["documents_written"] == m1["documents_written"] + m1["cleaning_documents_removed"]


# ----------------------------------------------------------------------------------- kill, resume
_SHARD_CHILD = (
    "import sys; from pathlib import Path; from data_pipeline.sharding import shard_corpus;"
    "from data_pipeline.clean import CleanConfig;"
    "shard_corpus(sorted(Path(sys.argv[1]).glob('*.json.gz')), tokenizer_path=Path(sys.argv[2]),"
    " out_dir=Path(sys.argv[3]), shard_size_mb=0.05, workers=2, val_fraction=0.05, clean=CleanConfig(),"
    " buckets=4)"
)


def _markers(out: Path, stage: str) -> dict[str, tuple[int, str]]:
    return {
        p.name: (p.stat().st_mtime_ns, p.read_text()) for p in (out / ".work" / stage / "done").glob("*.json")
    }


def test_killed_shard_run_resumes_to_identical_output(tmp_path: Path) -> None:
    """SIGKILL the whole local run (parent and workers, as a node failure would) in the middle of the
    write stage; the rerun runs only the tasks without a marker and ends byte-identical."""
    import os
    import signal
    import time

    corpus_dir = tmp_path / "corpus"
    write_sample_corpus(corpus_dir, docs=6000, seed=0, docs_per_file=500)
    tok = train_tokenizer(sorted(corpus_dir.glob("*.json.gz")), vocab_size=512, out_prefix=tmp_path / "sp")
    cmd = [sys.executable, "-c", _SHARD_CHILD, str(corpus_dir), str(tok)]
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    subprocess.run([*cmd, str(tmp_path / "full")], check=True, cwd=REPO, env=env, timeout=300)

    out = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, str(out)], cwd=REPO, env=env, start_new_session=True)
    done_dir = out / ".work" / "write" / "done"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if done_dir.is_dir() and len(list(done_dir.glob("*.json"))) >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed; use a larger corpus"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()  # no manifest, so no partial shard is ever listed
    before = {stage: _markers(out, stage) for stage in ("read", "dedupe", "write")}
    assert len(before["read"]) == 12 and len(before["dedupe"]) == 4  # earlier stages had finished
    assert 3 <= len(before["write"]) < 12
    tars_before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}

    subprocess.run([*cmd, str(out)], check=True, cwd=REPO, env=env, timeout=300)
    after = {stage: _markers(out, stage) for stage in ("read", "dedupe", "write")}
    # Finished tasks were not run again (their markers untouched), and the rest ran once each.
    for stage in ("read", "dedupe"):
        assert after[stage] == before[stage]
    assert {k: v for k, v in after["write"].items() if k in before["write"]} == before["write"]
    assert len(after["write"]) == 12
    for name in before["write"]:
        tag = f"{int(name[:6]):05d}-0000"  # write task t is input file t here (one piece per file)
        for tar, mtime in tars_before.items():
            if f"-{tag}-" in tar:
                assert (out / tar).stat().st_mtime_ns == mtime, tar
    assert (out / "manifest.json").read_text() == (tmp_path / "full" / "manifest.json").read_text()
    tars = sorted(p.name for p in (tmp_path / "full").glob("*.tar"))
    assert sorted(p.name for p in out.glob("*.tar")) == tars
    for name in tars:
        assert (out / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name
    assert not list(out.glob("*.tmp"))
