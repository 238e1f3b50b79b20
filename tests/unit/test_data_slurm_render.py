"""The Slurm data executor without a cluster: array specs from the task markers, the rendered stage scripts
(array, dependency, requeue, quoting) executed by bash with Slurm's commands stubbed, the checks that name
the flag, and `pretrain data status` on a local job. On a cluster: tests/integration/test_data_slurm.py."""

from __future__ import annotations

import json
import re
import socket
import subprocess
from pathlib import Path

import pytest

from data_pipeline.clean import CleanConfig
from data_pipeline.jobs import prepare_job
from data_pipeline.pipeline import Job, run_task
from data_pipeline.sample_corpus import write_sample_corpus
from pretrain.cli import main
from slurm.data_jobs import DataJobSpec, StagePlan, array_spec, dry_run, plan_stages, render_stage, validate
from slurm.render import SlurmError
from tests.unit.test_launch import HOSTILE

PY = "/usr/bin/python3"


@pytest.fixture
def corpus(tmp_path: Path) -> list[Path]:
    return write_sample_corpus(tmp_path / "corpus", docs=40, seed=0, docs_per_file=10)  # 4 files


def _spec(**kw) -> DataJobSpec:
    base = dict(tasks=3, time="01:00:00", workdir=Path("/work dir"), python=PY, log_dir=Path("logs"))
    base.update(kw)
    return DataJobSpec(**base)


def test_array_spec_packs_runs_of_indices():
    assert array_spec([0, 1, 2]) == "0-2"
    assert array_spec([1]) == "1"
    assert array_spec([5, 0, 2, 3]) == "0,2-3,5"
    assert array_spec([0, 1, 4], max_running=2) == "0-1,4%2"
    with pytest.raises(SlurmError):
        array_spec([])


def test_a_rerun_plans_only_the_indices_that_own_unfinished_tasks(corpus, tmp_path):
    job = prepare_job("clean", corpus, tmp_path / "out", clean=CleanConfig(), buckets=2)
    assert [(p.stage, p.tasks, p.stride, p.indices) for p in plan_stages(job, 3)] == [
        ("read", 4, 3, (0, 1, 2)),
        ("dedupe", 2, 2, (0, 1)),
        ("write", 4, 3, (0, 1, 2)),
        ("merge", 1, 1, (0,)),
    ]
    for task in (0, 3, 1):  # array index 0 (tasks 0 and 3) and 1 (task 1) are done; 2 owns task 2
        run_task(job.out_dir, "read", task)
    assert plan_stages(job, 3)[0] == StagePlan("read", 4, 3, (2,))
    assert plan_stages(job, 1)[0] == StagePlan("read", 4, 1, (0,))
    run_task(job.out_dir, "read", 2)
    assert [p.stage for p in plan_stages(job, 3)] == ["dedupe", "write", "merge"]  # a done stage is left out


def test_stage_script_has_the_array_the_requeue_and_the_stride():
    plan = StagePlan("write", 7, 3, (1, 2))
    script = render_stage(_spec(partition="cpu", account="proj-1", max_running=2), Path("/data/out"), plan)
    for line in [
        "#SBATCH --job-name=tandem-data-write",
        "#SBATCH --array=1-2%2",
        "#SBATCH --ntasks=1",
        "#SBATCH --time=01:00:00",
        "#SBATCH --output=logs/%x-%A_%a.out",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        "#SBATCH --kill-on-invalid-dep=yes",
        "#SBATCH --partition=cpu",
        "#SBATCH --account=proj-1",
        "cd '/work dir' || exit 1",
        f"{PY} -u -m data_pipeline.executors /data/out write --stride 3",
        'if [ "$status" -ne 0 ] && [ "$restart" -lt 2 ]; then',
        '    scontrol requeue "$array_task" && exit 0',
    ]:
        assert line in script, line
    lines = script.splitlines()
    first_cmd = next(i for i, ln in enumerate(lines) if ln and not ln.startswith("#"))
    assert all(i < first_cmd for i, ln in enumerate(lines) if ln.startswith("#SBATCH"))


