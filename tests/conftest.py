"""Fixtures shared by every test tier: a small sharded corpus and a runner for `pretrain` subprocesses."""

from __future__ import annotations

import errno
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE_CONFIG = REPO / "configs" / "runs" / "smoke-gpt.yaml"


@pytest.fixture(scope="session")
def shards_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """400 sample documents, a 512-piece tokenizer, ~20 train shards of ~20 kB and a validation split."""
    from data_pipeline.sample_corpus import write_sample_corpus
    from data_pipeline.sharding import shard_corpus
    from data_pipeline.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("data")
    corpus = write_sample_corpus(root / "corpus", docs=400, seed=0, docs_per_file=200)
    model = train_tokenizer(corpus, vocab_size=512, out_prefix=root / "tok" / "sp")
    shard_corpus(
        corpus,
        tokenizer_path=model,
        out_dir=root / "shards",
        workers=1,
        val_fraction=0.1,
        shard_size_mb=0.02,
        seed=0,
    )
    return root / "shards"


def spawn_with_deadline(
    fn: Callable[..., None], args: tuple, *, nprocs: int, timeout: float, what: str
) -> None:
    """torch.multiprocessing workers `fn(rank, *args)` with a hard limit: a worker's exception is re-raised
    here; past `timeout` seconds every worker still alive is killed and the test fails naming `what`."""
    import time

    import torch.multiprocessing as mp

    os.environ["OMP_NUM_THREADS"] = "1"
    ctx = mp.start_processes(_exit_after, args=(fn, *args), nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):  # raises if a worker failed
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{what} did not finish within {timeout:g} s")


