"""Vocabulary padding (model.make_vocab_size_divisible_by): the rounding, where the size is resolved from
the tokenizer, the messages that suggest it, and decoding never emitting a padding row."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from parallel.tensor_plan import pad_vocab_size, tensor_parallel_problems
from pretrain.config import ConfigError, ModelConfig, load_config
from pretrain.generate import SamplingOptions, beam_generate, generate
from pretrain.models import build_model
from pretrain.train import resolve_vocab_size

BASE = ["data.shards=unused"]


@pytest.mark.parametrize(
    ("size", "multiple", "padded"),
    [
        (511, 1, 511),  # the default: no padding
        (511, 2, 512),
        (512, 2, 512),  # already a multiple: unchanged
        (50257, 128, 50304),  # GPT-2's BPE at Megatron's usual multiple
        (32000, 128, 32000),
        (1, 8, 8),
    ],
)
def test_rounding_up_to_the_multiple(size: int, multiple: int, padded: int) -> None:
    assert pad_vocab_size(size, multiple) == padded


def test_rounding_refuses_a_multiple_below_one() -> None:
    with pytest.raises(ValueError, match=r"model.make_vocab_size_divisible_by=0: must be >= 1"):
        pad_vocab_size(511, 0)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vocab_from_the_tokenizer_is_padded_the_same_whatever_the_tp(tp: int) -> None:
    cfg = load_config(None, [*BASE, "model.make_vocab_size_divisible_by=4", f"parallel.tp={tp}"])
    assert resolve_vocab_size(cfg, 511) == []
    assert (cfg.model.vocab_size, cfg.model.tokenizer_vocab_size) == (512, 511)


def test_no_padding_leaves_the_config_as_before() -> None:
    cfg = load_config(None, BASE)
    assert resolve_vocab_size(cfg, 511) == []
    assert (cfg.model.vocab_size, cfg.model.tokenizer_vocab_size) == (511, 0)
    # A vocabulary the user set above the tokenizer's has padding rows too: they are recorded.
    cfg = load_config(None, [*BASE, "model.vocab_size=600"])
    assert resolve_vocab_size(cfg, 511) == [] and cfg.model.tokenizer_vocab_size == 511


def test_resolution_problems_name_the_key() -> None:
    cfg = load_config(None, [*BASE, "model.vocab_size=500"])
    assert resolve_vocab_size(cfg, 511) == [
        "model.vocab_size=500: smaller than the shards' tokenizer vocabulary (511)"
    ]
    cfg = load_config(None, [*BASE, "model.tokenizer_vocab_size=300"])
    (problem,) = resolve_vocab_size(cfg, 511)
    assert problem.startswith("model.tokenizer_vocab_size=300: the shards' tokenizer has 511 pieces")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.make_vocab_size_divisible_by=0"], "model.make_vocab_size_divisible_by=0: must be >= 1"),
        (
            ["model.make_vocab_size_divisible_by=64", "model.vocab_size=1000"],
            "model.vocab_size=1000: not a multiple of model.make_vocab_size_divisible_by=64; set "
            "model.vocab_size=0 to pad the tokenizer's vocabulary, or a multiple such as 1024",
        ),
        (
            ["model.vocab_size=512", "model.tokenizer_vocab_size=513"],
            "model.tokenizer_vocab_size=513: exceeds model.vocab_size=512",
        ),
    ],
)
def test_bad_padding_settings_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, [*BASE, *overrides])
    assert message in str(exc.value)


def test_tp_message_suggests_the_padding_key_with_a_value() -> None:
    # As train() sees it once the vocabulary came from a 511-piece tokenizer without padding.
    cfg = ModelConfig(vocab_size=511)
    (problem,) = tensor_parallel_problems(cfg, 2)
    assert problem == (
        "model.vocab_size=511 is not divisible by parallel.tp=2 (the vocab is split across TP ranks); pad it "
        "with model.make_vocab_size_divisible_by=2 and model.vocab_size=0 (the tokenizer's 511 pieces become "
        "512 rows), or set model.vocab_size=512"
    )
    # An existing multiple that tp does not divide: the suggestion keeps it (lcm).
    cfg = ModelConfig(vocab_size=513, make_vocab_size_divisible_by=3, tokenizer_vocab_size=511)
    (problem,) = tensor_parallel_problems(cfg, 2)
    assert "model.make_vocab_size_divisible_by=6" in problem and "511 pieces become 516 rows" in problem


# ----------------------------------------------------------------------------- decoding

REAL, PADDED = 40, 48  # a 40-piece tokenizer, padded to a multiple of 16


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def padded_gpt() -> torch.nn.Module:
    """A GPT whose padding rows would win: its untied LM head's 8 padding rows are scaled up 100x, so their
    logits spread far beyond the real rows' (a model that was never trained to suppress them)."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        family="gpt",
        vocab_size=PADDED,
        tokenizer_vocab_size=REAL,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        max_seq_len=48,
        tie_embeddings=False,
    )
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight[REAL:] *= 100.0
    return model


PROMPT = [3, 10, 11, 12]


def test_the_unmasked_model_prefers_padding_rows() -> None:
    """The decoding tests below have teeth: the raw argmax is a padding id."""
    model = padded_gpt()
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT]))[0, -1]  # (V,)
    assert int(logits.argmax()) >= REAL


@pytest.mark.parametrize(
    "options",
    [
        SamplingOptions(),
        SamplingOptions(temperature=1.0),
        SamplingOptions(temperature=1.0, top_k=5, top_p=0.9),
    ],
)
@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_never_emits_a_padding_id(options: SamplingOptions, use_cache: bool) -> None:
    out = generate(padded_gpt(), PROMPT, max_new_tokens=20, options=options, seed=1, use_cache=use_cache)
    assert len(out) == 20 and max(out) < REAL, out


def test_beam_search_never_emits_a_padding_id() -> None:
    out = beam_generate(padded_gpt(), PROMPT, num_beams=4, max_new_tokens=10)
    assert out and max(out) < REAL, out
