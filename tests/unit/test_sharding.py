"""Sharding: manifest integrity, worker-count independence, resume, refusal, token fidelity."""

from __future__ import annotations

import io
import json
import math
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.corpus import iter_documents
from data_pipeline.manifest import (
    ManifestError,
    file_sha256,
    iter_shard_documents,
    load_manifest,
    shard_paths,
    unigram_entropy,
    verify_shards,
)
from data_pipeline.pipeline import ordinal
from data_pipeline.sharding import ShardingError, assign_split, shard_corpus
from data_pipeline.tokenizer import Tokenizer

# ~25 kB of text per shard: the 300-document corpus becomes several train shards and a val shard.
OPTIONS = {"val_fraction": 0.1, "shard_size_mb": 0.025, "seed": 0}


@pytest.fixture(scope="module")
def sharded(
    dp_corpus_paths: list[Path], dp_tokenizer_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("dp_shards") / "w1"
    shard_corpus(dp_corpus_paths, tokenizer_path=dp_tokenizer_path, out_dir=out, workers=1, **OPTIONS)
    return out


def _tars(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.tar"))}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_manifest_matches_shards(sharded: Path, dp_tokenizer_path: Path, dp_corpus_paths: list[Path]) -> None:
    manifest = load_manifest(sharded)
    assert verify_shards(sharded) == []
    assert manifest["format"] == "tandem-shards" and manifest["version"] == 2
    assert manifest["dtype"] == "uint16"
    tok = Tokenizer(dp_tokenizer_path)
    assert manifest["tokenizer"]["sha256"] == tok.sha256
    assert manifest["tokenizer"]["vocab_size"] == tok.vocab_size
    assert manifest["tokenizer"]["eos_id"] == 3 and manifest["tokenizer"]["mask_id"] == 6
    names = [s["name"] for s in manifest["shards"]]
    train = [n for n in names if n.startswith("train-")]
    val = [n for n in names if n.startswith("val-")]
    # Train shards first, then val; each split's shards in input order, named after file and piece.
    assert names == [*sorted(train), *sorted(val)] and len(train) >= 3 and val
    for split, group in (("train", train), ("val", val)):
        for f in range(len(dp_corpus_paths)):
            mine = [n for n in group if n.startswith(f"{split}-{f:05d}-")]
            assert mine == [f"{split}-{f:05d}-0000-{k:04d}.tar" for k in range(len(mine))]
    assert sorted(p.name for p in sharded.glob("*.tar")) == sorted(names)
    assert not list(sharded.glob("*.tmp"))
    for split in ("train", "val"):
        shards = [s for s in manifest["shards"] if s["split"] == split]
        assert manifest["totals"][split] == {
            "shards": len(shards),
            "documents": sum(s["documents"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
        }
        assert [p.name for p in shard_paths(manifest, sharded, split)] == [s["name"] for s in shards]
    assert manifest["documents_read"] == manifest["documents_in"] == manifest["documents_written"] == 300
    assert manifest["totals"]["train"]["documents"] + manifest["totals"]["val"]["documents"] == 300
    assert 10 <= manifest["totals"]["val"]["documents"] <= 60  # ~10% of 300
    assert manifest["rejected"] == {} and manifest["filtered"] == {}
    assert "cleaning" not in manifest  # cleaning is off unless asked
    # Provenance: every input with its size and sha256 (hashed while streaming), the tool's version.
    assert manifest["inputs"] == [
        {"path": str(p), "bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in dp_corpus_paths
    ]
    assert manifest["tool"]["name"] == "tandem" and manifest["tool"]["version"]


def test_tokens_equal_tokenizer_encode(
    sharded: Path, dp_corpus_paths: list[Path], dp_tokenizer_path: Path
) -> None:
    tok = Tokenizer(dp_tokenizer_path)
    docs = {(f, i): d for f, path in enumerate(dp_corpus_paths) for i, d in enumerate(iter_documents([path]))}
    manifest = load_manifest(sharded)
    seen = []
    for split in ("train", "val"):
        for path in shard_paths(manifest, sharded, split):
            for key, tokens in iter_shard_documents(path):
                f, piece, i = (int(x) for x in key.split("-"))  # file, piece, position in the piece
                assert piece == 0 and path.name.startswith(f"{split}-{f:05d}-0000-")
                assert assign_split(ordinal(f, piece, i), seed=0, val_fraction=0.1) == split
                assert tokens.dtype == np.uint16
                assert tokens.tolist() == tok.encode(docs[f, i].text)  # no eos appended
                seen.append((f, i))
    assert sorted(seen) == sorted(docs) and len(seen) == 300
    # meta.json travels with each document.
    first = next(n for n in (s["name"] for s in manifest["shards"]) if n.startswith("train-00000-"))
    with tarfile.open(sharded / first) as tar:
        key = tar.getnames()[0].split(".")[0]
        assert tar.getnames()[:2] == [f"{key}.meta.json", f"{key}.tokens.npy"]
        member = tar.getmember(f"{key}.meta.json")
        # Pinned header fields; an integer mtime also keeps tarfile from adding a pax header per member.
        assert (member.mtime, member.uname, member.mode, member.pax_headers) == (0, "tandem", 0o444, {})
        meta = json.load(tar.extractfile(member))
        np.load(io.BytesIO(tar.extractfile(f"{key}.tokens.npy").read()), allow_pickle=False)
    doc = docs[0, int(key.split("-")[2])]
    assert meta == {"url": doc.url, "timestamp": doc.timestamp, "source": doc.source, "line": doc.line}


def test_two_workers_write_identical_bytes(
    sharded: Path, dp_corpus_paths: list[Path], dp_tokenizer_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "w2"
    manifest = shard_corpus(
        dp_corpus_paths, tokenizer_path=dp_tokenizer_path, out_dir=out, workers=2, **OPTIONS
    )
    assert manifest == load_manifest(sharded)
    assert _tars(out) == _tars(sharded)


def test_corruption_is_reported_by_shard_name(sharded: Path, tmp_path: Path) -> None:
    out = _copy(sharded, tmp_path / "c")
    one, two = (s["name"] for s in load_manifest(out)["shards"][1:3])
    victim = out / one
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 0xFF
    victim.write_bytes(bytes(data))
    for deep in (False, True):
        problems = verify_shards(out, deep=deep)
        assert problems and all(p.startswith(f"{one}: ") for p in problems), problems
    (out / two).unlink()
    (out / "extra.tar").write_bytes(b"")
    problems = verify_shards(out, deep=False)
    assert any(p.startswith(f"{two}: listed") for p in problems)
    assert any(p.startswith("extra.tar: shard file is not listed") for p in problems)


def test_resume_runs_only_unfinished_tasks(
    sharded: Path, dp_corpus_paths: list[Path], dp_tokenizer_path: Path, tmp_path: Path
) -> None:
    out = _copy(sharded, tmp_path / "r")
    reference = _tars(out)
    manifest_text = (out / "manifest.json").read_text()
    # A run killed while writing file 1's shards: its task marker never written, one shard half
    # written, no merge marker and no manifest yet.
    work = out / ".work"
    (out / "manifest.json").unlink()
    (work / "merge" / "done" / "000000.json").unlink()
    (work / "write" / "done" / "000001.json").unlink()
    victims = sorted(out.glob("*-00001-*.tar"))
    for victim in victims:
        victim.unlink()
    (out / (victims[0].name + ".tmp")).write_bytes(b"partial")
    untouched = {p.name: p.stat().st_mtime_ns for p in out.glob("*-00000-*.tar")}
    marker = (work / "write" / "done" / "000000.json").stat().st_mtime_ns

    manifest = shard_corpus(
        dp_corpus_paths, tokenizer_path=dp_tokenizer_path, out_dir=out, workers=1, **OPTIONS
    )
    assert (out / "manifest.json").read_text() == manifest_text
    assert manifest == json.loads(manifest_text)
    assert _tars(out) == reference
    # Task 0 finished before the kill: neither rerun nor its shards rewritten.
    assert (work / "write" / "done" / "000000.json").stat().st_mtime_ns == marker
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*-00000-*.tar")} == untouched
    assert not list(out.glob("*.tmp"))
    assert verify_shards(out) == []


def test_changed_settings_are_refused(
    sharded: Path, dp_corpus_paths: list[Path], dp_tokenizer_path: Path
) -> None:
    with pytest.raises(ShardingError, match=r"seed: was 0, now 1.*fresh out_dir"):
        shard_corpus(
            dp_corpus_paths, tokenizer_path=dp_tokenizer_path, out_dir=sharded, **(OPTIONS | {"seed": 1})
        )
    with pytest.raises(ShardingError, match=r"inputs: was"):
        shard_corpus(dp_corpus_paths[:1], tokenizer_path=dp_tokenizer_path, out_dir=sharded, **OPTIONS)
    # Workers are not a setting of the output: resuming with another count is allowed.
    shard_corpus(dp_corpus_paths, tokenizer_path=dp_tokenizer_path, out_dir=sharded, workers=2, **OPTIONS)
    assert verify_shards(sharded) == []


def test_min_tokens_skips_and_counts(
    dp_corpus_paths: list[Path], dp_tokenizer_path: Path, tmp_path: Path
) -> None:
    tok = Tokenizer(dp_tokenizer_path)
    lengths = sorted(len(tok.encode(d.text)) for d in iter_documents(dp_corpus_paths))
    threshold = lengths[len(lengths) // 2]
    manifest = shard_corpus(
        dp_corpus_paths, tokenizer_path=dp_tokenizer_path, out_dir=tmp_path / "m", min_tokens=threshold
    )
    too_short = sum(1 for n in lengths if n < threshold)
    assert manifest["filtered"] == {"too_short": too_short} and manifest["rejected"] == {}
    assert manifest["totals"]["train"]["documents"] == 300 - too_short
    # A version-1 manifest (``skipped`` held too_short and rejections) still loads, converted.
    old = json.loads((tmp_path / "m" / "manifest.json").read_text())
    for key in ("rejected", "filtered", "tool", "documents_in", "documents_written"):
        old.pop(key)
    old |= {"version": 1, "skipped": {"too_short": too_short, "bad_json": 2}}
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(old))
    loaded = load_manifest(tmp_path / "m")
    assert loaded["rejected"] == {"bad_json": 2} and loaded["filtered"] == {"too_short": too_short}
    assert "skipped" not in loaded
    assert manifest["totals"]["val"] == {"shards": 0, "documents": 0, "tokens": 0}
    assert verify_shards(tmp_path / "m") == []


def test_bad_options(dp_corpus_paths: list[Path], dp_tokenizer_path: Path, tmp_path: Path) -> None:
    with pytest.raises(ShardingError, match=r"workers=0.*val_fraction=1.0"):
        shard_corpus(
            dp_corpus_paths, tokenizer_path=dp_tokenizer_path, out_dir=tmp_path, workers=0, val_fraction=1.0
        )


def test_val_split_is_never_empty() -> None:
    # Whatever the hash says, a tiny fraction still sends document 1 to val (when document 0 is train).
    assert [assign_split(i, seed=0, val_fraction=1e-12) for i in range(4)] == [
        "train",
        "val",
        "train",
        "train",
    ]
    assert assign_split(1, seed=0, val_fraction=0.0) == "train"
    share = sum(assign_split(i, seed=5, val_fraction=0.2) == "val" for i in range(10_000)) / 10_000
    assert 0.18 < share < 0.22


def test_unigram_entropy(sharded: Path) -> None:
    manifest = load_manifest(sharded)
    counts = np.zeros(manifest["tokenizer"]["vocab_size"], dtype=np.int64)
    docs = 0
    for path in shard_paths(manifest, sharded, "train"):
        for _, tokens in iter_shard_documents(path):
            counts += np.bincount(tokens, minlength=counts.size)
            docs += 1
    for include_eos in (False, True):
        c = counts.copy()
        c[3] += docs if include_eos else 0
        p = c[c > 0] / c.sum()
        expected = float(-(p * np.log(p)).sum())
        assert unigram_entropy(sharded, include_eos=include_eos) == pytest.approx(expected, rel=1e-12)
    assert 1.0 < expected < math.log(counts.size)


def test_load_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"manifest\.json: no shard manifest"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "other", "version": 1}')
    with pytest.raises(ManifestError, match=r"manifest\.json: format='other'"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{oops")
    with pytest.raises(ManifestError, match=r"manifest\.json: not valid JSON"):
        load_manifest(tmp_path)
    assert verify_shards(tmp_path)[0].endswith(
        "not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"
    )


def test_tar_and_npy_members_match_the_standard_writers() -> None:
    # Shards are written without tarfile/webdataset for speed; the bytes must be what they would write.
    import tarfile

    from data_pipeline.shard_writer import npy_header as _npy_header
    from data_pipeline.shard_writer import tar_header as _tar_header

    for name, size in [("0000000000.meta.json", 0), ("0000012345.tokens.npy", 511), ("x" * 100, 10**9)]:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o444, "tandem", "tandem"
        assert _tar_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT) == info.tobuf(tarfile.PAX_FORMAT)
    for dtype in (np.uint16, np.uint32):
        for n in (0, 1, 7, 300, 123_456):
            arr = np.arange(n, dtype=dtype)
            buf = io.BytesIO()
            np.save(buf, arr, allow_pickle=False)
            assert _npy_header(arr.dtype.str, n) + arr.tobytes() == buf.getvalue()


def test_meta_json_is_json_dumps_byte_for_byte() -> None:
    # meta.json is built without json.dumps for speed; readers must see exactly what json.dumps writes.
    from data_pipeline.corpus import Document
    from data_pipeline.pipeline import _json_str, _meta_json

    for doc in [
        Document("t", 'https://x.example/é"\n\\', None, "/data/a b.jsonl", 3, 0),
        Document("t", None, "2019-04-18T12:00:00Z", "/dätä/ü\t.json.gz", 12345, 2),
    ]:
        meta = {"url": doc.url, "timestamp": doc.timestamp, "source": doc.source, "line": doc.line}
        if doc.part:
            meta["part"] = doc.part
        assert _meta_json(doc, _json_str(doc.source)) == json.dumps(meta).encode("utf-8")


def test_add_sample_writes_what_add_writes() -> None:
    # The per-document fast path of the shard writer must produce the same archive as member-by-member.
    from data_pipeline.shard_writer import TarShardWriter

    members = [(".meta.json", b'{"url": null}'), (".tokens.npy", bytes(range(256)) * 3)]
    one, two = io.BytesIO(), io.BytesIO()
    a, b = TarShardWriter(one), TarShardWriter(two)
    for key in ("00000-0000-000000000", "00012-0003-000004567"):
        a.add_sample(key, members)
        for suffix, data in members:
            b.add(key + suffix, data)
    a.close()
    b.close()
    assert one.getvalue() == two.getvalue()
    with tarfile.open(fileobj=io.BytesIO(one.getvalue())) as tar:
        assert tar.getnames()[1] == "00000-0000-000000000.tokens.npy"


def test_output_of_unknown_provenance_is_refused(
    dp_corpus_paths: list[Path], dp_tokenizer_path: Path, tmp_path: Path
) -> None:
    # Shards without a fingerprint (e.g. the single-reader layout's) would be mixed with this job's.
    (tmp_path / "train-000000.tar").write_bytes(b"")
    (tmp_path / ".progress.jsonl").write_text("")
    with pytest.raises(ShardingError, match=r"unknown provenance \(\.progress\.jsonl, train-000000\.tar; no"):
        shard_corpus(dp_corpus_paths, tokenizer_path=dp_tokenizer_path, out_dir=tmp_path, **OPTIONS)
    assert not (tmp_path / ".shard_options.json").exists() and not (tmp_path / ".work").exists()