def _exit_after(rank: int, fn: Callable[..., None], *args: object) -> None:
    """Runs a spawned worker's `fn(rank, *args)`; when it returns, ends the process at once (os._exit(0)
    after flushing). A worker that finished its work cleanly sometimes aborted in C++ teardown afterwards
    ("terminate called without an active exception", SIGABRT with no Python frame left: 2 in 25 runs of
    the TP activation-checkpointing case, twice in clean-clone CI) from threads PyTorch leaves behind at
    interpreter exit; the test's result was already decided. An exception in `fn` still propagates to
    torch.multiprocessing as before, and a crash during the work still fails the test."""
    fn(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# Ports handed to launchers and spawned ranks come from a band below Linux's ephemeral range (32768-60999
# by default), and below 29500, the `pretrain launch` default a Slurm test's job binds. A port the kernel
# picked (bind to port 0) can be taken again by anyone before the ranks bind it: outgoing connections and
# port-0 stores (every one-process `pretrain train`) draw from the ephemeral range, and with the suite's two
# pytest runs side by side one of them took a deepspeed test's master port in CI. Ports of this band are
# taken only by free_port; `make test` gives each of its runs half the band (TANDEM_TEST_PORTS=LO-HI).
DEFAULT_TEST_PORTS = (21000, 28999)
_handed_out: set[int] = set()


def port_band() -> tuple[int, int]:
    text = os.environ.get("TANDEM_TEST_PORTS", "")
    if not text:
        return DEFAULT_TEST_PORTS
    lo, sep, hi = text.partition("-")
    if not (sep and lo.isdigit() and hi.isdigit() and 1024 <= int(lo) <= int(hi) <= 65535):
        raise ValueError(
            f"TANDEM_TEST_PORTS={text!r}: expected LO-HI, two ports with 1024 <= LO <= HI <= 65535"
        )
    return int(lo), int(hi)


def _bindable(port: int) -> bool:
    """Whether a listener could bind `port` on every IPv4 address and, where the host has IPv6, every IPv6
    one too: torch's TCPStore listens dual-stack, so an IPv6-only listener on the port would stop it."""
    families = [(socket.AF_INET, "")] + ([(socket.AF_INET6, "::")] if socket.has_ipv6 else [])
    for family, host in families:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind((host, port))
        except OSError as e:
            if family == socket.AF_INET6 and e.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                continue  # IPv6 compiled into Python but off in this host's kernel, or unconfigured
            return False
    return True


def free_port() -> int:
    """A port of this run's band that nothing is bound to now (not even a closing socket in TIME_WAIT:
    no SO_REUSEADDR) and that this process has not handed out before, tried from a place that differs
    between processes."""
    lo, hi = port_band()
    size = hi - lo + 1
    start = (os.getpid() * 7919 + len(_handed_out)) % size
    for i in range(size):
        port = lo + (start + i) % size
        if port in _handed_out or not _bindable(port):
            continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port left in {lo}-{hi} (TANDEM_TEST_PORTS)")


def last_error_line(text: str) -> str:
    """The last line of a child's stderr that reads like a Python exception ("SomeError: ..."), else its
    last non-empty line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt|Exit)\b", line)]
    return (errors or lines or ["(no stderr)"])[-1][:500]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env.update(
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
    )
    env.update(extra)
    return env


def tiny_overrides(shards: Path, out_dir: Path, **keys: object) -> list[str]:
    """gpt-tiny on the test shards, every step logged, no progress bar."""
    base: dict[str, object] = {
        "model.preset": "gpt-tiny",
        "model.max_seq_len": 64,
        "data.shards": shards,
        "data.seq_len": 64,
        "train.out_dir": out_dir,
        "train.steps": 6,
        "train.micro_batch_size": 4,
        "train.global_batch_size": 8,
        "train.log_interval": 1,
        "train.eval_interval": 0,
        "train.progress": "false",
        "optimizer.warmup_steps": 2,
        "optimizer.lr": "1e-3",
        "checkpoint.interval": 0,
    }
    base.update(keys)
    return [f"{k}={v}" for k, v in base.items()]


def _runner() -> Callable[..., subprocess.CompletedProcess]:
    """Runs `pretrain ARGS` (optionally under the deepspeed launcher or torchrun) with a hard timeout;
    `module=` runs another Python module the same way (tests.distributed.train_runs, say)."""

    def run(
        args: list[str],
        *,
        nprocs: int = 1,
        launcher: str = "python",
        timeout: float = 300,
        check: bool = True,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        module: str = "pretrain",
    ) -> subprocess.CompletedProcess:
        port = str(free_port())
        if launcher == "deepspeed":
            cmd = [
                sys.executable,
                "-m",
                "deepspeed.launcher.runner",
                "--num_gpus",
                str(nprocs),
                "--master_port",
                port,
                "--module",
                module,
                *args,
            ]
        elif launcher == "torchrun":
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                str(nprocs),
                "--master_port",
                port,
                "-m",
                module,
                *args,
            ]
        else:
            cmd = [sys.executable, "-m", module, *args]
        proc = subprocess.run(
            cmd,
            env=subprocess_env(**(env or {})),
            cwd=cwd or REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            # The error first: a report that keeps only the head and tail of a long message (CI's) still
            # shows what failed, not just the launcher's log.
            raise AssertionError(
                f"{last_error_line(proc.stderr)}\n{' '.join(cmd)} exited {proc.returncode}\n"
                f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
            )
        return proc

    return run


@pytest.fixture
def run_pretrain() -> Callable[..., subprocess.CompletedProcess]:
    return _runner()


@pytest.fixture(scope="module")
def run_pretrain_module() -> Callable[..., subprocess.CompletedProcess]:
    return _runner()


def train_in_process(shards: Path, out_dir: Path, **keys: object) -> tuple[Any, dict[int, dict]]:
    """`pretrain.train.train()` in this process on `tiny_overrides(shards, out_dir, **keys)`, on one thread
    (a tiny model gains nothing from more and loses ~10x when other processes share the CPU); returns the
    TrainResult and `read_metrics(out_dir)`."""
    import torch

    from pretrain.config import load_config
    from pretrain.train import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train(load_config(None, tiny_overrides(shards, out_dir, **keys)))
    finally:
        torch.set_num_threads(threads)
    return result, read_metrics(out_dir)


def loss_ends(metrics: dict[int, dict], key: str, steps: int) -> tuple[float, float]:
    """Means of `key` over the first three and the last three steps of a run logged every step: a falling
    loss judged past the noise of single small batches."""
    first = sum(metrics[s][key] for s in range(1, 4)) / 3
    last = sum(metrics[s][key] for s in range(steps - 2, steps + 1)) / 3
    return first, last


def compile_reports(stdout: str) -> list[tuple[int, int, int]]:
    """(graphs compiled, graph breaks, frames left eager) of each `train.compile` report rank 0 printed at the
    end of a run (pretrain/train.py), in the order the runs ran."""
    pattern = r"train\.compile=\w+: (\d+) graphs compiled, (\d+) graph breaks, (\d+) frames left eager"
    return [(int(g), int(b), int(e)) for g, b, e in re.findall(pattern, stdout)]


def assert_runs_close(run: dict[int, dict], reference: dict[int, dict], *, rtol: float, label: str) -> None:
    """Two runs' records (`read_metrics`) at the same steps, loss and grad_norm within `rtol` relative of the
    reference's, and not all bitwise equal: two implementations that both ran leave other last bits
    somewhere (other orders of sums), so bitwise equality means one of them did not run."""
    assert sorted(run) == sorted(reference), f"{label}: steps {sorted(run)} vs {sorted(reference)}"
    pairs = [(run[s][k], reference[s][k]) for s in reference for k in ("loss", "grad_norm")]
    assert any(a != b for a, b in pairs), f"{label}: the runs are bitwise equal"
    for step in reference:
        for key in ("loss", "grad_norm"):
            a, b = run[step][key], reference[step][key]
            print(f"{label} step {step} {key}: {a!r} vs {b!r}")
            assert abs(a - b) <= rtol * abs(b), f"{label} step {step}: {key} {a} vs {b}"


def read_metrics(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl -> {step: training record} (evaluation records left out)."""
    import json

    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec
    return out
