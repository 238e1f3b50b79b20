"""The decoder-only lineage (GPT-3, OPT, MT-NLG, Gopher, Chinchilla, PaLM), each part against something
independent of the code under test:

- every PUBLISHED preset's parameter count (meta device) against the paper's, and a GPT-3 count by hand;
- PaLM's parallel block against a float64 block written out here (LayerNorm without bias, multi-query
  attention with RoPE, SwiGLU), the z-loss against log-sum-exp by hand;
- GPT-3's locally banded layers and Gopher's Transformer-XL relative attention against float64 scores
  written from the papers' formulas with explicit masks, and both under a KV cache;
- each -tiny preset trains with falling loss; `pretrain info --json`, the docs table and
  `pretrain smoke --model PRESET`'s config resolution.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from pretrain.config import ConfigError, ModelConfig, load_config
from pretrain.lineage import PUBLISHED, count_parameters, model_config
from pretrain.models import build_model

VOCAB = 97
DECODER_TINY = ["gpt3-tiny", "opt-tiny", "gopher-tiny", "palm-tiny"]
DECODER_PUBLISHED = [
    *(f"gpt3-{size}" for size in ("125m", "350m", "760m", "1.3b", "2.7b", "6.7b", "13b", "175b")),
    "opt-175b",
    "mt-nlg-530b",
    "gopher-280b",
    "chinchilla-70b",
    "palm-8b",
    "palm-62b",
    "palm-540b",
]


def tiny(preset: str, **changes: object) -> ModelConfig:
    return dataclasses.replace(model_config(preset), vocab_size=VOCAB, **changes)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("preset", DECODER_PUBLISHED)
def test_published_preset_matches_the_paper_within_2_percent(preset):
    pub = PUBLISHED[preset]
    cfg = model_config(preset)
    assert cfg.vocab_size > 0, f"{preset}: published-size presets set the paper's vocabulary"
    total = count_parameters(preset)["total"]
    # The papers round their counts (GPT-3's "2.7B" builds 2.65B): 2% is the agreed bar for "same shape".
    assert abs(total / pub.params - 1) < 0.02, (preset, total, pub.params)


def test_gpt3_small_count_by_hand():
    h, layers, vocab, ctx = 768, 12, 50257, 2048
    # Per block: QKV + output (4h^2 + 4h), MLP (8h^2 + 5h), two LayerNorms (4h); tied head; final norm 2h.
    expected = layers * (12 * h * h + 13 * h) + vocab * h + ctx * h + 2 * h
    counts = count_parameters("gpt3-125m")
    assert counts["total"] == expected
    assert counts["non_embedding"] == expected - vocab * h - ctx * h


def test_gopher_and_palm_shapes_reach_the_paper_through_their_own_features():
    # Without Transformer-XL's per-layer W_R (d x d), Gopher would be 12 L d^2 ~ 258B, 8% short of 280B.
    gopher = model_config("gopher-280b")
    absolute = count_parameters(dataclasses.replace(gopher, position="rope"))["total"]
    assert absolute / PUBLISHED["gopher-280b"].params < 0.93
    # PaLM's table lists 540.35B; multi-query attention (1 key/value head) is what makes it exact.
    palm = model_config("palm-540b")
    multi_head = count_parameters(dataclasses.replace(palm, num_kv_heads=0))["total"]
    assert multi_head / PUBLISHED["palm-540b"].params > 1.04


def test_count_parameters_needs_a_vocabulary_for_tiny_presets():
    with pytest.raises(ValueError, match="vocab_size"):
        count_parameters("palm-tiny")
    assert count_parameters("palm-tiny", vocab_size=VOCAB)["total"] > 0


# ----------------------------------------------------------------------------- PaLM block and z-loss


def _layer_norm64(x, weight):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * weight


def _rope64(x, theta=10000.0):
    """Rotate-half RoPE on (B, H, T, D) in float64, from the formula."""
    t, d = x.shape[-2], x.shape[-1]
    freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * freq[None, :]
    cos, sin = torch.cos(ang).repeat(1, 2), torch.sin(ang).repeat(1, 2)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def test_parallel_block_against_a_float64_palm_block():
    cfg = tiny("palm-tiny")
    torch.manual_seed(0)
    model = build_model(cfg)
    block = model.blocks[0]
    with torch.no_grad():  # non-trivial norm gain so the shared norm is visible
        block.attn_norm.weight.uniform_(0.5, 1.5)
    assert not hasattr(block, "mlp_norm"), "PaLM's block has one norm shared by attention and MLP"
    x = torch.randn(2, 9, cfg.hidden_size)
    out = block(x, model.rope)

    W = {n: p.detach().double() for n, p in block.named_parameters()}
    x64 = x.double()
    hn = _layer_norm64(x64, W["attn_norm.weight"])
    b, t, _ = x.shape
    hd, heads = cfg.head_dim, cfg.num_heads
    q = (hn @ W["attn.q_proj.weight"].T).view(b, t, heads, hd).transpose(1, 2)
    k = (hn @ W["attn.k_proj.weight"].T).view(b, t, 1, hd).transpose(1, 2)  # one key/value head
    v = (hn @ W["attn.v_proj.weight"].T).view(b, t, 1, hd).transpose(1, 2)
    q, k = _rope64(q), _rope64(k)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)  # k broadcasts over the query heads
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, heads * hd) @ W["attn.o_proj.weight"].T
    gate = hn @ W["mlp.gate_proj.weight"].T
    mlp = (gate * torch.sigmoid(gate) * (hn @ W["mlp.up_proj.weight"].T)) @ W["mlp.down_proj.weight"].T
    expected = x64 + attn + mlp
    # fp32 vs float64 through ~4 matmuls of width <= 512 with O(1) activations: ~1e-6 observed.
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-5)


def test_z_loss_against_log_sum_exp_by_hand_and_only_in_training():
    from pretrain.losses import IGNORE_INDEX, LanguageModelLoss

    cfg = tiny("palm-tiny", z_loss=0.25)  # a large coefficient so the term is far above fp32 noise
    torch.manual_seed(1)
    model = build_model(cfg)
    with torch.no_grad():
        model.embed.weight.mul_(20)  # log Z well away from log(V) so the square is not near-constant
    ids = torch.randint(0, VOCAB, (2, 12))
    labels = torch.randint(0, VOCAB, (2, 12))
    labels[0, :5] = IGNORE_INDEX
    wrapper = LanguageModelLoss(model).train()
    loss = wrapper({"input_ids": ids, "labels": labels})

    logits = model(ids).detach().double()
    ce = total_sq = 0.0
    n = 0
    for bi in range(2):
        for ti in range(12):
            if labels[bi, ti] == IGNORE_INDEX:
                continue
            log_z = math.log(sum(math.exp(v) for v in logits[bi, ti].tolist()))
            ce += log_z - logits[bi, ti, labels[bi, ti]].item()
            total_sq += log_z**2
            n += 1
    expected = ce / n + 0.25 * total_sq / n
    # fp32 logits and log-sum-exp against float64 sums over 97 terms: relative error ~1e-6.
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert wrapper.metrics["z_loss"] == pytest.approx(total_sq / n, rel=1e-5)
    wrapper.eval()
    assert wrapper({"input_ids": ids, "labels": labels}).item() == pytest.approx(ce / n, rel=1e-5)
    assert "z_loss" not in wrapper.metrics


# ----------------------------------------------------------------------------- banded and XL attention


def _attention_inputs(cfg: ModelConfig, t: int, seed: int):
    torch.manual_seed(seed)
    model = build_model(cfg)
    x = torch.randn(2, t, cfg.hidden_size)
    return model, x


def _qkv64(attn, x):
    b, t, _ = x.shape
    W = {n: p.detach().double() for n, p in attn.named_parameters()}
    x64 = x.double()

    def proj(name, heads):
        y = x64 @ W[f"{name}.weight"].T
        if f"{name}.bias" in W:
            y = y + W[f"{name}.bias"]
        return y.view(b, t, heads, attn.head_dim).transpose(1, 2)

    return (
        W,
        proj("q_proj", attn.num_heads),
        proj("k_proj", attn.num_kv_heads),
        proj("v_proj", attn.num_kv_heads),
    )


def _finish64(attn, W, scores, v):
    b, _, t, _ = scores.shape
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1) @ W["o_proj.weight"].T
    return y + W["o_proj.bias"] if "o_proj.bias" in W else y


def test_banded_layers_against_a_dense_reference_with_an_explicit_mask():
    window, t = 5, 16
    cfg = tiny("gpt3-tiny", local_attention_window=window)
    model, x = _attention_inputs(cfg, t, seed=2)
    banded = [i for i, blk in enumerate(model.blocks) if blk.attn.local_window]
    assert banded == [1, 3], "GPT-3 alternates dense and banded layers (odd layers banded)"
    attn = model.blocks[1].attn
    W, q, k, v = _qkv64(attn, x)
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    allowed = (j <= i) & (i - j < window)  # itself and the window-1 tokens before it
    scores = (q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)).masked_fill(~allowed, float("-inf"))
    expected = _finish64(attn, W, scores, v)
    out = attn(x)
    # fp32 against float64 through three width-128 matmuls and a softmax: ~1e-7 observed.
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)
    dense = model.blocks[0].attn(x)  # the band must change something, or the test proves nothing
    assert not torch.allclose(attn(x), dense)


def _sinusoid64(n, dim):
    """Transformer-XL's r_d = [sin(d w_1..), cos(d w_1..)], w_i = 10000^(-2i/dim), from the paper."""
    w = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * w[None, :]
    return torch.cat([ang.sin(), ang.cos()], -1)


