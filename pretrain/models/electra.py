"""ELECTRA (Clark et al. 2020): a small masked-LM generator and a discriminator that detects replaced tokens.

Both networks are Tandem `BERT`s. The generator has `generator_hidden_fraction` of the discriminator's
width (the paper's Table 6: 1/4 for Small, 1/3 for Base), one attention head per 64 dimensions (at least
one) and a 4x FFN, as the released code sizes it. The two share the embedding layer (§3.2, "weight
sharing": token, position and token-type tables and their norm); a network whose hidden size differs from
the embedding width E projects the embeddings up (`embed_proj`) and its MLM head back down to E, so the
generator's output projection is the shared token table.

Training step (§2): the generator's MLM logits at the masked positions are sampled from (softmax,
temperature 1, no gradient through the sample); the sampled tokens replace the masked ones; the
discriminator labels every non-padding position 1 where the token differs from the original (a sample
that equals the original counts as original) and is trained with binary cross-entropy through a dense +
GELU + dense -> 1 head. Loss = generator MLM + discriminator_weight * discriminator (lambda = 50).

Sampling draws from a `torch.Generator` reseeded per sample from the batch's `sample_seed` (written by
the `electra` objective from (seed, global sample index)), so replacements do not depend on the rank,
the data-parallel layout or a resume, like the masks themselves.

Only the discriminator is kept for downstream use: its MLM head and pooler are removed (ELECTRA's
discriminator has neither) and it exports to `transformers.ElectraForPreTraining`.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from parallel.layers import LayerFactory
from pretrain.config import ModelConfig
from pretrain.losses import IGNORE_INDEX, token_cross_entropy
from pretrain.models.bert import BERT
from pretrain.models.blocks import init_weights

# The embedding modules the generator takes from the discriminator.
SHARED_EMBEDDINGS = ("embed", "pos_embed", "type_embed", "embed_norm")


def generator_config(cfg: ModelConfig) -> ModelConfig:
    """The generator's shape: a fraction of the discriminator's width, same depth and embedding width."""
    hidden = max(1, round(cfg.hidden_size * cfg.generator_hidden_fraction))
    return dataclasses.replace(
        cfg,
        hidden_size=hidden,
        num_heads=max(1, hidden // cfg.head_dim),
        num_kv_heads=0,
        attention_head_dim=0,
        ffn_hidden_size=4 * hidden,
        embedding_size=cfg.embed_size,  # the shared tables keep the discriminator's width E
    )


def sample_replacements(logits: torch.Tensor, rows: torch.Tensor, seeds: torch.Tensor | None) -> torch.Tensor:
    """One token per row of `logits` (N, V), drawn from softmax(logits). `rows` (N,) says which sample each
    row belongs to; every sample's draws come from a generator seeded with `seeds[sample]` (N,) -> (N,)."""
    probs = torch.softmax(logits.float(), dim=-1)  # (N, V)
    if seeds is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    gen = torch.Generator(device=probs.device)
    seed_of = seeds.tolist()  # one transfer, not one per sample
    for sample in torch.unique(rows).tolist():
        pick = rows == sample
        gen.manual_seed(int(seed_of[sample]))
        out[pick] = torch.multinomial(probs[pick], 1, generator=gen).squeeze(-1)
    return out


class Electra(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: LayerFactory | None = None):
        super().__init__()
        self.config = cfg
        self.discriminator = BERT(cfg, layers)
        self.generator = BERT(generator_config(cfg), layers)
        for name in SHARED_EMBEDDINGS:
            setattr(self.generator, name, getattr(self.discriminator, name))
        # The discriminator never predicts tokens and has no pooler; the generator has no pooler.
        for name in ("mlm_dense", "mlm_norm", "mlm_bias", "lm_head", "pooler"):
            setattr(self.discriminator, name, None)
        self.generator.pooler = None  # type: ignore[assignment]
        h = cfg.hidden_size
        self.rtd_dense = nn.Linear(h, h)  # replaced-token detection head: dense + GELU + dense -> 1
        self.rtd_out = nn.Linear(h, 1)
        init_weights(self.rtd_dense, cfg)
        init_weights(self.rtd_out, cfg)

    def published_modules(self) -> list[nn.Module]:
        """What the paper's parameter counts cover: the discriminator and its head, not the generator."""
        return [self.discriminator, self.rtd_dense, self.rtd_out]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """-> the discriminator's replaced-token logits (B, T) (> 0: replaced)."""
        h = self.discriminator.encode(input_ids, attention_mask, token_type_ids)  # (B, T, C)
        return self.rtd_out(F.gelu(self.rtd_dense(h))).squeeze(-1)

    def pretraining_loss(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ids, labels = batch["input_ids"], batch["labels"]  # (B, T) each
        mask, types = batch.get("attention_mask"), batch.get("token_type_ids")
        gen_logits = self.generator(ids, attention_mask=mask, token_type_ids=types)  # (B, T, V)
        gen_loss = token_cross_entropy(gen_logits, labels)
        masked = labels != IGNORE_INDEX  # (B, T)
        original = torch.where(masked, labels, ids)
        with torch.no_grad():
            rows = torch.nonzero(masked)[:, 0]  # (N,) sample of each masked position, row-major order
            # Padding rows of the vocabulary (model.tokenizer_vocab_size) are never drawn as replacements.
            real = self.config.tokenizer_vocab_size or gen_logits.shape[-1]
            sampled = sample_replacements(
                gen_logits[masked][:, :real].detach(), rows, batch.get("sample_seed")
            )
            corrupted = original.clone()
            corrupted[masked] = sampled
            replaced = corrupted != original  # (B, T): the discriminator's labels
        disc_logits = self(corrupted, attention_mask=mask, token_type_ids=types)  # (B, T)
        real = mask.bool() if mask is not None else torch.ones_like(masked)
        target = replaced[real].float()
        disc_loss = F.binary_cross_entropy_with_logits(disc_logits[real].float(), target)
        loss = gen_loss + self.config.discriminator_weight * disc_loss
        with torch.no_grad():
            accuracy = ((disc_logits[real] > 0).float() == target).float().mean()
        metrics = {
            "generator_loss": gen_loss.detach(),
            "discriminator_loss": disc_loss.detach(),
            "replaced_fraction": target.mean(),
            "discriminator_accuracy": accuracy,
        }
        return loss, metrics


def build_electra(cfg: ModelConfig, layers: LayerFactory | None = None) -> Electra:
    """`OBJECTIVE_MODELS["electra"]`."""
    return Electra(cfg, layers)
