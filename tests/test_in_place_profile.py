"""Layers timed in place (cost/in_place_profiler.py): the profiler on gloo processes, the JSON, and how the
cost model prices a layer, the embedding and the head with those times."""

import dataclasses
import functools

import pytest
from cost_fixtures import per_sample, synthetic_profile, uniform_hardware

from galvatron_fx.cli import main
from galvatron_fx.cost.in_place_profiler import measure_in_place, running_mean, tp_degrees
from galvatron_fx.cost.model import CostModel
from galvatron_fx.cost.model_profile import ModelProfile
from galvatron_fx.cost.time_formula import fit_time_formula
from galvatron_fx.errors import ProfileError
from galvatron_fx.models import build_model
from galvatron_fx.plan import EmbeddingStrategy
from galvatron_fx.plan import LayerStrategy as S

BLOCK = {1: (per_sample(3e-3), per_sample(5e-3)), 2: (per_sample(4e-3), per_sample(7e-3))}
HEAD = {1: (per_sample(2e-3), per_sample(6e-3))}


def _hardware(world: int, slowdown: float):
    return dataclasses.replace(uniform_hardware(world), compute_slowdown=slowdown)


def _in_place_model(world: int = 8, slowdown: float = 2.0, mode: str = "measured") -> CostModel:
    """The synthetic profile with in-place times taken on 8 processes."""
    profile = synthetic_profile()
    block = dataclasses.replace(profile.types["blk"], in_place_times={8: BLOCK})
    epilogue = dataclasses.replace(profile.epilogue, in_place_times={8: HEAD})
    profile = dataclasses.replace(profile, types={"blk": block}, epilogue=epilogue, mode=mode)
    return CostModel(profile, _hardware(world, slowdown))


def test_in_place_times_replace_a_layers_compute_and_tp_collectives():
    model = _in_place_model()
    tp2 = model.layer_cost("blk", S(tp=2, dp=4), micro_batch=16)  # 4 samples per TP group
    assert (tp2.fwd_s, tp2.bwd_s) == pytest.approx((16e-3, 28e-3))
    dp = model.layer_cost("blk", S(tp=1, dp=8), micro_batch=16)  # 2 samples per rank
    assert (dp.fwd_s, dp.bwd_s) == pytest.approx((6e-3, 10e-3))
    checkpointed = model.layer_cost("blk", S(tp=2, dp=4, ckpt=True), micro_batch=16)
    assert checkpointed.bwd_s == pytest.approx(28e-3 + 16e-3)  # the forward again, collectives included
    # taken with every rank computing (2x slower than alone): a pipeline's idle share lessens the contention
    for share, contention in ((0.75, 1.5), (0.4, 1.0)):
        piped = model.layer_cost("blk", S(tp=2, dp=4), micro_batch=16, busy_share=share)
        assert piped.fwd_s == pytest.approx(16e-3 * contention / 2)


def test_layers_without_an_in_place_time_keep_the_composed_terms():
    composed = CostModel(synthetic_profile(), _hardware(8, 2.0))
    for strategy in (S(tp=4, dp=2), S(tp=2, dp=4, sp="megatron")):  # no time for tp 4; SP is not what was timed
        assert _in_place_model().layer_cost("blk", strategy, 16) == composed.layer_cost("blk", strategy, 16)
    on_four = CostModel(synthetic_profile(), _hardware(4, 2.0))  # timed on 8 processes only
    assert _in_place_model(world=4).layer_cost("blk", S(tp=2, dp=2), 16) == on_four.layer_cost("blk", S(tp=2, dp=2), 16)
    analytic = dataclasses.replace(synthetic_profile(), mode="analytic")  # only measured profiles hold them
    assert _in_place_model(mode="analytic").layer_cost("blk", S(tp=2, dp=4), 16) == CostModel(
        analytic, _hardware(8, 2.0)
    ).layer_cost("blk", S(tp=2, dp=4), 16)


