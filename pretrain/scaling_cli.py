"""`pretrain scaling {fit,plan,sweep}` and `pretrain plan`: scaling laws and layout planning verbs.

`register(subparsers)` adds the verbs to the `pretrain` parser; each verb is a function(args) -> int.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _flops_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--flops {text!r}: expected numbers like 1e18,3e18") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"--flops {text!r}: every budget must be > 0")
    return values


def register(sub: argparse._SubParsersAction) -> None:
    sc = sub.add_parser(
        "scaling",
        help="fit scaling laws, plan compute-optimal runs, generate IsoFLOP sweeps",
        description="Scaling laws (Kaplan et al. 2020; Hoffmann et al. 2022): fit them to runs, plan a "
        "compute-optimal model size and token count for a budget, and generate IsoFLOP sweeps.",
    )
    ssub = sc.add_subparsers(dest="scaling_verb", metavar="VERB", required=True)

    p = ssub.add_parser(
        "fit",
        help="fit Kaplan or Chinchilla laws to run directories or a CSV",
        description="Collect (N non-embedding params, D tokens, C=6ND, loss) from Tandem run directories "
        "(last eval_loss, else last training loss) or a CSV with columns N,D,loss[,C]; fit the law; write "
        "OUT/fit.json, OUT/points.csv and OUT/scaling_fit.png.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--runs", nargs="+", type=Path, help="run directories, or directories of them")
    src.add_argument("--csv", type=Path, help="CSV with header N,D,loss[,C]")
    p.add_argument(
        "--form", choices=["chinchilla", "kaplan"], default="chinchilla", help="default chinchilla"
    )
    p.add_argument("--out", type=Path, default=None, help="directory for fit.json, points.csv, the plot")
    p.add_argument("--bootstrap", type=int, default=50, help="bootstrap refits for 95%% CIs (0 = none)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--json", action="store_true", help="print the fitted parameters as JSON on the last line")
    p.set_defaults(func=cmd_scaling_fit)

    p = ssub.add_parser(
        "plan",
        help="compute-optimal N and D for a FLOP budget",
        description="Compute-optimal parameters N and tokens D for C FLOPs (C = 6ND; Hoffmann et al. 2022 "
        "eq. 4) from a fit or a built-in preset, with tokens per parameter and the nearest model preset.",
    )
    p.add_argument("--flops", required=True, type=float, help="training budget in FLOPs, e.g. 5.76e23")
    law = p.add_mutually_exclusive_group()
    law.add_argument("--fit", type=Path, help="fit.json written by `scaling fit --form chinchilla`")
    law.add_argument(
        "--preset",
        choices=["epoch-refit", "chinchilla-approach3"],
        default=None,
        help="built-in constants (default epoch-refit: Besiroglu et al. 2024)",
    )
    p.add_argument(
        "--vocab-size", type=int, default=50257, help="vocabulary for preset sizes (default 50257)"
    )
    p.add_argument("--json", action="store_true", help='print {"N","D","tokens_per_param"} as the last line')
    p.set_defaults(func=cmd_scaling_plan)

    p = ssub.add_parser(
        "sweep",
        help="write IsoFLOP ladder configs and a Slurm array script",
        description="For each budget, GPT configs of several sizes trained on D = C/(6N) tokens (IsoFLOP "
        "profiles), written to OUT/configs/, with OUT/sweep.csv and OUT/sweep.sbatch (sbatch it, or run "
        "it with bash to train every config in turn).",
    )
    p.add_argument("--flops", required=True, type=_flops_list, help="budgets, comma-separated: 1e13,3e13")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument(
        "--sizes",
        default=None,
        help="comma-separated LAYERSxHIDDEN[xHEADS] shapes or model presets (default: --per-budget shapes "
        "around the preset's compute-optimal N)",
    )
    p.add_argument("--per-budget", type=int, default=5, help="shapes per budget without --sizes (default 5)")
    p.add_argument(
        "--base",
        type=Path,
        default=None,
        help="run config the sweep starts from (default configs/runs/smoke-gpt.yaml)",
    )
    p.add_argument("--vocab-size", type=int, default=None, help="model.vocab_size of every run")
    p.add_argument("--preset", choices=["epoch-refit", "chinchilla-approach3"], default="epoch-refit")
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="overrides for every run")
    p.set_defaults(func=cmd_scaling_sweep)

    p = sub.add_parser(
        "plan",
        help="memory/throughput planner: rank tp/pp/dp/ZeRO layouts that fit",
        description="Estimate per-GPU memory (ZeRO model states, Korthikanti et al. 2022 activations, "
        "pipeline in-flight micro-batches) and step time for every tp/pp/dp/ZeRO/micro-batch/recompute "
        "layout; print the ones that fit, fastest first, with the reasons. Refuses impossible requests.",
    )
    p.add_argument("--model", required=True, help="model preset name, configs/models file or run config")
    p.add_argument("--gpus", required=True, type=int, help="number of GPUs")
    p.add_argument("--gpu-memory", required=True, type=float, help="memory per GPU in GB")
    p.add_argument("--seq-len", type=int, default=None, help="default: data.seq_len or model.max_seq_len")
    p.add_argument(
        "--global-batch-size",
        type=int,
        default=None,
        help="sequences per step (default: the run config's, else ~2M tokens)",
    )
    p.add_argument("--vocab-size", type=int, default=None, help="default: the config's, else 50257")
    p.add_argument(
        "--precision",
        choices=["bf16", "fp16", "fp32"],
        default=None,
        help="default: the run config's train.precision, else bf16",
    )
    p.add_argument("--peak-tflops", type=float, default=312.0, help="per-GPU peak (default 312, A100 bf16)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--allow-offload", action="store_true", help="also consider ZeRO CPU offload")
    p.add_argument(
        "--loss-chunk-size",
        type=int,
        default=None,
        help="tokens a chunk of the loss fused with the LM head, for the tp=1 pp=1 layouts (default: the "
        "run config's train.loss_chunk_size, else 0 = full logits)",
    )
    p.add_argument("--top", type=int, default=10, help="rows to print (default 10)")
    p.add_argument("--json", action="store_true", help="print the best layout as JSON on the last line")
    p.set_defaults(func=cmd_plan)


# ----------------------------------------------------------------------------- verbs


def _error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def cmd_scaling_fit(args: argparse.Namespace) -> int:
    from pretrain import scaling

    try:
        points = scaling.read_points_csv(args.csv) if args.csv else scaling.collect_runs(args.runs)
        report, law = scaling.fit(points, form=args.form, bootstrap=args.bootstrap, seed=args.seed)
    except scaling.ScalingError as exc:
        return _error(str(exc))
    print(f"{args.form} fit on {len(points)} point(s):")
    for k, v in report.params.items():
        ci = report.ci.get(k)
        if isinstance(v, dict):
            print(f"  {k:8s} exponent {v['exponent']:.4g}, scale {v['scale']:.4g}")
        else:
            print(f"  {k:8s} {v:.6g}" + (f"  (95% CI {ci[0]:.4g} .. {ci[1]:.4g})" if ci else ""))
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fit.json").write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
        scaling.write_points_csv(points, args.out / "points.csv")
        png = scaling.plot_fit(points, law, args.out / "scaling_fit.png", title=f"{args.form} fit")
        print(f"wrote {args.out / 'fit.json'}, {args.out / 'points.csv'}, {png}")
    if args.json:
        print(json.dumps(report.params))
    return 0


def cmd_scaling_plan(args: argparse.Namespace) -> int:
    from pretrain import scaling

    try:
        if args.fit is not None:
            law, source = scaling.load_law(args.fit), str(args.fit)
        else:
            name = args.preset or scaling.DEFAULT_PRESET
            law, source = scaling.PRESETS[name], f"preset {name}"
        plan = scaling.plan_budget(
            args.flops, law, presets=scaling.preset_param_counts(vocab_size=args.vocab_size)
        )
    except scaling.ScalingError as exc:
        return _error(str(exc))
    print(
        f"budget {plan.flops:.3g} FLOPs ({source}: E={law.E:.4g} A={law.A:.4g} B={law.B:.4g} "
        f"alpha={law.alpha:.4g} beta={law.beta:.4g})"
    )
    print(f"  N  {plan.N:.4g} parameters (non-embedding)")
    print(f"  D  {plan.D:.4g} tokens")
    print(f"  D/N {plan.tokens_per_param:.1f} tokens per parameter; predicted loss {plan.loss:.4f}")
    if plan.nearest_preset:
        print(f"  nearest model preset: {plan.nearest_preset} ({plan.nearest_preset_params:.4g} parameters)")
    if args.json:
        print(json.dumps({"N": plan.N, "D": plan.D, "tokens_per_param": plan.tokens_per_param}))
    return 0


def cmd_scaling_sweep(args: argparse.Namespace) -> int:
    from pretrain import scaling
    from pretrain.config import CONFIG_DIR

    try:
        sizes = [scaling.parse_shape(s) for s in args.sizes.split(",")] if args.sizes else None
        entries = scaling.generate_sweep(
            args.flops,
            args.out,
            base_config=args.base or CONFIG_DIR / "runs" / "smoke-gpt.yaml",
            sizes=sizes,
            per_budget=args.per_budget,
            law=scaling.PRESETS[args.preset],
            vocab_size=args.vocab_size,
            overrides=args.overrides,
        )
    except scaling.ScalingError as exc:
        return _error(str(exc))
    for e in entries:
        print(f"{e.index:>3} {e.name:28s} N={e.N:.3g} D={e.D:.3g} steps={e.steps}")
    print(
        f"wrote {len(entries)} configs to {args.out / 'configs'}; run them with: sbatch {args.out / 'sweep.sbatch'}"
        f" (or bash {args.out / 'sweep.sbatch'})"
    )
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from parallel.memory import Hardware, PlanError
    from pretrain.planning import format_table, load_model_for_planning, plan_layouts

    try:
        cfg, seq_len, is_run = load_model_for_planning(
            args.model, vocab_size=args.vocab_size, seq_len=args.seq_len
        )
    except FileNotFoundError as exc:
        return _error(str(exc))
    gbs = args.global_batch_size
    if gbs is None:
        gbs = cfg.train.global_batch_size if is_run else max(1, 2**21 // seq_len)
    hw = Hardware(
        gpu_memory_gb=args.gpu_memory, peak_tflops=args.peak_tflops, gpus_per_node=args.gpus_per_node
    )
    try:
        shape, result = plan_layouts(
            cfg,
            seq_len=seq_len,
            num_gpus=args.gpus,
            hardware=hw,
            global_batch_size=gbs,
            precision=args.precision or (cfg.train.precision if is_run else "bf16"),
            allow_offload=args.allow_offload,
            loss_chunk_size=(
                args.loss_chunk_size
                if args.loss_chunk_size is not None
                else (cfg.train.loss_chunk_size if is_run else 0)
            ),
        )
    except PlanError as exc:
        return _error(f"cannot plan {args.model} on {args.gpus} x {args.gpu_memory:g} GB: {exc}")
    print(
        f"{args.model}: {shape.total_params / 1e9:.3g}B parameters, seq_len {seq_len}, global batch {gbs}; "
        f"{len(result.candidates)} of {result.considered} layouts fit on {args.gpus} x {args.gpu_memory:g} GB"
    )
    print(format_table(result, top=args.top))
    if args.json:
        print(json.dumps(result.candidates[0].to_json()))
    return 0
