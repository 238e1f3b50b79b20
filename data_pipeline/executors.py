"""Running a data job's stages: on this machine's cores, and reading where a job stands.

The local executor runs each stage's unfinished tasks on ``workers`` processes (spawned, so no thread
state of the parent is copied) and moves to the next stage only when every task of this one is done.
The Slurm executor (``slurm.data_jobs``) submits the same tasks as job arrays; both call
:func:`data_pipeline.pipeline.run_task`, so their outputs are the same bytes.

``python -m data_pipeline.executors OUT STAGE [--task T | --stride N --offset I]`` runs tasks of a
stage in this process: what each Slurm array task executes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import sys
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_pipeline.pipeline import WORK_DIR, Job, JobError, run_task, task_ids

__all__ = ["TaskFailed", "format_status", "job_status", "run_local"]


class TaskFailed(RuntimeError):
    """A task of a stage raised; ``cause`` is its exception (re-raised by the caller as it sees fit)."""

    def __init__(self, stage: str, task: int, cause: BaseException) -> None:
        super().__init__(f"{stage} task {task}: {cause}")
        self.stage, self.task, self.cause = stage, task, cause


def _run_one(args: tuple[str, str, int]) -> tuple[int, BaseException | None]:
    out_dir, stage, task = args
    try:
        run_task(out_dir, stage, task)
    except Exception as exc:  # returned, so the parent decides which failure to report
        return task, exc
    return task, None


def _run_pooled(
    pool: Any, out_dir: str, stage: str, pending: list[int], workers: int, bar: tqdm
) -> list[tuple[int, BaseException]]:
    """At most ``workers`` tasks in flight; after a failure none is started, the running ones finish."""
    queue = list(reversed(pending))
    inflight: dict[int, Any] = {}
    failures: list[tuple[int, BaseException]] = []
    while queue or inflight:
        while queue and not failures and len(inflight) < workers:
            task = queue.pop()
            inflight[task] = pool.apply_async(_run_one, ((out_dir, stage, task),))
        if not inflight:
            break
        ready = [t for t, r in inflight.items() if r.ready()]
        if not ready:
            next(iter(inflight.values())).wait(0.05)
            continue
        for t in ready:
            _, error = inflight.pop(t).get()
            if error is not None:
                failures.append((t, error))
            else:
                bar.update()
    return failures


def run_local(job: Job, *, workers: int = 1, progress: bool | None = None) -> None:
    """Run every unfinished task of the job, stage by stage, on ``workers`` local processes.

    On a failure no new task starts; the tasks already running finish (their work is kept), and the
    failure of the lowest-numbered task, the first in corpus order, is raised as :class:`TaskFailed`."""
    if workers < 1:
        raise JobError(f"workers={workers} must be >= 1")
    pool = None
    try:
        for stage, _ in job.stages():
            pending = task_ids(job, stage)
            if not pending:
                continue
            total = dict(job.stages())[stage]
            bar = tqdm(
                total=total,
                initial=total - len(pending),
                desc=f"{stage:>6}",
                unit="task",
                file=sys.stderr,
                disable=(not progress) if progress is not None else None,
                mininterval=1.0,
            )
            failures: list[tuple[int, BaseException]] = []
            try:
                if workers == 1 or len(pending) == 1:
                    for task in pending:
                        _, error = _run_one((job.out_dir, stage, task))
                        if error is not None:
                            failures.append((task, error))
                            break
                        bar.update()
                else:
                    if pool is None:
                        # spawn, not fork: the parent may hold threads (sentencepiece, tqdm) that fork copies.
                        pool = multiprocessing.get_context("spawn").Pool(workers)
                    failures = _run_pooled(pool, job.out_dir, stage, pending, workers, bar)
            finally:
                bar.close()
            if failures:
                task, error = min(failures, key=lambda f: f[0])
                raise TaskFailed(stage, task, error) from error
    finally:
        if pool is not None:
            pool.close()
            pool.join()


def _alive(host: str, pid: int) -> bool | None:
    """Whether a task's process still runs: known only on the host that runs it."""
    if host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def job_status(out_dir: str | Path, *, slurm_active: Collection[str] | None = None) -> dict[str, Any]:
    """Per stage: tasks, done, running, failed, interrupted (a running marker whose local process is gone,
    or, given ``slurm_active``, the job ids Slurm still runs, whose Slurm job is not among them)."""
    job = Job.load(out_dir)
    work = Path(out_dir) / WORK_DIR
    stages = []
    for stage, n in job.stages():
        done = {int(p.stem) for p in (work / stage / "done").glob("*.json")}
        failed: dict[int, str] = {}
        for p in (work / stage / "failed").glob("*.json"):
            if int(p.stem) not in done:
                failed[int(p.stem)] = json.loads(p.read_text()).get("error", "?")
        running = interrupted = 0
        for p in (work / stage / "running").glob("*.json"):
            t = int(p.stem)
            if t in done or t in failed:
                continue
            try:
                info = json.loads(p.read_text())
            except json.JSONDecodeError:
                continue  # being written right now
            if "SLURM_JOB_ID" in info:
                gone = slurm_active is not None and str(info["SLURM_JOB_ID"]) not in slurm_active
            else:
                gone = _alive(info.get("host", ""), int(info.get("pid", -1))) is False
            if gone:
                interrupted += 1
            else:
                running += 1
        stages.append(
            {
                "stage": stage,
                "tasks": n,
                "done": len(done),
                "running": running,
                "failed": len(failed),
                "interrupted": interrupted,
                "errors": {str(t): e for t, e in sorted(failed.items())[:5]},
            }
        )
    finished = all(s["done"] == s["tasks"] for s in stages)
    return {"out_dir": str(out_dir), "kind": job.kind, "finished": finished, "stages": stages}


def format_status(status: dict[str, Any], *, width: int = 30) -> str:
    """A table with a progress bar per stage, and the first errors of failed tasks."""
    lines = [
        f"{status['out_dir']}: {status['kind']} job, {'finished' if status['finished'] else 'not finished'}"
    ]
    lines.append(
        f"{'stage':<7} {'progress':<{width + 2}} {'done':>9} {'running':>8} {'failed':>7} {'interrupted':>12}"
    )
    for s in status["stages"]:
        filled = int(width * s["done"] / max(s["tasks"], 1))
        bar = "[" + "#" * filled + "." * (width - filled) + "]"
        done = f"{s['done']}/{s['tasks']}"
        lines.append(
            f"{s['stage']:<7} {bar} {done:>9} {s['running']:>8} {s['failed']:>7} {s['interrupted']:>12}"
        )
        for t, err in s["errors"].items():
            lines.append(f"  {s['stage']} task {t} failed: {err}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m data_pipeline.executors", description="Run tasks of one stage."
    )
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("stage")
    ap.add_argument("--task", type=int, default=None, help="run this one task")
    ap.add_argument(
        "--stride", type=int, default=1, help="run tasks offset, offset+stride, ... (array tasks)"
    )
    ap.add_argument("--offset", type=int, default=None, help="default: $SLURM_ARRAY_TASK_ID")
    args = ap.parse_args(argv)
    job = Job.load(args.out_dir)
    if args.task is not None:
        tasks = [args.task]
    else:
        offset = args.offset if args.offset is not None else int(os.environ.get("SLURM_ARRAY_TASK_ID", "0"))
        tasks = [t for t in task_ids(job, args.stage, pending_only=False) if t % args.stride == offset]
    for t in tasks:
        try:
            run_task(args.out_dir, args.stage, t)
        except Exception as exc:
            print(f"error: {args.stage} task {t}: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
