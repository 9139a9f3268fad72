"""Bad input and failures: plans that do not fit refuse before any collective; a rank that dies mid-step
makes the others stop with a clear error in bounded time; the spawner reports what failed."""

import time

import pytest
from distributed import bad_plans_worker, dying_rank_worker

from galvatron_fx.runtime import SpawnError, spawn


def test_plans_for_another_world_or_model_refuse_before_any_collective():
    started = time.monotonic()
    messages = spawn(bad_plans_worker, 2, collective_timeout_s=30)[0]
    assert time.monotonic() - started < 120
    assert len(messages) == 3, messages
    world, layers, name = messages
    assert (
        world.startswith("PlanError") and "world size 4, but 2 processes run" in world and "launch 4 processes" in world
    )
    assert layers.startswith("PlanError") and "7 layer strategies, but the model has 4 body layers" in layers
    assert name.startswith("PlanError") and "made for BertForMaskedLM, not GPT2LMHeadModel" in name


@pytest.mark.parametrize("recipe", ["pp2_1f1b", "dp2"])
def test_a_rank_dying_mid_step_stops_the_others_with_a_clear_error(recipe):
    started = time.monotonic()
    with pytest.raises(SpawnError) as caught:
        spawn(dying_rank_worker, 2, recipe, 1, collective_timeout_s=20, grace_s=30, timeout_s=240)
    elapsed = time.monotonic() - started
    message = str(caught.value)
    assert "(first: rank 1)" in message and "rank 1 exited with code 3" in message
    # rank 0 noticed by itself (its transfer or all-reduce failed) rather than being killed
    assert "rank 0 raised" in message and "DistributedFailure: rank 0 (stage 0) failed in step 1" in message
    assert elapsed < 120, f"took {elapsed:.0f} s"


def _raise_on_rank_1(rank, world_size):
    if rank == 1:
        raise ValueError("broken on purpose")
    return rank


def test_spawner_returns_results_and_reports_exceptions():
    assert spawn(_raise_on_rank_0_never, 2) == [0, 1]
    with pytest.raises(SpawnError, match=r"(?s)rank 1 raised:.*ValueError: broken on purpose"):
        spawn(_raise_on_rank_1, 2, grace_s=10)


def _raise_on_rank_0_never(rank, world_size):
    return rank
