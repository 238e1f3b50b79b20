"""sbatch templates (single node, multi node) with Tandem's preemption protocol, rendered and submitted."""

from slurm.render import JobSpec, SlurmError, render, submit, time_to_seconds, validate

__all__ = ["JobSpec", "SlurmError", "render", "submit", "time_to_seconds", "validate"]
