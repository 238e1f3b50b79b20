"""The `pretrain` command line as users type it: help on every verb, the data verbs chained end to end,
one clear error for a bad config, and the smoke run."""

from __future__ import annotations

import argparse
import gzip
import json
import re

import pytest

from data_pipeline.manifest import load_manifest, verify_shards
from pretrain.cli import build_parser, main
from tests.conftest import REPO, SMOKE_CONFIG


def _verbs(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every verb and sub-verb the parser knows, read from the parser itself (not a list kept by hand)."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += [(*prefix, name), *_verbs(sub, (*prefix, name))]
    return found


VERBS = [(), *_verbs(build_parser())]


@pytest.mark.parametrize("verb", VERBS, ids=lambda v: " ".join(v) or "pretrain")
def test_help_of_every_verb(verb, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*verb, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: pretrain")


def _readme_commands() -> str:
    """The lines inside README.md's fenced code blocks."""
    lines, inside = [], False
    for line in (REPO / "README.md").read_text().splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
        elif inside:
            lines.append(line)
    return "\n".join(lines)


def test_readme_has_an_example_of_every_verb():
    """The README documents every verb with an example: a command line in one of its code blocks that
    runs that verb (a verb with sub-verbs counts through theirs)."""
    commands = _readme_commands()
    missing = [
        " ".join(verb)
        for verb in VERBS[1:]
        if not re.search(r"\bpretrain\s+" + r"\s+".join(map(re.escape, verb)) + r"(\s|$)", commands, re.M)
    ]
    assert not missing, f"README.md has no example command for: {missing}"


def test_train_help_lists_every_config_key(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for key in (
        "train.out_dir",
        "train.resume",
        "data.shards",
        "parallel.zero_stage",
        "optimizer.lr",
        "model.preset",
    ):
        assert key in out


def test_launcher_local_rank_argument_is_accepted_before_the_verb():
    args = build_parser().parse_args(["--local_rank=1", "train", "--config", "x.yaml", "train.steps=3"])
    assert args.local_rank == 1 and args.verb == "train" and args.overrides == ["train.steps=3"]


def test_python_dash_m_pretrain(run_pretrain):
    proc = run_pretrain(["--help"])
    for verb in ("data", "train", "smoke"):
        assert re.search(rf"^\s+{verb}\s+\S", proc.stdout, re.M), f"verb {verb} missing from --help"


def test_data_verbs_chain_into_verified_shards(tmp_path, capsys):
    corpus, prefix, shards = tmp_path / "corpus", tmp_path / "tok" / "sp", tmp_path / "shards"
    assert main(["data", "sample", "--out", str(corpus), "--docs", "300", "--seed", "5"]) == 0
    files = sorted(corpus.glob("*.json.gz"))
    with gzip.open(files[0], "rt", encoding="utf-8") as fh:
        first = json.loads(fh.readline())
    assert set(first) == {"text", "url", "timestamp"}
    assert (
        main(["data", "tokenizer", "--input", str(corpus), "--vocab-size", "512", "--out", str(prefix)]) == 0
    )
    assert (
        main(
            [
                "data",
                "shard",
                "--input",
                f"{corpus}/*.json.gz",
                "--tokenizer",
                f"{prefix}.model",
                "--out",
                str(shards),
                "--workers",
                "2",
                "--val-fraction",
                "0.1",
                "--shard-size-mb",
                "0.05",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "train:" in out and "val:" in out
    manifest = load_manifest(shards)
    assert manifest["totals"]["train"]["documents"] + manifest["totals"]["val"]["documents"] == 300
    assert verify_shards(shards) == []


def test_bad_config_is_one_error_naming_every_problem(tmp_path, capsys, shards_dir):
    code = main(
        [
            "train",
            "--config",
            str(SMOKE_CONFIG),
            f"data.shards={shards_dir}",
            "model.hidden_size=102",
            "train.stpes=3",
            "optimizer.lr=-1",
            "parallel.zero_stage=7",
            "train.precision=fp8",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    for needle in (
        "6 problem(s)",
        "model.hidden_size=102",
        "train.stpes: unknown key",
        "did you mean train.steps",
        "optimizer.lr=-1.0: must be > 0",
        "parallel.zero_stage=7",
        "train.precision='fp8'",
    ):
        assert needle in err, needle


def test_missing_config_file_is_named(capsys):
    assert main(["train", "--config", "no/such/run.yaml"]) == 2
    assert "no/such/run.yaml" in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_trains_below_the_unigram_entropy(tmp_path, run_pretrain):
    out = tmp_path / "smoke"
    proc = run_pretrain(["smoke", "--out", str(out), "--steps", "60", "--docs", "1500"], timeout=600)
    assert "smoke OK" in proc.stdout
    final = float(re.search(r"final loss\s+([\d.]+)", proc.stdout).group(1))
    entropy = float(re.search(r"unigram entropy\s+([\d.]+)", proc.stdout).group(1))
    assert final < entropy
    assert (out / "data" / "shards" / "manifest.json").is_file()
    assert (out / "run" / "checkpoints" / "step-60" / "meta.json").is_file()
    assert (out / "run" / "metrics.jsonl").is_file() and (out / "run" / "config.yaml").is_file()
