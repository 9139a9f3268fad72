"""Cluster presets, detection from launcher environments, JSON, and the preset hardware profile."""

import json

import pytest

from galvatron_fx import Cluster
from galvatron_fx.cluster import PRESETS
from galvatron_fx.errors import ConfigError


def test_presets_have_datasheet_shape():
    for name in ("A100-40GB", "A100-80GB", "H100-80GB", "H200"):
        cluster = Cluster.preset(name, nodes=2, devices_per_node=8)
        assert cluster.world_size == 16
        assert cluster.peak_flops["bf16"] > cluster.sustained_flops["bf16"] > cluster.peak_flops["fp32"] / 2
        assert cluster.intra_node_Bps > cluster.inter_node_Bps  # NVLink beats one InfiniBand NIC
    assert Cluster.preset("A100-80GB").memory_bytes == 2 * Cluster.preset("A100-40GB").memory_bytes
    assert Cluster.preset("H200").memory_bytes > Cluster.preset("H100-80GB").memory_bytes
    assert Cluster.preset("H100-80GB").sustained_flops["bf16"] > Cluster.preset("A100-80GB").sustained_flops["bf16"]
    assert Cluster.preset("h100-80gb").device == "H100-80GB"
    with pytest.raises(ConfigError, match="unknown"):
        Cluster.preset("TPU-v9")


def test_detect_torchrun_and_slurm():
    torchrun = Cluster.detect({"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "RANK": "3"})
    assert (torchrun.nodes, torchrun.devices_per_node) == (2, 8)
    slurm = Cluster.detect({"SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4(x2)", "SLURM_NNODES": "2"})
    assert (slurm.nodes, slurm.devices_per_node) == (2, 4)
    nodes_only = Cluster.detect({"SLURM_NTASKS": "12", "SLURM_NNODES": "3"})
    assert (nodes_only.nodes, nodes_only.devices_per_node) == (3, 4)
    single = Cluster.detect({})
    assert single.world_size >= 1 and single.memory_bytes > 0
    with pytest.raises(ConfigError, match="not a multiple"):
        Cluster.detect({"WORLD_SIZE": "6", "LOCAL_WORLD_SIZE": "4"})
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        Cluster.detect({"WORLD_SIZE": "many"})


def test_json_round_trip_and_bad_units(tmp_path):
    cluster = Cluster.preset("H100-80GB", nodes=2).with_memory("36GB")
    assert cluster.memory_bytes == 36 * 10**9
    path = tmp_path / "cluster.json"
    cluster.save(path)
    assert Cluster.load(path) == cluster
    data = json.loads(path.read_text())
    data["memory_bytes"] = "36 parsecs"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as error:
        Cluster.load(path)
    assert str(path) in str(error.value) and "memory_bytes" in str(error.value) and "unknown units" in str(error.value)
    path.write_text(json.dumps({"preset": "A100-40GB", "nodes": 4, "memory_bytes": "30GiB"}))
    loaded = Cluster.load(path)
    assert (loaded.world_size, loaded.memory_bytes, loaded.device) == (32, 30 * 2**30, "A100-40GB")
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Cluster.load(path)
    with pytest.raises(ConfigError, match="does not exist"):
        Cluster.load(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="unknown units"):
        cluster.with_memory("12 bananas")


def test_preset_profile_prices_nvlink_and_infiniband():
    profile = Cluster.preset("H100-80GB", nodes=2, devices_per_node=8).hardware_profile()
    nbytes = 256 * 2**20
    # 8 consecutive ranks stay on one node (NVLink); 8 strided ranks span both nodes (InfiniBand)
    assert (
        profile.collective_s("all_reduce", nbytes, 8, True) < profile.collective_s("all_reduce", nbytes, 8, False) / 3
    )
    # the ring all-reduce moves twice what an all-gather moves
    ratio = profile.collective_s("all_reduce", nbytes, 4) / profile.collective_s("all_gather", nbytes, 4)
    assert 1.8 < ratio < 2.2
    assert profile.p2p_s(nbytes, 2) > profile.p2p_s(nbytes, 4)  # pp=2 neighbours are on different nodes
    assert profile.world_size == 16 and profile.memory_bytes == PRESETS["H100-80GB"].memory_bytes
