"""The profile → search → train chain from our own measurements: profile-hardware on 2 gloo processes (a quick
pass), profile-model of GPT-2 small on one process, the search they print as the next command (the plan's
provenance names both files with their sha256), and that plan trained under torchrun. Profiles and plans
made for another world size, device, model, sequence length or precision are refused, naming file and key."""

import contextlib
import hashlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from galvatron_fx import Cluster
from galvatron_fx.capture import capture
from galvatron_fx.cli import main
from galvatron_fx.compile import build_cost_model
from galvatron_fx.cost.hardware import HardwareProfile
from galvatron_fx.cost.model_profile import ModelProfile
from galvatron_fx.cost.profile_checks import device_kind, profile_record
from galvatron_fx.errors import PlanError, ProfileError
from galvatron_fx.models import build_model
from galvatron_fx.passes.search.engine import search
from galvatron_fx.passes.search.space import SearchSpace
from galvatron_fx.plan import LayerStrategy, Plan
from galvatron_fx.plan_sources import PlanSettings, check_plan_settings

SEQ, BATCH, WORLD = 16, 4, 2
HARDWARE, MODEL = "hardware_profile.json", "model_profile.json"  # the commands' default --out names


def _sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _run(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(argv)
    return status, out.getvalue()


def _next_command(printed: str) -> list[str]:
    line = next(line for line in printed.splitlines() if line.startswith("next: "))
    return shlex.split(line.removeprefix("next: "))


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Run as a user would, in one folder with the commands' default file names: profile-hardware, then
    profile-model, then the search command profile-model prints. The folder and what each command printed."""
    folder = tmp_path_factory.mktemp("chain")
    before = os.getcwd()
    os.chdir(folder)
    try:
        hardware = ["profile-hardware", "--nprocs", str(WORLD), "--sizes", "16KiB,64KiB", "--repeats", "1"]
        status, hardware_out = _run([*hardware, "--no-progress"])
        assert status == 0, hardware_out
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = ["profile-model", "gpt2", "--batches", "2,4", "--seqs", str(SEQ), "--repeats", "1"]
            status, model_out = _run([*model, "--no-progress"])
            assert status == 0, model_out
            command = _next_command(model_out)
            assert command[:2] == ["galvatron-fx", "search"], model_out
            status, search_out = _run([*command[1:], "--batch", str(BATCH), "--out", "plan.json", "--quiet"])
            assert status == 0, search_out
    finally:
        os.chdir(before)
    return {"folder": folder, "hardware": hardware_out, "model": model_out, "search": search_out}


@pytest.fixture(scope="module")
def program():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, batch = build_model("gpt2", batch=2, seq=SEQ)
        return capture(model, example_kwargs=batch)


def _cpu_cluster(world: int) -> Cluster:
    return Cluster.detect({"WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world)})


def test_profilers_print_readable_figures_and_the_next_command(chain):
    hardware, model = chain["hardware"], chain["model"]
    assert f"wrote {HARDWARE}: {WORLD} gloo processes on cpu" in hardware
    # latency in readable units (a fit's latency may be 0 ns or whole milliseconds on shared cores) + bandwidth
    assert re.search(r"all_reduce +over 2 \(consecutive\): [\d.]+ (ns|µs|ms|s) \+ [\d.]+ GB/s", hardware), hardware
    assert f"next: galvatron-fx profile-model MODEL --out {MODEL}" in hardware  # no model profile there yet
    assert f"then: galvatron-fx search MODEL --hardware-profile {HARDWARE} --model-profile {MODEL}" in hardware
    assert f"wrote {MODEL}: gpt2 (measured on cpu, fp32), 4 body layers of 1 type, sequence length {SEQ}" in model
    assert " ms " in model or " µs " in model
    assert not any(raw in model for raw in ("*b", "b*", "Float", "e-0")), model  # no sympy, no raw floats
    # the hardware profile is there now: the next command is the search with both
    expected = f"galvatron-fx search gpt2 --size small --hardware-profile {HARDWARE} --model-profile {MODEL}"
    assert f"next: {expected}" in model
    assert (
        f"priced from hardware profile {HARDWARE}, model profile {MODEL}; sequence length {SEQ}, fp32"
        in (chain["search"])
    )


def test_the_plan_records_what_it_was_searched_for(chain):
    folder = chain["folder"]
    plan = Plan.load(folder / "plan.json")
    provenance = plan.provenance
    assert provenance["hardware_profile"] == {"path": HARDWARE, "sha256": _sha256(folder / HARDWARE)}
    assert provenance["model_profile"] == {"path": MODEL, "sha256": _sha256(folder / MODEL)}
    # the size and the precision (a measured profile's: fp32) came from the model profile, the cluster from
    # the hardware profile
    assert provenance["seq"] == SEQ and provenance["mixed_precision"] == "fp32" and provenance["device"] == "cpu"
    assert provenance["cluster"] == f"1x{WORLD} cpu" and provenance["model"] == "GPT2LMHeadModel"
    assert plan.world_size == WORLD and plan.global_batch == BATCH
    # through JSON and back
    again = Plan.from_json_dict(json.loads(json.dumps(plan.to_json_dict())))
    assert again.provenance == provenance and again == plan
    # a loaded profile left unchanged hashes as its file
    assert profile_record(ModelProfile.load(folder / MODEL))["sha256"] == _sha256(folder / MODEL)
    assert profile_record(HardwareProfile.load(folder / HARDWARE))["sha256"] == _sha256(folder / HARDWARE)
    assert check_plan_settings(plan, path=folder / "plan.json") == PlanSettings(SEQ, "fp32", BATCH, WORLD)


def test_the_cost_model_reads_the_measured_hardware_profile(chain, program):
    path = chain["folder"] / HARDWARE
    cluster = _cpu_cluster(WORLD)
    datasheet = build_cost_model(program, cluster, "analytic", "fp32")
    measured = build_cost_model(program, cluster, "analytic", "fp32", hardware_profile=str(path))
    loaded = HardwareProfile.load(path)
    assert measured.hardware.source == str(path) and measured.hardware.backend == "gloo"
    nbytes = 2**20
    assert measured.hardware.collective_s("all_reduce", nbytes, 2) == loaded.collective_s("all_reduce", nbytes, 2)
    assert loaded.collective_s("all_reduce", nbytes, 2) != datasheet.hardware.collective_s("all_reduce", nbytes, 2)
    plan = Plan(world_size=WORLD, layers=(LayerStrategy(dp=WORLD),) * len(program.body), global_batch=BATCH)
    assert measured.evaluate(plan).iteration_time_s != datasheet.evaluate(plan).iteration_time_s
    space = SearchSpace(global_batch=(BATCH, BATCH, 1))
    plans = [search(cost_model, WORLD, "8GiB", space) for cost_model in (datasheet, measured)]
    assert plans[0].prediction.iteration_time_s != plans[1].prediction.iteration_time_s
    # a loaded profile object serves as well as its path
    assert build_cost_model(program, cluster, hardware_profile=loaded).evaluate(plan) == measured.evaluate(plan)


def test_profiles_made_for_another_run_are_refused(chain, program, tmp_path, capsys):
    folder = chain["folder"]
    hardware, model = str(folder / HARDWARE), folder / MODEL
    cases = {
        "world_size": dict(cluster=_cpu_cluster(4), hardware_profile=hardware),
        "device": dict(cluster=Cluster.preset("A100-80GB", 1, WORLD), hardware_profile=hardware),
    }
    for key, options in cases.items():
        with pytest.raises(ProfileError) as error:
            build_cost_model(program, options["cluster"], hardware_profile=options["hardware_profile"])
        assert hardware in str(error.value) and f"key {key}" in str(error.value), error.value

    def edited(name: str, change) -> str:
        data = json.loads(model.read_text())
        change(data)
        path = tmp_path / name
        path.write_text(json.dumps(data))
        return str(path)

    def drop_layer(data):
        data["layer_types"].pop(), data["cut_bytes_per_sample"].pop()

    cluster = _cpu_cluster(WORLD)
    refused = {
        "seq_length": (edited("seq32.json", lambda d: d.update(seq_length=32)), cluster, "fp32", "32"),
        "dtype": (str(model), cluster, "bf16", "bf16"),
        "device": (str(model), Cluster.preset("A100-80GB", 1, WORLD), "fp32", "A100-80GB"),
        "layer_types": (edited("layers.json", drop_layer), cluster, "fp32", "3 body layers"),
    }
    for key, (path, on, precision, value) in refused.items():
        with pytest.raises(ProfileError) as error:
            build_cost_model(program, on, path, precision)
        message = str(error.value)
        assert path in message and f"key {key}" in message and value in message, message
    # a file that does not record its precision is not refused on it, and is not given one when saved again
    unrecorded = edited("no_dtype.json", lambda d: d.pop("dtype"))
    assert build_cost_model(program, cluster, unrecorded, "bf16").mixed_precision == "bf16"
    assert "dtype" not in ModelProfile.load(unrecorded).to_json_dict()
    assert device_kind("NVIDIA H100 80GB HBM3") == device_kind("H100-80GB") != device_kind("H200")

    # from the command line: the error names the file and the key
    argv = ["search", "gpt2", "--hardware-profile", hardware, "--model-profile", str(model), "--seq", "32"]
    assert main([*argv, "--batch", str(BATCH), "--out", str(tmp_path / "plan.json"), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert str(model) in error and "key seq_length is 16" in error and "32" in error, error


def test_plan_settings_are_taken_from_the_plan_or_refused(tmp_path):
    layers = (LayerStrategy(dp=2),) * 4
    plan = Plan(world_size=2, layers=layers, global_batch=8, provenance={"seq": 64, "mixed_precision": "bf16"})
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = Plan.load(path)
    assert check_plan_settings(loaded, path=path) == PlanSettings(64, "bf16", 8, 2)
    assert check_plan_settings(loaded, seq=64, mixed_precision="bf16", global_batch=8, world_size=2, path=path) == (
        PlanSettings(64, "bf16", 8, 2)
    )
    given = {"seq": 128, "mixed_precision": "fp32", "global_batch": 16, "world_size": 4}
    keys = {
        "seq": "seq",
        "mixed_precision": "mixed_precision",
        "global_batch": "global_bsz",
        "world_size": "world_size",
    }
    planned = {"seq": 64, "mixed_precision": "bf16", "global_batch": 8, "world_size": 2}
    for name, value in given.items():
        with pytest.raises(PlanError) as error:
            check_plan_settings(loaded, path=path, **{name: value})
        message = str(error.value)
        assert f"plan file {path}: key {keys[name]}" in message, message
        assert repr(planned[name]) in message and repr(value) in message, message
    # a plan that does not record seq and precision (older, or written by hand) is not refused on them
    older = Plan(world_size=2, layers=layers, global_batch=8)
    assert check_plan_settings(older, seq=128, mixed_precision="fp32") == PlanSettings(128, "fp32", 8, 2)
    assert check_plan_settings(older) == PlanSettings(None, None, 8, 2)


COMPILE_SCRIPT = """
import json, sys, warnings
warnings.simplefilter("ignore")
import galvatron_fx
from galvatron_fx.errors import GalvatronError
from galvatron_fx.models import build_model

hardware, hardware_world_2, model_profile, plan_path = sys.argv[1:5]
model, batch = build_model("gpt2", batch=4, seq=16)
out = {}
compiled = galvatron_fx.compile(model, example_kwargs=batch, profile=model_profile, hardware_profile=hardware)
out["provenance"] = compiled.plan.provenance
out["source"] = compiled.cost_model.hardware.source
compiled.save_plan(plan_path)
attempts = {
    "hardware_world_2": dict(hardware_profile=hardware_world_2),
    "bf16_plan_fp32_run": dict(plan=plan_path + ".bf16", mixed_precision="fp32"),
    "bf16_plan_taken": dict(plan=plan_path + ".bf16"),
    "batch": dict(plan=plan_path, example_kwargs=build_model("gpt2", batch=2, seq=16)[1]),
}
data = json.load(open(plan_path))
data["galvatron_fx"]["provenance"]["mixed_precision"] = "bf16"
json.dump(data, open(plan_path + ".bf16", "w"))
for name, options in attempts.items():
    try:
        compiled = galvatron_fx.compile(model, **{"example_kwargs": batch, **options})
        out[name] = "compiled " + compiled.cost_model.mixed_precision
    except GalvatronError as error:
        out[name] = f"{type(error).__name__}: {error}"
print("RESULT " + json.dumps(out))
"""


def test_compile_takes_both_profiles_and_checks_its_plan(chain, tmp_path):
    """compile() on one process (a group of one): the hardware profile it was given prices the search and is
    named in the plan; a profile for two processes, a plan for another precision or batch are refused."""
    folder = chain["folder"]
    data = json.loads((folder / HARDWARE).read_text())
    data.update(world_size=1, devices_per_node=1, collectives={}, p2p={}, sharded_units={})
    data.update(blocking_by_group_s={}, blocking_growth_by_group={})
    one = tmp_path / "hardware_1.json"
    one.write_text(json.dumps(data))
    script = tmp_path / "compile_script.py"
    script.write_text(textwrap.dedent(COMPILE_SCRIPT))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    argv = [sys.executable, str(script), str(one), str(folder / HARDWARE), str(folder / MODEL), str(tmp_path / "p")]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.split("RESULT ", 1)[1])
    assert out["source"] == str(one)
    assert out["provenance"]["hardware_profile"] == {"path": str(one), "sha256": _sha256(one)}
    assert out["provenance"]["model_profile"] == {"path": str(folder / MODEL), "sha256": _sha256(folder / MODEL)}
    assert out["provenance"]["seq"] == SEQ and out["provenance"]["mixed_precision"] == "fp32"
    assert out["hardware_world_2"].startswith("ProfileError") and "key world_size is 2" in out["hardware_world_2"]
    refused = out["bf16_plan_fp32_run"]
    assert refused.startswith("PlanError") and "key mixed_precision is 'bf16'" in refused and "'fp32'" in refused
    assert out["bf16_plan_taken"] == "compiled bf16"  # no precision given: the plan's
    assert out["batch"].startswith("PlanError") and "key global_bsz is 4" in out["batch"]


def test_the_searched_plan_trains_under_torchrun(chain):
    plan = chain["folder"] / "plan.json"
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nproc_per_node", str(WORLD), "-m", "galvatron_fx.cli", "train", "gpt2"]
    options = ["--plan", str(plan), "--steps", "2", "--global-batch", str(BATCH), "--seq", str(SEQ)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*command, *options], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "loss" in result.stdout, result.stdout
