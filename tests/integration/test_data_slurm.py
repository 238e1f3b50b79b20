"""`pretrain data shard|clean --executor slurm` on the one-node Slurm cluster on loopback (.ci/slurm_setup.sh).

Each stage runs as a job array after the previous one (afterok). The shards, the manifest and the clean
outputs are byte-identical to the local executor's at 1 and 2 workers, for 1 and 3 array tasks per stage. An
array task cancelled while it runs leaves its tasks unfinished and the later stages cancelled; the same
command again submits only the array index that owns them, and the result is the same bytes. An array task
whose task fails requeues itself (Slurm holds a requeued job for AuthInfo cred_expire, 10 s on the test
cluster) and only the failed task runs again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_pipeline.sample_corpus import iter_sample_documents, write_sample_corpus
from data_pipeline.tokenizer import train_tokenizer
from tests.conftest import subprocess_env
from tests.integration.test_data_scale import _faulty_corpus
from tests.integration.test_slurm import _cluster_problem

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

PIECE_MB = "0.05"  # b.jsonl (~150 kB, uncompressed) is cut into three pieces
# --errors skip counts the corpus's bad records; --max-doc-mb 0.004 skips its oversize page.
SHARD_FLAGS = ["--clean", "--errors", "skip", "--max-doc-mb", "0.004", "--oversize", "skip", "--buckets", "4",
               "--piece-mb", PIECE_MB, "--val-fraction", "0.1", "--shard-size-mb", "0.02"]  # fmt: skip
SLURM_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def cluster() -> None:
    problem = _cluster_problem()
    if problem:
        pytest.skip(problem)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | list[Path]]:
    """test_data_scale's faulty corpus (a bad record of every kind, pages cleaning removes, a truncated .gz,
    a .jsonl larger than a piece) plus d.jsonl, which repeats pages of a.jsonl.gz and b.jsonl exactly."""
    root = tmp_path_factory.mktemp("slurm_corpus")
    files, base = _faulty_corpus(root / "corpus")
    fresh = list(iter_sample_documents(docs=20, seed=7))
    d = root / "corpus" / "d.jsonl"
    d.write_text("".join(json.dumps(r) + "\n" for r in [fresh[0], base[3], fresh[1], base[200], *fresh[2:]]))
    sample = write_sample_corpus(root / "tok_corpus", docs=300, seed=1)
    tok = train_tokenizer(sample, vocab_size=512, out_prefix=root / "tok" / "sp")
    return {"files": [*files, d], "tokenizer": tok}


def _cli(*argv: str | Path, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain", *map(str, argv)],
        env=subprocess_env(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=SLURM_TIMEOUT_S,
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _popen(*argv: str | Path, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pretrain", *map(str, argv)],
        env=subprocess_env(),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=SLURM_TIMEOUT_S)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return out


def _outputs(out: Path) -> dict[str, str]:
    """sha256 of every output file; the manifest and the clean report by their text with the output
    directory's path replaced (the clean report also without its wall time)."""
    digests = {}
    for p in sorted(out.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        data = p.read_bytes()
        if p.name in ("manifest.json", "clean_report.json"):
            data = data.replace(str(out.resolve()).encode(), b"OUT")
            data = re.sub(rb'\n *"seconds": [0-9.]+,', b"", data)  # the clean report's wall time
        digests[p.name] = hashlib.sha256(data).hexdigest()
    return digests


def _submitted(stdout: str) -> dict[str, tuple[int, str]]:
    """{stage: (job id, array)} from the CLI's `submitted STAGE: job J, array A` lines."""
    return {
        m[0]: (int(m[1]), m[2]) for m in re.findall(r"^submitted (\w+): job (\d+), array (\S+)", stdout, re.M)
    }


def _summary(stdout: str) -> dict:
    summary = json.loads(stdout.strip().splitlines()[-1])
    summary.pop("seconds")
    return summary


def _slurm_flags(tasks: int, logs: Path) -> list[str]:
    return ["--executor", "slurm", "--tasks", str(tasks), "--time", "00:10:00", "--log-dir", str(logs)]


def _status(out: Path, cwd: Path) -> dict:
    return json.loads(_cli("data", "status", out, "--json", cwd=cwd).stdout)


def _markers(out: Path, stage: str, state: str = "done") -> dict[int, tuple[int, int, bytes]]:
    """{task: (inode, mtime_ns, content)} of a stage's markers: a rewritten marker has a new inode."""
    found = {}
    for p in sorted((out / ".work" / stage / state).glob("*.json")):
        st = p.stat()
        found[int(p.stem)] = (st.st_ino, st.st_mtime_ns, p.read_bytes())
    return found


def _wait(predicate, timeout: float, what: str, *, poll_s: float = 0.05):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll_s)
    return value


