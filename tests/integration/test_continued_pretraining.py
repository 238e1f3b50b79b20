"""Tensor-parallel checkpoint consolidation and continued pretraining (`train.init_from`).

* Consolidation is exact: shards produced by the real tensor plan (2 gloo processes) merge back into the
  full model's state dict bit for bit, for every family and for an untied LM head.
* A TP2 (and a TP2xPP2) run's checkpoint initializes a TP1 run whose step-0 validation loss is the
  source model's own validation loss at that checkpoint. The two computations differ only in fp32
  summation order (row-parallel partial sums and the vocab-parallel cross-entropy are added across 2
  ranks): ~1e-7 relative (seen: 4e-8 from TP2xPP2), as in tests/distributed/test_parity_matrix.py;
  1e-5 is the project's parity bound (DESIGN.md).
* Pipeline checkpoints hold one file per layer under the layer adapter's names; every name maps back to
  exactly one model parameter.
* The new run has a fresh schedule (its step-1 learning rate is the source run's step-1 rate), records its
  source in config.yaml and every checkpoint's meta.json, and a rerun in the same directory resumes instead
  of initializing again.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import yaml

from tests.conftest import SMOKE_CONFIG, free_port, read_metrics, spawn_with_deadline, tiny_overrides

RTOL = 1e-5
WORLD = 2
CASES = [
    ["model.preset=gpt-tiny"],
    ["model.preset=gpt-tiny", "model.tie_embeddings=false", "model.num_kv_heads=2"],
    ["model.preset=bert-tiny"],
    ["model.preset=t5-tiny"],
]


# ------------------------------------------------------------------------------------------------
# Consolidation of the real tensor plan's shards (2 spawned gloo workers, hard timeout).


def _consolidate_worker(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        from parallel.tensor_plan import apply_tensor_parallel
        from pretrain.config import load_config
        from pretrain.consolidate import merge_shards
        from pretrain.models import build_model

        for overrides in CASES:
            cfg = load_config(None, ["data.shards=x", "model.vocab_size=256", *overrides]).model
            torch.manual_seed(0)
            model = build_model(cfg)
            full = {k: v.clone() for k, v in model.state_dict().items()}
            apply_tensor_parallel(model, group=dist.group.WORLD, tp_size=WORLD, tp_rank=rank)
            local = {k: v.clone() for k, v in model.state_dict().items()}
            shards: list[dict[str, torch.Tensor] | None] = [None] * WORLD
            dist.all_gather_object(shards, local)
            if rank == 0:
                assert any(shards[0][k].shape != full[k].shape for k in full), "nothing was sharded"  # type: ignore[index]
                merged = merge_shards(shards, cfg)  # type: ignore[arg-type]
                assert set(merged) == set(full), set(merged) ^ set(full)
                for name, want in full.items():
                    assert torch.equal(merged[name], want), f"{overrides} {name}: differs from the full model"
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_tensor_parallel_shards_consolidate_to_the_full_model_exactly():
    spawn_with_deadline(
        _consolidate_worker, (free_port(),), nprocs=WORLD, timeout=120, what="consolidation workers"
    )


def test_shards_that_do_not_fit_the_config_are_refused_naming_the_parameter():
    from pretrain.config import load_config
    from pretrain.consolidate import merge_shards
    from pretrain.models import build_model

    cfg = load_config(None, ["data.shards=x", "model.vocab_size=256", "model.preset=gpt-tiny"]).model
    full = build_model(cfg).state_dict()
    # Two "ranks" that each hold the full embedding: concatenating gives twice the vocabulary.
    with pytest.raises(ValueError, match=r"embed\.weight: 2 shards of \(256, \d+\) \(split along dim 0\)"):
        merge_shards([dict(full), dict(full)], cfg, source="ckpt")


@pytest.mark.parametrize("tied", [True, False])
def test_pipeline_layer_files_map_back_to_every_model_parameter(tied):
    from pretrain.config import load_config
    from pretrain.consolidate import full_shapes, pipeline_layer_names

    overrides = [
        "data.shards=x",
        "model.vocab_size=256",
        "model.preset=gpt-tiny",
        f"model.tie_embeddings={tied}",
    ]
    cfg = load_config(None, overrides).model
    layers = pipeline_layer_names(cfg)
    names = [n for layer in layers if layer is not None for n in layer.values()]
    assert sorted(names) == sorted(full_shapes(cfg)), "each parameter saved exactly once"
    assert layers[0] == {"embed.weight": "embed.weight"}
    assert layers[2] is not None and layers[2]["block.attn.q_proj.weight"] == "blocks.0.attn.q_proj.weight"
    assert (layers[-1] is None) == tied  # the tied head's second use of the embedding writes no file


def test_model_mismatch_lists_every_differing_field():
    from pretrain.config import load_config
    from pretrain.continued import model_mismatch

    src = load_config(None, ["data.shards=x", "model.preset=gpt-tiny", "model.vocab_size=512"]).model
    dst = load_config(
        None,
        ["data.shards=x", "model.preset=gpt-tiny", "model.vocab_size=512", "model.num_layers=3",
         "model.hidden_size=96", "model.dropout=0.1"],
    ).model  # fmt: skip
    problems = model_mismatch(src, dst)
    assert len(problems) == 2, problems  # dropout may differ: it changes no parameter
    assert any(p.startswith("model.num_layers=3 (the checkpoint has") for p in problems)
    assert any(p.startswith("model.hidden_size=96 (the checkpoint has") for p in problems)


def test_weights_without_a_place_are_an_error_not_a_partial_warm_start():
    from pretrain.config import ConfigError, load_config
    from pretrain.continued import load_into
    from pretrain.models import build_model

    base = ["data.shards=x", "model.vocab_size=256", "model.preset=gpt-tiny"]
    tied = build_model(load_config(None, base).model).state_dict()
    untied = build_model(load_config(None, [*base, "model.tie_embeddings=false"]).model)
    with pytest.raises(
        ConfigError, match=r"the model has weights the checkpoint lacks: \['lm_head.weight'\]"
    ):
        load_into(untied, tied, "src")


# ------------------------------------------------------------------------------------------------
# End to end: TP2 source run -> TP1 continued run.


def _args(shards, out, **extra):
    keys = {"train.steps": 2, "train.micro_batch_size": 4, "optimizer.decay_steps": 6, **extra}
    return ["train", "--config", str(SMOKE_CONFIG), *tiny_overrides(shards, out, **keys)]


def _eval_losses(run_dir) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "eval_loss" in rec:
            out[rec["step"]] = rec["eval_loss"]
    return out


@pytest.mark.distributed
@pytest.mark.slow  # a TP2 (or TP2xPP2) run under the deepspeed launcher and two TP1 runs: ~40 s and more
@pytest.mark.parametrize(
    ("layout", "nprocs"),
    [({"parallel.tp": 2}, 2), ({"parallel.tp": 2, "parallel.pp": 2}, 4)],
    ids=["tp2", "tp2xpp2"],
)
def test_parallel_checkpoint_continues_in_a_tp1_run(layout, nprocs, shards_dir, tmp_path, run_pretrain):
    source = tmp_path / "source"
    run_pretrain(
        _args(shards_dir, source, **{**layout, "train.eval_interval": 2}),
        launcher="deepspeed",
        nprocs=nprocs,
        timeout=600,
    )
    src_ckpt = source / "checkpoints" / "step-2"
    source_loss = _eval_losses(source)[2]

    # load_model / export read the TP2 checkpoint (consolidated) like any other.
    from pretrain.export import checkpoint_state_dict

    state, cfg = checkpoint_state_dict(src_ckpt)
    assert cfg.parallel.tp == 2 and state["embed.weight"].shape[0] == cfg.model.vocab_size
    assert cfg.parallel.pp == layout.get("parallel.pp", 1)

    run = tmp_path / "continued"
    extra = {"train.init_from": src_ckpt, "train.seed": 99, "checkpoint.interval": 1}
    proc = run_pretrain(_args(shards_dir, run, **{**extra, "train.steps": 1}))
    assert "initialized from" in proc.stdout
    got = _eval_losses(run)[0]
    assert abs(got - source_loss) <= RTOL * abs(source_loss), (got, source_loss)
    # A fresh schedule: update 1 gets the warmup's first rate, as the source's update 1 did.
    assert read_metrics(run)[1]["lr"] == read_metrics(source)[1]["lr"]

    # Provenance: the config keeps init_from; each checkpoint's meta and manifest name the source.
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["init_from"] == str(src_ckpt)
    meta = json.loads((run / "checkpoints" / "step-1" / "meta.json").read_text())
    assert meta["init_from"]["path"] == str(src_ckpt.resolve())
    assert meta["init_from"]["step"] == 2 and meta["init_from"]["layout"]["tp"] == 2
    assert meta["init_from"]["layout"]["pp"] == layout.get("parallel.pp", 1)
    import hashlib

    want_sha = hashlib.sha256((src_ckpt / "manifest.json").read_bytes()).hexdigest()
    assert meta["init_from"]["manifest_sha256"] == want_sha

    # A rerun (e.g. after preemption) resumes from its own checkpoint; init_from is not applied again.
    proc = run_pretrain(_args(shards_dir, run, **{**extra, "train.steps": 2}))
    assert "ignored: resuming" in proc.stdout
    assert sorted(read_metrics(run)) == [1, 2]
    assert list(_eval_losses(run)) == [0]  # no second step-0 evaluation
    meta2 = json.loads((run / "checkpoints" / "step-2" / "meta.json").read_text())
    assert meta2["init_from"] == meta["init_from"]


def test_init_from_with_another_model_shape_stops_naming_the_fields(shards_dir, tmp_path, run_pretrain):
    source = tmp_path / "source"
    run_pretrain(_args(shards_dir, source, **{"train.steps": 1}))
    proc = run_pretrain(
        _args(
            shards_dir,
            tmp_path / "other",
            **{"train.init_from": source / "checkpoints" / "step-1", "model.num_layers": 3},
        ),
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.num_layers=3 (the checkpoint has 2)" in proc.stderr


@pytest.mark.distributed
@pytest.mark.slow  # a TP1 run, then a TP2 run under the deepspeed launcher
def test_tp1_checkpoint_continues_in_a_tp2_run(shards_dir, tmp_path, run_pretrain):
    source = tmp_path / "source"
    run_pretrain(_args(shards_dir, source, **{"train.eval_interval": 2}))
    run = tmp_path / "continued"
    keys = {"train.init_from": source / "checkpoints" / "step-2", "train.steps": 1, "parallel.tp": 2}
    run_pretrain(_args(shards_dir, run, **keys), launcher="deepspeed", nprocs=2, timeout=600)
    got, want = _eval_losses(run)[0], _eval_losses(source)[2]
    assert abs(got - want) <= RTOL * abs(want), (got, want)