def test_the_head_uses_its_in_place_time_without_vocab_tp():
    model = _in_place_model()
    head = model.embedding_cost(EmbeddingStrategy(), 8, 16, first_stage=False, last_stage=True)
    assert (head.fwd_s, head.bwd_s) == pytest.approx((4e-3, 12e-3))  # 2 samples per rank
    composed = CostModel(synthetic_profile(), _hardware(8, 2.0))  # vocab TP was not timed in place
    vocab_tp = EmbeddingStrategy(vtp=2)
    assert model.embedding_cost(vocab_tp, 8, 16, first_stage=False, last_stage=True) == composed.embedding_cost(
        vocab_tp, 8, 16, first_stage=False, last_stage=True
    )


def test_in_place_times_survive_json_and_older_files_load_without_them(tmp_path):
    profile = _in_place_model().model
    path = tmp_path / "profile.json"
    profile.save(path)
    loaded = ModelProfile.load(path)
    assert loaded.types["blk"].in_place_times == {8: BLOCK} and loaded.epilogue.in_place_times == {8: HEAD}
    assert loaded.prologue.in_place_times == {}
    text = path.read_text().replace('"in_place_times"', '"unused_key"')
    path.write_text(text)
    assert ModelProfile.load(path).types["blk"].in_place_times == {}


def test_tp_degrees_divide_the_world_and_the_heads():
    assert tp_degrees(4, 12) == [1, 2, 4]
    assert tp_degrees(8, 6) == [1, 2]
    assert tp_degrees(6, 0) == [1, 2]
    assert tp_degrees(1, 12) == [1]


def test_profile_model_times_each_degree_on_gloo_processes(tmp_path, capsys):
    """``profile-model --in-place 2``: two processes time GPT-2's block at TP 1 and 2, and the embedding and
    head at TP 1, at the samples a TP group runs; each stored fit is that of the slowest rank's points."""
    out = tmp_path / "gpt2.json"
    assert (
        main(
            [
                "profile-model",
                "gpt2",
                "--batches",
                "2,4",
                "--seqs",
                "16",
                "--repeats",
                "1",
                "--in-place",
                "2",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert "in place on 2 processes: tp 1" in capsys.readouterr().out
    profile = ModelProfile.load(out)
    block_type = profile.layer_types[0]
    block = profile.types[block_type]
    assert set(block.in_place_times) == {2} and set(block.in_place_times[2]) == {1, 2}
    assert set(profile.prologue.in_place_times[2]) == set(profile.epilogue.in_place_times[2]) == {1}
    points = profile.extra["in_place_measurements"]["2"][block_type]
    assert [p[0] for p in points["1"]] == [2, 4] and [p[0] for p in points["2"]] == [4, 8]
    for tp, (fwd, bwd) in block.in_place_times[2].items():
        assert all(seq == profile.seq_length and fwd_s > 0 and bwd_s > 0 for _, seq, fwd_s, bwd_s in points[str(tp)])
        for formula, column in ((fwd, 2), (bwd, 3)):  # the stored fit is the fit of the stored (slowest) points
            refit = fit_time_formula([(p[0], p[1], p[column]) for p in points[str(tp)]])
            assert [t[:2] for t in formula.terms] == [t[:2] for t in refit.terms]
            assert [t[2] for t in formula.terms] == pytest.approx([t[2] for t in refit.terms])
    build = functools.partial(build_model, "gpt2", "small")
    with pytest.raises(ProfileError, match="two sizes"):
        measure_in_place(profile, build, 2, samples_per_rank=(2, 2))
    assert main(["profile-model", "gpt2", "--mode", "analytic", "--in-place", "2", "--out", str(out)]) == 2


def test_passes_taken_apart_are_averaged_point_by_point():
    stored = [[2, 64, 0.010, 0.020], [4, 64, 0.020, 0.040]]  # as JSON gives them back: the mean of 3 passes
    new = [(2, 64, 0.014, 0.028), (4, 64, 0.024, 0.036)]
    mean = running_mean(stored, new, passes=3)
    assert mean == [
        (2, 64, pytest.approx(0.011), pytest.approx(0.022)),
        (4, 64, pytest.approx(0.021), pytest.approx(0.039)),
    ]
    with pytest.raises(ProfileError, match="other sizes"):
        running_mean(stored, [(2, 64, 0.01, 0.02), (8, 64, 0.02, 0.04)], passes=1)
