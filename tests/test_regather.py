"""Gathered values saved for backward as their shards (passes/lower/ops/regather.py), in one process: a stand-in
``gather`` (concatenation with a scaled copy) plays the collective, so what is kept, when the gather runs again,
and the gradients can be checked exactly."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from galvatron_fx.errors import GalvatronError
from galvatron_fx.passes.lower.ops import regather
from galvatron_fx.passes.lower.ops.regather import _Packed, note_gathered, regather_saved


class Gather:
    """``shard → [shard; 2·shard]`` along dim 0, counting its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, shard: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.cat([shard, 2 * shard])


class _Gathered(torch.autograd.Function):
    """A gathering op as the grid layers have them: forward gathers and announces, backward takes its part."""

    @staticmethod
    def forward(ctx, shard, gather):
        full = gather(shard)
        note_gathered(full, shard, gather)
        return full

    @staticmethod
    def backward(ctx, grad):
        half = grad.shape[0] // 2
        return grad[:half] + 2 * grad[half:], None


def projection(shard, weights, gather):
    """A shard gathered, flattened (a view) and multiplied by two weights, as q and k projections share an input."""
    full = _Gathered.apply(shard, gather)
    flat = full.view(-1, full.shape[-1])
    return sum((flat @ w).square().sum() for w in weights)


def inputs():
    torch.manual_seed(0)
    shard = torch.randn(3, 5, 4, requires_grad=True)
    return shard, [torch.randn(4, 6, requires_grad=True) for _ in range(2)]


def test_backward_gathers_once_and_gives_the_gradients_of_keeping_the_gathered_value():
    shard, weights = inputs()
    expected = torch.autograd.grad(projection(shard, weights, Gather()), [shard, *weights])
    gather = Gather()
    with regather_saved():
        loss = projection(shard, weights, gather)
    assert gather.calls == 1
    got = torch.autograd.grad(loss, [shard, *weights])
    assert gather.calls == 2  # once again for both projections that saved the gathered input
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_gathered_value_is_freed_after_forward_and_views_of_it_are_packed_as_the_shard():
    shard, weights = inputs()
    gathered = []

    class Watch(Gather):
        def __call__(self, s):
            full = super().__call__(s)
            gathered.append(weakref.ref(full))
            return full

    with regather_saved():
        loss = projection(shard, weights, Watch())
        full = _Gathered.apply(shard, Gather())
        view, weight = regather._pack(full.view(-1, 4)), regather._pack(weights[0])
    gc.collect()
    assert gathered[0]() is None  # nothing holds the first gathered value until backward
    assert isinstance(view, _Packed) and view.gathered.shard.data_ptr() == shard.data_ptr()
    assert weight is weights[0]  # not announced: kept as it is
    loss.backward()
    assert len(gathered) == 2  # gathered again for backward


def test_outside_the_context_nothing_is_announced_or_packed():
    shard, weights = inputs()
    gather = Gather()
    loss = projection(shard, weights, gather)
    loss.backward()
    assert gather.calls == 1


def test_a_shard_modified_in_place_after_forward_is_refused():
    shard, weights = inputs()
    base = shard.detach().clone().requires_grad_(True)
    with regather_saved():
        moved = base * 1.0  # a non-leaf shard, as a layer's activations are
        loss = projection(moved, weights, Gather())
    with torch.no_grad():
        moved.add_(1.0)
    with pytest.raises(GalvatronError, match="modified in place"):
        loss.backward()


def test_a_gather_that_changes_layout_in_backward_is_refused():
    shard, weights = inputs()

    class Changing(Gather):
        def __call__(self, s):
            full = super().__call__(s)
            return full if self.calls == 1 else full.transpose(0, 1).contiguous().transpose(0, 1)

    with regather_saved():
        loss = projection(shard, weights, Changing())
    with pytest.raises(GalvatronError, match="layout"):
        loss.backward()
