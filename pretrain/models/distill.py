"""DistilBERT (Sanh et al. 2019): a BERT student with half its teacher's layers, trained to match a frozen
teacher.

The student is Tandem's `BERT` without token types and without a pooler (DistilBERT has neither). When
`model.teacher_checkpoint` names a Tandem BERT checkpoint, the teacher is loaded from it, and the student
starts from the teacher's embeddings, every other encoder layer (0, 2, 4, ...) and its MLM head (§3,
"Student initialization"). A resumed run then overwrites those weights with its own checkpoint.

The teacher runs alongside in eval mode without gradients. It is deliberately not a submodule: its
weights stay out of the student's `state_dict` (checkpoints, export), out of `parameters()` (the
optimizer, DeepSpeed's gradient all-reduce and ZeRO partitioning) and out of `train()`. `_apply` moves
it together with the student, so `.to(device)`, `.half()` and `.bfloat16()` keep the two on one
device and dtype. Since it lives inside the wrapped model, every data-parallel rank's teacher sees
that rank's own micro batch.

Loss (§3, the paper's weights as config fields): alpha_ce * T^2 * KL(teacher_T || student_T) + alpha_mlm *
MLM + alpha_cos * (1 - cos(h_student, h_teacher)). The soft-target and cosine terms average over every
non-padding position, as the released distillation code does; the MLM term covers the masked positions.
Scaling the KL by T^2 keeps its gradients the same size at any temperature (Hinton et al. 2015).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from parallel.layers import LayerFactory
from pretrain.config import ModelConfig
from pretrain.losses import IGNORE_INDEX, token_cross_entropy
from pretrain.models.bert import BERT

# The teacher's shape must equal the student's in everything but depth and token types.
_SAME_SHAPE = (
    "vocab_size",
    "hidden_size",
    "num_heads",
    "kv_heads",
    "head_dim",
    "ffn_size",
    "max_seq_len",
    "norm",
    "norm_position",
    "norm_eps",
    "activation",
    "position",
    "bias",
    "tie_embeddings",
    "embedding_size",
)


def logits_and_hidden(model: BERT, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """MLM logits (B, T, V) and last hidden states (B, T, C) from one forward of a Tandem BERT."""
    hidden = model.encode(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))
    return model.mlm_logits(hidden), hidden


def soft_target_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over rows. logits: (N, V)."""
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="sum") / max(student_logits.shape[0], 1)
    return kl * temperature**2


