"""Switch Transformer MoE layers (pretrain/models/moe.py): routing against a float64 reference written
here, capacity dropping counted exactly, the load-balancing and z-losses against hand computation,
config validation, the published size, export parity with transformers, and a tiny model that trains."""

from __future__ import annotations

import math

import pytest
import torch

from parallel.layers import LayerFactory
from pretrain.config import ConfigError, ModelConfig, load_config
from pretrain.models.moe import SwitchFFN, expert_capacity, moe_loss_and_metrics

E, H, FF = 4, 16, 32


def make_layer(**kw) -> SwitchFFN:
    cfg = ModelConfig(hidden_size=H, ffn_hidden_size=FF, activation="relu", bias=False, num_experts=E, **kw)
    torch.manual_seed(0)
    layer = SwitchFFN(cfg, LayerFactory())
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.5)
    return layer.train()


def reference(layer: SwitchFFN, x: torch.Tensor):
    """float64 Switch routing: p = softmax(x W_r^T), expert = argmax p, output p_e * expert_e(x)."""
    xs = x.reshape(-1, H).double()
    probs = torch.softmax(xs @ layer.router_weight.double().T, dim=-1)  # (S, E)
    choice = probs.argmax(dim=-1)
    out = torch.zeros_like(xs)
    for e, expert in enumerate(layer.experts()):
        rows = choice == e
        hidden = torch.relu(xs[rows] @ expert.up_proj.weight.double().T)
        out[rows] = (hidden @ expert.down_proj.weight.double().T) * probs[rows, e : e + 1]
    return out, probs, choice


def test_routing_matches_float64_reference():
    layer = make_layer(capacity_factor=float(E))  # capacity = all tokens: nothing can drop
    x = torch.randn(3, 10, H)
    ref, probs, choice = reference(layer, x)
    top2 = probs.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-4  # no near-tie: fp32 picks the same experts as fp64
    out = layer(x).reshape(-1, H)
    # fp32 vs fp64 on O(1) values through two 16/32-wide matmuls: ~1e-6 absolute; a wrong expert or a
    # missing gate scale moves outputs by O(0.1).
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    counts = torch.bincount(choice, minlength=E)
    assert layer.stats is not None and torch.equal(layer.stats.counts.long(), counts)
    assert layer.stats.dropped == 0
    f = counts.double() / counts.sum()
    aux = E * (f * probs.mean(dim=0)).sum()
    assert float(layer.stats.aux_loss) == pytest.approx(float(aux), rel=1e-6)


def test_capacity_dropping_is_counted_exactly():
    layer = make_layer(capacity_factor=0.5)
    x = torch.randn(2, 12, H)  # 24 tokens, 4 experts: capacity ceil(0.5 * 24 / 4) = 3
    ref, _, choice = reference(layer, x)
    capacity = expert_capacity(24, E, 0.5)
    assert capacity == 3
    counts = torch.bincount(choice, minlength=E)
    expected_dropped = int((counts - capacity).clamp(min=0).sum())
    assert expected_dropped > 0  # this seed overflows at least one expert
    out = layer(x).reshape(-1, H).double()
    zero = (out == 0).all(dim=-1)  # a dropped token's expert output is exactly 0: the residual passes it
    assert int(zero.sum()) == expected_dropped == layer.stats.dropped  # type: ignore[union-attr]
    for e in range(E):
        kept = (choice == e) & ~zero
        assert int(kept.sum()) == min(int(counts[e]), capacity)
        torch.testing.assert_close(out[kept], ref[kept], rtol=1e-5, atol=1e-5)
    _, metrics = moe_loss_and_metrics([layer], layer_cfg(layer))  # type: ignore[misc]
    assert metrics["capacity_overflow"] == expected_dropped / 24
    # Evaluation uses eval_capacity_factor (2.0: capacity 12 of 24 tokens) and drops less.
    layer.eval()
    layer(x)
    assert layer.stats.capacity == 12 and layer.stats.dropped == int((counts - 12).clamp(min=0).sum())  # type: ignore[union-attr]


def layer_cfg(layer: SwitchFFN, **kw) -> ModelConfig:
    return ModelConfig(num_experts=layer.num_experts, **kw)


