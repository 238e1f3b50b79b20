"""End to end: tiny GPT/BERT/T5 checkpoints (3 steps each), then `pretrain eval`, `pretrain generate` and
`pretrain finetune` in subprocesses, each printing one JSON object on its last line."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import REPO, SMOKE_CONFIG, tiny_overrides

DATA = REPO / "tests" / "data"
TIMEOUT = 120  # seconds per verb; each takes a few seconds on 2 cores


@pytest.fixture(scope="module")
def checkpoints(
    shards_dir: Path, run_pretrain_module: Callable, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """family -> run directory of a 3-step tiny run; GPT also records its in-loop validation loss."""
    root = tmp_path_factory.mktemp("eval_runs")
    runs = {}
    for family in ("gpt", "bert", "t5"):
        out = root / family
        keys: dict[str, object] = {
            "train.steps": 3,
            "model.preset": f"{family}-tiny",
            "train.eval_interval": 3,
        }
        if family == "gpt":
            keys["model.max_seq_len"] = 256  # room for few-shot prompts (training still uses data.seq_len=64)
        run_pretrain_module(
            ["train", "--config", str(SMOKE_CONFIG), *tiny_overrides(shards_dir, out, **keys)], timeout=300
        )
        runs[family] = out
    return runs


def last_json(proc) -> dict:
    line = proc.stdout.strip().splitlines()[-1]
    result = json.loads(line)  # strict JSON: NaN/Infinity would have been written as null
    assert isinstance(result, dict)
    return result


def all_finite(obj: object) -> bool:
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(all_finite(v) for v in obj)
    return True


@pytest.mark.parametrize("family", ["gpt", "bert", "t5"])
def test_perplexity(family: str, checkpoints: dict[str, Path], run_pretrain: Callable) -> None:
    run = checkpoints[family]
    r = last_json(
        run_pretrain(["eval", "--checkpoint", str(run), "--task", "perplexity", "--json"], timeout=TIMEOUT)
    )
    assert r["family"] == family and r["split"] == "val" and r["batches"] == 4 and r["tokens"] > 0
    assert all_finite(r) and r["perplexity"] == pytest.approx(math.exp(r["loss"]))
    in_loop = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    eval_loss = [x["eval_loss"] for x in in_loop if "eval_loss" in x][-1]
    # Same batches and weights, and both means weight every target token equally (masked and span targets
    # vary per batch); the loop multiplies each batch's mean back by its targets, this sums per token, in
    # fp32 in another order: 1e-5 relative.
    assert r["loss"] == pytest.approx(eval_loss, rel=1e-5)


@pytest.mark.parametrize("data", ["fewshot_mc.jsonl", "fewshot_completion.jsonl"])
def test_fewshot(data: str, checkpoints: dict[str, Path], run_pretrain: Callable) -> None:
    args = ["eval", "--checkpoint", str(checkpoints["gpt"]), "--task", "fewshot", "--data", str(DATA / data)]
    r = last_json(run_pretrain([*args, "--shots", "0,1,3", "--seed", "1", "--json"], timeout=TIMEOUT))
    assert r["kind"] == ("multiple_choice" if "mc" in data else "completion")
    assert [x["shots"] for x in r["results"]] == [0, 1, 3] and all_finite(r)
    for x in r["results"]:
        assert 0.0 <= x["acc"] <= 1.0 and x["n"] == r["n"] >= 10
        assert x["acc_stderr"] == pytest.approx(math.sqrt(x["acc"] * (1 - x["acc"]) / x["n"]))
        if r["kind"] == "multiple_choice":
            assert 0.0 <= x["acc_norm"] <= 1.0
    again = last_json(run_pretrain([*args, "--shots", "0,1,3", "--seed", "1", "--json"], timeout=TIMEOUT))
    assert again["results"] == r["results"]


def test_generate(checkpoints: dict[str, Path], run_pretrain: Callable) -> None:
    base = ["generate", "--checkpoint", str(checkpoints["gpt"]), "--prompt", "The day", "--json"]
    greedy = last_json(run_pretrain([*base, "--max-new-tokens", "8", "--no-stop"], timeout=TIMEOUT))
    assert greedy["new_tokens"] == len(greedy["token_ids"]) == 8 and isinstance(greedy["text"], str)
    sample = [*base, "--max-new-tokens", "8", "--temperature", "0.9", "--top-k", "20", "--top-p", "0.9"]
    a = last_json(run_pretrain([*sample, "--seed", "7"], timeout=TIMEOUT))
    b = last_json(run_pretrain([*sample, "--seed", "7"], timeout=TIMEOUT))
    assert a["token_ids"] == b["token_ids"]


def test_wrong_family_and_missing_tokenizer_are_clear(
    checkpoints: dict[str, Path], run_pretrain: Callable
) -> None:
    proc = run_pretrain(
        [
            "eval",
            "--checkpoint",
            str(checkpoints["bert"]),
            "--task",
            "fewshot",
            "--data",
            str(DATA / "fewshot_mc.jsonl"),
        ],
        check=False,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 2 and "GPT checkpoint" in proc.stderr
    missing = REPO / "no-such-dir" / "sp.model"
    proc = run_pretrain(
        ["generate", "--checkpoint", str(checkpoints["gpt"]), "--prompt", "x", "--tokenizer", str(missing)],
        check=False,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 2 and str(missing) in proc.stderr


def test_finetune_verbs_write_weights_and_metrics(
    checkpoints: dict[str, Path], run_pretrain: Callable, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    for task, family, data in (
        ("classify", "bert", "classify_pair.jsonl"),
        ("classify", "bert", "classify_single.jsonl"),
        ("text2text", "t5", "text2text.jsonl"),
    ):
        out = tmp_path / data
        args = ["finetune", "--task", task, "--checkpoint", str(checkpoints[family]), "--out", str(out)]
        args += [
            "--train",
            str(DATA / data),
            "--eval",
            str(DATA / data),
            "--epochs",
            "2",
            "--batch-size",
            "4",
        ]
        r = last_json(run_pretrain([*args, "--max-target-len", "16", "--json"], timeout=TIMEOUT))
        assert r["task"] == task and all_finite(r)
        saved = json.loads((out / "metrics.json").read_text())
        assert len(saved["history"]) == 2 and (out / "config.yaml").is_file()
        weights = load_file(str(out / "model.safetensors"))
        if task == "classify":
            assert weights["head.weight"].shape[0] == len(saved["labels"]) == 2
            assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["macro_f1"] <= 1.0
        else:
            assert "embed.weight" in weights and 0.0 <= r["exact_match"] <= 1.0 and 0.0 <= r["rouge_l"] <= 1.0


def _keyword_task(n: int, seed: int) -> list[dict]:
    """label 1 iff the sentence contains "Monday" (a single piece of the test tokenizer), balanced."""
    words = [
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "day",
        "car",
        "love",
        "more",
        "you",
        "every",
        "works",
    ]
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        text = [rng.choice(words) for _ in range(rng.randint(4, 8))]
        if i % 2 == 0:
            text.insert(rng.randint(1, len(text)), "Monday")
        rows.append({"text": " ".join(text), "label": int(i % 2 == 0)})
    return rows


def test_finetuned_bert_learns_a_separable_task(
    checkpoints: dict[str, Path], run_pretrain: Callable, tmp_path: Path
) -> None:
    for name, rows in (("train", _keyword_task(80, 0)), ("eval", _keyword_task(40, 1))):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["finetune", "--task", "classify", "--checkpoint", str(checkpoints["bert"])]
    args += ["--train", str(tmp_path / "train.jsonl"), "--eval", str(tmp_path / "eval.jsonl")]
    args += ["--epochs", "12", "--lr", "1e-3", "--batch-size", "8", "--seed", "0", "--json"]
    pretrained = last_json(run_pretrain([*args, "--out", str(tmp_path / "ft")], timeout=TIMEOUT))
    scratch = last_json(
        run_pretrain([*args, "--out", str(tmp_path / "ft0"), "--from-scratch"], timeout=TIMEOUT)
    )
    print(
        f"keyword task, 40 eval examples: accuracy {pretrained['accuracy']:.3f} from the 3-step checkpoint, "
        f"{scratch['accuracy']:.3f} from random weights"
    )
    assert pretrained["accuracy"] >= 0.95 and pretrained["macro_f1"] >= 0.95


def _successor_task(n: int, seed: int) -> list[dict]:
    """text2text with task prefixes: "next: w" -> the number word after w, "previous: w" -> the one before
    (cyclic over one..ten), so the answer depends on both the prefix and the word."""
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        i, task = rng.randrange(len(words)), rng.choice(["next", "previous"])
        rows.append(
            {"input": f"{task}: {words[i]}", "target": words[(i + (1 if task == "next" else -1)) % 10]}
        )
    return rows


def test_finetuned_t5_learns_a_text_to_text_task(
    checkpoints: dict[str, Path], run_pretrain: Callable, tmp_path: Path
) -> None:
    for name, rows in (("train", _successor_task(160, 0)), ("eval", _successor_task(40, 1))):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["finetune", "--task", "text2text", "--checkpoint", str(checkpoints["t5"])]
    args += ["--train", str(tmp_path / "train.jsonl"), "--eval", str(tmp_path / "eval.jsonl")]
    args += ["--epochs", "15", "--lr", "2e-3", "--batch-size", "16", "--seed", "0", "--max-target-len", "8"]
    args += ["--json"]
    greedy = last_json(run_pretrain([*args, "--out", str(tmp_path / "ft")], timeout=TIMEOUT))
    beam = last_json(
        run_pretrain([*args, "--out", str(tmp_path / "ftb"), "--num-beams", "3"], timeout=TIMEOUT)
    )
    scratch = last_json(
        run_pretrain([*args, "--out", str(tmp_path / "ft0"), "--from-scratch"], timeout=TIMEOUT)
    )
    print(
        f"next/previous task, 40 eval examples: exact match {greedy['exact_match']:.3f} greedy, "
        f"{beam['exact_match']:.3f} 3-beam from the 3-step checkpoint; {scratch['exact_match']:.3f} from random "
        f"weights ({greedy['seconds']:.0f} s per run)"
    )
    assert greedy["exact_match"] >= 0.90 and beam["exact_match"] >= 0.90
