"""Getting models out of Tandem: `load_model` from a checkpoint, and export to Hugging Face `transformers`
directories (config.json + model.safetensors + the sentencepiece tokenizer) or to one framework-neutral
safetensors file.

Each family maps to the `transformers` class whose math it reproduces: GPT-2 style GPT -> GPT2LMHeadModel,
Llama-style GPT (RMSNorm, SwiGLU, RoPE) -> LlamaForCausalLM, BERT -> BertForMaskedLM, T5 ->
T5ForConditionalGeneration, BART -> BartForConditionalGeneration. Export refuses a configuration the target class cannot express, naming the
options, rather than writing a model that would produce different logits.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from torch import nn

from pretrain.config import Config, ModelConfig, config_from_dict
from pretrain.models import build_model

# ----------------------------------------------------------------------------- loading


def _checkpoint_config(checkpoint: Path) -> Config:
    path = checkpoint / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint}: no config.yaml; not a Tandem checkpoint directory")
    with open(path, encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    return config_from_dict(raw, validate=False, source=str(path))


def checkpoint_state_dict(checkpoint: str | Path) -> tuple[dict[str, torch.Tensor], Config]:
    """Full fp32 (or saved-precision) model weights of a checkpoint, without the training wrapper's prefix."""
    checkpoint = Path(checkpoint)
    cfg = _checkpoint_config(checkpoint)
    meta = json.loads((checkpoint / "meta.json").read_text(encoding="utf-8"))
    layout = meta.get("layout") or {}
    if layout.get("tp", 1) > 1 or layout.get("pp", 1) > 1:
        # One module file per TP rank holding its shards: concatenate them along the plan's split dims.
        from pretrain.consolidate import consolidate_tensor_parallel

        state = consolidate_tensor_parallel(checkpoint, cfg.model)
        return {k: v.float() for k, v in state.items()}, cfg
    zero = int(layout.get("zero", cfg.parallel.zero_stage))  # the stage DeepSpeed wrote (parallel.zero)
    if (zero >= 1 and cfg.train.precision != "fp32") or zero == 3:
        # The module file holds low-precision or partitioned weights: consolidate the fp32 masters.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    else:
        files = sorted(checkpoint.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise FileNotFoundError(
                f"{checkpoint}: no mp_rank_*_model_states.pt (layout {meta.get('layout')})"
            )
        state = torch.load(files[0], map_location="cpu", weights_only=True)["module"]
        # Switch MoE layers (DeepSpeed): every expert's weights sit in a file of their own, under the
        # expert's global index, whichever expert-parallel rank held it.
        for expert_file in sorted(checkpoint.glob("layer_*_expert_*_model_states.pt")):
            state.update(torch.load(expert_file, map_location="cpu", weights_only=True))
    prefix = "model."
    return {k[len(prefix) :] if k.startswith(prefix) else k: v.float() for k, v in state.items()}, cfg


def load_model(checkpoint: str | Path) -> tuple[nn.Module, Config]:
    """The model of a checkpoint on CPU in eval mode, and its resolved config.

    `model(input_ids, attention_mask=None)` returns logits for GPT and BERT;
    `model(input_ids, decoder_input_ids=..., attention_mask=None)` for T5."""
    state, cfg = checkpoint_state_dict(checkpoint)
    # A distilled student loads on its own: its teacher is needed for training only.
    model = build_model(dataclasses.replace(cfg.model, teacher_checkpoint=""))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"{checkpoint}: weights do not fit the config: missing {missing}, unexpected {unexpected}"
        )
    return model.eval(), cfg


# ----------------------------------------------------------------------------- mappings


class ExportError(ValueError):
    pass


def _require(cfg: ModelConfig, target: str, rules: dict[str, tuple[object, object]]) -> None:
    """rules: option -> (actual, required); one error listing every option the target cannot express."""
    bad = [f"model.{k}={a!r} (needs {r!r})" for k, (a, r) in rules.items() if a != r]
    if bad:
        raise ExportError(f"cannot export to {target}: " + ", ".join(bad))


def _plain_decoder(cfg: ModelConfig) -> dict[str, tuple[object, object]]:
    """Rules every Hugging Face decoder target shares: sequential blocks, dense attention everywhere."""
    return {
        "parallel_block": (cfg.parallel_block, False),
        "local_attention_window": (cfg.local_attention_window, 0),
    }


