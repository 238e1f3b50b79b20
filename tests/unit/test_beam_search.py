"""Beam search (pretrain/generate.py `beam_search`, `beam_generate`; pretrain/finetune.py `beam_decode_t5`)
against exhaustive enumeration of every continuation and against greedy decoding, on tiny random models."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import torch

from pretrain.config import ModelConfig
from pretrain.finetune import beam_decode_t5, greedy_decode_t5
from pretrain.generate import beam_generate, beam_search, generate
from pretrain.models import build_model

VOCAB, EOS, PAD = 5, 4, 0


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(family: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    extra = {"position": "relative", "norm": "rmsnorm"} if family == "t5" else {}
    cfg = ModelConfig(
        family=family, vocab_size=VOCAB, hidden_size=16, num_layers=1, num_heads=2, max_seq_len=16, **extra
    )
    model = build_model(cfg).eval()
    # Larger weights sharpen the distributions so that sequences' scores are well separated (no near-ties
    # that summation order could flip between the beam and the reference).
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)
    return model


def all_continuations(length: int) -> Iterator[list[int]]:
    """Every continuation of at most `length` tokens: those ending at the first <eos>, and the unfinished
    ones of exactly `length` tokens (what a search stopped at max_new_tokens may return)."""
    for n in range(1, length + 1):
        for seq in itertools.product(range(VOCAB), repeat=n):
            if EOS in seq[:-1] or (n < length and seq[-1] != EOS):
                continue
            yield list(seq)


@torch.no_grad()
def gpt_logprob(model: torch.nn.Module, prompt: list[int], cont: list[int]) -> float:
    logp = torch.log_softmax(model(torch.tensor([prompt + cont]))[0].double(), -1)
    return sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(cont))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wide_beam_finds_the_exact_most_likely_continuation(seed: int) -> None:
    model, prompt, length = tiny("gpt", seed), [1, 2], 3
    # Reference: score every possible continuation with full (uncached) forwards in float64.
    best = max(all_continuations(length), key=lambda c: gpt_logprob(model, prompt, c))
    # num_beams >= V**length keeps every prefix alive, so the search is exhaustive.
    got = beam_generate(model, prompt, num_beams=VOCAB**length, max_new_tokens=length, eos_id=EOS)
    assert got == best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_beam_is_greedy_decoding(seed: int) -> None:
    model, prompt = tiny("gpt", seed), [1, 2, 3]
    greedy = generate(model, prompt, max_new_tokens=8, eos_id=EOS)
    assert beam_generate(model, prompt, num_beams=1, max_new_tokens=8, eos_id=EOS) == greedy


def test_beam_result_is_at_least_as_likely_as_greedy_on_average() -> None:
    """Not guaranteed per prompt, but over many prompts a 4-beam search must not lose to greedy overall."""
    model = tiny("gpt", 3)
    gain = 0.0
    for a, b in itertools.product(range(VOCAB), repeat=2):
        prompt = [a, b]
        greedy = generate(model, prompt, max_new_tokens=4, eos_id=EOS)
        beam = beam_generate(model, prompt, num_beams=4, max_new_tokens=4, eos_id=EOS)
        gain += gpt_logprob(model, prompt, beam) - gpt_logprob(model, prompt, greedy)
    assert gain >= 0.0


def test_t5_beam_decode_matches_exhaustive_search_and_greedy() -> None:
    model, length = tiny("t5", 4), 3
    src = torch.tensor([[1, 2, 3, EOS], [3, 1, EOS, PAD]])
    mask = (torch.arange(4)[None] < torch.tensor([[4], [3]])).long()

    @torch.no_grad()
    def logprob(row: int, cont: list[int]) -> float:
        keep = mask[row].bool()
        dec = torch.tensor([[PAD, *cont[:-1]]])
        logits = model(src[row : row + 1, keep], dec, attention_mask=mask[row : row + 1, keep])[0]
        logp = torch.log_softmax(logits.double(), -1)
        return sum(float(logp[j, t]) for j, t in enumerate(cont))

    wide = beam_decode_t5(model, src, mask, num_beams=VOCAB**length, max_len=length, eos_id=EOS, pad_id=PAD)
    for row, got in enumerate(wide):
        best = max(all_continuations(length), key=lambda c: logprob(row, c))
        assert got == (best[:-1] if best[-1] == EOS else best)
    one = beam_decode_t5(model, src, mask, num_beams=1, max_len=6, eos_id=EOS, pad_id=PAD)
    assert one == greedy_decode_t5(model, src, mask, max_len=6, eos_id=EOS, pad_id=PAD)


def test_length_penalty_prefers_longer_finished_beams() -> None:
    # A hand-built 2-step decoder: stopping at once costs log 0.5; continuing costs log 0.6 twice (0.36).
    lp_first = torch.log(torch.tensor([0.0, 0.5, 0.0, 0.0, 0.5]))  # token 1 or <eos>
    lp_then = torch.log(torch.tensor([0.0, 0.0, 0.0, 0.4, 0.6]))  # then <eos> with 0.6

    def step(origin: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return lp_then.expand(len(tokens), -1)

    plain = beam_search(lp_first, step, num_beams=2, max_new_tokens=3, eos_id=EOS)
    assert plain == [EOS]  # log 0.5 > log 0.3
    # Normalized by length**1: log(0.5)/1 = -0.69 < log(0.3)/2 = -0.60, so the two-token answer wins.
    assert beam_search(lp_first, step, num_beams=2, max_new_tokens=3, eos_id=EOS, length_penalty=1.0) == [
        1,
        EOS,
    ]


def test_bad_beam_options_are_named() -> None:
    with pytest.raises(ValueError, match="num_beams=0"):
        beam_search(
            torch.zeros(VOCAB),
            lambda o, t: torch.zeros(len(t), VOCAB),
            num_beams=0,
            max_new_tokens=2,
            eos_id=EOS,
        )
