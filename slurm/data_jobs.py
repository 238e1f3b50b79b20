"""The Slurm executor of the data-preparation jobs: every stage of a prepared job as one job array.

`pretrain data shard|clean --executor slurm --tasks N` plans the job (data_pipeline.jobs.prepare_job) and hands
it here. Each stage with unfinished tasks becomes one array of at most N array tasks; array task I runs the
stage's tasks I, I+N, I+2N, ... (`python -m data_pipeline.executors OUT STAGE --stride N`), and the merge is
one task. A stage's array is submitted with `--dependency=afterok:<previous stage's array>` and
`--kill-on-invalid-dep=yes`, so it starts when every array task before it has succeeded and is cancelled when
one has failed for good. On a rerun only the array indices that still own unfinished tasks are submitted,
and a stage whose tasks are all done is left out: the completion markers decide, not Slurm's history.

Slurm is the scheduler; nothing here schedules. The scripts come from slurm/templates/data_array.sbatch
through the same checks, quoting and `sbatch` call as `pretrain slurm submit` (slurm/render.py).
The scripts are kept in OUT/.work/slurm/STAGE.sbatch, and each submission is appended to
OUT/.work/slurm_jobs.jsonl, which `pretrain data status` reads.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

from data_pipeline.pipeline import STAGES, WORK_DIR, Job, task_ids
from slurm.render import (
    TEMPLATES,
    SlurmError,
    account_lines,
    check_job_fields,
    export_lines,
    log_path,
    run_sbatch,
)

__all__ = [
    "DEFAULT_RETRIES",
    "DataJobSpec",
    "StagePlan",
    "Submitted",
    "active_jobs",
    "array_spec",
    "plan_stages",
    "refuse_while_active",
    "render_stage",
    "submissions",
    "submit_job",
    "validate",
    "wait_for",
]

DEFAULT_RETRIES = 2
DEFAULT_JOB_NAME = "tandem-data"
SUBMISSIONS = "slurm_jobs.jsonl"  # in OUT/.work


@dataclass(frozen=True, kw_only=True)
class DataJobSpec:
    """How the stages of one data job are submitted."""

    tasks: int  # array tasks per stage (at most the stage's own number of tasks)
    time: str  # per array task: HH:MM:SS or D-HH:MM:SS
    partition: str | None = None
    account: str | None = None
    job_name: str = DEFAULT_JOB_NAME  # each stage's array is JOB_NAME-STAGE
    log_dir: Path = Path("slurm-logs")
    workdir: Path = field(default_factory=Path.cwd)
    python: str = sys.executable
    env: Mapping[str, str] = field(default_factory=dict)
    retries: int = DEFAULT_RETRIES  # times a failed array task requeues itself before it fails
    max_running: int | None = None  # Slurm's array throttle (--array=...%M); None: no limit


@dataclass(frozen=True)
class StagePlan:
    """One stage's array: the stage's `tasks`, the `stride` between an array task's tasks, and the array
    `indices` that own at least one unfinished task."""

    stage: str
    tasks: int
    stride: int
    indices: tuple[int, ...]


@dataclass(frozen=True)
class Submitted:
    stage: str
    job_id: int
    array: str


def validate(spec: DataJobSpec) -> None:
    """Checks every field; raises one SlurmError naming each problem's field and value."""
    problems = check_job_fields(
        time=spec.time,
        partition=spec.partition,
        account=spec.account,
        job_name=spec.job_name,
        log_dir=spec.log_dir,
        env=spec.env,
    )
    if spec.tasks < 1:
        problems.append(f"tasks={spec.tasks} must be at least 1")
    if spec.retries < 0:
        problems.append(f"retries={spec.retries} must be at least 0")
    if spec.max_running is not None and spec.max_running < 1:
        problems.append(f"max_running={spec.max_running} must be at least 1")
    if problems:
        raise SlurmError("; ".join(problems))


