"""The global batch size as a function of the samples consumed: fixed, or ramped up as in GPT-3.

GPT-3 (Brown et al. 2020, appendix B) grew the batch linearly from a small value to the full one over the
first billions of tokens. Megatron-LM's `--rampup-batch-size START INCREMENT SAMPLES` states the rule this
module follows: with n = (global - start) / increment increments spread evenly over SAMPLES samples, a step
that begins after `consumed` samples has

    batch = global                                                  if consumed > SAMPLES
    batch = start + int(consumed / (SAMPLES / n)) * increment      otherwise

(the same floating-point expression as Megatron's RampupBatchsizeNumMicroBatchesCalculator, so both give
the same batch at every position).

Because the batch depends only on `consumed`, and `consumed` only on the batches before it, the sequence of
steps is fixed in advance: `BatchSchedule` lays it out as segments of equal-batch steps, which lets the
loader go from a micro-batch number straight to its samples (and back) without replaying the run.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

RAMP_KEYS = ("start", "increment", "samples")


@dataclass(frozen=True)
class BatchSizeRamp:
    start: int
    increment: int
    samples: int
    global_batch_size: int

    @classmethod
    def from_config(cls, ramp: dict[str, Any] | None, global_batch_size: int) -> BatchSizeRamp | None:
        """`train.batch_size_ramp` ({start, increment, samples}, or empty/None for a fixed batch)."""
        if not ramp:
            return None
        return cls(int(ramp["start"]), int(ramp["increment"]), int(ramp["samples"]), global_batch_size)

    def __post_init__(self) -> None:
        diff = self.global_batch_size - self.start
        if self.start <= 0 or self.increment <= 0 or self.samples <= 0:
            raise ValueError(f"batch-size ramp {self}: start, increment and samples must be > 0")
        if diff <= 0 or diff % self.increment:
            raise ValueError(
                f"batch-size ramp {self}: global - start must be a positive multiple of the increment"
            )

    @property
    def increments(self) -> int:
        return (self.global_batch_size - self.start) // self.increment

    def batch_size(self, consumed: int) -> int:
        """Global batch of the step that starts after `consumed` samples (Megatron's rule)."""
        if consumed > self.samples:
            return self.global_batch_size
        done = int(consumed / (self.samples / self.increments))
        return min(self.start + done * self.increment, self.global_batch_size)

    def as_dict(self) -> dict[str, int]:
        return {"start": self.start, "increment": self.increment, "samples": self.samples}


@dataclass(frozen=True)
class Segment:
    """`steps` consecutive steps of `batch` samples, the first one step number `first_step` (0-based)
    starting at global sample `first_sample`."""

    first_step: int
    first_sample: int
    batch: int
    steps: int | None  # None: every step from here on (the full batch)


class BatchSchedule:
    """Step number <-> first sample <-> batch size, for a fixed batch or a ramp."""

    def __init__(self, global_batch_size: int, ramp: BatchSizeRamp | None = None):
        if ramp is not None and ramp.global_batch_size != global_batch_size:
            raise ValueError(f"ramp {ramp} ends at another global batch than {global_batch_size}")
        self.global_batch, self.ramp = global_batch_size, ramp
        self.segments: list[Segment] = []
        step, sample = 0, 0
        while True:
            batch = ramp.batch_size(sample) if ramp else global_batch_size
            if batch >= global_batch_size:
                self.segments.append(Segment(step, sample, global_batch_size, None))
                break
            assert ramp is not None  # only a ramp has batches below the full one
            # Steps at this batch: the smallest n with a larger batch after n steps (the rule is monotone
            # in the samples consumed, and past ramp.samples the batch is the full one).
            lo, hi = 1, (ramp.samples - sample) // batch + 2
            while lo < hi:
                mid = (lo + hi) // 2
                if ramp.batch_size(sample + mid * batch) > batch:
                    hi = mid
                else:
                    lo = mid + 1
            self.segments.append(Segment(step, sample, batch, lo))
            step, sample = step + lo, sample + lo * batch
        self._first_samples = [s.first_sample for s in self.segments]
        self._first_steps = [s.first_step for s in self.segments]

    def step_of(self, consumed: int) -> int:
        """Steps taken after `consumed` samples; ValueError if `consumed` is not a step boundary."""
        seg = self.segments[bisect.bisect_right(self._first_samples, consumed) - 1]
        k, rem = divmod(consumed - seg.first_sample, seg.batch)
        if rem:
            raise ValueError(
                f"consumed_samples={consumed} is not a whole number of global batches of "
                f"{self.global_batch}"
                + (f" under the batch-size ramp {self.ramp.as_dict()}" if self.ramp else "")
            )
        return seg.first_step + k

    def segment_index(self, step: int) -> int:
        """Index in `segments` of the segment holding step number `step` (0-based)."""
        return bisect.bisect_right(self._first_steps, step) - 1

    def step_start(self, step: int) -> tuple[int, int]:
        """(first global sample, global batch) of step number `step` (0-based)."""
        seg = self.segments[self.segment_index(step)]
        return seg.first_sample + (step - seg.first_step) * seg.batch, seg.batch
