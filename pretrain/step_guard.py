"""Fault tolerance inside the loop: a step whose loss (or gradient norm) is not finite on any rank, or
whose loss jumps beyond `train.loss_spike_factor` x the running mean of recent good steps, is skipped on
every rank alike — the optimizer update is withheld (weights and optimizer states untouched), the dropout
RNG is put back and the learning-rate schedule does not advance. Too many skips in a row stop the run with
an error after saving the last good state. The decision is collective, so all ranks always agree.
"""

from __future__ import annotations

import math
import os
from collections import deque
from typing import Any

import torch


class OptimizerGate:
    """Lets the engine run its whole step machinery (clipping, zeroing grads, counters) but withholds the
    update itself: `step()` of the wrapped optimizer does nothing while `closed`. ZeRO and the mixed-precision
    optimizers call this same inner optimizer, so the gate works under every stage."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.closed = False
        inner_step = optimizer.step

        def gated_step(*args: Any, **kwargs: Any) -> Any:
            return None if self.closed else inner_step(*args, **kwargs)

        optimizer.step = gated_step  # type: ignore[method-assign]


class StepGuard:
    def __init__(self, *, spike_factor: float, max_in_a_row: int, window: int = 50, min_history: int = 10):
        self.spike_factor, self.max_in_a_row, self.min_history = spike_factor, max_in_a_row, min_history
        self.history: deque[float] = deque(maxlen=window)
        self.skipped = 0
        self.in_a_row = 0

    def verdict(
        self, losses: list[float], grad_norm: float | None, *, world_size: int
    ) -> tuple[str | None, float]:
        """Collective over the world. Returns (reason to skip or None, the global mean loss)."""
        local_bad = any(not math.isfinite(x) for x in losses) or (
            grad_norm is not None and not math.isfinite(grad_norm)
        )
        local_mean = sum(losses) / len(losses) if losses else 0.0
        t = torch.tensor([1.0 if local_bad else 0.0, 0.0 if local_bad else local_mean], dtype=torch.float64)
        if world_size > 1:
            torch.distributed.all_reduce(t)
        if t[0].item() > 0:
            return "non-finite loss or gradient", math.nan
        mean = t[1].item() / world_size
        if (
            self.spike_factor > 0
            and len(self.history) >= self.min_history
            and mean > self.spike_factor * (sum(self.history) / len(self.history))
        ):
            return f"loss spike ({mean:.4g} > {self.spike_factor} x running mean)", mean
        return None, mean

    def record(self, reason: str | None, loss: float) -> None:
        if reason is None:
            self.history.append(loss)
            self.in_a_row = 0
        else:
            self.skipped += 1
            self.in_a_row += 1

    @property
    def exhausted(self) -> bool:
        return self.max_in_a_row > 0 and self.in_a_row >= self.max_in_a_row

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.clear()
        self.history.extend(float(x) for x in state.get("history", []))
        self.skipped, self.in_a_row = int(state.get("skipped", 0)), int(state.get("in_a_row", 0))


def injected_fault(step: int, rank: int) -> str | None:
    """Test hook: TANDEM_FAULT_INJECT=nan:STEP:RANK or spike:STEP:RANK corrupts that rank's loss at that step."""
    spec = os.environ.get("TANDEM_FAULT_INJECT", "")
    parts = spec.split(":")
    if len(parts) == 3 and parts[0] in ("nan", "spike") and parts[1:] == [str(step), str(rank)]:
        return parts[0]
    return None
