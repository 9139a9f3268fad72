"""The pass protocol (``passes.infra``): passes run in order, their conditions are checked when checks are
on, and a failure names the pass and the passes before it; the lowering and analysis pipelines are tuples a
caller can read and change."""

import pytest

from galvatron_fx.errors import PlanError
from galvatron_fx.passes.infra import Pass, PassFailure, run_passes


class Append(Pass[list]):
    def __init__(self, item):
        self.item = item

    def __call__(self, target, context):
        return [*target, self.item]


class NeedsEven(Pass[list]):
    def requires(self, target, context):
        if len(target) % 2:
            raise PassFailure(f"odd length {len(target)}")

    def __call__(self, target, context):
        return target

    def ensures(self, target, context):
        if context == "break":
            raise PassFailure("broken on purpose")


class RefusesThePlan(Pass[list]):
    def __call__(self, target, context):
        raise PlanError("the plan cannot run", "use another")


class Crashes(Pass[list]):
    def __call__(self, target, context):
        return 1 / 0


def test_passes_run_in_order_and_are_named_after_their_class():
    assert run_passes((Append(1), Append(2)), [], None) == [1, 2]
    assert NeedsEven().name == "needs_even" and repr(Append(1)) == "append"


def test_conditions_run_only_when_checks_are_on():
    assert run_passes((Append(1), NeedsEven()), [], None, check=False) == [1]
    with pytest.raises(PassFailure, match=r"pass needs_even failed after \[append\]: PassFailure: odd length 1"):
        run_passes((Append(1), NeedsEven()), [], None, check=True)
    with pytest.raises(PassFailure, match="broken on purpose"):
        run_passes((NeedsEven(),), [], "break", check=True)


def test_a_users_error_keeps_its_type_cause_and_remedy_and_names_the_pass():
    with pytest.raises(PlanError) as raised:
        run_passes((Append(1), Append(2), RefusesThePlan()), [], None)
    assert raised.value.cause == "the plan cannot run (in pass refuses_the_plan, after append, append)"
    assert raised.value.remedy == "use another"


def test_anything_else_is_a_pass_failure_with_the_history():
    with pytest.raises(PassFailure, match=r"pass crashes failed after \[append\]: ZeroDivisionError") as raised:
        run_passes((Append(1), Crashes()), [], None)
    assert isinstance(raised.value.__cause__, ZeroDivisionError)


def test_the_pipelines_are_ordered_tuples_of_passes():
    from galvatron_fx.passes.analysis.pipeline import ANALYSIS_PASSES
    from galvatron_fx.passes.lower.pipeline import LOWERING_PASSES

    assert [p.name for p in LOWERING_PASSES] == [
        "set_local_batches",
        "apply_tensor_parallel",
        "apply_sequence_parallel",
        "apply_vocab_parallel",
        "apply_layouts",
        "apply_random_streams",
        "check_shapes",
        "drop_metadata_asserts",
        "retarget_device",
        "apply_checkpointing",
    ]
    assert [p.name for p in ANALYSIS_PASSES] == [
        "mark_batched",
        "concretize",
        "simplify_attention_masks",
        "discover_layers",
        "localize_values",
        "split_layers",
        "annotate_nodes",
        "sum_layer_stats",
    ]


def test_a_caller_changes_the_lowering_pipeline():
    import torch

    import galvatron_fx
    from galvatron_fx.models import build_model
    from galvatron_fx.passes.lower.pipeline import LOWERING_PASSES, ApplyCheckpointing, ApplyTensorParallel, lower
    from galvatron_fx.passes.lower.stage import CheckpointedLayer
    from galvatron_fx.plan import LayerStrategy, Plan

    torch.manual_seed(0)
    model, batch = build_model("gpt2", batch=4, seq=12)
    program = galvatron_fx.capture(model, example_kwargs=batch)
    plan = Plan(world_size=2, layers=(LayerStrategy(tp=2, ckpt=True),) * len(program.body), global_batch=4)
    strict = tuple(
        ApplyTensorParallel(strict=True) if isinstance(p, ApplyTensorParallel) else p for p in LOWERING_PASSES
    )
    without_ckpt = tuple(p for p in strict if not isinstance(p, ApplyCheckpointing))
    stage = lower(program, plan, 0, passes=without_ckpt)
    assert not any(isinstance(m, CheckpointedLayer) for m in stage.layers.values())
