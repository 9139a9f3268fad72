"""The redistribution op that lowered graphs call: an all-to-all in which each rank receives the blocks of an
activation it lacks (``passes.lower.layouts.exchange_plan`` plans it). Its backward is the reverse exchange,
so each holder of a block gets that block's gradient once (gradients of replicated activations are replicated,
as tensor parallelism keeps them). Within ``shared_conversions`` a value is converted to each layout once,
however many layers read it. ``scale_grad`` scales a gradient on its way back.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import torch
import torch.distributed._functional_collectives as funcol

from galvatron_fx.passes.lower.ops.collectives import _is_fake, completed


def _exchange(
    x: torch.Tensor, sends, recvs, ranks: tuple[int, ...], out_rows: int, out_cols: int | None
) -> torch.Tensor:
    shape = list(x.shape)
    shape[0] = out_rows
    if out_cols is not None:
        shape[1] = out_cols
    if _is_fake(x):
        return x.new_empty(shape)
    pieces = [
        (x[b : b + nb] if out_cols is None else x[b : b + nb, s : s + ns]).reshape(-1) for _, b, nb, s, ns in sends
    ]
    inner = math.prod(x.shape[2 if out_cols is not None else 1 :])
    per_piece = lambda nb, ns: nb * (ns if out_cols is not None else 1) * inner  # noqa: E731
    in_splits = [sum(per_piece(nb, ns) for p, _, nb, _, ns in sends if p == peer) for peer in range(len(ranks))]
    out_splits = [sum(per_piece(nb, ns) for p, _, nb, _, ns in recvs if p == peer) for peer in range(len(ranks))]
    flat = torch.cat(pieces) if pieces else x.new_empty(0)
    received = completed(funcol.all_to_all_single(flat.contiguous(), out_splits, in_splits, list(ranks)))
    out = x.new_empty(shape)
    offset = 0
    for _, b, nb, s, ns in recvs:  # sorted by peer, then position: the order senders packed them
        n = per_piece(nb, ns)
        target = out[b : b + nb] if out_cols is None else out[b : b + nb, s : s + ns]
        target.copy_(received[offset : offset + n].view(target.shape))
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
        return (
            _exchange(grad.contiguous(), *ctx.backward_plan, ctx.ranks, ctx.in_rows, ctx.in_cols),
            None,
            None,
            None,
            None,
            None,
        )


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
    out_rows: int,
    out_cols: int | None,
) -> torch.Tensor:
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
