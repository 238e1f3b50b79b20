"""SpanBERT (span masking + span-boundary objective) and BART (family `bart`, denoising objective): the papers'
statistics measured on 10k sequences, export parity with transformers, published parameter counts, and
tiny presets that train.

The objectives run on the test corpus's real sentencepiece tokenizer (words and sentence ends come from its
pieces) over synthetic token streams, so every span length and budget below is read back from the arrays
the objective returns and judged against the papers' distributions computed here."""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict

import numpy as np
import pytest
import torch
import transformers
from scipy import stats

from data_pipeline.manifest import load_manifest
from data_pipeline.objectives import OBJECTIVES
from data_pipeline.objectives.denoising import Denoising
from data_pipeline.objectives.mlm import IGNORE_INDEX
from data_pipeline.objectives.span_masking import SpanMasking
from data_pipeline.tokenizer import Tokenizer
from pretrain.config import ConfigError, load_config
from pretrain.export import ExportError, export_hf
from pretrain.lineage import PUBLISHED, count_parameters, model_config
from pretrain.models import build_model

N_SEQ = 10_000
SEQ_LEN = 128
# Goodness-of-fit threshold: a correct sampler fails one chi-square test in 10^4 runs.
P_FLOOR = 1e-4


@pytest.fixture(scope="module")
def tok(shards_dir):
    record = dict(load_manifest(shards_dir)["tokenizer"])
    if not record["path"].startswith("/"):
        record["path"] = str(shards_dir / record["path"])
    return record


@pytest.fixture(scope="module")
def pieces(tok):
    t = Tokenizer(tok["path"])
    return [t.id_to_piece(i) for i in range(int(tok["vocab_size"]))]


def special_set(tok) -> set[int]:
    keys = ("pad_id", "unk_id", "bos_id", "eos_id", "cls_id", "sep_id", "mask_id")
    return {int(tok[k]) for k in keys if k in tok} | {int(i) for i in tok.get("sentinel_ids", ())}


def synthetic(tok, n: int, length: int, seed: int = 0, pieces: list[str] | None = None) -> np.ndarray:
    """(n, length) stream-like samples of ordinary pieces with an <eos> about every 100 tokens. With `pieces`,
    3 in 4 tokens are word-initial ("▁...") pieces, so words average 1.33 pieces like English text;
    otherwise pieces are drawn uniformly."""
    rng = np.random.default_rng(seed)
    ordinary = np.setdiff1d(np.arange(int(tok["vocab_size"])), sorted(special_set(tok)))
    out = rng.choice(ordinary, size=(n, length))
    if pieces is not None:
        initial = np.array([i for i in ordinary if pieces[i].startswith("▁")])
        inner = np.array([i for i in ordinary if not pieces[i].startswith("▁")])
        out = np.where(
            rng.random((n, length)) < 0.75, rng.choice(initial, (n, length)), rng.choice(inner, (n, length))
        )
    out[rng.random((n, length)) < 0.01] = int(tok["eos_id"])
    return out


# ----------------------------------------------------------------------------- SpanBERT: span masking


@pytest.fixture(scope="module")
def span_run(tok, pieces):
    obj = SpanMasking(seq_len=SEQ_LEN, tokenizer=tok, seed=0)
    raw = synthetic(tok, N_SEQ, obj.sample_len, pieces=pieces)
    return obj, raw, obj(raw, np.arange(N_SEQ))


def word_starts(tokens: np.ndarray, pieces: list[str], special: set[int]) -> np.ndarray:
    """The test's own word segmentation: a word starts at a "▁" piece, at or after a whitespace byte piece,
    or after a special token; specials are no words. (n, L) -> (n, L) bool."""
    whitespace = {f"<0x{b:02X}>" for b in b"\t\n\v\f\r "}
    is_special = np.isin(tokens, sorted(special))
    marked = np.array([p.startswith("▁") for p in pieces])[tokens]
    space = np.array([p in whitespace for p in pieces])[tokens]
    after = np.ones_like(is_special)  # the first position follows nothing
    after[:, 1:] = is_special[:, :-1] | space[:, :-1]
    return ~is_special & (marked | space | after)


