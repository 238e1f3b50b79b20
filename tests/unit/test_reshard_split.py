"""Resharding's tensor arithmetic, without processes: splitting a full state dict into tp contiguous blocks
per parameter and merging them back is the identity, bitwise, for every parameter kind the tensor plan
knows (column- and row-parallel linears, the vocab-parallel embedding, an untied head, BERT's MLM bias,
T5's relative-position tables, replicated norms); and the optimizer order the converter assumes is the
engine's (parallel.parallelize.param_groups) and DeepSpeed's stage partition of gpt-tiny."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from parallel.parallelize import param_groups
from pretrain.config import load_config
from pretrain.consolidate import merge_shards, split_dims
from pretrain.models import build_model
from pretrain.reshard import ReshardError, build_layout, parse_layout, split_state

KINDS = {
    "gpt-tiny": {"attn.q_proj.weight": 0, "attn.o_proj.weight": 1, "mlp.up_proj.bias": 0, "embed.weight": 0},
    "bert-tiny": {"mlm_bias": 0, "attn.v_proj.weight": 0, "mlp.down_proj.weight": 1},
    "t5-tiny": {"encoder_bias.table.weight": 1, "cross_attn.k_proj.weight": 0, "cross_attn.o_proj.weight": 1},
}


def model_cfg(preset: str, **extra: object):
    overrides = [f"model.preset={preset}", "model.vocab_size=512", *(f"{k}={v}" for k, v in extra.items())]
    return load_config(None, overrides, validate=False).model


@pytest.mark.parametrize("preset", sorted(KINDS))
@pytest.mark.parametrize("tp", [2, 4])
def test_split_then_merge_is_the_identity(preset, tp):
    cfg = model_cfg(preset)
    torch.manual_seed(0)
    full = build_model(cfg).state_dict()
    dims = split_dims(cfg)
    for suffix, dim in KINDS[preset].items():  # every kind of split is exercised
        assert any(k.endswith(suffix) and dims.get(k) == dim for k in full), (preset, suffix)
    assert any(k not in dims for k in full)  # and replicated tensors
    shards = [split_state(full, dims, tp, r) for r in range(tp)]
    for name, dim in dims.items():
        assert shards[1][name].shape[dim] * tp == full[name].shape[dim]
    merged = merge_shards(shards, cfg)
    assert merged.keys() == full.keys()
    for name, tensor in full.items():
        assert torch.equal(merged[name], tensor), name


def test_untied_head_is_split_by_vocab():
    cfg = model_cfg("gpt-tiny", **{"model.tie_embeddings": "false"})
    full = build_model(cfg).state_dict()
    assert split_dims(cfg).get("lm_head.weight") == 0
    shards = [split_state(full, split_dims(cfg), 2, r) for r in range(2)]
    assert torch.equal(merge_shards(shards, cfg)["lm_head.weight"], full["lm_head.weight"])


@pytest.mark.parametrize("preset", ["gpt-tiny", "bert-tiny", "t5-tiny"])
def test_plain_layout_follows_the_optimizer_groups(preset):
    cfg = model_cfg(preset)
    model = build_model(cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    want = [names[id(p)] for g in param_groups(model, 0.1) for p in g["params"]]
    layout = build_layout(cfg, tp=1, pp=1, partition="parameters")
    assert layout.order == [want]


def test_pipeline_layout_of_gpt_tiny():
    # What DeepSpeed printed for gpt-tiny at tp=2, pp=2 (partition by parameters): stage 0 holds the
    # embedding, positions and block 0; stage 1 block 1, the final norm and the tied head (which puts the
    # embedding first in its optimizer).
    layout = build_layout(model_cfg("gpt-tiny"), tp=2, pp=2, partition="parameters")
    assert layout.parts == [0, 3, 6]
    assert layout.order[1][0] == "embed.weight" and layout.order[0][:2] == [
        "embed.weight",
        "pos_embed.weight",
    ]
    assert [layout.mp_rank(s, t) for s in range(2) for t in range(2)] == [0, 1, 2, 3]


def test_parse_layout():
    assert parse_layout("tp=1,pp=2,dp=2") == {"tp": 1, "pp": 2, "dp": 2}
    assert parse_layout("pp=2, tp=4") == {"tp": 4, "pp": 2}
    for bad in ("tp=1", "tp=0,pp=1", "tp=1,pp=2,ep=2", "tp=x,pp=1"):
        with pytest.raises(ReshardError):
            parse_layout(bad)


# ----------------------------------------------------------------------------- the parallel converter's arithmetic
def test_flat_geometry_is_deepspeeds():
    # DeepSpeed pads each group to a multiple of 2 x dp and cuts it into dp equal partitions
    # (stage_1_and_2.py and bf16_optimizer.py, nccl_start_alignment_factor = 2, parameter_alignment off).
    from pretrain.reshard import flat_geometry

    assert flat_geometry([3, 4, 5], 1) == ([0, 3, 7], 12, 12)
    assert flat_geometry([3, 4, 5], 2) == ([0, 3, 7], 12, 6)
    assert flat_geometry([3, 4, 6], 4) == ([0, 3, 7], 13, 4)  # padded to 16


def test_state_format_files():
    from pretrain.reshard import StateFormat

    assert not StateFormat("fp32", 0, 2).flat
    assert StateFormat("bf16", 0, 2).bf16_optimizer and StateFormat("bf16", 0, 2).flat
    assert StateFormat("bf16", 1, 1).optim_file(1, 3) == "bf16_zero_pp_rank_1_mp_rank_03_optim_states.pt"
    assert StateFormat("fp16", 2, 1).optim_file(0, 0) == "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def _side(preset: str, *, tp: int, pp: int = 1, dp: int = 1, **extra: object):
    from pretrain.reshard import Side

    return Side.build(
        model_cfg(preset, **extra), tp=tp, pp=pp, dp=dp, zero=1, precision="bf16", partition="parameters"
    )


@pytest.mark.parametrize(("tp_src", "tp_tgt"), [(2, 1), (1, 2), (2, 4), (4, 2)])
def test_pieces_rebuild_every_target_shard(tp_src, tp_tgt):
    """Target shards built from source shards by `pieces` equal the target shards split from the full tensors,
    for every kind of split (rows, columns, vocabulary, T5's head tables) and replicated tensors."""
    from pretrain.reshard import pieces

    source, target = _side("t5-tiny", tp=tp_src), _side("t5-tiny", tp=tp_tgt)
    torch.manual_seed(0)
    full = {n: torch.randn(s) for n, s in source.shapes.items()}
    src_shards = [split_state(full, source.dims, tp_src, r) for r in range(tp_src)]
    for t in range(tp_tgt):
        want = split_state(full, target.dims, tp_tgt, t)
        for name in full:
            got = torch.full(target.shard_shape(name), float("nan"))
            for piece in pieces(name, source, target, t):
                src, dst = src_shards[piece.src_tp][name], got
                for dim, s0, d0, length in piece.narrows:
                    src, dst = src.narrow(dim, s0, length), dst.narrow(dim, d0, length)
                dst.copy_(src)
            assert torch.equal(got, want[name]), (name, t)


def test_pieces_keep_the_common_vocabulary_rows():
    from pretrain.reshard import pieces

    source = _side("gpt-tiny", tp=2)
    target = _side("gpt-tiny", tp=2, **{"model.vocab_size": 768})
    # target rank 0 holds rows 0-383: rows 0-255 from source rank 0, 256-383 from source rank 1
    assert [(p.src_tp, p.narrows) for p in pieces("embed.weight", source, target, 0)] == [
        (0, ((0, 0, 0, 256),)),
        (1, ((0, 0, 256, 128),)),
    ]
    # target rank 1 holds rows 384-767: 384-511 from source rank 1; 512-767 are new (left at zero)
    assert [(p.src_tp, p.narrows) for p in pieces("embed.weight", source, target, 1)] == [
        (1, ((0, 128, 0, 128),))
    ]
    with pytest.raises(ReshardError, match="only the vocabulary"):
        pieces("pos_embed.weight", source, _side("gpt-tiny", tp=2, **{"model.max_seq_len": 128}), 0)


def test_rank_coordinates_follow_the_topology():
    side = _side("gpt-tiny", tp=2, pp=2, dp=2)
    coords = [side.coords(r) for r in range(8)]
    assert coords[:4] == [(0, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1)]  # tp fastest, then dp, then pp
    assert all(side.rank(*c) == r for r, c in enumerate(coords))


def test_reshard_plan_for_format_and_vocabulary_changes(tmp_path):
    """Another engine ZeRO stage, precision or vocabulary padding at the same tp/pp/dp is converted too (the
    optimizer state's format or the vocabulary tensors' shapes differ); a caller that states no precision
    (fine-tuning) keeps the plain load."""
    import json

    import yaml

    from pretrain.checkpoint import Checkpointer, CheckpointError

    (tmp_path / "manifest.json").write_text(json.dumps({"layout": {"tp": 1, "pp": 2, "dp": 1, "zero": 0}}))
    (tmp_path / "config.yaml").write_text(
        yaml.safe_dump({"train": {"precision": "fp32"}, "model": {"vocab_size": 512}})
    )
    base = {"tp": 1, "pp": 2, "dp": 1, "zero": 0, "precision": "fp32", "vocab_size": 512}
    plan = Checkpointer.reshard_plan
    assert plan(tmp_path, base) == "same"
    assert plan(tmp_path, {**base, "zero": 1}) == "reshard"
    assert plan(tmp_path, {**base, "precision": "bf16"}) == "reshard"  # BF16_Optimizer's flat partitions
    assert plan(tmp_path, {**base, "vocab_size": 768}) == "reshard"
    assert plan(tmp_path, {"tp": 1, "pp": 2, "dp": 1, "zero": 1}) == "same"
    assert plan(tmp_path, {**base, "tp": 2}) == "reshard"
    with pytest.raises(CheckpointError, match="ZeRO stage 3"):
        plan(tmp_path, {**base, "tp": 2, "zero": 3})


def test_a_cached_conversion_follows_its_source(tmp_path: Path) -> None:
    """A conversion cached beside a checkpoint is reused only for the same target and while the source is
    the checkpoint it was made from: re-sealed in place (its manifest changed), the source is converted
    again rather than resumed from a stale copy."""
    import hashlib
    import json

    import yaml

    from pretrain.checkpoint import MANIFEST, _converted_for

    source, out = tmp_path / "step-3", tmp_path / "step-3.reshard-tp1-pp1-dp2"
    source.mkdir()
    out.mkdir()
    (source / MANIFEST).write_text(json.dumps({"files": {"a": {"sha256": "0" * 64}}}))
    want = {"tp": 1, "pp": 1, "dp": 2, "zero": 1, "precision": "bf16"}
    sealed_from = hashlib.sha256((source / MANIFEST).read_bytes()).hexdigest()
    (out / MANIFEST).write_text(json.dumps({"layout": {k: want[k] for k in ("tp", "pp", "dp", "zero")},
                                            "resharded_from": {"manifest_sha256": sealed_from}}))  # fmt: skip
    (out / "config.yaml").write_text(
        yaml.safe_dump({"train": {"precision": "bf16"}, "model": {"vocab_size": 512}})
    )
    assert _converted_for(out, want, 512, source=source)
    assert not _converted_for(out, want | {"zero": 2}, 512, source=source)
    assert not _converted_for(out, want | {"precision": "fp16"}, 512, source=source)
    assert not _converted_for(out, want, 768, source=source)
    (source / MANIFEST).write_text(json.dumps({"files": {"a": {"sha256": "1" * 64}}}))  # re-sealed in place
    assert not _converted_for(out, want, 512, source=source)
