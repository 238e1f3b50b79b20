"""Text generation from a GPT checkpoint: greedy, temperature, top-k and nucleus (top-p) sampling.

Decoding uses the model's key/value cache: the prompt is fed once, then one token per step, so each new
token costs one position of attention instead of re-running the whole prefix (`use_cache=False` does the
latter and is kept as the reference the tests compare against).

Top-k keeps the k most likely tokens (Fan et al. 2018); top-p keeps the smallest set of most likely tokens
whose probability reaches p (Holtzman et al. 2020). Both renormalize over what they keep.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class SamplingOptions:
    """temperature 0 is greedy (argmax); top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        if self.temperature < 0:
            problems.append(f"temperature={self.temperature} must be >= 0")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p={self.top_p} must be in (0, 1]")
        if problems:
            raise ValueError("sampling options: " + "; ".join(problems))


def filter_logits(logits: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits (B, V) -> the same with every token outside the top-k / top-p set at -inf."""
    out = logits.clone()
    if 0 < top_k < out.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]  # (B, 1)
        out[out < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits, dim=-1)
        # A token is dropped when the tokens ranked above it already reach p; the top token always stays.
        before = probs.cumsum(dim=-1) - probs
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out[drop] = float("-inf")
    return out


def next_token(
    logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator | None = None
) -> torch.Tensor:
    """logits (B, V) of the last position -> next token ids (B,)."""
    if options.temperature == 0:
        return logits.argmax(dim=-1)
    filtered = filter_logits(logits.float() / options.temperature, top_k=options.top_k, top_p=options.top_p)
    probs = torch.softmax(filtered, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: Sequence[int],
    *,
    max_new_tokens: int,
    options: SamplingOptions | None = None,
    seed: int = 0,
    eos_id: int | None = None,
    use_cache: bool = True,
) -> list[int]:
    """New token ids continuing `prompt` (not including it), stopping after `eos_id` or `max_new_tokens`, or
    when the sequence reaches model.max_seq_len (positions beyond it do not exist).

    Sampling draws from a generator seeded with `seed`, so the same seed gives the same text; the cached and
    uncached paths consume it identically."""
    options = options or SamplingOptions()
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    max_len = int(model.config.max_seq_len)  # type: ignore[union-attr, arg-type]
    if len(prompt) >= max_len:
        raise ValueError(f"the prompt has {len(prompt)} tokens; model.max_seq_len={max_len} leaves no room")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)  # (1, T)
    cache = model.new_cache() if use_cache else None  # type: ignore[operator]
    out: list[int] = []
    step_input = ids
    for _ in range(min(max_new_tokens, max_len - len(prompt))):
        logits = model(step_input, cache=cache) if use_cache else model(ids)  # (1, T', V)
        token = next_token(logits[:, -1].float(), options, generator)  # (1,)
        out.append(int(token))
        if eos_id is not None and out[-1] == eos_id:
            break
        ids = torch.cat([ids, token[:, None]], dim=1)
        step_input = token[:, None]  # with a cache, only the new token is fed
    return out