def read_spans(out: dict, row: int) -> list[tuple[int, int]]:
    """(s, e) of each masked span of a row, from the span-boundary arrays, checked for consistency."""
    labels = out["labels"][row]
    masked = np.flatnonzero(labels != IGNORE_INDEX)
    by_left: dict[int, list[int]] = defaultdict(list)
    for i in masked:
        by_left[int(out["span_left"][row, i])].append(int(i))
    spans = []
    for left, members in by_left.items():
        s, e = left + 1, int(out["span_right"][row, members[0]]) - 1
        assert members == list(range(s, e + 1)), (row, left, members)
        assert (out["span_right"][row, members] == e + 1).all()
        np.testing.assert_array_equal(out["span_position"][row, members], np.arange(e - s + 1))
        spans.append((s, e))
    return spans


def test_span_masking_layout(span_run, tok):
    obj, raw, out = span_run
    assert obj.sample_len == SEQ_LEN - 2
    for key in ("input_ids", "labels", "attention_mask", "token_type_ids", "span_left", "span_right"):
        assert out[key].shape == (N_SEQ, SEQ_LEN) and out[key].dtype == np.int64
    original = np.where(out["labels"] != IGNORE_INDEX, out["labels"], out["input_ids"])
    assert (original[:, 0] == tok["cls_id"]).all() and (original[:, -1] == tok["sep_id"]).all()
    np.testing.assert_array_equal(original[:, 1:-1], np.where(raw == tok["eos_id"], tok["sep_id"], raw))
    assert "span_mlm" in OBJECTIVES and OBJECTIVES["span_mlm"] is SpanMasking


def test_span_lengths_budget_and_per_span_replacement_on_10k_sequences(span_run, tok, pieces):
    _, _, out = span_run
    special = special_set(tok)
    original = np.where(out["labels"] != IGNORE_INDEX, out["labels"], out["input_ids"])
    lengths, treatment = [], {"mask": 0, "random": 0, "keep": 0}
    fractions, max_lengths = [], []
    all_starts = word_starts(original, pieces, special)
    for row in range(N_SEQ):
        starts = all_starts[row]
        spans = read_spans(out, row)
        eligible = int(sum(int(t) not in special for t in original[row]))
        masked = int((out["labels"][row] != IGNORE_INDEX).sum())
        # Whole words: a span starts a word and the token after it starts one (or is special).
        span_tokens = []
        for s, e in spans:
            assert starts[s] and (starts[e + 1] or int(original[row, e + 1]) in special), (row, s, e)
            lengths.append(int(starts[s : e + 1].sum()))
            span_tokens.append(e - s + 1)
            shown = out["input_ids"][row, s : e + 1]
            if (shown == tok["mask_id"]).all():
                treatment["mask"] += 1
            elif (shown == original[row, s : e + 1]).all():
                treatment["keep"] += 1
            else:  # random tokens: none of them may be <mask> (all tokens of a span share one decision)
                assert not (shown == tok["mask_id"]).any(), (row, s, e, shown)
                treatment["random"] += 1
        # The budget: drawing stops at the first span reaching floor/ceil(15%), so without its longest
        # span a sample is below the (rounded-up) budget, and with all of them at or above the rounded-down one.
        assert masked >= math.floor(0.15 * eligible), (row, masked, eligible)
        assert masked - max(span_tokens) < math.ceil(0.15 * eligible), (row, masked, eligible)
        fractions.append(masked / eligible)
        max_lengths.append(max(span_tokens))

    lengths_arr = np.array(lengths)
    n_spans = len(lengths_arr)
    assert n_spans > 30_000
    # SpanBERT: Geo(p = 0.2) on 1..10, renormalized.
    p, ell = 0.2, np.arange(1, 11)
    expected = p * (1 - p) ** (ell - 1) / (1 - (1 - p) ** 10)
    observed = np.bincount(lengths_arr, minlength=11)[1:]
    assert observed.sum() == n_spans  # no span outside 1..10 words
    chi2 = stats.chisquare(observed, expected * n_spans)
    assert chi2.pvalue > P_FLOOR, (observed, np.round(expected * n_spans), chi2)
    mean = float((ell * expected).sum())
    assert mean == pytest.approx(3.80, abs=0.005)  # the paper: "mean span length 3.8"
    # Standard error of the mean length: sd 2.55 / sqrt(> 30k) < 0.015; 5 of them.
    assert lengths_arr.mean() == pytest.approx(mean, abs=0.075)

    # Masked fraction: at least 15% on average (stochastic rounding makes the floor exact in expectation),
    # and above it by less than one span: the overshoot is bounded by the span that crossed the budget.
    frac = float(np.mean(fractions))
    assert 0.15 - 0.001 < frac < 0.15 + float(np.mean(max_lengths)) / (SEQ_LEN - 2)
    assert frac < 0.185  # measured 0.17: a budget that stopped binding would show up here

    # 80/10/10 per span: binomial standard errors at > 30k spans are 0.0023 (80%) and 0.0017 (10%); 5 of them.
    total = sum(treatment.values())
    assert treatment["mask"] / total == pytest.approx(0.8, abs=0.012)
    assert treatment["random"] / total == pytest.approx(0.1, abs=0.009)
    assert treatment["keep"] / total == pytest.approx(0.1, abs=0.009)