class DistilBERT(BERT):
    """BERT without token types or pooler, plus a frozen teacher held outside the module tree."""

    teacher: BERT | None

    def __init__(self, cfg: ModelConfig, layers: LayerFactory | None = None, teacher: BERT | None = None):
        super().__init__(cfg, layers)
        # DistilBERT has no pooler: its sentence representation is the <cls> hidden state itself.
        self.pooler = None  # type: ignore[assignment]
        # Assigned through __dict__ so nn.Module does not register it as a submodule (see module docstring).
        self.__dict__["teacher"] = teacher
        if teacher is not None:
            teacher.eval().requires_grad_(False)

    def pooled(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[:, 0]

    def _apply(self, fn: Any, recurse: bool = True) -> DistilBERT:
        if self.teacher is not None:
            self.teacher._apply(fn, recurse)
        super()._apply(fn, recurse)
        return self

    @torch.no_grad()
    def init_from_teacher(self) -> None:
        """Student <- teacher's embeddings, layers 0, 2, 4, ... and MLM head (Sanh et al. 2019, §3)."""
        assert self.teacher is not None
        source = self.teacher.state_dict()
        if self.type_embed is None and self.teacher.type_embed is not None:
            # Every teacher input added token-type row 0 to each position; folding it into the position
            # table keeps the student's embedding output equal to the teacher's for type-0 text.
            source["pos_embed.weight"] = source["pos_embed.weight"] + source["type_embed.weight"][0]
        state = {}
        for key in self.state_dict():
            parts = key.split(".")
            if parts[0] == "blocks":
                parts[1] = str(2 * int(parts[1]))
            state[key] = source[".".join(parts)]
        self.load_state_dict(state, strict=True)

    def pretraining_loss(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.config
        labels = batch["labels"]  # (B, T), IGNORE_INDEX where not masked
        logits, hidden = logits_and_hidden(self, batch)  # (B, T, V), (B, T, C)
        mlm = token_cross_entropy(logits, labels)
        if self.teacher is None:
            if self.training:
                raise ValueError(
                    "model.teacher_checkpoint='': objective distill trains against a teacher; set it to the "
                    "teacher's checkpoint or run directory"
                )
            # A loaded checkpoint (evaluation) has no teacher: the masked-LM loss alone.
            return mlm, {"mlm_loss": mlm.detach()}
        with torch.no_grad():
            self.teacher.eval()
            t_logits, t_hidden = logits_and_hidden(self.teacher, batch)
        mask = batch.get("attention_mask")
        real = mask.bool() if mask is not None else torch.ones_like(labels, dtype=torch.bool)  # (B, T)
        soft = soft_target_kl(logits[real], t_logits[real], cfg.distill_temperature)
        cos = 1.0 - F.cosine_similarity(hidden[real].float(), t_hidden[real].float(), dim=-1).mean()
        loss = cfg.distill_alpha_ce * soft + cfg.distill_alpha_mlm * mlm + cfg.distill_alpha_cos * cos
        with torch.no_grad():
            masked = labels != IGNORE_INDEX
            teacher_mlm = token_cross_entropy(t_logits, labels)
            agree = (logits[masked].argmax(-1) == t_logits[masked].argmax(-1)).float().mean()
        metrics = {
            "soft_target_loss": soft.detach(),
            "mlm_loss": mlm.detach(),
            "cosine_loss": cos.detach(),
            "teacher_mlm_loss": teacher_mlm,
            "teacher_agreement": agree,
        }
        return loss, metrics


def _check_teacher(student: ModelConfig, teacher: ModelConfig, path: str) -> None:
    where = f"model.teacher_checkpoint={path!r}"
    if teacher.family != "bert":
        raise ValueError(f"{where}: the teacher is a {teacher.family!r} model; DistilBERT distils a BERT")
    bad = [
        f"model.{name}={getattr(teacher, name, None)!r} (the student has {getattr(student, name, None)!r})"
        for name in _SAME_SHAPE
        if getattr(teacher, name, None) != getattr(student, name, None)
    ]
    if bad:
        raise ValueError(f"{where}: the teacher's shape differs from the student's: " + ", ".join(bad))
    if teacher.num_layers < 2 * student.num_layers - 1:
        raise ValueError(
            f"{where}: the teacher has model.num_layers={teacher.num_layers}; a student of "
            f"model.num_layers={student.num_layers} takes every other layer and needs at least "
            f"{2 * student.num_layers - 1}"
        )
    if student.type_vocab_size and teacher.type_vocab_size != student.type_vocab_size:
        raise ValueError(
            f"{where}: the teacher has model.type_vocab_size={teacher.type_vocab_size}, the student "
            f"{student.type_vocab_size} (DistilBERT uses 0)"
        )


def teacher_checkpoint_dir(path: str) -> Path:
    """`model.teacher_checkpoint` -> a checkpoint directory: itself, or a run directory's newest complete
    checkpoint (so `model.teacher_checkpoint=RUN_DIR` follows the teacher run)."""
    from pretrain.checkpoint import MANIFEST, Checkpointer

    p = Path(path)
    if (p / MANIFEST).is_file():  # a checkpoint (a run directory has a config.yaml too, but no manifest)
        return p
    latest = Checkpointer(p, None, rank=0, world_size=1).latest() if p.is_dir() else None
    if latest is None:
        raise FileNotFoundError(
            f"model.teacher_checkpoint={path!r}: neither a Tandem checkpoint directory nor a run directory "
            "with a complete checkpoint"
        )
    return latest


def build_distilbert(cfg: ModelConfig, layers: LayerFactory | None = None) -> DistilBERT:
    """`OBJECTIVE_MODELS["distill"]`: the student, with its teacher when `model.teacher_checkpoint` is set."""
    if not cfg.teacher_checkpoint:
        return DistilBERT(cfg, layers)
    from pretrain.export import load_model

    path = cfg.teacher_checkpoint
    teacher, teacher_cfg = load_model(teacher_checkpoint_dir(path))
    if not isinstance(teacher, BERT):
        raise ValueError(f"model.teacher_checkpoint={path!r}: holds a {type(teacher).__name__}, not a BERT")
    _check_teacher(cfg, teacher_cfg.model, path)
    student = DistilBERT(cfg, layers, teacher)
    student.init_from_teacher()
    return student
