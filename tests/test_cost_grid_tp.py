"""Grid tensor parallelism (2D, 2.5D, 3D) in the cost model: its terms against hand-computed cases of the formulas
(cost/grid_tp.py), the group placement on the hardware, the integration in CostModel, and the orderings at
equal device counts."""

import dataclasses

import pytest

from galvatron_fx import Cluster
from galvatron_fx.cost.grid_tp import (
    NORM_REDUCTIONS,
    NORMS,
    PARAM_TENSORS,
    LayerShape,
    collectives_s,
    group_fit,
    tp_terms,
    transformer_linears,
)
from galvatron_fx.cost.hardware import COLLECTIVES, CommFit, HardwareProfile
from galvatron_fx.cost.hardware_profiler import _group_shapes
from galvatron_fx.cost.layer_type_profile import LayerTypeProfile
from galvatron_fx.cost.model import CostModel
from galvatron_fx.cost.model_profile import ModelProfile
from galvatron_fx.cost.time_formula import TimeFormula
from galvatron_fx.plan import EmbeddingStrategy, Plan
from galvatron_fx.plan import LayerStrategy as S

BW = 1e9
H, T, B = 256, 1024, 4  # hidden size, tokens of a micro-batch, bytes per element (fp32)
W = 4 * H * H + 2 * H * 1024  # a block whose MLP is 4h wide: 786 432 parameters
A = 8_000_000  # saved-activation bytes of the micro-batch on one device


def grid(tp, mode, depth=1, **kw):
    return S(tp=tp, tp_mode=mode, tp_depth=depth, **kw)


def shape(tokens=T, activation=A) -> LayerShape:
    return LayerShape(tokens=tokens, hidden=H, act_bytes=B, params=W, activation_bytes=activation)


def by_key(collectives):
    return {(c.op, c.group): c for c in collectives}


def test_2d_collectives_and_memory_by_hand():
    terms = tp_terms(grid(4, "2d"), shape())  # q = 2: two rows of 512 tokens
    row = T / 2 * H * B  # one [tokens of a row, hidden] activation: 524 288 bytes
    fwd, bwd = by_key(terms.forward), by_key(terms.backward)
    assert fwd["all_gather", "row"].nbytes == 2 * row and fwd["all_gather", "row"].calls == 2  # the 2 groups' inputs
    assert fwd["reduce_scatter", "row"].nbytes == 2 * row and fwd["reduce_scatter", "row"].calls == 2
    norms = fwd["all_reduce", "row"]
    assert norms.calls == NORMS * NORM_REDUCTIONS and norms.nbytes == NORMS * NORM_REDUCTIONS * 512 * 4
    column = fwd["all_gather", "column"]
    assert (column.size, column.stride, column.calls, column.nbytes) == (2, 2, PARAM_TENSORS, W / 2 * 4)
    assert bwd["reduce_scatter", "row"].nbytes == 2 * row and bwd["reduce_scatter", "column"].nbytes == W / 2 * 4
    # backward gathers the row-parallel outputs' gradients and, again, the inputs and weights saved as blocks
    assert bwd["all_gather", "row"].nbytes == 4 * row and bwd["all_gather", "row"].calls == 4
    assert bwd["all_gather", "column"] == column and ("all_reduce", "depth") not in bwd
    # per rank: 1/q² of the parameters stored, 1/q gathered; activations 1/P, one [T_r, h] input gathered at a time
    assert terms.stored_params == W / 4 and terms.gathered_params == W / 2
    assert terms.activation_bytes == A / 4 and terms.largest_gathered_bytes == row
    assert terms.gathered_input_bytes == 2 * row * (1 - 1 / 2)  # more, while a recomputed layer keeps them whole
    # ring volume: (q − 1)/q of every gather and scatter, 2(q − 1)/q of every all-reduce
    assert terms.volume_bytes == pytest.approx(0.5 * (10 * row + 3 * W / 2 * 4) + 2 * norms.nbytes)
    bf16 = by_key(tp_terms(grid(4, "2d"), shape(), "bf16").forward)  # blocks gathered as the projections use them
    assert bf16["all_gather", "column"].nbytes == W / 2 * 2
    assert by_key(tp_terms(grid(4, "2d"), shape(), "bf16").backward)["reduce_scatter", "column"].nbytes == W / 2 * 4
    ckpt = tp_terms(grid(4, "2d", ckpt=True), shape())  # recomputation gathers them: backward does not again
    assert by_key(ckpt.backward)["all_gather", "row"].nbytes == 2 * row
    assert ("all_gather", "column") not in by_key(ckpt.backward)


