"""The model math, each part against something independent of Tandem:

- the attention entry point against a float64 softmax(QK^T/sqrt(d) + mask)V written out here;
- the whole GPT against Hugging Face `transformers` (GPT-2 and Llama, random init, no downloads) with
  the weights copied across, so every norm, projection, activation, position scheme and the head are
  checked at once;
- init statistics, parameter counts by hand, causality, activation checkpointing.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from parallel.parallelize import apply_activation_checkpointing
from pretrain.config import ModelConfig, load_config
from pretrain.kernels import attention as _attention
from pretrain.models import build_model
from pretrain.models.gpt import GPT

VOCAB = 500


def model_config(preset: str, *overrides: str) -> ModelConfig:
    return load_config(
        None, ["data.shards=/tmp/shards", f"model.preset={preset}", f"model.vocab_size={VOCAB}", *overrides]
    ).model


# ----------------------------------------------------------------------------- attention


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """float64 softmax(q k^T / sqrt(d) + mask) v, written out. q: (B, H, T, D); k, v: (B, Hkv, S, D).

    Query head h reads key/value head h // (H / Hkv) (Llama's repeat_kv grouping). Causal masking is
    aligned to the last key: query i sits at absolute position S - T + i (the KV-cache convention)."""
    q, k, v = q.double(), k.double(), v.double()
    _, h, t, d = q.shape
    s = k.shape[-2]
    group = h // k.shape[1]
    kv_head = torch.arange(h) // group
    k, v = k[:, kv_head], v[:, kv_head]  # (B, H, S, D)
    scores = torch.einsum("bhtd,bhsd->bhts", q, k) / math.sqrt(d)
    allowed = torch.ones(t, s, dtype=torch.bool)
    if causal:
        allowed = torch.arange(s)[None, :] <= (torch.arange(t)[:, None] + s - t)
    scores = scores.masked_fill(~allowed, float("-inf"))
    if mask is not None:
        scores = (
            scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
        )
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bhts,bhsd->bhtd", probs, v)


def attention(q, k, v, *, causal: bool, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The entry point with this file's mask convention: a (B, 1, 1, S) bool mask is a key padding mask,
    a float mask an additive position bias."""
    if mask is None:
        return _attention(q, k, v, causal=causal)
    if mask.dtype == torch.bool:
        return _attention(q, k, v, causal=causal, key_padding_mask=mask[:, 0, 0, :])
    return _attention(q, k, v, causal=causal, position_bias=mask)


# fp32 against fp64: unit roundoff u = 6e-8; each output is a length-D dot product, a length-S softmax
# and a length-S weighted sum of O(1) values, so the worst-case error is ~(D + 2S)·u·max|x| ≈ 3e-6 for
# D=16, S=12 and |x| <= 4; typical errors are ~1e-7. 1e-5 leaves margin for max|x| without hiding a
# wrong scale, mask or head grouping (those move outputs by O(0.1)).
ATTN_TOL = {"rtol": 1e-5, "atol": 1e-5}


def _qkv(b: int = 2, h: int = 4, hkv: int = 4, t: int = 12, s: int = 12, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=g)
    k = torch.randn(b, hkv, s, d, generator=g)
    v = torch.randn(b, hkv, s, d, generator=g)
    return q, k, v