def test_dry_run_shows_each_stage_after_the_previous_one(corpus, tmp_path):
    job = prepare_job("clean", corpus, tmp_path / "out", clean=CleanConfig(), buckets=2)
    text = dry_run(job, _spec())
    heads = [ln for ln in text.splitlines() if ln.startswith("# ") and ": sbatch" in ln]
    assert [h.split(":")[0] for h in heads] == ["# read", "# dedupe", "# write", "# merge"]
    assert "--dependency" not in heads[0]
    for previous, head in zip(("read", "dedupe", "write"), heads[1:], strict=True):
        assert f"--dependency=afterok:<job id of {previous}>" in head
    assert text.count("#!/bin/bash") == 4


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(tasks=0), "tasks=0"),
        (dict(time="1:00"), "time='1:00'"),
        (dict(partition="a b"), "partition='a b'"),
        (dict(account="$(touch CANARY)"), "account="),
        (dict(job_name="x\n#SBATCH --uid=0"), "job_name="),
        (dict(log_dir=Path("logs dir")), "log_dir="),
        (dict(env={"bad-name": "1"}), "environment name 'bad-name'"),
        (dict(retries=-1), "retries=-1"),
        (dict(max_running=0), "max_running=0"),
    ],
)
def test_spec_errors_name_the_field(kw, message):
    with pytest.raises(SlurmError) as exc:
        validate(_spec(**kw))
    assert message in str(exc.value)


