"""The DeepSpeed JSON that `parallel.zero.deepspeed_config` generates for ZeRO and CPU offload, read back
through DeepSpeed's own config parser (the engine's source of truth), not only as a dict."""

from __future__ import annotations

import pytest

from parallel.zero import deepspeed_config
from pretrain.config import deepspeed_config as reexported
from pretrain.config import load_config

BASE = ["data.shards=unused", "train.micro_batch_size=2", "train.global_batch_size=8"]


def _ds(*overrides: str, dp: int = 2) -> dict:
    return deepspeed_config(load_config(None, [*BASE, *overrides], world_size=dp), dp_size=dp)


def test_pretrain_config_still_exports_the_builder():
    assert reexported is deepspeed_config


def test_no_offload_blocks_unless_asked():
    ds = _ds("parallel.zero_stage=2")
    assert "offload_optimizer" not in ds["zero_optimization"]
    assert "offload_param" not in ds["zero_optimization"]
    assert "zero_force_ds_cpu_optimizer" not in ds  # DeepSpeed's default (true) stands


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_optimizer_offload_block(stage):
    ds = _ds(f"parallel.zero_stage={stage}", "parallel.offload_optimizer=cpu")
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert ds["zero_force_ds_cpu_optimizer"] is False  # the client torch.optim.AdamW runs on the host


def test_param_offload_block_and_pin_memory():
    ds = _ds(
        "parallel.zero_stage=3",
        "parallel.offload_param=cpu",
        "parallel.offload_optimizer=cpu",
        "parallel.offload_pin_memory=false",
    )
    zero = ds["zero_optimization"]
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": False}
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": False}


def test_deepspeed_parses_the_offload_json():
    """DeepSpeed's pydantic models accept the blocks and read the fields Tandem set (a misspelt key would
    be rejected by them: DeepSpeedConfigModel forbids extra fields)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

    ds = _ds(
        "parallel.zero_stage=3",
        "parallel.offload_param=cpu",
        "parallel.offload_optimizer=cpu",
        "parallel.offload_pin_memory=false",
    )
    zero = DeepSpeedZeroConfig(**ds["zero_optimization"])
    assert zero.stage == 3
    assert (
        zero.offload_optimizer.device == OffloadDeviceEnum.cpu and zero.offload_optimizer.pin_memory is False
    )
    assert zero.offload_param.device == OffloadDeviceEnum.cpu and zero.offload_param.pin_memory is False


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["parallel.offload_optimizer=gpu"],
            "parallel.offload_optimizer='gpu': must be one of 'none', 'cpu'",
        ),
        (["parallel.offload_param=nvme"], "parallel.offload_param='nvme': must be one of 'none', 'cpu'"),
    ],
)
def test_unknown_offload_device_names_the_key(overrides, message):
    from pretrain.config import ConfigError

    with pytest.raises(ConfigError) as exc:
        load_config(None, [*BASE, *overrides])
    assert message in str(exc.value)