def test_span_masking_is_per_sample_deterministic_and_validates(span_run, tok):
    obj, raw, out = span_run
    again = obj(raw[[7, 3]], np.array([7, 3]))
    for key, value in again.items():
        np.testing.assert_array_equal(value, out[key][[7, 3]])
    with pytest.raises(ValueError, match="geometric_p=0"):
        SpanMasking(seq_len=64, tokenizer=tok, seed=0, geometric_p=0.0)
    with pytest.raises(ValueError, match="'path'"):
        SpanMasking(seq_len=64, tokenizer={k: v for k, v in tok.items() if k != "path"}, seed=0)


# ----------------------------------------------------------------------------- SpanBERT: model


def tiny_cfg(preset: str, vocab: int = 300, **changes):
    return dataclasses.replace(model_config(preset), vocab_size=vocab, **changes)


def test_spanbert_loss_is_mlm_plus_sbo_from_the_boundaries(span_run):
    """The SBO prediction of a masked token is a function of the two boundary states and its position
    only: checked against a float64 recomputation from the encoder output."""
    _, _, out = span_run
    torch.manual_seed(0)
    cfg = tiny_cfg("spanbert-tiny", vocab=int(out["input_ids"].max()) + 1)
    model = build_model(cfg).double().eval()
    batch = {k: torch.from_numpy(v[:4]) for k, v in out.items()}
    loss, metrics = model.pretraining_loss(batch)
    assert set(metrics) == {"mlm_loss", "sbo_loss"}
    assert float(loss) == pytest.approx(float(metrics["mlm_loss"] + metrics["sbo_loss"]), rel=1e-12)
    with torch.no_grad():
        hidden = model.encode(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        rows, cols = (batch["labels"] != IGNORE_INDEX).nonzero(as_tuple=True)
        target = batch["labels"][rows, cols]
        mlm_logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])[rows, cols]
        left, right = batch["span_left"][rows, cols], batch["span_right"][rows, cols]
        h0 = torch.cat(
            [
                hidden[rows, left],
                hidden[rows, right],
                model.sbo_position.weight[batch["span_position"][rows, cols]],
            ],
            -1,
        )
        ln = torch.nn.functional.layer_norm
        gelu = torch.nn.functional.gelu
        h1 = ln(
            gelu(h0 @ model.sbo_dense1.weight.T + model.sbo_dense1.bias), (cfg.hidden_size,), eps=cfg.norm_eps
        )
        h1 = ln(
            gelu(h1 @ model.sbo_dense2.weight.T + model.sbo_dense2.bias), (cfg.hidden_size,), eps=cfg.norm_eps
        )
        sbo_logits = h1 @ model.embed.weight.T + model.sbo_bias
    ce = torch.nn.functional.cross_entropy
    # The model hands fp32 logits to the cross-entropy (as training does): rounding of ~6e-8 relative per
    # logit moves the mean loss by ~1e-7 relative, 10x inside 1e-6; a wrong input moves it by O(1e-2).
    assert float(metrics["mlm_loss"]) == pytest.approx(float(ce(mlm_logits, target)), rel=1e-6)
    assert float(metrics["sbo_loss"]) == pytest.approx(float(ce(sbo_logits, target)), rel=1e-6)


def test_spanbert_exports_its_bert_to_bertformaskedlm(tmp_path):
    torch.manual_seed(1)
    cfg = tiny_cfg("spanbert-tiny")
    model = build_model(cfg).eval()
    assert export_hf(model, cfg, tmp_path) == "BertForMaskedLM"
    hf = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(7, 300, (2, 24))
    with torch.no_grad():
        ours, theirs = model(ids), hf(input_ids=ids).logits
    # fp32, same weights; see tests/unit/test_export.py for the 1e-5 bound.
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- BART: denoising


