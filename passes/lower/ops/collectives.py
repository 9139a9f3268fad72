"""Collectives that lowering passes insert into layer graphs, as plain functions with autograd.

Each function is the target of a visible ``call_function`` node (``tp_copy``, ``tp_reduce``, ...) and
takes its group as a tuple of global ranks, so a lowered graph prints which ranks talk and lowering needs
no process group (a plan can be lowered for any rank of any world in one process). At run time the ranks
resolve to the process group that was created for them (``DeviceMesh`` or ``new_group``) through
``torch.distributed._functional_collectives``. On fake or meta tensors (shape propagation) the functions
only compute shapes.

Autograd follows Megatron's conjugate pairs: ``tp_copy`` is identity forward / all-reduce backward (before
column-parallel work), ``tp_reduce`` all-reduce forward / identity backward (after row-parallel work),
``tp_scatter`` keeps this rank's slice of a replicated value (backward: the slices' gradients summed
into the full tensor), ``gather_dim`` / ``scatter_dim`` all-gather or split along a dimension (each the
other's backward) and ``reduce_scatter_dim`` reduce-scatters (backward: all-gather).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed._functional_collectives as funcol
from torch._subclasses.fake_tensor import FakeTensor

from galvatron_fx.passes.lower.ops.regather import note_gathered

Ranks = tuple[int, ...]


def _is_fake(x: torch.Tensor) -> bool:
    return isinstance(x, FakeTensor) or x.device.type == "meta"


def completed(out: torch.Tensor) -> torch.Tensor:
    """The result of a functional collective, waited for (eager ones return an ``AsyncCollectiveTensor``)."""
    return out.wait() if isinstance(out, funcol.AsyncCollectiveTensor) else funcol.wait_tensor(out)


def autocast_cast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the dtype autocast runs matrix multiplications in on its device (as it is without autocast)."""
    device = x.device.type
    if x.is_floating_point() and device != "meta" and torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x


def all_reduce_sum(x: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """Sum of ``x`` over ``ranks`` (no autograd)."""
    if len(ranks) == 1 or _is_fake(x):
        return x.clone()
    return completed(funcol.all_reduce(x.contiguous(), "sum", list(ranks)))


def all_gather_dim(x: torch.Tensor, dim: int, ranks: Ranks) -> torch.Tensor:
    """Concatenation along ``dim`` of ``x`` from every rank of ``ranks``, in order (no autograd)."""
    if len(ranks) == 1:
        return x
    if _is_fake(x):
        return torch.cat([x] * len(ranks), dim)
    moved = x.movedim(dim, 0).contiguous()
    out = funcol.all_gather_tensor(moved, 0, list(ranks))
    out = completed(out)
    return out.movedim(0, dim)


def reduce_scatter_sum_dim(x: torch.Tensor, dim: int, ranks: Ranks) -> torch.Tensor:
    """This rank's part along ``dim`` of the sum of ``x`` over ``ranks`` (no autograd)."""
    size = len(ranks)
    if size == 1:
        return x
    if _is_fake(x):
        return x.narrow(dim, 0, x.shape[dim] // size).clone()
    moved = x.movedim(dim, 0).contiguous()
    out = funcol.reduce_scatter_tensor(moved, "sum", 0, list(ranks))
    out = completed(out)
    return out.movedim(0, dim)


def _my_index(ranks: Ranks) -> int:
    import torch.distributed as dist

    return ranks.index(dist.get_rank()) if dist.is_initialized() else 0


# -- autograd -------------------------------------------------------------------------------------------
class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ranks):
        ctx.ranks = ranks
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_sum(grad, ctx.ranks), None


class _CopySlotted(torch.autograd.Function):
    """Gradients summed only among ranks with the same ``slot``: each rank contributes to its slot of a
    ``slots``-long buffer, one all-reduce over all ``ranks`` sums every slot (no sub-group needed)."""

    @staticmethod
    def forward(ctx, x, ranks, slot, slots):
        ctx.ranks, ctx.slot, ctx.slots = ranks, slot, slots
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        buffer = grad.new_zeros((ctx.slots, *grad.shape))
        buffer[ctx.slot] = grad
        return all_reduce_sum(buffer, ctx.ranks)[ctx.slot], None, None, None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ranks):
        return all_reduce_sum(x, ranks)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def select_local(x: torch.Tensor, spec: tuple) -> torch.Tensor:
    """Keep the indices a shard spec names. ``spec`` is ``((dim, factor_sizes, picks), ...)`` where a dim of
    ``x`` is viewed as factors (row-major) and ``picks[i]`` is ``(start, length)`` on factor i, or None."""
    for dim, sizes, picks in spec:
        dim = dim % x.dim()
        shape = list(x.shape)
        y = x.reshape(shape[:dim] + list(sizes) + shape[dim + 1 :])
        for i, pick in enumerate(picks):
            if pick is not None:
                y = y.narrow(dim + i, pick[0], pick[1])
        shape[dim] = -1
        x = y.reshape(shape)
    return x


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spec, ranks):
        ctx.spec, ctx.ranks, ctx.shape = spec, ranks, x.shape
        return select_local(x, spec).contiguous()

    @staticmethod
    def backward(ctx, grad):
        # the positions this rank kept, found by selecting from a tensor of flat indices
        positions = select_local(
            torch.arange(grad.new_empty(ctx.shape).numel(), device=grad.device).view(ctx.shape), ctx.spec
        )
        full = grad.new_zeros(ctx.shape)
        full.view(-1)[positions.reshape(-1)] = grad.reshape(-1)
        return all_reduce_sum(full, ctx.ranks), None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, ranks):
        ctx.dim, ctx.ranks = dim, ranks
        return all_gather_dim(x, dim, ranks)

    @staticmethod
    def backward(ctx, grad):
        size = len(ctx.ranks)
        return grad.chunk(size, ctx.dim)[_my_index(ctx.ranks)].contiguous(), None, None


