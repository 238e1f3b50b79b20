"""launch/ and slurm/ without a cluster: hostfile validation, the commands built for every mode, rendered
sbatch scripts, and injection safety (hostile values are refused or reach the process unchanged, and no
canary file ever appears)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch import (
    NCCL_DEFAULTS,
    Host,
    HostfileError,
    LaunchError,
    LaunchSpec,
    build_command,
    format_hostfile,
    parse_env_assignments,
    parse_hostfile,
    read_hostfile,
)
from pretrain.cli_launch import register
from slurm import JobSpec, SlurmError, render, time_to_seconds
from tests.conftest import REPO, SMOKE_CONFIG

HOSTILE = [
    "a;touch CANARY",
    "$(touch CANARY)",
    "`touch CANARY`",
    "a b",
    "x'y\"z",
    "a\nb",
    "$HOME",
    "|| touch CANARY",
]
PY = "/usr/bin/python3"


# ----------------------------------------------------------------------------- hostfiles


def test_hostfile_parses_comments_blank_lines_and_slots():
    text = "# cluster A\n\nnode-1 slots=8  # first\nnode-2.example.org slots=4\n10.0.0.3 slots=1\n"
    assert parse_hostfile(text) == [Host("node-1", 8), Host("node-2.example.org", 4), Host("10.0.0.3", 1)]
    assert parse_hostfile(format_hostfile([Host("a", 2), Host("b", 3)])) == [Host("a", 2), Host("b", 3)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("good slots=1\nbad_host slots=1\n", "hosts:2: 'bad_host'"),
        ("-lead slots=1\n", "hosts:1: '-lead'"),
        ("trail- slots=1\n", "'trail-'"),
        ("a..b slots=1\n", "'a..b'"),
        (f"{'x' * 64} slots=1\n", "label"),
        ("node slots=0\n", "hosts:1: 'slots=0'"),
        ("node slots=two\n", "'slots=two'"),
        ("node\n", "hosts:1: 'node' is not 'HOSTNAME slots=N'"),
        ("node slots=1 extra\n", "is not 'HOSTNAME slots=N'"),
        ("node slots=1\nnode slots=2\n", "hosts:2: host 'node' is listed twice (first on line 1)"),
        ("# nothing\n\n", "hosts: lists no hosts"),
    ],
)
def test_hostfile_errors_name_file_line_and_value(text, expected):
    with pytest.raises(HostfileError, match=None) as exc:
        parse_hostfile(text, source="hosts")
    assert expected in str(exc.value)


@pytest.mark.parametrize("value", HOSTILE)
def test_hostfile_rejects_shell_syntax_in_names(tmp_path, value):
    path = tmp_path / "hostfile"
    path.write_text(f"ok slots=1\n{value} slots=1\n")
    with pytest.raises(HostfileError, match=f"{path}:"):
        read_hostfile(path)


def test_missing_hostfile_is_named(tmp_path):
    with pytest.raises(HostfileError, match="nope: hostfile not found"):
        read_hostfile(tmp_path / "nope")


# ----------------------------------------------------------------------------- commands, every mode


@pytest.fixture
def hostfile(tmp_path) -> Path:
    path = tmp_path / "hostfile"
    path.write_text("node-a slots=2\nnode-b slots=2\n")
    return path


ARGS = ["train", "--config", "c.yaml", "train.steps=5"]
RUNNER = [PY, "-u", "-m", "deepspeed.launcher.runner"]


def test_single_node_deepspeed():
    cmd = build_command(LaunchSpec(nodes=1, procs_per_node=2, python=PY), ARGS, base_env={})
    assert cmd.argv == [*RUNNER, "--num_gpus", "2", "--master_port", "29500", "--module", "pretrain", *ARGS]
    assert cmd.env["DS_ACCELERATOR"] == "cpu" and int(cmd.env["OMP_NUM_THREADS"]) >= 1


def test_multi_node_deepspeed_over_ssh_uses_the_first_host_as_master(hostfile):
    cmd = build_command(
        LaunchSpec(nodes=2, procs_per_node=2, hostfile=hostfile, python=PY), ARGS, base_env={}
    )
    assert cmd.argv == [
        *RUNNER,
        *["--hostfile", str(hostfile), "--num_nodes", "2", "--num_gpus", "2"],
        *["--master_addr", "node-a", "--master_port", "29500", "--module", "pretrain", *ARGS],
    ]


def test_per_node_deepspeed(hostfile):
    spec = LaunchSpec(
        nodes=2, procs_per_node=1, hostfile=hostfile, node_rank=1, master_addr="10.0.0.1", python=PY
    )
    cmd = build_command(spec, ARGS, base_env={})
    assert cmd.argv[cmd.argv.index("--no_ssh") + 1 : cmd.argv.index("--no_ssh") + 3] == ["--node_rank", "1"]
    assert cmd.argv[cmd.argv.index("--master_addr") + 1] == "10.0.0.1"
    assert cmd.argv[-len(ARGS) - 2 :] == ["--module", "pretrain", *ARGS]


def test_torchrun_per_node():
    spec = LaunchSpec(
        nodes=2, procs_per_node=4, launcher="torchrun", node_rank=1, master_addr="head", python=PY
    )
    cmd = build_command(spec, ARGS, base_env={})
    assert cmd.argv == [
        *[PY, "-u", "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "4"],
        *["--node_rank", "1", "--master_addr", "head", "--master_port", "29500", "-m", "pretrain", *ARGS],
    ]


def test_gpu_nodes_get_the_nccl_defaults_and_the_user_environment_wins():
    spec = LaunchSpec(nodes=1, procs_per_node=8, device="gpu", python=PY)
    cmd = build_command(spec, ARGS, env={"NCCL_DEBUG": "INFO"}, base_env={"NCCL_IB_TIMEOUT": "18"})
    assert cmd.env["NCCL_DEBUG"] == "INFO" and "NCCL_IB_TIMEOUT" not in cmd.env
    assert cmd.env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == NCCL_DEFAULTS["TORCH_NCCL_ASYNC_ERROR_HANDLING"]
    assert "DS_ACCELERATOR" not in cmd.env


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (dict(nodes=0, procs_per_node=1), "nodes=0 must be at least 1"),
        (dict(nodes=1, procs_per_node=0), "gpus_per_node=0"),
        (dict(nodes=2, procs_per_node=1), "needs a hostfile"),
        (dict(nodes=1, procs_per_node=1, master_port=70000), "master_port=70000"),
        (dict(nodes=1, procs_per_node=1, master_addr="a;b"), "master_addr: 'a;b'"),
        (dict(nodes=2, procs_per_node=1, node_rank=2), "node_rank=2 must be in [0, nodes=2)"),
        (dict(nodes=2, procs_per_node=1, launcher="torchrun"), "torchrun with nodes > 1"),
        (dict(nodes=1, procs_per_node=1, module="os;x"), "module='os;x'"),
    ],
)
def test_bad_specs_are_named(spec, message):
    with pytest.raises(LaunchError) as exc:
        build_command(LaunchSpec(**spec), ARGS, base_env={})
    assert message in str(exc.value)


def test_hostfile_must_cover_the_request(hostfile):
    with pytest.raises(LaunchError, match=r"nodes=3 but hostfile .* lists 2 host"):
        build_command(LaunchSpec(nodes=3, procs_per_node=1, hostfile=hostfile), ARGS, base_env={})
    with pytest.raises(LaunchError, match="gpus_per_node=4 exceeds the slots of node-a, node-b"):
        build_command(LaunchSpec(nodes=2, procs_per_node=4, hostfile=hostfile), ARGS, base_env={})


@pytest.mark.parametrize("name", ["lower", "1ABC", "A-B", "A B", "A;B", ""])
def test_environment_names_are_validated(name):
    with pytest.raises(LaunchError, match="environment name"):
        parse_env_assignments([f"{name}=1"])


def test_environment_values_pass_through_unchanged():
    env = parse_env_assignments([f"V{i}={v}" for i, v in enumerate(HOSTILE)] + ["EQ=a=b="])
    assert env == {**{f"V{i}": v for i, v in enumerate(HOSTILE)}, "EQ": "a=b="}
    with pytest.raises(LaunchError, match="expected NAME=VALUE"):
        parse_env_assignments(["NOVALUE"])


@pytest.mark.parametrize("value", HOSTILE)
def test_ssh_mode_refuses_values_deepspeed_would_paste_into_a_remote_shell(hostfile, value):
    spec = LaunchSpec(nodes=2, procs_per_node=1, hostfile=hostfile)
    with pytest.raises(LaunchError, match="NCCL_SOCKET_IFNAME"):
        build_command(spec, ARGS, env={"NCCL_SOCKET_IFNAME": value}, base_env={})
    with pytest.raises(LaunchError, match="argument"):
        build_command(spec, [*ARGS, f"train.out_dir={value}"], base_env={})
    # per-node mode has no remote shell: the same values are fine there
    per_node = LaunchSpec(nodes=2, procs_per_node=1, hostfile=hostfile, node_rank=0, master_addr="node-a")
    cmd = build_command(
        per_node, [*ARGS, f"train.out_dir={value}"], env={"NCCL_SOCKET_IFNAME": value}, base_env={}
    )
    assert cmd.argv[-1] == f"train.out_dir={value}" and cmd.env["NCCL_SOCKET_IFNAME"] == value


# ----------------------------------------------------------------------------- executing what was built


ECHO = (
    "import json, os, sys; print(json.dumps({'argv': sys.argv[1:], "
    "'env': {k: v for k, v in os.environ.items() if k.startswith('HOSTILE_')}}))"
)


def test_hostile_values_reach_the_process_unchanged_and_run_nothing(tmp_path):
    """The built argv and env really executed (its launcher replaced by an echo): every value arrives
    byte for byte and no canary file is created anywhere."""
    import json

    values = [v for v in HOSTILE if "\0" not in v]
    spec = LaunchSpec(nodes=1, procs_per_node=1, launcher="torchrun", python=sys.executable)
    cmd = build_command(spec, values, env={f"HOSTILE_{i}": v for i, v in enumerate(values)}, base_env={})
    # Run the command's own argv with `-m torch.distributed.run ... -m pretrain` swapped for the echo, so the
    # exact list build_command produced is what the OS receives.
    argv = [sys.executable, "-c", ECHO, *cmd.argv[cmd.argv.index("pretrain") + 1 :]]
    proc = subprocess.run(
        argv, env=cmd.full_env({}), cwd=tmp_path, capture_output=True, text=True, check=True
    )
    seen = json.loads(proc.stdout)
    assert seen["argv"] == values
    assert seen["env"] == {f"HOSTILE_{i}": v for i, v in enumerate(values)}
    assert list(tmp_path.iterdir()) == []


def test_deepspeed_runner_accepts_the_built_per_node_command(tmp_path):
    """DeepSpeed's own argument parser takes what build_command produced (--help stops before launching)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    spec = LaunchSpec(nodes=2, procs_per_node=1, hostfile=hostfile, node_rank=1, master_addr="127.0.0.1")
    cmd = build_command(spec, ARGS, base_env={})
    i = cmd.argv.index("--module")
    proc = subprocess.run(
        [*cmd.argv[:i], "--help"], env={**os.environ, **cmd.env}, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "--no_ssh" in proc.stdout, proc.stderr[-2000:]


# ----------------------------------------------------------------------------- pretrain launch / slurm submit


def _cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="verb"))
    return parser.parse_args(list(argv))


