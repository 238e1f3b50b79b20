"""Stopping cleanly when the cluster asks: a signal (Slurm's `--signal=B:USR1@grace`, SIGTERM on
preemption) only sets a flag; at the next step boundary every rank agrees through an all-reduce, saves the
same step and leaves the loop. The batch script then requeues the job, which resumes from that checkpoint.

A time limit works the same way: when the job's remaining time (`train.time_limit_s` since start, or
Slurm's end time) drops below the grace period, the flag is raised as if a signal had arrived.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import torch

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
# Exit status of a run that stopped early on request after saving: the batch script requeues on it.
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"


class StopFlag:
    """Set by a signal handler (async-signal-safe: it only stores a value) or a deadline."""

    def __init__(self, *, deadline: float | None = None, grace_s: float = 0.0):
        self.requested: str | None = None
        self.deadline, self.grace_s = deadline, grace_s
        self._previous: dict[int, Any] = {}

    def install(self) -> StopFlag:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame: Any) -> None:
        self.requested = signal.Signals(signum).name

    def local_reason(self) -> str | None:
        if self.requested:
            return self.requested
        if self.deadline is not None and time.time() >= self.deadline - self.grace_s:
            return "time limit"
        return None

    def agreed(self, group: Any = None, world_size: int = 1) -> bool:
        """Collective: True on every rank if any rank wants to stop (so all save the same step)."""
        wants = 1.0 if self.local_reason() else 0.0
        if world_size > 1:
            t = torch.tensor([wants])
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=group)
            wants = t.item()
        return wants > 0


def slurm_deadline() -> float | None:
    """Wall-clock end of the current Slurm job, if Slurm says (SLURM_JOB_END_TIME, epoch seconds)."""
    end = os.environ.get("SLURM_JOB_END_TIME")
    try:
        return float(end) if end else None
    except ValueError:
        return None
