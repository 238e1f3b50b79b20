"""T5's relative position bias (Raffel et al. 2020) as a small table plus bucketing rules, so the Triton
attention kernel can fuse it and the SDPA path can expand it into a dense bias."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class T5Bias:
    """T5's relative position bias, to be fused into the kernel.

    table: (num_buckets, H) — the weight of T5's `relative_attention_bias` embedding.
    Buckets follow T5 (`_relative_position_bucket` in Hugging Face): half the buckets per direction when
    bidirectional; the first half of those exact distances, the rest log-spaced up to max_distance."""

    table: torch.Tensor
    bidirectional: bool = True
    num_buckets: int = 32
    max_distance: int = 128

    def __post_init__(self) -> None:
        max_exact = (self.num_buckets // 2 if self.bidirectional else self.num_buckets) // 2
        if self.num_buckets < 4 or self.max_distance <= max_exact:
            raise ValueError(
                f"T5Bias: num_buckets={self.num_buckets} must be >= 4 and max_distance={self.max_distance} "
                f"> {max_exact} (the exact-distance buckets), or T5's log-spaced buckets divide by log(1)"
            )
        if self.table.dim() != 2 or self.table.shape[0] != self.num_buckets:
            raise ValueError(
                f"T5Bias.table shape {tuple(self.table.shape)}: need (num_buckets={self.num_buckets}, heads)"
            )


def t5_relative_bucket(
    relative_position: torch.Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucket of relative_position = k_pos - q_pos (long tensor in, long tensor out), float32 math
    as in the original Mesh TensorFlow / Hugging Face code so the buckets agree at the edges."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    large = (
        max_exact
        + (
            torch.log(distance.float() / max_exact)
            / math.log(max_distance / max_exact)
            * (num_buckets - max_exact)
        ).long()
    )
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


def t5_dense_bias(bias: T5Bias, q_len: int, k_len: int) -> torch.Tensor:
    """The unfused bias (1, H, Tq, Tk) gathered from the table (differentiable), bottom-right aligned
    positions like the kernel. Used by the SDPA path and as the benchmark's 'unfused' baseline."""
    device = bias.table.device
    q_pos = torch.arange(q_len, device=device) + (k_len - q_len)
    k_pos = torch.arange(k_len, device=device)
    bucket = t5_relative_bucket(
        k_pos[None, :] - q_pos[:, None],
        bidirectional=bias.bidirectional,
        num_buckets=bias.num_buckets,
        max_distance=bias.max_distance,
    )  # (Tq, Tk)
    return bias.table[bucket].permute(2, 0, 1).unsqueeze(0)  # (1, H, Tq, Tk)
