"""The hardware profiler on gloo processes, the model profiler on GPT-2 small, fitted formulas, profile JSON."""

import json
import warnings

import pytest
import torch

from galvatron_fx import Cluster
from galvatron_fx.cli import main
from galvatron_fx.commands.profile_hardware import profile_and_save
from galvatron_fx.cost.hardware import COLLECTIVES, HardwareProfile
from galvatron_fx.cost.hardware_profiler import launch_local
from galvatron_fx.cost.layer_profiler import profile_model
from galvatron_fx.cost.model import CostModel
from galvatron_fx.cost.model_profile import ModelProfile
from galvatron_fx.cost.time_formula import TimeFormula, fit_time_formula
from galvatron_fx.errors import ProfileError
from galvatron_fx.models import build_model
from galvatron_fx.plan import LayerStrategy, Plan


def _options(**changes):
    return {"sizes": "16KiB,128KiB", "repeats": 1, "no_progress": True, **changes}


def test_hardware_profiler_on_two_gloo_processes(tmp_path):
    out = tmp_path / "hw.json"
    launch_local(profile_and_save, 2, "gloo", (str(out), _options()))
    profile = HardwareProfile.load(out, world_size=2)
    assert profile.backend == "gloo" and profile.device == "cpu"
    assert sorted(profile.collectives) == sorted(f"{op}/2/consecutive" for op in COLLECTIVES)
    assert set(profile.p2p) == {2} and profile.overlap_slowdown >= 1.0 and profile.flops_per_s["fp32"] > 0
    # the step probe: a Transformer block's throughput per dtype, its per-operator time, bf16's weight casts
    assert profile.flops_per_s["bf16"] > 0 and 0 <= profile.op_overhead_s < 1e-3
    assert 0 <= profile.autocast_cast_s_per_param < 1e-6
    assert all(fit.bandwidth_Bps > 0 and fit.latency_s >= 0 for fit in profile.collectives.values())
    assert (
        profile.compute_slowdown >= 1.0 and profile.optimizer_s_per_param > 0 and profile.blocking_collective_s >= 0.0
    )
    assert set(profile.blocking_by_group_s) == set(profile.blocking_growth_by_group) == {2}
    assert set(profile.sharded_units) == {"zero2/2", "zero3/2"}
    assert profile.sharded_unit_s("zero3", 2**20, 2) > 0  # FSDP2 did gather and reduce-scatter in place


@pytest.mark.full
def test_profile_hardware_command_on_four_processes(tmp_path):
    out = tmp_path / "hw4.json"
    assert main(["profile-hardware", "--nprocs", "4", "--out", str(out), "--no-progress"]) == 0
    profile = HardwareProfile.load(out, world_size=4)
    assert {"all_to_all/2/strided", "all_reduce/4/consecutive"} <= set(profile.collectives) and set(profile.p2p) == {
        2,
        4,
    }


def test_preset_command_and_bad_options(tmp_path, capsys):
    out = tmp_path / "preset.json"
    assert main(["profile-hardware", "--preset", "H200", "--nodes", "2", "--out", str(out)]) == 0
    assert HardwareProfile.load(out, world_size=16, device="H200").memory_bytes == Cluster.preset("H200").memory_bytes
    assert main(["profile-hardware", "--preset", "H200", "--memory", "36 apples", "--out", str(out)]) == 2
    assert "unknown units" in capsys.readouterr().err


def test_fit_recovers_batch_and_sequence_terms():
    def truth(b, s):
        return 1e-3 + 2e-4 * b + 3e-6 * b * s + 1e-8 * b * s * s

    samples = [(b, s, truth(b, s)) for b in (2, 4, 8) for s in (32, 64, 128)]
    formula = fit_time_formula(samples)
    assert formula(16, 256) == pytest.approx(truth(16, 256), rel=1e-6)
    assert str(formula.expr).count("b") == 3  # sympy expression in b and s
    assert TimeFormula.from_json(json.loads(json.dumps(formula.to_json()))) == formula
    linear = fit_time_formula([(b, 32, 5e-3 * b) for b in (2, 4, 8)])
    assert linear(10, 32) == pytest.approx(5e-2)


def test_model_profiler_on_gpt2(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        profile = profile_model(
            lambda b, s: build_model("gpt2", batch=b, seq=s),
            batches=(2, 4),
            seqs=(16, 32),
            warmup=1,
            repeats=1,
            progress=False,
        )
    assert profile.mode == "measured" and profile.device == "cpu" and profile.seq_length == 32
    assert len(profile.layer_types) == 4 and len(profile.types) == 1
    block = profile.types[profile.layer_types[0]]
    assert block.fwd(4, 32) > 0 and block.bwd(4, 32) > 0 and profile.epilogue.fwd(4, 32) > 0
    assert block.activation_bytes_per_sample[2] < block.activation_bytes_per_sample[1]
    assert len(profile.extra["measurements"][profile.layer_types[0]]["fwd"]) == 4  # 2 batches × 2 sequence lengths
    path = tmp_path / "model.json"
    profile.save(path)
    loaded = ModelProfile.load(path, device="cpu")
    assert loaded.types[profile.layer_types[0]].fwd(4, 32) == pytest.approx(block.fwd(4, 32))
    hardware = Cluster.preset("A100-40GB", devices_per_node=2).hardware_profile()
    prediction = CostModel(loaded, hardware).evaluate(
        Plan(world_size=2, layers=[LayerStrategy(dp=2)] * 4, global_batch=4)
    )
    assert prediction.samples_per_s > 0 and prediction.memory_bytes_per_stage[0] > 0
    with pytest.raises(ProfileError) as error:
        ModelProfile.load(path, device="H100-80GB")
    assert str(path) in str(error.value) and "device" in str(error.value)

    data = json.loads(path.read_text())
    del data["types"][profile.layer_types[0]]["ckpt_activation_bytes_per_sample"]
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError) as error:
        ModelProfile.load(path)
    assert str(path) in str(error.value) and f"types/{profile.layer_types[0]}" in str(error.value)
    path.write_text("[1, 2")
    with pytest.raises(ProfileError, match="not valid JSON"):
        ModelProfile.load(path)


def test_model_profiler_times_compiled_layers():
    """With ``compile_layers`` the profiler times what compiled training runs: the layers torch.compile'd
    (compiled in the warm-up), and says so in the profile."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        profile = profile_model(
            lambda b, s: build_model("gpt2", batch=b, seq=s),
            batches=(2,),
            seqs=(16,),
            warmup=1,
            repeats=1,
            progress=False,
            compile_layers=True,
        )
    block = profile.types[profile.layer_types[0]]
    assert profile.extra["compiled_layers"] is True and block.fwd(2, 16) > 0 and block.bwd(2, 16) > 0
    from galvatron_fx.cost.layer_profiler import time_layer

    with pytest.raises(ProfileError, match="warmup"):
        time_layer(None, [], torch.device("cpu"), warmup=0, compiled=True)