def test_launch_dry_run_prints_the_command(capsys, hostfile):
    args = _cli(
        "launch", "--config", str(SMOKE_CONFIG), "--nodes", "2", "--gpus-per-node", "1", "--hostfile",
        str(hostfile), "--node-rank", "1", "--master-addr", "node-a", "--dry-run", "--device", "cpu",
        "--env", "X=a b", "train.steps=3",
    )  # fmt: skip
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "X='a b'" in out and "--no_ssh --node_rank 1" in out
    assert out.rstrip().endswith(f"--module pretrain train --config {SMOKE_CONFIG} train.steps=3")


def test_launch_refuses_a_bad_hostfile_with_its_line(capsys, tmp_path):
    bad = tmp_path / "hosts"
    bad.write_text("ok slots=1\n$(touch CANARY) slots=1\n")
    args = _cli(
        "launch", "--config", str(SMOKE_CONFIG), "--nodes", "2", "--gpus-per-node", "1", "--hostfile", str(bad),
        "--dry-run",
    )  # fmt: skip
    assert args.func(args) == 2
    assert f"{bad}:2: '$(touch" in capsys.readouterr().err
    assert not (tmp_path / "CANARY").exists()


def _job(**kw) -> JobSpec:
    base = dict(config=SMOKE_CONFIG, nodes=1, gpus_per_node=2, time="01:00:00", workdir=REPO, python=PY)
    base.update(kw)
    return JobSpec(**base)


