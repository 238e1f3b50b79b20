"""`pretrain slurm submit` against a real one-node Slurm cluster on loopback (.ci/slurm_setup.sh starts it).

A 2-task job trains and checkpoints; `scancel --signal=USR1 --batch` makes it save, requeue itself exactly once,
and the requeued job resumes and finishes on the same loss curve as an uninterrupted run. Slurm 22.05 holds a
requeued job for its credential lifetime (AuthInfo cred_expire, 120 s by default) before it may start again.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, SMOKE_CONFIG, read_metrics, subprocess_env, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STEPS = 300  # ~20 steps/s alone on 2 cores: long enough for the signal to land mid-run
REQUEUE_WAIT_S = 150  # Slurm's eligibility delay for a requeued job (cred_expire, <= 120 s) plus start-up


def _cluster_problem() -> str | None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "Slurm is not installed (no sinfo/sbatch); run .ci/slurm_setup.sh"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 20 s"
    states = out.stdout.split()
    if out.returncode != 0 or not any(s.rstrip("*~#") in ("idle", "mixed") for s in states):
        return f"no idle Slurm node (sinfo exit {out.returncode}: {(out.stdout + out.stderr).strip()!r})"
    return None


@pytest.fixture(scope="module")
def cluster() -> None:
    problem = _cluster_problem()
    if problem:
        pytest.skip(problem)


def _job(job_id: int) -> dict[str, str]:
    """`scontrol show job -o ID` as a dict (JobState, Restarts, ...); {} once Slurm has forgotten the job."""
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout)) if out.returncode == 0 else {}


def _wait(predicate, timeout: float, what: str, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = log.read_text()[-4000:] if log and log.exists() else "(no log)"
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")
        time.sleep(1)


def _submit(args: list[str], workdir: Path) -> int:
    proc = subprocess.run(
        _cli("slurm", "submit", *args),
        env=subprocess_env(),
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    m = re.fullmatch(r"Submitted batch job (\d+)\n", proc.stdout)
    assert m, proc.stdout
    return int(m.group(1))


def _cli(*argv: str) -> list[str]:
    # The verbs' own entry point: the same parser `pretrain` builds with pretrain.cli_launch.register.
    return [sys.executable, "-m", "pretrain.cli_launch", *argv]


def test_usr1_saves_requeues_once_and_resumes_on_the_same_curve(cluster, shards_dir, tmp_path, run_pretrain):
    t0 = time.monotonic()
    overrides = tiny_overrides(shards_dir, tmp_path / "run", **{"train.steps": STEPS})
    job_id = _submit(
        [
            "--config",
            str(SMOKE_CONFIG),
            "--nodes",
            "1",
            "--gpus-per-node",
            "2",
            "--time",
            "00:15:00",
            "--grace-s",
            "60",
            "--job-name",
            "tandem-test",
            "--log-dir",
            str(tmp_path / "logs"),
            "--device",
            "cpu",
            "--env",
            "OMP_NUM_THREADS=1",
            "--env",
            f"PYTHONPATH={REPO}",
            *overrides,
        ],
        tmp_path,
    )
    log = tmp_path / "logs" / f"tandem-test-{job_id}.out"
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        _wait(lambda: metrics.exists() and metrics.read_text().count("\n") >= 3, 240, "3 training steps", log)
        subprocess.run(["scancel", "--signal=USR1", "--batch", str(job_id)], check=True)
        _wait(lambda: "requeueing job" in (log.read_text() if log.exists() else ""), 120, "the requeue", log)
        # The uninterrupted reference (same 2-rank layout) runs while Slurm holds the requeued job.
        reference = tmp_path / "reference"
        ref_args = tiny_overrides(shards_dir, reference, **{"train.steps": STEPS})
        run_pretrain(["train", "--config", str(SMOKE_CONFIG), *ref_args], launcher="torchrun", nprocs=2)
        _wait(
            lambda: _job(job_id).get("JobState") == "COMPLETED",
            REQUEUE_WAIT_S + 240,
            "the job to finish",
            log,
        )
    finally:
        if _job(job_id).get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED", None):
            subprocess.run(["scancel", str(job_id)], check=False)
    text = log.read_text()
    assert _job(job_id)["Restarts"] == "1", text[-3000:]
    assert text.count("requeueing job") == 1, text[-3000:]
    assert "restart 0 on" in text and "restart 1 on" in text and "restart 2 on" not in text
    stopped = int(re.search(r"stopped at step (\d+)", text).group(1))
    assert 3 <= stopped < STEPS, text[-3000:]
    assert (tmp_path / "run" / "checkpoints" / f"step-{stopped}" / "meta.json").is_file()
    assert re.search(rf"trained {STEPS} steps", text), text[-3000:]

    ref, got = read_metrics(reference), read_metrics(tmp_path / "run")
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    # Same layout (2 ranks, gloo) and a bitwise resume: no tolerance needed.
    assert all(got[s]["loss"] == ref[s]["loss"] for s in ref), [
        (s, got[s]["loss"], ref[s]["loss"]) for s in ref
    ]
    print(f"slurm preempt/requeue/resume: {time.monotonic() - t0:.0f} s", file=sys.stderr)


def test_submit_rejects_bad_values_before_sbatch(cluster, tmp_path):
    proc = subprocess.run(
        _cli(
            "slurm",
            "submit",
            "--config",
            str(SMOKE_CONFIG),
            "--nodes",
            "1",
            "--gpus-per-node",
            "1",
            "--time",
            "00:05:00",
            "--partition",
            "debug;touch CANARY",
            "--job-name",
            "$(touch CANARY)",
        ),
        env=subprocess_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "partition=" in proc.stderr and "job_name=" in proc.stderr
    assert not (tmp_path / "CANARY").exists() and not any(tmp_path.glob("slurm-logs/*"))
    assert os.listdir(tmp_path) == []
