"""Resuming the runs people make at another layout (issue 22): bf16 with ZeRO-1 at TP2 x PP2 x DP1, for GPT,
BERT and T5, checkpointed at step 3 and resumed at TP1 x PP2 x DP2, TP2 x PP1 x DP2 and TP1 x PP1 x DP1
(pretrain/reshard.py: every target rank converts its own slice from DeepSpeed's flat partitions); one ZeRO-2
run across tp and dp (fp16 where the machine runs it); BART from BF16_Optimizer (bf16, stage 0, PP2) to ZeRO-1
at DP2; a vocabulary padding change; and the parallel conversion's reads and memory.

The source run is the uninterrupted run: it saves at step 3 on its way to step 6 (saving changes nothing in a
run), and every resume must give steps 4-6 as it did. One launch trains the three families (one model after the
other, tests/distributed/train_runs.py), one launch per target layout resumes them.

Tolerance: the fp32 masters and both Adam moments are moved, never recomputed, so the converted checkpoint's
consolidated states equal the source's bitwise (checked tensor by tensor), and so does what the engine holds
right after loading it (checked once, for GPT at TP1 x PP2 x DP2). The losses after the switch then
differ only by the order of bf16 sums: a row-parallel output is two bf16 partial sums all-reduced at TP2 and one
matmul at TP1, and DP2 all-reduces gradients a single rank never sums. bf16 keeps 8 mantissa bits (unit
roundoff 2^-9 ~ 2e-3) per activation; the loss, a mean over 8 x 64 tokens, moved by at most 1.7e-4 relative
(seen: T5 at TP1 x PP2 x DP2, step 6; GPT 1.7e-5); 1e-3 relative is the bound for bf16 and fp16 (half their unit roundoff, the bound
train.verify_resume uses).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import SMOKE_CONFIG, read_metrics, spawn_with_deadline, tiny_overrides
from tests.distributed.train_runs import launch_runs

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

RTOL = 1e-3  # bf16 / fp16, see the module docstring
FAMILIES = {"gpt": "gpt-tiny", "bert": "bert-tiny", "t5": "t5-tiny"}
TIMEOUT = 420


def keys(shards: Path, out: Path, family: str, **extra: object) -> list[str]:
    return tiny_overrides(
        shards,
        out,
        **{
            "model.preset": FAMILIES[family],
            "train.steps": 6,
            "checkpoint.interval": 3,
            "checkpoint.save_final": "false",
            "train.precision": "bf16",
            "parallel.zero_stage": 1,
            **extra,
        },
    )


def launch(runner, spec: Path, runs: list[list[str]], nprocs: int):
    return launch_runs(
        runner,
        SMOKE_CONFIG,
        runs,
        spec,
        launcher="torchrun" if nprocs > 1 else "python",
        nprocs=nprocs,
        timeout=TIMEOUT,
    )


def assert_continues(run: Path, ref: Path, label: str) -> None:
    got, want = read_metrics(run), read_metrics(ref)
    assert sorted(got) == [4, 5, 6], f"{label}: steps {sorted(got)}"
    for step in (4, 5, 6):
        assert got[step]["consumed_samples"] == want[step]["consumed_samples"], (
            label
        )  # none skipped or repeated
        a, b = got[step]["loss"], want[step]["loss"]
        print(f"{label} step {step}: loss {a!r} vs {b!r}")
        assert abs(a - b) <= RTOL * abs(b), f"{label} step {step}: loss {a} vs {b}"


def assert_same_states(converted: Path, source: Path) -> None:
    """The converted checkpoint's fp32 masters and Adam moments, consolidated, equal the source's bitwise."""
    from pretrain.reshard import consolidated_states

    a, b = consolidated_states(converted), consolidated_states(source)
    assert a.keys() == b.keys()
    for name in b:
        for key in b[name]:
            assert torch.equal(a[name][key], b[name][key]), f"{converted}: {name} {key} differs from {source}"


@pytest.fixture(scope="module")
def source(shards_dir, tmp_path_factory, run_pretrain_module) -> Path:
    root = tmp_path_factory.mktemp("source")
    runs = [keys(shards_dir, root / f, f, **{"parallel.tp": 2, "parallel.pp": 2}) for f in FAMILIES]
    launch(run_pretrain_module, root / "runs.json", runs, nprocs=4)
    return root


@pytest.mark.parametrize(("tp", "pp", "dp"), [(1, 2, 2), (2, 1, 2), (1, 1, 1)])
def test_bf16_zero1_resumes_at_another_layout(tp, pp, dp, source, shards_dir, tmp_path, run_pretrain):
    from pretrain.checkpoint import verify_checkpoint

    runs = []
    for f in FAMILIES:
        step3 = source / f / "checkpoints" / "step-3"
        runs.append(
            keys(shards_dir, tmp_path / f, f, **{"parallel.tp": tp, "parallel.pp": pp, "train.resume": step3})
        )
    proc = launch(run_pretrain, tmp_path / "runs.json", runs, nprocs=tp * pp * dp)
    assert proc.stdout.count("(reshard load)") == len(FAMILIES)
    for f in FAMILIES:
        step3 = source / f / "checkpoints" / "step-3"
        cached = step3.with_name(f"step-3.reshard-tp{tp}-pp{pp}-dp{dp}")
        assert verify_checkpoint(cached) == []
        assert_same_states(cached, step3)
        assert_continues(tmp_path / f, source / f, f"{f} at tp{tp} pp{pp} dp{dp}")


def test_vocabulary_padding_change(source, shards_dir, tmp_path, run_pretrain):
    """GPT saved with 512 vocabulary rows resumes (train.resume=auto) with model.make_vocab_size_divisible_by=384,
    768 rows, at TP1 x PP1: the 512 rows both have carry over bitwise (weights and both moments), the new rows
    start at zero, and training goes on. The losses are not the old run's: the new rows are extra classes of the
    softmax, which the old run did not have."""
    from pretrain.reshard import consolidated_states

    run = tmp_path / "gpt"
    shutil.copytree(source / "gpt" / "checkpoints" / "step-3", run / "checkpoints" / "step-3")
    args = keys(shards_dir, run, "gpt", **{"model.make_vocab_size_divisible_by": 384, "train.resume": "auto"})
    proc = launch(run_pretrain, tmp_path / "runs.json", [args], nprocs=1)
    assert "(reshard load)" in proc.stdout
    step3 = run / "checkpoints" / "step-3"
    new, old = consolidated_states(step3.with_name("step-3.reshard-tp1-pp1-dp1")), consolidated_states(step3)
    assert new["embed.weight"]["master"].shape[0] == 768
    for name in old:
        for key in old[name]:
            a, b = new[name][key], old[name][key]
            if name == "embed.weight":
                assert torch.equal(a[:512], b) and not a[512:].any(), (name, key)
            else:
                assert torch.equal(a, b), (name, key)
    got = read_metrics(run)
    assert sorted(got) == [4, 5, 6] and all(torch.isfinite(torch.tensor(got[s]["loss"])) for s in got)


def half_precision() -> str:
    """fp16 where DeepSpeed's accelerator runs it; bf16 elsewhere (its CPU accelerator refuses fp16 unless
    oneDNN has fp16 kernels for the CPU, which the 2-core CI machine's does not)."""
    from pretrain.distributed import ensure_accelerator_env

    ensure_accelerator_env()
    from deepspeed.accelerator import get_accelerator

    return "fp16" if get_accelerator().is_fp16_supported() else "bf16"


