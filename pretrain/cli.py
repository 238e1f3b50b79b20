"""`pretrain` command line: data preparation, training and the one-command smoke run.

Works as `pretrain VERB ...` and `python -m pretrain VERB ...`, so `deepspeed --module pretrain train ...`
and `torchrun -m pretrain train ...` work too (the deepspeed launcher puts `--local_rank=N` before VERB).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pretrain.config import CONFIG_DIR, Config, ConfigError, config_help


def _add_data_verbs(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser(
        "data",
        help="prepare corpora, tokenizers and shards",
        description="Prepare corpora, tokenizers and webdataset shards.",
    )
    dsub = data.add_subparsers(dest="data_verb", metavar="VERB", required=True)

    p = dsub.add_parser(
        "sample",
        help="write the built-in procedural C4-style sample corpus",
        description="Write a deterministic C4-style sample corpus (.json.gz, one "
        '{"text","url","timestamp"} object per line) from Tandem\'s procedural generator.',
    )
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--docs", type=int, default=2000, help="number of documents (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.set_defaults(func=cmd_data_sample)

    p = dsub.add_parser(
        "tokenizer",
        help="train a sentencepiece tokenizer with Tandem's reserved tokens",
        description="Train sentencepiece (byte fallback on) with the reserved tokens <pad> <unk> "
        "<s> </s> <cls> <sep> <mask> and T5 sentinels <extra_id_0..N-1>.",
    )
    p.add_argument("--input", required=True, help="files, directories or globs (comma-separated)")
    p.add_argument("--vocab-size", required=True, type=int, help="vocabulary size, reserved tokens included")
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram", help="default unigram")
    p.add_argument("--num-sentinels", type=int, default=100, help="T5 sentinel tokens (default 100)")
    p.add_argument("--max-documents", type=int, default=100_000, help="documents sampled for training")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_tokenizer)

    p = dsub.add_parser(
        "shard",
        help="tokenize documents into webdataset tar shards with a manifest",
        description="Tokenize documents in parallel into webdataset tar shards plus "
        "DIR/manifest.json (per shard: documents, tokens, bytes, sha256), on --workers processes or as "
        "Slurm job arrays (--executor slurm --tasks N), with the same bytes either way. A rerun runs only "
        "the unfinished tasks; `pretrain data status DIR` shows how far a job has got.",
    )
    p.add_argument("--input", required=True, help="files, directories or globs (comma-separated)")
    p.add_argument(
        "--tokenizer", required=True, type=Path, help="PREFIX.model from `pretrain data tokenizer`"
    )
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument(
        "--val-fraction", type=float, default=0.0, help="fraction of documents held out (default 0)"
    )
    p.add_argument("--shard-size-mb", type=float, default=64.0, help="raw text per shard in MB (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    from pretrain.cli_data_clean import add_shard_cleaning_args, register_clean, register_status

    add_shard_cleaning_args(p)  # --clean --errors --lenient ... --json, --buckets --piece-mb, --executor ...
    p.set_defaults(func=cmd_data_shard)

    from pretrain.cli_inspect import register_inspect

    register_inspect(dsub)
    register_clean(dsub)
    register_status(dsub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain",
        description="Tandem: pretrain GPT, BERT and T5 language models from raw web text.",
    )
    parser.add_argument(
        "--local_rank",
        "--local-rank",
        type=int,
        default=None,
        help="set by the deepspeed launcher; read from LOCAL_RANK otherwise",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    _add_data_verbs(sub)
    from pretrain.cli_launch import register as register_launch
    from pretrain.scaling_cli import register as register_scaling

    register_scaling(sub)
    register_launch(sub)
    from pretrain.cli_eval import register as register_eval

    register_eval(sub)
    from pretrain.cli_info import register as register_info

    register_info(sub)
    from pretrain.cli_embed import register as register_embed

    register_embed(sub)

    p = sub.add_parser(
        "train",
        help="train a model from a YAML config plus dotted overrides",
        description="Train from --config FILE plus SECTION.KEY=VALUE overrides. The resolved config is saved "
        "as RUN/config.yaml; metrics go to RUN/metrics.jsonl and RUN/tb/; checkpoints to RUN/checkpoints/.",
        epilog="configuration keys:\n" + config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, help="YAML run config, e.g. configs/runs/smoke-gpt.yaml")
    p.add_argument(
        "overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="e.g. train.steps=50 optimizer.lr=1e-3"
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "export",
        help="write a checkpoint as a Hugging Face directory or one safetensors file",
        description="Export RUN/checkpoints/step-N: --format hf writes config.json, model.safetensors and the "
        "sentencepiece tokenizer for transformers' AutoModelFor...from_pretrained (GPT -> GPT2LMHeadModel or "
        "LlamaForCausalLM, BERT -> BertForMaskedLM, T5 -> T5ForConditionalGeneration); --format safetensors "
        "writes the consolidated weights under Tandem's names plus config.yaml.",
    )
    p.add_argument(
        "--checkpoint", required=True, type=Path, help="a checkpoint directory (RUN/checkpoints/step-N)"
    )
    p.add_argument("--format", choices=["hf", "safetensors"], default="hf", help="default hf")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.set_defaults(func=cmd_export)

    ckpt = sub.add_parser(
        "ckpt",
        help="verify, inspect, reshard and replay checkpoints",
        description="Check, describe, convert and replay checkpoint directories (RUN/checkpoints/step-N).",
    )
    csub = ckpt.add_subparsers(dest="ckpt_verb", metavar="VERB", required=True)
    p = csub.add_parser(
        "verify",
        help="re-check every file's size and sha256 against the manifest",
        description="Exit 0 if the checkpoint is complete and intact, 1 naming each bad file.",
    )
    p.add_argument(
        "checkpoint", type=Path, help="a checkpoint directory, or a run's checkpoints/ directory (all)"
    )
    p.set_defaults(func=cmd_ckpt_verify)
    p = csub.add_parser(
        "inspect",
        help="print layout, step, tokens and sizes",
        description="Print a checkpoint's step, tokens seen, layout (tp/pp/dp/zero), files and sizes.",
    )
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--json", action="store_true", help="print the manifest summary as one JSON line")
    p.set_defaults(func=cmd_ckpt_inspect)
    p = csub.add_parser(
        "reshard",
        help="rewrite a checkpoint at another tp/pp/dp layout (ZeRO stage 0, fp32)",
        description="Write CHECKPOINT re-split for another tensor/pipeline/data-parallel layout as a complete "
        "checkpoint in OUT (weights and Adam states merged and re-split; schedule, step and loader position "
        "unchanged). `train.resume=OUT` then continues at that layout. Resuming at another layout does this "
        "automatically; this verb does it offline.",
    )
    p.add_argument("checkpoint", type=Path)
    p.add_argument(
        "--to", required=True, metavar="tp=N,pp=N[,dp=N]", help="the target layout (dp: default saved)"
    )
    p.add_argument(
        "--out", required=True, type=Path, help="output checkpoint directory (replaced if it exists)"
    )
    p.set_defaults(func=cmd_ckpt_reshard)
    from pretrain.replay import register as register_replay

    register_replay(csub)

    p = sub.add_parser(
        "smoke",
        help="sample corpus -> tokenizer -> shards -> short training run",
        description="The whole chain on the built-in sample corpus with configs/runs/smoke-MODEL.yaml. "
        "Leaves the corpus, tokenizer and shards in OUT/data/ and the run in OUT/run/ (GPT) or "
        "OUT/run-bert/, OUT/run-t5/. --model may also name a preset (configs/models/NAME.yaml, e.g. "
        "gpt3-tiny): it trains with configs/runs/smoke-NAME.yaml if that exists, else with its family's "
        "smoke config whose model section is replaced by the preset; the run goes to OUT/run-NAME/.",
    )
    p.add_argument("--out", type=Path, default=Path("smoke"), help="output directory (default ./smoke)")
    p.add_argument(
        "--model", default="gpt", help="gpt, bert, t5 or a preset name from configs/models/ (default gpt)"
    )
    p.add_argument("--steps", type=int, default=None, help="override train.steps")
    p.add_argument("--docs", type=int, default=3000, help="sample corpus documents (default 3000)")
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="further config overrides")
    p.set_defaults(func=cmd_smoke)
    return parser


# ----------------------------------------------------------------------------- verbs


def cmd_data_sample(args: argparse.Namespace) -> int:
    from data_pipeline.sample_corpus import write_sample_corpus

    paths = write_sample_corpus(args.out, docs=args.docs, seed=args.seed)
    print(f"wrote {args.docs} documents to {len(paths)} file(s) in {args.out}")
    return 0


def cmd_data_tokenizer(args: argparse.Namespace) -> int:
    from data_pipeline.corpus import expand_inputs
    from data_pipeline.tokenizer import Tokenizer, train_tokenizer

    model = train_tokenizer(
        expand_inputs(args.input),
        vocab_size=args.vocab_size,
        out_prefix=args.out,
        model_type=args.model_type,
        num_sentinels=args.num_sentinels,
        max_documents=args.max_documents,
        seed=args.seed,
    )
    tok = Tokenizer(model)
    print(f"wrote {model} (vocab {tok.vocab_size}, sha256 {tok.sha256[:12]})")
    return 0


def cmd_data_shard(args: argparse.Namespace) -> int:
    from pretrain.cli_data_clean import cmd_data_shard as shard_with_flags

    return shard_with_flags(args)


def cmd_train(args: argparse.Namespace) -> int:
    from pretrain.cli_eval import _leave
    from pretrain.config import load_config
    from pretrain.replay import ResumeMismatch
    from pretrain.train import train

    cfg = load_config(args.config, args.overrides, validate=True)
    try:
        result = train(cfg)
    except ResumeMismatch as exc:  # train.verify_resume: every rank stops here together
        if _is_rank0():
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return _leave(1)
    except RuntimeError as exc:
        from pretrain.distributed import is_collective_timeout

        if not is_collective_timeout(exc):
            raise
        rank = os.environ.get("RANK", "0")
        print(
            f"error: rank {rank}: a collective timed out after train.collective_timeout_s="
            f"{cfg.train.collective_timeout_s:g} s (a peer stopped participating): {exc}",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        # Process-group teardown would wait on the silent peer again: leave at once.
        os._exit(1)
    if result.stopped_early:
        from pretrain.preemption import EXIT_PREEMPTED

        if _is_rank0():
            print(
                f"stopped at step {result.steps} ({result.stopped_early}); checkpoint {result.checkpoint}; "
                "rerun with train.resume=auto to continue"
            )
        return _leave(EXIT_PREEMPTED)
    if _is_rank0():
        print(
            f"trained {result.steps} steps: final loss {_fmt(result.final_loss)}, "
            f"{_fmt(result.tokens_per_s, '.0f')} tokens/s, checkpoint {result.checkpoint}"
        )
    # Under a launcher: barrier, then leave without interpreter teardown of the gloo groups, which aborted
    # a rank now and then after its work was written (see pretrain.cli_eval._leave).
    return _leave(0)


def _checkpoint_dirs(path: Path) -> list[Path]:
    if (path / "manifest.json").is_file() or path.name.startswith("step-"):
        return [path]
    return sorted((p for p in path.glob("step-*") if p.is_dir()), key=lambda p: p.name)


def cmd_ckpt_verify(args: argparse.Namespace) -> int:
    from pretrain.checkpoint import verify_checkpoint

    dirs = _checkpoint_dirs(args.checkpoint)
    if not dirs:
        print(f"error: {args.checkpoint}: no checkpoint directories", file=sys.stderr)
        return 2
    bad = 0
    for d in dirs:
        problems = verify_checkpoint(d)
        bad += bool(problems)
        print(f"{d}: {'OK' if not problems else 'DAMAGED'}")
        for problem in problems:
            print(f"  {problem}")
    return 1 if bad else 0


def cmd_ckpt_inspect(args: argparse.Namespace) -> int:
    from pretrain.checkpoint import CheckpointError, read_manifest

    try:
        m = read_manifest(args.checkpoint)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    total = sum(f["bytes"] for f in m["files"].values())
    summary = {
        "step": m.get("step"),
        "tokens": m.get("tokens"),
        "consumed_samples": m.get("consumed_samples"),
        "family": m.get("family"),
        "layout": m.get("layout"),
        "world_size": m.get("world_size"),
        "files": len(m["files"]),
        "bytes": total,
    }
    if args.json:
        print(json.dumps(summary))
        return 0
    for key, value in summary.items():
        print(f"{key:17} {value}")
    for name, f in m["files"].items():
        print(f"  {f['bytes']:>12}  {name}")
    return 0


def cmd_ckpt_reshard(args: argparse.Namespace) -> int:
    from pretrain.checkpoint import CheckpointError
    from pretrain.reshard import ReshardError, parse_layout, reshard_checkpoint

    try:
        to = parse_layout(args.to)
        out = reshard_checkpoint(args.checkpoint, args.out, tp=to["tp"], pp=to["pp"], dp=to.get("dp"))
    except (ReshardError, CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    layout = json.loads((out / "meta.json").read_text(encoding="utf-8"))["layout"]
    print(f"resharded {args.checkpoint} to {out} at tp={layout['tp']}, pp={layout['pp']}, dp={layout['dp']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pretrain.export import ExportError, export_checkpoint

    try:
        what = export_checkpoint(args.checkpoint, args.out, fmt=args.format)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} to {args.out} ({what})")
    return 0


def cmd_smoke(args: argparse.Namespace) -> int:
    from data_pipeline.corpus import expand_inputs
    from data_pipeline.manifest import unigram_entropy
    from data_pipeline.sample_corpus import write_sample_corpus
    from data_pipeline.sharding import shard_corpus
    from data_pipeline.tokenizer import train_tokenizer
    from pretrain.config import load_config
    from pretrain.train import train

    out: Path = args.out
    data = out / "data"
    corpus_dir, tok_prefix, shards = data / "corpus", data / "tokenizer" / "sp", data / "shards"
    run_cfg, preset = _smoke_run_config(args.model)
    run_dir = out / "run" if args.model == "gpt" else out / f"run-{args.model}"
    overrides = [f"data.shards={shards}", f"train.out_dir={run_dir}", *args.overrides]
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
        if not any(o.startswith("optimizer.warmup_steps=") for o in args.overrides):
            # A shortened smoke run keeps warmup at most a tenth of its steps.
            base = load_config(run_cfg, validate=False).optimizer.warmup_steps
            overrides.append(f"optimizer.warmup_steps={min(base, args.steps // 10)}")
    cfg = _load_smoke_config(run_cfg, preset, overrides)  # fail on a bad override before any work

    if _is_rank0():
        if not corpus_dir.is_dir() or not any(corpus_dir.glob("*.json.gz")):
            write_sample_corpus(corpus_dir, docs=args.docs, seed=0)
            print(f"[1/4] sample corpus: {args.docs} documents in {corpus_dir}")
        else:
            print(f"[1/4] sample corpus: reusing {corpus_dir}")
        model_path = tok_prefix.with_suffix(".model")
        if not model_path.is_file():
            tok_prefix.parent.mkdir(parents=True, exist_ok=True)
            train_tokenizer(expand_inputs(corpus_dir), vocab_size=SMOKE_VOCAB, out_prefix=tok_prefix, seed=0)
        print(f"[2/4] tokenizer: {model_path}")
        manifest = shard_corpus(
            expand_inputs(corpus_dir),
            tokenizer_path=model_path,
            out_dir=shards,
            workers=2,
            val_fraction=0.05,
            shard_size_mb=0.25,
            seed=0,
        )
        tr = manifest["totals"]["train"]
        print(f"[3/4] shards: {tr['shards']} train shard(s), {tr['tokens']} tokens in {shards}")
    from pretrain.distributed import barrier, init_distributed

    init_distributed(timeout_s=cfg.train.collective_timeout_s)
    barrier()  # under a launcher, other ranks wait for rank 0's data
    print("[4/4] training") if _is_rank0() else None
    result = train(cfg)
    if _is_rank0():
        print(f"first loss        {_fmt(result.first_loss)} nats/token")
        print(f"final loss        {_fmt(result.final_loss)} nats/token (mean of the last log interval)")
        entropy = unigram_entropy(shards)
        print(f"unigram entropy   {entropy:.4f} nats/token (of the training shards)")
        if result.eval_loss is not None:
            print(f"validation loss   {result.eval_loss:.4f}")
        print(f"throughput        {_fmt(result.tokens_per_s, '.0f')} tokens/s")
        print(f"checkpoint        {result.checkpoint}")
        print(f"metrics           {result.run_dir / 'metrics.jsonl'}")
        if result.final_loss is None or result.first_loss is None:
            print("smoke FAILED: no loss was recorded", file=sys.stderr)
            return 1
        if cfg.model.objective_name == "gpt":
            # A next-token model that learned only token frequencies would score the unigram entropy.
            if result.final_loss >= entropy:
                print("smoke FAILED: final loss is not below the unigram entropy", file=sys.stderr)
                return 1
            print("smoke OK: final loss is below the unigram entropy")
        else:
            # Masked and span targets exclude <eos>/<sep>, so their frequency-only baseline is not the stream's
            # unigram entropy; the bar is a clear drop from the starting loss.
            if result.final_loss > SMOKE_MIN_DROP * result.first_loss:
                print(
                    f"smoke FAILED: final loss is not below {SMOKE_MIN_DROP:.0%} of the first",
                    file=sys.stderr,
                )
                return 1
            print(f"smoke OK: final loss is below {SMOKE_MIN_DROP:.0%} of the first loss")
    return 0


SMOKE_VOCAB = 1024
SMOKE_MIN_DROP = 0.75
SMOKE_FAMILIES = ("gpt", "bert", "t5")


def _smoke_run_config(model: str) -> tuple[Path, str | None]:
    """`pretrain smoke --model X` -> (run config, preset replacing its model section or None).

    gpt/bert/t5 and any X with its own configs/runs/smoke-X.yaml use that file as it is; another preset
    name uses its family's smoke config with the model section replaced by the preset."""
    from pretrain.config import available_presets, config_from_dict

    own = CONFIG_DIR / "runs" / f"smoke-{model}.yaml"
    if model in SMOKE_FAMILIES or own.is_file():
        return own, None
    if model not in available_presets():
        raise ConfigError(
            [
                f"--model {model!r}: neither a family ({', '.join(SMOKE_FAMILIES)}) nor a preset in "
                f"configs/models/; presets: {', '.join(available_presets())}"
            ]
        )
    family = config_from_dict({"model": {"preset": model}}, validate=False).model.family
    return CONFIG_DIR / "runs" / f"smoke-{family}.yaml", model


def _load_smoke_config(run_cfg: Path, preset: str | None, overrides: list[str]) -> Config:
    """The run config (with its model section replaced by `model.preset=PRESET`, so the family's smoke
    shape does not override the preset's), then the dotted overrides."""
    from pretrain.config import _merge, _read_yaml, config_from_dict, load_config, parse_overrides

    if preset is None:
        return load_config(run_cfg, overrides)
    raw = _read_yaml(run_cfg)
    raw["model"] = {"preset": preset}
    over, problems = parse_overrides(overrides)
    return config_from_dict(
        _merge(raw, over), base_dir=run_cfg.parent, problems=problems, source=f"{run_cfg} with {preset}"
    )


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def _quiet_optional_backends() -> None:
    """megatron-core warns once per module that Transformer Engine / Apex are absent; Tandem uses only its
    device-agnostic scheduler, so the warnings say nothing actionable."""
    import warnings

    warnings.filterwarnings("ignore", message=".*Transformer Engine.*", category=UserWarning)
    warnings.filterwarnings("ignore", message=".*Apex.*", category=UserWarning)


def main(argv: list[str] | None = None) -> int:
    _quiet_optional_backends()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