def _padding_mask(b: int, s: int, seed: int = 1) -> torch.Tensor:
    """(B, 1, 1, S) bool, True = attend; every row keeps key 0 so no query row is fully masked."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(b, s, generator=g) > 0.3
    keep[:, 0] = True
    return keep[:, None, None, :]


@pytest.mark.parametrize(
    "case", ["causal", "bidirectional", "padding", "causal+padding", "gqa", "gqa+causal+padding", "additive"]
)
def test_attention_matches_float64_reference(case: str):
    hkv = 2 if case.startswith("gqa") else 4
    q, k, v = _qkv(hkv=hkv)
    causal = "causal" in case
    mask = _padding_mask(2, 12) if "padding" in case else None
    if case == "additive":
        mask = torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    got = attention(q, k, v, causal=causal, mask=mask)
    want = reference_attention(q, k, v, causal=causal, mask=mask)
    assert got.dtype == torch.float32 and got.shape == q.shape
    torch.testing.assert_close(got.double(), want, **ATTN_TOL)


@pytest.mark.parametrize("case", ["causal+padding", "gqa+causal"])
def test_attention_gradients_match_float64_reference(case: str):
    q, k, v = _qkv(hkv=2 if "gqa" in case else 4)
    mask = _padding_mask(2, 12) if "padding" in case else None
    grad_out = torch.randn_like(q)
    inputs = [x.clone().requires_grad_() for x in (q, k, v)]
    (attention(*inputs, causal=True, mask=mask) * grad_out).sum().backward()
    ref_inputs = [x.double().requires_grad_() for x in (q, k, v)]
    (reference_attention(*ref_inputs, causal=True, mask=mask) * grad_out.double()).sum().backward()
    for got, want in zip(inputs, ref_inputs):
        # One more matmul chain than the forward (dP, dS): same error model, same tolerance.
        torch.testing.assert_close(got.grad.double(), want.grad, **ATTN_TOL)


def test_attention_causal_with_mask_and_fewer_queries_than_keys():
    q, k, v = _qkv(t=4, s=12)
    mask = _padding_mask(2, 12)
    got = attention(q, k, v, causal=True, mask=mask)
    torch.testing.assert_close(got.double(), reference_attention(q, k, v, causal=True, mask=mask), **ATTN_TOL)


def test_attention_causal_convention_does_not_depend_on_the_mask():
    q, k, v = _qkv(t=4, s=12)
    all_keys = torch.ones(1, 1, 1, 12, dtype=torch.bool)
    torch.testing.assert_close(
        attention(q, k, v, causal=True), attention(q, k, v, causal=True, mask=all_keys), **ATTN_TOL
    )


# ----------------------------------------------------------------------------- GPT properties


@pytest.mark.parametrize("preset", ["gpt-tiny", "llama-tiny"])
def test_gpt_is_causal(preset: str):
    torch.manual_seed(0)
    model = build_model(model_config(preset)).eval()
    ids = torch.randint(0, VOCAB, (2, 32))
    t = 17
    changed = ids.clone()
    changed[:, t] = (ids[:, t] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(ids), model(changed)
    # Rows before t never see token t; on CPU their arithmetic is the same op on the same numbers.
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])  # and the change does reach position t onwards


@pytest.mark.parametrize("preset", ["gpt-tiny", "llama-tiny"])
def test_init_statistics(preset: str):
    torch.manual_seed(0)
    cfg = model_config(preset)
    model = build_model(cfg)
    residual_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)  # 0.02 / 2 = 0.01 for 2 layers
    seen_residual = 0
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        elif "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            want = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else cfg.init_std
            seen_residual += want == residual_std
            # The sample std of n normal draws has relative standard error 1/sqrt(2n); the smallest
            # matrix here has n = 128*64 = 8192 entries (1/sqrt(2n) = 0.8%). 5 standard errors (4%)
            # fails by chance with probability < 1e-6 yet separates /sqrt(2L) from /sqrt(L) (41%).
            rel = 5 / math.sqrt(2 * p.numel())
            assert abs(p.std().item() - want) < rel * want, (name, p.std().item(), want)
            assert abs(p.mean().item()) < 5 * want / math.sqrt(p.numel()), name
    assert seen_residual == 2 * cfg.num_layers


def test_num_parameters_by_hand_gpt_tiny():
    cfg = model_config("gpt-tiny")  # h=128, 2 layers, 4h MLP, biases, learned positions (256), tied head
    h, layers, v, positions = 128, 2, VOCAB, 256
    per_layer = (
        2 * h  # attention LayerNorm weight + bias
        + 4 * (h * h + h)  # q, k, v, o with biases
        + 2 * h  # MLP LayerNorm
        + (h * 4 * h + 4 * h)  # up_proj
        + (4 * h * h + h)  # down_proj
    )
    embeddings = v * h + positions * h
    total = embeddings + layers * per_layer + 2 * h  # + final LayerNorm; the tied head adds nothing
    model = GPT(cfg)
    assert total == 493_568
    assert model.num_parameters() == total
    assert model.num_parameters(exclude_embeddings=True) == total - embeddings


def test_num_parameters_by_hand_llama_tiny():
    cfg = model_config("llama-tiny")  # h=128, 2 layers, 4 heads of 32, 2 kv heads, swiglu, untied, no bias
    h, layers, v, kv_width = 128, 2, VOCAB, 2 * 32
    ffn = 384  # 8/3 * 128 = 341.3, rounded up to a multiple of 64
    per_layer = h + (2 * h * h + 2 * h * kv_width) + h + 3 * h * ffn
    total = v * h + layers * per_layer + h + h * v  # embedding, blocks, final RMSNorm, untied head
    assert GPT(cfg).num_parameters() == total == 521_856


# ----------------------------------------------------------------------------- Hugging Face equivalence

# Both sides are fp32 and compute the same function; only the order of float operations differs
# (Conv1D addmm vs linear, eager softmax vs SDPA, fused vs separate qkv). Logits here are O(1) (see
# _randomize) and pass through ~8 matmuls with inner dims <= 512, so the accumulated relative
# rounding error is ~sqrt(512)·8·6e-8 ≈ 1e-5, i.e. ~5e-5 absolute on logits up to ~5; observed
# differences are <= 8e-6. Moving RMSNorm eps from 1e-6 to 1e-5 alone moves logits by ~9e-3, so a
# wrong eps, gelu variant, rope layout or head grouping cannot hide inside this tolerance.
HF_TOL = {"rtol": 1e-5, "atol": 2e-5}


def _randomize(model: nn.Module, seed: int) -> None:
    """Weights large enough that attention is far from uniform and norms' affine terms matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("ln" in name or "norm" in name) and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _gpt2_to_tandem(sd: dict[str, torch.Tensor], num_layers: int, h: int) -> dict[str, torch.Tensor]:
    """HF GPT-2 names -> Tandem names. HF's Conv1D stores (in, out): transpose for nn.Linear (out, in)."""
    out = {
        "embed.weight": sd["transformer.wte.weight"],
        "pos_embed.weight": sd["transformer.wpe.weight"],
        "final_norm.weight": sd["transformer.ln_f.weight"],
        "final_norm.bias": sd["transformer.ln_f.bias"],
    }
    for i in range(num_layers):
        src, dst = f"transformer.h.{i}.", f"blocks.{i}."
        w_qkv, b_qkv = sd[src + "attn.c_attn.weight"], sd[src + "attn.c_attn.bias"]  # (h, 3h), (3h,)
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[dst + f"attn.{name}.weight"] = w_qkv[:, j * h : (j + 1) * h].t()
            out[dst + f"attn.{name}.bias"] = b_qkv[j * h : (j + 1) * h]
        pairs = {
            "attn.c_proj": "attn.o_proj",
            "mlp.c_fc": "mlp.up_proj",
            "mlp.c_proj": "mlp.down_proj",
        }
        for hf, ours in pairs.items():
            out[dst + ours + ".weight"] = sd[src + hf + ".weight"].t()
            out[dst + ours + ".bias"] = sd[src + hf + ".bias"]
        for hf, ours in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
            out[dst + ours + ".weight"] = sd[src + hf + ".weight"]
            out[dst + ours + ".bias"] = sd[src + hf + ".bias"]
    return out