def test_transformer_xl_attention_against_the_papers_four_terms():
    t = 10
    cfg = tiny("gopher-tiny")
    model, x = _attention_inputs(cfg, t, seed=3)
    attn = model.blocks[0].attn
    with torch.no_grad():  # u and v start at zero; give them values so their terms are exercised
        attn.r_content_bias.normal_()
        attn.r_position_bias.normal_()
    W, q, k, v = _qkv64(attn, x)
    heads, d = attn.num_heads, attn.head_dim
    r = (_sinusoid64(t, cfg.hidden_size) @ W["r_proj.weight"].T).view(t, heads, d)  # W_R r_{distance}
    u, vb = W["r_content_bias"], W["r_position_bias"]
    scores = torch.full((2, heads, t, t), float("-inf"), dtype=torch.float64)
    for i in range(t):
        for j in range(i + 1):
            # Dai et al. 2019, eq. 4: (a) q.k + (b) q.W_R r + (c) u.k + (d) v.W_R r, with r = r_{i-j}.
            a = (q[:, :, i] * k[:, :, j]).sum(-1)
            b = (q[:, :, i] * r[i - j]).sum(-1)
            c = (u * k[:, :, j]).sum(-1)
            dd = (vb * r[i - j]).sum(-1)
            scores[:, :, i, j] = (a + b + c + dd) / math.sqrt(d)
    expected = _finish64(attn, W, scores, v)
    # fp32 against float64: the extra gather/einsum terms add ~1e-7; 1e-5 is ~100x the observed error.
    torch.testing.assert_close(attn(x).double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("preset", DECODER_TINY)
def test_kv_cache_decoding_matches_the_full_forward(preset):
    changes = {"local_attention_window": 4} if preset == "gpt3-tiny" else {}
    model, _ = _attention_inputs(tiny(preset, **changes), 1, seed=4)
    model.eval()
    ids = torch.randint(0, VOCAB, (2, 20))
    full = model(ids)
    cache = model.new_cache()
    steps = [model(ids[:, :13], cache=cache)] + [model(ids[:, i : i + 1], cache=cache) for i in range(13, 20)]
    # Same fp32 math on different shapes (the cache path gathers one query row): ~1e-6 observed.
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-4)


