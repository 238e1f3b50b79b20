"""Several training runs in one launch: `python -m tests.distributed.train_runs RUNS.json`, under torchrun
(or alone for one process).

RUNS.json is a list of runs, each `{"config": PATH, "overrides": ["SECTION.KEY=VALUE", ...]}`, the same
arguments `pretrain train --config PATH OVERRIDES...` takes. Every rank trains them in order through
`pretrain.train.train`, which builds its own topology, process groups, engine and RNG streams and seeds
everything from the config; a barrier separates the runs.

The runs of one launch must share their parallel layout (tp, pp, ep): DeepSpeed keeps some process groups
in module globals once set (the model-parallel unit it is handed, the expert groups) and never clears
them, so a later run at another layout could use an earlier run's groups. Mixed layouts are refused.

Why: on 2 CPU cores a tiny 5-step run costs less than the launch around it. Each process spends ~3 s
importing torch, torch._dynamo (which torch.optim pulls in), DeepSpeed and megatron-core before it
trains anything, so an 8-process layout pays ~12 s of start-up per launch. The parity matrix
(test_parity_matrix.py) trains GPT, BERT and T5 in one launch per layout and pays it once instead of three
times. Runs that must exercise the `pretrain` CLI or a particular launcher keep their own launch there.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

EXACT_RANDOM_ENV = "TANDEM_TEST_INDUCTOR_FALLBACK_RANDOM"


def launch_runs(runner: Any, config: Path, overrides: list[list[str]], spec: Path, **launch: Any) -> Any:
    """From a test: write the runs (one `config`, each with its overrides) to `spec` and train them all in
    one launch through `runner` (conftest's run_pretrain; `launch` takes its launcher, nprocs, timeout, env).
    Returns the launch's CompletedProcess."""
    spec.write_text(json.dumps([{"config": str(config), "overrides": o} for o in overrides]))
    return runner([str(spec)], module="tests.distributed.train_runs", **launch)


def main(argv: list[str]) -> int:
    # The deepspeed launcher puts --local_rank=N first; torchrun passes it in the environment.
    args = [a for a in argv if not a.startswith("--local_rank")]
    if len(args) != 1:
        print("usage: python -m tests.distributed.train_runs RUNS.json", file=sys.stderr)
        return 2
    runs = json.loads(Path(args[0]).read_text())
    import torch._dynamo

    # A train.compile test must not pass on blocks that fell back to eager after too many recompiles.
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    if os.environ.get(EXACT_RANDOM_ENV) == "1":
        # TorchInductor draws dropout masks its own way, so a compiled run's masks differ from an eager
        # run's; with fallback_random it calls PyTorch's own random ops in the same order, so train.compile
        # can be compared with eager training at dropout > 0 (tests/distributed/test_compile_parallel.py).
        import torch._inductor.config

        torch._inductor.config.fallback_random = True
    from pretrain.cli_eval import _leave
    from pretrain.config import load_config
    from pretrain.distributed import barrier
    from pretrain.train import train

    configs = [load_config(Path(run["config"]), run["overrides"], validate=True) for run in runs]
    layouts = {(c.parallel.tp, c.parallel.pp, c.parallel.ep) for c in configs}
    if len(layouts) > 1:
        print(f"{args[0]}: runs at several layouts (tp, pp, ep) {sorted(layouts)}: one launch per layout",
              file=sys.stderr)  # fmt: skip
        return 2
    for cfg in configs:
        train(cfg)
        barrier()
    # As `pretrain train` does: every rank leaves together, without the interpreter teardown of the gloo
    # groups that aborted a rank now and then.
    return _leave(0)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
