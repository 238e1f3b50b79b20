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


# preset name -> the published system it reproduces. Add one line per preset (keep the groups).
PUBLISHED: dict[str, Published] = {
    # ---- decoder-only: GPT-3, OPT, MT-NLG, Gopher, Chinchilla, PaLM
    # ---- end of decoder-only
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
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            total += param.numel()
            if isinstance(module, nn.Embedding):
                embedding += param.numel()
    return {"total": total, "non_embedding": total - embedding}