def test_triton_backend_refuses_the_dense_band_bias():
    from pretrain.kernels import set_default_backend

    model, x = _attention_inputs(tiny("gpt3-tiny"), 8, seed=5)
    previous = set_default_backend("triton")
    try:
        with pytest.raises(ValueError, match="dense position_bias"):
            model.blocks[1].attn(x)
    finally:
        set_default_backend(previous)


def test_bad_architecture_options_are_refused_by_name():
    def problems(*overrides: str) -> str:
        with pytest.raises(ConfigError) as err:
            load_config(None, ["data.shards=x", *overrides])
        return str(err.value)

    assert "model.z_loss=-1.0" in problems("model.z_loss=-1.0")
    assert "model.local_attention_every=0" in problems("model.local_attention_every=0")
    assert "only GPT implements it" in problems("model.preset=bert-tiny", "model.parallel_block=true")
    assert "relative_xl" in problems("model.preset=t5-tiny", "model.position=relative_xl")


# ----------------------------------------------------------------------------- training


# Each train() costs ~15 s of fixed setup on 2 cores; OPT's block is GPT-2's with ReLU (its forward and
# cache are tested above), so its run is in the slow tier to keep this file near a minute.
@pytest.mark.parametrize(
    "preset", [p if p != "opt-tiny" else pytest.param(p, marks=pytest.mark.slow) for p in DECODER_TINY]
)
def test_tiny_preset_trains_with_falling_loss(preset, shards_dir, tmp_path):
    from tests.conftest import loss_ends, train_in_process

    steps = 24
    keys = {
        "model.preset": preset,
        "model.max_seq_len": 64,
        "model.num_layers": 2,
        "model.local_attention_window": 8 if preset == "gpt3-tiny" else 0,  # band < seq_len
        "train.steps": steps,
        "data.seq_len": 32,
        "checkpoint.save_final": "false",
        "optimizer.warmup_steps": 3,
        "optimizer.lr": "3e-3",
    }
    _, metrics = train_in_process(shards_dir, tmp_path / "run", **keys)
    first, last = loss_ends(metrics, "loss", steps)
    # From ~ln(512) = 6.2 at init, 24 steps at lr 3e-3 reach ~4.5-5 on this corpus (unigram statistics are
    # learned first); a 15% drop is far above the few-% noise of 8-sequence batches.
    assert last < 0.85 * first, (first, last)
    if preset == "palm-tiny":
        assert math.isfinite(metrics[steps]["z_loss"]) and metrics[steps]["z_loss"] > 0


