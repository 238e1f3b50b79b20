"""sbatch templates (single node, multi node) with Tandem's preemption protocol, rendered and submitted; and
the data-preparation stages as job arrays (slurm.data_jobs, imported on its own: it needs data_pipeline)."""

from slurm.render import JobSpec, SlurmError, render, submit, time_to_seconds, validate

__all__ = ["JobSpec", "SlurmError", "render", "submit", "time_to_seconds", "validate"]