def _llama_to_tandem(sd: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    out = {
        "embed.weight": sd["model.embed_tokens.weight"],
        "final_norm.weight": sd["model.norm.weight"],
        "lm_head.weight": sd["lm_head.weight"],
    }
    for i in range(num_layers):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[dst + f"attn.{name}.weight"] = sd[src + f"self_attn.{name}.weight"]
        for name in ("gate_proj", "up_proj", "down_proj"):
            out[dst + f"mlp.{name}.weight"] = sd[src + f"mlp.{name}.weight"]
        out[dst + "attn_norm.weight"] = sd[src + "input_layernorm.weight"]
        out[dst + "mlp_norm.weight"] = sd[src + "post_attention_layernorm.weight"]
    return out


def _hf_gpt2(cfg: ModelConfig, attn_implementation: str) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_cfg = GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.max_seq_len,
        n_embd=cfg.hidden_size,
        n_layer=cfg.num_layers,
        n_head=cfg.num_heads,
        activation_function="gelu",  # exact erf GELU, like F.gelu; GPT-2's default is the tanh form
        layer_norm_epsilon=1e-5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation=attn_implementation,
    )
    return GPT2LMHeadModel(hf_cfg).eval()


def _hf_llama(cfg: ModelConfig, attn_implementation: str) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=None,
        attn_implementation=attn_implementation,
    )
    return LlamaForCausalLM(hf_cfg).eval()