def test_2_5d_splits_samples_over_depth_and_all_reduces_the_blocks_over_it():
    terms = tp_terms(grid(8, "2.5d", 2), shape())  # q = 2, d = 2: four rows of 256 tokens
    row = T / 4 * H * B
    fwd, bwd = by_key(terms.forward), by_key(terms.backward)
    assert fwd["all_gather", "row"].nbytes == 2 * row and fwd["reduce_scatter", "row"].nbytes == 2 * row
    depth = bwd["all_reduce", "depth"]
    assert (depth.size, depth.stride, depth.nbytes) == (2, 4, W / 4 * 4)  # the W/q² blocks, q² ranks apart
    assert terms.stored_params == W / 4 and terms.gathered_params == W / 2
    assert terms.activation_bytes == A / 8 and terms.largest_gathered_bytes == row


def test_3d_moves_what_colossal_ai_moves_linear_by_linear_over_the_lowered_groups():
    assert transformer_linears(H, W) == [(H, 3 * H), (H, H), (H, 1024), (1024, H)]
    terms = tp_terms(grid(8, "3d"), shape())  # q = 2: blocks [T/q², f/q]
    fwd, bwd = terms.forward, terms.backward

    def total(collectives, op, group):
        return sum(c.nbytes for c in collectives if (c.op, c.group) == (op, group))

    block = T / 4 * B  # one feature of a block of samples, 1/q² of the tokens
    # column-parallel projections (h→3h, h→m): inputs gathered over the pairs, partial sums scattered over the row
    assert total(fwd, "all_gather", "pairs") == (H + H) * block
    assert total(fwd, "reduce_scatter", "row") == (3 * H + 1024) * block
    # row-parallel ones (h→h, m→h): inputs gathered over the row, scattered over the pairs
    assert total(fwd, "all_gather", "row") == (H + 1024) * block
    assert total(fwd, "reduce_scatter", "pairs") == (H + H) * block
    assert total(fwd, "all_gather", "column") == W / 4 * B  # the gathered weights, 1/q² each
    assert total(bwd, "reduce_scatter", "column") == W / 4 * 4
    assert total(bwd, "reduce_scatter", "pairs") == (H + H) * block  # the gathers' gradients
    # backward gathers again what forward gathered (saved as blocks): inputs and weights
    assert total(bwd, "all_gather", "column") == W / 4 * B
    assert total(bwd, "all_gather", "pairs") == (H + H) * block + (H + H) * block  # inputs again, output grads
    assert total(bwd, "all_gather", "row") == (H + 1024) * block + (3 * H + 1024) * block
    assert sum(c.calls for c in fwd) == 4 * 3 + NORMS  # three per linear, each norm's statistics
    strides = {c.group: c.stride for c in fwd}
    assert (strides["row"], strides["pairs"], strides["column"]) == (1, 2, 4)
    assert terms.stored_params == W / 8 and terms.gathered_params == W / 4
    assert terms.activation_bytes == A / 8 and terms.largest_gathered_bytes == 1024 * block  # the MLP's m→h input
    assert terms.gathered_input_bytes == pytest.approx((H + H + H + 1024) * block * 0.5)
    ckpt = tp_terms(grid(8, "3d", ckpt=True), shape())
    assert total(ckpt.backward, "all_gather", "column") == 0 and ckpt.forward == fwd


def hardware(world=16, per_node=4, strided_bw=BW / 10, extra=None) -> HardwareProfile:
    collectives = {
        f"{op}/{g}/{layout}": CommFit(0.0, BW if layout == "consecutive" else strided_bw)
        for op in COLLECTIVES
        for g in (2, 4, 8, 16)
        for layout in ("consecutive", "strided")
    }
    collectives.update(extra or {})
    p2p = {2: CommFit(0.0, BW)}
    return HardwareProfile(world, per_node, "test", 80 * 2**30, collectives, p2p, 1.0, {"fp32": 1e12})


