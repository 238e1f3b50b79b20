"""Process-group start-up for every way Tandem is launched: a plain process, `torchrun`, the `deepspeed`
launcher or Slurm `srun`. gloo on CPU, nccl on GPU."""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from pathlib import Path

import torch


def ensure_accelerator_env() -> None:
    """DeepSpeed picks its accelerator when first imported; without CUDA it must be told to use the CPU."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def _adopt_slurm_env() -> None:
    """`srun python -m pretrain train` sets SLURM_PROCID etc. but not torch's RANK/WORLD_SIZE."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or "SLURM_NTASKS" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))


def launched_world_size() -> int:
    """The world size the launcher set up (torchrun/deepspeed: WORLD_SIZE; srun: SLURM_NTASKS), read
    without creating a process group; 1 for a plain process."""
    for key in ("WORLD_SIZE", "SLURM_NTASKS"):
        value = os.environ.get(key, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def init_distributed(*, timeout_s: float | None = None) -> tuple[int, int, int]:
    """Initializes torch.distributed (through DeepSpeed) and returns (rank, world_size, local_rank).

    timeout_s bounds how long any collective waits for a peer (gloo and nccl): a rank that stops
    participating then makes the others fail with a timeout error instead of hanging forever."""
    ensure_accelerator_env()
    import deepspeed
    import torch.distributed as dist

    _adopt_slurm_env()
    if "RANK" not in os.environ:
        # A plain single process: a one-rank world on loopback, so every code path is the distributed one.
        # Port 0: its store binds whatever port is free (nobody else connects to a one-rank world), so two
        # runs started at once on one machine cannot race for a port picked in advance.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "0")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        if not cuda and "OMP_NUM_THREADS" not in os.environ and local_world > 1:
            # Oversubscribed intra-op threads make multi-process CPU runs several times slower.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        kwargs = {}
        if timeout_s:
            kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
            # Groups created later without an explicit timeout (ours, and DeepSpeed's clone of the world
            # group for data parallelism) take torch's module default of 30 minutes, read at creation time.
            import torch.distributed.distributed_c10d as c10d

            c10d.default_pg_timeout = kwargs["timeout"]
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False, **kwargs)
        if not cuda:
            atexit.register(_remove_shm_buffer, dist.get_rank())
    return dist.get_rank(), dist.get_world_size(), local_rank


def _remove_shm_buffer(rank: int) -> None:
    """DeepSpeed's CPU all-reduce maps a ~67 MB file per rank in /dev/shm, named after the uid, master
    address, port and rank, and never deletes it: a machine that runs many jobs fills its shared memory.
    Each rank unlinks its own at exit; peers that still map it keep their mapping (unlink only drops the
    name), and by then every peer has opened it, since that happens before the first collective."""
    name = (
        f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
        f"{os.environ.get('MASTER_PORT', '')}_{rank}"
    )
    # Best effort: a leftover buffer costs memory, not correctness.
    with contextlib.suppress(OSError):
        (Path("/dev/shm") / name).unlink(missing_ok=True)


def is_collective_timeout(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "timed out" in text or "timeout" in text


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