class _Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, ranks):
        ctx.dim, ctx.ranks = dim, ranks
        return x.chunk(len(ranks), dim)[_my_index(ranks)].contiguous()

    @staticmethod
    def backward(ctx, grad):
        return all_gather_dim(grad, ctx.dim, ctx.ranks), None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, ranks):
        ctx.dim, ctx.ranks = dim, ranks
        return reduce_scatter_sum_dim(x, dim, ranks)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_dim(grad, ctx.dim, ctx.ranks), None, None


class _GatherSumBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, ranks):
        ctx.dim, ctx.ranks = dim, ranks
        return all_gather_dim(x, dim, ranks)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_sum_dim(grad, ctx.dim, ctx.ranks), None, None


# -- graph-visible functions ------------------------------------------------------------------------------
def tp_copy(x: torch.Tensor, ranks: Ranks, slot: int = 0, slots: int = 1) -> torch.Tensor:
    """Identity forward, gradient summed over ``ranks`` backward (enters a tensor-parallel region). With
    ``slots > 1`` the sum runs only over the ranks with the same ``slot`` (a shard several ranks hold)."""
    if len(ranks) == 1:
        return x
    return _Copy.apply(x, ranks) if slots == 1 else _CopySlotted.apply(x, ranks, slot, slots)


def tp_reduce(x: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """Partial sums summed over ``ranks`` forward, identity backward (leaves a row-parallel projection)."""
    return _Reduce.apply(x, ranks) if len(ranks) > 1 else x


def tp_scatter(x: torch.Tensor, spec: tuple, ranks: Ranks) -> torch.Tensor:
    """This rank's slice (``select_local(x, spec)``) of a replicated value used by sharded work."""
    return _Scatter.apply(x, spec, ranks)


def gather_dim(x: torch.Tensor, dim: int, ranks: Ranks) -> torch.Tensor:
    """All-gather along ``dim`` forward, keep this rank's part of the gradient backward."""
    return _Gather.apply(x, dim, ranks) if len(ranks) > 1 else x


def gather_dim_sum_grad(x: torch.Tensor, dim: int, ranks: Ranks) -> torch.Tensor:
    """All-gather along ``dim`` forward, reduce-scatter the gradient backward (Megatron-SP's all-gather
    before a column-parallel projection: every rank's gradient is a partial sum)."""
    return _GatherSumBackward.apply(x, dim, ranks) if len(ranks) > 1 else x


def split_dim(x: torch.Tensor, dim: int, ranks: Ranks) -> torch.Tensor:
    """Keep this rank's part along ``dim`` forward, all-gather the gradient backward."""
    return _Split.apply(x, dim, ranks) if len(ranks) > 1 else x


def reduce_scatter_dim(x: torch.Tensor, dim: int, ranks: Ranks) -> torch.Tensor:
    """Partial sums reduce-scattered along ``dim`` forward, all-gather backward (Megatron-SP after a
    row-parallel projection)."""
    return _ReduceScatter.apply(x, dim, ranks) if len(ranks) > 1 else x


# -- sequence parallelism: collectives along one factor of a dimension ------------------------------------------
# A sequence-sharded value may carry the sequence inside a merged dimension (GPT-2 flattens [batch, seq] to
# [batch * seq] before its projections). ``(dim, sizes, index)`` names it: dimension ``dim`` viewed row-major
# as ``sizes`` (this rank's sizes), the sequence being factor ``index``.
def _on_factor(x: torch.Tensor, dim: int, sizes: tuple, index: int, op) -> torch.Tensor:
    dim = dim % x.dim()
    shape = list(x.shape)
    y = op(x.reshape(shape[:dim] + list(sizes) + shape[dim + 1 :]), dim + index)
    return y.reshape(shape[:dim] + [-1] + shape[dim + 1 :])


def _factor_gather(x, dim, sizes, index, ranks):
    return _on_factor(x, dim, sizes, index, lambda y, d: all_gather_dim(y, d, ranks))


def _factor_reduce_scatter(x, dim, sizes, index, ranks):
    return _on_factor(x, dim, sizes, index, lambda y, d: reduce_scatter_sum_dim(y, d, ranks))


def _factor_split(x, dim, sizes, index, ranks):
    return _on_factor(
        x, dim, sizes, index, lambda y, d: y.chunk(len(ranks), d)[0 if _is_fake(y) else _my_index(ranks)].contiguous()
    )


def _contiguous_gather(x, dim, sizes, index, ranks):
    """``_factor_gather``, contiguous, so that each projection reading it flattens it to (tokens, features) as a
    view of this one tensor: a sequence gathered in the middle dimension is not contiguous, and each projection
    would flatten it with a copy of its own (and save that)."""
    return _factor_gather(x, dim, sizes, index, ranks).contiguous()


class _SeqGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, sizes, index, ranks, sum_grad, into_matmul):
        ctx.args, ctx.sum_grad, ctx.dtype = (
            (dim, tuple(s * len(ranks) if i == index else s for i, s in enumerate(sizes)), index, ranks),
            sum_grad,
            x.dtype,
        )
        gather = functools.partial(
            _contiguous_gather if into_matmul else _factor_gather, dim=dim, sizes=sizes, index=index, ranks=ranks
        )
        if into_matmul:
            x = autocast_cast(x)
        full = gather(x)
        note_gathered(full, x, gather)
        return full

    @staticmethod
    def backward(ctx, grad):
        op = _factor_reduce_scatter if ctx.sum_grad else _factor_split
        return op(grad.contiguous(), *ctx.args).to(ctx.dtype), None, None, None, None, None, None


