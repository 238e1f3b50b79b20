"""Fine-tuning pretrained checkpoints on labelled tasks, every parameter updated.

- BERT classification (Devlin et al. 2019, §3.2 and §4.1): the pooled `<cls>` representation (dense + tanh,
  `BERT.pooled`) feeds a new dropout + linear layer; single sentences are `<cls> a <sep>` with token type 0,
  pairs `<cls> a <sep> b <sep>` with type 1 on the second segment. Task files: `{"text", "label"}` or
  `{"text", "text_pair", "label"}`. Metrics: accuracy and macro-F1.
- T5 text-to-text (Raffel et al. 2020, §2.4): the task is named by a prefix in the input
  (`{"input": "summarize: ...", "target": "..."}`), no new layers; trained with teacher forcing, evaluated by
  greedy decoding: exact match and ROUGE-L (F-measure of the longest common subsequence of words).

Both run through the training loop's parts: a `Config` derived from the checkpoint's (model unchanged;
optimizer, batch, seed and layout from the options), the DeepSpeed engine built by `parallel.parallelize`
over a `Topology` (data parallel over the launched world: `deepspeed`/`torchrun`/`srun`, ZeRO 0-2; tensor
and pipeline parallelism are not offered), megatron-core's scheduler (`pretrain.train.build_scheduler`:
linear warmup, linear decay), the `Checkpointer` (OUT/checkpoints/step-N: weights, AdamW state, scheduler,
RNG, the epoch's losses and history; `resume="auto"` continues the newest) and `MetricsLogger`
(OUT/metrics.jsonl: every step's loss, every epoch's metrics). Stop signals (SIGTERM, SIGUSR1) save and stop
at a step boundary, as in training.

Data parallelism splits each global batch of `batch_size` examples into contiguous per-rank shares. Each rank's
loss is its share of the global batch's summed loss divided by the global batch's targets (examples, or target
tokens for text2text) times dp: DeepSpeed averages gradients over the dp ranks, so the update is the
one-process update of the same global batch whatever the split (a short last batch included; a rank left
without an example runs one with weight 0, so every rank reaches the gradient all-reduce). Rows are padded
to the global batch's widths, so each row's arithmetic is the one-process arithmetic. Evaluation splits the
evaluation batches over the dp ranks and gathers the per-batch results in order. With the same seed, data
and layout a run is deterministic, including across a stop and resume.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config import Config
from pretrain.generate import mask_padding_rows, real_vocab_size

IGNORE_INDEX = -100


@dataclass(frozen=True)
class FinetuneOptions:
    epochs: int = 3
    """passes over the training file"""
    lr: float = 5e-5
    """peak learning rate (BERT's fine-tuning range is 2e-5..5e-5 for base-sized models)"""
    batch_size: int = 16
    """examples per optimizer step over all data-parallel ranks (the global batch)"""
    seed: int = 0
    """seed of the new head's initialization, dropout and the shuffling of the training examples"""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay (not applied to biases and norms)"""
    warmup_fraction: float = 0.1
    """fraction of the steps with linear warmup from 0; the rest decays linearly towards 0"""
    max_len: int = 128
    """input tokens per example (clipped to model.max_seq_len); longer inputs are truncated"""
    max_target_len: int = 64
    """text2text: target tokens per example, and the longest greedy decode"""
    dropout: float = 0.1
    """classify: dropout on the pooled representation before the new linear layer"""
    num_beams: int = 1
    """text2text: beam width of the evaluation decode; 1 is greedy"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this; 0 disables"""
    zero_stage: int = 0
    """ZeRO stage of the engine: 0, 1 (optimizer states) or 2 (+ gradients) over the data-parallel ranks"""
    save_interval: int = 0
    """steps between checkpoints in OUT/checkpoints (0: only after the last step)"""
    keep_last: int = 2
    """complete checkpoints to keep (0 keeps all)"""
    resume: str = "auto"
    """'auto' (newest checkpoint in OUT/checkpoints), 'never', or a checkpoint directory"""

    def problems(self) -> list[str]:
        p = []
        for name in ("epochs", "batch_size", "max_len", "max_target_len", "num_beams"):
            if getattr(self, name) < 1:
                p.append(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("save_interval", "keep_last"):
            if getattr(self, name) < 0:
                p.append(f"{name}={getattr(self, name)} must be >= 0")
        if self.lr <= 0:
            p.append(f"lr={self.lr} must be > 0")
        if self.grad_clip < 0:
            p.append(f"grad_clip={self.grad_clip} must be >= 0")
        if not 0.0 <= self.warmup_fraction < 1.0:
            p.append(f"warmup_fraction={self.warmup_fraction} must be in [0, 1)")
        if not 0.0 <= self.dropout < 1.0:
            p.append(f"dropout={self.dropout} must be in [0, 1)")
        if self.zero_stage not in (0, 1, 2):
            p.append(f"zero_stage={self.zero_stage} must be 0, 1 or 2")
        return p

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed run must share with the run that wrote the checkpoint (not how often it saves)."""
        return {k: v for k, v in asdict(self).items() if k not in ("save_interval", "keep_last", "resume")}


# ----------------------------------------------------------------------------- shared loop


def _pad(rows: Sequence[Sequence[int]], value: int, width: int | None = None) -> torch.Tensor:
    width = width or max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
    return out


def epoch_batches(n: int, batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """Every step's global batch (example indices), epoch after epoch: one seeded permutation per epoch from
    one generator, cut into batches of `batch_size` (the last of an epoch may be shorter). A resumed run
    recomputes the same list and continues at its step."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).tolist()
        out += [order[start : start + batch_size] for start in range(0, n, batch_size)]
    return out


def rank_share(rows: list[int], dp_rank: int, dp: int) -> tuple[list[int], int]:
    """This rank's contiguous share of a global batch and the position of its first row: ceil(len/dp) rows
    per rank, the last ranks short (or empty) when the batch does not divide."""
    per = -(-len(rows) // dp)
    return rows[dp_rank * per : (dp_rank + 1) * per], dp_rank * per


class _Task:
    """What the shared loop needs from a task: batches, loss, per-batch evaluation and metrics."""

    name: str
    network: nn.Module  # trained and saved: the classifier, or the encoder-decoder itself
    n_train: int
    n_eval: int

    def batch(self, rows: list[int], batch_rows: list[int], first: int) -> dict[str, torch.Tensor]:
        """Training `rows` (this rank's share of `batch_rows`, from position `first`), padded to
        `batch_rows`' widths."""
        raise NotImplementedError

    def targets(self, rows: list[int]) -> int:
        """What the global batch's loss is the mean over: examples (classify) or target tokens (text2text)."""
        raise NotImplementedError

    def loss_sum(self, network: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def eval_batch(self, network: nn.Module, rows: list[int]) -> dict[str, Any]:
        """Evaluation results of one batch of evaluation examples (plain numbers and lists)."""
        raise NotImplementedError

    def metrics(self, parts: list[dict[str, Any]]) -> dict[str, float]:
        """Metrics from every evaluation batch's results, in batch order."""
        raise NotImplementedError


class _ShareLoss(nn.Module):
    """The engine's module: forward(batch) -> this rank's summed loss times batch["scale"] (= dp / the
    global batch's targets; 0 for a placeholder row), so the dp-averaged gradient is the global batch's."""

    def __init__(self, network: nn.Module, task: _Task):
        super().__init__()
        self.model = network  # named like the training loop's wrapper: checkpoint keys start with model.
        self.task = task

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "scale"}
        return self.task.loss_sum(self.model, inputs) * batch["scale"]


def finetune_config(
    cfg: Config, opts: FinetuneOptions, *, steps: int, dp: int, out_dir: Path | None
) -> Config:
    """The fine-tuning run's `Config`: the checkpoint's model, the options' optimizer, schedule, batch and
    layout. Saved in every checkpoint; the DeepSpeed JSON and the scheduler are generated from it."""
    ft = copy.deepcopy(cfg)
    o, t = ft.optimizer, ft.train
    o.lr, o.min_lr, o.weight_decay, o.grad_clip = opts.lr, 0.0, opts.weight_decay, opts.grad_clip
    o.weight_decay_end, o.weight_decay_style, o.beta1, o.beta2, o.eps = None, "constant", 0.9, 0.999, 1e-8
    o.decay_style, o.warmup_steps = "linear", int(opts.warmup_fraction * steps)
    # megatron-core's schedule reaches min_lr (0) at decay_steps; one past the last step keeps its rate > 0.
    o.decay_steps = steps + 1
    t.steps, t.seed, t.precision = steps, opts.seed, "fp32"
    t.micro_batch_size = -(-opts.batch_size // dp)
    t.global_batch_size, t.batch_size_ramp = t.micro_batch_size * dp, None
    t.resume, t.out_dir, t.init_from = opts.resume, str(out_dir or ""), ""
    t.compile = "none"  # fine-tuning runs eagerly; its saved config says so
    ft.parallel.tp, ft.parallel.pp, ft.parallel.zero_stage = 1, 1, opts.zero_stage
    par = ft.parallel
    par.activation_checkpointing, par.offload_optimizer, par.offload_param, par.cpu_adam = (
        "none",
        "none",
        "none",
        False,
    )
    ft.parallel.sequence_parallel, ft.parallel.ep = False, 1
    ft.checkpoint.interval, ft.checkpoint.keep_last = opts.save_interval, opts.keep_last
    return ft


def _run(
    task: _Task,
    cfg: Config,
    opts: FinetuneOptions,
    *,
    out_dir: Path | None,
    fingerprint: dict[str, Any],
    log: Callable[[str], None],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Steps over every epoch's batches through the DeepSpeed engine, evaluating after each epoch and
    checkpointing every `save_interval` steps and at the end. Returns (per-epoch records, run facts)."""
    import yaml

    from parallel.parallelize import parallelize, param_groups
    from parallel.topology import Topology
    from pretrain.checkpoint import Checkpointer, CheckpointError
    from pretrain.config import config_to_dict, deepspeed_config
    from pretrain.distributed import init_distributed
    from pretrain.metrics import MetricsLogger
    from pretrain.preemption import StopFlag
    from pretrain.train import adamw, build_scheduler

    rank, world, _ = init_distributed(timeout_s=cfg.train.collective_timeout_s)
    topo = Topology.build(tp=1, pp=1)
    dp, dp_rank = topo.dims.dp, topo.dp_rank
    say = log if rank == 0 else (lambda _: None)
    batches = epoch_batches(task.n_train, opts.batch_size, opts.epochs, opts.seed)
    per_epoch = len(batches) // opts.epochs
    total = len(batches)
    ft = finetune_config(cfg, opts, steps=total, dp=dp, out_dir=out_dir)

    checkpointer = None
    resume_from = None
    plan = "same"
    if out_dir is not None:
        checkpointer = Checkpointer(out_dir, None, rank=rank, world_size=world, keep_last=opts.keep_last)
        resume_from = checkpointer.resolve(opts.resume)
        if resume_from is not None:
            layout = {"tp": 1, "pp": 1, "dp": dp, "zero": opts.zero_stage}
            plan = Checkpointer.reshard_plan(resume_from, layout)
            if plan not in ("same", "plain"):
                raise CheckpointError(
                    f"{resume_from}: fine-tuning resumes at the saved layout, or at another dp under ZeRO 0; "
                    f"this run has {layout}"
                )

    optimizers: list[torch.optim.Optimizer] = []

    def make_optimizer(module: nn.Module) -> torch.optim.Optimizer:
        optimizers.append(adamw(param_groups(module, ft.optimizer.weight_decay), ft.optimizer))
        return optimizers[-1]

    engine, _ = parallelize(
        task.network,
        topology=topo,
        ds_config=deepspeed_config(ft, dp_size=dp),
        make_optimizer=make_optimizer,
        wrap=lambda network: _ShareLoss(network, task),
        seed=opts.seed,
    )
    if world == 1 and opts.zero_stage == 0:
        engine.enable_backward_allreduce = False  # one rank: nothing to average (as in the training loop)
    scheduler = build_scheduler(engine.optimizer, ft)

    step, history, epoch_losses = 0, [], []
    if checkpointer is not None:
        checkpointer.attach(engine)
        if resume_from is not None:
            state, _ = checkpointer.load(resume_from, plan=plan)
            if state["fingerprint"] != fingerprint:
                raise CheckpointError(
                    f"{resume_from}: written by another fine-tuning run ({state['fingerprint']}); this one is "
                    f"{fingerprint}. Use another --out, or --resume never"
                )
            scheduler.load_state_dict(state["scheduler"])
            step, history, epoch_losses = (
                int(state["step"]),
                list(state["history"]),
                list(state["epoch_losses"]),
            )
            say(f"resumed from {resume_from} at step {step} of {total}")
    logger = MetricsLogger(
        out_dir or Path("."),
        enabled=rank == 0 and out_dir is not None,
        total_steps=total,
        start_step=step,
        progress=False,
    )
    config_yaml = yaml.safe_dump(config_to_dict(ft), sort_keys=False)

    def save(at: int) -> Path:
        assert checkpointer is not None
        state = {
            "step": at,
            "scheduler": scheduler.state_dict(),
            "history": history,
            "epoch_losses": epoch_losses,
            "fingerprint": fingerprint,
        }
        meta = {
            "layout": {"tp": 1, "pp": 1, "dp": dp, "zero": opts.zero_stage},
            "family": cfg.model.family,
            "task": task.name,
        }
        return checkpointer.save(at, state=state, meta=meta, config_yaml=config_yaml)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        import torch.distributed as dist

        task.network.eval()
        eval_rows = list(range(task.n_eval))
        chunks = [eval_rows[i : i + opts.batch_size] for i in range(0, task.n_eval, opts.batch_size)]
        mine = [
            (j, task.eval_batch(task.network, rows)) for j, rows in enumerate(chunks) if j % dp == dp_rank
        ]
        if dp > 1:
            gathered: list[Any] = [None] * dp
            dist.all_gather_object(gathered, mine, group=topo.dp_group)
            mine = [part for rank_parts in gathered for part in rank_parts]
        task.network.train()
        return task.metrics([part for _, part in sorted(mine, key=lambda x: x[0])])

    stop = StopFlag().install()
    stopped: str | None = None
    last_saved = step if resume_from is not None else -1
    t_epoch = time.perf_counter()
    engine.train()
    try:
        while step < total:
            rows = batches[step]
            (share, first), scale = rank_share(rows, dp_rank, dp), dp / task.targets(rows)
            if not share:  # a short last batch left this rank nothing: one row with weight 0
                share, first, scale = rows[:1], 0, 0.0
            batch = task.batch(share, rows, first)
            batch["scale"] = torch.tensor(scale, dtype=torch.float32)
            scheduler.step(1)  # lr for update number step+1, as in the training loop
            loss = engine(batch)
            engine.backward(loss)
            engine.step()
            step += 1
            value = loss.detach().double()
            if dp > 1:
                torch.distributed.all_reduce(value, group=topo.dp_group)
            epoch_losses.append(value.item() / dp)
            epoch = (step - 1) // per_epoch + 1
            logger.log(
                {
                    "step": step,
                    "epoch": epoch,
                    "loss": epoch_losses[-1],
                    "lr": engine.optimizer.param_groups[0]["lr"],
                }
            )
            if step % per_epoch == 0:
                record: dict[str, Any] = {
                    "epoch": epoch,
                    "train_loss": sum(epoch_losses) / len(epoch_losses),
                    **evaluate(),
                }
                record["seconds"] = time.perf_counter() - t_epoch
                history.append(record)
                epoch_losses = []
                t_epoch = time.perf_counter()
                logger.log({"step": step, **{k: v for k, v in record.items() if k != "seconds"}})
                say(
                    " ".join(
                        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                    )
                )
            if checkpointer is not None and (
                (opts.save_interval and step % opts.save_interval == 0) or step == total
            ):
                save(step)
                last_saved = step
            if step < total and stop.agreed(topo.dp_group, dp):
                stopped = stop.local_reason() or "another rank's request"
                if checkpointer is not None and last_saved != step:
                    save(step)
                break
    finally:
        stop.uninstall()
        logger.close()
    facts: dict[str, Any] = {"steps": step, "total_steps": total, "world_size": world, "dp": dp}
    if resume_from is not None:
        facts["resumed_from"] = str(resume_from)
    if stopped is not None:
        facts["stopped_early"] = stopped
    return history, facts


def _save(module: nn.Module, cfg: Config, out_dir: Path, info: dict[str, Any]) -> Path:
    """out_dir/model.safetensors (every weight, the new head included), config.yaml, metrics.json."""
    from safetensors.torch import save_file

    from pretrain.config import save_config

    out_dir.mkdir(parents=True, exist_ok=True)
    # Tied weights share storage and safetensors refuses shared storage: store independent copies.
    state = {k: v.detach().contiguous().clone().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt", "producer": "tandem"})
    save_config(cfg, out_dir / "config.yaml")
    path = out_dir / "metrics.json"
    path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return path


def _finish(
    task: _Task,
    cfg: Config,
    opts: FinetuneOptions,
    history: list[dict[str, Any]],
    facts: dict[str, Any],
    out_dir: Path | None,
    extra: dict[str, Any],
) -> dict[str, Any]:
    info: dict[str, Any] = {
        "task": task.name,
        **extra,
        "train_examples": task.n_train,
        "eval_examples": task.n_eval,
        **{k: v for k, v in (history[-1] if history else {}).items() if k not in ("epoch", "seconds")},
        **facts,
        "history": history,
        "options": asdict(opts),
    }
    import torch.distributed as dist

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if out_dir is not None and rank0 and "stopped_early" not in facts:
        _save(task.network, cfg, Path(out_dir), info)
    return info


def _fingerprint(task: str, opts: FinetuneOptions, *rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    data = hashlib.sha256(json.dumps([list(r) for r in rows], sort_keys=True).encode()).hexdigest()
    return {"task": task, "data_sha256": data, **opts.fingerprint()}


# ----------------------------------------------------------------------------- BERT classification


class SequenceClassifier(nn.Module):
    """BERT + dropout + linear on the pooled <cls> representation (Devlin et al. 2019, §4.1)."""

    def __init__(self, bert: nn.Module, num_labels: int, *, dropout: float):
        super().__init__()
        self.bert = bert
        self.dropout = dropout
        hidden = int(bert.config.hidden_size)  # type: ignore[union-attr, arg-type]
        self.head = nn.Linear(hidden, num_labels)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
        *,
        rows: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """(B, T) each -> logits (B, num_labels).

        `rows=(first, total)`: this batch is rows [first, first + B) of a global batch of `total` rows. The
        dropout mask is drawn for all `total` rows and this batch's part applied: every data-parallel rank
        makes the same draw from the same generator state, so a rank's rows get the mask one process would
        give them."""
        hidden = self.bert.encode(input_ids, attention_mask, token_type_ids)  # type: ignore[operator]
        pooled = self.bert.pooled(hidden)  # type: ignore[operator]  # (B, C)
        if self.training and self.dropout > 0:
            first, total = rows if rows is not None else (0, pooled.shape[0])
            keep = torch.empty(total, pooled.shape[1], device=pooled.device).bernoulli_(1.0 - self.dropout)
            pooled = pooled * keep[first : first + pooled.shape[0]].to(pooled.dtype) / (1.0 - self.dropout)
        return self.head(pooled)


def encode_classification(
    tokenizer: Any, text: str, text_pair: str | None, max_len: int
) -> tuple[list[int], list[int]]:
    """-> (ids, token types): <cls> a <sep> [b <sep>], types 0 up to the first <sep> and 1 after it.

    Too long inputs lose tokens from the end of the longer segment first, so a long first sentence cannot
    push the second out entirely (BERT's truncation)."""
    a = tokenizer.encode(text)
    b = tokenizer.encode(text_pair) if text_pair is not None else None
    room = max_len - (3 if b is not None else 2)
    if room < 2:
        raise ValueError(f"max_len={max_len} leaves no room for text")
    if b is None:
        a = a[:room]
    else:
        while len(a) + len(b) > room:
            if len(a) >= len(b):
                a = a[:-1]
            else:
                b = b[:-1]
    cls, sep = int(tokenizer.cls_id), int(tokenizer.sep_id)
    ids = [cls, *a, sep]
    types = [0] * len(ids)
    if b is not None:
        ids += [*b, sep]
        types += [1] * (len(b) + 1)
    return ids, types


def classification_metrics(pred: Sequence[int], gold: Sequence[int], num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1: the unweighted mean over labels of 2PR/(P+R), a label with no true and no
    predicted example left out of the mean (it has no F1), one never predicted scoring 0."""
    if len(pred) != len(gold) or not gold:
        raise ValueError(f"{len(pred)} predictions for {len(gold)} gold labels")
    acc = sum(p == g for p, g in zip(pred, gold)) / len(gold)
    f1s = []
    for c in range(num_labels):
        tp = sum(p == c and g == c for p, g in zip(pred, gold))
        fp = sum(p == c and g != c for p, g in zip(pred, gold))
        fn = sum(p != c and g == c for p, g in zip(pred, gold))
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": acc, "macro_f1": sum(f1s) / len(f1s)}


class _Classify(_Task):
    name = "classify"

    def __init__(self, clf: SequenceClassifier, tokenizer: Any, train_rows, eval_rows, labels, max_len: int):
        self.network = clf
        self.index = {lab: i for i, lab in enumerate(labels)}
        self.num_labels = len(labels)
        self.pad = int(tokenizer.pad_id)
        self.train = self._encode(tokenizer, train_rows, max_len)
        self.eval = self._encode(tokenizer, eval_rows, max_len)
        self.n_train, self.n_eval = len(train_rows), len(eval_rows)

    def _encode(
        self, tokenizer: Any, rows: Sequence[dict[str, Any]], max_len: int
    ) -> tuple[list, list, list]:
        pairs = [encode_classification(tokenizer, r["text"], r.get("text_pair"), max_len) for r in rows]
        return [p[0] for p in pairs], [p[1] for p in pairs], [self.index[str(r["label"])] for r in rows]

    def _tensors(self, data: tuple[list, list, list], rows: list[int], width: int) -> dict[str, torch.Tensor]:
        ids, types, gold = data
        return {
            "input_ids": _pad([ids[i] for i in rows], self.pad, width),  # (B, T)
            "attention_mask": _pad([[1] * len(ids[i]) for i in rows], 0, width),
            "token_type_ids": _pad([types[i] for i in rows], 0, width),
            "labels": torch.tensor([gold[i] for i in rows]),
        }

    def batch(self, rows: list[int], batch_rows: list[int], first: int) -> dict[str, torch.Tensor]:
        out = self._tensors(self.train, rows, max(len(self.train[0][i]) for i in batch_rows))
        out["rows"] = torch.tensor([first, len(batch_rows)])  # where the dropout mask's rows come from
        return out

    def targets(self, rows: list[int]) -> int:
        return len(rows)

    def loss_sum(self, network: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        first, total = (int(x) for x in batch["rows"])
        logits = network(
            batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], rows=(first, total)
        )  # (B, L)
        return F.cross_entropy(logits, batch["labels"], reduction="sum")

    def eval_batch(self, network: nn.Module, rows: list[int]) -> dict[str, Any]:
        b = self._tensors(self.eval, rows, max(len(self.eval[0][i]) for i in rows))
        logits = network(b["input_ids"], b["attention_mask"], b["token_type_ids"])
        loss = F.cross_entropy(logits, b["labels"], reduction="sum").item()
        return {"loss": loss, "pred": logits.argmax(-1).tolist(), "gold": b["labels"].tolist()}

    def metrics(self, parts: list[dict[str, Any]]) -> dict[str, float]:
        pred = [p for part in parts for p in part["pred"]]
        gold = [g for part in parts for g in part["gold"]]
        loss = 0.0
        for part in parts:
            loss += part["loss"]
        return {"eval_loss": loss / len(gold), **classification_metrics(pred, gold, self.num_labels)}


def finetune_classify(
    model: nn.Module,
    cfg: Config,
    tokenizer: Any,
    train_rows: Sequence[dict[str, Any]],
    eval_rows: Sequence[dict[str, Any]],
    opts: FinetuneOptions,
    *,
    out_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> tuple[SequenceClassifier, dict[str, Any]]:
    """Fine-tunes a BERT (all parameters) with a new classification head; returns it and the metrics.
    Collective under a launcher: every rank calls it with the same arguments."""
    if cfg.model.family != "bert":
        raise ValueError(
            f"--task classify needs a BERT checkpoint; this one is model.family={cfg.model.family!r}"
        )
    problems = opts.problems()
    if problems:
        raise ValueError("fine-tuning options: " + "; ".join(problems))
    # Labels in sorted order of their text: the index of a label does not depend on the order of the file.
    labels = sorted({str(r["label"]) for r in train_rows})
    unknown = sorted({str(r["label"]) for r in eval_rows} - set(labels))
    if unknown:
        raise ValueError(f"evaluation labels {unknown} never occur in the training file (labels: {labels})")
    max_len = min(opts.max_len, int(cfg.model.max_seq_len))
    torch.manual_seed(opts.seed)
    clf = SequenceClassifier(model, len(labels), dropout=opts.dropout)
    task = _Classify(clf, tokenizer, train_rows, eval_rows, labels, max_len)
    out = Path(out_dir) if out_dir is not None else None
    fingerprint = _fingerprint("classify", opts, train_rows, eval_rows)
    history, facts = _run(task, cfg, opts, out_dir=out, fingerprint=fingerprint, log=log)
    return clf, _finish(task, cfg, opts, history, facts, out, {"labels": labels})


# ----------------------------------------------------------------------------- T5 text-to-text


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (Lin 2004) over whitespace-separated words: longest common subsequence based."""
    p, r = prediction.split(), reference.split()
    if not p or not r:
        return float(p == r)
    # One row of the LCS dynamic programme at a time: O(len(p) * len(r)) time, O(len(r)) memory.
    prev = [0] * (len(r) + 1)
    for a in p:
        cur = [0]
        for j, b in enumerate(r):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


@torch.no_grad()
def greedy_decode_t5(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_len: int,
    eos_id: int,
    pad_id: int,
    start_id: int | None = None,
) -> list[list[int]]:
    """Batched greedy decoding from the start token of pretraining (`start_id`; T5's is the pad id, the
    default; BART's is <eos>), each row up to and excluding its
    first <eos>. The encoder runs once; the decoder re-reads its prefix every step (T5 has no cached decode
    path here; targets are short)."""
    encoded = model.encode(input_ids, attention_mask)  # type: ignore[operator]  # (B, S, C)
    start = pad_id if start_id is None else start_id
    out = torch.full((input_ids.shape[0], 1), start, dtype=torch.long, device=input_ids.device)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_len):
        logits = model.decode(out, encoded, attention_mask=attention_mask)  # type: ignore[operator]
        # padding rows of the vocabulary (model.make_vocab_size_divisible_by) are never emitted
        token = mask_padding_rows(logits[:, -1], real_vocab_size(model)).argmax(-1)  # (B,)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        out = torch.cat([out, token[:, None]], dim=1)
        done |= token == eos_id
        if bool(done.all()):
            break
    rows = []
    for row in out[:, 1:].tolist():
        rows.append(row[: row.index(eos_id)] if eos_id in row else row)
    return rows


@torch.no_grad()
def beam_decode_t5(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    num_beams: int,
    max_len: int,
    eos_id: int,
    pad_id: int,
    start_id: int | None = None,
) -> list[list[int]]:
    """Beam search (`pretrain.generate.beam_search`) per row from the pad start token, each result up to and
    excluding its <eos>. The encoder runs once per row; every beam re-reads its decoder prefix each step."""
    rows = []
    for i in range(input_ids.shape[0]):
        keep = attention_mask[i].bool()
        ids = _beam_decode_row(
            model,
            input_ids[i : i + 1, keep],
            attention_mask[i : i + 1, keep],
            num_beams=num_beams,
            max_len=max_len,
            eos_id=eos_id,
            pad_id=pad_id if start_id is None else start_id,
        )
        rows.append(ids[: ids.index(eos_id)] if eos_id in ids else ids)
    return rows


def _beam_decode_row(
    model: nn.Module,
    src: torch.Tensor,
    src_mask: torch.Tensor,
    *,
    num_beams: int,
    max_len: int,
    eos_id: int,
    pad_id: int,
) -> list[int]:
    from pretrain.generate import beam_search

    encoded = model.encode(src, src_mask)  # type: ignore[operator]  # (1, S, C)
    prefix = torch.full((1, 1), pad_id, dtype=torch.long, device=src.device)  # (K, t) decoder inputs

    def logprobs(rows: torch.Tensor) -> torch.Tensor:
        k = rows.shape[0]
        ctx, mask = encoded.expand(k, -1, -1), src_mask.expand(k, -1)
        logits = model.decode(rows, ctx, attention_mask=mask)[:, -1]  # type: ignore[operator]
        return torch.log_softmax(mask_padding_rows(logits.float(), real_vocab_size(model)), dim=-1)  # (K, V)

    def step(origin: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        nonlocal prefix
        prefix = torch.cat([prefix[origin], tokens[:, None]], dim=1)
        return logprobs(prefix)

    return beam_search(logprobs(prefix)[0], step, num_beams=num_beams, max_new_tokens=max_len, eos_id=eos_id)


class _Text2Text(_Task):
    name = "text2text"

    def __init__(
        self, model: nn.Module, cfg: Config, tokenizer: Any, train_rows, eval_rows, opts: FinetuneOptions
    ):
        self.network, self.tokenizer, self.opts = model, tokenizer, opts
        self.eos, self.pad = int(tokenizer.eos_id), int(tokenizer.pad_id)
        self.start = self.eos if cfg.model.family == "bart" else self.pad  # the decoder start of pretraining
        max_len = min(opts.max_len, int(cfg.model.max_seq_len))

        def encode(rows: Sequence[dict[str, Any]]) -> tuple[list[list[int]], list[list[int]]]:
            # Both sides end with </s>, as the span-corruption inputs and targets did in pretraining.
            src = [[*tokenizer.encode(r["input"])[: max_len - 1], self.eos] for r in rows]
            tgt = [[*tokenizer.encode(r["target"])[: opts.max_target_len - 1], self.eos] for r in rows]
            return src, tgt

        self.train_src, self.train_tgt = encode(train_rows)
        self.eval_src, self.eval_tgt = encode(eval_rows)
        self.references = [str(r["target"]).strip() for r in eval_rows]
        self.n_train, self.n_eval = len(train_rows), len(eval_rows)

    def _tensors(
        self, src: list[list[int]], tgt: list[list[int]], widths: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        return {
            "input_ids": _pad(src, self.pad, widths[0]),  # (B, S)
            "attention_mask": _pad([[1] * len(r) for r in src], 0, widths[0]),
            # Teacher forcing: the decoder reads the target shifted right behind the start token.
            "decoder_input_ids": _pad([[self.start, *t[:-1]] for t in tgt], self.pad, widths[1]),  # (B, U)
            "labels": _pad(tgt, IGNORE_INDEX, widths[1]),
        }

    def batch(self, rows: list[int], batch_rows: list[int], first: int) -> dict[str, torch.Tensor]:
        widths = (
            max(len(self.train_src[i]) for i in batch_rows),
            max(len(self.train_tgt[i]) for i in batch_rows),
        )
        return self._tensors([self.train_src[i] for i in rows], [self.train_tgt[i] for i in rows], widths)

    def targets(self, rows: list[int]) -> int:
        return sum(len(self.train_tgt[i]) for i in rows)

    def loss_sum(self, network: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = network(
            batch["input_ids"], batch["decoder_input_ids"], attention_mask=batch["attention_mask"]
        )  # (B, U, V)
        labels = batch["labels"]
        return F.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )

    def eval_batch(self, network: nn.Module, rows: list[int]) -> dict[str, Any]:
        src, tgt = [self.eval_src[i] for i in rows], [self.eval_tgt[i] for i in rows]
        b = self._tensors(src, tgt, (max(map(len, src)), max(map(len, tgt))))
        loss = self.loss_sum(network, b).item()
        x, mask, o = b["input_ids"], b["attention_mask"], self.opts
        if o.num_beams > 1:
            decoded = beam_decode_t5(
                network,
                x,
                mask,
                num_beams=o.num_beams,
                max_len=o.max_target_len,
                eos_id=self.eos,
                pad_id=self.pad,
                start_id=self.start,
            )
        else:
            decoded = greedy_decode_t5(
                network,
                x,
                mask,
                max_len=o.max_target_len,
                eos_id=self.eos,
                pad_id=self.pad,
                start_id=self.start,
            )
        texts = [self.tokenizer.decode(ids).strip() for ids in decoded]
        refs = [self.references[i] for i in rows]
        return {
            "loss": loss,
            "count": int((b["labels"] != IGNORE_INDEX).sum()),
            "exact": [t == r for t, r in zip(texts, refs)],
            "rouge": [rouge_l(t, r) for t, r in zip(texts, refs)],
        }

    def metrics(self, parts: list[dict[str, Any]]) -> dict[str, float]:
        total, count, exact, rouge = 0.0, 0, 0, 0.0
        for part in parts:
            total, count = total + part["loss"], count + part["count"]
            exact += sum(part["exact"])
            for r in part["rouge"]:
                rouge += r
        return {
            "eval_loss": total / count,
            "exact_match": exact / self.n_eval,
            "rouge_l": rouge / self.n_eval,
        }


def finetune_text2text(
    model: nn.Module,
    cfg: Config,
    tokenizer: Any,
    train_rows: Sequence[dict[str, Any]],
    eval_rows: Sequence[dict[str, Any]],
    opts: FinetuneOptions,
    *,
    out_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tunes a T5 (all parameters, no new layers) on input -> target pairs; returns it and the metrics.
    Collective under a launcher: every rank calls it with the same arguments."""
    if cfg.model.family not in TASKS["text2text"]:
        raise ValueError(
            f"--task text2text needs a T5 or BART checkpoint; this one is model.family={cfg.model.family!r}"
        )
    problems = opts.problems()
    if problems:
        raise ValueError("fine-tuning options: " + "; ".join(problems))
    torch.manual_seed(opts.seed)
    task = _Text2Text(model, cfg, tokenizer, train_rows, eval_rows, opts)
    out = Path(out_dir) if out_dir is not None else None
    fingerprint = _fingerprint("text2text", opts, train_rows, eval_rows)
    history, facts = _run(task, cfg, opts, out_dir=out, fingerprint=fingerprint, log=log)
    return model, _finish(task, cfg, opts, history, facts, out, {})


# task -> the model families it fine-tunes
TASKS: dict[str, tuple[str, ...]] = {"classify": ("bert",), "text2text": ("t5", "bart")}