def _matched_pair(family: str, attn_implementation: str) -> tuple[nn.Module, nn.Module]:
    if family == "gpt2":
        cfg = model_config("gpt-tiny")
        assert (cfg.norm_eps, cfg.activation, cfg.position, cfg.tie_embeddings) == (
            1e-5,
            "gelu",
            "learned",
            True,
        )
        hf = _hf_gpt2(cfg, attn_implementation)
        _randomize(hf, seed=0)
        # HF ties lm_head to wte: the randomized wte is the head on both sides.
        state = _gpt2_to_tandem(hf.state_dict(), cfg.num_layers, cfg.hidden_size)
    else:
        cfg = model_config("llama-tiny")
        assert (cfg.norm_eps, cfg.rope_theta, cfg.kv_heads, cfg.bias) == (1e-6, 10000.0, 2, False)
        hf = _hf_llama(cfg, attn_implementation)
        _randomize(hf, seed=0)
        state = _llama_to_tandem(hf.state_dict(), cfg.num_layers)
    ours = GPT(cfg).eval()
    ours.load_state_dict(state, strict=True)  # every Tandem parameter is set, none left over
    return hf, ours


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_logits_match_hugging_face(family: str, attn_implementation: str):
    hf, ours = _matched_pair(family, attn_implementation)
    ids = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf(input_ids=ids).logits
        got = ours(ids)
    assert want.abs().max() > 1.0  # the randomized weights give O(1) logits: the tolerance is meaningful
    torch.testing.assert_close(got, want, **HF_TOL)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_padded_logits_match_hugging_face(family: str):
    """Right padding: the real tokens' logits do not depend on what sits in the padded tail."""
    hf, ours = _matched_pair(family, "eager")
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 25:] = 0
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], **HF_TOL)


# ----------------------------------------------------------------------------- activation checkpointing


@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("preset", ["gpt-tiny", "llama-tiny"])
def test_activation_checkpointing_changes_nothing(preset: str, mode: str):
    cfg = model_config(preset, "model.dropout=0.1")  # dropout on: recompute must replay the same RNG
    torch.manual_seed(0)
    plain = GPT(cfg).train()
    wrapped = GPT(cfg).train()
    wrapped.load_state_dict(plain.state_dict())
    keys = list(plain.state_dict())

    # full: one wrapper per block; selective: one per attention core (GPT blocks have self-attention only)
    assert apply_activation_checkpointing(wrapped, mode) == cfg.num_layers
    assert list(wrapped.state_dict()) == keys

    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(ids, -1, dims=1)
    losses = []
    for model in (plain, wrapped):
        torch.manual_seed(123)
        loss = F.cross_entropy(model(ids).flatten(0, 1), labels.flatten())
        loss.backward()
        losses.append(loss)
    # Same ops on the same numbers in the same order, recompute included (CPU kernels are
    # deterministic and checkpoint restores the RNG state): bitwise equality is expected.
    assert torch.equal(losses[0], losses[1])
    strip = "._checkpoint_wrapped_module"
    grads = {n.replace(strip, ""): p.grad for n, p in wrapped.named_parameters()}
    for name, p in plain.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, grads[name]), name