def test_zero2_across_tp_and_dp(shards_dir, tmp_path, run_pretrain):
    """ZeRO-2 (gradients partitioned too) at TP2 x DP1 resumes at TP1 x DP2, in fp16 (dynamic loss scaling: the
    scale carries over with the masters and moments) where the machine runs fp16, else in bf16."""
    half = {"train.precision": half_precision(), "parallel.zero_stage": 2}
    full = tmp_path / "full"
    launch(
        run_pretrain, tmp_path / "a.json", [keys(shards_dir, full, "gpt", **half, **{"parallel.tp": 2})], 2
    )
    step3 = full / "checkpoints" / "step-3"
    run = tmp_path / "run"
    launch(
        run_pretrain,
        tmp_path / "b.json",
        [keys(shards_dir, run, "gpt", **half, **{"train.resume": step3})],
        2,
    )
    assert_same_states(step3.with_name("step-3.reshard-tp1-pp1-dp2"), step3)
    assert_continues(run, full, f"gpt {half['train.precision']} zero2 tp2 -> dp2")


def test_bart_bf16_optimizer_pipeline_to_dp(shards_dir, tmp_path, run_pretrain):
    """BART (which pipelines; no TP plan) in bf16 at ZeRO stage 0 under PP2 runs DeepSpeed's BF16_Optimizer;
    resumed at PP1 x DP2 it runs the ZeRO-1 optimizer: another flat format, the same masters and moments."""
    bart = {"model.preset": "bart-tiny", "parallel.zero_stage": 0}
    full = tmp_path / "full"
    launch(
        run_pretrain, tmp_path / "a.json", [keys(shards_dir, full, "gpt", **bart, **{"parallel.pp": 2})], 2
    )
    step3 = full / "checkpoints" / "step-3"
    run = tmp_path / "run"
    launch(
        run_pretrain,
        tmp_path / "b.json",
        [keys(shards_dir, run, "gpt", **bart, **{"train.resume": step3})],
        2,
    )
    cached = step3.with_name("step-3.reshard-tp1-pp1-dp2")
    assert any(f.name.startswith("bf16_zero_pp_rank_1") for f in cached.iterdir())
    assert_same_states(cached, step3)
    assert_continues(run, full, "bart bf16 pp2 (BF16_Optimizer) -> dp2 (ZeRO-1)")


