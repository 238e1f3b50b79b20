"""`pretrain data clean`, `pretrain data status`, and the cleaning, bad-input and executor flags of
`pretrain data shard`.

Wired into pretrain/cli.py by ``register_clean(dsub)`` and ``register_status(dsub)`` (the data
sub-parsers), and for the shard verb by ``add_shard_cleaning_args(p)`` on its parser plus
``shard_kwargs_from_args(args)`` and ``report_shard(manifest, seconds, as_json=...)`` in ``cmd_data_shard``.

Both jobs run on this machine's processes (``--executor local --workers N``, the default) or as one Slurm
job array per stage (``--executor slurm --tasks N --time T``, slurm/data_jobs.py); the output is the same
bytes either way.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = [
    "add_shard_cleaning_args",
    "cmd_data_clean",
    "cmd_data_shard",
    "cmd_data_status",
    "register_clean",
    "register_status",
    "report_clean",
    "report_shard",
    "shard_kwargs_from_args",
    "summary",
]


def _add_common(p: argparse.ArgumentParser, *, clean_flag: bool) -> None:
    if clean_flag:
        p.add_argument(
            "--clean",
            action="store_true",
            help="apply C4 cleaning and dedupe before tokenizing (off by default: every valid document is kept)",
        )
    p.add_argument(
        "--errors",
        choices=["strict", "skip"],
        default=None,
        help="malformed input: stop with FILE:LINE (strict, default) or skip and count by reason",
    )
    p.add_argument("--lenient", action="store_true", help="same as --errors skip")
    p.add_argument(
        "--bad-words", type=Path, default=None, help="file of bad words, one per line (none shipped)"
    )
    p.add_argument(
        "--max-doc-mb",
        type=float,
        default=None,
        help="documents over this many MB of UTF-8 are split or skipped (default: no limit)",
    )
    p.add_argument(
        "--oversize",
        choices=["split", "skip"],
        default="split",
        help="what to do with documents over --max-doc-mb (default split, at line breaks)",
    )
    p.add_argument("--json", action="store_true", help="make the last printed line a JSON summary")
    _add_executor_args(p)


class UsageError(ValueError):
    """A flag's value, or a combination of flags, that cannot work; the message names the flag."""


def _add_executor_args(p: argparse.ArgumentParser) -> None:
    from data_pipeline.jobs import DEFAULT_BUCKETS, DEFAULT_PIECE_MB
    from slurm.data_jobs import DEFAULT_JOB_NAME, DEFAULT_RETRIES

    p.add_argument(
        "--buckets",
        type=int,
        default=DEFAULT_BUCKETS,
        help=f"hash partitions of the dedupe stage (default {DEFAULT_BUCKETS}; the output does not depend on it)",
    )
    p.add_argument(
        "--piece-mb",
        type=float,
        default=DEFAULT_PIECE_MB,
        help=f"an uncompressed JSON lines file larger than this is cut into pieces of about this size, one "
        f"task each (default {DEFAULT_PIECE_MB:g})",
    )
    g = p.add_argument_group(
        "executor",
        "where the tasks run: this machine's processes (--workers), or one Slurm job array per stage, each "
        "after the previous one (afterok); a rerun submits only the unfinished tasks",
    )
    g.add_argument("--executor", choices=["local", "slurm"], default="local", help="default local")
    g.add_argument("--tasks", type=int, help="slurm: array tasks per stage (task I runs I, I+N, I+2N, ...)")
    g.add_argument("--time", help="slurm: time limit of each array task, HH:MM:SS or D-HH:MM:SS")
    g.add_argument("--partition", help="slurm: partition")
    g.add_argument("--account", help="slurm: account")
    g.add_argument("--job-name", help=f"slurm: arrays are named JOBNAME-STAGE (default {DEFAULT_JOB_NAME})")
    g.add_argument("--log-dir", type=Path, help="slurm: the array tasks' logs (default ./slurm-logs)")
    g.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="slurm: exported in the job (repeatable)",
    )
    g.add_argument(
        "--retries",
        type=int,
        help=f"slurm: times a failed array task requeues itself (default {DEFAULT_RETRIES})",
    )
    g.add_argument("--max-running", type=int, help="slurm: at most this many array tasks of a stage at once")
    g.add_argument(
        "--wait", action="store_true", help="slurm: wait for the job to end, then print the summary"
    )
    g.add_argument(
        "--dry-run", action="store_true", help="slurm: print the sbatch scripts instead of submitting"
    )