def test_activation_checkpointing_wraps_both_stacks_of_an_encoder_decoder():
    cfg = model_config("t5-tiny")
    model = build_model(cfg)
    assert apply_activation_checkpointing(model, "full") == cfg.num_layers + cfg.decoder_layers
    # one self-attention per block, plus the decoder's cross-attention
    assert (
        apply_activation_checkpointing(build_model(cfg), "selective")
        == cfg.num_layers + 2 * cfg.decoder_layers
    )


def test_compile_marks_every_block_and_keeps_the_state_dict():
    """train.compile=blocks compiles each block of both T5 stacks in place, inside a full-checkpointing
    wrapper too, and renames nothing (checkpoints written compiled load eagerly and back). Compilation
    itself is lazy: tests/integration/test_compile.py trains with it."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    from parallel.parallelize import apply_compile

    cfg = model_config("t5-tiny")
    model = build_model(cfg)
    keys = list(model.state_dict())
    assert apply_activation_checkpointing(model, "full") == cfg.num_layers + cfg.decoder_layers
    assert apply_compile(model, "none") == 0
    assert apply_compile(model, "blocks") == cfg.num_layers + cfg.decoder_layers
    assert list(model.state_dict()) == keys
    for blocks in (model.encoder_blocks, model.decoder_blocks):
        for block in blocks:
            assert isinstance(block, CheckpointWrapper)
            assert block._checkpoint_wrapped_module._compiled_call_impl is not None
    assert all(m._compiled_call_impl is None for m in model.modules() if not hasattr(m, "attn"))
    with pytest.raises(ValueError, match=r"train\.compile=.model."):
        apply_compile(model, "model")


@pytest.mark.parametrize("preset", ["gpt-tiny", "llama-tiny", "bert-tiny", "t5-tiny"])
def test_compiled_blocks_trace_whole_on_the_sdpa_path(preset: str):
    """Every block traces into one graph (fullgraph=True raises at a graph break) in training and in
    evaluation, padding masks and T5's bias objects included, and computes what the eager block computes
    (backend="eager": TorchDynamo's tracing only, no Inductor, so this is cheap; the compiled numerics are
    tests/integration/test_compile.py's)."""
    import torch._dynamo

    from parallel.parallelize import apply_compile

    cfg = model_config(preset)
    torch.manual_seed(0)
    eager = build_model(cfg)
    compiled = build_model(cfg)
    compiled.load_state_dict(eager.state_dict())
    apply_compile(compiled, "blocks", backend="eager", fullgraph=True)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    inputs: dict[str, torch.Tensor] = {"input_ids": ids}
    if cfg.family in ("bert", "t5"):
        inputs["attention_mask"] = torch.ones_like(ids, dtype=torch.bool)
        inputs["attention_mask"][1, 12:] = False
    if cfg.family == "t5":
        inputs["decoder_input_ids"] = ids[:, :8]
    torch._dynamo.reset()
    for train in (True, False):
        eager.train(train)
        compiled.train(train)
        torch.testing.assert_close(compiled(**inputs), eager(**inputs), rtol=0, atol=0)


@pytest.mark.parametrize("preset", ["gpt-tiny", "llama-tiny"])
def test_incremental_decoding_with_the_cache_matches_the_full_forward(preset: str):
    """Feeding a prompt then one token at a time through the key/value cache gives the logits of one full
    forward pass (fp32; the cached path sums the same products in another order: ~1e-7, 1e-5 bound)."""
    model = build_model(model_config(preset)).eval()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        steps = [model(ids[:, :5], cache=cache)] + [
            model(ids[:, i : i + 1], cache=cache) for i in range(5, 12)
        ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache[0].self_attn.length == 12
