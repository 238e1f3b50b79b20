"""`pretrain eval`, `pretrain generate` and `pretrain finetune`: using what was pretrained.

`register(sub)` adds the three verbs to the `pretrain` parser. With `--json` each prints its metrics as one
JSON object on the last line of stdout (progress lines go before it), so scripts can read `lines[-1]`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any


def _checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        help="a checkpoint directory (RUN/checkpoints/step-N), or a run / checkpoints directory (newest step)",
    )
    p.add_argument(
        "--tokenizer", type=Path, default=None, help="sentencepiece model; default: the shards manifest's"
    )
    p.add_argument(
        "--shards", type=Path, default=None, help="shards directory; default: the checkpoint's data.shards"
    )
    p.add_argument(
        "--json", action="store_true", help="print the metrics as one JSON object on the last line"
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="validation perplexity (all families) or zero/one/few-shot accuracy (GPT)",
        description="--task perplexity: token-weighted loss of the checkpoint's own objective and exp(loss) on a "
        "shards split. --task fewshot: in-context accuracy on a JSONL task (multiple choice "
        '{"context","choices","answer"} by log-likelihood, plain and per-token; completion '
        '{"context","completion"} by greedy exact match) with k demonstrations per query. In one process the '
        "checkpoint is consolidated; under deepspeed/torchrun/srun (WORLD_SIZE > 1) it is loaded in place at "
        "--tp x --pp (default: its own layout), dp = world / (tp x pp), and rank 0 prints the result.",
    )
    _checkpoint_args(p)
    p.add_argument("--task", choices=["perplexity", "fewshot"], required=True)
    p.add_argument(
        "--split", default=None, help="perplexity: manifest split (default: the config's data.eval_split)"
    )
    p.add_argument(
        "--batches", type=int, default=None, help="perplexity: micro batches (default train.eval_batches)"
    )
    p.add_argument(
        "--micro-batch-size", type=int, default=None, help="perplexity: default train.micro_batch_size"
    )
    p.add_argument("--data", type=Path, help="fewshot: the JSONL task file")
    p.add_argument(
        "--pool", type=Path, default=None, help="fewshot: demonstrations (default: the other examples)"
    )
    p.add_argument("--shots", default="0,1,5", help="fewshot: comma-separated k values (default 0,1,5)")
    p.add_argument("--seed", type=int, default=0, help="fewshot: seed of the demonstration draw (default 0)")
    p.add_argument(
        "--template",
        default="{context} {answer}",
        help="fewshot: one example's text, with {context} then {answer} (default '{context} {answer}')",
    )
    p.add_argument(
        "--separator", default="\n\n", help="fewshot: text between examples (default a blank line)"
    )
    p.add_argument("--limit", type=int, default=None, help="fewshot: evaluate only the first N examples")
    p.add_argument(
        "--tp",
        type=int,
        default=None,
        help="under a launcher: tensor-parallel degree to evaluate at (default: the checkpoint's)",
    )
    p.add_argument(
        "--pp",
        type=int,
        default=None,
        help="under a launcher: pipeline-parallel degree to evaluate at (default: the checkpoint's)",
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "generate",
        help="continue a prompt with a GPT checkpoint (greedy, top-k, top-p; key/value cache)",
        description="Generate from a GPT checkpoint. Temperature 0 is greedy; otherwise tokens are sampled from "
        "the softmax at that temperature, restricted to the top-k and/or top-p (nucleus) set.",
    )
    _checkpoint_args(p)
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=32, help="default 32")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = all")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1.0 = off")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--no-stop", action="store_true", help="do not stop at </s>")
    p.add_argument(
        "--num-beams",
        type=int,
        default=1,
        help="beam search with this many beams (most likely continuation; sampling options unused); default 1",
    )
    p.add_argument(
        "--length-penalty",
        type=float,
        default=0.0,
        help="beam search: rank finished beams by sum log p / length**this (default 0: plain log-likelihood)",
    )
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "finetune",
        help="fine-tune BERT (classify) or T5/BART (text2text), all parameters, and evaluate",
        description="--task classify (BERT): dropout + linear on the pooled <cls>; JSONL {text, label} or "
        "{text, text_pair, label}; accuracy and macro-F1. --task text2text (T5, BART): JSONL {input, target}, "
        "teacher-forced training, greedy decoding; exact match and ROUGE-L. Runs through the DeepSpeed engine, "
        "data parallel under deepspeed/torchrun/srun (--batch-size is the global batch); writes "
        "OUT/checkpoints/step-N (resumed by default), OUT/metrics.jsonl, and at the end OUT/model.safetensors, "
        "OUT/config.yaml and OUT/metrics.json.",
    )
    _checkpoint_args(p)
    p.add_argument("--task", choices=["classify", "text2text"], required=True)
    p.add_argument("--train", required=True, type=Path, help="JSONL training examples")
    p.add_argument("--eval", required=True, type=Path, help="JSONL evaluation examples")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--epochs", type=int, default=3, help="default 3")
    p.add_argument(
        "--lr", type=float, default=None, help="peak learning rate (default 5e-5 classify, 3e-4 text2text)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="examples per step over all data-parallel ranks (default 16)",
    )
    p.add_argument("--seed", type=int, default=0, help="default 0")
    p.add_argument("--max-len", type=int, default=128, help="input tokens per example (default 128)")
    p.add_argument("--max-target-len", type=int, default=64, help="text2text: target tokens (default 64)")
    p.add_argument(
        "--num-beams",
        type=int,
        default=1,
        help="text2text: beam width of the evaluation decode (default 1, greedy)",
    )
    p.add_argument(
        "--from-scratch",
        action="store_true",
        help="same architecture, random weights: the baseline that shows what pretraining contributed",
    )
    p.add_argument(
        "--dropout", type=float, default=0.1, help="classify: dropout before the new head (default 0.1)"
    )
    p.add_argument(
        "--grad-clip", type=float, default=1.0, help="global gradient-norm clip; 0 = off (default 1)"
    )
    p.add_argument("--zero-stage", type=int, default=0, help="ZeRO stage 0, 1 or 2 (default 0)")
    p.add_argument(
        "--save-interval",
        type=int,
        default=0,
        help="steps between checkpoints in OUT/checkpoints (default 0: after the last step only)",
    )
    p.add_argument("--keep-last", type=int, default=2, help="checkpoints to keep; 0 keeps all (default 2)")
    p.add_argument(
        "--resume",
        default="auto",
        help="'auto' (newest checkpoint in OUT/checkpoints, the default), 'never', or a checkpoint directory",
    )
    p.set_defaults(func=cmd_finetune)


# ----------------------------------------------------------------------------- helpers


def _finite(obj: Any) -> Any:
    # JSON has no NaN/Infinity: write them as null so every reader parses the line.
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _report(args: argparse.Namespace, result: dict[str, Any], lines: list[str]) -> None:
    for line in lines:
        print(line, file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(_finite(result)), flush=True)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _load(args: argparse.Namespace) -> tuple[Any, Any, Path]:
    from pretrain.evaluate import resolve_checkpoint
    from pretrain.export import load_model

    checkpoint = resolve_checkpoint(args.checkpoint)
    model, cfg = load_model(checkpoint)
    return model, cfg, checkpoint


def _tokenizer(args: argparse.Namespace, cfg: Any, checkpoint: Path) -> Any:
    from pretrain.evaluate import load_tokenizer

    return load_tokenizer(cfg, checkpoint=checkpoint, shards=args.shards, explicit=args.tokenizer)


# ----------------------------------------------------------------------------- verbs


def cmd_eval(args: argparse.Namespace) -> int:
    from pretrain.distributed import launched_world_size
    from pretrain.evaluate import PromptFormat, fewshot_eval, iter_shots, validation_loss

    try:
        if args.task == "fewshot" and args.data is None:
            return _fail("--task fewshot needs --data FILE.jsonl")
        for name in ("tp", "pp", "batches", "micro_batch_size"):
            value = getattr(args, name)
            if value is not None and value < 1:
                return _fail(f"--{name.replace('_', '-')}={value} must be >= 1")
        shots = list(iter_shots(args.shots)) if args.task == "fewshot" else []
        fmt = PromptFormat(template=args.template, separator=args.separator)
        t0 = time.perf_counter()
        if launched_world_size() > 1:
            return _eval_in_place(args, shots, fmt, t0)
        if (args.tp or 1) * (args.pp or 1) > 1:
            return _fail(
                f"--tp {args.tp or 1} --pp {args.pp or 1} needs {(args.tp or 1) * (args.pp or 1)} processes: "
                "launch with deepspeed or torchrun (one process evaluates the consolidated weights)"
            )
        model, cfg, checkpoint = _load(args)
        if args.task == "perplexity":
            result = validation_loss(
                model,
                cfg,
                shards=args.shards,
                split=args.split,
                num_batches=args.batches,
                micro_batch_size=args.micro_batch_size,
            )
        else:
            if cfg.model.family != "gpt":
                return _fail(f"--task fewshot needs a GPT checkpoint; {checkpoint} is {cfg.model.family!r}")
            tok = _tokenizer(args, cfg, checkpoint)
            result = fewshot_eval(
                model, tok, args.data, shots=shots, pool=args.pool, seed=args.seed, fmt=fmt, limit=args.limit
            )
        result["checkpoint"] = str(checkpoint)
        result["seconds"] = time.perf_counter() - t0
    except (ValueError, NotImplementedError) as exc:
        return _fail(str(exc))
    _report(args, result, _eval_lines(args, result, checkpoint, cfg.model.family))
    return 0


def _eval_in_place(args: argparse.Namespace, shots: list[int], fmt: Any, t0: float) -> int:
    """`pretrain eval` under a launcher: every rank loads its shard of the checkpoint (`load_engine`) and
    takes part; rank 0 prints the result."""
    from pretrain.checkpoint import CheckpointError, read_manifest
    from pretrain.evaluate import distributed_validation_loss, fewshot_eval, load_engine, resolve_checkpoint
    from pretrain.export import _checkpoint_config

    try:
        checkpoint = resolve_checkpoint(args.checkpoint)
        family = _checkpoint_config(checkpoint).model.family
        if args.task == "fewshot" and family != "gpt":
            return _fail(f"--task fewshot needs a GPT checkpoint; {checkpoint} is {family!r}")
        pp = args.pp or int((read_manifest(checkpoint).get("layout") or {}).get("pp", 1))
        if args.task == "fewshot" and pp > 1:
            return _fail(
                f"--task fewshot under a launcher needs pp=1 ({checkpoint} was saved at pp={pp}); pass --pp 1 "
                "to evaluate it at tp x dp (converted once; ZeRO 0-2 checkpoints)"
            )
        engine, cfg, topo = load_engine(checkpoint, tp=args.tp, pp=args.pp)
        if args.task == "perplexity":
            result = distributed_validation_loss(
                engine,
                cfg,
                topo,
                shards=args.shards,
                split=args.split,
                num_batches=args.batches,
                micro_batch_size=args.micro_batch_size,
            )
        else:
            tok = _tokenizer(args, cfg, checkpoint)
            model = engine.module.model  # the (tensor-parallel) network inside the loss wrapper
            result = fewshot_eval(
                model,
                tok,
                args.data,
                shots=shots,
                pool=args.pool,
                seed=args.seed,
                fmt=fmt,
                limit=args.limit,
                topology=topo,
            )
            result["layout"] = {"tp": topo.dims.tp, "pp": topo.dims.pp, "dp": topo.dims.dp}
        result["checkpoint"] = str(checkpoint)
        result["seconds"] = time.perf_counter() - t0
    except (ValueError, NotImplementedError, CheckpointError) as exc:
        return _fail(str(exc))
    if topo.rank == 0:
        _report(args, result, _eval_lines(args, result, checkpoint, cfg.model.family))
    return _leave(0)


def _eval_lines(args: argparse.Namespace, result: dict[str, Any], checkpoint: Path, family: str) -> list[str]:
    where = ""
    if "layout" in result:
        where = " at " + " x ".join(f"{k}{v}" for k, v in result["layout"].items())
    if args.task == "perplexity":
        return [
            f"{checkpoint} ({family}){where}: {result['split']} loss {result['loss']:.4f}, perplexity "
            f"{result['perplexity']:.2f} over {result['tokens']} target tokens in {result['batches']} batches"
        ]
    lines = [f"{checkpoint}{where}: {result['kind']} task {args.data}, {result['n']} examples"]
    for r in result["results"]:
        line = f"  {r['shots']}-shot: acc {r['acc']:.3f} ± {r['acc_stderr']:.3f}"
        if "acc_norm" in r:
            line += f", acc_norm {r['acc_norm']:.3f} ± {r['acc_norm_stderr']:.3f}"
        lines.append(line + (f" ({r['truncated']} prompts truncated)" if r["truncated"] else ""))
    return lines


def cmd_generate(args: argparse.Namespace) -> int:
    from pretrain.generate import SamplingOptions, beam_generate, generate

    try:
        options = SamplingOptions(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        if args.max_new_tokens < 1:
            return _fail(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
        if args.num_beams < 1:
            return _fail(f"--num-beams={args.num_beams} must be >= 1")
        model, cfg, checkpoint = _load(args)
        if cfg.model.family != "gpt":
            return _fail(f"generate needs a GPT checkpoint; {checkpoint} is {cfg.model.family!r}")
        tok = _tokenizer(args, cfg, checkpoint)
        # Generation starts after <eos> like a document in the packed training stream.
        prompt = [tok.eos_id, *tok.encode(args.prompt)]
        t0 = time.perf_counter()
        eos = None if args.no_stop else tok.eos_id
        if args.num_beams > 1:
            new = beam_generate(
                model,
                prompt,
                num_beams=args.num_beams,
                max_new_tokens=args.max_new_tokens,
                eos_id=eos,
                length_penalty=args.length_penalty,
            )
        else:
            new = generate(
                model, prompt, max_new_tokens=args.max_new_tokens, options=options, seed=args.seed, eos_id=eos
            )
        seconds = time.perf_counter() - t0
    except (ValueError, NotImplementedError) as exc:
        return _fail(str(exc))
    stopped = bool(new) and new[-1] == tok.eos_id and not args.no_stop
    text = tok.decode(new[:-1] if stopped else new)
    result = {
        "checkpoint": str(checkpoint),
        "prompt": args.prompt,
        "text": text,
        "prompt_tokens": len(prompt) - 1,
        "new_tokens": len(new),
        "token_ids": new,
        "stopped_at_eos": stopped,
        "seconds": seconds,
        "tokens_per_s": len(new) / seconds if seconds > 0 else None,
    }
    _report(args, result, [args.prompt + text])
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from pretrain.checkpoint import CheckpointError
    from pretrain.evaluate import read_jsonl
    from pretrain.finetune import TASKS, FinetuneOptions, finetune_classify, finetune_text2text

    lr = args.lr if args.lr is not None else (5e-5 if args.task == "classify" else 3e-4)
    opts = FinetuneOptions(
        epochs=args.epochs,
        lr=lr,
        batch_size=args.batch_size,
        seed=args.seed,
        max_len=args.max_len,
        max_target_len=args.max_target_len,
        num_beams=args.num_beams,
        dropout=args.dropout,
        grad_clip=args.grad_clip,
        zero_stage=args.zero_stage,
        save_interval=args.save_interval,
        keep_last=args.keep_last,
        resume=args.resume,
    )
    keys = ("text", "label") if args.task == "classify" else ("input", "target")
    try:
        problems = opts.problems()
        if problems:
            return _fail("; ".join(problems))
        train_rows, eval_rows = read_jsonl(args.train, required=keys), read_jsonl(args.eval, required=keys)
        model, cfg, checkpoint = _load(args)
        if cfg.model.family not in TASKS[args.task]:
            return _fail(
                f"--task {args.task} needs a {' or '.join(TASKS[args.task]).upper()} checkpoint; {checkpoint} is "
                f"{cfg.model.family!r}"
            )
        tok = _tokenizer(args, cfg, checkpoint)
        if args.from_scratch:
            import torch

            from pretrain.models import build_model

            torch.manual_seed(args.seed)
            model = build_model(cfg.model)
        log = (lambda s: print(s, file=sys.stderr)) if args.json else print
        run = finetune_classify if args.task == "classify" else finetune_text2text
        t0 = time.perf_counter()
        _, info = run(model, cfg, tok, train_rows, eval_rows, opts, out_dir=args.out, log=log)
    except (ValueError, NotImplementedError, CheckpointError) as exc:
        return _fail(str(exc))
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return _leave(_preempted() if "stopped_early" in info else 0)
    return _leave(_finetune_report(args, info, checkpoint, t0))


def _finetune_report(args: argparse.Namespace, info: dict[str, Any], checkpoint: Path, t0: float) -> int:
    summary = {k: v for k, v in info.items() if k not in ("history", "options")}
    summary |= {
        "checkpoint": str(checkpoint),
        "init": "scratch" if args.from_scratch else "checkpoint",
        "out": str(args.out),
        "seconds": time.perf_counter() - t0,
    }
    if "stopped_early" in info:
        _report(
            args,
            summary,
            [
                f"stopped at step {info['steps']} of {info['total_steps']} ({info['stopped_early']}); rerun the "
                f"same command to resume from {args.out / 'checkpoints'}"
            ],
        )
        return _preempted()
    keys_shown = ("accuracy", "macro_f1", "exact_match", "rouge_l", "eval_loss")
    shown = ", ".join(f"{k} {summary[k]:.4f}" for k in keys_shown if k in summary)
    _report(args, summary, [f"fine-tuned {args.task} ({summary['init']} init): {shown}; wrote {args.out}"])
    return 0


def _preempted() -> int:
    from pretrain.preemption import EXIT_PREEMPTED

    return EXIT_PREEMPTED


def _leave(code: int) -> int:
    """Under a launcher, after a verb's work is complete and written: every rank waits for the others, then
    leaves without interpreter teardown (atexit handlers, such as the removal of the shared-memory
    all-reduce buffer, still run). Destroying the engine's gloo groups during teardown aborted a rank now and
    then (SIGABRT, "terminate called without an active exception": once in about a dozen 2-process
    evaluations, after the result was printed), which the launcher then reports as a failed run; the same
    as seen in tests/distributed/test_memory_measured.py. One process returns normally."""
    import atexit
    import os

    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return code
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """`python -m pretrain.cli_eval VERB ...`: the three verbs without the rest of the `pretrain` CLI."""
    parser = argparse.ArgumentParser(prog="pretrain")
    register(parser.add_subparsers(dest="verb", metavar="VERB", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FileNotFoundError as exc:
        return _fail(str(exc))


if __name__ == "__main__":
    sys.exit(main())
