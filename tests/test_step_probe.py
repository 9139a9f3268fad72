"""cost/step_probe.py and the counts the analytic profile prices with it: dispatched operators per layer,
parameters autocast casts, and how the cost model charges both."""

import dataclasses

import pytest
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from galvatron_fx import capture
from galvatron_fx.cluster import Cluster
from galvatron_fx.cost.hardware import AttentionFit, HardwareProfile
from galvatron_fx.cost.model import CostModel
from galvatron_fx.cost.model_profile import ModelProfile
from galvatron_fx.cost.step_probe import ProbeBlock, cast_param_count, measure_attention, measure_step_costs
from galvatron_fx.passes.analysis.annotate import ATTENTION_OPS, CPU_ATTENTION_FLOPS, DispatchCounter
from galvatron_fx.plan import LayerStrategy
from tests.tiny_hf import tiny_hf_model

OP_S, FLOPS_PER_S, CAST_S = 7e-6, 3e10, 2e-9


class _Bf16Seen(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.seen = self.seen or any(getattr(t, "dtype", None) == torch.bfloat16 for t in pytree.tree_leaves(out))
        return out


def _modelled_timer(cast_params: int):
    """A timer that runs ``run`` once and returns what a device with known figures would take: every operator
    OP_S, every FLOP 1 / FLOPS_PER_S, and a step under autocast CAST_S per cast parameter. The fit must give
    the figures back."""

    def timer(run) -> float:
        flops, ops, bf16 = (
            FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS),
            DispatchCounter(),
            _Bf16Seen(),
        )
        with flops, ops, bf16:
            run()
        return OP_S * ops.count + flops.get_total_flops() / FLOPS_PER_S + (CAST_S * cast_params if bf16.seen else 0)

    return timer


def test_probe_fit_gives_back_the_figures_of_the_device_that_ran_it():
    block = ProbeBlock(64, heads=4)
    costs = measure_step_costs(torch.device("cpu"), 64, _modelled_timer(cast_param_count(block)), seq=16)
    assert abs(costs.flops_per_s["fp32"] / FLOPS_PER_S - 1) < 1e-6
    assert abs(costs.op_overhead_s / OP_S - 1) < 1e-6
    # under autocast the probe dispatches its casts as operators too (each OP_S): those land in the cast figure
    assert CAST_S <= costs.autocast_cast_s_per_param < CAST_S + 100 * OP_S / cast_param_count(block)


def test_a_captured_model_counts_the_operators_its_eager_step_dispatches():
    model_class, config = tiny_hf_model("llama")
    torch.manual_seed(0)
    model = model_class(config)
    batch = {"input_ids": torch.randint(0, 128, (3, 12)), "labels": torch.randint(0, 128, (3, 12))}
    program = capture(model, example_kwargs={**batch, "use_cache": False})
    counted = sum(layer.stats.fwd_ops + layer.stats.bwd_ops for layer in program.layers)
    ops = DispatchCounter()
    with ops:
        model(**batch, use_cache=False).loss.backward()
    # the eager step also accumulates the gradients into .grad (one operator per parameter at most)
    assert counted <= ops.count <= counted + len(list(model.parameters()))
    assert counted > 10 * len(program.body)


def test_cast_counts_leave_out_indexed_embeddings_and_count_tied_heads_once():
    for name, tied in (("gpt2", True), ("llama", False)):
        model_class, config = tiny_hf_model(name)
        model = model_class(config)
        batch = {"input_ids": torch.randint(0, 128, (2, 12)), "labels": torch.randint(0, 128, (2, 12))}
        profile = ModelProfile.from_program(
            capture(model, example_kwargs={**batch, "use_cache": False}), flops_per_s=1e10, bf16_activations=False
        )
        vocab_weight = 128 * 64
        assert profile.prologue.autocast_cast_param_count == 0, name
        assert profile.epilogue.autocast_cast_param_count == vocab_weight, name  # the head, tied or not
        block = profile.layer(profile.layer_types[0])
        norms = sum(p.numel() for n, p in model.named_parameters() if "layers.0." in n or ".h.0." in n) - (
            block.autocast_cast_param_count
        )
        assert 0 < norms <= 4 * 64, (name, norms)  # only the norms' weights and biases are left out
        assert tied == (profile.tied_param_count > 0)