# ----------------------------------------------------------------------------- CLI


def test_info_json_reports_the_meta_device_count(capsys):
    from pretrain.cli import main

    rc = main(
        [
            "info",
            "--model",
            "gpt3-125m",
            "--json",
            "--gpus",
            "16",
            "parallel.tp=2",
            "parallel.zero_stage=1",
            "train.micro_batch_size=2",
            "train.global_batch_size=64",
            "train.precision=bf16",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out.strip().splitlines()
    info = json.loads(out[-1])
    h, v = 768, 50257
    assert info["params"] == 12 * (12 * h * h + 13 * h) + v * h + 2048 * h + 2 * h
    assert info["published"]["params"] == 125e6
    assert info["layout"]["dp"] == 8 and info["layout"]["num_micro_batches"] == 4
    # 6N + 12 L H d T with N = blocks + final norm + the head matmul (docs/mfu.md).
    n = 12 * (12 * h * h + 13 * h) + 2 * h + v * h
    assert info["flops_per_token"] == pytest.approx(6 * n + 12 * 12 * h * 2048)
    mem = info["memory_gb"]
    # ZeRO-1, bf16 Adam: params 2 and grads 2 bytes on every rank, optimizer 12 bytes split over dp=8;
    # the model is split over tp=2 (embedding included: vocab-parallel).
    per_rank = info["params"] / 2
    assert mem["params_gb"] == pytest.approx(2 * per_rank / 1e9, rel=0.01)
    assert mem["optimizer_gb"] == pytest.approx(12 * per_rank / 8 / 1e9, rel=0.01)
    assert any(line.startswith("parameters") for line in out)


def test_info_refuses_a_bad_override(capsys):
    from pretrain.cli import main

    assert main(["info", "--model", "opt-175b", "parallel.tq=8"]) == 2
    assert "parallel.tq" in capsys.readouterr().err


def test_docs_models_table_is_generated_from_published():
    from pathlib import Path

    from pretrain.cli_info import TABLE_BEGIN, TABLE_END, published_table

    text = (Path(__file__).resolve().parents[2] / "docs" / "models.md").read_text()
    inside = text[text.index(TABLE_BEGIN) + len(TABLE_BEGIN) : text.index(TABLE_END)].strip()
    assert inside == published_table(), "regenerate: pretrain info --table --update docs/models.md"


def test_smoke_resolves_a_preset_to_its_family_run_config():
    from pretrain.cli import _load_smoke_config, _smoke_run_config

    run_cfg, preset = _smoke_run_config("palm-tiny")
    assert run_cfg.name == "smoke-gpt.yaml" and preset == "palm-tiny"
    cfg = _load_smoke_config(run_cfg, preset, ["data.shards=x", "train.steps=30"])
    # The preset's own shape, not the smoke config's gpt-mini section.
    assert cfg.model.parallel_block and cfg.model.num_kv_heads == 1 and cfg.train.steps == 30
    assert _smoke_run_config("gpt")[1] is None
    with pytest.raises(ConfigError, match="no-such-model"):
        _smoke_run_config("no-such-model")


# ----------------------------------------------------------------------------- export


def test_opt_exports_to_transformers_opt_with_equal_logits(tmp_path):
    import transformers

    from pretrain.export import export_hf

    torch.manual_seed(6)
    cfg = tiny("opt-tiny")
    model = build_model(cfg).eval()
    with torch.no_grad():  # move norms and biases off their init values so their mapping is exercised
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    assert export_hf(model, cfg, tmp_path) == "OPTForCausalLM"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "OPTForCausalLM"
    ids = torch.randint(0, VOCAB, (2, 19))
    mask = torch.ones(2, 19, dtype=torch.long)
    mask[1, 13:] = 0  # right padding: OPT derives positions from the mask's cumsum, equal for real tokens
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        theirs = hf(input_ids=ids, attention_mask=mask).logits
    # fp32 on both sides with the same weights: only the order of operations inside the matmuls and
    # softmax differ (~1e-7 on O(1) logits); a wrong or transposed weight moves logits by O(0.1).
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("preset", "option"), [("gpt3-tiny", "local_attention_window"), ("palm-tiny", "parallel_block")]
)
def test_export_refuses_banded_and_parallel_blocks(preset, option, tmp_path):
    from pretrain.export import ExportError, export_hf

    cfg = tiny(preset)
    with pytest.raises(ExportError, match=f"model.{option}="):
        export_hf(build_model(cfg), cfg, tmp_path)