def test_group_placement_picks_the_fit_of_the_group_shape():
    hw = hardware()  # 4 devices per node: consecutive fits within a node, strided ones across nodes
    assert group_fit(hw, "all_gather", 2, 1).bandwidth_Bps == BW  # a row
    assert group_fit(hw, "all_gather", 2, 2).bandwidth_Bps == BW  # a column of q = 2: ranks 0, 2, one node
    assert group_fit(hw, "all_gather", 2, 4).bandwidth_Bps == BW / 10  # a depth group q² = 4 apart: two nodes
    assert group_fit(hw, "all_gather", 4, 4).bandwidth_Bps == BW / 10  # a column of q = 4 spans 4 nodes
    measured = hardware(extra={"all_gather/2/stride4": CommFit(0.0, BW / 3)})
    assert group_fit(measured, "all_gather", 2, 4).bandwidth_Bps == BW / 3
    # on a preset of 8-device nodes, a 2D grid of 16 keeps its rows in a node and sends its columns across
    preset = Cluster.preset("A100-80GB", nodes=2, devices_per_node=8).hardware_profile()
    assert group_fit(preset, "all_gather", 4, 1) == preset.fit("all_gather", 4, True)
    assert group_fit(preset, "all_gather", 4, 4) == preset.fit("all_gather", 4, False)
    assert preset.fit("all_gather", 4, False).bandwidth_Bps < preset.fit("all_gather", 4, True).bandwidth_Bps


def test_collective_seconds_are_calls_times_latency_plus_bytes_over_bandwidth():
    hw = hardware(extra={"reduce_scatter/2/stride2": CommFit(1e-4, BW / 2)})
    terms = tp_terms(grid(4, "2d"), shape())
    expected = sum(
        c.calls * group_fit(hw, c.op, c.size, c.stride).latency_s
        + c.nbytes / group_fit(hw, c.op, c.size, c.stride).bandwidth_Bps
        for c in terms.backward
    )
    assert collectives_s(hw, terms.backward) == pytest.approx(expected)
    column = by_key(terms.backward)["reduce_scatter", "column"]
    assert expected == pytest.approx(
        sum(c.nbytes / BW for c in terms.backward if c.group == "row" or c.op == "all_gather")
        + PARAM_TENSORS * 1e-4
        + column.nbytes / (BW / 2)
    )


def test_the_profiler_measures_the_grid_group_shapes():
    shapes = {(g, layout): groups for g, layout, groups in _group_shapes(16)}
    assert shapes[2, "stride2"][:2] == [[0, 2], [1, 3]]  # columns of a 2×2 grid
    assert shapes[2, "stride4"][:2] == [[0, 4], [1, 5]]  # depth groups of a 2×2×d grid
    for groups in shapes.values():
        assert sorted(r for group in groups for r in group) == list(range(16))
    assert all(layout in ("consecutive", "strided") for _, layout, _ in _group_shapes(4))  # no new shape: as fast
    data = hardware(extra={"all_gather/2/stride2": CommFit(1e-5, BW)}).to_json_dict()
    data["format"] = "galvatron_fx.hardware_profile/1"
    assert HardwareProfile.from_json_dict(data).collectives["all_gather/2/stride2"] == CommFit(1e-5, BW)


# -- in the cost model -----------------------------------------------------------------------------------------


def per_sample(seconds: float) -> TimeFormula:
    return TimeFormula(((1, 0, seconds),))


SEQ, HEADS = 64, 16


def megatron_activation(tp: int) -> int:
    """Megatron's activation bytes per sample of a Transformer block on one of ``tp`` ranks (fp32: twice the
    fp16 figure s·h·(10 + 24/t) + 5·a·s²/t)."""
    return int(2 * (SEQ * H * (10 + 24 / tp) + 5 * HEADS * SEQ * SEQ / tp))


def profile() -> ModelProfile:
    block = LayerTypeProfile(
        "blk",
        per_sample(1e-3),
        per_sample(2e-3),
        param_count=W,
        activation_bytes_per_sample={t: megatron_activation(t) for t in (1, 2, 4, 8, 16, 32, 64)},
        ckpt_activation_bytes_per_sample=SEQ * H * B,
        boundary_bytes_per_sample=SEQ * H * B,
        num_heads=HEADS,
        largest_param_count=H * 1024,
    )
    ends = LayerTypeProfile("end", TimeFormula(), TimeFormula(), 1000, {1: 100}, 0, SEQ * H * B)
    return ModelProfile("grid", ["blk"] * 4, {"blk": block}, ends, ends, [SEQ * H * B] * 4, SEQ, H, HEADS)


def uniform(world: int) -> HardwareProfile:
    return hardware(world=world, per_node=world, strided_bw=BW)


