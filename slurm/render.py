"""Rendering, validating and submitting Tandem's sbatch scripts.

The templates (slurm/templates/*.sbatch) are `string.Template`s. Every value that reaches the script is
either checked against a narrow pattern (numbers, `HH:MM:SS`, Slurm names in `#SBATCH` lines, which sbatch
reads without a shell) or shell-quoted with `shlex.quote` (paths, training arguments, environment values).
`sbatch` itself is run with an argument list.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping
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


def validate(spec: JobSpec) -> None:
    """Checks every field; raises one SlurmError listing all problems."""
    problems: list[str] = []
    if spec.nodes < 1:
        problems.append(f"nodes={spec.nodes} must be at least 1")
    if spec.gpus_per_node < 1:
        problems.append(f"gpus_per_node={spec.gpus_per_node} must be at least 1")
    try:
        limit = time_to_seconds(spec.time)
        if limit <= 0:
            problems.append(f"time={spec.time!r} must be positive")
        elif spec.grace_s >= limit:
            problems.append(f"grace_s={spec.grace_s} must be shorter than time={spec.time!r} ({limit} s)")
    except SlurmError as exc:
        problems.append(str(exc))
    if spec.grace_s < 1:
        problems.append(f"grace_s={spec.grace_s} must be at least 1 second")
    for name in ("partition", "account", "job_name"):
        value = getattr(spec, name)
        if value is not None and not _SLURM_NAME.fullmatch(value):
            problems.append(f"{name}={value!r}: use letters, digits and _.+- (it goes into an #SBATCH line)")
    if not _DIRECTIVE_PATH.fullmatch(str(spec.log_dir)):
        problems.append(f"log_dir={str(spec.log_dir)!r}: use letters, digits and _./+@:,- (an #SBATCH path)")
    if not 1 <= spec.master_port <= 65535:
        problems.append(f"master_port={spec.master_port} is not a TCP port (1-65535)")
    if not spec.config.is_file():
        problems.append(f"config={str(spec.config)!r}: no such file")
    for o in spec.overrides:
        if "=" not in o or o.startswith("="):
            problems.append(f"override {o!r}: expected SECTION.KEY=VALUE")
        if "\0" in o:
            problems.append(f"override {o!r}: contains a NUL byte")
    try:
        validate_env(spec.env)
    except ValueError as exc:
        problems.append(str(exc))
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


def _exports(spec: JobSpec) -> str:
    env = job_env(spec)
    lines = [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    if "OMP_NUM_THREADS" not in env:
        per_task = f"$(( ${{SLURM_CPUS_ON_NODE:-1}} / {spec.gpus_per_node} ))"
        lines.append(f'[ -n "${{OMP_NUM_THREADS:-}}" ] || export OMP_NUM_THREADS="{per_task}"')
        lines.append('[ "$OMP_NUM_THREADS" -ge 1 ] 2>/dev/null || export OMP_NUM_THREADS=1')
    return "\n".join(lines)


def render(spec: JobSpec) -> str:
    """The sbatch script for `spec` (validated first)."""
    validate(spec)
    template = "multi_node.sbatch" if spec.nodes > 1 else "single_node.sbatch"
    extra = []
    if spec.partition:
        extra.append(f"#SBATCH --partition={spec.partition}")
    if spec.account:
        extra.append(f"#SBATCH --account={spec.account}")
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
    exe = shutil.which(sbatch)
    if exe is None:
        raise SlurmError(f"sbatch={sbatch!r}: not found on PATH (is this a Slurm login node?)")
    log_dir = spec.log_dir if spec.log_dir.is_absolute() else spec.workdir / spec.log_dir
    log_dir.mkdir(parents=True, exist_ok=True)
    path = script_path or log_dir / f"{spec.job_name}.sbatch"
    path.write_text(script)
    proc = subprocess.run(
        [exe, "--chdir", str(spec.workdir), str(path)],
        capture_output=True,
        text=True,
        env=dict(os.environ if environ is None else environ),
        check=False,
    )
    m = _SUBMITTED.search(proc.stdout)
    if proc.returncode != 0 or not m:
        raise SlurmError(f"sbatch {path} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()}")
    return m.group(0), int(m.group(1))
