"""Evaluating a pretrained checkpoint without updating it: validation perplexity for every family, and
zero-, one- and few-shot in-context evaluation of GPT (Brown et al. 2020, "Language Models are Few-Shot
Learners", §2: k demonstrations of the task in the prompt, no gradient step).

In-context tasks are JSONL files, one example per line:

- multiple choice ``{"context": ..., "choices": [...], "answer": INDEX}``: each choice is scored by the
  log-likelihood of its tokens given the prompt, and the highest wins. GPT-3 (§2.4) also normalizes by the
  number of tokens of the choice, so that long answers are not penalized for having more factors below one;
  both accuracies are reported.
- completion / cloze ``{"context": ..., "completion": ...}``: correct when greedy decoding reproduces the
  completion exactly (LAMBADA-style).

Two ways to run. In one process the checkpoint's weights are consolidated (`pretrain.export.load_model`,
any tp/pp layout). Under a launcher (`deepspeed`, `torchrun`, `srun`: WORLD_SIZE > 1) `load_engine` builds
the model at a tp/pp layout through `parallel.parallelize`, exactly as the training loop does, and loads the
sharded checkpoint in place through the training loop's `Checkpointer`; perplexity is then
`distributed_validation_loss` (each dp rank its share of the batches, the pipeline's own eval schedule under
pp, the vocab-parallel cross-entropy under tp), the same code as the training loop's in-loop validation, and
few-shot scoring takes log-probabilities and argmaxes over vocab-parallel logits without gathering them.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config import Config
from pretrain.generate import mask_padding_rows, real_vocab_size

if TYPE_CHECKING:
    from parallel.topology import Topology

IGNORE_INDEX = -100  # labels value the objectives use for "no prediction here"


# ----------------------------------------------------------------------------- checkpoints and tokenizers


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory (holds config.yaml), or the newest `step-N` inside a run's `checkpoints/`
    directory or a run directory."""
    path = Path(path)
    if (path / "config.yaml").is_file() and (path / "meta.json").is_file():
        return path
    for parent in (path, path / "checkpoints"):
        steps = [p for p in parent.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
        if steps:
            return max(steps, key=lambda p: int(p.name[5:]))
    raise FileNotFoundError(
        f"{path}: not a checkpoint directory (no config.yaml + meta.json) and no step-N directory inside it"
    )


def load_manifest_of(cfg: Config, shards: str | Path | None = None) -> tuple[dict[str, Any], Path]:
    """The shards manifest a checkpoint was trained on (or of `shards`), and the shards directory."""
    shards_dir = Path(shards if shards is not None else cfg.data.shards)
    path = shards_dir / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: the checkpoint's data.shards={cfg.data.shards!r} has no manifest here; "
            "pass --shards DIR"
        )
    return json.loads(path.read_text(encoding="utf-8")), shards_dir


def locate_tokenizer(
    cfg: Config,
    *,
    checkpoint: str | Path | None = None,
    shards: str | Path | None = None,
    explicit: str | Path | None = None,
) -> Path:
    """The sentencepiece model of a checkpoint.

    Looked for, in order: `explicit` (--tokenizer); the path the shards manifest records (as written, then
    relative to the shards directory, where a relative path may have been meant); `tokenizer.model` in the
    checkpoint directory (where an export puts it). A manifest may outlive the machine it was written on,
    hence the fallbacks; the error lists every place tried."""
    if explicit is not None:
        p = Path(explicit)
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer model {p} (--tokenizer) does not exist")
        return p
    tried: list[str] = []
    candidates: list[Path] = []
    try:
        manifest, shards_dir = load_manifest_of(cfg, shards)
        recorded = manifest.get("tokenizer", {}).get("path")
        if recorded:
            candidates += [Path(recorded), shards_dir / recorded, shards_dir / Path(recorded).name]
        else:
            tried.append(f"{shards_dir / 'manifest.json'} (records no tokenizer.path)")
    except FileNotFoundError as exc:
        tried.append(str(exc))
    if checkpoint is not None:
        candidates.append(Path(checkpoint) / "tokenizer.model")
    for c in candidates:
        if c.is_file():
            return c
        tried.append(str(c))
    raise FileNotFoundError(
        "tokenizer model not found; tried: " + "; ".join(tried) + ". Pass --tokenizer PATH"
    )