_SLURM_ONLY = ("tasks", "time", "partition", "account", "job_name", "log_dir", "retries", "max_running")


def _check_executor_args(args: argparse.Namespace) -> None:
    """One UsageError naming every flag that does not fit (--flag VALUE: rule)."""
    problems = []
    if args.buckets < 1:
        problems.append(f"--buckets {args.buckets}: must be at least 1")
    if not args.piece_mb > 0:
        problems.append(f"--piece-mb {args.piece_mb:g}: must be > 0")
    if args.workers < 1:
        problems.append(f"--workers {args.workers}: must be at least 1")
    if args.executor == "local":
        given = [n for n in _SLURM_ONLY if getattr(args, n) is not None]
        given += [n for n in ("env", "wait", "dry_run") if getattr(args, n)]
        problems += [f"--{n.replace('_', '-')} needs --executor slurm" for n in given]
    else:
        if args.tasks is None:
            problems.append("--executor slurm needs --tasks N (array tasks per stage)")
        elif args.tasks < 1:
            problems.append(f"--tasks {args.tasks}: must be at least 1")
        if args.time is None:
            problems.append("--executor slurm needs --time HH:MM:SS (per array task)")
        if args.workers != 1:
            problems.append(
                f"--workers {args.workers} is for --executor local (slurm runs --tasks array tasks)"
            )
        if args.retries is not None and args.retries < 0:
            problems.append(f"--retries {args.retries}: must be at least 0")
        if args.max_running is not None and args.max_running < 1:
            problems.append(f"--max-running {args.max_running}: must be at least 1")
    if problems:
        raise UsageError("; ".join(problems))


def add_shard_cleaning_args(p: argparse.ArgumentParser) -> None:
    """Flags for `pretrain data shard`: --clean, --errors (with --lenient as its alias), --bad-words,
    --max-doc-mb, --oversize, --json. Call it on the shard parser instead of adding --lenient."""
    _add_common(p, clean_flag=True)


def _errors(args: argparse.Namespace) -> str:
    if args.lenient and args.errors == "strict":
        raise SystemExit("error: --lenient contradicts --errors strict")
    return "skip" if args.lenient else (args.errors or "strict")


def _clean_config(args: argparse.Namespace) -> Any:
    from data_pipeline.clean import CleanConfig

    return CleanConfig(bad_words_path=None if args.bad_words is None else str(args.bad_words))


def _max_bytes(args: argparse.Namespace) -> int | None:
    return None if args.max_doc_mb is None else max(1, int(args.max_doc_mb * 1_000_000))