class _SeqShard(torch.autograd.Function):
    """Forward: this rank's part of the sequence factor, reduce-scattered from partial sums (``reduce``) or
    split from a whole value; backward: all-gather of the gradient."""

    @staticmethod
    def forward(ctx, x, dim, sizes, index, ranks, reduce):
        ctx.args = (dim, tuple(s // len(ranks) if i == index else s for i, s in enumerate(sizes)), index, ranks)
        return (_factor_reduce_scatter if reduce else _factor_split)(x, dim, sizes, index, ranks)

    @staticmethod
    def backward(ctx, grad):
        return _factor_gather(grad.contiguous(), *ctx.args), None, None, None, None, None


def sp_gather(
    x: torch.Tensor,
    dim: int,
    sizes: tuple,
    index: int,
    ranks: Ranks,
    sum_grad: bool = True,
    into_matmul: bool = False,
) -> torch.Tensor:
    """All-gather the sequence factor (``sizes``: this rank's) forward; backward reduce-scatter the gradient
    (``sum_grad``: Megatron-SP before column-parallel work, whose input gradients are partial) or keep this
    rank's part of it (the gradient is already whole). ``into_matmul``: only matrix multiplications read the
    gathered value, so under autocast it is gathered in autocast's dtype, the one they would cast it to (the
    same values, half the bytes moved, and what they save for backward is the gathered value itself)."""
    if len(ranks) == 1:
        return x
    return _SeqGather.apply(x, dim, tuple(sizes), index, ranks, sum_grad, into_matmul)


def sp_reduce_scatter(x: torch.Tensor, dim: int, sizes: tuple, index: int, ranks: Ranks) -> torch.Tensor:
    """Partial sums reduce-scattered along the sequence factor (``sizes``: whole) forward, all-gather backward
    (Megatron-SP after a row-parallel projection)."""
    return _SeqShard.apply(x, dim, tuple(sizes), index, ranks, True) if len(ranks) > 1 else x


def sp_split(x: torch.Tensor, dim: int, sizes: tuple, index: int, ranks: Ranks) -> torch.Tensor:
    """This rank's part of a whole (replicated) value along the sequence factor; backward all-gather."""
    return _SeqShard.apply(x, dim, tuple(sizes), index, ranks, False) if len(ranks) > 1 else x


class _SeqSlice(torch.autograd.Function):
    """Forward: this rank's part of the sequence factor; backward: its gradient in place, zeros elsewhere."""

    @staticmethod
    def forward(ctx, x, dim, sizes, index, ranks):
        ctx.args, ctx.shape = (dim, tuple(sizes), index, ranks), x.shape
        return _factor_split(x, dim, sizes, index, ranks)

    @staticmethod
    def backward(ctx, grad):
        dim, sizes, index, ranks = ctx.args
        shape = list(ctx.shape)
        dim = dim % len(shape)
        factored = shape[:dim] + list(sizes) + shape[dim + 1 :]
        chunk = sizes[index] // len(ranks)
        local = [chunk if i == dim + index else n for i, n in enumerate(factored)]
        full = grad.new_zeros(factored)
        full.narrow(dim + index, _my_index(ranks) * chunk, chunk).copy_(grad.reshape(local))
        return full.reshape(shape), None, None, None, None


def sp_slice(x: torch.Tensor, dim: int, sizes: tuple, index: int, ranks: Ranks) -> torch.Tensor:
    """This rank's part of a whole value along the sequence factor (``sizes``: whole); backward the gradient of
    that part alone, zeros elsewhere: each rank's gradient of the whole value covers its own positions, and
    summing over the ranks (data parallelism does) gives the whole gradient. Integer values (targets) too."""
    return _SeqSlice.apply(x, dim, tuple(sizes), index, ranks) if len(ranks) > 1 else x


def _all_to_all(x: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """Chunk i of dim 0 goes to rank i; the result's chunk j came from rank j."""
    if _is_fake(x):
        return x.clone()
    out = funcol.all_to_all_single(x.contiguous(), None, None, list(ranks))
    return completed(out)


def _seq_to_heads(x: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """[..., H, S/u, D] sequence-sharded → [..., H/u, S, D] head-sharded."""
    u, lead = len(ranks), x.shape[:-3]
    heads, seq, width = x.shape[-3:]
    y = x.reshape(*lead, u, heads // u, seq, width).movedim(-4, 0)  # [u (dest), ..., H/u, S/u, D]
    y = _all_to_all(y, ranks)  # [u (source = sequence chunk), ..., H/u, S/u, D]
    return y.movedim(0, -3).reshape(*lead, heads // u, u * seq, width)


def _heads_to_seq(x: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """[..., H/u, S, D] head-sharded → [..., H, S/u, D] sequence-sharded."""
    u, lead = len(ranks), x.shape[:-3]
    heads, seq, width = x.shape[-3:]
    y = x.reshape(*lead, heads, u, seq // u, width).movedim(-3, 0)  # [u (dest = sequence chunk), ..., H/u, S/u, D]
    y = _all_to_all(y, ranks)  # [u (source = head chunk), ..., H/u, S/u, D]
    return y.movedim(0, -4).reshape(*lead, u * heads, seq // u, width)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ranks):
        ctx.ranks = ranks
        return _seq_to_heads(x, ranks)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad, ctx.ranks), None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ranks):
        ctx.ranks = ranks
        return _heads_to_seq(x, ranks)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad, ctx.ranks), None


def seq_to_heads(x: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """Ulysses before attention: all-to-all from sequence sharding to head sharding (``[..., H, S, D]``)."""
    return _SeqToHeads.apply(x, ranks) if len(ranks) > 1 else x


def heads_to_seq(x: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """Ulysses after attention: all-to-all from head sharding back to sequence sharding."""
    return _HeadsToSeq.apply(x, ranks) if len(ranks) > 1 else x
