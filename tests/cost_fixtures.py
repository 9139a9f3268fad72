"""A synthetic model profile and a uniform cluster whose cost-model terms the cost tests compute by hand."""

from galvatron_fx.cost.hardware import COLLECTIVES, CommFit, HardwareProfile
from galvatron_fx.cost.layer_type_profile import LayerTypeProfile
from galvatron_fx.cost.model_profile import ModelProfile
from galvatron_fx.cost.time_formula import TimeFormula

BW = 1e9  # every link: 1 GB/s, no latency, so each collective costs nbytes / 1e9 s


def per_sample(seconds: float) -> TimeFormula:
    return TimeFormula(((1, 0, seconds),))


def synthetic_profile(seq: int = 64) -> ModelProfile:
    block = LayerTypeProfile(
        "blk",
        per_sample(1e-3),
        per_sample(2e-3),
        param_count=1_000_000,
        activation_bytes_per_sample={1: 8000, 2: 5000, 4: 3500},
        ckpt_activation_bytes_per_sample=1000,
        boundary_bytes_per_sample=1000,
        num_heads=12,
    )
    prologue = LayerTypeProfile(
        "prologue", TimeFormula(), TimeFormula(), 500_000, {1: 1000, 2: 600}, 0, 1000, vocab_param_count=400_000
    )
    epilogue = LayerTypeProfile(
        "epilogue", per_sample(5e-4), per_sample(1e-3), 400_000, {1: 4000, 2: 2000}, 0, 1000, vocab_param_count=400_000
    )
    return ModelProfile(
        "synthetic", ["blk"] * 4, {"blk": block}, prologue, epilogue, [1000] * 4, seq, 256, 12, mode="measured"
    )


def uniform_hardware(world: int = 8) -> HardwareProfile:
    collectives = {
        f"{op}/{g}/{layout}": CommFit(0.0, BW)
        for op in COLLECTIVES
        for g in (2, 4, 8)
        for layout in ("consecutive", "strided")
    }
    return HardwareProfile(
        world, 8, "test", 80 * 2**30, collectives, {2: CommFit(0.0, BW), 4: CommFit(0.0, BW)}, 1.25, {"fp32": 1e12}
    )
