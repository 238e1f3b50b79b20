"""`pretrain ckpt replay` and `train.verify_resume` (pretrain/replay.py) on one source run: gpt-tiny, one
process, 6 steps of one sample each, a checkpoint at step 3, every step logged.

- An untouched checkpoint replays bitwise at its own layout, and within 1e-5 at tp=2 (fp32, dropout 0:
  only the order of the row-parallel and vocab-parallel sums changes; seen ~1e-7 relative).
- A copy whose loader position is moved by one sample differs at step 4 (other samples); a copy with one
  Adam moment scaled by 1.5 differs at step 5 (step 4's loss and gradient come before its update). Each copy
  is re-sealed (its manifest rewritten), as a faulty conversion would leave it, so only the replay can tell.
  The global batch is one sample, so a position one sample off is one the loader accepts (it refuses a
  position inside a global batch).
- `train.verify_resume=2` stops a tp=2 resume of the Adam-tampered copy in the copy's own run directory,
  and leaves the original records in its metrics.jsonl.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import SMOKE_CONFIG, free_port, tiny_overrides

START, TIMEOUT = 3, 240


@pytest.fixture(scope="module")
def source(shards_dir, tmp_path_factory, run_pretrain_module) -> Path:
    out = tmp_path_factory.mktemp("replay") / "source"
    keys = {
        "train.steps": 6,
        "train.micro_batch_size": 1,
        "train.global_batch_size": 1,
        "checkpoint.interval": START,
        "checkpoint.keep_last": 0,
    }
    run_pretrain_module(["train", "--config", str(SMOKE_CONFIG), *tiny_overrides(shards_dir, out, **keys)])
    return out


def copy_run(source: Path, dest: Path) -> Path:
    """The run directory with only its step-3 checkpoint (no converted copies: they would be stale)."""
    shutil.copytree(
        source, dest, ignore=shutil.ignore_patterns("*.reshard-*", "*.universal", f"step-{2 * START}")
    )
    return dest / "checkpoints" / f"step-{START}"


def reseal(ckpt: Path) -> None:
    from pretrain.checkpoint import MANIFEST, build_manifest, read_manifest

    meta = {k: v for k, v in read_manifest(ckpt).items() if k not in ("files", "format", "version")}
    (ckpt / MANIFEST).write_text(json.dumps(build_manifest(ckpt, meta), indent=2))


def shift_loader(ckpt: Path, samples: int) -> None:
    for f in ckpt.glob("tandem-rank-*.pt"):
        own = torch.load(f, weights_only=True)
        own["state"]["loader"]["consumed_samples"] += samples
        torch.save(own, f)
    reseal(ckpt)


def scale_adam_moment(ckpt: Path, factor: float) -> None:
    """exp_avg of the optimizer's first parameter (the token embedding) times `factor`."""
    from pretrain.checkpoint import _allowed_deepspeed_globals

    f = ckpt / "mp_rank_00_model_states.pt"
    with torch.serialization.safe_globals(_allowed_deepspeed_globals()):
        engine_state = torch.load(f, weights_only=True)
    engine_state["optimizer"]["state"][0]["exp_avg"].mul_(factor)
    torch.save(engine_state, f)
    reseal(ckpt)


def replay(run_pretrain, ckpt: Path, *extra: str):
    proc = run_pretrain(
        ["ckpt", "replay", str(ckpt), "--json", "--timeout-s", str(TIMEOUT), *extra],
        check=False,
        timeout=TIMEOUT + 30,
    )
    assert proc.stdout.strip(), proc.stderr[-3000:]
    return proc, json.loads(proc.stdout.strip().splitlines()[-1])


def test_untouched_checkpoint_replays_bitwise(source, run_pretrain):
    proc, report = replay(run_pretrain, source / "checkpoints" / f"step-{START}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report["verdict"] == "equal" and report["mode"] == "bitwise"
    assert {(r["step"], r["quantity"]) for r in report["rows"]} == {
        (s, q) for s in (4, 5) for q in ("loss", "grad_norm", "lr", "consumed_samples")
    }
    assert all(r["original"] == r["replay"] for r in report["rows"])


def test_loader_one_sample_off_differs_at_the_first_step(source, tmp_path, run_pretrain):
    ckpt = copy_run(source, tmp_path / "run")
    shift_loader(ckpt, 1)
    proc, report = replay(run_pretrain, ckpt)
    assert proc.returncode == 1, proc.stderr[-3000:]
    first = report["first_mismatch"]
    assert (first["step"], first["quantity"]) == (START + 1, "loss"), first
    assert f"step {START + 1} loss differs" in proc.stderr


def test_perturbed_adam_moment_differs_at_the_second_step(source, tmp_path, run_pretrain):
    ckpt = copy_run(source, tmp_path / "run")
    scale_adam_moment(ckpt, 1.5)
    proc, report = replay(run_pretrain, ckpt)
    assert proc.returncode == 1, proc.stderr[-3000:]
    first = report["first_mismatch"]
    assert (first["step"], first["quantity"]) == (START + 2, "loss"), first
    assert all(r["equal"] for r in report["rows"] if r["step"] == START + 1)  # before the update: equal


@pytest.mark.distributed
def test_replay_at_another_layout_within_tolerance(source, run_pretrain):
    proc, report = replay(
        run_pretrain,
        source / "checkpoints" / f"step-{START}",
        "--layout",
        "tp=2",
        "--master-port",
        str(free_port()),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report["verdict"] == "equal" and report["mode"] == "rtol" and report["rtol"] == 1e-5
    assert report["layout"] == {"tp": 2, "pp": 1, "dp": 1}
    assert sorted({r["step"] for r in report["rows"]}) == [4, 5]


@pytest.mark.distributed
def test_verify_resume_stops_a_resharded_resume_of_a_tampered_checkpoint(source, tmp_path, run_pretrain):
    ckpt = copy_run(source, tmp_path / "run")
    scale_adam_moment(ckpt, 1.5)
    run = ckpt.parent.parent
    before = (run / "metrics.jsonl").read_text()
    proc = run_pretrain(
        [
            "train",
            "--config",
            str(run / "config.yaml"),
            f"train.out_dir={run}",
            "parallel.tp=2",
            "train.verify_resume=2",
        ],
        launcher="deepspeed",
        nprocs=2,
        check=False,
        timeout=TIMEOUT,
    )
    assert proc.returncode != 0
    assert "(reshard load)" in proc.stdout
    assert f"train.verify_resume=2: resumed from {ckpt}" in proc.stderr
    assert f"step {START + 2} loss differs" in proc.stderr
    # Stopped before any checkpoint of the different run; the original records are back in place.
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*") if "." not in p.name) == [
        f"step-{START}"
    ]
    assert (run / "metrics.jsonl").read_text() == before
    assert json.loads((run / "resume-check.json").read_text())["verdict"] == "differs"