def load_tokenizer(cfg: Config, **where: Any) -> Any:
    from data_pipeline.tokenizer import Tokenizer

    return Tokenizer(locate_tokenizer(cfg, **where))


def read_jsonl(path: str | Path, *, required: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Every object of a JSONL file; a bad line or a missing key raises naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in required if k not in row]
            if missing:
                raise ValueError(f"{path}:{n}: missing key(s) {', '.join(missing)}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no examples")
    return rows


# ----------------------------------------------------------------------------- perplexity


def _objective(cfg: Config, shards: str | Path | None) -> tuple[Any, dict[str, Any], Path]:
    from data_pipeline.objectives import build_objective

    manifest, shards_dir = load_manifest_of(cfg, shards)
    tok = manifest["tokenizer"]
    objective = build_objective(
        cfg.model.objective_name, seq_len=cfg.data.seq_len, tokenizer=tok, seed=cfg.train.seed
    )
    return objective, tok, shards_dir


def _perplexity_record(
    cfg: Config, *, split: str, shards_dir: Path, total: float, count: int, batches: int
) -> dict[str, Any]:
    if count == 0:
        raise ValueError(f"split {split!r} of {shards_dir} gave no target tokens")
    loss = total / count
    return {
        "task": "perplexity",
        "family": cfg.model.family,
        "split": split,
        "batches": batches,
        "tokens": count,
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
    }


