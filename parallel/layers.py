"""The layer factory: models ask it for linear and embedding layers and never know how they are split.

At tp=1 every factory returns the plain PyTorch layer. Tensor parallelism (Megatron-style column- and
row-parallel linears, vocab-parallel embedding) plugs in here without touching any model file.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class LayerFactory:
    tp: int = 1

    def _plain_only(self, what: str) -> None:
        if self.tp != 1:
            raise NotImplementedError(
                f"{what} with tp={self.tp}: tensor-parallel layers are not available yet"
            )

    def column_linear(self, in_features: int, out_features: int, *, bias: bool) -> nn.Module:
        """A linear whose output dim would be split across tp ranks (QKV, MLP up-projection)."""
        self._plain_only("column-parallel linear")
        return nn.Linear(in_features, out_features, bias=bias)

    def row_linear(self, in_features: int, out_features: int, *, bias: bool) -> nn.Module:
        """A linear whose input dim would be split across tp ranks (attention out, MLP down-projection)."""
        self._plain_only("row-parallel linear")
        return nn.Linear(in_features, out_features, bias=bias)

    def vocab_embedding(self, vocab_size: int, dim: int) -> nn.Embedding:
        """Token embedding; its vocab dim would be split across tp ranks."""
        self._plain_only("vocab-parallel embedding")
        return nn.Embedding(vocab_size, dim)

    def embedding(self, num: int, dim: int) -> nn.Embedding:
        """A replicated embedding (positions, token types)."""
        return nn.Embedding(num, dim)
