"""Redistribution between layers whose layouts differ, and per-layer batch sizes.

A *layout* says which block of a micro-batch activation a rank holds: the batch is split into ``dp``
chunks (the rank's data-parallel index picks one) and, under sequence parallelism, the sequence into
``tp`` chunks (its tp index picks one); ranks of a tp group hold the same batch chunk. Every activation
stays in the layout of the layer that produced it; the layer that reads it converts it on entry with a
``redistribute`` node: one all-to-all over the stage's ranks in which each rank receives exactly the
blocks it lacks, from a rank that holds them (itself when it can), so the fewest bytes move; a stage converts
each value to each layout once (``shared_conversions``), however many of its layers read it. Its backward
is the reverse exchange: each holder of a block gets that block's gradient once (gradients of replicated
activations are replicated, as tensor parallelism keeps them). Across a pipeline cut the receiving rank
gets the sender's block (same local index) and converts it the same way.

A layer with ``dp`` smaller than the stage's data split runs ``devices_per_stage / dp`` times a rank's own
samples: its parameters' gradients are scaled by ``dp / devices_per_stage`` so that averaging over its dp
replicas gives the mean over the micro-batch like everywhere else.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.distributed._functional_collectives as funcol
import torch.fx as fx

from galvatron_fx.plan import LayerStrategy, Plan

from galvatron_fx.passes.lower.ops.collectives import _is_fake

aten = torch.ops.aten


# -- layouts -----------------------------------------------------------------------------------------------
def dp_index(strategy: LayerStrategy, local: int) -> int:
    """Data-parallel index of stage-local rank ``local`` (the order of ``runtime.groups.world_mesh``)."""
    return local // strategy.tp if strategy.tp_consecutive else local % strategy.dp


def tp_index(strategy: LayerStrategy, local: int) -> int:
    return local % strategy.tp if strategy.tp_consecutive else local // strategy.dp


def tp_group(plan: Plan, strategy: LayerStrategy, rank: int) -> tuple[int, ...]:
    """Global ranks of ``rank``'s tensor-parallel group, in tp-index order."""
    stage, local = divmod(rank, plan.devices_per_stage)
    base = stage * plan.devices_per_stage
    if strategy.tp_consecutive:
        return tuple(base + (local // strategy.tp) * strategy.tp + j for j in range(strategy.tp))
    return tuple(base + j * strategy.dp + local % strategy.dp for j in range(strategy.tp))


@dataclass(frozen=True)
class Layout:
    """Batch in ``dp`` chunks, sequence (dim 1) in ``seq`` chunks; ``block(local)`` = (batch chunk, seq chunk)."""

    strategy: LayerStrategy
    seq_sharded: bool = False

    @property
    def dp(self) -> int:
        return self.strategy.dp

    @property
    def seq(self) -> int:
        return self.strategy.tp if self.seq_sharded else 1

    def block(self, local: int) -> tuple[int, int]:
        return dp_index(self.strategy, local), (tp_index(self.strategy, local) if self.seq_sharded else 0)

    def same_blocks(self, other: "Layout", devices: int) -> bool:
        return (self.dp, self.seq) == (other.dp, other.seq) and all(self.block(l) == other.block(l) for l in range(devices))


def exchange_plan(src: Layout, dst: Layout, devices: int, me: int, batch_rows: int, seq_len: int):
    """This rank's part of the all-to-all turning ``src`` blocks into ``dst`` blocks: ``sends`` (peer,
    batch start, batch rows, seq start, seq len) in its local coordinates, ``recvs`` the same in the output's."""
    ub, us = max(src.dp, dst.dp), max(src.seq, dst.seq)
    rows, cols = batch_rows // ub, seq_len // us  # one unit, in samples and positions

    def units(layout: Layout, local: int):
        b, s = layout.block(local)
        fb, fs = ub // layout.dp, us // layout.seq
        return [(b * fb + i, s * fs + j) for i in range(fb) for j in range(fs)]

    holders: dict[tuple, list[int]] = {}
    for local in range(devices):
        for unit in units(src, local):
            holders.setdefault(unit, []).append(local)
    sends, recvs = [], []
    for dest in range(devices):
        origin_b, origin_s = dst.block(dest)
        for unit in units(dst, dest):
            candidates = holders[unit]
            source = dest if dest in candidates else candidates[dest % len(candidates)]
            if source == me:
                sb, ss = src.block(me)
                sends.append((dest, unit[0] * rows - sb * (batch_rows // src.dp), rows, unit[1] * cols - ss * (seq_len // src.seq), cols))
            if dest == me:
                recvs.append((source, unit[0] * rows - origin_b * (batch_rows // dst.dp), rows,
                              unit[1] * cols - origin_s * (seq_len // dst.seq), cols))
    return tuple(sorted(sends)), tuple(sorted(recvs))


def _exchange(x: torch.Tensor, sends, recvs, ranks: tuple[int, ...], out_rows: int, out_cols: int | None) -> torch.Tensor:
    shape = list(x.shape)
    shape[0] = out_rows
    if out_cols is not None:
        shape[1] = out_cols
    if _is_fake(x):
        return x.new_empty(shape)
    pieces = [(x[b:b + nb] if out_cols is None else x[b:b + nb, s:s + ns]).reshape(-1) for _, b, nb, s, ns in sends]
    inner = math.prod(x.shape[2 if out_cols is not None else 1:])
    per_piece = lambda nb, ns: nb * (ns if out_cols is not None else 1) * inner  # noqa: E731
    in_splits = [sum(per_piece(nb, ns) for p, _, nb, _, ns in sends if p == peer) for peer in range(len(ranks))]
    out_splits = [sum(per_piece(nb, ns) for p, _, nb, _, ns in recvs if p == peer) for peer in range(len(ranks))]
    flat = torch.cat(pieces) if pieces else x.new_empty(0)
    received = funcol.all_to_all_single(flat.contiguous(), out_splits, in_splits, list(ranks))
    received = received.wait() if isinstance(received, funcol.AsyncCollectiveTensor) else funcol.wait_tensor(received)
    out = x.new_empty(shape)
    offset = 0
    for _, b, nb, s, ns in recvs:  # sorted by peer, then position: the order senders packed them
        n = per_piece(nb, ns)
        target = out[b:b + nb] if out_cols is None else out[b:b + nb, s:s + ns]
        target.copy_(received[offset:offset + n].view(target.shape))
        offset += n
    return out


class _Redistribute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, forward_plan, backward_plan, ranks, out_rows, out_cols):
        ctx.backward_plan, ctx.ranks, ctx.in_rows = backward_plan, ranks, x.shape[0]
        ctx.in_cols = x.shape[1] if out_cols is not None else None
        return _exchange(x, *forward_plan, ranks, out_rows, out_cols)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad.contiguous(), *ctx.backward_plan, ctx.ranks, ctx.in_rows, ctx.in_cols), None, None, None, None, None


_conversions: contextvars.ContextVar[dict | None] = contextvars.ContextVar("galvatron_fx_conversions", default=None)


@contextlib.contextmanager
def shared_conversions():
    """Within this context a value is converted to a layout once, however many layers read it in that
    layout (every layer of a stage reads the embedding's attention mask, say): later readers get the first
    conversion's result, and its backward exchange runs once, on their summed gradient."""
    token = _conversions.set({})
    try:
        yield
    finally:
        _conversions.reset(token)


def redistribute(x: torch.Tensor, forward_plan: tuple, backward_plan: tuple, ranks: tuple[int, ...],
                 out_rows: int, out_cols: int | None) -> torch.Tensor:
    """Exchange blocks of ``x`` over ``ranks`` (see ``exchange_plan``); non-float tensors get no backward."""
    done = _conversions.get()
    key = (id(x), forward_plan, backward_plan, ranks, out_rows, out_cols)
    if done is not None and key in done and done[key][0] is x:
        return done[key][1]
    if not x.is_floating_point():
        moved = _exchange(x, *forward_plan, ranks, out_rows, out_cols)
    else:
        moved = _Redistribute.apply(x, forward_plan, backward_plan, ranks, out_rows, out_cols)
    if done is not None:
        done[key] = (x, moved)   # holding x keeps its id from being reused within the context
    return moved


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity forward; gradient times ``factor`` backward."""
    return _ScaleGrad.apply(x, factor)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


# -- gradients of layers that see more than the rank's own samples ------------------------------------------
def scale_param_grads(gm: fx.GraphModule, factor: float) -> None:
    """Insert ``scale_grad`` after every parameter fetch of ``gm``."""
    if factor == 1:
        return
    for node in list(gm.graph.find_nodes(op="get_attr")):
        if isinstance(_attr(gm, node.target), torch.nn.Parameter):
            with gm.graph.inserting_after(node):
                scaled = gm.graph.call_function(scale_grad, (node, factor))
            node.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
    gm.recompile()


def _attr(gm, target):
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def insert_redistribute(gm: fx.GraphModule, name: str, src: Layout, dst: Layout, devices: int, local: int,
                        stage_ranks: tuple[int, ...], batch_rows: int, seq_len: int) -> bool:
    """Convert placeholder ``name`` from ``src`` to ``dst`` on entry (its meta becomes the ``src`` block)."""
    if src.same_blocks(dst, devices):
        return False
    node = next(n for n in gm.graph.find_nodes(op="placeholder") if n.name == name)
    forward = exchange_plan(src, dst, devices, local, batch_rows, seq_len)
    backward = exchange_plan(dst, src, devices, local, batch_rows, seq_len)
    value = node.meta["val"]
    seq_cut = src.seq > 1 or dst.seq > 1
    out_rows, out_cols = batch_rows // dst.dp, (seq_len // dst.seq if seq_cut else None)
    in_shape = (batch_rows // src.dp, *((seq_len // src.seq,) if seq_cut else ()), *value.shape[2 if seq_cut else 1:])
    node.meta["val"] = torch.empty(in_shape, dtype=value.dtype, device="meta")
    with gm.graph.inserting_after(node):
        moved = gm.graph.call_function(redistribute, (node, forward, backward, stage_ranks, out_rows, out_cols))
    node.replace_all_uses_with(moved, delete_user_cb=lambda user: user is not moved)
    gm.recompile()
    return True


def with_shape(spec, shape):
    return dataclasses.replace(spec, shape=tuple(shape))