@torch.no_grad()
def validation_loss(
    model: nn.Module,
    cfg: Config,
    *,
    shards: str | Path | None = None,
    split: str | None = None,
    num_batches: int | None = None,
    micro_batch_size: int | None = None,
) -> dict[str, Any]:
    """Token-weighted mean loss of the checkpoint's own objective (next token, masked tokens or corrupted
    spans) on the first `num_batches` micro batches of a split, and its perplexity exp(loss), in one process.

    The batches are the ones the training loop's in-loop evaluation sees (`eval_batches`, fixed masks and
    spans), and the mean is the same token-weighted one (`distributed_validation_loss`)."""
    from data_pipeline.loader import eval_batches

    objective, tok, shards_dir = _objective(cfg, shards)
    split = split or cfg.data.eval_split
    batches = eval_batches(
        shards_dir,
        objective,
        split=split,
        micro_batch_size=micro_batch_size or cfg.train.micro_batch_size,
        dp_rank=0,
        dp_size=1,
        eos_id=int(tok["eos_id"]),
        num_batches=num_batches or cfg.train.eval_batches,
    )
    device = next(model.parameters()).device
    total, count, seen = 0.0, 0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        logits = model(**batch)  # (B, T, V)
        # Summed in fp64 so thousands of tokens do not lose the last digits of the mean.
        total += (
            F.cross_entropy(
                logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            .double()
            .item()
        )
        count += int((labels != IGNORE_INDEX).sum())
        seen += 1
    return _perplexity_record(cfg, split=split, shards_dir=shards_dir, total=total, count=count, batches=seen)


def validation_batches(
    shards: str | Path,
    objective: Any,
    *,
    split: str,
    micro_batch_size: int,
    num_batches: int,
    eos_id: int,
    dp_rank: int = 0,
    dp_size: int = 1,
) -> tuple[list[dict[str, torch.Tensor]], list[bool]]:
    """This dp rank's share of the first `num_batches` micro batches of a split, and which of them count.

    `eval_batches` hands rank r the r-th micro batch of every dp-wide global batch, so micro batch k of rank r
    is batch k*dp + r of the one-process sequence: together the ranks read exactly the one-process batches.
    Every rank gets ceil(num_batches / dp) of them, because the forward passes are collective (the pipeline
    schedule, MoE all-to-alls); those past `num_batches` are computed but not counted. Raises ValueError
    when the split is absent or too small for one sample (the same on every rank)."""
    from data_pipeline.loader import eval_batches

    per_rank = -(-num_batches // dp_size)
    batches = list(
        eval_batches(
            shards,
            objective,
            split=split,
            micro_batch_size=micro_batch_size,
            dp_rank=dp_rank,
            dp_size=dp_size,
            eos_id=eos_id,
            num_batches=per_rank,
        )
    )
    return batches, [k * dp_size + dp_rank < num_batches for k in range(per_rank)]


@torch.no_grad()
def engine_validation(
    engine: Any,
    topology: Topology,
    *,
    family: str,
    batches: list[dict[str, torch.Tensor]],
    counted: list[bool],
) -> tuple[float, int, int]:
    """(sum of the target tokens' losses, target tokens, batches) over the counted batches of every dp rank,
    the same on every rank, from an engine built by `parallel.parallelize` (the training loop's, or
    `load_engine`'s). Collective over the world.

    The engine returns each batch's mean loss (the loss wrapper's, or the last pipeline stage's: the
    vocab-parallel cross-entropy under tp); times the batch's target count it is the sum the one-process
    evaluation adds up, so the mean weights every token equally whatever the dp size and whatever the
    number of targets per batch (MLM and span corruption vary)."""
    if topology.dims.pp > 1:
        from parallel.pipeline import evaluate_pipeline

        means = evaluate_pipeline(engine, family, batches)
    else:
        was_training = engine.training
        engine.eval()
        means = [float(engine(b)) for b in batches]
        engine.train(was_training)
    targets = [int((b["labels"] != IGNORE_INDEX).sum()) if keep else 0 for b, keep in zip(batches, counted)]
    # A batch with no targets adds nothing: the cross-entropy's mean is 0 there, but a model's own
    # pretraining_loss need not be (a NaN times 0 targets would still be NaN).
    total = sum(m * n for m, n in zip(means, targets) if n)
    t = torch.tensor([total, sum(targets), sum(counted)], dtype=torch.float64)
    if topology.dims.dp > 1:
        torch.distributed.all_reduce(t, group=topology.dp_group)
    return t[0].item(), int(t[1].item()), int(t[2].item())


def distributed_validation_loss(
    engine: Any,
    cfg: Config,
    topology: Topology,
    *,
    shards: str | Path | None = None,
    split: str | None = None,
    num_batches: int | None = None,
    micro_batch_size: int | None = None,
) -> dict[str, Any]:
    """`validation_loss` of an engine at any tp/pp/dp layout (`load_engine`): the same batches, the same
    token-weighted mean, the same record (plus the layout). Collective over the world."""
    objective, tok, shards_dir = _objective(cfg, shards)
    split = split or cfg.data.eval_split
    batches, counted = validation_batches(
        shards_dir,
        objective,
        split=split,
        micro_batch_size=micro_batch_size or cfg.train.micro_batch_size,
        num_batches=num_batches or cfg.train.eval_batches,
        eos_id=int(tok["eos_id"]),
        dp_rank=topology.dp_rank,
        dp_size=topology.dims.dp,
    )
    total, count, seen = engine_validation(
        engine, topology, family=cfg.model.family, batches=batches, counted=counted
    )
    record = _perplexity_record(
        cfg, split=split, shards_dir=shards_dir, total=total, count=count, batches=seen
    )
    record["layout"] = {"tp": topology.dims.tp, "pp": topology.dims.pp, "dp": topology.dims.dp}
    return record


# ----------------------------------------------------------------------------- in place, at a parallel layout


def load_engine(
    checkpoint: str | Path, *, tp: int | None = None, pp: int | None = None
) -> tuple[Any, Config, Topology]:
    """(engine, its config, its topology): a checkpoint's model at `tp` x `pp` (default: the layout it was
    saved at) over the launched world, dp = world / (tp x pp). Collective: every rank calls it.

    Built like the training loop's model: seeded `build_model`, then `parallel.parallelize` (tensor plan,
    the loss wrapper or the pipeline stages with the vocab-parallel cross-entropy, the DeepSpeed wrap), then
    loaded in place by the training loop's `Checkpointer` (the manifest verified, weights only: no optimizer
    state is read). At another tp/pp than the saved one the checkpoint is first converted by
    `pretrain.reshard` (ZeRO 0-2, any precision; cached beside it), as a resumed training run would; the
    converted weights are then the fp32 masters.
    Evaluation runs in fp32 without ZeRO whatever the run trained with; the module weights are read (under
    bf16/fp16 training, their low-precision copy). Sequence parallelism is off: it changes where
    activations live, not the weights, and few-shot prompts have any length."""
    from parallel.parallelize import parallelize
    from parallel.topology import ParallelDims
    from parallel.topology import Topology as _Topology
    from pretrain.checkpoint import Checkpointer, CheckpointError, read_manifest
    from pretrain.config import ConfigError, deepspeed_config, validation_problems
    from pretrain.distributed import init_distributed, launched_world_size
    from pretrain.export import _checkpoint_config
    from pretrain.losses import LanguageModelLoss, token_cross_entropy
    from pretrain.models import build_model

    checkpoint = Path(checkpoint)
    cfg = _checkpoint_config(checkpoint)
    meta = read_manifest(checkpoint)
    saved = meta.get("layout") or {}
    saved_tp, saved_pp = int(saved.get("tp", 1)), int(saved.get("pp", 1))
    saved_zero = int(saved.get("zero", cfg.parallel.zero_stage))
    tp, pp = tp or saved_tp, pp or saved_pp
    world = launched_world_size()
    dims = ParallelDims.from_world(world, tp=tp, pp=pp)  # names every degree when they do not fit
    if saved_zero == 3:
        raise ValueError(
            f"{checkpoint}: saved with ZeRO stage 3, whose module files hold no weights; evaluate it in one "
            "process (without a launcher), which consolidates the partitioned weights"
        )
    c, t = cfg.parallel, cfg.train
    c.tp, c.pp, c.zero_stage, c.sequence_parallel = tp, pp, 0, False
    c.activation_checkpointing, c.offload_optimizer, c.offload_param, c.cpu_adam = (
        "none",
        "none",
        "none",
        False,
    )
    t.precision, t.batch_size_ramp, t.compile = "fp32", None, "none"
    t.global_batch_size = t.micro_batch_size * dims.dp
    cfg.model.teacher_checkpoint = ""  # a distilled student evaluates on its own
    problems = validation_problems(cfg, world_size=world)
    if problems:
        raise ConfigError(problems, source=f"{checkpoint} at tp={tp}, pp={pp}, dp={dims.dp}")

    rank, world, _ = init_distributed(timeout_s=t.collective_timeout_s)
    topo = _Topology.build(tp=tp, pp=pp)
    torch.manual_seed(t.seed)
    model = build_model(cfg.model)
    if getattr(model, "pretraining_loss", None) is not None:
        raise ValueError(
            f"{checkpoint}: {type(model).__name__} trains with its own pretraining loss; evaluation under a "
            "launcher reports the token cross-entropy of plain GPT, BERT and T5 models: run it in one process"
        )
    engine, _ = parallelize(
        model,
        topology=topo,
        ds_config=deepspeed_config(cfg, dp_size=dims.dp),
        # DeepSpeed builds a training engine; SGD at lr 0 holds no state and never steps.
        make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.0),
        wrap=lambda m: LanguageModelLoss(m, tp_group=topo.tp_group, tp_size=tp),
        seed=t.seed,
        expert_parallel=c.ep,
        pipeline_partition=c.pp_partition,
        pipeline_loss=lambda logits, labels: token_cross_entropy(
            logits, labels, tp_group=topo.tp_group, tp_size=tp
        ),
    )
    checkpointer = Checkpointer(
        checkpoint.parent.parent,
        engine,
        rank=rank,
        world_size=world,
        verify_on_load=cfg.checkpoint.verify_on_load,
    )
    load_from = checkpoint
    if (tp, pp) == (saved_tp, saved_pp):
        # Weights only: any dp size reads the same module files (ZeRO 1/2 partition optimizer state only).
        plan = "same" if int(meta.get("world_size", 1)) == world else "plain"
    else:
        layout = {"tp": tp, "pp": pp, "dp": dims.dp, "zero": 0, "precision": "fp32"}
        plan = Checkpointer.reshard_plan(checkpoint, layout)
        if plan != "reshard":
            raise CheckpointError(f"{checkpoint}: cannot convert to {layout} (plan {plan!r})")
        load_from = checkpointer.prepare_reshard(checkpoint, layout, partition=c.pp_partition)
    checkpointer.load(load_from, plan=plan, load_optimizer=False)
    engine.eval()
    return engine, cfg, topo


# ----------------------------------------------------------------------------- scoring


@torch.no_grad()
def continuation_logprobs(
    model: nn.Module,
    context: Sequence[Sequence[int]],
    continuation: Sequence[Sequence[int]],
    *,
    tp_group: Any = None,
) -> list[torch.Tensor]:
    """Per-token log-probabilities of each continuation given its context, in one batched forward pass.

    Returns one (len(continuation[i]),) tensor per row: log p(c_j | context, c_<j). Only continuation tokens
    are scored; the context is conditioning. Rows are right-padded: under causal attention padding after a
    row's last token cannot change that row's logits, so no attention mask is needed.

    With `tp_group` the model is tensor-parallel and returns its rank's vocabulary slice of the logits
    (B, T, V/tp): log p of the chosen token is minus the vocab-parallel cross-entropy (the normalizer
    all-reduced over the group, the chosen logit taken from the rank that holds it), so full-vocabulary
    logits are never gathered. Collective over `tp_group`."""
    if len(context) != len(continuation):
        raise ValueError(f"{len(context)} contexts but {len(continuation)} continuations")
    rows = [list(a) + list(b) for a, b in zip(context, continuation)]
    for a, b in zip(context, continuation):
        if not a or not b:
            raise ValueError("context and continuation must each hold at least one token")
    width = max(len(r) for r in rows)
    device = next(model.parameters()).device
    ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)  # (B, T), pad id 0
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    from parallel.tensor import vocab_parallel_cross_entropy

    logits = model(ids).float()  # (B, T, V), or (B, T, V/tp)
    logp = torch.log_softmax(logits, dim=-1) if tp_group is None else None
    out = []
    for i, (a, b) in enumerate(zip(context, continuation)):
        # Token t is predicted at position t - 1.
        pos = torch.arange(len(a) - 1, len(a) + len(b) - 1, device=device)
        target = torch.tensor(b, device=device)
        if logp is not None:
            out.append(logp[i, pos, target].cpu())
        else:
            nll = vocab_parallel_cross_entropy(logits[i, pos], target, tp_group, reduction="none")  # (n,)
            out.append(-nll.cpu())
    return out