def _gpt2(cfg: ModelConfig, sd: dict[str, torch.Tensor]):
    from transformers import GPT2Config

    _require(
        cfg,
        "GPT2LMHeadModel",
        {
            **_plain_decoder(cfg),
            "norm": (cfg.norm, "layernorm"),
            "position": (cfg.position, "learned"),
            "bias": (cfg.bias, True),
            "tie_embeddings": (cfg.tie_embeddings, True),
            "num_kv_heads": (cfg.kv_heads, cfg.num_heads),
            "attention_head_dim": (cfg.head_dim, cfg.hidden_size // cfg.num_heads),
        },
    )
    act = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}.get(cfg.activation)
    if act is None:
        raise ExportError(f"cannot export to GPT2LMHeadModel: model.activation={cfg.activation!r}")
    hf = GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.max_seq_len,
        n_embd=cfg.hidden_size,
        n_layer=cfg.num_layers,
        n_head=cfg.num_heads,
        n_inner=cfg.ffn_size,
        activation_function=act,
        layer_norm_epsilon=cfg.norm_eps,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=3,
    )
    out = {
        "transformer.wte.weight": sd["embed.weight"],
        "transformer.wpe.weight": sd["pos_embed.weight"],
        "transformer.ln_f.weight": sd["final_norm.weight"],
        "transformer.ln_f.bias": sd["final_norm.bias"],
    }
    for i in range(cfg.num_layers):
        src, dst = f"blocks.{i}.", f"transformer.h.{i}."
        # GPT-2's Conv1D stores (in, out): transpose nn.Linear's (out, in); q, k, v are fused as c_attn.
        qkv = [sd[f"{src}attn.{n}_proj.weight"] for n in "qkv"]
        out[dst + "attn.c_attn.weight"] = torch.cat(qkv, 0).t()
        out[dst + "attn.c_attn.bias"] = torch.cat([sd[f"{src}attn.{n}_proj.bias"] for n in "qkv"])
        for ours, theirs in (
            ("attn.o_proj", "attn.c_proj"),
            ("mlp.up_proj", "mlp.c_fc"),
            ("mlp.down_proj", "mlp.c_proj"),
        ):
            out[f"{dst}{theirs}.weight"] = sd[f"{src}{ours}.weight"].t()
            out[f"{dst}{theirs}.bias"] = sd[f"{src}{ours}.bias"]
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            out[f"{dst}{theirs}.weight"] = sd[f"{src}{ours}.weight"]
            out[f"{dst}{theirs}.bias"] = sd[f"{src}{ours}.bias"]
    return hf, out, "GPT2LMHeadModel"


def _opt(cfg: ModelConfig, sd: dict[str, torch.Tensor]):
    """OPT (Zhang et al. 2022): GPT-2's block with ReLU, separate q/k/v, and a position table whose first
    two rows are never used (fairseq's padding offset: position p reads row p + 2)."""
    from transformers import OPTConfig

    _require(
        cfg,
        "OPTForCausalLM",
        {
            **_plain_decoder(cfg),
            "norm": (cfg.norm, "layernorm"),
            "position": (cfg.position, "learned"),
            "activation": (cfg.activation, "relu"),
            "bias": (cfg.bias, True),
            "tie_embeddings": (cfg.tie_embeddings, True),
            "num_kv_heads": (cfg.kv_heads, cfg.num_heads),
            "attention_head_dim": (cfg.head_dim, cfg.hidden_size // cfg.num_heads),
        },
    )
    hf = OPTConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        ffn_dim=cfg.ffn_size,
        num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_seq_len,
        do_layer_norm_before=True,
        word_embed_proj_dim=cfg.hidden_size,
        activation_function="relu",
        enable_bias=True,
        layer_norm_elementwise_affine=True,
        dropout=cfg.dropout,
        attention_dropout=cfg.dropout,
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    pos = sd["pos_embed.weight"]
    out = {
        "model.decoder.embed_tokens.weight": sd["embed.weight"],
        "model.decoder.embed_positions.weight": torch.cat([torch.zeros_like(pos[:2]), pos]),
        "model.decoder.final_layer_norm.weight": sd["final_norm.weight"],
        "model.decoder.final_layer_norm.bias": sd["final_norm.bias"],
    }
    names = {
        "attn.q_proj": "self_attn.q_proj",
        "attn.k_proj": "self_attn.k_proj",
        "attn.v_proj": "self_attn.v_proj",
        "attn.o_proj": "self_attn.out_proj",
        "attn_norm": "self_attn_layer_norm",
        "mlp.up_proj": "fc1",
        "mlp.down_proj": "fc2",
        "mlp_norm": "final_layer_norm",
    }
    for i in range(cfg.num_layers):
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                out[f"model.decoder.layers.{i}.{theirs}.{kind}"] = sd[f"blocks.{i}.{ours}.{kind}"]
    return hf, out, "OPTForCausalLM"


def _llama(cfg: ModelConfig, sd: dict[str, torch.Tensor]):
    from transformers import LlamaConfig

    _require(
        cfg,
        "LlamaForCausalLM",
        {
            **_plain_decoder(cfg),
            "norm": (cfg.norm, "rmsnorm"),
            "position": (cfg.position, "rope"),
            "activation": (cfg.activation, "swiglu"),
        },
    )
    hf = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        hidden_act="silu",
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        attention_bias=cfg.bias,
        mlp_bias=cfg.bias,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_dropout=cfg.dropout,
    )
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["final_norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    names = {
        "attn.q_proj": "self_attn.q_proj",
        "attn.k_proj": "self_attn.k_proj",
        "attn.v_proj": "self_attn.v_proj",
        "attn.o_proj": "self_attn.o_proj",
        "mlp.gate_proj": "mlp.gate_proj",
        "mlp.up_proj": "mlp.up_proj",
        "mlp.down_proj": "mlp.down_proj",
        "attn_norm": "input_layernorm",
        "mlp_norm": "post_attention_layernorm",
    }
    for i in range(cfg.num_layers):
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                key = f"blocks.{i}.{ours}.{kind}"
                if key in sd:
                    out[f"model.layers.{i}.{theirs}.{kind}"] = sd[key]
    return hf, out, "LlamaForCausalLM"


