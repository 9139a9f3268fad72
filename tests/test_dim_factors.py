"""The factor rules of ``passes.analysis.dim_factors``: a dimension as a row-major list of factors, refined by
views, united by ops whose operands must line up, marked where an op mixes along them; what one rank holds
when classes are split; and how a view's sizes are rewritten for a shard."""

import pytest
import torch.fx as fx

from galvatron_fx.errors import PlanError
from galvatron_fx.passes.analysis.dim_factors import Factors, local_shape, rewrite_sizes, shard_spec


def test_fresh_dims_have_one_factor_each_and_size_one_dims_none():
    factors = Factors()
    dims = factors.fresh((2, 1, 12))
    assert [len(d) for d in dims] == [1, 0, 1] and dims[2][0].size == 12


def test_refining_a_factor_refines_its_whole_class():
    factors = Factors()
    a, b = factors.new(12), factors.new(12)
    factors.union(a, b)
    heads, width = factors.refine(a, 3)
    assert (heads.size, width.size) == (3, 4)
    assert [f.size for f in factors.leaves_of([b])] == [3, 4]
    assert factors.find(b.children[0]) is factors.find(heads) and factors.find(b.children[1]) is factors.find(width)


def test_unify_lines_up_factors_of_equal_dims_and_refuses_what_cannot():
    factors = Factors()
    whole, split = [factors.new(12)], [factors.new(3), factors.new(4)]
    assert factors.unify(whole, split)
    assert [f.size for f in factors.leaves_of(whole)] == [3, 4]
    assert factors.find(factors.leaves_of(whole)[0]) is factors.find(split[0])
    assert not factors.unify([factors.new(6)], [factors.new(4)])  # no common boundary


def test_regroup_follows_views_and_refuses_a_cut_inside_a_factor():
    factors = Factors()
    merged = [factors.new(4), factors.new(16)]
    out = factors.regroup([merged], (2, 2, 16))
    assert [[f.size for f in factors.leaves_of(d)] for d in out] == [[2], [2], [16]]
    assert factors.regroup([[factors.new(3), factors.new(5)]], (5, 3)) is None  # 5 falls across both


def test_forbid_marks_the_class_and_union_keeps_the_reason():
    factors = Factors()
    a, b = factors.new(8), factors.new(8)
    factors.forbid([[a]], "softmax")
    factors.union(b, a)
    assert factors.find(b).reason == "softmax"


def test_a_rank_holds_its_share_of_each_picked_class():
    factors = Factors()
    heads, width = factors.new(4), factors.new(16)
    picks = {factors.find(heads): 2}
    assert local_shape(factors, [[heads, width], [width]], picks) == [32, 16]
    sizes, chosen = shard_spec(factors, [heads, width], picks, {factors.find(heads): 1})
    assert sizes == (4, 16) and chosen == ((2, 2), None)  # heads 2..3, all of head_dim


def test_view_sizes_for_a_shard_keep_the_batch_read_from_the_tensor():
    graph = fx.Graph()
    batch = graph.placeholder("batch_size")
    assert rewrite_sizes([batch, 16, -1, 16], [2, 16, 2, 16], [2, 16, 4, 16]) == [batch, 16, -1, 16]
    assert rewrite_sizes([batch, 16, 64], [2, 16, 32], [2, 16, 64]) == [batch, 16, 32]
    assert rewrite_sizes([batch, 64], [4, 64], [8, 64]) == [-1, 64]  # the batch is the only size that shrinks
    with pytest.raises(PlanError, match="would have to shrink"):
        rewrite_sizes([batch, batch], [1, 1], [2, 2])
