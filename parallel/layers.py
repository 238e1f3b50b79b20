"""The layer factory: models ask it for linear and embedding layers and never know how they are split.

It always returns plain PyTorch layers. Tensor parallelism is applied afterwards, by name, to the built
and initialized model: `parallel.tensor_plan.apply_tensor_parallel` swaps these layers for the
Megatron-style ones in `parallel.tensor` (ColumnParallelLinear, RowParallelLinear,
VocabParallelEmbedding), copying slices of the full weights so the sharded model is exactly the
one-process model. Building shards directly here (to save the full model's memory on every rank) would
also need the models' `init_weights` to initialize the TP layers; that is not done yet, so tp > 1 here
is refused with a pointer to the plan.
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
                f"{what} with tp={self.tp}: build the model with LayerFactory(tp=1) and convert it with "
                "parallel.tensor_plan.apply_tensor_parallel (the layers are swapped after initialization)"
            )

    def column_linear(self, in_features: int, out_features: int, *, bias: bool) -> nn.Module:
        """A linear whose output dim the TP plan splits across tp ranks (QKV, MLP up-projection, LM head)."""
        self._plain_only("column-parallel linear")
        return nn.Linear(in_features, out_features, bias=bias)

    def row_linear(self, in_features: int, out_features: int, *, bias: bool) -> nn.Module:
        """A linear whose input dim the TP plan splits across tp ranks (attention out, MLP down-projection)."""
        self._plain_only("row-parallel linear")
        return nn.Linear(in_features, out_features, bias=bias)

    def vocab_embedding(self, vocab_size: int, dim: int) -> nn.Embedding:
        """Token embedding; the TP plan splits its vocab dim across tp ranks."""
        self._plain_only("vocab-parallel embedding")
        return nn.Embedding(vocab_size, dim)

    def embedding(self, num: int, dim: int) -> nn.Embedding:
        """A replicated embedding (positions, token types)."""
        return nn.Embedding(num, dim)