def _squeue_empty(job_ids) -> bool:
    proc = subprocess.run(
        ["squeue", "-h", "-j", ",".join(map(str, job_ids)), "-o", "%i"], capture_output=True, text=True
    )
    return (proc.returncode == 0 and not proc.stdout.strip()) or "Invalid job id" in proc.stderr


def _state(job_id: str) -> str:
    return subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True
    ).stdout.strip()


def test_slurm_shards_and_cleaned_files_equal_the_local_executors(cluster, corpus, tmp_path):
    t0 = time.monotonic()
    inputs = ",".join(map(str, corpus["files"]))
    shard = ["data", "shard", "--input", inputs, "--tokenizer", corpus["tokenizer"], *SHARD_FLAGS, "--json"]
    clean = ["data", "clean", "--input", inputs, "--errors", "skip", "--piece-mb", PIECE_MB, "--buckets", "3",
             "--docs-per-file", "60", "--json"]  # fmt: skip
    logs = tmp_path / "logs"
    # The three Slurm jobs share the node; the local references run meanwhile.
    slurm_runs = {
        1: _popen(*shard, "--out", "slurm1", *_slurm_flags(1, logs), "--wait", cwd=tmp_path),
        3: _popen(*shard, "--out", "slurm3", *_slurm_flags(3, logs), "--wait", cwd=tmp_path),
        "clean": _popen(*clean, "--out", "clean_slurm", *_slurm_flags(2, logs), "--wait", cwd=tmp_path),
    }
    local = {w: _cli(*shard, "--out", f"local{w}", "--workers", str(w), cwd=tmp_path).stdout for w in (1, 2)}
    clean_local = _cli(*clean, "--out", "clean_local", "--workers", "2", cwd=tmp_path).stdout
    slurm = {k: _finish(p) for k, p in slurm_runs.items()}

    reference = _outputs(tmp_path / "local1")
    assert sum(n.endswith(".tar") for n in reference) >= 8 and "manifest.json" in reference
    for name, out in [("local2", local[2]), ("slurm1", slurm[1]), ("slurm3", slurm[3])]:
        assert _outputs(tmp_path / name) == reference, name
        # The same summary as a local run prints (its JSON line without the wall time).
        assert _summary(out) == _summary(local[1]), name
        assert "train:" in out and "val:" in out and "manifest:" in out
    manifest = json.loads((tmp_path / "slurm3" / "manifest.json").read_text())
    assert manifest["rejected"] and manifest["cleaning"]["page_duplicate"] >= 2
    assert any(s["name"].startswith("train-00001-0002-") for s in manifest["shards"])  # b.jsonl's 3rd piece
    # Stages: 6 read tasks (b.jsonl in 3 pieces), 4 dedupe buckets, 6 write tasks, 1 merge.
    arrays = {stage: array for stage, (_, array) in _submitted(slurm[3]).items()}
    assert arrays == {"read": "0-2", "dedupe": "0-2", "write": "0-2", "merge": "0"}
    assert {a for _, a in _submitted(slurm[1]).values()} == {"0"}
    # Array task I of a stage runs its tasks I, I+3, ...
    log = (logs / f"tandem-data-read-{_submitted(slurm[3])['read'][0]}_1.out").read_text()
    assert "tasks 1, 4, ... of 6" in log and "exited with status 0" in log

    clean_reference = _outputs(tmp_path / "clean_local")
    assert sum(n.startswith("part-") for n in clean_reference) >= 6
    assert _outputs(tmp_path / "clean_slurm") == clean_reference
    assert _summary(slurm["clean"]) == _summary(clean_local)
    status = _status(tmp_path / "slurm3", tmp_path)
    assert status["finished"] and all(s["done"] == s["tasks"] for s in status["stages"])
    assert [a["state"] for a in status["slurm"]] == ["ended"] * 4
    print(f"slurm vs local executors: {time.monotonic() - t0:.0f} s", file=sys.stderr)


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory: pytest.TempPathFactory, corpus) -> list[Path]:
    """A 15 MB .jsonl cut into two pieces of 7.5 MB (a write task of a few seconds) and a small file."""
    root = tmp_path_factory.mktemp("big_corpus")
    big = root / "big.jsonl"
    with open(big, "w", encoding="utf-8") as f:
        for rec in iter_sample_documents(docs=16_500, seed=11):
            f.write(json.dumps(rec) + "\n")
    return [big, corpus["files"][3]]


