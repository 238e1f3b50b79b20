"""Scoring math, k-shot prompts and generation of pretrain/evaluate.py and pretrain/generate.py, on tiny
randomly initialized models (no checkpoint, no tokenizer file)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from pretrain.config import ModelConfig
from pretrain.evaluate import (
    PromptFormat,
    build_prompt,
    continuation_logprobs,
    demonstration_order,
    greedy_matches,
    split_prompt,
    standard_error,
)
from pretrain.finetune import classification_metrics, encode_classification, rouge_l
from pretrain.generate import SamplingOptions, filter_logits, generate, next_token
from pretrain.models import build_model

VOCAB = 50


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny models spend their time in thread hand-offs: on 2 shared cores one thread is ~100x faster.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_gpt(**over: object) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(
        family="gpt", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=48, **over
    )
    return build_model(cfg).eval()


# ----------------------------------------------------------------------------- log-likelihood scoring


@pytest.mark.parametrize("over", [{}, {"norm": "rmsnorm", "position": "rope", "activation": "swiglu"}])
def test_continuation_logprobs_equal_direct_forward(over: dict) -> None:
    model = tiny_gpt(**over)
    contexts = [[3, 10, 11, 12], [3, 20]]
    conts = [[13, 14], [21, 22, 23, 24]]
    got = continuation_logprobs(model, contexts, conts)
    for ctx, cont, g in zip(contexts, conts, got):
        # Reference: one unpadded forward per row, then log p(c_j | prefix) read off position by position.
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ctx + cont]))[0], -1)
        want = torch.stack([logp[len(ctx) - 1 + j, t] for j, t in enumerate(cont)])
        # Batched rows are right-padded; causal attention makes them independent of the padding, so the
        # only difference is matmul summation order over a different batch shape (fp32 ~1e-6).
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-5)
        assert g.shape == (len(cont),)


def test_loglikelihood_counts_only_the_continuation() -> None:
    model = tiny_gpt()
    # The same continuation after different contexts: the score is conditional, the context itself unscored.
    a, b = continuation_logprobs(model, [[3, 5, 6, 7, 8], [3, 9]], [[30], [30]])
    assert a.shape == b.shape == (1,)
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([[3, 5, 6, 7, 8, 30]]))[0], -1)
    assert float(a.sum()) == pytest.approx(float(full[4, 30]), abs=1e-5)


def test_length_normalization_is_mean_token_logprob() -> None:
    model = tiny_gpt()
    (s,) = continuation_logprobs(model, [[3, 4]], [[7, 8, 9]])
    assert float(s.mean()) == pytest.approx(float(s.sum()) / 3)


def test_greedy_match_agrees_with_greedy_generation() -> None:
    model = tiny_gpt()
    ctx = [3, 17, 18, 19]
    produced = generate(model, ctx, max_new_tokens=4)
    assert greedy_matches(model, ctx, produced)
    wrong = [*produced[:-1], (produced[-1] + 1) % VOCAB]
    assert not greedy_matches(model, ctx, wrong)


def test_standard_error() -> None:
    assert standard_error(0.5, 100) == pytest.approx(0.05)
    assert standard_error(0.0, 10) == 0.0
    assert standard_error(0.9, 25) == pytest.approx(math.sqrt(0.9 * 0.1 / 25))
    assert math.isnan(standard_error(0.5, 0))


# ----------------------------------------------------------------------------- prompts


def _rows(n: int) -> list[dict]:
    return [{"context": f"q{i}", "choices": [f"a{i}", "z"], "answer": 0} for i in range(n)]


def test_kshot_prompt_never_contains_query_and_is_deterministic() -> None:
    rows = _rows(8)
    fmt = PromptFormat(template="Q: {context}\nA: {answer}", separator="\n\n")
    for i, q in enumerate(rows):
        for k in (0, 1, 5, 7):
            prompt, chosen = build_prompt(q, i, k=k, pool=rows, seed=3, fmt=fmt, pool_is_query_file=True)
            again, chosen2 = build_prompt(q, i, k=k, pool=rows, seed=3, fmt=fmt, pool_is_query_file=True)
            assert (prompt, chosen) == (again, chosen2)
            assert i not in chosen and len(chosen) == len(set(chosen)) == k
            assert f"a{i}" not in prompt  # the query's answer never leaks
            assert prompt.endswith(f"Q: q{i}\nA: ")
            assert prompt.count("Q: ") == k + 1
    with pytest.raises(ValueError, match="8-shot"):
        build_prompt(rows[0], 0, k=8, pool=rows, seed=0, fmt=fmt, pool_is_query_file=True)


def test_kshot_demonstrations_nest_and_depend_on_seed() -> None:
    rows = _rows(20)
    fmt = PromptFormat()
    _, one = build_prompt(rows[4], 4, k=1, pool=rows, seed=0, fmt=fmt, pool_is_query_file=True)
    _, five = build_prompt(rows[4], 4, k=5, pool=rows, seed=0, fmt=fmt, pool_is_query_file=True)
    assert five[:1] == one
    orders = {tuple(demonstration_order(4, 19, seed=s)) for s in range(5)}
    assert len(orders) > 1


def test_separate_pool_excludes_a_copy_of_the_query() -> None:
    queries = _rows(3)
    pool = [queries[1], *_rows(6)[3:]]  # the pool contains query 1 itself
    _, chosen = build_prompt(
        queries[1], 1, k=3, pool=pool, seed=0, fmt=PromptFormat(), pool_is_query_file=False
    )
    assert 0 not in chosen
    with pytest.raises(ValueError, match="4-shot"):
        build_prompt(queries[1], 1, k=4, pool=pool, seed=0, fmt=PromptFormat(), pool_is_query_file=False)


def test_prompt_format_and_whitespace_split() -> None:
    fmt = PromptFormat(template="Question: {context} Answer: {answer}.")
    assert fmt.query("2+2?") == "Question: 2+2? Answer: "
    assert fmt.demonstration("2+2?", "4") == "Question: 2+2? Answer: 4."
    assert split_prompt("Answer: ", "4") == ("Answer:", " 4")
    with pytest.raises(ValueError, match="context"):
        PromptFormat(template="{answer} {context}")


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("over", [{}, {"norm": "rmsnorm", "position": "rope", "activation": "swiglu"}])
def test_cached_generation_equals_uncached(over: dict) -> None:
    model = tiny_gpt(**over)
    prompt = [3, 11, 29, 7, 40]
    cached = generate(model, prompt, max_new_tokens=20, use_cache=True)
    uncached = generate(model, prompt, max_new_tokens=20, use_cache=False)
    assert cached == uncached and len(cached) == 20
    opts = SamplingOptions(temperature=1.0, top_k=10, top_p=0.9)
    assert generate(model, prompt, max_new_tokens=12, options=opts, seed=5) == generate(
        model, prompt, max_new_tokens=12, options=opts, seed=5, use_cache=False
    )


def test_generation_stops_at_eos_and_max_seq_len() -> None:
    model = tiny_gpt()
    prompt = [3, 11, 29]
    first = generate(model, prompt, max_new_tokens=5)
    stop = first[1]
    assert generate(model, prompt, max_new_tokens=5, eos_id=stop) == first[: first.index(stop) + 1]
    assert len(generate(model, list(range(1, 45)), max_new_tokens=10)) == 48 - 44


def test_fixed_seed_same_sample_other_seed_differs() -> None:
    model = tiny_gpt()
    opts = SamplingOptions(temperature=1.5)
    a = generate(model, [3, 5], max_new_tokens=16, options=opts, seed=1)
    assert a == generate(model, [3, 5], max_new_tokens=16, options=opts, seed=1)
    assert any(generate(model, [3, 5], max_new_tokens=16, options=opts, seed=s) != a for s in range(2, 6))


def test_top_k_and_top_p_pick_only_allowed_tokens() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.05]]))
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False, False]]
    # Cumulative 0.5, 0.8, 0.9: p=0.75 needs the first two, p=0.85 the first three; the top token always stays.
    assert torch.isfinite(filter_logits(logits, top_p=0.75)).tolist() == [[True, True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.85)).tolist() == [[True, True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.1)).tolist() == [[True, False, False, False, False]]
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(4, VOCAB, generator=g)
    for opts, allowed in (
        (SamplingOptions(temperature=2.0, top_k=3), torch.topk(wide, 3).indices),
        (SamplingOptions(temperature=2.0, top_k=5, top_p=0.3), None),
    ):
        keep = torch.isfinite(filter_logits(wide / opts.temperature, top_k=opts.top_k, top_p=opts.top_p))
        for _ in range(200):
            tok = next_token(wide, opts, g)
            assert keep[torch.arange(4), tok].all()
            if allowed is not None:
                assert (allowed == tok[:, None]).any(-1).all()
    assert next_token(wide, SamplingOptions()).tolist() == wide.argmax(-1).tolist()
    with pytest.raises(ValueError, match="top_p"):
        SamplingOptions(top_p=0.0)


# ----------------------------------------------------------------------------- fine-tuning helpers


class _Tok:
    cls_id, sep_id, pad_id = 4, 5, 0

    def encode(self, text: str) -> list[int]:
        return [10 + len(w) for w in text.split()]


def test_pair_encoding_layout_and_truncation() -> None:
    ids, types = encode_classification(_Tok(), "a bb", "ccc", 16)
    assert ids == [4, 11, 12, 5, 13, 5] and types == [0, 0, 0, 0, 1, 1]
    ids, types = encode_classification(_Tok(), "a bb", None, 16)
    assert ids == [4, 11, 12, 5] and types == [0, 0, 0, 0]
    ids, _ = encode_classification(_Tok(), "a a a a a a", "b b", 7)  # the longer segment loses tokens first
    assert ids == [4, 11, 11, 5, 11, 11, 5] and len(ids) == 7


def test_classification_metrics_and_rouge() -> None:
    m = classification_metrics([0, 0, 1, 1], [0, 1, 1, 1], 2)
    assert m["accuracy"] == 0.75
    # F1(0) = 2*1/(2+1+0) = 2/3, F1(1) = 2*2/(4+0+1) = 4/5
    assert m["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("the cat", "the big cat") == pytest.approx(2 * (1 * 2 / 3) / (1 + 2 / 3))
    assert rouge_l("", "x") == 0.0
