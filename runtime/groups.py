"""Process groups and device meshes a plan needs, each created once per process and cached.

World layout: ``rank = stage * devices_per_stage + local`` (``galvatron_fx.parallel_dims``).
The world mesh of a plan has dims ``("pp", "dp", "tp")``: stage, data-parallel index, tensor-parallel
index. A layer's data-parallel mesh is its 1-D ``"dp"`` slice; a layer with ``tp > 1`` (next issue) gets
the ``("dp", "tp")`` slice of a mesh built for its tp degree, from the same cache. Creating a group is a
collective over the world, so every rank must ask for the same groups in the same order: the runtime
asks for them while building a trainer, before any other communication.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from galvatron_fx.parallel_dims import ParallelDims
from galvatron_fx.plan import LayerStrategy, Plan

_CACHE: dict[tuple, Any] = {}
CREATED: list[tuple] = []  # keys in creation order; a key never appears twice (tests assert this)


def device_type() -> str:
    """``"cuda"`` when the default process group runs NCCL on GPUs, else ``"cpu"``."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return "cuda"
    return "cpu"


def default_backend() -> str:
    """NCCL where CUDA devices are present, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def current_device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` under NCCL, the CPU otherwise."""
    if device_type() == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _cached(key: tuple, create):
    if key not in _CACHE:
        _CACHE[key] = create()
        CREATED.append(key)
    return _CACHE[key]


def clear_cache() -> None:
    """Forget cached groups (after ``destroy_process_group``)."""
    _CACHE.clear()
    CREATED.clear()


def world_mesh(plan: Plan, tp: int = 1, tp_consecutive: bool = True) -> DeviceMesh:
    """The ``("pp", "dp", "tp")`` mesh over the whole world for one tp degree and tp rank order."""
    dims = ParallelDims.of(plan)
    key = ("mesh", dims.world_size, dims.pp, tp, tp_consecutive)

    def create() -> DeviceMesh:
        return DeviceMesh(device_type(), dims.mesh_ranks(tp, tp_consecutive), mesh_dim_names=("pp", "dp", "tp"))

    return _cached(key, create)


def grid_mesh(plan: Plan, strategy: LayerStrategy) -> DeviceMesh:
    """The ``("pp", "dp", "outer", "middle", "inner")`` mesh of a grid ``tp_mode``: its last three dims are the
    groups that ``ParallelDims.grid_groups`` names (a row's ranks vary along "inner")."""
    dims = ParallelDims.of(plan)
    q = strategy.grid_shape[0]
    key = ("grid", dims.world_size, dims.pp, strategy.tp, q)

    def create() -> DeviceMesh:
        ranks = torch.arange(dims.world_size).view(dims.pp, -1, strategy.tp // (q * q), q, q)
        return DeviceMesh(device_type(), ranks, mesh_dim_names=("pp", "dp", "outer", "middle", "inner"))

    return _cached(key, create)


def layer_mesh(plan: Plan, strategy: LayerStrategy) -> DeviceMesh:
    """The data-parallel mesh of a layer with ``strategy`` on this rank's stage (1-D, dim ``"dp"``)."""
    return world_mesh(plan, strategy.tp, strategy.tp_consecutive)["dp"]


def tied_group(plan: Plan, stages: tuple[int, ...], local: int) -> dist.ProcessGroup:
    """The group of ranks with index ``local`` on each of ``stages``: where gradients of a weight used on
    several stages (tied embedding and head) are summed, like Megatron's embedding group."""
    dims = ParallelDims.of(plan)
    key = ("tied", dims.world_size, dims.devices_per_stage, stages)

    def create() -> list[dist.ProcessGroup]:
        # new_group is collective over the world: create the group of every local index on every rank
        return [dist.new_group(dims.peers_across_stages(stages, i)) for i in range(dims.devices_per_stage)]

    return _cached(key, create)[local]


def world_group_ranks(mesh: DeviceMesh) -> list[int]:
    """Global ranks of a 1-D mesh slice, in order."""
    return [int(r) for r in mesh.mesh.flatten().tolist()]


def broadcast_text(text: str, src: int = 0) -> str:
    """``text`` from rank ``src`` on every rank (a plan, an error), as bytes in a tensor: never pickled."""
    device = current_device()
    size = torch.tensor([len(text.encode())], dtype=torch.long, device=device)
    dist.broadcast(size, src)
    data = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
    if dist.get_rank() == src:
        data.copy_(torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8))
    dist.broadcast(data, src)
    return bytes(data.cpu().tolist()).decode()


def gather_text(text: str) -> list[str]:
    """Every rank's ``text``, in rank order, on every rank (an all-gather of bytes: nothing is pickled)."""
    device = current_device()
    data = (
        torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8).to(device)
        if text
        else torch.zeros(0, dtype=torch.uint8, device=device)
    )
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.long, device=device))
    longest = max(int(size.item()) for size in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    pieces = [torch.zeros(longest, dtype=torch.uint8, device=device) for _ in sizes]
    dist.all_gather(pieces, padded)
    return [bytes(piece[: int(size.item())].cpu().tolist()).decode() for piece, size in zip(pieces, sizes)]