_BERT_LAYER_NAMES = {
    "attn.q_proj": "attention.self.query",
    "attn.k_proj": "attention.self.key",
    "attn.v_proj": "attention.self.value",
    "attn.o_proj": "attention.output.dense",
    "attn_norm": "attention.output.LayerNorm",
    "mlp.up_proj": "intermediate.dense",
    "mlp.down_proj": "output.dense",
    "mlp_norm": "output.LayerNorm",
}


def _bert_layers(cfg: ModelConfig, sd: dict[str, torch.Tensor], theirs: str, *, ours: str = "") -> dict:
    """The encoder blocks of a BERT-shaped Tandem model under transformers' BertLayer names
    (`theirs` + "{i}.attention.self.query.weight", ...); `ours` prefixes Tandem's keys."""
    out = {}
    for i in range(cfg.num_layers):
        for our_name, their_name in _BERT_LAYER_NAMES.items():
            for kind in ("weight", "bias"):
                out[f"{theirs}{i}.{their_name}.{kind}"] = sd[f"{ours}blocks.{i}.{our_name}.{kind}"]
    return out


def _bert_encoder_rules(cfg: ModelConfig) -> dict[str, tuple[object, object]]:
    """Rules every transformers BERT-shaped encoder target shares: post-norm LayerNorm blocks with biases
    and plain multi-head attention."""
    return {
        "norm": (cfg.norm, "layernorm"),
        "norm_position": (cfg.norm_position, "post"),
        "bias": (cfg.bias, True),
        "num_kv_heads": (cfg.kv_heads, cfg.num_heads),
        "attention_head_dim": (cfg.head_dim, cfg.hidden_size // cfg.num_heads),
    }


def _bert_embeddings(
    sd: dict[str, torch.Tensor],
    theirs: str,
    *,
    width: int,
    ours: str = "",
    positions: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """transformers' `*.embeddings.` entries (word, position, token type, LayerNorm) under prefix `theirs`,
    and the number of token types. A model without segment embeddings gets one all-zero type row of
    `width`, which reproduces it exactly; `positions` replaces Tandem's position table when given."""
    types = sd.get(ours + "type_embed.weight")
    if types is None:
        types = torch.zeros(1, width)
    out = {
        theirs + "word_embeddings.weight": sd[ours + "embed.weight"],
        theirs + "position_embeddings.weight": sd[ours + "pos_embed.weight"]
        if positions is None
        else positions,
        theirs + "token_type_embeddings.weight": types,
        theirs + "LayerNorm.weight": sd[ours + "embed_norm.weight"],
        theirs + "LayerNorm.bias": sd[ours + "embed_norm.bias"],
    }
    return out, types.shape[0]


def _bert(cfg: ModelConfig, sd: dict[str, torch.Tensor]):
    from transformers import BertConfig

    _require(
        cfg,
        "BertForMaskedLM",
        {
            **_bert_encoder_rules(cfg),
            "position": (cfg.position, "learned"),
            "activation": (cfg.activation, "gelu"),
            "tie_embeddings": (cfg.tie_embeddings, True),
        },
    )
    out, num_types = _bert_embeddings(sd, "bert.embeddings.", width=cfg.hidden_size)
    hf = BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.ffn_size,
        hidden_act="gelu",
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        max_position_embeddings=cfg.max_seq_len,
        type_vocab_size=num_types,
        layer_norm_eps=cfg.norm_eps,
        tie_word_embeddings=True,
    )
    out |= {
        "cls.predictions.transform.dense.weight": sd["mlm_dense.weight"],
        "cls.predictions.transform.dense.bias": sd["mlm_dense.bias"],
        "cls.predictions.transform.LayerNorm.weight": sd["mlm_norm.weight"],
        "cls.predictions.transform.LayerNorm.bias": sd["mlm_norm.bias"],
        "cls.predictions.bias": sd["mlm_bias"],
        "cls.predictions.decoder.weight": sd["embed.weight"],
        "cls.predictions.decoder.bias": sd["mlm_bias"],
    }
    out.update(_bert_layers(cfg, sd, "bert.encoder.layer."))
    return hf, out, "BertForMaskedLM"


def _t5(cfg: ModelConfig, sd: dict[str, torch.Tensor]):
    from transformers import T5Config

    _require(
        cfg,
        "T5ForConditionalGeneration",
        {
            "norm": (cfg.norm, "rmsnorm"),
            "bias": (cfg.bias, False),
            "norm_position": (cfg.norm_position, "pre"),
            "num_kv_heads": (cfg.kv_heads, cfg.num_heads),
        },
    )
    ff = {"relu": "relu", "geglu": "gated-gelu", "gelu": None}.get(cfg.activation)
    if ff is None:
        raise ExportError(
            f"cannot export to T5ForConditionalGeneration: model.activation={cfg.activation!r} "
            "(needs relu or geglu)"
        )
    hf = T5Config(  # type: ignore[call-arg]
        vocab_size=cfg.vocab_size,
        d_model=cfg.hidden_size,
        d_kv=cfg.head_dim,
        d_ff=cfg.ffn_size,
        num_layers=cfg.num_layers,
        num_decoder_layers=cfg.decoder_layers,
        num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.relative_buckets,
        relative_attention_max_distance=cfg.relative_max_distance,
        dropout_rate=cfg.dropout,
        layer_norm_epsilon=cfg.norm_eps,
        feed_forward_proj=ff,
        tie_word_embeddings=cfg.tie_embeddings,
        pad_token_id=0,
        eos_token_id=3,
        decoder_start_token_id=0,
    )
    out = {
        "shared.weight": sd["embed.weight"],
        "encoder.embed_tokens.weight": sd["embed.weight"],
        "decoder.embed_tokens.weight": sd["embed.weight"],
        "encoder.final_layer_norm.weight": sd["encoder_norm.weight"],
        "decoder.final_layer_norm.weight": sd["decoder_norm.weight"],
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": sd[
            "encoder_bias.table.weight"
        ],
        "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": sd[
            "decoder_bias.table.weight"
        ],
    }
    out["lm_head.weight"] = sd["embed.weight"] if cfg.tie_embeddings else sd["lm_head.weight"]
    mlp = ({"mlp.gate_proj": "wi_0", "mlp.up_proj": "wi_1"} if cfg.gated else {"mlp.up_proj": "wi"}) | {
        "mlp.down_proj": "wo"
    }

    def attn(src: str, dst: str) -> None:
        for n in "qkvo":
            out[f"{dst}.{n}.weight"] = sd[f"{src}.{n}_proj.weight"]

    for stack, n_layers, prefix in (
        ("encoder", cfg.num_layers, "encoder_blocks"),
        ("decoder", cfg.decoder_layers, "decoder_blocks"),
    ):
        for i in range(n_layers):
            src, dst = f"{prefix}.{i}.", f"{stack}.block.{i}.layer."
            attn(src + "attn", dst + "0.SelfAttention")
            out[dst + "0.layer_norm.weight"] = sd[src + "attn_norm.weight"]
            ff_layer = 1
            if stack == "decoder":
                attn(src + "cross_attn", dst + "1.EncDecAttention")
                out[dst + "1.layer_norm.weight"] = sd[src + "cross_norm.weight"]
                ff_layer = 2
            for ours, theirs in mlp.items():
                out[f"{dst}{ff_layer}.DenseReluDense.{theirs}.weight"] = sd[f"{src}{ours}.weight"]
            out[f"{dst}{ff_layer}.layer_norm.weight"] = sd[src + "mlp_norm.weight"]
    return hf, out, "T5ForConditionalGeneration"


