"""The collectives of grid tensor parallelism (``passes.lower.graph.grid_parallel``) that 1D tensor and sequence
parallelism do not already have: a parameter held in blocks over the grid's column and depth groups, and the
statistics of a norm over features split across the grid's row.

``grid_param(w, dim, column, also, divisor)``: each rank stores ``1/q`` of its part of ``w`` (along ``dim``, or
the whole of it when ``dim`` is None); forward all-gathers it over the ``column`` group. Backward the gradient is
reduce-scattered over the column (all-reduced when whole), summed over ``also`` (2.5D's depth: one copy of each
block per depth layer) and divided by ``divisor``: those ranks ran other samples of the same micro-batch, so
this is their mean, as data parallelism takes it.

``row_sum(x, ranks)``: sum over the row forward; backward the sum of the gradients (every rank of the row uses
the sum with its own features). ``row_total``, ``row_mean`` and ``row_layer_norm`` are built from it.
"""

from __future__ import annotations

import functools

import torch

from galvatron_fx.passes.lower.ops.collectives import (
    Ranks,
    all_gather_dim,
    all_reduce_sum,
    autocast_cast,
    reduce_scatter_sum_dim,
)
from galvatron_fx.passes.lower.ops.regather import note_gathered


class _GridParam(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, dim, column, also, divisor, into_matmul):
        ctx.dim, ctx.column, ctx.also, ctx.divisor, ctx.dtype = dim, column, also, divisor, w.dtype
        if dim is None:
            return w.view_as(w)
        block = autocast_cast(w) if into_matmul else w
        full = all_gather_dim(block, dim, column)
        note_gathered(full, block, functools.partial(all_gather_dim, dim=dim, ranks=column))
        return full

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().to(ctx.dtype)  # summed in the parameter's dtype
        if ctx.dim is None:
            grad = all_reduce_sum(grad, ctx.column)
        else:
            grad = reduce_scatter_sum_dim(grad, ctx.dim, ctx.column)
        if len(ctx.also) > 1:
            grad = all_reduce_sum(grad, ctx.also)
        return grad / ctx.divisor, None, None, None, None, None


def grid_param(
    w: torch.Tensor, dim: int | None, column: Ranks, also: Ranks, divisor: int, into_matmul: bool = False
) -> torch.Tensor:
    """This rank's block of a parameter made whole over ``column``: all-gathered along ``dim`` (or used as it is
    when ``dim`` is None). Backward: the gradient summed over ``column`` (reduce-scattered back to the block)
    and over ``also`` (other ranks that hold the same block for other samples), divided by ``divisor``.
    ``into_matmul``: only matrix multiplications read it, so under autocast the block is gathered in autocast's
    dtype (``sp_gather``'s reason); its gradient is summed in the parameter's."""
    return _GridParam.apply(w, dim, column, also, divisor, into_matmul)


class _RowSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ranks):
        ctx.ranks = ranks
        return all_reduce_sum(x, ranks)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_sum(grad.contiguous(), ctx.ranks), None


def row_sum(x: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """Sum of ``x`` over the row's ranks; backward the sum of their gradients."""
    return _RowSum.apply(x, ranks) if len(ranks) > 1 else x


def row_total(x: torch.Tensor, dims: list[int], keepdim: bool, ranks: Ranks, dtype=None) -> torch.Tensor:
    """Sum over ``dims`` of a value whose features (among ``dims``) are split over ``ranks``."""
    return row_sum(x.sum(dims, keepdim=keepdim, dtype=dtype), ranks)


def row_mean(x: torch.Tensor, dims: list[int], keepdim: bool, ranks: Ranks, dtype=None) -> torch.Tensor:
    """Mean over ``dims`` of a value whose features (among ``dims``) are split over ``ranks``."""
    count = len(ranks)
    for d in dims:
        count *= x.shape[d]
    return row_total(x, dims, keepdim, ranks, dtype) / count


def row_layer_norm(
    x: torch.Tensor,
    normalized_shape: list[int],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    ranks: Ranks,
) -> torch.Tensor:
    """``layer_norm`` over trailing dims whose features are split over ``ranks`` (this rank's ``weight`` and
    ``bias`` slices): mean and variance summed over the row, in fp32 as torch's kernels keep them."""
    dims = list(range(-len(normalized_shape), 0))
    value = x.float()
    mean = row_mean(value, dims, True, ranks)
    centred = value - mean
    variance = row_mean(centred * centred, dims, True, ranks)
    out = (centred * torch.rsqrt(variance + eps)).to(x.dtype)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out
