"""Impossible parallel layouts are refused with one error naming each problem, before any process group
is created (so a bad job fails in seconds, not after the launcher has started every rank)."""

from __future__ import annotations

import pytest

import pretrain.train
from pretrain.config import ConfigError, load_config
from pretrain.train import train

BASE = [
    "data.shards=unused",
    "model.preset=gpt-tiny",
    "model.vocab_size=512",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
]

TABLE = {
    "zero2_with_pipeline": (1, ["parallel.zero_stage=2", "parallel.pp=2"], "supports ZeRO stage 0 or 1 only"),
    "pipeline_for_an_objective_network": (
        2,
        ["parallel.pp=2", "model.family=bert", "model.objective=electra"],
        "model.objective='electra' builds its own network, which has no pipeline layers",
    ),
    "pipeline_with_shared_layers": (
        2,
        ["parallel.pp=2", "model.family=bert", "model.share_layers=all"],
        "model.share_layers='all': a module shared by layers cannot sit on two stages",
    ),
    "more_stages_than_blocks": (
        4,
        ["parallel.pp=4"],
        "parallel.pp=4: model.num_layers=2: fewer Transformer blocks than pipeline stages",
    ),
    "world_not_divisible_by_pipeline": (3, ["parallel.pp=2"], "world size 3: not divisible by tp=1 x pp=2"),
    "batch_not_divisible_under_pipeline": (
        4,
        ["parallel.pp=2", "train.global_batch_size=6"],
        "must be a multiple of train.micro_batch_size=2 x dp=2",
    ),
    "heads_not_divisible": (3, ["parallel.tp=3"], "model.num_heads=4 is not divisible by parallel.tp=3"),
    "vocab_not_divisible": (
        2,
        ["parallel.tp=2", "model.vocab_size=511"],
        "model.vocab_size=511 is not divisible",
    ),
    "kv_heads_not_divisible": (
        4,
        ["parallel.tp=4", "model.num_kv_heads=2"],
        "model.num_kv_heads=2 is not divisible",
    ),
    "zero3_with_tp": (2, ["parallel.tp=2", "parallel.zero_stage=3"], "ZeRO-3 is supported with tp=1 only"),
    "sequence_parallel_without_tp": (1, ["parallel.sequence_parallel=true"], "needs parallel.tp > 1"),
    "seq_len_not_divisible_for_sp": (
        2,
        ["parallel.tp=2", "parallel.sequence_parallel=true", "data.seq_len=63"],
        "data.seq_len=63: must be divisible by parallel.tp=2",
    ),
    "world_not_divisible": (3, ["parallel.tp=2"], "world size 3: not divisible by tp=2 x pp=1"),
    "batch_not_divisible": (
        4,
        ["train.global_batch_size=6"],
        "must be a multiple of train.micro_batch_size=2 x dp=4",
    ),
    "optimizer_offload_without_zero": (
        2,
        ["parallel.offload_optimizer=cpu"],
        "parallel.offload_optimizer='cpu' with parallel.zero_stage=0: optimizer offload moves the ZeRO",
    ),
    "param_offload_below_zero3": (
        2,
        ["parallel.offload_param=cpu", "parallel.offload_optimizer=cpu", "parallel.zero_stage=2"],
        "parallel.offload_param='cpu' with parallel.zero_stage=2: only ZeRO-3 partitions parameters",
    ),
    "offload_with_pipeline": (
        4,
        ["parallel.pp=2", "parallel.zero_stage=1", "parallel.offload_optimizer=cpu"],
        "with parallel.pp=2: CPU offload is not verified with DeepSpeed's pipeline engine",
    ),
    "cpu_adam_without_offload": (
        2,
        ["parallel.zero_stage=2", "parallel.cpu_adam=true"],
        "parallel.cpu_adam=true with parallel.offload_optimizer='none'",
    ),
    "offload_with_moe": (
        2,
        ["parallel.zero_stage=2", "parallel.offload_optimizer=cpu", "model.num_experts=2"],
        "with model.num_experts=2: CPU offload is not verified with the MoE layers",
    ),
}


@pytest.mark.parametrize("case", list(TABLE))
def test_impossible_layout_is_refused_before_any_process_group(case, monkeypatch):
    world, overrides, message = TABLE[case]
    monkeypatch.setenv("WORLD_SIZE", str(world))

    def no_process_group(**_: object) -> None:
        raise AssertionError(f"{case}: train() reached process-group creation before refusing the layout")

    # train() creates its process group only through init_distributed: refusing first means never calling it.
    # (Checking torch.distributed.is_initialized() afterwards would depend on whether an earlier in-process
    # training test of the same pytest process left its one-rank group behind.)
    monkeypatch.setattr(pretrain.train, "init_distributed", no_process_group)
    cfg = load_config(None, [*BASE, *overrides], validate=False)
    with pytest.raises(ConfigError) as exc:
        train(cfg)
    assert message in str(exc.value)