def _roberta(cfg: ModelConfig, sd: dict[str, torch.Tensor], *, pad_id: int = 0):
    """BERT with `position_offset` -> RobertaForMaskedLM (no pooler). transformers numbers the positions of
    non-padding tokens from pad_token_id + 1 (fairseq), Tandem's from `position_offset`: the table is
    re-based so position i reads the same row in both, for any pad id (equal rows when they agree)."""
    from transformers import RobertaConfig

    _require(
        cfg,
        "RobertaForMaskedLM",
        {
            **_bert_encoder_rules(cfg),
            "activation": (cfg.activation, "gelu"),
            "tie_embeddings": (cfg.tie_embeddings, True),
            "embedding_size": (cfg.embed_size, cfg.hidden_size),
            "share_layers": (cfg.share_layers, "none"),
        },
    )
    table, offset = sd["pos_embed.weight"], cfg.position_offset
    # Rows before position 0: only padding tokens read them (their outputs are masked out everywhere).
    before = table[:offset] if offset == pad_id + 1 else torch.zeros(pad_id + 1, table.shape[1])
    positions = torch.cat([before, table[offset:]])  # (pad_id + 1 + max_seq_len, C)
    out, num_types = _bert_embeddings(sd, "roberta.embeddings.", width=cfg.hidden_size, positions=positions)
    hf = RobertaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.ffn_size,
        hidden_act="gelu",
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        max_position_embeddings=positions.shape[0],
        type_vocab_size=num_types,
        layer_norm_eps=cfg.norm_eps,
        pad_token_id=pad_id,
        tie_word_embeddings=True,
    )
    out |= {
        "lm_head.dense.weight": sd["mlm_dense.weight"],
        "lm_head.dense.bias": sd["mlm_dense.bias"],
        "lm_head.layer_norm.weight": sd["mlm_norm.weight"],
        "lm_head.layer_norm.bias": sd["mlm_norm.bias"],
        "lm_head.bias": sd["mlm_bias"],
        "lm_head.decoder.weight": sd["embed.weight"],
        "lm_head.decoder.bias": sd["mlm_bias"],
    }
    out.update(_bert_layers(cfg, sd, "roberta.encoder.layer."))
    return hf, out, "RobertaForMaskedLM"