def test_a_cancelled_array_task_is_all_a_rerun_submits(cluster, corpus, big_corpus, tmp_path):
    """scancel array task 0 of the write stage while it writes piece 0 of big.jsonl: its tasks 0 and 2 stay
    unfinished (task 1, array task 1's, is done), the merge is cancelled (afterok can no longer hold). The
    same command again submits array index 0 and the merge only; task 1's marker is untouched.

    A task writes 7.5 MB in about half a second, so once its partial shard is on disk the test stops its
    process (SIGSTOP: a task as slow as need be, with no hook in the code) until Slurm's cancel arrives;
    scancel sends SIGCONT before SIGTERM."""
    t0 = time.monotonic()
    base = ["data", "shard", "--input", ",".join(map(str, big_corpus)), "--tokenizer", corpus["tokenizer"],
            "--piece-mb", "8"]  # fmt: skip
    shard = [*base, "--out", "slurm", *_slurm_flags(2, tmp_path / "logs")]
    first = _submitted(_cli(*shard, cwd=tmp_path).stdout)
    assert {s: a for s, (_, a) in first.items()} == {"write": "0-1", "merge": "0"}
    out = tmp_path / "slurm"
    running = out / ".work" / "write" / "running" / "000000.json"
    info = json.loads(_wait(lambda: running.is_file() and running.read_text(), 120, "write task 0 to start"))
    assert info["SLURM_ARRAY_TASK_ID"] == "0"
    partial = out / "train-00000-0000-0000.tar.tmp"
    _wait(lambda: partial.is_file() and partial.stat().st_size > 0, 60, "task 0's first bytes", poll_s=0.002)
    os.kill(info["pid"], signal.SIGSTOP)
    try:
        assert 0 not in _markers(out, "write"), "write task 0 ended before it was stopped: enlarge big.jsonl"
        # This array task alone (by ARRAY_INDEX: Slurm 22.05 refused the element's own job id just after it
        # started).
        subprocess.run(["scancel", f"{first['write'][0]}_0"], check=True)
    except BaseException:
        os.kill(info["pid"], signal.SIGCONT)
        raise
    reference = _popen(*base, "--out", "local", "--workers", "2", cwd=tmp_path)  # meanwhile
    _wait(lambda: _squeue_empty(j for j, _ in first.values()), 120, "the arrays to end")
    status = {s["stage"]: s for s in _status(out, tmp_path)["stages"]}
    assert status["write"]["done"] == 1 and status["write"]["interrupted"] == 1, status
    assert status["merge"]["done"] == 0 and not (out / "manifest.json").exists()
    assert set(_markers(out, "write")) == {1}
    kept = _markers(out, "write")

    rerun = _cli(*shard, "--wait", cwd=tmp_path).stdout
    again = _submitted(rerun)
    assert {s: a for s, (_, a) in again.items()} == {"write": "0", "merge": "0"}, rerun
    assert _markers(out, "write")[1] == kept[1]  # task 1 did not run again
    assert set(_markers(out, "write")) == {0, 1, 2} and not _markers(out, "write", "running")
    assert not list(out.glob("*.tmp"))
    logs = sorted(p.name for p in (tmp_path / "logs").glob(f"tandem-data-write-{again['write'][0]}_*.out"))
    assert logs == [f"tandem-data-write-{again['write'][0]}_0.out"]
    _finish(reference)
    assert _outputs(out) == _outputs(tmp_path / "local")
    print(f"slurm cancel and rerun: {time.monotonic() - t0:.0f} s", file=sys.stderr)