def test_aux_and_z_loss_by_hand():
    """Two experts, router = identity: tokens with logits (ln 3, 0) get p = (3/4, 1/4), those with
    (0, ln 3) get (1/4, 3/4). Three of the first kind and one of the second:
    f = (3/4, 1/4), P = ((3 * 3/4 + 1/4) / 4, (3 * 1/4 + 3/4) / 4) = (5/8, 3/8),
    aux = N * sum f_i P_i = 2 * (15/32 + 3/32) = 9/8; logsumexp = ln 4 for every token, z = (ln 4)^2."""
    cfg = ModelConfig(
        hidden_size=2, ffn_hidden_size=4, activation="relu", bias=False, num_experts=2, router_z_loss_coef=0.1
    )
    layer = SwitchFFN(cfg, LayerFactory()).train()
    with torch.no_grad():
        layer.router_weight.copy_(torch.eye(2))
    a = math.log(3.0)
    x = torch.tensor([[[a, 0.0], [a, 0.0], [0.0, a], [a, 0.0]]])
    layer(x)
    assert float(layer.stats.aux_loss) == pytest.approx(9 / 8, rel=1e-6)  # type: ignore[union-attr]
    assert float(layer.stats.z_loss) == pytest.approx(math.log(4.0) ** 2, rel=1e-6)  # type: ignore[union-attr,arg-type]
    loss, metrics = moe_loss_and_metrics([layer, layer], cfg)  # type: ignore[misc]
    # Summed over layers: alpha * (9/8 + 9/8) + 0.1 * 2 (ln 4)^2.
    assert float(loss) == pytest.approx(0.01 * 2 * 9 / 8 + 0.1 * 2 * math.log(4.0) ** 2, rel=1e-6)
    assert metrics["moe_aux_loss"] == pytest.approx(9 / 8, rel=1e-6)
    assert metrics["expert_utilization"] == 1.0
    assert metrics["expert_load_max"] == pytest.approx(3 / 2)  # counts (3, 1): max / mean
    # capacity ceil(1.0 * 4 tokens / 2 experts) = 2 < the 3 tokens of expert 0: one of 4 dropped. The
    # balancing loss uses f before dropping (the router's choice), as in the paper.
    assert metrics["capacity_overflow"] == 1 / 4


