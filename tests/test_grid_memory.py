"""What a grid layer keeps for backward, measured on 8 gloo ranks: every tensor autograd saves in one training step,
counted once per storage (parameters left out), per body layer.

Grid layers save their gathered inputs and weights as blocks (passes/lower/ops/regather.py), so 2.5D (q 2, d 2) and
3D (q 2) keep what data parallelism over 8 keeps of the layer, 1/8 of one device's (up to what the row replicates:
norm statistics, attention masks), the same for both modes, and much less than 1D tp8, which replicates the
activations outside its projections. This is the cost model's ``TPTerms.activation_bytes`` (``A / P``). Under bf16
autocast the grids gather in bf16 and keep the same way, plus each weight block's cast."""

from __future__ import annotations

import warnings

import pytest
from distributed import GLOBAL_BATCH, _config, _program, optimizer_factory
from saved_memory import meter_body_layers

from galvatron_fx.plan import LayerStrategy, Plan

WORLD = 8
STRATEGIES = {
    "dp8": dict(dp=8),
    "1d": dict(tp=8, dp=1),
    "2.5d": dict(tp=8, dp=1, tp_mode="2.5d", tp_depth=2),
    "3d": dict(tp=8, dp=1, tp_mode="3d"),
}
RUNS = [(name, "fp32") for name in STRATEGIES] + [(name, "bf16") for name in ("1d", "2.5d", "3d")]


def kept_worker(rank: int, world_size: int, models: list[str]) -> dict[str, list[int]]:
    """Per model and strategy: the bytes each body layer keeps on this rank in one step."""
    from galvatron_fx.runtime import TrainConfig, Trainer

    warnings.simplefilter("ignore")
    out = {}
    for model_name in models:
        program, batches = _program(model_name)
        for name, precision in RUNS:
            layers = tuple(LayerStrategy(**STRATEGIES[name]) for _ in program.body)
            plan = Plan(
                world_size=world_size,
                layers=layers,
                global_batch=GLOBAL_BATCH,
                provenance={"model": program.model_name},
            )
            config = TrainConfig(lr=_config().lr, mixed_precision=precision)
            trainer = Trainer(
                program, plan, config=config, optimizer=optimizer_factory("sgd"), model_name=program.model_name
            )
            meters = meter_body_layers(trainer.stage)
            trainer.step(batches[0])
            out[f"{model_name}/{name}/{precision}"] = [meter.kept_bytes for meter in meters]
    return out


@pytest.fixture(scope="module")
def measured():
    from galvatron_fx.runtime import spawn

    cache = {}

    def get(fast: bool) -> list[dict]:
        if fast not in cache:
            cache[fast] = spawn(kept_worker, WORLD, ["llama", "bert"] if fast else ["gpt2", "vit"], timeout_s=900)
        return cache[fast]

    return get


@pytest.mark.parametrize(
    "fast,model",
    [
        pytest.param(True, "llama", id="llama"),
        pytest.param(True, "bert", id="bert"),
        pytest.param(False, "gpt2", id="gpt2", marks=pytest.mark.full),
        pytest.param(False, "vit", id="vit", marks=pytest.mark.full),
    ],
)
def test_grid_layers_keep_one_eighth_of_the_layer(measured, fast, model):
    per_rank = measured(fast)
    for rank, result in enumerate(per_rank):
        kept = {f"{name}/{precision}": result[f"{model}/{name}/{precision}"] for name, precision in RUNS}
        assert all(len(layers) == len(kept["dp8/fp32"]) > 0 and min(layers) > 0 for layers in kept.values()), kept
        assert kept["2.5d/fp32"] == kept["3d/fp32"], f"rank {rank}: {kept}"
        for grid, data in zip(kept["3d/fp32"], kept["dp8/fp32"]):
            assert data * 0.9 <= grid <= data * 1.25, f"rank {rank}: 3D keeps {grid} bytes, dp8 {data}"
        for grid, one_d in zip(kept["3d/fp32"], kept["1d/fp32"]):
            assert 2.5 * grid < one_d, f"rank {rank}: 3D keeps {grid} bytes, 1D tp8 {one_d}"
        # bf16 autocast: gathered in bf16 and saved as blocks too (less than fp32), and each weight block's cast
        # kept for backward: 3D's blocks (1/q³) are smaller than 2.5D's (1/q²)
        for three, half, three_fp32, one_d in zip(*(kept[k] for k in ("3d/bf16", "2.5d/bf16", "3d/fp32", "1d/bf16"))):
            assert three < half and three < three_fp32 and 2 * three < one_d, f"rank {rank}: {kept}"
