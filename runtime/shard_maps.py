"""Where a rank's piece of a tensor sits in the full tensor: ``ShardMap``.

Along each dim, a local tensor holds an increasing set of the full tensor's indices: tensor parallelism keeps
a set of heads along one dim, FSDP2 a range of dim 0 of that. ``local_shards(stage)`` gives every parameter
of a lowered stage with its map; materialisation (``runtime.materialize``) and checkpoints
(``runtime.checkpoint``) read and write through them, box by box.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from galvatron_fx.passes.lower.ops.collectives import all_gather_dim, select_local
from galvatron_fx.passes.lower.stage import unwrap
from galvatron_fx.program import layer_meta


@dataclass(frozen=True)
class Box:
    """A block held locally: ``sizes`` elements from ``full_offsets`` of the full tensor, found at
    ``local_offsets`` of the local tensor."""

    full_offsets: tuple[int, ...]
    local_offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    def of(self, local: torch.Tensor) -> torch.Tensor:
        """The view of ``local`` this box covers."""
        for dim, (start, size) in enumerate(zip(self.local_offsets, self.sizes)):
            local = local.narrow(dim, start, size)
        return local


@dataclass(frozen=True)
class ShardMap:
    """A local tensor is ``full[indices[0]][:, indices[1]]...``: per dim, the full indices it holds (increasing)."""

    full_shape: tuple[int, ...]
    indices: tuple[torch.Tensor, ...]

    @classmethod
    def whole(cls, shape) -> "ShardMap":
        return cls(tuple(shape), tuple(torch.arange(n) for n in shape))

    @property
    def local_shape(self) -> tuple[int, ...]:
        return tuple(len(i) for i in self.indices)

    @property
    def is_whole(self) -> bool:
        return self.local_shape == self.full_shape

    def restrict(self, dim: int, start: int, length: int) -> "ShardMap":
        """The map of ``local.narrow(dim, start, length)``."""
        indices = list(self.indices)
        indices[dim] = indices[dim][start : start + length]
        return ShardMap(self.full_shape, tuple(indices))

    def runs(self, dim: int) -> list[tuple[int, int, int]]:
        """Contiguous runs along ``dim``: ``(full_start, local_start, length)``."""
        idx = self.indices[dim].tolist()
        out: list[tuple[int, int, int]] = []
        for local, full in enumerate(idx):
            if out and out[-1][0] + out[-1][2] == full:
                out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
            else:
                out.append((full, local, 1))
        return out

    def boxes(self) -> Iterator[Box]:
        """The local tensor as blocks of the full one (the product of each dim's runs)."""
        for combo in itertools.product(*(self.runs(d) for d in range(len(self.full_shape)))):
            yield Box(tuple(r[0] for r in combo), tuple(r[1] for r in combo), tuple(r[2] for r in combo))

    def select(self, full: torch.Tensor) -> torch.Tensor:
        """This shard of ``full`` (any tensor of ``full_shape``)."""
        for dim, idx in enumerate(self.indices):
            if len(idx) != full.shape[dim]:
                full = full.index_select(dim, idx.to(full.device))
        return full

    def key(self) -> str:
        """Names the shard: replicas of a shard have the same key."""
        return ";".join(",".join(f"{a}+{n}" for a, _, n in self.runs(d)) for d in range(len(self.full_shape)))


@dataclass
class LocalShard:
    """A rank's piece of a parameter: ``tensor`` (a plain tensor, the parameter's own storage) and its map."""

    tensor: torch.Tensor
    map: ShardMap


def tp_records(stage) -> dict[str, Any]:
    records = {}
    for layer in stage.stage_layers:
        records.update(layer_meta(unwrap(stage.layers[layer.name])).shards)
    return records


def shard_map(param: torch.Tensor, record=None) -> ShardMap:
    """Where ``param`` (a stage parameter, maybe a DTensor, maybe tensor-parallel with ShardRecord
    ``record``) sits in the user's full parameter."""
    if record is not None:
        full = tuple(record.full_shape)
        indices = [torch.arange(n) for n in full]
        for dim, sizes, picks in record.entries:  # each cut keeps some indices of one dimension
            indices[dim] = indices[dim][select_local(torch.arange(len(indices[dim])), ((0, sizes, picks),))]
        smap = ShardMap(full, tuple(indices))
    else:
        smap = ShardMap.whole(param.shape)
    if isinstance(param, DTensor):  # FSDP2: a block of the (tensor-parallel local) tensor
        sizes, offsets = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        for dim, (size, offset) in enumerate(zip(sizes, offsets)):
            if size != param.shape[dim]:
                smap = smap.restrict(dim, offset, size)
    return smap


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's piece of ``tensor``: an FSDP2 DTensor's local shard (a view of it), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_shards(stage) -> dict[str, LocalShard]:
    """User parameter name → this rank's piece of it, for every parameter of ``stage``."""
    records = tp_records(stage)
    out = {}
    for name, param in stage.user_parameters().items():
        out[name] = LocalShard(local_tensor(param).detach(), shard_map(param, records.get(name)))
    return out


def local_buffers(stage) -> dict[str, LocalShard]:
    """User buffer name → this rank's copy of it (buffers are never sharded: the map is whole)."""
    out = {}
    for layer in stage.stage_layers:
        for name, buffer in unwrap(stage.layers[layer.name]).named_buffers():
            out.setdefault(name, LocalShard(buffer, ShardMap.whole(buffer.shape)))
    return out


# -- whole tensors from shards (collective) ------------------------------------------------------------------
def unshard(local: torch.Tensor, record) -> torch.Tensor:
    """The full tensor from every rank's shard: an all-gather over ``record.ranks`` (collective there)."""
    values = all_gather_dim(local.detach().reshape(-1).contiguous(), 0, record.ranks)
    positions = all_gather_dim(record.positions(), 0, record.ranks)
    full = local.new_zeros(math.prod(record.full_shape))
    keep = positions >= 0  # negative positions: padding (a vocabulary not divisible by vtp)
    full[positions[keep]] = values[keep]
    return full.view(record.full_shape)


def unshard_parameters(stage, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``params`` (user names → this rank's tensors) with every tensor-parallel shard of ``stage`` made whole.
    Collective over each tp group: every rank of the stage calls it."""
    out, done = dict(params), set()
    for layer in stage.stage_layers:
        for name, record in layer_meta(unwrap(stage.layers[layer.name])).shards.items():
            if name in out and name not in done:  # a tied shard appears in several layers
                out[name] = unshard(out[name], record)
                done.add(name)
    return out
