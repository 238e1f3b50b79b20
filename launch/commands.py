"""Building `deepspeed` and `torchrun` command lines as argument lists, plus the environment they run in.

Nothing here builds a shell string. Values reach the launched processes either as argv entries or as
environment entries, unchanged. The one exception is DeepSpeed's ssh (pdsh) runner, which pastes exported
variables (`NCCL*`, `PYTHON*`, ...) and the training arguments into a remote shell command: for that mode every
such value must be shell-inert (letters, digits and `_@%+=:,./-`), and anything else is refused with the
variable's name. Per-node mode (`--no_ssh --node_rank I`, one launcher per node, as Slurm runs it) and
`torchrun` pass any value through unchanged.

Modes:
- single node: `deepspeed --num_gpus G --master_port P --module pretrain ...`
- multi node over ssh: `deepspeed --hostfile F --num_nodes N --num_gpus G --master_addr A ...`
- per node: the same plus `--no_ssh --node_rank I` (run once on every node)
- torchrun: `torchrun --nnodes N --nproc_per_node G --node_rank I --master_addr A --master_port P -m pretrain ...`
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from launch.hostfile import Host, HostfileError, read_hostfile, validate_hostname

Launcher = Literal["deepspeed", "torchrun"]
Device = Literal["cpu", "gpu"]

ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
# What survives an unquoted trip through a POSIX shell unchanged (no spaces, quotes, $, `, ;, |, &, <, >, ...).
SHELL_INERT = re.compile(r"[A-Za-z0-9_@%+=:,./-]*")
# Prefixes of the variables DeepSpeed's pdsh runner exports into the remote shell (runner.EXPORT_ENVS plus the
# CUDA accelerator's NCCL).
PDSH_EXPORTED_PREFIXES = ("MLFLOW", "PYTHON", "MV2", "UCX", "NCCL")
DEFAULT_MASTER_PORT = 29500

# Environment defaults for GPU nodes; the user's environment and --env entries win over them.
NCCL_DEFAULTS: dict[str, str] = {
    # A failed or timed-out NCCL collective raises in the caller instead of hanging the job.
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    # Warnings and errors only; set NCCL_DEBUG=INFO to see the chosen transports and rings.
    "NCCL_DEBUG": "WARN",
    # The largest InfiniBand retry timeout (4.096 us * 2^22 ~ 17 s): rides out switch hiccups on big jobs.
    "NCCL_IB_TIMEOUT": "22",
    # Keep one CPU thread per rank: dataloader workers and BLAS threads otherwise oversubscribe the node.
    "OMP_NUM_THREADS": "1",
}


class LaunchError(ValueError):
    """A launch request that cannot be turned into a safe command; the message names the field and value."""


@dataclass(frozen=True, kw_only=True)
class LaunchSpec:
    """Where and how many processes: `procs_per_node` is GPUs per node, or processes per CPU node."""

    nodes: int
    procs_per_node: int
    launcher: Launcher = "deepspeed"
    hostfile: Path | None = None
    node_rank: int | None = None  # set = per-node mode (deepspeed --no_ssh, or torchrun on this node)
    master_addr: str | None = None
    master_port: int = DEFAULT_MASTER_PORT
    device: Device = "cpu"
    python: str = sys.executable
    module: str = "pretrain"


@dataclass
class LaunchCommand:
    argv: list[str]
    env: dict[str, str] = field(
        default_factory=dict
    )  # entries added to (or replacing) the parent environment

    def display(self) -> str:
        """For printing only (`--dry-run`): the environment entries and argv, each shell-quoted."""
        parts = [f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items())]
        return shlex.join(parts + self.argv) if not parts else " ".join(parts) + " " + shlex.join(self.argv)

    def full_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env.update(self.env)
        return env


def detect_device(environ: Mapping[str, str] | None = None) -> Device:
    """'gpu' when DS_ACCELERATOR says cuda or an NVIDIA driver lists a GPU, else 'cpu' (no torch import)."""
    environ = os.environ if environ is None else environ
    accel = environ.get("DS_ACCELERATOR")
    if accel:
        return "gpu" if accel == "cuda" else "cpu"
    gpus = Path("/proc/driver/nvidia/gpus")
    return "gpu" if gpus.is_dir() and any(gpus.iterdir()) else "cpu"


def parse_env_assignments(items: Sequence[str]) -> dict[str, str]:
    """`NAME=VALUE` strings (from `--env`) -> dict; the value is everything after the first `=`, unchanged."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise LaunchError(f"--env {item!r}: expected NAME=VALUE")
        out[name] = value
    return validate_env(out)


def validate_env(env: Mapping[str, str]) -> dict[str, str]:
    """Names must match [A-Z_][A-Z0-9_]*; values are kept byte for byte (only NUL, which no environment can
    hold, is refused)."""
    problems = []
    for name, value in env.items():
        if not ENV_NAME.fullmatch(name):
            problems.append(f"environment name {name!r} does not match [A-Z_][A-Z0-9_]*")
        elif "\0" in value:
            problems.append(f"environment value of {name} contains a NUL byte")
    if problems:
        raise LaunchError("; ".join(problems))
    return dict(env)