# ----------------------------------------------------------------------------- the engine right after loading
def _train_and_dump_loaded_states(rank: int, args: list[str], port: int, results: str) -> None:
    """One rank of `pretrain train ARGS` in this process (4 ranks): right after the engine has loaded the
    converted checkpoint, each parameter's full fp32 master (`safe_get_full_fp32_param`) and Adam moments as
    DeepSpeed's ZeRO optimizer holds them (its fragment of the flat partition's state, placed by the
    parameter's `_hp_mapping` and summed over the dp group: what `safe_get_full_optimizer_state` does once the
    optimizer has stepped), saved for the test."""
    import os

    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE="4",
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE="4",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
    )
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param

    from pretrain.checkpoint import Checkpointer
    from pretrain.config import load_config
    from pretrain.train import train

    original = Checkpointer.load

    def load_and_dump(self, path, **kwargs):  # type: ignore[no-untyped-def]
        out = original(self, path, **kwargs)
        inner = self.engine.optimizer.optimizer  # torch's AdamW over one flat partition per group
        states = {}
        for name, p in self.engine.module.named_parameters():  # the same order on every rank of a stage
            states[name] = {"master": safe_get_full_fp32_param(p).clone()}
            for key in ("exp_avg", "exp_avg_sq"):
                full = torch.zeros(p.numel(), dtype=torch.float32)
                mapping = p._hp_mapping
                if mapping is not None:
                    flat = inner.state[inner.param_groups[mapping.param_group_index]["params"][0]][key]
                    lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
                    full.narrow(0, lp.start, lp.numel).copy_(flat.narrow(0, hp.start, hp.numel))
                dist.all_reduce(full, group=p._dp_group)
                states[name][key] = full.reshape(p.shape)
        torch.save(states, Path(results) / f"loaded-{rank}.pt")
        return out

    Checkpointer.load = load_and_dump  # type: ignore[method-assign]
    train(load_config(SMOKE_CONFIG, args))


def test_engine_holds_the_source_states_right_after_loading(source, shards_dir, tmp_path):
    """GPT's TP2 x PP2 checkpoint resumed at TP1 x PP2 x DP2 with no step left to run: what DeepSpeed's ZeRO-1
    optimizer holds right after loading (each rank's fragments all-reduced over dp) equals the uninterrupted
    run's consolidated fp32 masters and both moments at step 3, bitwise, parameter by parameter, on both
    stages (the tied embedding on each)."""
    import yaml

    from pretrain.config import config_from_dict
    from pretrain.reshard import build_layout, consolidated_states
    from tests.conftest import free_port

    src = tmp_path / "src" / "checkpoints" / "step-3"
    shutil.copytree(source / "gpt" / "checkpoints" / "step-3", src)
    args = keys(
        shards_dir, tmp_path / "run", "gpt", **{"parallel.pp": 2, "train.steps": 3, "train.resume": src}
    )
    out = tmp_path / "loaded"
    out.mkdir()
    spawn_with_deadline(
        _train_and_dump_loaded_states, (args, free_port(), str(out)), nprocs=4, timeout=240, what="resume"
    )
    want = consolidated_states(src)
    converted = src.with_name("step-3.reshard-tp1-pp2-dp2") / "config.yaml"  # the run's resolved model
    model_cfg = config_from_dict(yaml.safe_load(converted.read_text()), validate=False).model
    layout = build_layout(model_cfg, tp=1, pp=2, partition="parameters")
    seen = set()
    for rank in range(4):
        stage = rank // 2  # tp 1, dp 2: ranks 0-1 stage 0, ranks 2-3 stage 1
        by_engine = {e: n for n, e in layout.engine[stage].items()}
        loaded = torch.load(out / f"loaded-{rank}.pt", weights_only=True)
        assert set(loaded) == set(by_engine), rank
        for engine_name, states in loaded.items():
            name = by_engine[engine_name]
            seen.add(name)
            for key, tensor in states.items():
                assert torch.equal(tensor, want[name][key]), f"rank {rank}: {name} {key}"
    assert seen == set(want)