def vocab_parallel_argmax(local_logits: torch.Tensor, group: Any) -> torch.Tensor:
    """argmax over the last dim of logits split by vocabulary over a tensor-parallel group (rank r holds
    columns [r·V/tp, (r+1)·V/tp)), without gathering them: each rank's best value and its global index are
    all-gathered (two numbers per row and rank). (..., V/tp) -> (...) global ids, the same on every rank; a
    tie goes to the lowest id, as torch.argmax over the whole vocabulary does."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    value, index = local_logits.max(dim=-1)  # first maximum within the slice
    index = index + rank * local_logits.shape[-1]
    values = [torch.empty_like(value) for _ in range(world)]
    indices = [torch.empty_like(index) for _ in range(world)]
    dist.all_gather(values, value.contiguous(), group=group)
    dist.all_gather(indices, index.contiguous(), group=group)
    best = torch.stack(values).argmax(dim=0)  # (...,): the first rank holding the maximum, i.e. the lowest id
    return torch.stack(indices).gather(0, best.unsqueeze(0)).squeeze(0)


@torch.no_grad()
def greedy_matches(
    model: nn.Module, context: Sequence[int], continuation: Sequence[int], *, tp_group: Any = None
) -> bool:
    """Whether greedy decoding from `context` produces exactly `continuation` (as its first tokens).

    Greedy decoding is deterministic, so it emits c_1..c_n iff argmax p(. | context, c_<j) == c_j for every j:
    one teacher-forced forward pass decides it, without generating token by token. With `tp_group` the
    logits are the rank's vocabulary slice and the argmax is `vocab_parallel_argmax` (collective)."""
    ids = torch.tensor([list(context) + list(continuation)], device=next(model.parameters()).device)
    logits = model(ids)[0]  # (T, V), or (T, V/tp)
    rows = logits[len(context) - 1 : len(context) + len(continuation) - 1]
    real = real_vocab_size(model)  # padding rows (model.make_vocab_size_divisible_by) are never generated
    if real is not None:
        first = rows.shape[-1] * (
            torch.distributed.get_rank(tp_group) if tp_group is not None else 0
        )  # slice start
        rows = mask_padding_rows(rows.clone(), max(0, real - first))
    pred = rows.argmax(-1) if tp_group is None else vocab_parallel_argmax(rows, tp_group)
    return bool((pred.cpu() == torch.tensor(list(continuation))).all())