def default_env(device: Device, procs_per_node: int, *, cpus: int | None = None) -> dict[str, str]:
    """CPU nodes: DeepSpeed's CPU accelerator (gloo) and the node's cores split between its processes.
    GPU nodes: NCCL_DEFAULTS."""
    if device == "gpu":
        return dict(NCCL_DEFAULTS)
    cpus = cpus or os.cpu_count() or 1
    return {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(max(1, cpus // max(1, procs_per_node)))}


def build_command(
    spec: LaunchSpec,
    train_args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    base_env: Mapping[str, str] | None = None,
) -> LaunchCommand:
    """The command that starts `python -m MODULE *train_args` on every process of `spec`.

    `env` entries are forwarded as given; defaults from `default_env` fill in what neither `env` nor
    `base_env` (the parent environment, os.environ by default) sets.
    """
    base_env = os.environ if base_env is None else base_env
    extra = validate_env(env or {})
    hosts = _check_spec(spec)
    child_env = {k: v for k, v in default_env(spec.device, spec.procs_per_node).items() if k not in base_env}
    child_env.update(extra)
    if spec.launcher == "torchrun":
        argv = _torchrun_argv(spec, train_args)
    else:
        argv = _deepspeed_argv(spec, hosts, train_args)
        if spec.nodes > 1 and spec.node_rank is None:
            _check_pdsh_safe({**base_env, **child_env}, train_args)
    return LaunchCommand(argv=argv, env=child_env)


def _check_spec(spec: LaunchSpec) -> list[Host] | None:
    problems = []
    if spec.nodes < 1:
        problems.append(f"nodes={spec.nodes} must be at least 1")
    if spec.procs_per_node < 1:
        problems.append(f"gpus_per_node={spec.procs_per_node} must be at least 1")
    if not 1 <= spec.master_port <= 65535:
        problems.append(f"master_port={spec.master_port} is not a TCP port (1-65535)")
    if spec.launcher not in ("deepspeed", "torchrun"):
        problems.append(f"launcher={spec.launcher!r} must be 'deepspeed' or 'torchrun'")
    if spec.node_rank is not None and not 0 <= spec.node_rank < max(spec.nodes, 1):
        problems.append(f"node_rank={spec.node_rank} must be in [0, nodes={spec.nodes})")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", spec.module):
        problems.append(f"module={spec.module!r} is not a dotted Python module name")
    if spec.master_addr is not None:
        try:
            validate_hostname(spec.master_addr, where="master_addr")
        except HostfileError as exc:
            problems.append(str(exc))
    multi = spec.nodes > 1
    if multi and spec.launcher == "torchrun" and (spec.node_rank is None or spec.master_addr is None):
        problems.append("torchrun with nodes > 1 runs once per node: give node_rank and master_addr")
    if multi and spec.launcher == "deepspeed" and spec.hostfile is None:
        problems.append(f"nodes={spec.nodes} with the deepspeed launcher needs a hostfile")
    if multi and spec.node_rank is not None and spec.master_addr is None:
        problems.append(
            "per-node mode (node_rank set) needs master_addr: every node must reach the same rank 0"
        )
    if problems:
        raise LaunchError("; ".join(problems))
    if spec.hostfile is None:
        return None
    hosts = read_hostfile(spec.hostfile)
    if len(hosts) < spec.nodes:
        raise LaunchError(f"nodes={spec.nodes} but hostfile {spec.hostfile} lists {len(hosts)} host(s)")
    short = [h.name for h in hosts[: spec.nodes] if h.slots < spec.procs_per_node]
    if short:
        raise LaunchError(
            f"gpus_per_node={spec.procs_per_node} exceeds the slots of {', '.join(short)} in {spec.hostfile}"
        )
    return hosts


def _deepspeed_argv(spec: LaunchSpec, hosts: list[Host] | None, train_args: Sequence[str]) -> list[str]:
    # `python -m deepspeed.launcher.runner` is the `deepspeed` script, pinned to this interpreter.
    argv = [spec.python, "-u", "-m", "deepspeed.launcher.runner"]
    if hosts is not None:
        argv += ["--hostfile", str(spec.hostfile), "--num_nodes", str(spec.nodes)]
    argv += ["--num_gpus", str(spec.procs_per_node)]
    master_addr = spec.master_addr
    if master_addr is None and hosts is not None and spec.nodes > 1:
        master_addr = hosts[0].name  # instead of DeepSpeed's `ssh HOST hostname -I`
    if master_addr is not None:
        argv += ["--master_addr", master_addr]
    argv += ["--master_port", str(spec.master_port)]
    if spec.node_rank is not None and spec.nodes > 1:
        argv += ["--no_ssh", "--node_rank", str(spec.node_rank)]
    return [*argv, "--module", spec.module, *train_args]


def _torchrun_argv(spec: LaunchSpec, train_args: Sequence[str]) -> list[str]:
    argv = [
        spec.python,
        "-u",
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(spec.nodes),
        "--nproc_per_node",
        str(spec.procs_per_node),
        "--node_rank",
        str(spec.node_rank or 0),
        "--master_addr",
        spec.master_addr or "127.0.0.1",
        "--master_port",
        str(spec.master_port),
    ]
    return [*argv, "-m", spec.module, *train_args]


def _check_pdsh_safe(env: Mapping[str, str], train_args: Sequence[str]) -> None:
    """DeepSpeed's ssh runner builds `export K=V; ... python ... ARGS` for a remote shell without quoting."""
    bad = [
        f"environment value of {k} ({v!r})"
        for k, v in env.items()
        if k.startswith(PDSH_EXPORTED_PREFIXES) and not SHELL_INERT.fullmatch(v)
    ]
    bad += [f"argument {a!r}" for a in train_args if not SHELL_INERT.fullmatch(a)]
    for path in (Path.home() / ".deepspeed_env", Path(".deepspeed_env")):
        if path.is_file():
            for n, line in enumerate(path.read_text().splitlines(), 1):
                value = line.partition("=")[2]
                if line.strip() and not SHELL_INERT.fullmatch(value):
                    bad.append(f"{path}:{n} value {value!r}")
    if bad:
        raise LaunchError(
            "the deepspeed ssh runner would paste these into a remote shell unquoted: "
            + "; ".join(bad)
            + ". Use only letters, digits and _@%+=:,./- there, or run per node (--node-rank, --master-addr)"
        )
