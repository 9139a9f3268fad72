"""Galvatron's LLaMA-2-7B profile set loads into our objects, and the cost model evaluates its strategy."""

import json
import shutil
from pathlib import Path

import pytest

from galvatron_fx.cost.galvatron_import import load_hardware, load_model
from galvatron_fx.cost.model import CostModel
from galvatron_fx.errors import ConfigError, ProfileError
from galvatron_fx.plan import LayerStrategy, Plan

FIXTURE = Path(__file__).parent / "fixtures" / "galvatron-llama2-7b"
STRATEGY = FIXTURE / "galvatron_config_llama2-7b_1nodes_8gpus_per_node_36GB_bf16.json"
GALVATRON_ESTIMATE = 14.73  # samples/s, Galvatron 3.0's own search on these files (fixture README)


def test_hardware_files_load():
    hw = load_hardware(FIXTURE)
    assert hw.world_size == 8 and hw.devices_per_node == 8 and hw.overlap_slowdown == pytest.approx(1.1255, abs=1e-3)
    # 154.203 GB/s bus bandwidth over 8 ranks → algorithm bandwidth 154.203·8/14 GB/s
    assert hw.fit("all_reduce", 8).bandwidth_Bps == pytest.approx(154.203e9 * 8 / 14)
    assert hw.fit("all_reduce", 2, consecutive=False).bandwidth_Bps == pytest.approx(151.344e9)
    # all-to-all from sp_time: 1024 MB over 8 ranks took 4.8151 ms
    assert hw.collective_s("all_to_all", 1024 * 2**20, 8) == pytest.approx(4.8151e-3, rel=0.1)
    assert hw.p2p_s(1e9, 4) == pytest.approx(1 / 138.581)


def test_model_files_load():
    model = load_model(FIXTURE)
    assert (
        model.layer_types == ["0"] * 32 and model.seq_length == 2048 and model.num_heads == 32 and model.dtype == "bf16"
    )
    layer = model.types["0"]
    assert layer.param_count == pytest.approx(202e6, rel=0.02)  # 4·4096² + 3·4096·11008
    assert (
        layer.activation_bytes_per_sample[1]
        > layer.activation_bytes_per_sample[8]
        > layer.ckpt_activation_bytes_per_sample
    )
    # layertype_0_bsz8_seq2048 = 3.937 ms per sample of forward
    assert layer.fwd(8, 2048) == pytest.approx(8 * 3.937e-3, rel=0.02)
    assert layer.bwd(8, 2048) == pytest.approx(2 * layer.fwd(8, 2048))
    assert model.prologue.param_count == pytest.approx(32000 * 4096, rel=0.02)


def test_cost_model_evaluates_galvatron_strategy():
    model = CostModel(load_model(FIXTURE), load_hardware(FIXTURE, memory_bytes=36 * 10**9), mixed_precision="bf16")
    plan = Plan.load(STRATEGY, world_size=8)
    prediction = model.evaluate(plan)
    # not the same model as Galvatron's, but the same hardware and profile: the same ballpark
    assert 0.5 * GALVATRON_ESTIMATE < prediction.samples_per_s < 2 * GALVATRON_ESTIMATE
    assert prediction.memory_bytes_per_stage[0] < 36 * 10**9  # Galvatron's plan fits its 36 GB budget in ours too
    # the same plan without checkpointing must need more memory and less time
    no_ckpt = Plan(
        world_size=8,
        layers=[LayerStrategy(**{**item.__dict__, "ckpt": False}) for item in plan.layers],
        global_batch=16,
        embedding=plan.embedding,
    )
    assert model.evaluate(no_ckpt).memory_bytes_per_stage[0] > prediction.memory_bytes_per_stage[0]
    assert model.evaluate(no_ckpt).iteration_time_s < prediction.iteration_time_s
    with pytest.raises(ProfileError) as error:
        model.evaluate(Plan(world_size=4, layers=[LayerStrategy(dp=4)] * 32, global_batch=16))
    assert "allreduce_bandwidth_1nodes_8gpus_per_node.json" in str(error.value) and "world_size" in str(error.value)


@pytest.fixture
def copy(tmp_path):
    target = tmp_path / "profiles"
    shutil.copytree(FIXTURE, target)
    return target


def test_missing_and_corrupt_files_name_file_and_key(copy):
    (copy / "overlap_coefficient.json").write_text('{"overlap": 1.1}')
    with pytest.raises(ProfileError) as error:
        load_hardware(copy)
    assert "overlap_coefficient.json" in str(error.value) and "overlap_coe" in str(error.value)
    (copy / "p2p_bandwidth_1nodes_8gpus_per_node.json").write_text("{ corrupt")
    with pytest.raises(ProfileError, match="p2p_bandwidth_1nodes_8gpus_per_node.json is not valid JSON"):
        load_hardware(copy)
    (copy / "p2p_bandwidth_1nodes_8gpus_per_node.json").unlink()
    with pytest.raises(ProfileError, match="no p2p bandwidth file"):
        load_hardware(copy)
    memory = copy / "memory_profiling_bf16_llama2-7b_all.json"
    data = json.loads(memory.read_text())
    del data["layertype_0_sp"]["2048"]["tp_activation_per_bsz_dict"]["checkpoint"]
    memory.write_text(json.dumps(data))
    with pytest.raises(ProfileError) as error:
        load_model(copy)
    assert str(memory) in str(error.value) and "tp_activation_per_bsz_dict" in str(error.value)
    memory.unlink()
    with pytest.raises(ProfileError, match="memory_profiling_bf16_llama2-7b_all.json does not exist"):
        load_model(copy)
    with pytest.raises(ProfileError, match="does not exist"):
        load_hardware(copy / "nowhere")
    with pytest.raises(ConfigError, match="unknown units"):
        load_hardware(FIXTURE, memory_bytes="36 parsecs")
    assert load_hardware(FIXTURE, memory_bytes="36GB").memory_bytes == 36 * 10**9
