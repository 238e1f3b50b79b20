"""Model FLOPs per token and peak device throughput, for TFLOP/s and MFU.

Convention (PaLM, Chowdhery et al. 2022, appendix B): training costs 6*N FLOPs per token for the N
non-embedding parameters (the LM-head matmul included, since it is a real matmul even when tied) plus
12 * n_layers * n_heads * head_dim * seq_len for attention scores and values. The attention term is not
halved for causal masking, as in PaLM and Megatron-LM, so MFU figures compare with theirs.
Recomputation (activation checkpointing) is not counted: that would be HFU, not MFU.
"""

from __future__ import annotations

from torch import nn

from pretrain.config import ModelConfig

# Dense peak TFLOP/s per device by precision (vendor datasheets; bf16/fp16 without sparsity).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5},  # same chip as H100 SXM; fp32 = TF32 dense
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "A10G": {"bf16": 125.0, "fp16": 125.0, "fp32": 62.5},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 181.0},
    "V100": {"bf16": 0.0, "fp16": 125.0, "fp32": 15.7},
    "MI300X": {"bf16": 1307.0, "fp16": 1307.0, "fp32": 653.7},
}


def non_embedding_params(model: nn.Module, cfg: ModelConfig) -> int:
    """Parameters that take part in per-token matmuls: every block, the final norm and the LM head."""
    n = sum(
        p.numel() for name, p in model.named_parameters() if "embed" not in name and "lm_head" not in name
    )
    return n + cfg.hidden_size * cfg.vocab_size


def flops_per_token(model: nn.Module, cfg: ModelConfig, seq_len: int) -> float:
    attn = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
    return 6.0 * non_embedding_params(model, cfg) + attn


def flops_per_sample(
    model: nn.Module, cfg: ModelConfig, seq_len: int, target_len: int | None = None
) -> float:
    """Training FLOPs of one sample. GPT/BERT: seq_len tokens through every block and the LM head.
    T5: seq_len encoder tokens through the encoder; target_len decoder tokens through the decoder (self and
    cross attention) and the LM head; attention terms per PaLM's 12·L·H·d·(keys attended) per query token."""
    if cfg.family not in ("t5", "bart"):
        return seq_len * flops_per_token(model, cfg, seq_len)
    t = target_len or seq_len
    enc = sum(p.numel() for n, p in model.named_parameters() if n.startswith("encoder_"))
    dec = sum(p.numel() for n, p in model.named_parameters() if n.startswith("decoder_"))
    dense = 6.0 * (enc * seq_len + (dec + cfg.hidden_size * cfg.vocab_size) * t)
    hd = cfg.num_heads * cfg.head_dim
    attn = 12 * hd * (cfg.num_layers * seq_len * seq_len + cfg.decoder_layers * t * (t + seq_len))
    return dense + attn


def device_peak_tflops(precision: str) -> float | None:
    """Peak of the local device from the table, or None (CPUs and unknown GPUs: pass train.peak_tflops)."""
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name().upper()
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks.get(precision) or None
    return None