def standard_error(p: float, n: int) -> float:
    """Standard error of an accuracy p measured on n independent examples: sqrt(p (1 - p) / n)."""
    return math.sqrt(p * (1.0 - p) / n) if n > 0 else float("nan")


# ----------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class PromptFormat:
    """How examples become text. `template` holds `{context}` and then `{answer}`; the query is rendered up to
    `{answer}` and the model continues it. Demonstrations are joined by `separator`."""

    template: str = "{context} {answer}"
    separator: str = "\n\n"

    def __post_init__(self) -> None:
        c, a = self.template.find("{context}"), self.template.find("{answer}")
        if c < 0 or a < 0 or a < c:
            raise ValueError(
                f"prompt template {self.template!r} must contain {{context}} and then {{answer}}"
            )

    def demonstration(self, context: str, answer: str) -> str:
        return self.template.replace("{context}", context).replace("{answer}", answer)

    def query(self, context: str) -> str:
        return self.template[: self.template.find("{answer}")].replace("{context}", context)


def answer_text(example: dict[str, Any]) -> str:
    """The gold answer of a multiple-choice (`choices` + `answer` index or text) or completion example."""
    if "choices" in example:
        answer, choices = example["answer"], example["choices"]
        if isinstance(answer, int) and not isinstance(answer, bool):
            return str(choices[answer])
        return str(answer)
    return str(example["completion"])