def test_single_node_script_has_the_preemption_protocol():
    script = render(_job(grace_s=90, partition="gpu", account="proj-1", overrides=("train.steps=5",)))
    for line in [
        "#SBATCH --signal=B:USR1@90",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "#SBATCH --output=slurm-logs/%x-%j.out",
        "#SBATCH --ntasks-per-node=2",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj-1",
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"',
        'scontrol requeue "$SLURM_JOB_ID"',
        "trap 'on_signal USR1' USR1",
    ]:
        assert line in script, line
    assert (
        f"{PY} -u -m pretrain train --config {SMOKE_CONFIG} train.steps=5 train.stop_grace_s=90 &" in script
    )
    assert script.count("scontrol requeue") == 1
    # sbatch reads #SBATCH lines only before the first command
    first_cmd = next(i for i, ln in enumerate(script.splitlines()) if ln and not ln.startswith("#"))
    assert all(i < first_cmd for i, ln in enumerate(script.splitlines()) if ln.startswith("#SBATCH"))


def test_multi_node_gpu_script():
    script = render(_job(nodes=4, gpus_per_node=8, device="gpu"))
    assert "#SBATCH --nodes=4" in script and "#SBATCH --gpus-per-node=8" in script
    assert "srun --wait=120 --nodes=4 --ntasks-per-node=8" in script
    assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in script and "DS_ACCELERATOR" not in script


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(time="1:00"), "time='1:00'"),
        (dict(time="00:01:00", grace_s=60), "grace_s=60 must be shorter"),
        (dict(partition="a b"), "partition='a b'"),
        (dict(account="$(touch CANARY)"), "account="),
        (dict(job_name="x\n#SBATCH --uid=0"), "job_name="),
        (dict(log_dir=Path("logs dir")), "log_dir="),
        (dict(nodes=0), "nodes=0"),
        (dict(overrides=("noequals",)), "override 'noequals'"),
        (dict(config=Path("missing.yaml")), "config='missing.yaml'"),
        (dict(env={"bad-name": "1"}), "environment name 'bad-name'"),
    ],
)
def test_job_spec_errors_name_the_field(kw, message):
    with pytest.raises(SlurmError) as exc:
        render(_job(**kw))
    assert message in str(exc.value)


