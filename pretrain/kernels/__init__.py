"""Attention and other hot-path kernels; models import `attention` from here."""

from pretrain.kernels.attention import attention

__all__ = ["attention"]
