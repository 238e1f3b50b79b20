"""`train.attention_backend`: GPT, BERT and T5 trained through `pretrain.train.train` with the Triton kernels
forced (in Triton's CPU interpreter) give the losses and gradient norms of the same runs on PyTorch SDPA.

Every attention call of the three families goes through the kernels: causal self-attention (GPT),
bidirectional self-attention (BERT), and T5's encoder and decoder self-attention with the relative
position bias fused in the kernel, plus the decoder's cross-attention (query and key lengths differ).
All six runs train in one process (tests/distributed/train_runs.py); each run sets the process-wide
backend from its own config.

Tolerance: fp32, dropout 0. The kernels compute the same softmax with another order of sums (online
softmax over 16-key blocks, base-2 exponentials): ~1e-6 relative per attention output (unit tests),
which moved the 3-step losses and gradient norms by at most 1.5e-7 relative (seen: T5 step 2). 1e-5
relative is the project's parity bound (DESIGN.md)."""

from __future__ import annotations

import pytest

from tests.conftest import SMOKE_CONFIG, read_metrics, tiny_overrides
from tests.distributed.train_runs import launch_runs

pytestmark = pytest.mark.slow  # the interpreter runs each kernel program in numpy: ~1 min for the six runs
RTOL = 1e-5
FAMILIES = {"gpt": "gpt-tiny", "bert": "bert-tiny", "t5": "t5-tiny"}
STEPS = 3


def test_triton_backend_trains_like_sdpa(shards_dir, tmp_path, run_pretrain):
    runs = []
    for family, preset in FAMILIES.items():
        for backend in ("triton", "sdpa"):
            keys = {
                "model.preset": preset,
                "train.steps": STEPS,
                "train.micro_batch_size": 2,
                "train.global_batch_size": 4,
                "data.seq_len": 32,
                "model.max_seq_len": 32,
                "checkpoint.save_final": "false",
                "train.attention_backend": backend,
            }
            runs.append(tiny_overrides(shards_dir, tmp_path / f"{family}-{backend}", **keys))
    launch_runs(run_pretrain, SMOKE_CONFIG, runs, tmp_path / "runs.json", env={"TRITON_INTERPRET": "1"},
                timeout=900)  # fmt: skip
    for family in FAMILIES:
        triton, sdpa = (read_metrics(tmp_path / f"{family}-{b}") for b in ("triton", "sdpa"))
        assert sorted(triton) == sorted(sdpa) == list(range(1, STEPS + 1))
        # The kernels really ran: other sums give other last bits somewhere (seen in every family).
        pairs = [(triton[s][k], sdpa[s][k]) for s in sdpa for k in ("loss", "grad_norm")]
        assert any(a != b for a, b in pairs), f"{family}: triton and sdpa runs are bitwise equal"
        for step in sdpa:
            for key in ("loss", "grad_norm"):
                a, b = triton[step][key], sdpa[step][key]
                print(f"{family} step {step} {key}: triton {a!r} sdpa {b!r}")
                assert abs(a - b) <= RTOL * abs(b), f"{family} step {step}: {key} {a} (triton) vs {b} (sdpa)"


def test_triton_backend_without_cuda_or_interpreter_is_refused(shards_dir, tmp_path, run_pretrain):
    keys = {"train.steps": 3, "train.attention_backend": "triton"}
    proc = run_pretrain(
        ["train", "--config", str(SMOKE_CONFIG), *tiny_overrides(shards_dir, tmp_path / "run", **keys)],
        env={"TRITON_INTERPRET": "0"},
        check=False,
    )
    assert proc.returncode != 0
    assert "train.attention_backend='triton'" in proc.stderr and "TRITON_INTERPRET=1" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