def demonstration_order(query_index: int, candidates: int, *, seed: int) -> list[int]:
    """A seeded permutation of the candidate pool for one query. Taking its first k for every k nests the
    demonstrations (the 1-shot example is the first of the 5-shot ones), so a shot curve changes only k."""
    order = list(range(candidates))
    # Seeding with a (seed, index) integer keeps the order independent of PYTHONHASHSEED and of other queries.
    random.Random(seed * 1_000_003 + query_index).shuffle(order)
    return order


def build_prompt(
    query: dict[str, Any],
    query_index: int,
    *,
    k: int,
    pool: Sequence[dict[str, Any]],
    seed: int,
    fmt: PromptFormat,
    pool_is_query_file: bool,
) -> tuple[str, list[int]]:
    """The k-shot prompt for one query and the pool indices of its demonstrations.

    The query itself is never a demonstration: with the pool being the query file its index is excluded, and
    any pool item identical to the query (same context) is excluded too, so a separate pool that happens to
    contain the test item cannot leak its answer."""
    allowed = [
        i
        for i in range(len(pool))
        if not (pool_is_query_file and i == query_index) and pool[i].get("context") != query.get("context")
    ]
    if k > len(allowed):
        raise ValueError(f"{k}-shot needs {k} demonstrations but the pool has only {len(allowed)} usable")
    chosen = [allowed[j] for j in demonstration_order(query_index, len(allowed), seed=seed)[:k]]
    parts = [fmt.demonstration(pool[i]["context"], answer_text(pool[i])) for i in chosen]
    parts.append(fmt.query(query["context"]))
    return fmt.separator.join(parts), chosen


