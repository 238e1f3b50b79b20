"""In-context learning end to end: a tiny GPT pretrained on documents that each state one hidden rule many
times, then `pretrain eval --task fewshot` at 0, 1, 3 and 5 shots on a task only the demonstrations reveal.

Every pretraining document is a run of lines "<owner> <number> is <colour>" joined by " ; " (the prompt format
passed to the evaluator: template "{context} is {answer}", separator " ; "). The colour is drawn once per
document and repeated on every line, so nothing in the weights can say which colour comes next in a new
document: only earlier lines of the same document can. The evaluation files each fix one colour for all of
their examples (the evaluator draws demonstrations from the rest of the same file, so one rule per file keeps
every demonstration consistent with its query), and the curve is averaged over one file per colour.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import train_in_process

# Single pieces of the tokenizer trained below (the owners may split; only what precedes " is" must not).
NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
COLOURS = ("red", "blue", "green", "black", "white", "brown")
OWNERS = ("the", "a", "my", "your", "his", "her", "our", "their", "this", "that")
TEMPLATE, SEPARATOR = "{context} is {answer}", " ; "
SHOTS = (0, 1, 3, 5)


def pattern_document(rng: random.Random) -> str:
    colour = rng.choice(COLOURS)
    lines = [
        TEMPLATE.format(context=f"{rng.choice(OWNERS)} {rng.choice(NUMBERS)}", answer=colour)
        for _ in range(rng.randint(16, 32))
    ]
    return SEPARATOR.join(lines)


def write_pattern_corpus(path: Path, *, docs: int, seed: int) -> Path:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": pattern_document(rng)}) + "\n" for _ in range(docs)))
    return path


def write_task(path: Path, colour: str) -> Path:
    """40 multiple-choice examples (every owner with four numbers; distinct contexts, so none is excluded as
    a copy of the query), all answered by `colour`, the six colours as choices."""
    rows = [
        {"context": f"{owner} {number}", "choices": list(COLOURS), "answer": COLOURS.index(colour)}
        for owner in OWNERS
        for number in NUMBERS[:4]
    ]
    random.Random(colour).shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_fewshot_accuracy_rises_with_shots(tmp_path: Path, run_pretrain: Callable) -> None:
    from data_pipeline.sample_corpus import write_sample_corpus
    from data_pipeline.sharding import shard_corpus
    from data_pipeline.tokenizer import Tokenizer, train_tokenizer

    corpus = write_pattern_corpus(tmp_path / "corpus" / "patterns.jsonl", docs=3000, seed=0)
    # The patterns alone hold too few distinct strings for a 512-piece vocabulary; some ordinary prose
    # gives the tokenizer the rest. Only the patterns are pretrained on.
    prose = write_sample_corpus(tmp_path / "prose", docs=400, seed=0, docs_per_file=400)
    sp = train_tokenizer([corpus, *prose], vocab_size=512, out_prefix=tmp_path / "tok" / "sp")
    tok = Tokenizer(sp)
    for word in (*NUMBERS, *COLOURS, "is"):
        assert len(tok.encode(" " + word)) == 1, word
    shards = tmp_path / "shards"
    shard_corpus(
        [corpus], tokenizer_path=sp, out_dir=shards, workers=1, val_fraction=0.05, shard_size_mb=0.05
    )

    run = tmp_path / "run"
    # ~300k tokens; the loss reaches its floor (owner and number are random, the colour is not) by ~250 steps.
    train_in_process(
        shards,
        run,
        **{
            "model.max_seq_len": 128,  # room for 5-shot prompts (~45 tokens) without truncation
            "train.steps": 300,
            "train.micro_batch_size": 16,
            "train.global_batch_size": 16,
            "train.log_interval": 50,
            "optimizer.lr": "2e-3",
            "optimizer.warmup_steps": 30,
        },
    )

    curves = {}
    for colour in COLOURS:
        task = write_task(tmp_path / f"task-{colour}.jsonl", colour)
        args = ["eval", "--checkpoint", str(run), "--task", "fewshot", "--data", str(task)]
        args += ["--shots", ",".join(map(str, SHOTS)), "--template", TEMPLATE, "--separator", SEPARATOR]
        result = json.loads(run_pretrain([*args, "--json"], timeout=120).stdout.strip().splitlines()[-1])
        assert [r["shots"] for r in result["results"]] == list(SHOTS)
        assert all(r["truncated"] == 0 and r["n"] == 40 for r in result["results"])
        curves[colour] = [r["acc"] for r in result["results"]]
    mean = [sum(c[i] for c in curves.values()) / len(COLOURS) for i in range(len(SHOTS))]
    for colour, curve in curves.items():
        print(f"{colour:>5}: " + "  ".join(f"{k}-shot {a:.3f}" for k, a in zip(SHOTS, curve)))
    print(" mean: " + "  ".join(f"{k}-shot {a:.3f}" for k, a in zip(SHOTS, mean)))

    # A 0-shot prompt is the same in every file, so its prediction is right in exactly one of the six: the
    # mean 0-shot accuracy is chance, 1/6, whatever the model. The demonstrations are the only evidence of the
    # colour, so a model that does not use them stays at 1/6 for every k; 0.5 above chance (240 answers per
    # point, a binomial standard error under 0.03) is far beyond what a lucky draw could give.
    assert mean[0] == pytest.approx(1 / 6)
    assert mean[-1] - mean[0] >= 0.5
    assert mean[3] >= mean[1] - 0.05  # more shots do not hurt beyond noise