def _albert(cfg: ModelConfig, sd: dict[str, torch.Tensor]):
    """BERT with ALBERT's options -> AlbertForPreTraining (with the sentence-order head of objective sop)
    or AlbertForMaskedLM (without it). Unshared layers become one transformers layer group per layer."""
    from transformers import AlbertConfig

    _require(
        cfg,
        "AlbertForPreTraining",
        {
            **_bert_encoder_rules(cfg),
            "position": (cfg.position, "learned"),
            "tie_embeddings": (cfg.tie_embeddings, True),
            "position_offset": (cfg.position_offset, 0),
        },
    )
    act = {"gelu": "gelu", "gelu_tanh": "gelu_new"}.get(cfg.activation)
    if act is None:
        raise ExportError(f"cannot export to AlbertForPreTraining: model.activation={cfg.activation!r}")
    if cfg.share_layers not in ("none", "all"):
        raise ExportError(
            f"cannot export to AlbertForPreTraining: model.share_layers={cfg.share_layers!r} "
            "(transformers shares whole layers: needs 'none' or 'all')"
        )
    a = "albert."
    out, num_types = _bert_embeddings(sd, a + "embeddings.", width=cfg.embed_size)
    groups = 1 if cfg.share_layers == "all" else cfg.num_layers
    hf = AlbertConfig(
        vocab_size=cfg.vocab_size,
        embedding_size=cfg.embed_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_hidden_groups=groups,
        inner_group_num=1,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.ffn_size,
        hidden_act=act,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        classifier_dropout_prob=cfg.dropout,
        max_position_embeddings=cfg.max_seq_len,
        type_vocab_size=num_types,
        layer_norm_eps=cfg.norm_eps,
        tie_word_embeddings=True,
    )
    if "embed_proj.weight" in sd:
        proj_w, proj_b = sd["embed_proj.weight"], sd["embed_proj.bias"]
    else:  # E == H: transformers always projects; the identity keeps the embeddings as they are
        proj_w, proj_b = torch.eye(cfg.hidden_size), torch.zeros(cfg.hidden_size)
    out |= {
        a + "encoder.embedding_hidden_mapping_in.weight": proj_w,
        a + "encoder.embedding_hidden_mapping_in.bias": proj_b,
        "predictions.dense.weight": sd["mlm_dense.weight"],
        "predictions.dense.bias": sd["mlm_dense.bias"],
        "predictions.LayerNorm.weight": sd["mlm_norm.weight"],
        "predictions.LayerNorm.bias": sd["mlm_norm.bias"],
        "predictions.bias": sd["mlm_bias"],
        "predictions.decoder.weight": sd["embed.weight"],
        "predictions.decoder.bias": sd["mlm_bias"],
    }
    names = {
        "attn.q_proj": "attention.query",
        "attn.k_proj": "attention.key",
        "attn.v_proj": "attention.value",
        "attn.o_proj": "attention.dense",
        "attn_norm": "attention.LayerNorm",
        "mlp.up_proj": "ffn",
        "mlp.down_proj": "ffn_output",
        "mlp_norm": "full_layer_layer_norm",
    }
    for g in range(groups):
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                out[f"{a}encoder.albert_layer_groups.{g}.albert_layers.0.{theirs}.{kind}"] = sd[
                    f"blocks.{g}.{ours}.{kind}"
                ]
    if "sop_head.weight" not in sd:
        return hf, out, "AlbertForMaskedLM"
    out |= {
        a + "pooler.weight": sd["pooler.weight"],
        a + "pooler.bias": sd["pooler.bias"],
        "sop_classifier.classifier.weight": sd["sop_head.weight"],
        "sop_classifier.classifier.bias": sd["sop_head.bias"],
    }
    return hf, out, "AlbertForPreTraining"


def _electra(cfg: ModelConfig, sd: dict[str, torch.Tensor]):
    """ELECTRA's discriminator (pretrain/models/electra.py) -> ElectraForPreTraining; the generator stays."""
    from transformers import ElectraConfig

    _require(
        cfg,
        "ElectraForPreTraining",
        {
            **_bert_encoder_rules(cfg),
            "position_offset": (cfg.position_offset, 0),
            "position": (cfg.position, "learned"),
            "activation": (cfg.activation, "gelu"),
            "share_layers": (cfg.share_layers, "none"),
        },
    )
    d = "discriminator."
    out, num_types = _bert_embeddings(sd, "electra.embeddings.", width=cfg.embed_size, ours=d)
    hf = ElectraConfig(
        vocab_size=cfg.vocab_size,
        embedding_size=cfg.embed_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.ffn_size,
        hidden_act="gelu",
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        max_position_embeddings=cfg.max_seq_len,
        type_vocab_size=num_types,
        layer_norm_eps=cfg.norm_eps,
    )
    out |= {
        "discriminator_predictions.dense.weight": sd["rtd_dense.weight"],
        "discriminator_predictions.dense.bias": sd["rtd_dense.bias"],
        "discriminator_predictions.dense_prediction.weight": sd["rtd_out.weight"],
        "discriminator_predictions.dense_prediction.bias": sd["rtd_out.bias"],
    }
    if cfg.embed_size != cfg.hidden_size:
        out["electra.embeddings_project.weight"] = sd[d + "embed_proj.weight"]
        out["electra.embeddings_project.bias"] = sd[d + "embed_proj.bias"]
    out.update(_bert_layers(cfg, sd, "electra.encoder.layer.", ours=d))
    return hf, out, "ElectraForPreTraining"


