"""`pretrain launch` (deepspeed/torchrun across nodes) and `pretrain slurm submit` (an sbatch job).

Both take the same `--config FILE` and dotted overrides as `pretrain train` and forward them unchanged.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from launch import LaunchError, LaunchSpec, build_command, detect_device, parse_env_assignments
from launch.hostfile import HostfileError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "launch",
        help="start `pretrain train` on N nodes x G processes with deepspeed or torchrun",
        description="Build and run the deepspeed (default) or torchrun command for `pretrain train`. With a "
        "hostfile and no --node-rank, deepspeed starts every node over ssh; with --node-rank I and "
        "--master-addr A, it starts only this node's processes (deepspeed --no_ssh), to be run once on every "
        "node. On CPU nodes --gpus-per-node is the number of processes per node (gloo).",
    )
    _add_job_args(p)
    p.add_argument("--hostfile", type=Path, help="deepspeed hostfile: HOSTNAME slots=N per line")
    p.add_argument("--launcher", choices=["deepspeed", "torchrun"], default="deepspeed")
    p.add_argument("--node-rank", type=int, help="per-node mode: this node's index in the hostfile")
    p.add_argument("--master-addr", help="address of the node running rank 0 (default: first hostfile host)")
    p.add_argument("--master-port", type=int, default=29500, help="rank 0's TCP port (default 29500)")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment entry for every process (repeatable); the value is passed through unchanged",
    )
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto", help="default: detect")
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    p.set_defaults(func=cmd_launch)

    slurm = sub.add_parser(
        "slurm",
        help="submit Slurm jobs with preemption, requeue and auto-resume",
        description="Slurm batch jobs for `pretrain train`.",
    )
    ssub = slurm.add_subparsers(dest="slurm_verb", metavar="VERB", required=True)
    p = ssub.add_parser(
        "submit",
        help="render the sbatch script and submit it",
        description="Render slurm/templates/{single,multi}_node.sbatch (one srun task per GPU, or per "
        "process on CPU nodes) and submit it with sbatch. The job gets USR1 --grace-s seconds before its time "
        "limit (or from `scancel --signal=USR1 --batch JOBID`), saves a checkpoint on every rank at the same "
        "step, requeues itself and resumes from that checkpoint. Logs: LOG_DIR/JOBNAME-JOBID.out.",
    )
    _add_job_args(p)
    p.add_argument("--time", required=True, help="time limit, HH:MM:SS or D-HH:MM:SS")
    p.add_argument("--partition", help="Slurm partition")
    p.add_argument("--account", help="Slurm account")
    p.add_argument("--grace-s", type=int, default=120, help="signal this long before the limit (default 120)")
    p.add_argument("--job-name", default="tandem", help="job name (default tandem)")
    p.add_argument("--log-dir", type=Path, default=Path("slurm-logs"), help="default ./slurm-logs")
    p.add_argument("--master-port", type=int, default=29500, help="rank 0's TCP port (default 29500)")
    p.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="exported in the job (repeatable)"
    )
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto", help="default: detect")
    p.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    p.set_defaults(func=cmd_slurm_submit)


def _add_job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, type=Path, help="YAML run config")
    p.add_argument("--nodes", required=True, type=int, help="number of nodes")
    p.add_argument("--gpus-per-node", required=True, type=int, help="GPUs per node (processes on CPU nodes)")
    p.add_argument(
        "overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="forwarded to `pretrain train` unchanged"
    )


def _device(choice: str) -> str:
    return detect_device() if choice == "auto" else choice


def cmd_launch(args: argparse.Namespace) -> int:
    try:
        env = parse_env_assignments(args.env)
        spec = LaunchSpec(
            nodes=args.nodes,
            procs_per_node=args.gpus_per_node,
            launcher=args.launcher,
            hostfile=args.hostfile,
            node_rank=args.node_rank,
            master_addr=args.master_addr,
            master_port=args.master_port,
            device=_device(args.device),  # type: ignore[arg-type]
        )
        train_args = ["train", "--config", str(args.config), *args.overrides]
        cmd = build_command(spec, train_args, env=env)
    except (LaunchError, HostfileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.config.is_file():
        print(f"error: --config {args.config}: no such file", file=sys.stderr)
        return 2
    if args.dry_run:
        print(cmd.display())
        return 0
    print(f"launching: {cmd.display()}", flush=True)
    return subprocess.run(cmd.argv, env=cmd.full_env(), check=False).returncode


def cmd_slurm_submit(args: argparse.Namespace) -> int:
    from slurm import JobSpec, SlurmError, render, submit

    try:
        spec = JobSpec(
            config=args.config,
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            time=args.time,
            overrides=tuple(args.overrides),
            partition=args.partition,
            account=args.account,
            grace_s=args.grace_s,
            job_name=args.job_name,
            log_dir=args.log_dir,
            workdir=Path(os.getcwd()),
            device=_device(args.device),  # type: ignore[arg-type]
            master_port=args.master_port,
            env=parse_env_assignments(args.env),
        )
        if args.dry_run:
            print(render(spec), end="")
            return 0
        line, _job_id = submit(spec)
    except (SlurmError, LaunchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m pretrain.cli_launch launch|slurm ...`: the two verbs alone, as `pretrain` registers them."""
    parser = argparse.ArgumentParser(prog="pretrain")
    register(parser.add_subparsers(dest="verb", metavar="VERB", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