@pytest.fixture(scope="module")
def bart_run(tok):
    obj = Denoising(seq_len=SEQ_LEN, tokenizer=tok, seed=0)
    raw = synthetic(tok, N_SEQ, obj.sample_len, seed=1)
    return obj, raw, obj(raw, np.arange(N_SEQ))


def corrupt_reference(tokens: np.ndarray, spans: list[tuple[int, int]], mask_id: int) -> list[int]:
    """One <mask> per span, insertions before their position: a plain loop, independent of `corrupt`."""
    starts = {s: n for s, n in spans if n > 0}
    inserts = defaultdict(int)
    for s, n in spans:
        if n == 0:
            inserts[s] += 1
    out: list[int] = []
    i = 0
    while i <= len(tokens):
        out += [mask_id] * inserts[i]
        if i == len(tokens):
            break
        if i in starts:
            out.append(mask_id)
            i += starts[i]
        else:
            out.append(int(tokens[i]))
            i += 1
    return out


def test_bart_infilling_statistics_on_10k_sequences(bart_run, tok):
    obj, raw, out = bart_run
    eos, pad, mask_id = int(tok["eos_id"]), int(tok["pad_id"]), int(tok["mask_id"])
    assert out["input_ids"].shape == out["labels"].shape == out["decoder_input_ids"].shape == (N_SEQ, SEQ_LEN)
    # Target = the original text + <eos>; the decoder reads it shifted right behind <eos>.
    np.testing.assert_array_equal(out["labels"][:, :-1], raw)
    assert (out["labels"][:, -1] == eos).all()
    np.testing.assert_array_equal(out["decoder_input_ids"][:, 1:], out["labels"][:, :-1])
    assert (out["decoder_input_ids"][:, 0] == eos).all()

    lengths, fractions, max_lengths = [], [], []
    for row in range(N_SEQ):
        tokens, spans = obj.noise(raw[row], row)
        n_real = int(out["attention_mask"][row].sum())
        encoder = out["input_ids"][row, :n_real]
        assert encoder[-1] == eos and (out["input_ids"][row, n_real:] == pad).all()
        # One <mask> per span (the synthetic text holds none), and the input is exactly the plan applied.
        assert int((encoder == mask_id).sum()) == len(spans)
        if row < 1000:
            assert encoder[:-1].tolist() == corrupt_reference(tokens, spans, mask_id)
        # Spans never overlap and never cover an <eos>.
        covered = np.zeros(len(tokens), dtype=int)
        for s, n in spans:
            covered[s : s + n] += 1
        assert covered.max(initial=0) <= 1 and not (covered.astype(bool) & (tokens == eos)).any()
        n_maskable = int((tokens != eos).sum())
        masked = int(covered.sum())
        assert masked >= math.floor(0.3 * n_maskable)
        assert masked - max(n for _, n in spans) < math.ceil(0.3 * n_maskable)
        lengths += [n for _, n in spans]
        fractions.append(masked / n_maskable)
        max_lengths.append(max(n for _, n in spans))

    lengths_arr = np.array(lengths)
    assert len(lengths_arr) > 100_000
    # Poisson(3) over 0..9 and a pooled tail >= 10 (expected counts > 100 in every cell).
    k = np.arange(10)
    expected = np.append(stats.poisson.pmf(k, 3.0), stats.poisson.sf(9, 3.0))
    observed = np.append(
        np.bincount(np.minimum(lengths_arr, 10), minlength=11)[:10], (lengths_arr >= 10).sum()
    )
    chi2 = stats.chisquare(observed, expected * len(lengths_arr))
    assert chi2.pvalue > P_FLOOR, (observed, np.round(expected * len(lengths_arr)), chi2)
    # sd(Poisson 3) = 1.73; over > 100k spans the mean's standard error is < 0.0055; 5 of them.
    assert lengths_arr.mean() == pytest.approx(3.0, abs=0.03)
    frac = float(np.mean(fractions))
    assert 0.3 - 0.001 < frac < 0.3 + float(np.mean(max_lengths)) / (SEQ_LEN - 1)
    assert frac < 0.33  # measured 0.31


def tiling(seq: tuple[int, ...], parts: list[tuple[int, ...]]) -> list[int] | None:
    """An order of `parts` (each used once) whose concatenation is `seq`, or None (backtracking search)."""
    if not parts:
        return [] if not seq else None
    for i, part in enumerate(parts):
        if (
            seq[: len(part)] == part
            and (rest := tiling(seq[len(part) :], parts[:i] + parts[i + 1 :])) is not None
        ):
            return [i] + [j + (j >= i) for j in rest]
    return None


