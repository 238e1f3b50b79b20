"""Rendering, validating and submitting Tandem's sbatch scripts.

The templates (slurm/templates/*.sbatch) are `string.Template`s. Every value that reaches the script is
either checked against a narrow pattern (numbers, `HH:MM:SS`, Slurm names in `#SBATCH` lines, which sbatch
reads without a shell) or shell-quoted with `shlex.quote` (paths, training arguments, environment values).
`sbatch` itself is run with an argument list.

The checks of the fields every Tandem job has (time, partition, account, job name, log directory,
environment), the `#SBATCH` lines for partition and account, the `export` lines and the `sbatch` call are
shared with the data-preparation job arrays (slurm/data_jobs.py): `check_job_fields`, `account_lines`,
`export_lines`, `run_sbatch`.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Literal

from launch.commands import default_env, validate_env

TEMPLATES = Path(__file__).resolve().parent / "templates"
DEFAULT_GRACE_S = 120
DEFAULT_MASTER_PORT = 29500
TASK_WAIT_S = 120  # srun --wait: how long the other tasks may run on after the first one ended

_TIME = re.compile(r"(?:(\d+)-)?(\d{1,2}):([0-5]\d):([0-5]\d)")
# Partition, account and job names as they may appear in an `#SBATCH` line (no spaces, quotes or `#`).
_SLURM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
# `#SBATCH --output` is read by sbatch, not a shell: a path there cannot be quoted, only restricted.
_DIRECTIVE_PATH = re.compile(r"[A-Za-z0-9_./+@:,-]+")
_SUBMITTED = re.compile(r"Submitted batch job (\d+)")


class SlurmError(ValueError):
    """A job request that cannot be rendered or submitted; the message names the field and value."""


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """One Tandem training job. `gpus_per_node` is GPUs per node, or processes per node on CPU nodes."""

    config: Path
    nodes: int
    gpus_per_node: int
    time: str  # HH:MM:SS or D-HH:MM:SS
    overrides: tuple[str, ...] = ()
    partition: str | None = None
    account: str | None = None
    grace_s: int = DEFAULT_GRACE_S
    job_name: str = "tandem"
    log_dir: Path = Path("slurm-logs")
    workdir: Path = field(default_factory=Path.cwd)
    device: Literal["cpu", "gpu"] = "cpu"
    master_port: int = DEFAULT_MASTER_PORT
    python: str = sys.executable
    env: Mapping[str, str] = field(default_factory=dict)


def time_to_seconds(value: str) -> int:
    m = _TIME.fullmatch(value)
    if not m:
        raise SlurmError(f"time={value!r}: expected HH:MM:SS or D-HH:MM:SS")
    days, h, mi, s = (int(g) if g else 0 for g in m.groups())
    return ((days * 24 + h) * 60 + mi) * 60 + s


def check_job_fields(
    *,
    time: str,
    partition: str | None,
    account: str | None,
    job_name: str,
    log_dir: Path,
    env: Mapping[str, str],
    grace_s: int | None = None,
) -> list[str]:
    """The problems of the fields every Tandem sbatch job has (empty when there are none): the time limit
    (and the grace period before it, where the job has one), the names and the log directory that go into
    `#SBATCH` lines unquoted, and the environment names."""
    problems: list[str] = []
    try:
        limit = time_to_seconds(time)
        if limit <= 0:
            problems.append(f"time={time!r} must be positive")
        elif grace_s is not None and grace_s >= limit:
            problems.append(f"grace_s={grace_s} must be shorter than time={time!r} ({limit} s)")
    except SlurmError as exc:
        problems.append(str(exc))
    if grace_s is not None and grace_s < 1:
        problems.append(f"grace_s={grace_s} must be at least 1 second")
    for name, value in (("partition", partition), ("account", account), ("job_name", job_name)):
        if value is not None and not _SLURM_NAME.fullmatch(value):
            problems.append(f"{name}={value!r}: use letters, digits and _.+- (it goes into an #SBATCH line)")
    if not _DIRECTIVE_PATH.fullmatch(str(log_dir)):
        problems.append(f"log_dir={str(log_dir)!r}: use letters, digits and _./+@:,- (an #SBATCH path)")
    try:
        validate_env(env)
    except ValueError as exc:
        problems.append(str(exc))
    return problems


def validate(spec: JobSpec) -> None:
    """Checks every field; raises one SlurmError listing all problems."""
    problems: list[str] = []
    if spec.nodes < 1:
        problems.append(f"nodes={spec.nodes} must be at least 1")
    if spec.gpus_per_node < 1:
        problems.append(f"gpus_per_node={spec.gpus_per_node} must be at least 1")
    problems += check_job_fields(
        time=spec.time,
        partition=spec.partition,
        account=spec.account,
        job_name=spec.job_name,
        log_dir=spec.log_dir,
        env=spec.env,
        grace_s=spec.grace_s,
    )
    if not 1 <= spec.master_port <= 65535:
        problems.append(f"master_port={spec.master_port} is not a TCP port (1-65535)")
    if not spec.config.is_file():
        problems.append(f"config={str(spec.config)!r}: no such file")
    for o in spec.overrides:
        if "=" not in o or o.startswith("="):
            problems.append(f"override {o!r}: expected SECTION.KEY=VALUE")
        if "\0" in o:
            problems.append(f"override {o!r}: contains a NUL byte")
    if problems:
        raise SlurmError("; ".join(problems))


def train_args(spec: JobSpec) -> list[str]:
    """`pretrain train` arguments: absolute config path, then overrides; the job's grace period becomes the
    training loop's own stop margin unless the user set one."""
    args = ["--config", str(spec.config.resolve()), *spec.overrides]
    if not any(o.startswith("train.stop_grace_s=") for o in spec.overrides):
        args.append(f"train.stop_grace_s={spec.grace_s}")
    return args