def plan_stages(job: Job, tasks: int) -> list[StagePlan]:
    """The arrays to submit, in stage order: only stages with unfinished tasks, only the indices owning one."""
    plans = []
    for stage, n in job.stages():
        pending = task_ids(job, stage)
        if not pending:
            continue
        stride = min(tasks, n)
        plans.append(StagePlan(stage, n, stride, tuple(sorted({t % stride for t in pending}))))
    return plans


def array_spec(indices: Sequence[int], max_running: int | None = None) -> str:
    """`--array` value: runs of consecutive indices as ranges (`0-3,5,7-8`), then `%M` to throttle."""
    if not indices or any(i < 0 for i in indices):
        raise SlurmError(f"array indices {list(indices)!r}: expected non-negative integers")
    parts: list[str] = []
    ordered = sorted(set(indices))
    start = prev = ordered[0]
    for i in [*ordered[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(parts) + (f"%{max_running}" if max_running else "")


def render_stage(spec: DataJobSpec, out_dir: Path, plan: StagePlan) -> str:
    """The sbatch script of one stage's array (the spec is validated first)."""
    validate(spec)
    if plan.stage not in STAGES:
        raise SlurmError(f"stage={plan.stage!r}: expected one of {', '.join(STAGES)}")
    values = {
        "job_name": f"{spec.job_name}-{plan.stage}",
        "array": array_spec(plan.indices, spec.max_running),
        "time": spec.time,
        "log_dir": str(spec.log_dir),
        "extra_sbatch": "\n".join(account_lines(spec.partition, spec.account)),
        "exports": "\n".join(export_lines(spec.env)),  # plain shell text: not template-expanded again
        "workdir": shlex.quote(str(spec.workdir)),
        "python": shlex.quote(spec.python),
        "out_dir": shlex.quote(str(out_dir)),
        "stage": plan.stage,
        "stride": str(plan.stride),
        "stage_tasks": str(plan.tasks),
        "retries": str(spec.retries),
    }
    return Template((TEMPLATES / "data_array.sbatch").read_text()).substitute(values)


def _dependency_args(after: int | str | None) -> list[str]:
    return [] if after is None else [f"--dependency=afterok:{after}"]


def script_path(out_dir: Path, stage: str) -> Path:
    """Where a stage's script is written: in the job's own directory, so that two jobs submitted at once
    (with the same job name and log directory) never overwrite each other's script before sbatch reads it."""
    return Path(out_dir) / WORK_DIR / "slurm" / f"{stage}.sbatch"


def dry_run(job: Job, spec: DataJobSpec) -> str:
    """What `--dry-run` prints: each stage's sbatch command line, then its script."""
    out = []
    previous: str | None = None
    for plan in plan_stages(job, spec.tasks):
        script = render_stage(spec, Path(job.out_dir), plan)
        argv = [
            "sbatch",
            *_dependency_args(previous),
            "--chdir",
            str(spec.workdir),
            str(script_path(Path(job.out_dir), plan.stage)),
        ]
        out.append(f"# {plan.stage}: {shlex.join(argv)}\n{script}")
        previous = f"<job id of {plan.stage}>"
    return "\n".join(out) if out else f"# {job.out_dir}: every task is done; nothing to submit\n"


def refuse_while_active(out_dir: Path, *, squeue: str = "squeue") -> None:
    """Raise a SlurmError if Slurm still has arrays submitted for the job in `out_dir` pending or running:
    a second run of the job (on Slurm or on this machine) would write the same task's files at once."""
    earlier = active_jobs([s["job_id"] for s in submissions(out_dir)], squeue=squeue)
    if earlier:
        listed = ", ".join(f"{j} ({state.lower()})" for j, state in sorted(earlier.items()))
        raise SlurmError(
            f"{out_dir}: Slurm still has jobs {listed} of this data job; wait for them to end (pretrain data "
            f"status {out_dir}) or scancel them, then run the command again"
        )


def submit_job(
    job: Job,
    spec: DataJobSpec,
    *,
    sbatch: str = "sbatch",
    squeue: str = "squeue",
    environ: Mapping[str, str] | None = None,
) -> list[Submitted]:
    """Submit the arrays of every stage with unfinished tasks, each after the previous one (afterok).

    Returns what was submitted, in stage order (empty when the job is finished). All scripts are rendered
    before the first submission, so a bad value submits nothing. Refused while arrays submitted for this
    job before are still pending or running: two array tasks on one task would write the same files."""
    validate(spec)
    out_dir = Path(job.out_dir)
    refuse_while_active(out_dir, squeue=squeue)
    plans = plan_stages(job, spec.tasks)
    scripts = [render_stage(spec, out_dir, plan) for plan in plans]
    log_dir = log_path(spec.log_dir, spec.workdir)
    submitted: list[Submitted] = []
    for plan, script in zip(plans, scripts, strict=True):
        after = submitted[-1].job_id if submitted else None
        try:
            _, job_id = run_sbatch(
                script,
                script_path(out_dir, plan.stage),
                workdir=spec.workdir,
                log_dir=log_dir,
                args=_dependency_args(after),
                sbatch=sbatch,
                environ=environ,
            )
        except SlurmError as exc:
            if not submitted:
                raise
            earlier = ", ".join(f"{s.stage} (job {s.job_id})" for s in submitted)
            raise SlurmError(
                f"{exc}; submitted before it: {earlier}. Let them end, then rerun this command for the rest, "
                "or scancel them"
            ) from exc
        done = Submitted(plan.stage, job_id, array_spec(plan.indices, spec.max_running))
        submitted.append(done)
        _record(out_dir, done, after)
    return submitted


def _record(out_dir: Path, done: Submitted, after: int | None) -> None:
    entry = {
        "stage": done.stage,
        "job_id": done.job_id,
        "array": done.array,
        "after": after,
        "time": time.time(),
    }
    with open(out_dir / WORK_DIR / SUBMISSIONS, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


def submissions(out_dir: str | Path) -> list[dict]:
    """Every array submitted for the job in OUT, oldest first ([] if none)."""
    path = Path(out_dir) / WORK_DIR / SUBMISSIONS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


_JOB_ID = re.compile(r"\d+(?:_\d+)?")


def active_jobs(job_ids: Iterable[int | str], *, squeue: str = "squeue") -> dict[str, str] | None:
    """{job id: state} of the given jobs (array jobs by their array id, or array tasks by their own job id)
    that Slurm still has pending, running or requeued; None when squeue cannot be asked."""
    ids = sorted({str(j) for j in job_ids})
    bad = [j for j in ids if not _JOB_ID.fullmatch(j)]
    if bad:
        raise SlurmError(f"job ids {bad!r}: expected numbers")
    if not ids:
        return {}
    exe = shutil.which(squeue)
    if exe is None:
        return None
    proc = subprocess.run(
        [exe, "-h", "-j", ",".join(ids), "-o", "%F %A %i %T"], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        # Every id forgotten (MinJobAge passed): squeue calls them invalid. Nothing of ours is active then.
        return {} if "Invalid job id" in proc.stderr else None
    active: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        array_id, job_id, name, state = line.split()
        for key in (array_id, job_id, name):
            if key in ids:
                active[key] = state
    return active


def wait_for(
    submitted: Sequence[Submitted],
    *,
    poll_s: float = 2.0,
    timeout_s: float | None = None,
    on_poll: Callable[[dict[str, str]], None] | None = None,
    squeue: str = "squeue",
) -> None:
    """Return when Slurm has none of the submitted arrays pending or running any more (finished, failed or
    cancelled: the job's markers say which). `on_poll` sees each poll's {job id: state}."""
    ids = [s.job_id for s in submitted]
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    misses = 0
    while True:
        active = active_jobs(ids, squeue=squeue)
        if active is None:
            misses += 1
            if misses >= 5:
                raise SlurmError(f"squeue did not answer about jobs {ids} five times in a row")
        else:
            misses = 0
            if on_poll is not None:
                on_poll(active)
            if not active:
                return
        if deadline is not None and time.monotonic() > deadline:
            raise SlurmError(f"jobs {ids} still active after {timeout_s:g} s")
        time.sleep(poll_s)