def test_bart_sentence_permutation_keeps_the_multiset_of_sentences(tok, pieces):
    obj = Denoising(seq_len=SEQ_LEN, tokenizer=tok, seed=3, mask_ratio=0.0)
    eos = int(tok["eos_id"])
    # Sentence ends: the test's own reading of the pieces, plus <eos>.
    ends = np.array([p.replace("▁", "")[-1:] in (".", "!", "?") for p in pieces])
    ends[eos] = True
    rng = np.random.default_rng(5)
    enders = np.flatnonzero(ends & (np.arange(len(pieces)) != eos))
    assert len(enders) > 0
    raw = synthetic(tok, N_SEQ, obj.sample_len, seed=2)
    extra = rng.random(raw.shape) < 0.05  # more sentence ends than uniform pieces give: ~6 sentences a row
    raw[extra] = rng.choice(enders, size=int(extra.sum()))
    out = obj(raw, np.arange(N_SEQ))
    moved = 0
    for row in range(N_SEQ):
        encoder = out["input_ids"][row]
        assert encoder[-1] == eos and out["attention_mask"][row].all()  # nothing masked: full length

        cuts = [i + 1 for i in range(len(raw[row]) - 1) if ends[raw[row, i]]]
        before = [tuple(x) for x in np.split(raw[row], cuts)]
        order = tiling(tuple(int(t) for t in encoder[:-1]), before)
        assert order is not None, row  # the input is the original sentences, each once, in some order
        moved += order != list(range(len(before)))
    # ~6 sentences a row: a random order keeps the original one in well under 1% of rows.
    assert moved > 0.95 * N_SEQ


# ----------------------------------------------------------------------------- BART: model and export


def test_bart_exports_to_bartforconditionalgeneration(tmp_path):
    torch.manual_seed(2)
    cfg = tiny_cfg("bart-tiny")
    model = build_model(cfg).eval()
    with torch.no_grad():  # non-trivial output bias and norms, so a wrong mapping of either shows
        model.final_logits_bias.normal_()
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    assert export_hf(model, cfg, tmp_path) == "BartForConditionalGeneration"
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "BartForConditionalGeneration"
    ids = torch.randint(7, 300, (3, 20))
    mask = torch.ones_like(ids)
    mask[0, 14:] = 0  # a padded row
    dec = torch.randint(7, 300, (3, 11))
    with torch.no_grad():
        ours = model(ids, dec, attention_mask=mask)
        theirs = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    # fp32, same weights; see tests/unit/test_export.py for the 1e-5 bound.
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)

    with pytest.raises(ExportError, match="norm_position"):
        export_hf(
            build_model(tiny_cfg("bart-tiny", norm_position="pre")),
            tiny_cfg("bart-tiny", norm_position="pre"),
            tmp_path / "x",
        )


def test_bart_config_rules():
    with pytest.raises(ConfigError, match="BART uses position=learned"):
        load_config(None, ["data.shards=unused", "model.preset=bart-tiny", "model.position=rope"])
    with pytest.raises(ConfigError, match="SpanBERT is a BERT"):
        load_config(None, ["data.shards=unused", "model.preset=gpt-tiny", "model.objective=span_mlm"])
    with pytest.raises(ConfigError, match="denoising needs an encoder-decoder"):
        load_config(None, ["data.shards=unused", "model.preset=bert-tiny", "model.objective=bart"])
    load_config(
        None, ["data.shards=unused", "model.preset=t5-tiny", "model.objective=bart"]
    )  # T5 on BART's task
    with pytest.raises(ConfigError, match="only the bart family"):
        load_config(None, ["data.shards=unused", "model.preset=t5-tiny", "model.scale_embedding=true"])