def _run_script(tmp_path: Path, script: str, *, exit_code: int, env: dict[str, str]) -> tuple[int, str, Path]:
    """Runs a rendered stage script with bash; `python` is a stub that records its arguments and environment
    and exits `exit_code`, `scontrol` a stub that records its arguments."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    record = '#!/bin/bash\nprintf "%s\\0" "$@" > "$STUB_OUT/$(basename "$0").args"\n'
    (bindir / "python").write_text(record + f'env > "$STUB_OUT/python.env"\nexit {exit_code}\n')
    (bindir / "scontrol").write_text(record)
    for stub in bindir.iterdir():
        stub.chmod(0o755)
    (tmp_path / "job.sh").write_text(script)
    full_env = {"PATH": f"{bindir}:/usr/bin:/bin", "STUB_OUT": str(tmp_path), **env}
    proc = subprocess.run(["bash", str(tmp_path / "job.sh")], env=full_env, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr, bindir


ARRAY_ENV = {"SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "1", "SLURM_JOB_ID": "79"}


@pytest.mark.parametrize("value", HOSTILE)
def test_stage_script_passes_hostile_paths_and_values_as_data(tmp_path, value):
    work = tmp_path / f"work {value}"
    work.mkdir()
    out_dir = tmp_path / f"out {value}"
    spec = _spec(workdir=work, python=str(tmp_path / "bin" / "python"), env={"HOSTILE": value})
    script = render_stage(spec, out_dir, StagePlan("read", 5, 2, (0, 1)))
    code, output, _ = _run_script(tmp_path, script, exit_code=0, env=ARRAY_ENV)
    assert code == 0, output
    args = (tmp_path / "python.args").read_bytes().split(b"\0")[:-1]
    assert [a.decode() for a in args] == [
        "-u",
        "-m",
        "data_pipeline.executors",
        str(out_dir),
        "read",
        "--stride",
        "2",
    ]
    assert f"HOSTILE={value}\n" in (tmp_path / "python.env").read_text()
    assert "tasks 1, 3, ... of 5" in output and not (tmp_path / "scontrol.args").exists()
    assert not list(tmp_path.rglob("CANARY")) and list(work.iterdir()) == []


@pytest.mark.parametrize(("restarts", "requeued"), [("0", True), ("1", True), ("2", False)])
def test_a_failed_array_task_requeues_itself_up_to_the_retry_limit(tmp_path, restarts, requeued):
    spec = _spec(workdir=tmp_path, python=str(tmp_path / "bin" / "python"), retries=2)
    script = render_stage(spec, tmp_path / "out", StagePlan("write", 3, 3, (1,)))
    code, output, _ = _run_script(
        tmp_path, script, exit_code=3, env={**ARRAY_ENV, "SLURM_RESTART_COUNT": restarts}
    )
    if requeued:
        assert code == 0 and (tmp_path / "scontrol.args").read_bytes() == b"requeue\x0077_1\x00", output
        assert f"requeueing array task 77_1 (retry {int(restarts) + 1} of 2)" in output
    else:
        assert code == 3 and not (tmp_path / "scontrol.args").exists(), output
        assert "exited with status 3" in output


def test_stage_script_refuses_a_non_numeric_array_id(tmp_path):
    script = render_stage(_spec(workdir=tmp_path), tmp_path / "out", StagePlan("merge", 1, 1, (0,)))
    env = {"SLURM_ARRAY_JOB_ID": "1;touch CANARY", "SLURM_ARRAY_TASK_ID": "0"}
    code, output, _ = _run_script(tmp_path, script, exit_code=0, env=env)
    assert code == 1 and "not a Slurm array task" in output
    assert not (tmp_path / "CANARY").exists() and not (tmp_path / "python.args").exists()


# ----------------------------------------------------------------------------- the command line
def _clean(corpus: list[Path], out: Path, *flags: str) -> list[str]:
    return ["data", "clean", "--input", ",".join(map(str, corpus)), "--out", str(out), *flags]


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--executor", "slurm"], ["--executor slurm needs --tasks", "--executor slurm needs --time"]),
        (["--executor", "slurm", "--tasks", "0", "--time", "01:00:00"], ["--tasks 0: must be at least 1"]),
        (["--executor", "slurm", "--tasks", "2", "--time", "01:00:00", "--workers", "4"], ["--workers 4"]),
        (["--executor", "slurm", "--tasks", "2", "--time", "1:00"], ["time='1:00'"]),
        (
            ["--executor", "slurm", "--tasks", "2", "--time", "01:00:00", "--partition", "a;b"],
            ["partition='a;b'"],
        ),
        (["--executor", "slurm", "--tasks", "2", "--time", "01:00:00", "--env", "x-y=1"], ["'x-y'"]),
        (["--executor", "slurm", "--tasks", "2", "--time", "01:00:00", "--retries", "-1"], ["--retries -1"]),
        (
            ["--tasks", "2", "--time", "01:00:00", "--wait"],
            ["--tasks needs --executor slurm", "--wait needs"],
        ),
        (["--dry-run"], ["--dry-run needs --executor slurm"]),
        (
            ["--buckets", "0", "--piece-mb", "0"],
            ["--buckets 0: must be at least 1", "--piece-mb 0: must be > 0"],
        ),
    ],
)
def test_bad_executor_flags_exit_2_naming_the_flag(corpus, tmp_path, capsys, flags, needles):
    out = tmp_path / "out"
    assert main(_clean(corpus, out, *flags)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    for needle in needles:
        assert needle in err, err
    assert not out.exists()  # nothing claimed


def test_dry_run_prints_the_scripts_and_claims_nothing(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    flags = ["--executor", "slurm", "--tasks", "3", "--time", "00:30:00", "--dry-run", "--buckets", "2"]
    assert main(_clean(corpus, out, *flags)) == 0
    text = capsys.readouterr().out
    assert text.count("#SBATCH --array=") == 4 and "#SBATCH --array=0-2\n" in text
    assert f"-m data_pipeline.executors {out.resolve()} dedupe --stride 2" in text
    assert not out.exists()


def test_status_of_a_local_job(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_clean(corpus, out, "--buckets", "2", "--workers", "1")) == 0
    capsys.readouterr()
    assert main(["data", "status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "clean job, finished" in text
    assert re.search(r"^read\s+\[#{30}\]\s+4/4\s+0\s+0\s+0$", text, re.M), text
    # A task whose process is gone (its running marker left behind) is interrupted, not running.
    job = Job.load(out)
    (job.work / "write" / "done" / "000002.json").unlink()
    marker = job.work / "write" / "running" / "000002.json"
    marker.parent.mkdir(parents=True, exist_ok=True)
    # A pid above Linux's largest pid_max (2^22): no such process.
    marker.write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 1, "time": 0}))
    assert main(["data", "status", str(out), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    write = next(s for s in status["stages"] if s["stage"] == "write")
    assert not status["finished"] and (write["done"], write["interrupted"], write["running"]) == (3, 1, 0)
    assert status["slurm"] == []
    assert main(["data", "status", str(tmp_path / "nothing")]) == 2
    assert "no job here" in capsys.readouterr().err