def test_time_to_seconds():
    assert time_to_seconds("01:02:03") == 3723 and time_to_seconds("2-00:00:00") == 172800


@pytest.mark.parametrize("value", [v for v in HOSTILE])
def test_rendered_script_runs_hostile_values_as_data(tmp_path, value):
    """The rendered script is executed by bash with srun, scontrol and squeue replaced by stubs that print
    their arguments: overrides and env values arrive unchanged and the canary never appears."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    stub = '#!/bin/bash\nprintf "%s\\0" "$0" "$@" > "$STUB_OUT/$(basename "$0").$$"\n'
    for name in ("srun", "scontrol", "squeue"):
        (bindir / name).write_text(stub)
        (bindir / name).chmod(0o755)
    (bindir / "scontrol").write_text('#!/bin/bash\n[ "$1" = show ] && echo localhost\nexit 0\n')
    work = tmp_path / "work"
    work.mkdir()
    script = render(_job(workdir=work, overrides=(f"train.out_dir={value}",), env={"HOSTILE": value}))
    env = {
        "PATH": f"{bindir}:/usr/bin:/bin",
        "SLURM_JOB_ID": "42",
        "SLURM_JOB_NODELIST": "localhost",
        "STUB_OUT": str(tmp_path),
    }
    (tmp_path / "job.sh").write_text(script.replace("srun --wait", 'env > "$STUB_OUT/env"; srun --wait'))
    proc = subprocess.run(
        ["bash", str(tmp_path / "job.sh")], env=env, cwd=work, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    srun_args = next(tmp_path.glob("srun.*")).read_bytes().split(b"\0")[1:-1]
    assert srun_args[-2].decode() == f"train.out_dir={value}"
    assert f"HOSTILE={value}\n" in (tmp_path / "env").read_text()
    assert not list(tmp_path.rglob("CANARY")) and list(work.iterdir()) == []


def test_script_refuses_a_non_numeric_job_id(tmp_path):
    script = render(_job(workdir=tmp_path))
    env = {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": "1;touch CANARY"}
    proc = subprocess.run(["bash", "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 1 and "is not a job id" in proc.stderr
    assert not (tmp_path / "CANARY").exists()