@pytest.mark.parametrize("preset", ["spanbert-base", "bart-base", "bart-large"])
def test_published_parameter_counts(preset):
    total = count_parameters(preset)["total"]
    cfg = load_config(None, ["data.shards=unused", f"model.preset={preset}"]).model
    h, v = cfg.hidden_size, cfg.vocab_size
    with torch.device("meta"):  # transformers' own classes at the same shapes: an independent count
        if preset.startswith("bart"):
            hf = transformers.BartForConditionalGeneration(
                transformers.BartConfig(
                    vocab_size=v,
                    d_model=h,
                    encoder_layers=cfg.num_layers,
                    decoder_layers=cfg.decoder_layers,
                    encoder_attention_heads=cfg.num_heads,
                    decoder_attention_heads=cfg.num_heads,
                    encoder_ffn_dim=cfg.ffn_size,
                    decoder_ffn_dim=cfg.ffn_size,
                    max_position_embeddings=cfg.max_seq_len,
                )
            )
            # Tandem's output bias is a parameter (a buffer in transformers); transformers' position
            # tables carry 2 unused rows each.
            extra = v - 2 * 2 * h
        else:
            hf = transformers.BertForMaskedLM(
                transformers.BertConfig(vocab_size=v, hidden_size=h, max_position_embeddings=cfg.max_seq_len)
            )
            # Tandem's BERT keeps its pooler; the SBO head: 32 positions, W1 (3h -> h), W2, two norms, bias.
            extra = (h * h + h) + (32 * h + 3 * h * h + h + h * h + h + 4 * h + v)
    assert total == sum(p.numel() for p in hf.parameters()) + extra
    published = PUBLISHED[preset].params
    assert abs(total / published - 1) < 0.02, (total, published)


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("preset", ["spanbert-tiny", "bart-tiny"])
def test_tiny_preset_trains_with_falling_loss(preset, shards_dir, tmp_path):
    from tests.conftest import loss_ends, train_in_process

    steps = 30
    keys = {
        "model.preset": preset,
        "train.steps": steps,
        "data.seq_len": 32,
        "checkpoint.save_final": "false",
        "optimizer.warmup_steps": 3,
        "optimizer.lr": "3e-3",
    }
    _, metrics = train_in_process(shards_dir, tmp_path / "run", **keys)
    first, last = loss_ends(metrics, "loss", steps)
    # From ~ln(V) per loss term at init, 30 steps at lr 3e-3 bring the loss down by ~20% (seen with a
    # 1024-piece vocabulary: SpanBERT's MLM + SBO 13.6 -> 10.9, BART 6.9 -> 5.4); a 15% bar leaves room for
    # the noise of 8-sequence batches (a few % per step), and an untrained model stays within it.
    assert last < 0.85 * first, (first, last)
    if preset == "spanbert-tiny":
        assert {"mlm_loss", "sbo_loss"} <= set(metrics[steps])
        assert all(math.isfinite(metrics[steps][k]) for k in ("mlm_loss", "sbo_loss"))


def test_bart_fine_tunes_text_to_text_from_its_eos_start_token(tok):
    from pretrain.finetune import FinetuneOptions, finetune_text2text, greedy_decode_t5

    tokenizer = Tokenizer(tok["path"])
    eos, pad = int(tokenizer.eos_id), int(tokenizer.pad_id)
    cfg = load_config(
        None, ["data.shards=unused", "model.preset=bart-tiny", f"model.vocab_size={tok['vocab_size']}"]
    )
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    src = torch.randint(7, 300, (2, 9))
    mask = torch.ones_like(src)
    decoded = greedy_decode_t5(model, src, mask, max_len=4, eos_id=eos, pad_id=pad, start_id=eos)
    with torch.no_grad():  # the same argmax loop written out, from BART's <eos> start token
        prefix = torch.full((2, 1), eos)
        for _ in range(4):
            prefix = torch.cat([prefix, model(src, prefix, attention_mask=mask)[:, -1:].argmax(-1)], dim=1)
    for row, ids in zip(prefix[:, 1:].tolist(), decoded):
        assert ids == (row[: row.index(eos)] if eos in row else row)

    rows = [{"input": f"copy the word number {i}", "target": f"number {i}"} for i in range(8)]
    opts = FinetuneOptions(epochs=2, lr=1e-3, batch_size=4, max_len=16, max_target_len=6)
    _, info = finetune_text2text(model, cfg, tokenizer, rows[:6], rows[6:], opts, log=lambda _: None)
    assert info["task"] == "text2text" and math.isfinite(info["eval_loss"])
    with pytest.raises(ValueError, match="T5 or BART"):
        finetune_text2text(
            build_model(tiny_cfg("bert-tiny")),
            load_config(None, ["data.shards=unused", "model.preset=bert-tiny"]),
            tokenizer,
            rows,
            rows,
            opts,
        )
