"""The one object that owns every process group: tp, pp, dp (and later the embedding-tie group).

Built from DeepSpeed's `PipeModelDataParallelTopology` so that the engine and Tandem's own layers agree
on which rank sits where. Rank order is Megatron's: tp fastest, then dp, then pp. Nothing else in
Tandem creates process groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of each named axis; validates that they multiply to the world size."""

    tp: int
    pp: int
    dp: int

    @classmethod
    def from_world(cls, world_size: int, *, tp: int = 1, pp: int = 1) -> ParallelDims:
        problems = [f"{name}={v}: must be >= 1" for name, v in (("tp", tp), ("pp", pp)) if v < 1]
        if not problems and world_size % (tp * pp):
            problems.append(
                f"world size {world_size} is not divisible by tp={tp} x pp={pp} = {tp * pp}; "
                "the data-parallel degree dp = world / (tp x pp) must be a whole number"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return cls(tp=tp, pp=pp, dp=world_size // (tp * pp))

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp


@dataclass
class Topology:
    """Coordinates of this rank on every axis, and the process group of each axis."""

    dims: ParallelDims
    rank: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    groups: dict[str, object] = field(default_factory=dict)
    ds_topology: object | None = None

    @property
    def tp_group(self):
        return self.groups.get("tp")

    @property
    def dp_group(self):
        return self.groups.get("dp")

    @property
    def pp_group(self):
        return self.groups.get("pp")

    def as_mpu(self) -> _ModelParallelUnit:
        """The `mpu=` object DeepSpeed asks for (Megatron's accessor names): it then all-reduces gradients
        over the dp group only, sums gradient norms across tp ranks, and names files mp_rank_XX by tp rank."""
        return _ModelParallelUnit(self)

    @classmethod
    def build(cls, *, tp: int = 1, pp: int = 1) -> Topology:
        """Creates the process groups of the current (initialized) world, or a 1-rank topology."""
        if not dist.is_initialized():
            return cls(dims=ParallelDims(1, 1, 1), rank=0, tp_rank=0, pp_rank=0, dp_rank=0)
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        world, rank = dist.get_world_size(), dist.get_rank()
        dims = ParallelDims.from_world(world, tp=tp, pp=pp)
        # Axis order (pipe, data, model): the last axis varies fastest, so tp is fastest, pp slowest.
        topo = PipeModelDataParallelTopology(num_pp=dims.pp, num_mp=dims.tp, num_dp=dims.dp)
        coord = topo.get_coord(rank)
        groups: dict[str, object] = {}
        for axis, ds_axis in (("tp", "model"), ("dp", "data"), ("pp", "pipe")):
            # new_group is collective: every rank creates every group of the axis, in the same order.
            for ranks in topo.get_axis_comm_lists(ds_axis):
                group = dist.new_group(ranks=ranks)
                if rank in ranks:
                    groups[axis] = group
            if axis not in groups:  # degree 1 on this axis: a group of this rank alone
                groups[axis] = dist.new_group(ranks=[rank]) if world > 1 else dist.group.WORLD
        return cls(
            dims=dims,
            rank=rank,
            tp_rank=coord.model,
            pp_rank=coord.pipe,
            dp_rank=coord.data,
            groups=groups,
            ds_topology=topo,
        )


class _ModelParallelUnit:
    def __init__(self, topo: Topology):
        self.topo = topo

    def get_data_parallel_group(self):
        return self.topo.dp_group

    def get_data_parallel_rank(self) -> int:
        return self.topo.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.topo.dims.dp

    def get_model_parallel_group(self):
        return self.topo.tp_group

    def get_model_parallel_rank(self) -> int:
        return self.topo.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.topo.dims.tp

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.topo.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.topo.dims.pp