def _distilbert(cfg: ModelConfig, sd: dict[str, torch.Tensor]):
    """DistilBERT's student (pretrain/models/distill.py) -> DistilBertForMaskedLM."""
    from transformers import DistilBertConfig

    _require(
        cfg,
        "DistilBertForMaskedLM",
        {
            **_bert_encoder_rules(cfg),
            "position_offset": (cfg.position_offset, 0),
            "norm_eps": (cfg.norm_eps, 1e-12),  # DistilBERT's LayerNorms hard-code eps 1e-12
            "position": (cfg.position, "learned"),
            "activation": (cfg.activation, "gelu"),
            "tie_embeddings": (cfg.tie_embeddings, True),
            "type_vocab_size": (cfg.type_vocab_size, 0),
            "embedding_size": (cfg.embed_size, cfg.hidden_size),
            "share_layers": (cfg.share_layers, "none"),
        },
    )
    hf = DistilBertConfig(
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_seq_len,
        sinusoidal_pos_embds=False,
        n_layers=cfg.num_layers,
        n_heads=cfg.num_heads,
        dim=cfg.hidden_size,
        hidden_dim=cfg.ffn_size,
        dropout=cfg.dropout,
        attention_dropout=cfg.dropout,
        activation="gelu",
        tie_word_embeddings=True,
    )
    e = "distilbert.embeddings."
    out = {
        e + "word_embeddings.weight": sd["embed.weight"],
        e + "position_embeddings.weight": sd["pos_embed.weight"],
        e + "LayerNorm.weight": sd["embed_norm.weight"],
        e + "LayerNorm.bias": sd["embed_norm.bias"],
        "vocab_transform.weight": sd["mlm_dense.weight"],
        "vocab_transform.bias": sd["mlm_dense.bias"],
        "vocab_layer_norm.weight": sd["mlm_norm.weight"],
        "vocab_layer_norm.bias": sd["mlm_norm.bias"],
        "vocab_projector.weight": sd["embed.weight"],
        "vocab_projector.bias": sd["mlm_bias"],
    }
    names = {
        "attn.q_proj": "attention.q_lin",
        "attn.k_proj": "attention.k_lin",
        "attn.v_proj": "attention.v_lin",
        "attn.o_proj": "attention.out_lin",
        "attn_norm": "sa_layer_norm",
        "mlp.up_proj": "ffn.lin1",
        "mlp.down_proj": "ffn.lin2",
        "mlp_norm": "output_layer_norm",
    }
    for i in range(cfg.num_layers):
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                out[f"distilbert.transformer.layer.{i}.{theirs}.{kind}"] = sd[f"blocks.{i}.{ours}.{kind}"]
    return hf, out, "DistilBertForMaskedLM"


def _switch(cfg: ModelConfig, sd: dict[str, torch.Tensor]):
    """T5 with Switch MoE layers -> SwitchTransformersForConditionalGeneration: the T5 mapping for the
    shared parts, then HF's names for the dense FFNs (`mlp.wi/wo`), routers and experts.

    Tandem's capacity is a factor per micro batch (DeepSpeed); HF's router has a fixed `expert_capacity`
    per sequence. The export sets it to model.max_seq_len, so the exported model never drops a token
    (HF applies no capacity in inference otherwise), and turns HF's router jitter off (Tandem has none)."""
    from transformers import SwitchTransformersConfig

    target = "SwitchTransformersForConditionalGeneration"
    if cfg.family != "t5":
        raise ExportError(
            f"cannot export model.family={cfg.family!r} with model.num_experts={cfg.num_experts}: transformers "
            f"has an MoE class for the T5 variant only ({target})"
        )
    act = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new"}.get(cfg.activation)
    if act is None:
        raise ExportError(
            f"cannot export to {target}: model.activation={cfg.activation!r} (needs relu or gelu)"
        )
    for name, layers in (("num_layers", cfg.num_layers), ("num_decoder_layers", cfg.decoder_layers)):
        if layers % cfg.moe_every:
            raise ExportError(
                f"cannot export to {target}: model.moe_every={cfg.moe_every} must divide model.{name}={layers} "
                "(HF places one sparse layer every num_layers // num_sparse_layers)"
            )
    dense_sd = dict(sd)
    moe: dict[str, str] = {}  # Tandem block prefix -> HF feed-forward layer prefix
    for stack, n_layers, prefix in (
        ("encoder", cfg.num_layers, "encoder_blocks"),
        ("decoder", cfg.decoder_layers, "decoder_blocks"),
    ):
        for i in range(n_layers):
            if cfg.is_moe_layer(i):
                src = f"{prefix}.{i}."
                experts = src + "mlp.moe.deepspeed_moe.experts.deepspeed_experts."
                if f"{experts}{cfg.num_experts - 1}.up_proj.weight" not in sd:
                    raise ExportError(
                        f"export to {target}: {src}mlp holds fewer than model.num_experts={cfg.num_experts} "
                        "experts (an expert-parallel shard); export a model with every expert"
                    )
                for name in ("up_proj", "down_proj"):  # placeholders so the dense T5 mapping runs
                    dense_sd[f"{src}mlp.{name}.weight"] = sd[f"{experts}0.{name}.weight"]
                moe[src] = f"{stack}.block.{i}.layer.{1 if stack == 'encoder' else 2}.mlp."
    _, t5_out, _ = _t5(cfg, dense_sd)  # the T5 mapping reads the shared options only
    out = {k.replace(".DenseReluDense.", ".mlp."): v for k, v in t5_out.items()}
    for src, dst in moe.items():
        del out[dst + "wi.weight"], out[dst + "wo.weight"]
        out[dst + "router.classifier.weight"] = sd[src + "mlp.moe.deepspeed_moe.gate.wg.weight"]
        for e in range(cfg.num_experts):
            expert = f"{src}mlp.moe.deepspeed_moe.experts.deepspeed_experts.{e}."
            out[f"{dst}experts.expert_{e}.wi.weight"] = sd[expert + "up_proj.weight"]
            out[f"{dst}experts.expert_{e}.wo.weight"] = sd[expert + "down_proj.weight"]
    hf = SwitchTransformersConfig(  # type: ignore[call-arg]
        vocab_size=cfg.vocab_size,
        d_model=cfg.hidden_size,
        d_kv=cfg.head_dim,
        d_ff=cfg.ffn_size,
        num_layers=cfg.num_layers,
        num_decoder_layers=cfg.decoder_layers,
        num_sparse_encoder_layers=cfg.num_layers // cfg.moe_every,
        num_sparse_decoder_layers=cfg.decoder_layers // cfg.moe_every,
        num_heads=cfg.num_heads,
        num_experts=cfg.num_experts,
        expert_capacity=cfg.max_seq_len,
        router_bias=False,
        router_jitter_noise=0.0,
        router_dtype="float32",
        router_aux_loss_coef=cfg.moe_aux_loss_coef,
        router_z_loss_coef=cfg.router_z_loss_coef,
        relative_attention_num_buckets=cfg.relative_buckets,
        relative_attention_max_distance=cfg.relative_max_distance,
        dropout_rate=cfg.dropout,
        layer_norm_epsilon=cfg.norm_eps,
        dense_act_fn=act,
        tie_word_embeddings=cfg.tie_embeddings,
        pad_token_id=0,
        eos_token_id=3,
        decoder_start_token_id=0,
    )
    return hf, out, target


