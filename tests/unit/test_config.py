"""The run configuration: YAML + dotted overrides, presets, validation that raises once, round trips,
the generated DeepSpeed JSON and the --help text.

Expected values come from the preset files and the rules as written in DESIGN.md / STYLE.md, never from
the code under test."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from pretrain.config import (
    CONFIG_DIR,
    Config,
    ConfigError,
    config_help,
    deepspeed_config,
    load_config,
    save_config,
)

SHARDS = "data.shards=/tmp/shards"  # data.shards is required; its existence is checked by the loader only
MODEL_PRESETS = sorted(CONFIG_DIR.glob("models/*.yaml"))
RUN_CONFIGS = sorted(CONFIG_DIR.glob("runs/*.yaml"))


def _problems(overrides: list[str], path: Path | None = None, **kw) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, **kw)
    return info.value.problems


def _one_line_with(problems: list[str], *needles: str) -> str:
    """The single problem line that contains every needle (field, value and rule)."""
    hits = [p for p in problems if all(n in p for n in needles)]
    assert len(hits) == 1, f"expected one problem containing {needles}, got {hits} in {problems}"
    return hits[0]


# ----------------------------------------------------------------------------- YAML and overrides


def test_defaults_with_shards_are_valid():
    cfg = load_config(None, [SHARDS])
    assert cfg == dataclasses.replace(Config(), data=dataclasses.replace(Config().data, shards="/tmp/shards"))


def test_dotted_overrides_are_typed(tmp_path: Path):
    # YAML 1.1 reads 3e-4 (no dot) as the string "3e-4": the config must still give a float.
    assert yaml.safe_load("3e-4") == "3e-4"
    cfg = load_config(None, [SHARDS, "train.steps=50", "optimizer.lr=3e-4", "model.bias=false"])
    assert cfg.train.steps == 50 and type(cfg.train.steps) is int
    assert cfg.optimizer.lr == 3e-4 and type(cfg.optimizer.lr) is float
    assert cfg.model.bias is False


def test_yaml_file_then_overrides(tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "data:\n  shards: /tmp/shards\noptimizer:\n  lr: 3e-4\n  min_lr: 1e-5\ntrain:\n  steps: 7\n",
        encoding="utf-8",
    )
    cfg = load_config(path)
    assert (cfg.optimizer.lr, cfg.optimizer.min_lr, cfg.train.steps) == (3e-4, 1e-5, 7)
    assert type(cfg.optimizer.lr) is float
    # The command line wins over the file; untouched keys keep the file's values.
    cfg = load_config(path, ["train.steps=9"])
    assert (cfg.train.steps, cfg.optimizer.lr) == (9, 3e-4)


def test_preset_values_and_explicit_keys_win():
    cfg = load_config(None, [SHARDS, "model.preset=gpt-125m"])
    # GPT-3 Small (Brown et al. 2020, table 2.1).
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_heads) == (12, 768, 12)
    assert cfg.model.max_seq_len == 2048
    cfg = load_config(None, [SHARDS, "model.preset=gpt-125m", "model.num_layers=6"])
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_heads) == (6, 768, 12)


def test_preset_in_file_overridden_by_file_and_command_line(tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model:\n  preset: llama-tiny\n  num_layers: 3\ndata:\n  shards: /tmp/shards\n", encoding="utf-8"
    )
    cfg = load_config(path, ["model.hidden_size=256"])
    assert (cfg.model.num_layers, cfg.model.hidden_size) == (3, 256)
    # Everything else from configs/models/llama-tiny.yaml.
    assert (cfg.model.norm, cfg.model.activation, cfg.model.position) == ("rmsnorm", "swiglu", "rope")
    assert (cfg.model.num_kv_heads, cfg.model.bias, cfg.model.tie_embeddings) == (2, False, False)
    assert cfg.model.norm_eps == 1e-6


@pytest.mark.parametrize("path", MODEL_PRESETS, ids=lambda p: p.stem)
def test_every_model_preset_loads(path: Path):
    expected = yaml.safe_load(path.read_text(encoding="utf-8"))
    cfg = load_config(None, [SHARDS, f"model.preset={path.stem}"])
    for key, value in expected.items():
        assert getattr(cfg.model, key) == value, key


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.stem)
def test_every_run_config_loads(path: Path):
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    cfg = load_config(path, [SHARDS])
    for section, values in raw.items():
        for key, value in values.items():
            if (section, key) not in (("data", "shards"), ("model", "preset")):
                assert getattr(getattr(cfg, section), key) == value, f"{section}.{key}"


# ----------------------------------------------------------------------------- validation

BAD_CONFIGS = {
    "heads_do_not_divide_hidden": (
        ["model.hidden_size=100", "model.num_heads=3"],
        ("model.hidden_size=100", "model.num_heads=3", "divisible"),
    ),
    "kv_heads_do_not_divide_heads": (
        ["model.num_heads=4", "model.num_kv_heads=3"],
        ("model.num_kv_heads=3", "model.num_heads=4", "divide"),
    ),
    "rope_needs_even_head_dim": (
        ["model.position=rope", "model.hidden_size=12", "model.num_heads=4"],
        ("rope", "3", "even"),
    ),
    "seq_len_beyond_learned_positions": (
        ["model.max_seq_len=64", "data.seq_len=128"],
        ("data.seq_len=128", "model.max_seq_len=64"),
    ),
    "literal_choice": (["model.norm=batchnorm"], ("model.norm='batchnorm'", "one of", "'rmsnorm'")),
    "zero_stage_range": (["parallel.zero_stage=4"], ("parallel.zero_stage=4", "0, 1, 2 or 3")),
    "global_not_multiple_of_micro": (
        ["train.micro_batch_size=4", "train.global_batch_size=10"],
        ("train.global_batch_size=10", "train.micro_batch_size=4", "multiple"),
    ),
    "warmup_not_below_decay": (
        ["optimizer.warmup_steps=100", "train.steps=100"],
        ("optimizer.warmup_steps=100", "100"),
    ),
    "min_lr_above_lr": (
        ["optimizer.lr=1e-4", "optimizer.min_lr=1e-3"],
        ("optimizer.min_lr=0.001", "optimizer.lr=0.0001", "<="),
    ),
    "float_field_not_a_number": (["optimizer.lr=fast"], ("optimizer.lr='fast'", "number")),
    "bool_is_not_a_number": (["optimizer.lr=true"], ("optimizer.lr=True", "number")),
    "int_is_not_a_bool": (["model.bias=1"], ("model.bias=1", "true or false")),
    "float_is_not_an_int": (["train.steps=1.5"], ("train.steps=1.5", "integer")),
    "dropout_range": (["model.dropout=1.0"], ("model.dropout=1.0", "[0, 1)")),
    "weight_decay_ramps_down": (
        ["optimizer.weight_decay=0.1", "optimizer.weight_decay_end=0.01"],
        ("optimizer.weight_decay_end=0.01", "optimizer.weight_decay=0.1"),
    ),
    "wsd_without_decay_steps": (["optimizer.decay_style=WSD"], ("optimizer.wsd_decay_steps=0", "WSD")),
    "unknown_preset": (["model.preset=gpt-7t"], ("model.preset='gpt-7t'", "no such preset", "gpt-125m")),
    "t5_without_relative_positions": (
        ["model.family=t5"],
        ("model.position='learned'", "T5 uses position=relative"),
    ),
    "override_with_three_parts": (["model.attn.heads=4"], ("model.attn.heads", "SECTION.KEY=VALUE")),
    "negative_count": (["checkpoint.keep_last=-1"], ("checkpoint.keep_last=-1", ">= 0")),
    "norm_backend_choice": (["train.norm_backend=apex"], ("train.norm_backend='apex'", "'triton'")),
    "loss_chunk_negative": (["train.loss_chunk_size=-1"], ("train.loss_chunk_size=-1", ">= 0")),
    "loss_chunk_with_tp": (
        ["train.loss_chunk_size=1024", "parallel.tp=2"],
        ("train.loss_chunk_size=1024", "parallel.tp=2", "logits"),
    ),
    "loss_chunk_with_pp": (
        ["train.loss_chunk_size=1024", "parallel.pp=2"],
        ("train.loss_chunk_size=1024", "parallel.pp=2", "pipeline"),
    ),
    "loss_chunk_with_zero3": (
        ["train.loss_chunk_size=1024", "parallel.zero_stage=3"],
        ("train.loss_chunk_size=1024", "parallel.zero_stage=3"),
    ),
    "compile_choice": (["train.compile=model"], ("train.compile='model'", "'blocks'")),
    "compile_with_zero3": (
        ["train.compile=blocks", "parallel.zero_stage=3"],
        ("train.compile='blocks'", "parallel.zero_stage=3", "zero_stage <= 2"),
    ),
    "loss_chunk_with_own_losses": (
        ["train.loss_chunk_size=1024", "model.preset=electra-tiny"],
        ("train.loss_chunk_size=1024", "model.objective='electra'", "own losses"),
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_config_is_rejected_with_field_value_and_rule(name: str):
    overrides, needles = BAD_CONFIGS[name]
    _one_line_with(_problems([SHARDS, *overrides]), *needles)


def test_missing_shards_is_rejected():
    _one_line_with(_problems([]), "data.shards=''", "pretrain data shard")


def test_world_size_not_divisible_by_model_parallel_degrees():
    problems = _problems([SHARDS, "parallel.pp=2"], world_size=3)
    _one_line_with(problems, "world size 3", "pp=2")


def test_unknown_section_in_file(tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  shards: /tmp/s\ntrainer:\n  steps: 3\n", encoding="utf-8")
    _one_line_with(_problems([], path), "trainer", "unknown section", "train")


def test_did_you_mean_for_case_and_underscores():
    line = _one_line_with(_problems([SHARDS, "model.Num_Layers=4"]), "model.Num_Layers", "unknown key")
    assert "did you mean model.num_layers?" in line


def test_did_you_mean_for_a_one_letter_typo():
    line = _one_line_with(_problems([SHARDS, "model.num_layer=4"]), "model.num_layer", "unknown key")
    assert "did you mean model.num_layers?" in line


def test_many_problems_are_raised_once_and_each_is_named(tmp_path: Path):
    path = tmp_path / "broken.yaml"
    path.write_text(
        "model:\n  hidden_size: 100\n  num_heads: 3\n  Num_Layers: 4\n"
        "data:\n  shards: /tmp/shards\n"
        "trainer:\n  steps: 3\n",
        encoding="utf-8",
    )
    overrides = [
        "parallel.zero_stage=2",
        "parallel.pp=2",
        "train.micro_batch_size=2",
        "train.global_batch_size=6",
        "train.steps=abc",
        "optimizer.min_lr=1e-3",  # default lr is 3e-4
        "train.progress=1",
        "train.seed",  # no '='
    ]
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, world_size=4)
    problems = info.value.problems
    message = str(info.value)
    expected = [
        ("model.hidden_size=100", "model.num_heads=3", "divisible"),
        ("model.Num_Layers", "unknown key", "did you mean model.num_layers?"),
        ("trainer", "unknown section"),
        ("parallel.zero_stage=2", "parallel.pp=2", "ZeRO stage 0 or 1"),
        # world 4 / (tp 1 x pp 2) = dp 2, and 6 is not a multiple of micro 2 x dp 2.
        ("train.global_batch_size=6", "train.micro_batch_size=2", "dp=2", "multiple"),
        ("train.steps='abc'", "integer"),
        ("optimizer.min_lr=0.001", "optimizer.lr=0.0003"),
        ("train.progress=1", "true or false"),
        ("'train.seed'", "SECTION.KEY=VALUE"),
    ]
    for needles in expected:
        line = _one_line_with(problems, *needles)
        assert f"\n  - {line}" in message  # every problem is its own line of the one message
    assert str(path) in message.splitlines()[0]
    assert f"{len(problems)} problem(s)" in message.splitlines()[0]


# ----------------------------------------------------------------------------- output


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["model.preset=llama-tiny", "optimizer.weight_decay_end=0.2", "optimizer.weight_decay_style=linear"],
        ["model.preset=gpt-125m", "optimizer.eps=1e-8", "model.norm_eps=1e-6", "train.precision=bf16"],
    ],
    ids=["defaults", "llama-tiny", "gpt-125m"],
)
def test_save_then_load_gives_an_equal_config(tmp_path: Path, overrides: list[str]):
    cfg = load_config(None, [SHARDS, *overrides])
    path = tmp_path / "out" / "config.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert not path.with_suffix(".yaml.tmp").exists()


def test_deepspeed_config_is_generated_from_the_batch_sizes():
    cfg = load_config(
        None,
        [
            SHARDS,
            "train.micro_batch_size=2",
            "train.global_batch_size=12",
            "train.precision=bf16",
            "parallel.zero_stage=2",
            "optimizer.grad_clip=0.5",
        ],
        world_size=2,
    )
    ds = deepspeed_config(cfg, dp_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 3  # 12 / (2 x 2)
    assert ds["train_batch_size"] == 2 * 3 * 2 == 12  # DeepSpeed asserts exactly this identity
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["gradient_clipping"] == 0.5

    fp32 = deepspeed_config(load_config(None, [SHARDS]), dp_size=1)
    assert fp32["bf16"]["enabled"] is False and fp32["fp16"]["enabled"] is False
    assert fp32["zero_optimization"]["stage"] == 0


def test_help_mentions_every_field_with_its_help_line():
    text = config_help()
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory()):  # type: ignore[misc]
            help_line = f.metadata.get("help", "")
            assert help_line, f"{section.name}.{f.name} has no help text"
            lines = [
                line for line in text.splitlines() if line.strip().startswith(f"{section.name}.{f.name} (")
            ]
            assert len(lines) == 1 and help_line in lines[0], f"{section.name}.{f.name}"
