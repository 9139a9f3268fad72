"""Activation layouts between layers, and the collective that moves an activation from one to another.

A layout says which block of a micro-batch activation each rank of a stage holds (passes/lower/layouts.py
executes the moves): the batch split ``dp`` ways and, under sequence parallelism, the sequence ``tp`` ways, or
around a grid layer the features over its rows' ``q`` ranks.
``move_plan`` is the cost model's fast geometry on integer arrays; ``rank_pieces``, ``piece_intersection``
and ``piece_area`` are the exact rank-by-rank reference it is tested against (``reference_move_s``).
"""

from __future__ import annotations

import functools
from fractions import Fraction

import numpy as np

from galvatron_fx.parallel_dims import activation_strategy
from galvatron_fx.parallel_dims import dp_index as dp_of
from galvatron_fx.parallel_dims import tp_index as tp_of
from galvatron_fx.plan import LayerStrategy


def layout_of(strategy: LayerStrategy) -> tuple:
    """What decides where an activation lives: equal for two strategies, no move between them. A grid layer's
    activations live as a 1D layer's over its rows (``activation_strategy``), split along the features."""
    tp, dp, sequence, consecutive, features = move_key(strategy)
    return tp, dp, sequence, consecutive or tp == 1, features


def move_key(strategy: LayerStrategy) -> tuple:
    """Every field of a strategy's activation layout that ``reference_move_s`` reads: (tp, dp, sequence split,
    consecutive, features split) of its ``activation_strategy``."""
    rows = activation_strategy(strategy)
    return (rows.tp, rows.dp, rows.sp != "none", rows.tp_consecutive, strategy.tp_mode != "1d")


@functools.lru_cache(maxsize=None)
def move_plan(src: tuple, dst: tuple) -> tuple | None:
    """The collective that moves a boundary activation from layout ``src`` to ``dst`` (``move_key`` tuples):
    None when every rank already holds what it needs, else (op, fraction of the activation per rank, group,
    consecutive). Coordinates are integers in units of 1/devices, so areas are exact."""
    devices = src[0] * src[1]
    rank = np.arange(devices)

    def pieces(key):
        tp, dp, sharded, consecutive, features = key
        strategy = LayerStrategy(tp=tp, dp=dp, tp_consecutive=bool(consecutive))
        tp_index, dp_index = tp_of(strategy, rank), dp_of(strategy, rank)
        whole = (0 * rank, 0 * rank + devices)
        split = (tp_index * (devices // tp), (tp_index + 1) * (devices // tp))
        batch = (dp_index * (devices // dp), (dp_index + 1) * (devices // dp))
        return batch, split if sharded else whole, split if features else whole

    held, needed = pieces(src), pieces(dst)
    overlap = []
    for (h0, h1), (n0, n1) in zip(held, needed):
        lo = np.maximum(h0, n0)
        overlap.append((lo, np.maximum(np.minimum(h1, n1), lo)))

    def area(piece):
        return (piece[0][1] - piece[0][0]) * (piece[1][1] - piece[1][0]) * (piece[2][1] - piece[2][0])

    if int((area(needed) - area(overlap)).max()) == 0:
        return None  # every rank slices what it needs from what it has
    src_area, dst_area = int(area(held)[0]), int(area(needed)[0])
    if all((o0 == h0).all() and (o1 == h1).all() for (o0, o1), (h0, h1) in zip(overlap, held)):  # pieces grow
        return ("all_gather", dst_area / devices**3, round(dst_area / src_area), bool(dst[3]))
    return ("all_to_all", max(src_area, dst_area) / devices**3, max(src[0], dst[0], 2), True)


def rank_pieces(strategy: LayerStrategy, devices: int, features: bool = False) -> list[tuple]:
    """Per rank: the (batch, sequence, features) fractions of a boundary activation it holds under ``strategy``
    (a 1D strategy; ``features``: split along them over its tp index, as a grid's rows hold them)."""
    tp, dp = strategy.tp, strategy.dp
    pieces = []
    whole = (Fraction(0), Fraction(1))
    for rank in range(devices):
        tp_index, dp_index = tp_of(strategy, rank), dp_of(strategy, rank)
        split = (Fraction(tp_index, tp), Fraction(tp_index + 1, tp))
        batch = (Fraction(dp_index, dp), Fraction(dp_index + 1, dp))
        pieces.append((batch, split if strategy.sp != "none" else whole, split if features else whole))
    return pieces


def piece_intersection(a, b):
    return tuple((max(x[0], y[0]), max(min(x[1], y[1]), max(x[0], y[0]))) for x, y in zip(a, b))


def piece_area(piece) -> Fraction:
    area = Fraction(1)
    for lo, hi in piece:
        area *= hi - lo
    return area


def reference_move_s(hardware, src: LayerStrategy, dst: LayerStrategy, total_bytes: float) -> float:
    """Rank-by-rank reference of one direction of ``CostModel.redistribution_s`` on ``hardware`` (exact
    fractions; ``move_plan`` is the same geometry on integer arrays)."""
    grids = src.tp_mode != "1d", dst.tp_mode != "1d"
    src, dst = activation_strategy(src), activation_strategy(dst)
    devices = src.devices
    held, needed = rank_pieces(src, devices, grids[0]), rank_pieces(dst, devices, grids[1])
    missing = max(piece_area(n) - piece_area(piece_intersection(h, n)) for h, n in zip(held, needed))
    if missing == 0:
        return 0.0  # every rank slices what it needs from what it has
    src_area, dst_area = piece_area(held[0]), piece_area(needed[0])
    if all(piece_intersection(h, n) == h for h, n in zip(held, needed)):  # each rank's piece grows: all-gather
        group = round(dst_area / src_area)
        return hardware.collective_s("all_gather", float(dst_area) * total_bytes, group, dst.tp_consecutive)
    group = max(src.tp, dst.tp, 2)
    return hardware.collective_s("all_to_all", float(max(src_area, dst_area)) * total_bytes, group, True)


def move_s(hardware, plan: tuple | None, total_bytes: float) -> float:
    """Seconds of one move of ``move_plan`` on ``hardware`` (a HardwareProfile) for ``total_bytes`` of activations;
    compute waits for it, so it pays the ranks' arrival skew too."""
    if plan is None:
        return 0.0
    op, fraction, group, consecutive = plan
    return hardware.collective_s(op, fraction * total_bytes, group, consecutive) + hardware.blocking_s(group)