def test_a_failed_task_requeues_its_array_task_alone(cluster, corpus, tmp_path):
    """An input file goes missing after the job is planned: the read task of c.jsonl.gz (task 4, array task 1,
    which ran task 1 before it) fails, array task 1 requeues itself, the file is put back meanwhile, and the
    requeued array task runs task 4 only. The output equals a local run's."""
    t0 = time.monotonic()
    files = corpus["files"]
    c = files[2]
    assert c.name == "c.jsonl.gz"
    shard = [
        "data",
        "shard",
        "--input",
        ",".join(map(str, files)),
        "--tokenizer",
        corpus["tokenizer"],
        *SHARD_FLAGS,
    ]
    logs = tmp_path / "logs"
    # A job that holds the whole node keeps the arrays pending while the file is moved away.
    blocker = subprocess.run(
        ["sbatch", "--parsable", "--exclusive", "--job-name", "tandem-test-blocker", "--output", "/dev/null",
         "--wrap", "sleep 300"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    aside = c.with_name("c.aside")
    try:
        _wait(lambda: _state(blocker) == "RUNNING", 60, "the blocking job to start")
        submitted = _submitted(_cli(*shard, "--out", "slurm", *_slurm_flags(3, logs), cwd=tmp_path).stdout)
        # While its arrays wait, the same command is refused (two array tasks would write one task's files).
        busy = _cli(*shard, "--out", "slurm", *_slurm_flags(3, logs), cwd=tmp_path, check=False)
        assert busy.returncode == 2 and f"{submitted['read'][0]} (pending)" in busy.stderr, busy.stderr
        local = _cli(*shard, "--out", "slurm", cwd=tmp_path, check=False)  # on this machine neither
        assert local.returncode == 2 and "Slurm still has jobs" in local.stderr, local.stderr
        os.rename(c, aside)
        subprocess.run(["scancel", blocker], check=True)
        out = tmp_path / "slurm"
        failed = out / ".work" / "read" / "failed" / "000004.json"
        error = _wait(lambda: failed.is_file() and failed.read_text(), 120, "read task 4 to fail")
        os.rename(aside, c)
        assert "no such corpus file" in error
        task1 = _markers(out, "read")[1]
        reference = _popen(*shard, "--out", "local", "--workers", "2", cwd=tmp_path)  # meanwhile
        _wait(lambda: _squeue_empty(j for j, _ in submitted.values()), SLURM_TIMEOUT_S, "the job to end")
    finally:
        if aside.exists():
            os.rename(aside, c)
        subprocess.run(["scancel", blocker], check=False)
    assert _markers(out, "read")[1] == task1  # ran once, before the failure
    read_job = submitted["read"][0]
    log = (logs / f"tandem-data-read-{read_job}_1.out").read_text()
    assert log.count("requeueing array task") == 1 and "restart 1 on" in log, log
    assert "restart 1 on" not in (logs / f"tandem-data-read-{read_job}_0.out").read_text()
    status = _status(out, tmp_path)
    assert status["finished"] and all(s["failed"] == 0 for s in status["stages"]), status
    _finish(reference)
    assert _outputs(out) == _outputs(tmp_path / "local")
    print(f"slurm requeue of a failed task: {time.monotonic() - t0:.0f} s", file=sys.stderr)


def test_bad_input_in_strict_mode_ends_wait_with_the_local_error(cluster, corpus, tmp_path):
    """A malformed record in strict mode fails its task (no retries here), the merge is cancelled, and
    `--wait` ends as a local run does: exit 2 and the reader's FILE:LINE: reason."""
    shard = ["data", "shard", "--input", corpus["files"][0], "--tokenizer", corpus["tokenizer"]]
    local = _cli(*shard, "--out", "local", cwd=tmp_path, check=False)
    flags = [*_slurm_flags(1, tmp_path / "logs"), "--retries", "0", "--wait"]
    slurm = _cli(*shard, "--out", "slurm", *flags, cwd=tmp_path, check=False)
    assert local.returncode == slurm.returncode == 2, slurm.stdout + slurm.stderr
    error = local.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: {corpus['files'][0]}:") and "bad_json" in error
    assert slurm.stderr.strip().splitlines()[-1] == error
    status = {s["stage"]: s for s in _status(tmp_path / "slurm", tmp_path)["stages"]}
    assert status["write"]["failed"] == 1 and status["merge"]["done"] == 0
    assert [a["state"] for a in _status(tmp_path / "slurm", tmp_path)["slurm"]] == ["ended", "ended"]