# ----------------------------------------------------------------------------- parallel conversion
def _convert_as_rank(rank: int, step3: str, port: int, results: str) -> None:
    """One rank of a 4-rank job converting its own slice through Checkpointer.prepare_reshard, counting the
    source files it opens (every `open` of a path in the source directory) and its peak memory."""
    import builtins
    import json
    import os

    import torch.distributed as dist

    from pretrain.checkpoint import Checkpointer
    from pretrain.reshard import convert_rank, plan_conversion

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    dist.init_process_group("gloo", rank=rank, world_size=4)
    src = Path(step3)
    layout = {"tp": 1, "pp": 2, "dp": 2, "zero": 1, "precision": "bf16"}
    # warm-up (imports, allocator arenas) into a scratch directory of its own, not measured
    conv = plan_conversion(src, tp=1, pp=2, dp=2)
    scratch = Path(results) / f"scratch-{rank}"
    scratch.mkdir()
    convert_rank(
        src, scratch, source=conv.source, target=conv.target, rank=rank, saved_world=conv.saved_world
    )
    opened: list[str] = []
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(file, (str, os.PathLike)) and Path(file).parent == src:
            opened.append(Path(file).name)
        return real_open(file, *args, **kwargs)

    builtins.open = counting_open
    try:
        ckpt = Checkpointer(
            src.parent.parent, None, rank=rank, world_size=4
        )  # each rank hashes what it reads
        ckpt.prepare_reshard(src, layout, partition="parameters", measure_memory=True)
    finally:
        builtins.open = real_open
    report = ckpt.reshard_reports[rank]
    Path(results, f"rank-{rank}.json").write_text(
        json.dumps(
            {
                "opened": opened,
                "reported": report.opened,
                "written": report.written_bytes,
                "rss_before": report.rss_before,
                "rss_peak": report.rss_peak,
                "seconds": report.seconds,
            }
        )
    )
    dist.destroy_process_group()


def test_parallel_conversion_reads_only_its_slice(source, tmp_path):
    """4 ranks convert GPT's TP2 x PP2 checkpoint to TP1 x PP2 x DP2, each its own slice: no rank opens a source
    file it does not need (a stage-0 rank none of stage 1's; nobody every file), and each rank's peak resident
    memory during the conversion grows by less than 1.5 x (what it writes + the largest source file)."""
    import json

    from tests.conftest import free_port

    src = tmp_path / "gpt" / "checkpoints" / "step-3"
    shutil.copytree(source / "gpt" / "checkpoints" / "step-3", src)
    out = tmp_path / "results"
    out.mkdir()
    spawn_with_deadline(
        _convert_as_rank, (str(src), free_port(), str(out)), nprocs=4, timeout=180, what="conversion"
    )
    stage1 = {"mp_rank_02_model_states.pt", "mp_rank_03_model_states.pt"}
    stage1 |= {f"bf16_zero_pp_rank_0_mp_rank_{m:02d}_optim_states.pt" for m in (2, 3)}
    state_files = {f.name for f in src.iterdir() if f.name.endswith(("_states.pt", "_optim_states.pt"))}
    largest = max(f.stat().st_size for f in src.iterdir())
    for rank in range(4):
        r = json.loads((out / f"rank-{rank}.json").read_text())
        opened = {
            n for n in r["opened"] if n.endswith(".pt")
        }  # rank 0 also copies the tokenizer when it seals
        print(
            f"rank {rank}: opened {sorted(opened)}; wrote {r['written']} B; rss +{r['rss_peak'] - r['rss_before']} B"
        )
        assert opened == set(r["reported"]), rank  # the converter's own account is the truth
        assert len(opened & state_files) < len(state_files), rank
        if rank < 2:  # target stage 0 (ranks 0, 1: tp fastest, then dp, then pp) needs nothing of stage 1
            assert not opened & stage1, (rank, sorted(opened & stage1))
        assert r["rss_peak"] > 0, "no peak RSS measured (no /proc?)"
        assert r["rss_peak"] - r["rss_before"] < 1.5 * (r["written"] + largest), r
    assert (src.with_name("step-3.reshard-tp1-pp2-dp2") / "manifest.json").is_file()


