"""The comparison behind `pretrain ckpt replay` and `train.verify_resume` (pretrain/replay.py) on records
written by hand: logging windows, skipped steps, bitwise vs relative tolerance, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pretrain.config import ConfigError, load_config
from pretrain.replay import (
    Comparison,
    Observed,
    Reference,
    ReplayError,
    ResumeCheck,
    ResumeMismatch,
    compare_step,
    format_table,
    parse_layout,
    reference_path,
    replay,
    replay_train_args,
)


def write_metrics(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 9, "lo', encoding="utf-8")
    return path


def comparison(start: int, steps: int, *, rtol: float | None = None) -> Comparison:
    layout = {"tp": 1, "pp": 1, "dp": 1}
    return Comparison(
        checkpoint="ckpt",
        reference="metrics.jsonl",
        start=start,
        steps=steps,
        mode="bitwise" if rtol is None else "rtol",
        rtol=rtol,
        saved_layout=layout,
        layout=layout,
    )


def record(step: int, loss: float, *, grad_norm: float | None = 1.5, lr: float = 1e-3) -> dict:
    return {"step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr, "consumed_samples": 8 * step}


def observed(
    step: int, loss: float | None, *, grad_norm: float = 1.5, skipped: str | None = None
) -> Observed:
    return Observed(loss=loss, skipped=skipped, grad_norm=grad_norm, lr=1e-3, consumed_samples=8 * step)


def run(c: Comparison, ref: Reference, obs: dict[int, Observed]) -> Comparison:
    seen: dict[int, Observed] = {}
    for step in sorted(obs):
        seen[step] = obs[step]
        compare_step(c, ref, seen, step)
    return c


def test_every_step_logged_equal_then_a_difference_names_step_and_quantity(tmp_path):
    path = write_metrics(tmp_path / "m.jsonl", [record(s, 5.0 - 0.1 * s) for s in range(1, 7)])
    ref = Reference.read(path, after=3)
    assert len(ref.later_lines) == 3  # steps 4-6 kept verbatim; the line cut short is skipped
    c = run(comparison(3, 2), ref, {4: observed(4, 4.6), 5: observed(5, 4.5)})
    assert c.verdict == "equal" and len(c.rows) == 8
    c = run(comparison(3, 2), ref, {4: observed(4, 4.6), 5: observed(5, 4.5 + 1e-12)})
    assert c.verdict == "differs" and (c.first_mismatch.step, c.first_mismatch.quantity) == (5, "loss")
    assert "step 5 loss differs" in c.message()
    assert "DIFFERS" in format_table(c)


def test_relative_tolerance_applies_to_loss_and_grad_norm_only(tmp_path):
    path = write_metrics(tmp_path / "m.jsonl", [record(s, 4.0) for s in range(1, 4)])
    ref = Reference.read(path, after=1)
    close = {2: observed(2, 4.0 * (1 + 5e-6), grad_norm=1.5 * (1 - 5e-6)), 3: observed(3, 4.0)}
    assert run(comparison(1, 2, rtol=1e-5), ref, close).verdict == "equal"
    far = {2: observed(2, 4.0 * (1 + 2e-5)), 3: observed(3, 4.0)}
    c = run(comparison(1, 2, rtol=1e-5), ref, far)
    assert (c.first_mismatch.step, c.first_mismatch.quantity) == (2, "loss")
    shifted = {2: Observed(loss=4.0, skipped=None, grad_norm=1.5, lr=1e-3, consumed_samples=17)}
    c = run(comparison(1, 1, rtol=1e-5), ref, shifted)
    assert c.first_mismatch.quantity == "consumed_samples"  # bookkeeping is exact at any layout


def test_logging_windows_are_averaged_as_the_loop_does_and_a_window_before_the_checkpoint_is_left_out(
    tmp_path,
):
    # train.log_interval=2: records at steps 2, 4, 6, each the mean of its two steps. A checkpoint at step 3
    # splits the window 3-4, which the resumed run cannot reproduce; the window 5-6 it can.
    losses = {3: 4.3, 4: 4.1, 5: 3.7, 6: 3.3}
    path = write_metrics(
        tmp_path / "m.jsonl",
        [
            record(2, 4.5),
            record(4, (losses[3] + losses[4]) / 2),
            record(6, (0.0 + losses[5] + losses[6]) / 2),
        ],
    )
    ref = Reference.read(path, after=3)
    c = run(comparison(3, 3), ref, {s: observed(s, losses[s]) for s in (4, 5, 6)})
    assert [r.step for r in c.rows] == [6] * 4 and c.verdict == "equal"
    assert any("steps 3-4" in n and "not compared" in n for n in c.notes)
    assert ref.first_comparable(after=3) == 6 and ref.first_comparable(after=4) == 6
    assert ref.first_comparable(after=2) == 4 and ref.first_comparable(after=6) is None


def test_skipped_steps_compare_by_verdict_and_leave_the_window(tmp_path):
    path = write_metrics(
        tmp_path / "m.jsonl",
        [
            record(1, 5.0),
            {"step": 2, "skipped": "non-finite loss or gradient", "skipped_total": 1},
            record(3, 4.0),
        ],
    )
    ref = Reference.read(path, after=1)
    skipped = observed(2, None, skipped="non-finite loss or gradient")
    c = run(comparison(1, 2), ref, {2: skipped, 3: observed(3, 4.0)})
    assert c.verdict == "equal" and c.rows[0].quantity == "skipped"
    c = run(comparison(1, 2), ref, {2: observed(2, 4.5), 3: observed(3, 4.0)})
    assert (c.first_mismatch.step, c.first_mismatch.quantity) == (2, "skipped")


def test_nothing_to_compare_is_its_own_verdict(tmp_path):
    ref = Reference.read(write_metrics(tmp_path / "m.jsonl", [record(1, 5.0)]), after=1)
    c = run(comparison(1, 1), ref, {2: observed(2, 4.0)})
    assert c.verdict == "unchecked" and not c.rows


def test_report_round_trips_through_json():
    c = comparison(3, 2, rtol=1e-5)
    c.notes.append("a note")
    back = Comparison.from_json(json.loads(json.dumps(c.to_json())))
    assert back == c


def test_reference_is_the_checkpoint_runs_metrics_or_the_reshard_source(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "step-3"
    ckpt.mkdir(parents=True)
    assert reference_path(ckpt) == tmp_path / "run" / "metrics.jsonl"
    copy = tmp_path / "elsewhere" / "step-3-tp2"
    copy.mkdir(parents=True)
    (copy / "meta.json").write_text(json.dumps({"resharded_from": {"path": str(ckpt)}}))
    assert reference_path(copy) == tmp_path / "run" / "metrics.jsonl"


def test_replay_refuses_bad_input_naming_it(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    with pytest.raises(ReplayError, match=r"--out .*run: exists and is not an empty directory"):
        replay(tmp_path / "ckpt", out=tmp_path / "run")
    with pytest.raises(ReplayError, match=r"--steps 0"):
        replay(tmp_path / "ckpt", steps=0)
    with pytest.raises(ReplayError, match=r"ckpt/manifest.json: missing"):
        replay(tmp_path / "ckpt")
    ckpt = tmp_path / "run" / "checkpoints" / "step-3"
    ckpt.mkdir(parents=True)
    (ckpt / "manifest.json").write_text(json.dumps({"step": 3, "files": {}}))
    with pytest.raises(ReplayError, match=r"step-3/config.yaml: missing"):
        replay(ckpt)
    (ckpt / "config.yaml").write_text("{}\n")
    write_metrics(tmp_path / "run" / "metrics.jsonl", [record(2, 5.0), record(4, 4.0), record(6, 3.0)])
    with pytest.raises(ReplayError, match=r"--steps 2: .* the first is step 6: give --steps 3 or more"):
        replay(ckpt, steps=2)
    write_metrics(tmp_path / "run" / "metrics.jsonl", [record(2, 5.0), record(3, 4.0)])
    with pytest.raises(ReplayError, match=r"no record past step 3 .*last record: step 3"):
        replay(ckpt)


def test_layout_option_and_config_key_are_checked():
    assert parse_layout("tp=2", {"tp": 1, "pp": 2, "dp": 4}) == {"tp": 2, "pp": 2, "dp": 4}
    with pytest.raises(ReplayError, match=r"--layout 'tp=2,ep=2'.*'ep=2'"):
        parse_layout("tp=2,ep=2", {})
    with pytest.raises(ReplayError, match="'tp=0'"):
        parse_layout("tp=0", {})
    with pytest.raises(ConfigError, match=r"train\.verify_resume"):
        load_config(None, ["data.shards=x", "train.verify_resume=-1"])


def test_resume_check_stops_at_the_first_difference_and_puts_the_original_records_back(tmp_path):
    """In one process (no collective): the check a resumed run makes in its own directory."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = write_metrics(run_dir / "metrics.jsonl", [record(s, 5.0 - 0.1 * s) for s in range(1, 7)])
    original = path.read_text()
    check = ResumeCheck(comparison(3, 2), Reference.read(path, after=3), rank=0, run_dir=run_dir)
    # The resumed run's logger truncates the file at step 3 and logs its own step 4.
    path.write_text("".join(original.splitlines(keepends=True)[:3]) + json.dumps(record(4, 9.0)) + "\n")
    with pytest.raises(ResumeMismatch, match=r"step 4 loss differs .*: 9\.0 now, 4\.6 before"):
        check.observe(4, loss=9.0, skipped=None, grad_norm=1.5, lr=1e-3, consumed_samples=32, last_step=6)
    assert path.read_text() == original.rpartition("\n")[0] + "\n"  # minus the line cut short
    assert json.loads((run_dir / "resume-check.json").read_text())["verdict"] == "differs"

    quiet = ResumeCheck(comparison(6, 2), Reference.read(path, after=6), rank=0, run_dir=run_dir)
    assert not quiet.observe(
        7, loss=4.0, skipped=None, grad_norm=1.0, lr=1e-3, consumed_samples=56, last_step=9
    )
    assert quiet.observe(8, loss=4.0, skipped=None, grad_norm=1.0, lr=1e-3, consumed_samples=64, last_step=9)
    assert (
        quiet.comparison.verdict == "unchecked"
        and "no comparable record of steps 7-8" in quiet.comparison.message()
    )


def test_replay_keeps_the_original_decay_length_when_it_stops_early(tmp_path):
    """The replay ends at train.steps=N+K; 'decay over train.steps' (optimizer.decay_steps=0) must still
    name the original length, or validation refuses a warmup longer than N+K."""
    ckpt = tmp_path / "step-3"
    ckpt.mkdir()
    args = dict(start=3, steps=2, layout={"tp": 2, "pp": 1, "dp": 1}, out_dir=tmp_path / "out", overrides=[])
    (ckpt / "config.yaml").write_text("train: {steps: 500}\noptimizer: {decay_steps: 0, warmup_steps: 100}\n")
    got = replay_train_args(ckpt, **args)
    assert "optimizer.decay_steps=500" in got and "train.steps=5" in got and "parallel.tp=2" in got
    (ckpt / "config.yaml").write_text("train: {steps: 500}\noptimizer: {decay_steps: 400}\n")
    assert not any(a.startswith("optimizer.decay_steps") for a in replay_train_args(ckpt, **args))