def _bart(cfg: ModelConfig, sd: dict[str, torch.Tensor]):
    from transformers import BartConfig

    _require(
        cfg,
        "BartForConditionalGeneration",
        {
            "norm": (cfg.norm, "layernorm"),
            "norm_position": (cfg.norm_position, "post"),
            "position": (cfg.position, "learned"),
            "bias": (cfg.bias, True),
            "tie_embeddings": (cfg.tie_embeddings, True),
            "num_kv_heads": (cfg.kv_heads, cfg.num_heads),
            "attention_head_dim": (cfg.head_dim, cfg.hidden_size // cfg.num_heads),
            # transformers' BART LayerNorms use torch's default epsilon
            "norm_eps": (cfg.norm_eps, 1e-5),
        },
    )
    act = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}.get(cfg.activation)
    if act is None:
        raise ExportError(
            f"cannot export to BartForConditionalGeneration: model.activation={cfg.activation!r}"
        )
    hf = BartConfig(
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_seq_len,
        d_model=cfg.hidden_size,
        encoder_layers=cfg.num_layers,
        decoder_layers=cfg.decoder_layers,
        encoder_attention_heads=cfg.num_heads,
        decoder_attention_heads=cfg.num_heads,
        encoder_ffn_dim=cfg.ffn_size,
        decoder_ffn_dim=cfg.ffn_size,
        activation_function=act,
        dropout=cfg.dropout,
        attention_dropout=cfg.dropout,
        activation_dropout=0.0,
        scale_embedding=cfg.scale_embedding,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        decoder_start_token_id=3,  # the objective starts decoding from <eos>, as BART does
        forced_eos_token_id=3,
    )
    # transformers keeps two unused rows in front of each position table (fairseq's padding offset).
    offset = torch.zeros(2, cfg.hidden_size)
    out = {
        "model.shared.weight": sd["embed.weight"],
        "model.encoder.embed_tokens.weight": sd["embed.weight"],
        "model.decoder.embed_tokens.weight": sd["embed.weight"],
        "lm_head.weight": sd["embed.weight"],
        "final_logits_bias": sd["final_logits_bias"][None, :],
    }
    for stack in ("encoder", "decoder"):
        out[f"model.{stack}.embed_positions.weight"] = torch.cat([offset, sd[f"{stack}_pos.weight"]])
        for kind in ("weight", "bias"):
            out[f"model.{stack}.layernorm_embedding.{kind}"] = sd[f"{stack}_embed_norm.{kind}"]
    names = {
        "attn.q_proj": "self_attn.q_proj",
        "attn.k_proj": "self_attn.k_proj",
        "attn.v_proj": "self_attn.v_proj",
        "attn.o_proj": "self_attn.out_proj",
        "attn_norm": "self_attn_layer_norm",
        "cross_attn.q_proj": "encoder_attn.q_proj",
        "cross_attn.k_proj": "encoder_attn.k_proj",
        "cross_attn.v_proj": "encoder_attn.v_proj",
        "cross_attn.o_proj": "encoder_attn.out_proj",
        "cross_norm": "encoder_attn_layer_norm",
        "mlp.up_proj": "fc1",
        "mlp.down_proj": "fc2",
        "mlp_norm": "final_layer_norm",
    }
    for stack, n_layers in (("encoder", cfg.num_layers), ("decoder", cfg.decoder_layers)):
        for i in range(n_layers):
            for ours, theirs in names.items():
                if stack == "encoder" and ours.startswith("cross"):
                    continue
                for kind in ("weight", "bias"):
                    out[f"model.{stack}.layers.{i}.{theirs}.{kind}"] = sd[f"{stack}_blocks.{i}.{ours}.{kind}"]
    return hf, out, "BartForConditionalGeneration"


