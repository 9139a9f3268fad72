"""Rank arithmetic of a plan, in one place: which stage a rank is on, which block of samples and which
tensor-parallel index it has under each layer's strategy, and the groups and meshes that follow.

World layout: ``rank = stage * devices_per_stage + local``: pipeline stages are contiguous blocks of ranks.
Inside a stage, a layer with ``tp × dp`` devices puts its tensor-parallel peers on consecutive local ranks
(``tp_consecutive``) or ``dp`` apart (strided), its data-parallel index varying the other way. The embedding
and head keep the trainer's data split (each rank its own samples) whatever their vtp, except under vsp, where
the ranks of a vtp group share their samples and split them along the sequence (``end_layout``).

A grid tensor-parallel layer (``tp_mode`` 2d, 2.5d or 3d; ``LayerStrategy.grid_shape``) numbers its ``tp`` ranks
``t = (outer * q + middle) * q + inner``: the ranks of a *row* (q consecutive ranks, ``inner`` varying) split
the features and hold the same samples; the other two indices split the samples, and the weights' blocks are
gathered over the *column* (``grid_groups``). Between layers its activations live like those of a 1D layer of
degree q whose ``dp`` is ``dp * tp / q`` (``activation_strategy``).
Lowering, the runtime's process groups and the cost model's redistribution geometry all ask this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .plan import EmbeddingStrategy, LayerStrategy, Plan

PROLOGUE_AND_EPILOGUE = ("prologue", "epilogue")


def dp_index(strategy: LayerStrategy, local):
    """Data-parallel index (which block of the micro-batch) of stage-local rank ``local`` (an int or an array)."""
    return local // strategy.tp if strategy.tp_consecutive else local % strategy.dp


def tp_index(strategy: LayerStrategy, local):
    """Tensor-parallel index of stage-local rank ``local`` (an int or an array)."""
    return local % strategy.tp if strategy.tp_consecutive else local // strategy.dp


def data_split(devices: int) -> LayerStrategy:
    """The layout of the embedding's and the head's activations: the micro-batch split over the stage."""
    return LayerStrategy(dp=devices)


def uses_vsp(embedding: EmbeddingStrategy) -> bool:
    """Whether the embedding and head run sequence-parallel over their vtp group (``vsp`` with ``vtp > 1``)."""
    return embedding.vsp and embedding.vtp > 1


def end_layout(embedding: EmbeddingStrategy, devices: int) -> LayerStrategy:
    """Where the embedding's and head's activations live: the data split; under vsp the samples of each vtp
    group (consecutive ranks) split along the sequence over the group, the layout of a Ulysses layer of degree
    vtp (so body layers of that layout take the embedding's output without a move)."""
    if uses_vsp(embedding):
        return LayerStrategy(tp=embedding.vtp, dp=devices // embedding.vtp, sp="ulysses")
    return data_split(devices)


def activation_strategy(strategy: LayerStrategy) -> LayerStrategy:
    """Where a body layer's activations live, as a 1D strategy: its own, or for a grid ``tp_mode`` a 1D layer
    over the grid's rows (q ranks sharing samples) with the samples split over every row of the stage."""
    if strategy.tp_mode == "1d":
        return strategy
    q = strategy.grid_shape[0]
    return LayerStrategy(tp=q, dp=strategy.devices // q)


def layout_strategy(
    kind: str, strategy: LayerStrategy, devices: int, embedding: EmbeddingStrategy | None = None
) -> LayerStrategy:
    """The strategy that decides where a layer's activations live: ``end_layout`` for the embedding and head
    (the data split when ``embedding`` is not given), the layer's own strategy for every other layer."""
    if kind in PROLOGUE_AND_EPILOGUE:
        return end_layout(embedding, devices) if embedding is not None else data_split(devices)
    return activation_strategy(strategy)


def embedding_strategy(embedding: EmbeddingStrategy, devices: int) -> LayerStrategy:
    """The embedding's and head's parameters as a layer strategy: ``vtp`` ranks share the vocabulary, the
    ``devices / vtp`` replicas of each shard synchronise with the embedding's data-parallel type. Under vsp
    every rank holds the whole weights: data parallelism over the stage's ``devices``."""
    if uses_vsp(embedding):
        return LayerStrategy(dp=devices, dp_type=embedding.data_parallel_type)
    return LayerStrategy(tp=embedding.vtp, dp=devices // embedding.vtp, dp_type=embedding.data_parallel_type)


@dataclass(frozen=True)
class RankPosition:
    """Where one rank sits: ``rank = stage * devices_per_stage + local``."""

    rank: int
    stage: int
    local: int
    num_stages: int
    devices_per_stage: int

    def rank_of(self, stage: int, local: int | None = None) -> int:
        """The rank with local index ``local`` (default: this rank's) on ``stage``."""
        return stage * self.devices_per_stage + (self.local if local is None else local)

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1


@dataclass(frozen=True)
class GridGroups:
    """One rank's groups in a grid tensor-parallel layer (global ranks, in index order). ``row``: splits the
    residual features (norms reduce over it); ``pairs``: runs Megatron's column/row-parallel pairs (heads, MLP
    columns; the row itself in 2D and 2.5D); ``column``: the weights are gathered over it before use;
    ``depth``: holds the same weight blocks on other samples (2.5D). ``grid`` is the whole tp group."""

    grid: tuple[int, ...]
    row: tuple[int, ...]
    pairs: tuple[int, ...]
    column: tuple[int, ...]
    depth: tuple[int, ...]


@dataclass(frozen=True)
class ParallelDims:
    """The world of a plan: ``pp`` stages of ``world_size / pp`` devices each."""

    world_size: int
    pp: int

    @classmethod
    def of(cls, plan: Plan) -> "ParallelDims":
        return cls(plan.world_size, plan.pp)

    @property
    def devices_per_stage(self) -> int:
        return self.world_size // self.pp

    def position(self, rank: int) -> RankPosition:
        stage, local = divmod(rank, self.devices_per_stage)
        return RankPosition(rank, stage, local, self.pp, self.devices_per_stage)

    def stage_ranks(self, stage: int) -> tuple[int, ...]:
        return tuple(stage * self.devices_per_stage + i for i in range(self.devices_per_stage))

    def tp_group(self, strategy: LayerStrategy, rank: int) -> tuple[int, ...]:
        """Global ranks of ``rank``'s tensor-parallel group under ``strategy``, in tp-index order."""
        stage, local = divmod(rank, self.devices_per_stage)
        base = stage * self.devices_per_stage
        if strategy.tp_consecutive:
            return tuple(base + (local // strategy.tp) * strategy.tp + j for j in range(strategy.tp))
        return tuple(base + j * strategy.dp + local % strategy.dp for j in range(strategy.tp))

    def grid_groups(self, strategy: LayerStrategy, rank: int) -> GridGroups:
        """``rank``'s groups under a grid ``tp_mode`` (see the module docstring). The tp index is
        ``t = (outer * q + middle) * q + inner``: the row varies ``inner``; in 2D and 2.5D the column varies
        ``middle`` and the depth ``outer``; in 3D the pairs vary ``middle`` and the column ``outer``."""
        q, _, cube = strategy.grid_shape
        grid = self.tp_group(strategy, rank)
        t = grid.index(rank)
        outer, middle, inner = t // (q * q), t // q % q, t % q
        row = tuple(grid[(outer * q + middle) * q + j] for j in range(q))
        middles = tuple(grid[(outer * q + i) * q + inner] for i in range(q))
        outers = tuple(grid[(k * q + middle) * q + inner] for k in range(len(grid) // (q * q)))
        if cube > 1:
            return GridGroups(grid=grid, row=row, pairs=middles, column=outers, depth=(rank,))
        return GridGroups(grid=grid, row=row, pairs=row, column=middles, depth=outers)

    def mesh_ranks(self, tp: int, tp_consecutive: bool) -> torch.Tensor:
        """Global ranks as a ``(pp, dp, tp)`` grid for one tp degree and order (a DeviceMesh's layout)."""
        dp = self.devices_per_stage // tp
        ranks = torch.arange(self.world_size).view(self.pp, self.devices_per_stage)
        return ranks.view(self.pp, dp, tp) if tp_consecutive else ranks.view(self.pp, tp, dp).transpose(1, 2)

    def peers_across_stages(self, stages: tuple[int, ...], local: int) -> list[int]:
        """The ranks with local index ``local`` on each of ``stages`` (Megatron's embedding group)."""
        return [stage * self.devices_per_stage + local for stage in stages]