def test_layer_placement_and_validation():
    cfg = load_config(None, ["data.shards=x", "model.preset=switch-tiny"]).model
    assert [cfg.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
    bad = [
        "model.num_experts=6",
        "parallel.ep=4",
        "parallel.tp=2",
    ]
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.shards=x", "model.preset=switch-tiny", *bad], world_size=8)
    msg = str(err.value)
    assert "parallel.ep=4: must divide model.num_experts=6" in msg
    assert "parallel.tp=2 with model.num_experts=6: MoE layers are not tensor-parallel" in msg
    with pytest.raises(ConfigError, match=r"parallel.ep=4: must divide the data-parallel degree dp=2"):
        load_config(None, ["data.shards=x", "model.preset=switch-tiny", "parallel.ep=4"], world_size=2)
    with pytest.raises(ConfigError, match=r"parallel.zero_stage=3 with model.num_experts=4: DeepSpeed's MoE"):
        load_config(None, ["data.shards=x", "model.preset=switch-tiny", "parallel.zero_stage=3"])
    with pytest.raises(ConfigError, match=r"parallel.ep=2: expert parallelism needs model.num_experts > 0"):
        load_config(None, ["data.shards=x", "model.preset=t5-tiny", "parallel.ep=2"])


# ----------------------------------------------------------------------------- published size, export


def test_switch_base_8_parameter_count():
    """Tandem's switch-base-8 has exactly the parameters of transformers' SwitchTransformers built with
    google/switch-base-8's published config, and is within 2% of the release's ~620M."""
    import transformers

    from pretrain.lineage import PUBLISHED, count_parameters

    total = count_parameters("switch-base-8")["total"]
    hf_cfg = transformers.SwitchTransformersConfig(
        vocab_size=32128,
        d_model=768,
        d_kv=64,
        d_ff=3072,
        num_layers=12,
        num_decoder_layers=12,
        num_sparse_encoder_layers=6,
        num_sparse_decoder_layers=6,
        num_heads=12,
        num_experts=8,
    )
    with torch.device("meta"):
        hf = transformers.SwitchTransformersForConditionalGeneration(hf_cfg)
    assert total == sum(p.numel() for p in hf.parameters())  # parameters() counts tied tensors once
    assert abs(total / PUBLISHED["switch-base-8"].params - 1) < 0.02, total


def test_export_to_switch_transformers_reproduces_logits(tmp_path):
    import transformers

    from pretrain.export import export_hf
    from pretrain.models import build_model
    from pretrain.models.moe import moe_layers

    vocab = 300
    # eval_capacity_factor = num_experts: every expert may take every token, so neither side drops any
    # (HF's per-sequence capacity is set to max_seq_len by the export); asserted below.
    cfg = load_config(
        None,
        [
            "data.shards=unused",
            "model.preset=switch-tiny",
            f"model.vocab_size={vocab}",
            "model.eval_capacity_factor=4",
        ],
    )
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    with torch.no_grad():  # move norms off their init values so their mapping is exercised
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    assert export_hf(model, cfg.model, tmp_path) == "SwitchTransformersForConditionalGeneration"
    hf = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, vocab, (2, 19))
    dec = torch.randint(0, vocab, (2, 7))
    mask = torch.ones(2, 19, dtype=torch.long)
    mask[1, 13:] = 0
    with torch.no_grad():
        ours = model(ids, decoder_input_ids=dec, attention_mask=mask)
        theirs = hf(input_ids=ids, decoder_input_ids=dec, attention_mask=mask).logits
    layers = moe_layers(model)
    assert len(layers) == 2 and all(m.stats is not None and m.stats.dropped == 0 for m in layers)
    # Same tolerance and reasoning as tests/unit/test_export.py: fp32 on both sides, only the order of
    # operations differs (~1e-7); a wrong expert, router or scale moves logits by O(0.1).
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_export_refuses_moe_without_a_transformers_class(tmp_path):
    from pretrain.export import ExportError, export_hf
    from pretrain.models import build_model

    cfg = load_config(None, ["data.shards=unused", "model.preset=gpt-moe-tiny", "model.vocab_size=300"])
    with pytest.raises(ExportError, match=r"model.family='gpt' with model.num_experts=4"):
        export_hf(build_model(cfg.model), cfg.model, tmp_path)


# ----------------------------------------------------------------------------- training


def test_switch_tiny_trains_with_falling_loss(shards_dir, tmp_path):
    from tests.conftest import loss_ends, train_in_process

    steps = 50
    keys = {
        "model.preset": "switch-tiny",
        "train.steps": steps,
        "data.seq_len": 32,
        "optimizer.warmup_steps": 3,
        "optimizer.lr": "3e-3",  # span corruption learns slowly at 1e-3 (seen: -4% in 30 steps)
    }
    result, metrics = train_in_process(shards_dir, tmp_path / "run", **keys)
    first, last = loss_ends(metrics, "loss", steps)
    # From ~ln(512) = 6.2 at init, lr 3e-3 takes span corruption's loss down ~10% in 30 steps (seen:
    # 6.22 -> 5.63); after 50 steps a 10% drop leaves room for the noise of 8-sequence batches.
    assert last < 0.9 * first, (first, last, [round(metrics[s]["loss"], 2) for s in sorted(metrics)])
    rec = metrics[steps]
    for key in ("moe_aux_loss", "expert_utilization", "expert_load_max", "capacity_overflow"):
        assert math.isfinite(rec[key]), key
    assert rec["moe_aux_loss"] > 0.0
    assert 0.0 < rec["expert_utilization"] <= 1.0 and 0.0 <= rec["capacity_overflow"] < 1.0
    # DeepSpeed writes each expert to a file of its own; load_model gathers them (it raises on any
    # missing weight) and the reloaded model computes what training ended with: finite logits.
    from pretrain.export import load_model

    model, _ = load_model(result.checkpoint)
    ids = torch.randint(0, 500, (2, 16))
    with torch.no_grad():
        assert torch.isfinite(model(ids, decoder_input_ids=ids[:, :8])).all()