def hf_mapping(cfg: ModelConfig) -> Callable:
    if cfg.family == "bart":
        return _bart
    if cfg.num_experts:  # Switch Transformer (T5 with routed experts)
        return _switch
    if cfg.objective == "electra":
        return _electra
    if cfg.objective == "distill":
        return _distilbert
    if cfg.family == "bert":
        if cfg.position_offset:
            return _roberta
        albert = cfg.embed_size != cfg.hidden_size or cfg.share_layers != "none" or cfg.objective == "sop"
        return _albert if albert else _bert
    if cfg.family == "t5":
        return _t5
    if cfg.activation == "relu" and cfg.norm == "layernorm" and cfg.position == "learned":
        return _opt  # OPT is GPT-2's block with ReLU
    return _llama if cfg.norm == "rmsnorm" or cfg.position == "rope" or cfg.gated else _gpt2


# ----------------------------------------------------------------------------- writing


def _save_tokenizer(tokenizer_model: Path, out_dir: Path) -> None:
    """The sentencepiece model as transformers' sentencepiece-backed tokenizer (encodes exactly like spm)."""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    shutil.copyfile(tokenizer_model, out_dir / "tokenizer.model")
    tok = SentencePieceBackend(
        vocab_file=str(out_dir / "tokenizer.model"),
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<cls>",
        sep_token="<sep>",
        mask_token="<mask>",
    )
    tok.save_pretrained(str(out_dir))


def export_hf(
    model: nn.Module,
    cfg: ModelConfig,
    out_dir: str | Path,
    *,
    tokenizer_model: Path | None = None,
    special_ids: dict[str, int] | None = None,
) -> str:
    """Writes a directory `AutoModelFor...from_pretrained(out_dir)` loads. Returns the transformers class name."""
    import transformers
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    mapping = hf_mapping(cfg)
    if mapping is _roberta:  # its position table depends on the tokenizer's pad id
        pad_id = int({"pad_id": 0, **(special_ids or {})}["pad_id"])
        hf_config, weights, cls_name = _roberta(cfg, sd, pad_id=pad_id)
    else:
        hf_config, weights, cls_name = mapping(cfg, sd)
    # Tandem's tokenizer reserves fixed ids (data_pipeline/tokenizer.py); the manifest's record wins if given.
    for key, value in {"pad_id": 0, "bos_id": 2, "eos_id": 3, **(special_ids or {})}.items():
        if key in ("pad_id", "bos_id", "eos_id"):
            setattr(hf_config, key.replace("_id", "_token_id"), value)
    hf_config.architectures = [cls_name]
    # Build the real class once: it proves every tensor has a home and the right shape before anything is written.
    hf_model = getattr(transformers, cls_name)(hf_config)
    missing, unexpected = hf_model.load_state_dict(weights, strict=False)
    tied = set(getattr(hf_model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise ExportError(f"export to {cls_name}: missing {missing}, unexpected {unexpected}")
    hf_config.save_pretrained(str(out_dir))
    # Tied tensors share storage; safetensors stores each storage once, so write contiguous copies.
    save_file(
        {k: v.contiguous().clone() for k, v in weights.items()},
        str(out_dir / "model.safetensors"),
        metadata={"format": "pt", "producer": "tandem"},
    )
    if tokenizer_model is not None:
        _save_tokenizer(tokenizer_model, out_dir)
    return cls_name


def export_safetensors(model: nn.Module, cfg: Config, out_dir: str | Path) -> Path:
    """Tandem's own names, consolidated, plus the resolved config: framework-neutral weights."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().clone().cpu() for k, v in model.state_dict().items()}
    path = out_dir / "model.safetensors"
    save_file(sd, str(path), metadata={"format": "pt", "producer": "tandem", "family": cfg.model.family})
    from pretrain.config import save_config

    save_config(cfg, out_dir / "config.yaml")
    return path


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, fmt: str = "hf") -> str:
    model, cfg = load_model(checkpoint)
    if fmt == "safetensors":
        return str(export_safetensors(model, cfg, out_dir))
    tokenizer_model, special = None, None
    manifest_path = Path(cfg.data.shards) / "manifest.json"
    if manifest_path.is_file():
        tok = json.loads(manifest_path.read_text(encoding="utf-8"))["tokenizer"]
        special = {k: int(v) for k, v in tok.items() if k.endswith("_id")}
        if Path(tok["path"]).is_file():
            tokenizer_model = Path(tok["path"])
    if (Path(checkpoint) / "tokenizer.model").is_file():  # saved with the checkpoint: always the right one
        tokenizer_model = Path(checkpoint) / "tokenizer.model"
    return export_hf(model, cfg.model, out_dir, tokenizer_model=tokenizer_model, special_ids=special)