def test_cost_model_charges_operators_whole_per_tp_rank_and_casts_per_shard():
    model_class, config = tiny_hf_model("gpt2")
    model = model_class(config)
    batch = {"input_ids": torch.randint(0, 128, (4, 16)), "labels": torch.randint(0, 128, (4, 16))}
    program = capture(model, example_kwargs={**batch, "use_cache": False})
    hardware = Cluster.preset("A100-80GB", nodes=1).hardware_profile()
    hardware.flops_per_s = {"fp32": 1e10, "bf16": 4e10}
    hardware.op_overhead_s, hardware.autocast_cast_s_per_param = OP_S, CAST_S
    stats = program.body[0].stats
    fwd_ops_s = OP_S * stats.fwd_ops

    def forward_s(op_overhead_s: float, precision: str, strategy: LayerStrategy) -> float:
        profile = ModelProfile.from_program(
            program, flops_per_s=1e10, op_overhead_s=op_overhead_s, bf16_activations=False
        )
        return (
            CostModel(profile, hardware, mixed_precision=precision)
            .layer_cost(profile.layer_types[0], strategy, 8)
            .fwd_s
        )

    profile = ModelProfile.from_program(program, flops_per_s=1e10, bf16_activations=False)
    casts = profile.layer(profile.layer_types[0]).autocast_cast_param_count
    for strategy in (LayerStrategy(tp=1, dp=8), LayerStrategy(tp=2, dp=4)):
        # every TP rank dispatches every operator: the fixed part is not split
        assert abs(forward_s(OP_S, "fp32", strategy) - forward_s(0.0, "fp32", strategy) - fwd_ops_s) < 1e-12
    # bf16 makes the FLOPs 4x faster but not the operators, and adds half the casts of the weights (the other
    # half is the backward's)
    ddp = LayerStrategy(tp=1, dp=8)
    expected = fwd_ops_s + forward_s(0.0, "fp32", ddp) / 4 + CAST_S * casts / 2
    assert abs(forward_s(OP_S, "bf16", ddp) - expected) < 1e-12
    cost = CostModel(profile, hardware, mixed_precision="bf16")
    part = profile.layer(profile.layer_types[0])
    assert cost.cast_params(part, 1, 8, "ddp") == casts
    assert cost.cast_params(part, 2, 4, "ddp") == casts / 2  # a TP rank casts its shard of the weights
    assert cost.cast_params(part, 1, 8, "zero3") == casts / 8  # FSDP2 casts the shard before gathering it
    assert CostModel(profile, hardware, mixed_precision="fp32").cast_s_per_param == 0.0


# -- fused attention: counted apart, probed on its own line, priced on it --------------------------------------
ATTENTION_LINES = {
    "fwd/fp32": (4e-5, 6e10),
    "bwd/fp32": (1e-5, 5e10),
    "fwd/bf16": (3e-5, 9e10),
    "bwd/bf16": (2e-3, 1e9),
}


class _AttentionCalls(TorchDispatchMode):
    """Counts the fused attention kernels dispatched under it, by pass, and whether they ran in bf16."""

    def __init__(self):
        super().__init__()
        self.calls = {"fwd": 0, "bwd": 0}
        self.bf16 = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in ATTENTION_OPS:
            self.calls["bwd" if func.__name__.split(".")[0].endswith("_backward") else "fwd"] += 1
            self.bf16 = self.bf16 or args[0].dtype == torch.bfloat16
        return func(*args, **(kwargs or {}))