def job_env(spec: JobSpec) -> dict[str, str]:
    """Exported in the batch script: launch's defaults for the device, then the user's entries. On CPU nodes
    OMP_NUM_THREADS is left to the script (the node's CPUs, not this machine's, divided between the tasks)."""
    env = default_env(spec.device, spec.gpus_per_node)
    if spec.device == "cpu":
        env.pop("OMP_NUM_THREADS")
    env.update(spec.env)
    return env


def export_lines(env: Mapping[str, str]) -> list[str]:
    """`export NAME=VALUE` lines, values shell-quoted (names were checked by `validate_env`)."""
    return [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]


def account_lines(partition: str | None, account: str | None) -> list[str]:
    """The `#SBATCH` lines for a partition and an account (checked by `check_job_fields`), where set."""
    lines = []
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if account:
        lines.append(f"#SBATCH --account={account}")
    return lines


def _exports(spec: JobSpec) -> str:
    env = job_env(spec)
    lines = export_lines(env)
    if "OMP_NUM_THREADS" not in env:
        per_task = f"$(( ${{SLURM_CPUS_ON_NODE:-1}} / {spec.gpus_per_node} ))"
        lines.append(f'[ -n "${{OMP_NUM_THREADS:-}}" ] || export OMP_NUM_THREADS="{per_task}"')
        lines.append('[ "$OMP_NUM_THREADS" -ge 1 ] 2>/dev/null || export OMP_NUM_THREADS=1')
    return "\n".join(lines)


def render(spec: JobSpec) -> str:
    """The sbatch script for `spec` (validated first)."""
    validate(spec)
    template = "multi_node.sbatch" if spec.nodes > 1 else "single_node.sbatch"
    extra = account_lines(spec.partition, spec.account)
    if spec.device == "gpu":
        extra.append(f"#SBATCH --gpus-per-node={spec.gpus_per_node}")
    preemption = Template((TEMPLATES / "preemption_protocol.sbatch").read_text()).substitute()
    values = {
        "job_name": spec.job_name,
        "nodes": str(spec.nodes),
        "tasks_per_node": str(spec.gpus_per_node),
        "ntasks": str(spec.nodes * spec.gpus_per_node),
        "time": spec.time,
        "log_dir": str(spec.log_dir),
        "grace_s": str(spec.grace_s),
        "extra_sbatch": "\n".join(extra),
        "preemption": preemption,
        "master_port": str(spec.master_port),
        "task_wait_s": str(TASK_WAIT_S),
        "exports": _exports(spec),  # plain shell text: substituted values are not template-expanded
        "workdir": shlex.quote(str(spec.workdir)),
        "python": shlex.quote(spec.python),
        "train_args": shlex.join(train_args(spec)),
    }
    return Template((TEMPLATES / template).read_text()).substitute(values)


def submit(
    spec: JobSpec,
    *,
    script_path: Path | None = None,
    sbatch: str = "sbatch",
    environ: Mapping[str, str] | None = None,
) -> tuple[str, int]:
    """Renders `spec`, writes the script (LOG_DIR/JOB_NAME.sbatch unless `script_path`) and runs
    `sbatch SCRIPT`. Returns Slurm's `Submitted batch job N` line and N."""
    script = render(spec)
    log_dir = log_path(spec.log_dir, spec.workdir)
    path = script_path or log_dir / f"{spec.job_name}.sbatch"
    return run_sbatch(script, path, workdir=spec.workdir, log_dir=log_dir, sbatch=sbatch, environ=environ)


def log_path(log_dir: Path, workdir: Path) -> Path:
    """The log directory as the job sees it: relative paths are relative to the job's working directory."""
    return log_dir if log_dir.is_absolute() else workdir / log_dir


def run_sbatch(
    script: str,
    path: Path,
    *,
    workdir: Path,
    log_dir: Path,
    args: Sequence[str] = (),
    sbatch: str = "sbatch",
    environ: Mapping[str, str] | None = None,
) -> tuple[str, int]:
    """Writes `script` to `path` and runs `sbatch ARGS --chdir WORKDIR PATH` as an argument list, after
    creating `log_dir` (sbatch opens the job's --output there). Returns Slurm's `Submitted batch job N`
    line and N; a failure is a SlurmError with sbatch's own message."""
    exe = shutil.which(sbatch)
    if exe is None:
        raise SlurmError(f"sbatch={sbatch!r}: not found on PATH (is this a Slurm login node?)")
    log_dir.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    proc = subprocess.run(
        [exe, *args, "--chdir", str(workdir), str(path)],
        capture_output=True,
        text=True,
        env=dict(os.environ if environ is None else environ),
        check=False,
    )
    m = _SUBMITTED.search(proc.stdout)
    if proc.returncode != 0 or not m:
        raise SlurmError(f"sbatch {path} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()}")
    return m.group(0), int(m.group(1))
