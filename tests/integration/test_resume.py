"""Kill-and-resume: a run killed after a checkpoint and resumed with `train.resume=auto` produces the
uninterrupted run's losses bit for bit (DESIGN.md invariant: same seed, data and layout -> bitwise
identical loss curve on CPU, including across a kill-and-resume)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, SMOKE_CONFIG, read_metrics, subprocess_env, tiny_overrides

STEPS = 24


PRESETS = {"gpt": "gpt-tiny", "bert": "bert-tiny", "t5": "t5-tiny"}


def overrides(shards, out, family="gpt", **extra):
    # Dropout on, so the restored torch RNG state matters too; a checkpoint every 4 steps. BERT's masks and
    # T5's spans come from per-sample generators, so they must continue exactly as well.
    return tiny_overrides(
        shards,
        out,
        **{
            "model.preset": PRESETS[family],
            "train.steps": STEPS,
            "checkpoint.interval": 4,
            "checkpoint.keep_last": 2,
            "model.dropout": 0.1,
            **extra,
        },
    )


def kill_after_checkpoint(args: list[str], out, *, step: int, timeout: float = 240) -> None:
    """Starts training, SIGKILLs it once checkpoint `step` is complete (no chance to clean up)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pretrain", *args],
        env=subprocess_env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    marker = out / "checkpoints" / f"step-{step}" / "meta.json"
    deadline = time.monotonic() + timeout
    try:
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"training exited ({proc.returncode}) before checkpoint step-{step} appeared")
            if time.monotonic() > deadline:
                pytest.fail(f"no checkpoint step-{step} within {timeout} s")
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)


@pytest.mark.parametrize("family", ["gpt", "bert", "t5"])
def test_killed_and_resumed_run_matches_uninterrupted_bitwise(shards_dir, tmp_path, run_pretrain, family):
    full = tmp_path / "full"
    run_pretrain(["train", "--config", str(SMOKE_CONFIG), *overrides(shards_dir, full, family)])

    cut = tmp_path / "cut"
    args = ["train", "--config", str(SMOKE_CONFIG), *overrides(shards_dir, cut, family)]
    kill_after_checkpoint(args, cut, step=4)
    saved = sorted(
        int(p.name.split("-")[1]) for p in (cut / "checkpoints").glob("step-*") if "." not in p.name
    )
    assert saved and max(saved) < STEPS, f"the run was not interrupted (checkpoints {saved})"

    proc = run_pretrain(args)  # train.resume=auto picks the newest complete checkpoint
    assert f"trained {STEPS} steps" in proc.stdout

    ref, got = read_metrics(full), read_metrics(cut)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1)), "metrics.jsonl must hold each step once"
    for step in ref:
        for key in ("loss", "lr", "grad_norm", "consumed_samples"):
            assert got[step][key] == ref[step][key], (
                f"step {step} {key}: {got[step][key]!r} != {ref[step][key]!r}"
            )


def test_checkpoint_layout_and_resolved_config(shards_dir, tmp_path, run_pretrain):
    out = tmp_path / "run"
    run_pretrain(["train", "--config", str(SMOKE_CONFIG), *overrides(shards_dir, out, **{"train.steps": 8})])
    ckpts = out / "checkpoints"
    # keep_last=2: steps 4 and 8 remain; `latest` names the newest; nothing partial is left behind.
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-4", "step-8"]
    assert (ckpts / "latest").read_text().strip() == "step-8"
    meta = json.loads((ckpts / "step-8" / "meta.json").read_text())
    assert meta["step"] == 8 and meta["consumed_samples"] == 8 * 8 and meta["world_size"] == 1
    assert (ckpts / "step-8" / "tandem-rank-00000.pt").is_file()
    assert (out / "tb").is_dir() and any((out / "tb").iterdir())
    # The resolved config is usable again as --config: rerunning it resumes from step 8 and stops at 8.
    proc = run_pretrain(["train", "--config", str(out / "config.yaml")])
    assert "trained 8 steps" in proc.stdout
    assert (ckpts / "step-8" / "config.yaml").read_text() == (out / "config.yaml").read_text()
