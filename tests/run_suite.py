"""`make test`: the suite as two pytest runs side by side, so both cores of a small machine stay busy.

* The tests marked `distributed` (each spawns two to four busy processes of its own: gloo ranks, and a
  launcher) run one at a time, as a plain `pytest -m distributed` would: beside each other they would
  oversubscribe the cores, and some of them time their collectives.
* Every other test (one busy process each: the pytest process, or one `pretrain` child while it waits)
  runs at the same time in a second pytest, on one thread (OMP_NUM_THREADS=1). The distributed runs
  leave a core idle for much of their time (ranks waiting on each other, process start-up, the launcher,
  checkpoint I/O): on 2 cores the serial suite kept 1.35 cores busy on average.

The distributed run's output streams; the other run's is kept and printed whole when both are done (the
two would interleave line by line otherwise), after a one-line notice when it ends. `--jobs 1` runs the two
one after the other, both streaming. Arguments after `--` go to both runs (paths, -k, -x, --durations,
...); `--mark EXPR` narrows both (`make test-fast` passes "not slow"). A run that selects no test is not a
failure (pytest's exit 5); the suite fails if either run fails. The last line counts both runs: "suite:
N passed, N failed, N skipped". Each run gets its own half of the tests' port band (TANDEM_TEST_PORTS, see
tests/conftest.free_port), so a port one run hands a launcher is never one the other run hands out.

    python tests/run_suite.py -- -q --durations=20
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import port_band

NO_TESTS_COLLECTED = 5  # pytest's exit code when the selection is empty


def _counts(junit: Path) -> dict[str, int]:
    """passed / failed / skipped of one run from its JUnit XML (errors count as failures)."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    if not junit.is_file():
        return counts
    for suite in ET.parse(junit).getroot().iter("testsuite"):
        tests, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
        failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        counts["failed"] += failed
        counts["skipped"] += skipped
        counts["passed"] += tests - failed - skipped
    return counts


def _notice_when_done(name: str, proc: subprocess.Popen) -> None:
    code = proc.wait()
    print(f"\n=== {name} finished (exit {code}); their output follows the distributed tests'", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, choices=[1, 2], default=2,
                        help="2: the two runs side by side (default); 1: one after the other")  # fmt: skip
    parser.add_argument("--mark", default="", help="a marker expression both runs must also match")
    parser.add_argument("pytest_args", nargs="*", help="after --: arguments for both pytest runs")
    opts = parser.parse_args(argv)
    narrow = f" and ({opts.mark})" if opts.mark else ""

    lo, hi = port_band()
    if hi - lo < 200:
        parser.error(f"TANDEM_TEST_PORTS={lo}-{hi}: the two runs need at least 100 ports each")
    mid = (lo + hi) // 2
    with tempfile.TemporaryDirectory(prefix="tandem-suite-") as tmp:
        runs = [  # (name, marker expression, extra environment)
            ("distributed tests", f"distributed{narrow}", {"TANDEM_TEST_PORTS": f"{lo}-{mid}"}),
            (
                "one-process tests",
                f"not distributed{narrow}",
                {"OMP_NUM_THREADS": "1", "TANDEM_TEST_PORTS": f"{mid + 1}-{hi}"},
            ),
        ]
        procs: list[tuple[str, subprocess.Popen, Path, Path | None]] = []
        for i, (name, marks, extra) in enumerate(runs):
            junit = Path(tmp) / f"run{i}.xml"
            cmd = [sys.executable, "-m", "pytest", "-m", marks, *opts.pytest_args, f"--junitxml={junit}"]
            log = Path(tmp) / f"run{i}.log" if opts.jobs == 2 and i > 0 else None
            env = {**os.environ, **extra}
            print(f"\n=== {name} (ports {extra['TANDEM_TEST_PORTS']}): {shlex.join(cmd[1:])}", flush=True)
            if log is None:
                proc = subprocess.Popen(cmd, env=env)
            else:
                with log.open("wb") as out:
                    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
                threading.Thread(target=_notice_when_done, args=(name, proc), daemon=True).start()
            if opts.jobs == 1:
                proc.wait()
            procs.append((name, proc, junit, log))
        codes, total = [], {"passed": 0, "failed": 0, "skipped": 0}
        for _, proc, junit, _ in procs:
            code = proc.wait()
            codes.append(0 if code == NO_TESTS_COLLECTED else code)
            for key, n in _counts(junit).items():
                total[key] += n
        for name, proc, _, log in procs:
            if log is not None:
                print(f"\n=== {name} (ran beside the distributed tests; exit {proc.returncode}):", flush=True)
                sys.stdout.buffer.write(log.read_bytes())
                sys.stdout.flush()
    code = next((c for c in codes if c != 0), 0)
    if code and not total["failed"]:
        total["failed"] = 1  # a run that failed without a test failing (a collection or usage error)
    print(
        f"suite: {total['passed']} passed, {total['failed']} failed, {total['skipped']} skipped", flush=True
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
