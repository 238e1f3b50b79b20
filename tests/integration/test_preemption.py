"""A stop request (SIGUSR1 as Slurm's `--signal` sends, or a time limit) makes the run save the current
step and exit with status 75; resuming continues the same loss curve bit for bit."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from tests.conftest import REPO, SMOKE_CONFIG, read_metrics, subprocess_env, tiny_overrides

STEPS = 40


def test_sigusr1_saves_and_exits_75_then_resume_matches(shards_dir, tmp_path, run_pretrain):
    full = tmp_path / "full"
    run_pretrain(
        ["train", "--config", str(SMOKE_CONFIG), *tiny_overrides(shards_dir, full, **{"train.steps": STEPS})]
    )

    cut = tmp_path / "cut"
    args = [
        "train",
        "--config",
        str(SMOKE_CONFIG),
        *tiny_overrides(shards_dir, cut, **{"train.steps": STEPS}),
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pretrain", *args],
        env=subprocess_env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        metrics = cut / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "training produced no metrics"
            time.sleep(0.02)
        proc.send_signal(signal.SIGUSR1)
        out, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 75, err[-3000:]
    assert "stopped at step" in out and "SIGUSR1" in out
    stopped = int(out.split("stopped at step ")[1].split()[0])
    assert 3 <= stopped < STEPS
    assert (cut / "checkpoints" / f"step-{stopped}" / "meta.json").is_file()

    run_pretrain(args)  # resumes from the saved step
    ref, got = read_metrics(full), read_metrics(cut)
    assert sorted(got) == sorted(ref)
    assert all(got[s]["loss"] == ref[s]["loss"] for s in ref)


def test_time_limit_stops_with_a_checkpoint(shards_dir, tmp_path, run_pretrain):
    out = tmp_path / "run"
    args = [
        "train",
        "--config",
        str(SMOKE_CONFIG),
        *tiny_overrides(
            shards_dir, out, **{"train.steps": 100000, "train.time_limit_s": 20, "train.stop_grace_s": 5}
        ),
    ]
    proc = run_pretrain(args, check=False)
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert "time limit" in proc.stdout
    assert any((out / "checkpoints").glob("step-*/meta.json"))
