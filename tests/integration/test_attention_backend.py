"""`train.attention_backend`, `train.norm_backend` and `train.loss_chunk_size`: GPT, BERT and T5 trained
through `pretrain.train.train` with the Triton kernels forced (in Triton's CPU interpreter) give the losses
and gradient norms of the same runs on PyTorch SDPA, PyTorch norms and full logits.

Per family, a "fused" run (attention and every norm on the Triton kernels, the output projection fused
into the loss 16 labelled tokens at a time) against a "torch" run (SDPA, PyTorch norms, full logits).
Every attention call of the three families goes through the kernels: causal self-attention (GPT),
bidirectional self-attention (BERT), and T5's encoder and decoder self-attention with the relative
position bias fused in the kernel, plus the decoder's cross-attention (query and key lengths differ).
All six runs train in one process (tests/distributed/train_runs.py); each run sets the process-wide
backends from its own config.

Tolerance: fp32, dropout 0. The kernels compute the same softmax with another order of sums (online
softmax over 16-key blocks, base-2 exponentials): ~1e-6 relative per attention output (unit tests),
which moved the 3-step losses and gradient norms by at most 1.5e-7 relative (seen: T5 step 2); the norm
kernels and the chunked loss reorder sums likewise (~1e-7, tests/unit/test_kernels_norms_ce.py). 1e-5
relative is the project's parity bound (DESIGN.md)."""

from __future__ import annotations

import pytest

from tests.conftest import SMOKE_CONFIG, assert_runs_close, read_metrics, tiny_overrides
from tests.distributed.train_runs import launch_runs

pytestmark = pytest.mark.slow  # the interpreter runs each kernel program in numpy: ~2 min for the six runs
RTOL = 1e-5
FAMILIES = {"gpt": "gpt-tiny", "bert": "bert-tiny", "t5": "t5-tiny"}
STEPS = 3
VARIANTS = {
    "fused": {
        "train.attention_backend": "triton",
        "train.norm_backend": "triton",
        "train.loss_chunk_size": 16,
    },
    "torch": {"train.attention_backend": "sdpa", "train.norm_backend": "torch"},
}


def test_triton_kernels_train_like_pytorch(shards_dir, tmp_path, run_pretrain):
    runs = []
    for family, preset in FAMILIES.items():
        for variant, backends in VARIANTS.items():
            keys = {
                "model.preset": preset,
                "train.steps": STEPS,
                "train.micro_batch_size": 2,
                "train.global_batch_size": 4,
                "data.seq_len": 32,
                "model.max_seq_len": 32,
                "checkpoint.save_final": "false",
                **backends,
            }
            runs.append(tiny_overrides(shards_dir, tmp_path / f"{family}-{variant}", **keys))
    launch_runs(run_pretrain, SMOKE_CONFIG, runs, tmp_path / "runs.json", env={"TRITON_INTERPRET": "1"},
                timeout=900)  # fmt: skip
    for family in FAMILIES:
        fused, torch_run = (read_metrics(tmp_path / f"{family}-{v}") for v in ("fused", "torch"))
        assert sorted(torch_run) == list(range(1, STEPS + 1))
        # The kernels really ran: other sums give other last bits somewhere (seen in every family).
        assert_runs_close(fused, torch_run, rtol=RTOL, label=f"{family} fused vs torch")


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