def test_layer_cost_of_a_grid_layer_by_hand():
    model = CostModel(profile(), uniform(8))
    strategy = grid(4, "2d", dp=2)
    cost = model.layer_cost("blk", strategy, micro_batch=16)  # 8 samples per grid, 4 per row
    terms = tp_terms(strategy, LayerShape(8 * SEQ, H, B, W, megatron_activation(1) * 8))
    assert cost.fwd_s == pytest.approx(8e-3 / 4 + sum(c.nbytes for c in terms.forward) / BW)
    assert cost.bwd_s == pytest.approx(16e-3 / 4 + sum(c.nbytes for c in terms.backward) / BW)
    assert cost.model_state_bytes == W / 4 * 16  # DDP over the 2 replicas of each block
    assert cost.activation_bytes == int(terms.activation_bytes)  # gathered inputs and weights saved as blocks
    ckpt = model.layer_cost("blk", grid(4, "2d", dp=2, ckpt=True), micro_batch=16)
    assert ckpt.activation_bytes == SEQ * H * B * 4  # its input: 4 samples, whole in features
    # forward again, collectives included; its backward gathers nothing again (the recomputation keeps it whole)
    regathered = sum(c.nbytes for c in terms.forward if c.op == "all_gather")
    assert ckpt.bwd_s == pytest.approx(cost.bwd_s + cost.fwd_s - regathered / BW)
    zero3 = model.layer_cost("blk", grid(4, "2d", dp=2, dp_type="zero3"), micro_batch=16)
    assert zero3.model_state_bytes < cost.model_state_bytes


def test_heads_split_over_the_row_and_obstacles_leave_modes_out():
    p = profile()
    p.types["blk"] = dataclasses.replace(p.types["blk"], num_heads=6, lowering_obstacles={})
    model = CostModel(p, uniform(8))
    assert model.unsupported_reason("blk", grid(4, "2d", dp=2)) is None  # rows of 2 split 6 heads
    assert model.unsupported_reason("blk", S(tp=4, dp=2)) == "tp 4 does not divide 6 heads"
    assert model.unsupported_reason("blk", grid(64, "3d")) == "the rows of 4 ranks of a 3d grid do not divide 6 heads"
    p.types["blk"].lowering_obstacles["tp8/none/3d"] = "3d is not lowered"
    assert model.unsupported_reason("blk", grid(8, "3d")) == "lowering: 3d is not lowered"


def test_a_plan_mixing_1d_and_grid_layers_redistributes_between_their_layouts():
    model = CostModel(profile(), uniform(4))
    layers = (grid(4, "2d"), S(tp=2, dp=2), S(tp=4), grid(4, "2d"))
    plan = Plan(world_size=4, layers=layers, global_batch=8, embedding=EmbeddingStrategy())
    # a 2D grid of 4 holds the samples as tp2 dp2 does, split along the features: a move to it, none to the same grid
    assert model.redistribution_s(layers[0], layers[1], 1, 8) > 0.0
    assert model.redistribution_s(layers[0], grid(4, "2d", ckpt=True), 1, 8) == 0.0
    assert model.redistribution_s(layers[1], layers[2], 2, 8) > 0.0
    prediction = model.evaluate(plan)
    assert prediction.iteration_time_s > 0 and prediction.memory_bytes_per_stage[0] > 0


# -- orderings at equal device counts ---------------------------------------------------------------------------


def activation(model: CostModel, strategy: S, micro_batch: int = 64) -> float:
    """Activation bytes one micro-batch keeps per device from forward to backward."""
    if strategy.tp_mode == "1d":
        return model.layer_cost("blk", strategy, micro_batch).activation_bytes
    from galvatron_fx.cost.grid_tp import layer_shape

    shape_ = layer_shape(model, model.model.layer("blk"), micro_batch / strategy.dp)
    return tp_terms(strategy, shape_).activation_bytes


