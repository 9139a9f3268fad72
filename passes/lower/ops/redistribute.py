"""The redistribution op that lowered graphs call: an all-to-all in which each rank receives the blocks of an
activation it lacks (``passes.lower.layouts.exchange_plan`` plans it). Its backward is the reverse exchange,
so each holder of a block gets that block's gradient once (gradients of replicated activations are replicated,
as tensor parallelism keeps them). Within ``shared_conversions`` a value is converted to each layout once,
however many layers read it. ``scale_grad`` scales a gradient on its way back.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.distributed._functional_collectives as funcol

from galvatron_fx.passes.lower.ops.collectives import _is_fake, completed


def _box(t: torch.Tensor, box, cut: tuple[bool, bool, bool]) -> torch.Tensor:
    """The part of ``t`` that ``box`` ((start, length) of batch, sequence, features) names on the axes ``cut``."""
    (b, nb), (s, ns), (f, nf) = box
    view = t.narrow(0, b, nb)
    if cut[1]:
        view = view.narrow(1, s, ns)
    if cut[2]:
        view = view.narrow(-1, f, nf)
    return view


def _exchange(x: torch.Tensor, sends, recvs, ranks: tuple[int, ...], cut, out_lengths) -> torch.Tensor:
    shape = list(x.shape)
    for axis, dim in ((0, 0), (1, 1), (2, -1)):
        if cut[axis]:
            shape[dim] = out_lengths[axis]
    out = x.new_empty(shape)
    if _is_fake(x):
        return out
    pieces = [_box(x, box, cut).reshape(-1) for _, box in sends]
    targets = [_box(out, box, cut) for _, box in recvs]  # sorted by peer, then position: the order senders packed
    in_splits = [sum(p.numel() for (peer, _), p in zip(sends, pieces) if peer == r) for r in range(len(ranks))]
    out_splits = [sum(t.numel() for (peer, _), t in zip(recvs, targets) if peer == r) for r in range(len(ranks))]
    flat = torch.cat(pieces) if pieces else x.new_empty(0)
    received = completed(funcol.all_to_all_single(flat.contiguous(), out_splits, in_splits, list(ranks)))
    offset = 0
    for target in targets:
        target.copy_(received[offset : offset + target.numel()].view(target.shape))
        offset += target.numel()
    return out


def _lengths(x: torch.Tensor) -> tuple[int, int, int]:
    return x.shape[0], x.shape[1] if x.dim() > 1 else 1, x.shape[-1]


class _Redistribute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, forward_plan, backward_plan, ranks, cut, out_lengths):
        ctx.backward_plan, ctx.ranks, ctx.cut, ctx.in_lengths = backward_plan, ranks, cut, _lengths(x)
        return _exchange(x, *forward_plan, ranks, cut, out_lengths)

    @staticmethod
    def backward(ctx, grad):
        moved = _exchange(grad.contiguous(), *ctx.backward_plan, ctx.ranks, ctx.cut, ctx.in_lengths)
        return moved, None, None, None, None, None


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


def redistribute(
    x: torch.Tensor,
    forward_plan: tuple,
    backward_plan: tuple,
    ranks: tuple[int, ...],
    cut: tuple[bool, bool, bool],
    out_lengths: tuple[int, int, int],
) -> torch.Tensor:
    """Exchange blocks of ``x`` over ``ranks`` (see ``exchange_plan``) along the axes ``cut`` (batch, sequence,
    features), into a block of ``out_lengths`` on them; non-float tensors get no backward."""
    done = _conversions.get()
    key = (id(x), forward_plan, backward_plan, ranks, cut, out_lengths)
    if done is not None and key in done and done[key][0] is x:
        return done[key][1]
    if not x.is_floating_point():
        moved = _exchange(x, *forward_plan, ranks, cut, out_lengths)
    else:
        moved = _Redistribute.apply(x, forward_plan, backward_plan, ranks, cut, out_lengths)
    if done is not None:
        done[key] = (x, moved)  # holding x keeps its id from being reused within the context
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