def shard_kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for ``shard_corpus`` from the flags of :func:`add_shard_cleaning_args`."""
    if args.bad_words is not None and not args.clean:
        raise SystemExit("error: --bad-words needs --clean")
    return {
        "errors": _errors(args),
        "clean": _clean_config(args) if args.clean else None,
        "max_document_bytes": _max_bytes(args),
        "oversize": args.oversize,
    }


def summary(record: dict, seconds: float) -> dict[str, Any]:
    """The one-line JSON summary of a shard manifest or a clean report."""
    tokens = None
    if "totals" in record:
        tokens = sum(t["tokens"] for t in record["totals"].values())
    return {
        "documents_in": record.get("documents_in"),
        "documents_written": record.get("documents_written"),
        "rejected": record.get("rejected", {}),
        "cleaned_away": record.get("cleaning_documents_removed", 0),
        "filtered": record.get("filtered", {}),
        "tokens": tokens,
        "seconds": round(seconds, 3),
    }


def report_shard(manifest: dict, seconds: float, *, out: Path, as_json: bool) -> None:
    """What `pretrain data shard` prints: per-split totals, rejections and cleaning counts, then
    (with ``as_json``) the JSON summary as the last line."""
    for split, tot in manifest["totals"].items():
        print(f"{split}: {tot['shards']} shard(s), {tot['documents']} documents, {tot['tokens']} tokens")
    if manifest.get("rejected"):
        print(f"rejected: {json.dumps(manifest['rejected'])}")
    if manifest.get("filtered"):
        print(f"filtered: {json.dumps(manifest['filtered'])}")
    if manifest.get("cleaning"):
        print(f"cleaning: {json.dumps(manifest['cleaning'])}")
    print(f"manifest: {out / 'manifest.json'}")
    if as_json:
        print(json.dumps(summary(manifest, seconds), sort_keys=True))


def register_clean(dsub: argparse._SubParsersAction) -> None:
    """Add `pretrain data clean` to the data verbs."""
    p = dsub.add_parser(
        "clean",
        help="C4-clean and dedupe a corpus into the same JSON lines format",
        description="Apply C4's cleaning heuristics (T5 paper §2.2: terminal punctuation, >= 5 words per "
        "line, no 1000+ character words, no javascript or policy lines, citation markers removed; pages with "
        '< 3 sentences, "lorem ipsum", "{" or a bad word dropped), exact document dedupe and removal of '
        "repeated 3-sentence spans. Writes OUT/part-FFFFF-PPPP-KKKK.json.gz (named after the input file and "
        "piece) and OUT/clean_report.json (documents "
        "in, written, rejected by reason, removed by rule).",
    )
    p.add_argument("--input", required=True, help="files, directories or globs (comma-separated)")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument(
        "--workers", type=int, default=1, help="cleaning processes (default 1; output is identical)"
    )
    p.add_argument("--docs-per-file", type=int, default=100_000, help="documents per output file")
    _add_common(p, clean_flag=False)
    p.set_defaults(func=cmd_data_clean)


def report_clean(report: dict, seconds: float, *, out: Path, as_json: bool) -> None:
    """What `pretrain data clean` prints: documents in and written, rejections, cleaning counts, then
    (with ``as_json``) the JSON summary as the last line."""
    print(
        f"cleaned {report['documents_in']} documents: {report['documents_written']} written to "
        f"{len(report['outputs'])} file(s) in {out}"
    )
    if report["rejected"]:
        print(f"rejected: {json.dumps(report['rejected'])}")
    print(f"cleaning: {json.dumps(report['cleaning'])}")
    print(f"report: {out / 'clean_report.json'}")
    if as_json:
        print(json.dumps(summary(report, seconds), sort_keys=True))


def cmd_data_clean(args: argparse.Namespace) -> int:
    from data_pipeline.clean import CleanError
    from data_pipeline.corpus import CorpusError, expand_inputs
    from data_pipeline.jobs import clean_corpus
    from data_pipeline.pipeline import JobError

    started = time.monotonic()
    options = {
        "clean": _clean_config(args),
        "errors": _errors(args),
        "max_document_bytes": _max_bytes(args),
        "oversize": args.oversize,
        "docs_per_file": args.docs_per_file,
        "buckets": args.buckets,
        "piece_mb": args.piece_mb,
    }
    try:
        _check_executor_args(args)
        inputs = expand_inputs(args.input)
        if args.executor == "slurm":
            return _run_on_slurm("clean", inputs, options, args, started)
        _refuse_while_on_slurm(args.out)
        cfg = options.pop("clean")
        report = clean_corpus(inputs, args.out, cfg=cfg, workers=args.workers, **options)
    except (CorpusError, CleanError, JobError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report_clean(report, time.monotonic() - started, out=args.out, as_json=args.json)
    return 0


def cmd_data_shard(args: argparse.Namespace) -> int:
    """A drop-in body for pretrain/cli.py's ``cmd_data_shard`` with the flags above: shards, prints
    the totals, and turns a malformed-input stop into ``error: FILE:LINE: reason`` and exit 2."""
    from data_pipeline.corpus import CorpusError, expand_inputs
    from data_pipeline.pipeline import JobError
    from data_pipeline.sharding import shard_corpus

    started = time.monotonic()
    options = {
        "tokenizer_path": args.tokenizer,
        "val_fraction": args.val_fraction,
        "shard_size_mb": args.shard_size_mb,
        "seed": args.seed,
        "buckets": args.buckets,
        "piece_mb": args.piece_mb,
        **shard_kwargs_from_args(args),
    }
    try:
        _check_executor_args(args)
        inputs = expand_inputs(args.input)
        if args.executor == "slurm":
            return _run_on_slurm("shard", inputs, options, args, started)
        _refuse_while_on_slurm(args.out)
        manifest = shard_corpus(inputs, out_dir=args.out, workers=args.workers, **options)
    except (CorpusError, JobError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report_shard(manifest, time.monotonic() - started, out=args.out, as_json=args.json)
    return 0


# ------------------------------------------------------------------------------- Slurm executor
def _refuse_while_on_slurm(out: Path) -> None:
    """Running a job (here or on Slurm) whose Slurm arrays are still pending or running is a UsageError."""
    from data_pipeline.pipeline import WORK_DIR
    from slurm.data_jobs import SUBMISSIONS, refuse_while_active
    from slurm.render import SlurmError

    if (out / WORK_DIR / SUBMISSIONS).is_file():
        try:
            refuse_while_active(out)
        except SlurmError as exc:
            raise UsageError(str(exc)) from exc


def _run_on_slurm(
    kind: str, inputs: list[Path], options: dict[str, Any], args: argparse.Namespace, started: float
) -> int:
    """Plan the job and submit its stages as Slurm job arrays (or print their scripts with --dry-run);
    with --wait, wait for them and print what a local run prints. Usage errors propagate (exit 2)."""
    from data_pipeline.clean import CleanError
    from data_pipeline.jobs import prepare_job
    from launch import LaunchError, parse_env_assignments
    from slurm.data_jobs import DEFAULT_JOB_NAME, DEFAULT_RETRIES, DataJobSpec, dry_run, submit_job, validate
    from slurm.render import SlurmError

    try:
        spec = DataJobSpec(
            tasks=args.tasks,
            time=args.time,
            partition=args.partition,
            account=args.account,
            job_name=args.job_name or DEFAULT_JOB_NAME,
            log_dir=args.log_dir or Path("slurm-logs"),
            workdir=Path.cwd(),
            env=parse_env_assignments(args.env),
            retries=DEFAULT_RETRIES if args.retries is None else args.retries,
            max_running=args.max_running,
        )
        validate(spec)  # before the output directory is claimed
        if args.dry_run:
            # Planned in a scratch directory: a dry run claims nothing. The arrays are those a submission
            # now would make (OUT's markers decide on a rerun).
            with tempfile.TemporaryDirectory() as scratch:
                job = prepare_job(kind, inputs, Path(scratch) / "plan", **options)  # type: ignore[arg-type]
            job.out_dir = str(args.out.resolve())
            print(dry_run(job, spec), end="")
            return 0
        # Before prepare_job: a job whose settings changed before any task finished is started afresh there,
        # which would forget the arrays still queued for it.
        _refuse_while_on_slurm(args.out)
        job = prepare_job(kind, inputs, args.out, **options)  # type: ignore[arg-type]
        submitted = submit_job(job, spec)
    except (SlurmError, LaunchError) as exc:
        raise UsageError(str(exc)) from exc
    except CleanError as exc:
        raise UsageError(str(exc)) from exc
    if submitted:
        for i, s in enumerate(submitted):
            after = f" after job {submitted[i - 1].job_id}" if i else ""
            print(f"submitted {s.stage}: job {s.job_id}, array {s.array}{after}")
        logs = spec.log_dir / f"{spec.job_name}-STAGE-JOBID_INDEX.out"
        print(f"logs: {logs}")
    if not args.wait:
        if submitted:
            print(f"watch: pretrain data status {args.out}")
        else:
            print(f"{args.out}: every task is done; nothing to submit")
        if args.json:
            print(json.dumps({"submitted": [vars(s) for s in submitted]}, sort_keys=True))
        return 0
    return _wait_and_report(kind, submitted, args, started)


def _wait_and_report(kind: str, submitted: list, args: argparse.Namespace, started: float) -> int:
    from data_pipeline.executors import format_status, job_status
    from data_pipeline.manifest import MANIFEST_NAME
    from data_pipeline.pipeline import REPORT_NAME
    from slurm.data_jobs import wait_for
    from slurm.render import SlurmError

    shown = [""]

    def progress(active: dict[str, str]) -> None:
        status = job_status(args.out, slurm_active=active)
        line = ", ".join(f"{s['stage']} {s['done']}/{s['tasks']}" for s in status["stages"])
        if line != shown[0]:
            print(f"waiting: {line}", file=sys.stderr, flush=True)
            shown[0] = line

    try:
        wait_for(submitted, on_poll=progress)
    except KeyboardInterrupt:
        print(f"\nstopped waiting; the Slurm jobs go on: pretrain data status {args.out}", file=sys.stderr)
        return 130
    except SlurmError as exc:
        print(f"error: {exc}; the Slurm jobs may go on: pretrain data status {args.out}", file=sys.stderr)
        return 1
    status = job_status(args.out, slurm_active=())
    if not status["finished"]:
        print(format_status(status), file=sys.stderr)
        errors = [e for s in status["stages"] for e in s["errors"].values()]
        # Bad input (strict mode) ends with exit 2 and the reader's FILE:LINE: reason, as a local run does.
        bad_input = next((e for e in errors if e.startswith(("CorpusError: ", "CleanError: "))), None)
        if bad_input is not None:
            print(f"error: {bad_input.partition(': ')[2]}", file=sys.stderr)
            return 2
        print(
            f"error: the Slurm job ended before every task was done; see the logs in "
            f"{args.log_dir or 'slurm-logs'} and rerun the same command to run only the unfinished tasks",
            file=sys.stderr,
        )
        return 1
    seconds = time.monotonic() - started
    if kind == "shard":
        manifest = json.loads((args.out / MANIFEST_NAME).read_text(encoding="utf-8"))
        report_shard(manifest, seconds, out=args.out, as_json=args.json)
    else:
        report = json.loads((args.out / REPORT_NAME).read_text(encoding="utf-8"))
        report_clean(report, seconds, out=args.out, as_json=args.json)
    return 0


# ------------------------------------------------------------------------------- data status
def register_status(dsub: argparse._SubParsersAction) -> None:
    """Add `pretrain data status` to the data verbs."""
    p = dsub.add_parser(
        "status",
        help="how far a shard or clean job has got: tasks done, running, failed per stage",
        description="Read OUT's task markers (OUT/.work/STAGE/{done,running,failed}) and print per stage how "
        "many tasks are done, running, failed and interrupted (a task whose process or Slurm job is gone), "
        "with a progress bar and the first errors; for a job submitted with --executor slurm, also its arrays "
        "and whether Slurm still has them. Works while the job runs, on any machine that sees OUT.",
    )
    p.add_argument("out", type=Path, help="the job's output directory (--out of `pretrain data shard|clean`)")
    p.add_argument("--json", action="store_true", help="print the status as one JSON object")
    p.set_defaults(func=cmd_data_status)


def _slurm_status(out: Path) -> tuple[dict[str, str] | None, list[dict[str, Any]]]:
    """Slurm's view of the job: {job id: state} of its arrays and running tasks Slurm still has (None when
    squeue cannot be asked), and the arrays of the latest submission with their state."""
    from data_pipeline.pipeline import WORK_DIR
    from slurm.data_jobs import active_jobs, submissions

    subs = submissions(out)
    latest = subs[max((i for i, s in enumerate(subs) if s["after"] is None), default=0) :]
    ids = {str(s["job_id"]) for s in latest}
    for marker in (out / WORK_DIR).glob("*/running/*.json"):
        try:
            info = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if "SLURM_JOB_ID" in info:
            ids.add(str(info["SLURM_JOB_ID"]))
    active = active_jobs(ids) if ids else {}
    arrays = [
        {
            "stage": s["stage"],
            "job_id": s["job_id"],
            "array": s["array"],
            "state": "unknown" if active is None else active.get(str(s["job_id"]), "ended"),
        }
        for s in latest
    ]
    return active, arrays


def cmd_data_status(args: argparse.Namespace) -> int:
    from data_pipeline.executors import format_status, job_status
    from data_pipeline.pipeline import JobError

    try:
        active, arrays = _slurm_status(args.out)
        status = job_status(args.out, slurm_active=None if active is None else set(active))
    except JobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    status["slurm"] = arrays
    if args.json:
        print(json.dumps(status, sort_keys=True))
        return 0
    print(format_status(status))
    for a in arrays:
        print(f"slurm: {a['stage']} job {a['job_id']} array {a['array']}: {a['state'].lower()}")
    return 0