def test_activation_memory_per_device_orderings():
    """Every grid mode keeps 1/P of what the layer saves (its gathered inputs and weights saved as their blocks,
    ``passes.lower.ops.regather``), so at equal P 2D, 2.5D and 3D keep the same, less than 1D, which replicates
    what lies outside its projections. The published orderings (activations O(1/q²), O(1/(d·q²)), O(1/q³)) are
    strict at an equal grid side q: 3D < 2.5D (1 < d < q) < 2D < 1D. While a projection computes, one gathered
    input is alive on top: 2.5D's rows hold fewer tokens than 2D's at equal P."""
    for P, grids in (
        (8, [grid(8, "3d"), grid(8, "2.5d", 2)]),
        (64, [grid(64, "3d"), grid(64, "2.5d", 4), grid(64, "2d")]),
    ):
        model = CostModel(profile(), uniform(P))
        one_d = activation(model, S(tp=P))
        assert {activation(model, s) for s in grids} == {activation(model, grids[0])} and activation(
            model, grids[0]
        ) < one_d
        assert {tp_terms(s, shape()).activation_bytes for s in grids} == {A / P}
    q = 4
    model = CostModel(profile(), uniform(q**3))
    ordered = [grid(q**3, "3d"), grid(2 * q * q, "2.5d", 2), grid(q * q, "2d"), S(tp=q * q)]
    kept = [activation(model, s) for s in ordered]
    assert kept == sorted(kept) and len(set(kept)) == 4
    two_d, two_half = (tp_terms(s, shape()).largest_gathered_bytes for s in (grid(64, "2d"), grid(64, "2.5d", 4)))
    assert two_half < two_d


def test_traffic_per_device_grows_with_p_under_1d_and_shrinks_under_grids():
    """At a fixed model and micro-batch: 1D all-reduces the whole [T, h] activation (2(P−1)/P of it per rank),
    2D and 3D move blocks of 1/q and 1/q² of it and 1/q, 1/q² of the weights."""
    volume = {s.short(): tp_terms(s, shape()).volume_bytes for s in [S(tp=p) for p in (2, 4, 8, 16, 64)]}
    one_d = [volume[f"tp{p}"] for p in (2, 4, 8, 16, 64)]
    assert one_d == sorted(one_d) and len(set(one_d)) == 5
    two_d = [tp_terms(grid(p, "2d"), shape()).volume_bytes for p in (4, 16, 64)]
    assert two_d == sorted(two_d, reverse=True) and len(set(two_d)) == 3
    three_d = [tp_terms(grid(p, "3d"), shape()).volume_bytes for p in (8, 64)]
    assert three_d[1] < three_d[0]
    two_half = [tp_terms(grid(p, "2.5d", 2), shape()).volume_bytes for p in (8, 32)]  # q = 2, 4 at d = 2
    assert two_half[1] < two_half[0]
    # at equal P, 2.5D moves smaller activation blocks than 2D (rows of T/(d·q) tokens) but larger weight blocks
    # (W/q² per rank, and the depth's all-reduce of them): it moves less where activations dominate
    for tokens, fewer in ((64 * T, True), (T, False)):
        two_half, two = (tp_terms(s, shape(tokens)).volume_bytes for s in (grid(16, "2.5d", 4), grid(16, "2d")))
        assert (two_half < two) == fewer


def test_search_with_grid_modes_equals_brute_force_on_the_real_cost_model():
    from galvatron_fx.passes.search.brute_force import all_plans, brute_force_search
    from galvatron_fx.passes.search.engine import search
    from galvatron_fx.passes.search.report import explain
    from galvatron_fx.passes.search.space import SearchSpace

    p = profile()
    p = dataclasses.replace(p, layer_types=["blk"] * 2, cut_bytes_per_sample=[SEQ * H * B] * 2)
    model = CostModel(p, Cluster.preset("A100-80GB", nodes=2, devices_per_node=4).hardware_profile())
    space = SearchSpace(
        global_batch=(16, 16, 1),
        chunks=(1,),
        sp_types=("none",),
        dp_types=("ddp",),
        disable_vsp=True,
        disable_tp_strided=True,
        pipelines=("1f1b",),
    )
    plans = list(all_plans(model, 8, space))
    assert {s.tp_mode for plan in plans for s in plan.layers} == {"1d", "2d", "2.5d", "3d"}
    chosen = set()
    # tightest: 3D (1/q³ of the weights); then 2D beside 3D, 2D beside tp4 dp2; loose: dp8
    for budget in (12 * 2**20, 14 * 2**20, 16 * 2**20, 64 * 2**20):
        expected, _ = brute_force_search(model, 8, budget, space)
        plan = search(model, 8, budget, space)
        assert plan.prediction.samples_per_s == pytest.approx(expected, rel=1e-9)
        assert plan.prediction.budgeted_bytes <= budget
        chosen |= {s.tp_mode for s in plan.layers}
    assert chosen == {"1d", "2d", "3d"}
    # --explain names the grid layers and what they send against 1D of the same degree (a budget string as the CLI
    # passes it)
    why = explain(search(model, 8, "14MiB", space), model, "14MiB", space)
    assert "[tp8-3d] sends" in why and "(1D tp8:" in why and "under the 14.00 MiB budget" in why
