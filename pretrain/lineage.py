"""The lineage registry: which published system each preset reproduces, and the paper's parameter count.

`PUBLISHED` maps a preset name (a file in configs/models/) to the system it reproduces, the paper, the
total parameter count the paper reports and a note on what Tandem implements or leaves out. The
count a preset actually builds is computed by `count_parameters`, which constructs the model on the
meta device through `pretrain.models.build_model` (so an objective's wrapper network counts too) and
sums the parameters: no memory is allocated, so even the 540B presets are counted in about a second.
tests/unit/test_lineage_*.py hold every entry within 2% of the paper; `docs/models.md` is generated
from this table (`pretrain info --table`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from pretrain.config import Config, ModelConfig, config_from_dict


class Published(NamedTuple):
    system: str  # the system's name as the paper writes it, e.g. "GPT-3 175B"
    paper: str  # short citation, e.g. "Brown et al. 2020, table 2.1"
    params: float  # total parameter count the paper reports
    note: str  # what Tandem implements (and what it does not)


_GPT3 = "Brown et al. 2020, table 2.1"
_GPT3_NOTE = (
    "GPT-2 blocks (pre-norm, GELU, learned positions, tied head); the band of the alternating locally "
    "banded layers is not published: dense unless model.local_attention_window is set"
)
_PALM = "Chowdhery et al. 2022, table 1"
_PALM_NOTE = (
    "parallel block, SwiGLU (4 d), multi-query attention, RoPE, no biases, tied embeddings, z-loss 1e-4"
)

# preset name -> the published system it reproduces. Add one line per preset (keep the groups).
PUBLISHED: dict[str, Published] = {
    # ---- Switch Transformer (MoE)
    "switch-base-8": Published(
        "Switch-Base 8 experts",
        "Fedus et al. 2021 (Switch-Base, sec. 2; released checkpoint google/switch-base-8)",
        620e6,
        "T5-Base with top-1 routed experts (8) on every other FFN of encoder and decoder, capacity factor, "
        "token dropping, load-balancing loss (alpha 0.01), optional router z-loss, router in fp32; expert "
        "parallelism through DeepSpeed MoE. The paper tabulates Switch-Base at 128 experts (7B); 620M is "
        "the 8-expert release's size",
    ),
    # ---- end of Switch Transformer
    # ---- decoder-only: GPT-3, OPT, MT-NLG, Gopher, Chinchilla, PaLM
    "gpt3-125m": Published("GPT-3 Small", _GPT3, 125e6, _GPT3_NOTE),
    "gpt3-350m": Published("GPT-3 Medium", _GPT3, 350e6, _GPT3_NOTE),
    "gpt3-760m": Published("GPT-3 Large", _GPT3, 760e6, _GPT3_NOTE),
    "gpt3-1.3b": Published(
        "GPT-3 XL", _GPT3, 1.3e9, _GPT3_NOTE + "; 16 heads of 128 (the table's 24 x 128 != 2048)"
    ),
    "gpt3-2.7b": Published("GPT-3 2.7B", _GPT3, 2.7e9, _GPT3_NOTE),
    "gpt3-6.7b": Published("GPT-3 6.7B", _GPT3, 6.7e9, _GPT3_NOTE),
    "gpt3-13b": Published("GPT-3 13B", _GPT3, 13.0e9, _GPT3_NOTE + "; d_model 5120 = 40 x 128 (table: 5140)"),
    "gpt3-175b": Published("GPT-3 175B", _GPT3, 175.0e9, _GPT3_NOTE),
    "opt-175b": Published(
        "OPT-175B",
        "Zhang et al. 2022, table 1",
        175e9,
        "GPT-3 shape with ReLU MLPs, learned positions, vocab 50272; exports to transformers' OPTForCausalLM",
    ),
    "mt-nlg-530b": Published(
        "MT-NLG 530B",
        "Smith et al. 2022, sec. 3.1",
        530e9,
        "GPT-3 architecture at 105 layers x 20480, 128 heads; dense attention",
    ),
    "gopher-280b": Published(
        "Gopher 280B",
        "Rae et al. 2021, table 1",
        280e9,
        "RMSNorm, Transformer-XL relative positions (per-layer W_R, u/v biases); biases and tying not stated: "
        "none, untied",
    ),
    "chinchilla-70b": Published(
        "Chinchilla 70B",
        "Hoffmann et al. 2022, table 4",
        70e9,
        "Gopher's architecture; AdamW and the tokenizer change are run/data settings",
    ),
    "palm-8b": Published("PaLM 8B", _PALM, 8.63e9, _PALM_NOTE),
    "palm-62b": Published("PaLM 62B", _PALM, 62.50e9, _PALM_NOTE),
    "palm-540b": Published("PaLM 540B", _PALM, 540.35e9, _PALM_NOTE),
    # ---- end of decoder-only
    # ---- BERT line: RoBERTa, ALBERT
    "roberta-base": Published(
        "RoBERTa-base",
        "Liu et al. 2019, table 9 + released model",
        125e6,
        "BERT without NSP, dynamic masking, FULL-SENTENCES packing, 50265 BPE vocab, 514 position rows",
    ),
    "roberta-large": Published(
        "RoBERTa-large",
        "Liu et al. 2019, table 9 + released model",
        355e6,
        "as roberta-base at BERT-large shape; recipe in configs/runs/roberta-large.yaml",
    ),
    "albert-base": Published(
        "ALBERT-base",
        "Lan et al. 2020, table 1",
        12e6,
        "factorized embedding E=128, all layers shared, SOP + plain (not n-gram) MLM",
    ),
    "albert-xxlarge": Published(
        "ALBERT-xxlarge",
        "Lan et al. 2020, table 1",
        235e6,
        "as albert-base at H=4096, 64 heads; the table's 235M is 5% above its shapes' 223.2M "
        "(transformers' AlbertForPreTraining counts 223.2M too)",
    ),
    # ---- end of BERT line
    # ---- ELECTRA, DistilBERT
    "electra-small": Published(
        "ELECTRA-Small",
        "Clark et al. 2020, table 1 (shape: table 6)",
        14e6,
        "the discriminator (generator 1/4 wide, sharing the embeddings, not counted); the paper rounds "
        "to whole millions: 13.55M, equal to transformers' ElectraForPreTraining",
    ),
    "electra-base": Published(
        "ELECTRA-Base",
        "Clark et al. 2020, table 8 (shape: table 6)",
        110e6,
        "the discriminator (generator 1/3 wide, sharing the embeddings, not counted)",
    ),
    "distilbert-base": Published(
        "DistilBERT",
        "Sanh et al. 2019, table 3",
        66e6,
        "6-layer BERT-Base student without token types or pooler, MLM head included (DistilBertForMaskedLM)",
    ),
    # ---- end of ELECTRA, DistilBERT
    # ---- SpanBERT and BART
    "spanbert-base": Published(
        "SpanBERT-base",
        "Joshi et al. 2020, sec. 4.1 (BERT-base's shape; Devlin et al. 2019 give 110M)",
        110e6,
        "span masking (geometric whole-word spans, 15%, 80/10/10 per span), span-boundary head, no NSP, "
        "cased 28,996 vocab; the paper gives no count: Tandem's includes the SBO head (2.4M) and the pooler",
    ),
    "bart-base": Published(
        "BART-base",
        "Lewis et al. 2020, sec. 2.1 (sizes: fairseq BART release, 140M)",
        140e6,
        "post-norm encoder-decoder with learned positions, GELU, biases, tied head + output bias; text "
        "infilling (Poisson 3 spans, one <mask> each, 30%) + sentence permutation",
    ),
    "bart-large": Published(
        "BART-large",
        "Lewis et al. 2020, sec. 3.1 (sizes: fairseq BART release, 400M)",
        400e6,
        "as bart-base at 12+12 layers, hidden 1024, 16 heads (transformers counts 406.3M too)",
    ),
    # ---- end of SpanBERT and BART
}


def model_config(
    preset_or_cfg: str | ModelConfig | Config, overrides: list[str] | None = None
) -> ModelConfig:
    """A preset name (or path), a ModelConfig or a whole Config -> the ModelConfig it describes.

    `overrides` are `model.`-prefixed dotted settings (`model.vocab_size=50257`) applied to a preset."""
    if isinstance(preset_or_cfg, Config):
        return preset_or_cfg.model
    if isinstance(preset_or_cfg, ModelConfig):
        return preset_or_cfg
    from pretrain.config import parse_overrides

    over, problems = parse_overrides([f"model.preset={preset_or_cfg}", *(overrides or [])])
    if problems:
        from pretrain.config import ConfigError

        raise ConfigError(problems)
    return config_from_dict(over, validate=False).model


def count_parameters(
    preset_or_cfg: str | ModelConfig | Config, *, vocab_size: int | None = None
) -> dict[str, int]:
    """{"total": ..., "non_embedding": ...} of the model a preset or config builds.

    The model is built on the meta device through `build_model`, so shapes are real but no memory is
    used. "non_embedding" leaves out every `nn.Embedding` (token, absolute position and token-type tables;
    Kaplan et al. 2020's N), counting a shared input/output embedding once. Presets that leave
    `vocab_size` at 0 (tiny ones: the shards' tokenizer decides) need `vocab_size`."""
    from pretrain.models import build_model

    cfg = model_config(preset_or_cfg)
    if vocab_size is not None:
        import dataclasses

        cfg = dataclasses.replace(cfg, vocab_size=vocab_size)
    if cfg.vocab_size <= 0:
        raise ValueError(
            f"model.vocab_size={cfg.vocab_size}: the preset leaves the vocabulary to the tokenizer; "
            "pass vocab_size (or model.vocab_size=N) to count its parameters"
        )
    with torch.device("meta"):
        model = build_model(cfg)
    seen: set[int] = set()
    total = embedding = 0
    # A wrapper whose paper counts only some of its networks (ELECTRA: the discriminator) names them.
    published = getattr(model, "published_modules", None)
    counted: list[nn.Module] = published() if callable(published) else [model]
    for module in (m for root in counted for m in root.modules()):
        for param in module.parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            total += param.numel()
            if isinstance(module, nn.Embedding):
                embedding += param.numel()
    return {"total": total, "non_embedding": total - embedding}
