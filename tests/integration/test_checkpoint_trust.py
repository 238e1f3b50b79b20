"""Checkpoints users can trust: a run killed at any point of a save resumes from the newest complete
checkpoint and reproduces the uninterrupted losses bit for bit; damaged or hostile checkpoints are refused
naming the file; `pretrain ckpt verify|inspect` report on them."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

from pretrain.checkpoint import MANIFEST, verify_checkpoint
from pretrain.cli import main
from tests.conftest import SMOKE_CONFIG, read_metrics, tiny_overrides

STEPS = 8


def args_for(shards, out, **extra):
    keys = {
        "train.steps": STEPS,
        "checkpoint.interval": 2,
        "checkpoint.keep_last": 2,
        "train.micro_batch_size": 4,
        "parallel.zero_stage": 1,
        **extra,
    }
    return ["train", "--config", str(SMOKE_CONFIG), *tiny_overrides(shards, out, **keys)]


@pytest.fixture(scope="module")
def reference(shards_dir, tmp_path_factory, run_pretrain_module):
    out = tmp_path_factory.mktemp("ref") / "run"
    run_pretrain_module(args_for(shards_dir, out), launcher="deepspeed", nprocs=2)
    return out


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("point", ["shards", "manifest", "latest", "prune"])
def test_kill_during_save_then_resume_is_bitwise(point, shards_dir, tmp_path, run_pretrain, reference):
    out = tmp_path / "run"
    # Killed while saving step 6 (by then steps 2 and 4 exist, so keep_last=2 prunes step 2 at step 6).
    crashed = run_pretrain(
        args_for(shards_dir, out),
        launcher="deepspeed",
        nprocs=2,
        check=False,
        env={"TANDEM_FAULT_INJECT": f"{point}:6"},
    )
    assert crashed.returncode != 0
    ckpts = out / "checkpoints"
    # A `step-N.partial` may hold a manifest already (killed before the rename): it is not a checkpoint.
    complete = sorted(
        (p.name for p in ckpts.glob("step-*") if p.name.split("-")[1].isdigit() and (p / MANIFEST).is_file()),
        key=lambda name: int(name.split("-")[1]),
    )
    # Before the rename only step-4 is complete; after it step-6 is (and `latest` may lag behind).
    assert complete[-1] == ("step-4" if point in ("shards", "manifest") else "step-6"), complete
    for name in complete:
        assert verify_checkpoint(ckpts / name) == [], name
    run_pretrain(args_for(shards_dir, out), launcher="deepspeed", nprocs=2)
    ref, got = read_metrics(reference), read_metrics(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in ref:
        assert float(got[step]["loss"]).hex() == float(ref[step]["loss"]).hex(), step
    assert not list(ckpts.glob("*.partial")) and not list(ckpts.glob(".deleting-*"))


@pytest.fixture(scope="module")
def small_run(shards_dir, tmp_path_factory, run_pretrain_module):
    out = tmp_path_factory.mktemp("small") / "run"
    run_pretrain_module(
        args_for(shards_dir, out, **{"train.steps": 2, "parallel.zero_stage": 0, "optimizer.decay_steps": 8})
    )
    return out


def copy_run(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def test_ckpt_verify_and_load_name_a_flipped_byte(small_run, tmp_path, capsys, run_pretrain, shards_dir):
    run = copy_run(small_run, tmp_path)
    ckpt = run / "checkpoints" / "step-2"
    assert main(["ckpt", "verify", str(ckpt)]) == 0
    target = ckpt / "mp_rank_00_model_states.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["ckpt", "verify", str(run / "checkpoints")]) == 1
    assert "mp_rank_00_model_states.pt: sha256 differs" in capsys.readouterr().out
    proc = run_pretrain(
        args_for(shards_dir, run, **{"train.steps": 4, "parallel.zero_stage": 0, "optimizer.decay_steps": 8}),
        check=False,
    )
    assert proc.returncode != 0 and "mp_rank_00_model_states.pt: sha256 differs" in proc.stderr


def test_ckpt_inspect(small_run, capsys):
    assert main(["ckpt", "inspect", str(small_run / "checkpoints" / "step-2"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["step"] == 2 and info["layout"] == {"tp": 1, "pp": 1, "dp": 1, "zero": 0}
    # model states, this rank's state, config.yaml, meta.json and the tokenizer
    assert info["consumed_samples"] == 16 and info["files"] == 5 and info["bytes"] > 0


class _Canary:
    """Unpickling this would create the canary file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_payload_in_a_checkpoint_is_refused(small_run, tmp_path, run_pretrain, shards_dir):
    run = copy_run(small_run, tmp_path)
    ckpt = run / "checkpoints" / "step-2"
    canary = tmp_path / "CANARY"
    target = ckpt / "mp_rank_00_model_states.pt"
    state = torch.load(target, weights_only=True)
    state["payload"] = _Canary(canary)
    torch.save(state, target, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    # Re-seal the manifest so only the unpickling defence stands between the payload and the loader.
    manifest = json.loads((ckpt / MANIFEST).read_text())
    from pretrain.checkpoint import build_manifest

    (ckpt / MANIFEST).write_text(
        json.dumps(build_manifest(ckpt, {k: v for k, v in manifest.items() if k != "files"}))
    )
    proc = run_pretrain(
        args_for(shards_dir, run, **{"train.steps": 4, "parallel.zero_stage": 0, "optimizer.decay_steps": 8}),
        check=False,
    )
    assert proc.returncode != 0
    assert "refused to load" in proc.stderr and "mp_rank_00_model_states.pt" in proc.stderr
    assert not canary.exists()


def test_yaml_with_a_python_tag_is_refused(tmp_path, capsys):
    canary = tmp_path / "CANARY"
    bad = tmp_path / "evil.yaml"
    bad.write_text(f"train:\n  out_dir: !!python/object/apply:os.system ['touch {canary}']\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert not canary.exists()


def test_incomplete_checkpoints_are_never_resumed(small_run, tmp_path):
    from pretrain.checkpoint import Checkpointer

    run = copy_run(small_run, tmp_path)
    ckpts = run / "checkpoints"
    shutil.copytree(ckpts / "step-2", ckpts / "step-9.partial")
    shutil.copytree(ckpts / "step-2", ckpts / "step-8")
    (ckpts / "step-8" / MANIFEST).unlink()  # renamed but manifest never written: not complete
    checkpointer = Checkpointer(run, None, rank=0, world_size=1)
    assert checkpointer.resolve("auto") == ckpts / "step-2"
    with pytest.raises(FileNotFoundError, match="not a complete Tandem checkpoint"):
        checkpointer.resolve(str(ckpts / "step-8"))
