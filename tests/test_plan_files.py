"""Plan files a user edits by hand: every malformed value is a PlanError that names the file and the key,
never a value read the wrong way (``"ckpt": "false"`` is not true, 2.5 micro-batches are not 2)."""

from __future__ import annotations

import json

import pytest

from galvatron_fx.errors import PlanError
from galvatron_fx.plan import LayerStrategy, Plan


def _ours() -> dict:
    return Plan(world_size=2, layers=(LayerStrategy(dp=2),) * 3, chunks=2, global_batch=8).to_json_dict()


def _galvatron() -> dict:
    data = _ours()
    del data["galvatron_fx"]
    return data


def _edit(data: dict, path: tuple, value) -> dict:
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return data


CASES = [
    ("galvatron_fx section a list", _ours, ("galvatron_fx",), [1, 2], "'galvatron_fx' is a list"),
    ("fractional chunks", _ours, ("chunks",), 2.5, "'chunks'"),
    ("fractional batch as text", _ours, ("global_bsz",), "7.5", "'global_bsz'"),
    ("batch as a boolean", _ours, ("global_bsz",), True, "'global_bsz'"),
    ("ckpt as a string", _ours, ("galvatron_fx", "layers", 0, "ckpt"), "false", "ckpt='false' is not a boolean"),
    ("tp_consecutive as a number", _ours, ("galvatron_fx", "layers", 1, "tp_consecutive"), 1, "tp_consecutive=1"),
    (
        "grad sync as a string",
        _ours,
        ("galvatron_fx", "grad_sync_every_micro_batch"),
        "no",
        "'grad_sync_every_micro_batch'",
    ),
    ("Galvatron checkpoint flag 2", _galvatron, ("checkpoint",), "0,2,0", "'checkpoint' has values [2]"),
    ("Galvatron zero3 flags as words", _galvatron, ("dp_types_enc",), "yes,no,no", "'dp_types_enc'"),
    ("Galvatron sp flag -1", _galvatron, ("use_sp",), "0,-1,0", "'use_sp' has values [-1]"),
    ("Galvatron vsp as a word", _galvatron, ("vsp",), "false", "'vsp'"),
    ("Galvatron pipeline type unknown", _galvatron, ("pipeline_type",), "zero_bubble", "'pipeline_type'"),
    ("tp_mode unknown", _ours, ("galvatron_fx", "layers", 0, "tp_mode"), "4d", "tp_mode='4d' is unknown"),
    ("tp_depth without 2.5d", _ours, ("galvatron_fx", "layers", 0, "tp_depth"), 2, "tp_depth=2"),
]


@pytest.mark.parametrize("name,make,path,value,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_values_name_the_file_and_the_key(tmp_path, name, make, path, value, expected):
    file = tmp_path / "plan.json"
    file.write_text(json.dumps(_edit(make(), path, value)))
    with pytest.raises(PlanError) as raised:
        Plan.load(file, world_size=2)
    assert str(file) in str(raised.value) and expected in str(raised.value), str(raised.value)


def test_good_files_still_load(tmp_path):
    for make in (_ours, _galvatron):
        file = tmp_path / "plan.json"
        file.write_text(json.dumps(make()))
        plan = Plan.load(file, world_size=2)
        assert plan.chunks == 2 and plan.global_batch == 8 and len(plan.layers) == 3
    file.write_text(json.dumps(_edit(_galvatron(), ("global_bsz",), 8.0)))  # an integral float is a whole number
    assert Plan.load(file, world_size=2).global_batch == 8


def test_grid_layers_round_trip_and_keep_galvatrons_keys(tmp_path):
    layers = (
        LayerStrategy(tp=8, tp_mode="2.5d", tp_depth=2),
        LayerStrategy(tp=8, tp_mode="3d", ckpt=True),
        LayerStrategy(tp=4, dp=2, tp_mode="2d", dp_type="zero3"),
        LayerStrategy(tp=2, dp=4),
    )
    plan = Plan(world_size=8, layers=layers, global_batch=16)
    file = tmp_path / "plan.json"
    plan.save(file)
    assert Plan.load(file).layers == layers
    data = json.loads(file.read_text())
    assert data["tp_sizes_enc"] == "8,8,4,2"  # Galvatron reads the degrees; the modes are ours alone
    assert [layer["tp_mode"] for layer in data["galvatron_fx"]["layers"]] == ["2.5d", "3d", "2d", "1d"]
    # a grid the degree cannot form is refused with the file named
    data["galvatron_fx"]["layers"][2]["tp_mode"] = "3d"
    file.write_text(json.dumps(data))
    with pytest.raises(PlanError, match="tp=4 is no 3d grid") as raised:
        Plan.load(file)
    assert str(file) in str(raised.value)