def test_a_corrupted_source_file_is_named(source, tmp_path):
    """A flipped byte in a file a rank reads stops the conversion with that file's name (each rank checks the
    sha256 of the files it reads against the manifest, and only those)."""
    from pretrain.reshard import ReshardError, reshard_checkpoint

    src = tmp_path / "step-3"
    shutil.copytree(source / "gpt" / "checkpoints" / "step-3", src)
    victim = src / "bf16_zero_pp_rank_0_mp_rank_03_optim_states.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ReshardError, match=r"mp_rank_03_optim_states\.pt: sha256 differs"):
        reshard_checkpoint(src, tmp_path / "out", tp=1, pp=2, dp=2)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("to", "why"),
    [
        ({"tp": 3, "pp": 1}, r"model\.num_heads=4 is not divisible by parallel\.tp=3"),
        ({"tp": 1, "pp": 8}, r"pp=8: stages \[6, 7\] would hold no parameters"),
        ({"tp": 1, "pp": 2, "zero": 2}, r"ZeRO stage 2 cannot run with pipeline parallelism"),
        ({"tp": 1, "pp": 1, "zero": 3}, r"ZeRO stage 3 partitions the weights themselves"),
    ],
)
def test_refusals_name_both_layouts_and_why(to, why, source, tmp_path):
    from pretrain.reshard import ReshardError, reshard_checkpoint

    step3 = source / "gpt" / "checkpoints" / "step-3"
    with pytest.raises(ReshardError, match=r"from \(tp=2, pp=2, dp=1, zero=1, precision=bf16\) to .*" + why):
        reshard_checkpoint(step3, tmp_path / "out", **to)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- one source of split rules
PLAN_PRESETS = {
    "gpt-tiny": [],
    "gpt-tiny-untied": ["model.preset=gpt-tiny", "model.tie_embeddings=false"],
    "llama-tiny": [],
    "bert-tiny": [],
    "t5-tiny": [],
}


def _tensor_plan_marks(rank: int, port: int, results: str) -> None:
    """Applies the tensor plan at TP2 to each preset and records which parameters it split, along which dim."""
    import json
    import os

    import torch.distributed as dist

    from parallel.tensor import is_tensor_parallel
    from parallel.tensor_plan import apply_tensor_parallel
    from pretrain.config import load_config
    from pretrain.models import build_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    marks = {}
    for label, overrides in PLAN_PRESETS.items():
        cfg = load_config(None, overrides or [f"model.preset={label}"], validate=False).model
        cfg.vocab_size = 512
        model = apply_tensor_parallel(build_model(cfg), group=None, tp_size=2, tp_rank=rank)
        marks[label] = {n: p.partition_dim for n, p in model.named_parameters() if is_tensor_parallel(p)}
    if rank == 0:
        Path(results).write_text(json.dumps(marks))
    dist.destroy_process_group()


def test_resharding_splits_what_the_tensor_plan_splits(tmp_path):
    """The converter's split rules (consolidate.split_dims, from parallel/tensor_plan.py's patterns) are exactly
    the parameters `apply_tensor_parallel` splits and their dims: a layer type the plan learns to split cannot
    be resharded as if replicated."""
    import json

    from pretrain.config import load_config
    from pretrain.consolidate import split_dims
    from tests.conftest import free_port

    out = tmp_path / "marks.json"
    spawn_with_deadline(
        _tensor_plan_marks, (free_port(), str(out)), nprocs=2, timeout=120, what="tensor plan"
    )
    marks = json.loads(out.read_text())
    for label, overrides in PLAN_PRESETS.items():
        cfg = load_config(None, overrides or [f"model.preset={label}"], validate=False).model
        cfg.vocab_size = 512
        assert marks[label] and split_dims(cfg) == marks[label], label