def split_prompt(prompt: str, answer: str) -> tuple[str, str]:
    """Moves trailing whitespace of the prompt onto the answer: this tokenizer marks a word's leading space on
    the word's own piece ("▁Paris"), so "A: " + "Paris" must be scored as "A:" + " Paris" to match how the same
    text was tokenized in training."""
    stripped = prompt.rstrip()
    return stripped, prompt[len(stripped) :] + answer


# ----------------------------------------------------------------------------- few-shot evaluation


def _kind(rows: Sequence[dict[str, Any]], path: str) -> Literal["multiple_choice", "completion"]:
    kinds = {"multiple_choice" if "choices" in r else "completion" for r in rows}
    if len(kinds) != 1:
        raise ValueError(f"{path}: mixes multiple-choice and completion examples; use one kind per file")
    kind = kinds.pop()
    need = ("context", "choices", "answer") if kind == "multiple_choice" else ("context", "completion")
    for n, r in enumerate(rows, 1):
        missing = [k for k in need if k not in r]
        if missing:
            raise ValueError(f"{path}: example {n} lacks {', '.join(missing)}")
        if kind == "multiple_choice":
            a = r["answer"]
            ok = (isinstance(a, int) and 0 <= a < len(r["choices"])) or (
                isinstance(a, str) and a in r["choices"]
            )
            if not ok or len(r["choices"]) < 2:
                raise ValueError(
                    f"{path}: example {n}: answer {a!r} is not one of its {len(r['choices'])} choices"
                )
    return kind  # type: ignore[return-value]


def _truncate_left(context: list[int], continuation: list[int], max_len: int) -> tuple[list[int], bool]:
    # The oldest demonstrations are the least needed part of the prompt: drop tokens from the left.
    room = max_len - len(continuation)
    if room < 1:
        raise ValueError(
            f"a continuation of {len(continuation)} tokens does not fit model.max_seq_len={max_len}"
        )
    return (context[-room:], True) if len(context) > room else (context, False)


