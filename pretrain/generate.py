"""Text generation from a GPT checkpoint: greedy, temperature, top-k and nucleus (top-p) sampling, and beam
search (also used by T5 text-to-text decoding).

Decoding uses the model's key/value cache: the prompt is fed once, then one token per step, so each new
token costs one position of attention instead of re-running the whole prefix (`use_cache=False` does the
latter and is kept as the reference the tests compare against).

Top-k keeps the k most likely tokens (Fan et al. 2018); top-p keeps the smallest set of most likely tokens
whose probability reaches p (Holtzman et al. 2020). Both renormalize over what they keep.

A model whose vocabulary was padded (`model.make_vocab_size_divisible_by`, or a model.vocab_size above the
tokenizer's) has rows no tokenizer piece maps to; `model.tokenizer_vocab_size` records where they start,
and every decoder here sets their logits to -inf (`mask_padding_rows`), so they are never emitted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


def real_vocab_size(model: nn.Module) -> int | None:
    """How many of the model's vocabulary rows are tokenizer pieces; None when all are."""
    config = getattr(model, "config", None)
    return int(getattr(config, "tokenizer_vocab_size", 0)) or None


def mask_padding_rows(logits: torch.Tensor, real_vocab: int | None) -> torch.Tensor:
    """logits (..., V) with the padding rows [real_vocab, V) at -inf (in place; returned for chaining)."""
    if real_vocab is not None and real_vocab < logits.shape[-1]:
        logits[..., real_vocab:] = float("-inf")
    return logits


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
    real_vocab = real_vocab_size(model)
    for _ in range(min(max_new_tokens, max_len - len(prompt))):
        logits = model(step_input, cache=cache) if use_cache else model(ids)  # (1, T', V)
        last = mask_padding_rows(logits[:, -1].float(), real_vocab)  # (1, V)
        token = next_token(last, options, generator)  # (1,)
        out.append(int(token))
        if eos_id is not None and out[-1] == eos_id:
            break
        ids = torch.cat([ids, token[:, None]], dim=1)
        step_input = token[:, None]  # with a cache, only the new token is fed
    return out


# ----------------------------------------------------------------------------- beam search

# step(origin, tokens): reorder the decoder's state so row i continues row origin[i] of the previous step,
# append tokens[i] to row i, and return the next-token log-probabilities (K, V) of every row.
BeamStep = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def beam_search(
    first_logprobs: torch.Tensor,
    step: BeamStep,
    *,
    num_beams: int,
    max_new_tokens: int,
    eos_id: int | None,
    length_penalty: float = 0.0,
) -> list[int]:
    """The highest-scoring continuation found by beam search (Sutskever et al. 2014; the length-normalized
    score of Wu et al. 2016 in the form sum log p / length**length_penalty).

    `first_logprobs` (V,) are the log-probabilities of the first new token; `step` advances the decoder's
    state (see `BeamStep`). At each step the `num_beams` best unfinished continuations are kept; a candidate
    ending in `eos_id` among the best `num_beams` candidates is set aside as finished. The search stops when
    `num_beams` finished hypotheses score at least the best unfinished one could reach (exact for
    length_penalty 0, where scores only fall as a sequence grows) or after `max_new_tokens`. With
    length_penalty 0 and num_beams >= V**max_new_tokens it returns the exact maximum-likelihood sequence.
    Returned ids include the final `eos_id` when the best hypothesis ended with one."""
    if num_beams < 1:
        raise ValueError(f"num_beams={num_beams} must be >= 1")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")

    def score(logprob: float, length: int) -> float:
        return logprob / (length**length_penalty) if length_penalty else logprob

    alive: list[tuple[list[int], float]] = [([], 0.0)]
    finished: list[tuple[float, list[int]]] = []
    logprobs = first_logprobs.float()[None]  # (K, V)
    for t in range(1, max_new_tokens + 1):
        totals = torch.tensor([lp for _, lp in alive], dtype=torch.float64)[:, None] + logprobs.double()
        order = torch.argsort(totals.flatten(), descending=True)[: 2 * num_beams]
        vocab = logprobs.shape[-1]
        origin, tokens, survivors = [], [], []
        for rank, flat in enumerate(order.tolist()):
            row, token = divmod(flat, vocab)
            total = float(totals[row, token])
            if total == float("-inf"):
                break
            seq = [*alive[row][0], token]
            if eos_id is not None and token == eos_id:
                if rank < num_beams:
                    finished.append((score(total, t), seq))
                continue
            origin.append(row)
            tokens.append(token)
            survivors.append((seq, total))
            if len(survivors) == num_beams:
                break
        finished.sort(key=lambda f: -f[0])
        finished = finished[:num_beams]
        alive = survivors
        if not alive:
            break
        # Without a length bonus, extending a sequence only lowers its score: no unfinished beam can still win.
        full = len(finished) == num_beams and length_penalty <= 0
        if full and finished[-1][0] >= max(score(lp, t) for _, lp in alive):
            alive = []
            break
        if t == max_new_tokens:
            break
        device = logprobs.device
        logprobs = step(torch.tensor(origin, device=device), torch.tensor(tokens, device=device))
    # Beams still unfinished at max_new_tokens compete as they are.
    candidates = finished + [(score(lp, len(seq)), seq) for seq, lp in alive]
    if not candidates:
        raise ValueError("beam search found no continuation with a finite log-probability")
    return max(candidates, key=lambda c: c[0])[1]


@torch.no_grad()
def beam_generate(
    model: nn.Module,
    prompt: Sequence[int],
    *,
    num_beams: int,
    max_new_tokens: int,
    eos_id: int | None = None,
    length_penalty: float = 0.0,
) -> list[int]:
    """Beam search continuing `prompt` with a GPT, through its key/value cache: the prompt is fed once, and
    each step reorders the cached keys/values to the surviving beams before feeding their new tokens."""
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    max_len = int(model.config.max_seq_len)  # type: ignore[union-attr, arg-type]
    if len(prompt) >= max_len:
        raise ValueError(f"the prompt has {len(prompt)} tokens; model.max_seq_len={max_len} leaves no room")
    device = next(model.parameters()).device
    cache = model.new_cache()  # type: ignore[operator]
    real_vocab = real_vocab_size(model)
    first = model(torch.tensor([list(prompt)], device=device), cache=cache)[0, -1]  # (V,)

    def step(origin: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        for block in cache:
            layer = block.self_attn
            layer.k, layer.v = layer.k[origin], layer.v[origin]  # type: ignore[index]
        logits = model(tokens[:, None], cache=cache)[:, -1]  # (K, V)
        return torch.log_softmax(mask_padding_rows(logits.float(), real_vocab), dim=-1)

    return beam_search(
        torch.log_softmax(mask_padding_rows(first.float(), real_vocab), dim=-1),
        step,
        num_beams=num_beams,
        max_new_tokens=min(max_new_tokens, max_len - len(prompt)),
        eos_id=eos_id,
        length_penalty=length_penalty,
    )