def _attention_timer(run) -> float:
    """What a device whose attention kernels follow ``ATTENTION_LINES`` takes for ``run``."""
    flops, calls = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS), _AttentionCalls()
    with flops, calls:
        run()
    dtype = "bf16" if calls.bf16 else "fp32"
    counts = flops.get_flop_counts()["Global"]
    total = 0.0
    for pass_, n in calls.calls.items():
        per_call_s, rate = ATTENTION_LINES[f"{pass_}/{dtype}"]
        pass_flops = sum(f for op, f in counts.items() if (str(op).endswith("_backward")) == (pass_ == "bwd"))
        total += n * per_call_s + pass_flops / rate if n else 0.0
    return total


def test_attention_probe_gives_back_each_pass_and_dtype_line():
    fits = measure_attention(torch.device("cpu"), _attention_timer, seq=16)
    assert sorted(fits) == sorted(ATTENTION_LINES)
    for key, (per_call_s, rate) in ATTENTION_LINES.items():
        assert fits[key].per_call_s == pytest.approx(per_call_s, rel=1e-6, abs=1e-12), key
        assert fits[key].flops_per_s == pytest.approx(rate, rel=1e-6), key


def test_capture_counts_attention_flops_and_calls_apart():
    model_class, config = tiny_hf_model("gpt2")
    model = model_class(config)
    batch, seq = 3, 10  # a head_dim (16) unlike the sequence
    ids = torch.randint(0, 128, (batch, seq))
    stats = capture(model, example_kwargs={"input_ids": ids, "labels": ids, "use_cache": False}).body[0].stats
    heads = config.n_head
    shape = (batch, heads, seq, config.n_embd // heads)
    assert stats.attention_calls == 1
    assert stats.fwd_attention_flops == sdpa_flop_count(shape, shape, shape)
    assert stats.bwd_attention_flops == sdpa_backward_flop_count(shape, shape, shape, shape)
    assert stats.fwd_attention_flops < stats.fwd_flops and stats.bwd_attention_flops < stats.bwd_flops


def test_cost_model_prices_attention_on_its_own_line_and_only_for_analytic_profiles():
    model_class, config = tiny_hf_model("gpt2")
    model = model_class(config)
    ids = torch.randint(0, 128, (4, 12))  # a sequence unlike the head dim (16)
    program = capture(model, example_kwargs={"input_ids": ids, "labels": ids, "use_cache": False})
    rate = 1e10
    profile = ModelProfile.from_program(program, flops_per_s=rate, bf16_activations=False)
    profile = ModelProfile.from_json_dict(profile.to_json_dict())  # what a saved profile prices
    hardware = Cluster.preset("A100-80GB", nodes=1).hardware_profile()
    hardware.flops_per_s = {"fp32": rate, "bf16": 4 * rate}
    lines = dataclasses.replace(
        hardware, attention={k: AttentionFit(*v) for k, v in ATTENTION_LINES.items() if k.endswith("bf16")}
    )
    lines = HardwareProfile.from_json_dict(lines.to_json_dict())  # the lines survive the file
    part = profile.layer(profile.layer_types[0])
    assert part.attention_calls == 1 and profile.priced_flops_per_s == rate
    for pass_ in ("fwd", "bwd"):
        per_call_s, attention_rate = ATTENTION_LINES[f"{pass_}/bf16"]
        for local, tp in ((8, 1), (8, 2), (2, 1)):
            with_lines, without = (
                CostModel(profile, hw, mixed_precision="bf16").compute_s(part, pass_, local, tp, 1.0)
                for hw in (lines, hardware)
            )
            flops = getattr(part, f"{pass_}_attention_flops_per_sample") * local / tp  # heads split over tp
            # the formula priced them at bf16's matmul rate; the line prices them per call and at its own rate
            expected = per_call_s + flops / attention_rate - flops / (4 * rate)
            assert with_lines - without == pytest.approx(expected, rel=1e-9), (pass_, local, tp)
        # fp32 has no line here: priced as before; a measured profile timed attention as it ran
        assert CostModel(profile, lines).compute_s(part, pass_, 8, 1, 1.0) == CostModel(profile, hardware).compute_s(
            part, pass_, 8, 1, 1.0
        )
        measured = dataclasses.replace(profile, mode="measured")
        assert CostModel(measured, lines, mixed_precision="bf16").attention_repriced_s(part, pass_, 8) == 0.0