def fewshot_eval(
    model: nn.Module,
    tokenizer: Any,
    data: str | Path,
    *,
    shots: Sequence[int] = (0, 1, 5),
    pool: str | Path | None = None,
    seed: int = 0,
    fmt: PromptFormat | None = None,
    limit: int | None = None,
    topology: Topology | None = None,
) -> dict[str, Any]:
    """Zero/one/few-shot accuracy of a GPT checkpoint on a JSONL task, per number of shots.

    Returns {"task", "kind", "n", "results": [per-shot dicts]}. A per-shot dict holds `acc` and `acc_stderr`
    and, for multiple choice, `acc_norm` / `acc_norm_stderr` (per-token log-likelihood), for completion
    `exact_match` (= `acc`); `truncated` counts prompts cut on the left to fit model.max_seq_len.

    With `topology` (pp = 1) `model` is this rank's tensor-parallel model (`load_engine`): log-probabilities
    and argmaxes are taken over the vocab-parallel logits, and dp rank r scores queries r, r + dp, ...; the
    counts are summed over dp, so the result equals the one-process one. Collective over the world."""
    fmt = fmt or PromptFormat()
    rows = read_jsonl(data)
    kind = _kind(rows, str(data))
    pool_rows = rows if pool is None else read_jsonl(pool)
    if pool is not None and _kind(pool_rows, str(pool)) != kind:
        raise ValueError(f"{pool}: a {kind} task needs a pool of the same kind")
    queries = rows[:limit] if limit else rows
    max_len = int(model.config.max_seq_len)  # type: ignore[union-attr, arg-type]
    # Training packs documents separated by <eos>, so a prompt that starts after <eos> looks like the start of a
    # document; it also gives a 0-shot query one token of context to predict its first token from.
    bos = [int(tokenizer.eos_id)]
    tp_group = topology.tp_group if topology is not None and topology.dims.tp > 1 else None
    dp_rank, dp = (topology.dp_rank, topology.dims.dp) if topology is not None else (0, 1)
    results = []
    for k in shots:
        correct, correct_norm, truncated = 0, 0, 0
        for i, q in enumerate(queries):
            if i % dp != dp_rank:
                continue
            prompt, _ = build_prompt(
                q, i, k=k, pool=pool_rows, seed=seed, fmt=fmt, pool_is_query_file=pool is None
            )
            if kind == "multiple_choice":
                options = [str(c) for c in q["choices"]]
                gold = options.index(answer_text(q))
                contexts, conts = [], []
                for option in options:
                    text, cont = split_prompt(prompt, option)
                    ids, cut = _truncate_left(bos + tokenizer.encode(text), tokenizer.encode(cont), max_len)
                    truncated += cut
                    contexts.append(ids)
                    conts.append(tokenizer.encode(cont))
                scores = continuation_logprobs(model, contexts, conts, tp_group=tp_group)
                ll = [float(s.sum()) for s in scores]
                ll_norm = [float(s.mean()) for s in scores]
                # Ties go to the first choice (max keeps the first): deterministic, and documented as such.
                correct += max(range(len(ll)), key=ll.__getitem__) == gold
                correct_norm += max(range(len(ll_norm)), key=ll_norm.__getitem__) == gold
            else:
                text, cont = split_prompt(prompt, str(q["completion"]))
                cont_ids = tokenizer.encode(cont)
                ids, cut = _truncate_left(bos + tokenizer.encode(text), cont_ids, max_len)
                truncated += cut
                correct += greedy_matches(model, ids, cont_ids, tp_group=tp_group)
        if topology is not None and dp > 1:
            counts = torch.tensor([correct, correct_norm, truncated], dtype=torch.int64)
            torch.distributed.all_reduce(counts, group=topology.dp_group)
            correct, correct_norm, truncated = (int(x) for x in counts.tolist())
        n = len(queries)
        acc = correct / n
        r: dict[str, Any] = {"shots": k, "n": n, "acc": acc, "acc_stderr": standard_error(acc, n)}
        if kind == "multiple_choice":
            acc_norm = correct_norm / n
            r |= {"acc_norm": acc_norm, "acc_norm_stderr": standard_error(acc_norm, n)}
        else:
            r["exact_match"] = acc
        r["truncated"] = truncated
        results.append(r)
    return {"task": "fewshot", "kind": kind, "data": str(data), "n": len(queries), "results": results}


def iter_shots(spec: str) -> Iterator[int]:
    """ "0,1,5" -> 0, 1, 5 (each >= 0)."""
    for part in spec.split(","):
        part = part.strip()
        if not part.isdigit():
            raise ValueError(f"--shots {spec!r}: {part!r} is not a non-negative integer")
        yield int(part)
