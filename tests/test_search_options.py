"""Galvatron's search options, honoured as Galvatron does: --dp-types restricts even the full space,
--disable-sdp rules out ZeRO, pipedream_flush is 1F1B everywhere, strategy files with a ZeRO-3
default_dp_type load, Megatron-SP is a global flag for Galvatron's files (and for the search),
--fine-grained-mode 0 searches one strategy for every layer, and the model size presets in Galvatron's
names build the published shapes (with --num-layers). Single process; the search runs on Galvatron's
LLaMA-2-7B profiles or captures a two-layer preset on the meta device."""

import json
import warnings
from pathlib import Path

import pytest
import torch

from galvatron_fx.cli import build_parser, main
from galvatron_fx.commands import search as search_command
from galvatron_fx.cost.galvatron_import import load_hardware, load_model
from galvatron_fx.cost.model import CostModel
from galvatron_fx.errors import ConfigError, PlanError
from galvatron_fx.models import PRESETS, build_model, build_preset, example_batch
from galvatron_fx.passes.search.engine import SearchEngine
from galvatron_fx.passes.search.space import SearchSpace
from galvatron_fx.plan import LayerStrategy, Plan
from galvatron_fx.plan_sources import resolve_given_plan, uniform_plan, with_sequence_parallel

FIXTURE = Path(__file__).parent / "fixtures" / "galvatron-llama2-7b"
GALVATRON_PLAN = FIXTURE / "galvatron_config_llama2-7b_1nodes_8gpus_per_node_36GB_bf16.json"
ZERO = ("zero2", "zero3")


@pytest.fixture(scope="module")
def cost_model():
    return CostModel(load_model(FIXTURE), load_hardware(FIXTURE, memory_bytes="36GB"), mixed_precision="bf16")


def _search(tmp_path, *options: str) -> Plan:
    """``galvatron-fx search`` on Galvatron's LLaMA-2-7B profiles (8 GPUs, 36 GB, global batch 16), a small
    space (one micro-batch count, no pipeline, Megatron-SP, no strided TP) plus ``options``."""
    out = tmp_path / "plan.json"
    argv = ["search", "--galvatron-profiles", str(FIXTURE), "--memory", "36GB", "--batch", "16", "--chunks", "1"]
    argv += ["--max-pp", "1", "--sp-types", "megatron", "--disable-tp-strided", "--out", str(out), "--quiet"]
    assert main(argv + list(options)) == 0
    return Plan.load(out)


def _space(*options: str) -> SearchSpace:
    """The SearchSpace ``galvatron-fx search`` builds from ``options``."""
    return search_command._space(build_parser().parse_args(["search", "llama", *options]))


# 1. --dp-types restricts the full space ------------------------------------------------------------------
def test_dp_types_restrict_the_full_space(cost_model, tmp_path):
    space = _space("--space", "full", "--dp-types", "ddp")
    assert space.dp_types == ("ddp",) and space.default_dp_types() == ["ddp"]
    assert all(s.dp_type == "ddp" for d in (1, 2, 4, 8) for s in space.layer_strategies(d))
    assert not any(e.embed_sdp for d in (1, 2, 4, 8) for e in space.embedding_strategies(d))
    assert space.grad_sync_options(4) == (False,)  # nothing to choose without ZeRO
    settings = SearchEngine(cost_model, 8, 36 * 10**9, space, None).settings()
    assert settings and {s.dp_mode for s in settings} == {"ddp"}

    plan = _search(tmp_path, "--space", "full", "--dp-types", "ddp")
    assert not any(layer.dp_type in ZERO for layer in plan.layers)
    assert plan.embedding.data_parallel_type == "ddp"


def test_dp_types_keep_zero3_only_where_given():
    assert SearchSpace.named("full", dp_types=("ddp", "zero3")).dp_types == ("ddp", "zero3")
    assert SearchSpace.named("full", dp_types=("zero2",)).dp_types == ("zero2",)
    assert SearchSpace.named("full").dp_types == ("ddp", "zero2", "zero3")
    assert "zero3" not in SearchSpace.named("dp+tp", dp_types=("ddp", "zero3")).dp_types  # Galvatron: no sdp there
    assert SearchSpace.named("sdp").dp_types == ("zero3",)


# 2. --disable-sdp ------------------------------------------------------------------------------------------
def test_disable_sdp_rules_out_zero_of_any_kind(tmp_path):
    space = _space("--disable-sdp")
    assert space.disable_sdp and space.dp_types == ("ddp",)
    assert not any(s.dp_type in ZERO for d in (2, 8) for s in space.layer_strategies(d))
    assert not any(e.embed_sdp for e in space.embedding_strategies(8))
    assert SearchSpace(disable_sdp=True, dp_types=("zero2", "ddp")).dp_types == ("ddp",)
    with pytest.raises(ConfigError, match="disable_sdp"):
        SearchSpace.named("sdp", disable_sdp=True)

    plan = _search(tmp_path, "--disable-sdp")
    assert not any(layer.dp_type in ZERO for layer in plan.layers)
    assert plan.embedding.data_parallel_type == "ddp"


# 3. pipedream_flush is 1f1b --------------------------------------------------------------------------------
def test_pipedream_flush_is_1f1b_everywhere(tmp_path):
    layer = LayerStrategy(tp=1, dp=4)
    assert Plan(world_size=4, layers=(layer,) * 2, pipeline="pipedream_flush", global_batch=4).pipeline == "1f1b"
    resolved = uniform_plan(pipeline="pipedream_flush", pp=2, chunks=2).resolve(4, 4, 8)
    assert resolved.pipeline == "1f1b" and uniform_plan(pipeline="pipedream_flush").pipeline == "1f1b"
    assert SearchSpace(pipelines=("pipedream_flush", "gpipe", "1f1b")).pipelines == ("1f1b", "gpipe")
    assert _space("--pipeline", "pipedream_flush").pipelines == ("1f1b",)
    assert _space("--pipeline", "both").pipelines == ("1f1b", "gpipe")

    data = json.loads(GALVATRON_PLAN.read_text())
    for kind in ("pipedream_flush", "1f1b"):
        path = tmp_path / f"{kind}.json"
        path.write_text(json.dumps({**data, "pipeline_type": kind}))
        assert Plan.load(path, world_size=8).pipeline == "1f1b"
    saved = tmp_path / "ours.json"
    resolved.save(saved)
    assert json.loads(saved.read_text())["pipeline_type"] == "pipedream_flush"  # what Galvatron reads
    with pytest.raises(PlanError, match="pipedream_flush"):
        Plan(world_size=4, layers=(layer,), pipeline="interleaved", global_batch=4)


# 4. default_dp_type zero3 ----------------------------------------------------------------------------------
def test_galvatron_file_with_zero3_default_loads(cost_model, tmp_path):
    data = json.loads(GALVATRON_PLAN.read_text())
    zeros = ",".join(["0"] * 32)
    path = tmp_path / "zero3_default.json"
    path.write_text(json.dumps({**data, "default_dp_type": "zero3", "dp_types_enc": zeros, "embed_sdp": 0}))
    plan = Plan.load(path, world_size=8)
    assert all(layer.dp_type == "zero3" for layer in plan.layers)
    assert plan.embedding.data_parallel_type == "zero3"  # Galvatron's embedding follows the default too
    assert plan.embedding.vtp == 2 and plan.embedding.vsp
    # the same plan as Galvatron's own file, which marks every layer ZeRO-3 one by one
    assert plan.layers == Plan.load(GALVATRON_PLAN, world_size=8).layers
    assert cost_model.evaluate(plan).samples_per_s > 0
    for kind in ("ddp", "zero2"):
        path.write_text(json.dumps({**data, "default_dp_type": kind, "dp_types_enc": zeros}))
        assert {layer.dp_type for layer in Plan.load(path, world_size=8).layers} == {kind}
    path.write_text(json.dumps({**data, "default_dp_type": "fsdp"}))
    with pytest.raises(PlanError, match="default_dp_type='fsdp'"):
        Plan.load(path, world_size=8)


# 5. Megatron-SP as a global flag ---------------------------------------------------------------------------
def _mixed_galvatron_file(path: Path, layers: int = 4) -> Path:
    """A Galvatron strategy file for 4 devices: TP 2, Ulysses 2, TP 2 (strided), plain data parallel."""
    tps, ulysses = ["2", "2", "2", "1"][:layers], ["0", "1", "0", "0"][:layers]
    path.write_text(
        json.dumps(
            {
                "pp_deg": 1,
                "tp_sizes_enc": ",".join(tps),
                "tp_consecutive_flags": "1,1,0,1"[: 2 * layers - 1],
                "dp_types_enc": ",".join(["0"] * layers),
                "use_sp": ",".join(ulysses),
                "checkpoint": ",".join(["0"] * layers),
                "global_bsz": 8,
                "chunks": 1,
                "pipeline_type": "pipedream_flush",
                "default_dp_type": "ddp",
            }
        )
    )
    return path


def test_sequence_parallel_flag_for_galvatron_files(tmp_path):
    path = _mixed_galvatron_file(tmp_path / "galvatron.json")
    plain = resolve_given_plan(path, 4, 4, 8, "LlamaForCausalLM")
    assert [layer.sp for layer in plain.layers] == ["none", "ulysses", "none", "none"]
    with_sp = resolve_given_plan(path, 4, 4, 8, "LlamaForCausalLM", sequence_parallel=True)
    assert [layer.sp for layer in with_sp.layers] == ["megatron", "ulysses", "megatron", "none"]
    assert [layer.tp_consecutive for layer in with_sp.layers] == [layer.tp_consecutive for layer in plain.layers]
    assert with_sp.provenance["sequence_parallel"] == "megatron"
    # a global flag: uniform plans and Plans take it too; a plan without TP is returned as it is
    flagged = resolve_given_plan(uniform_plan(tp=2), 3, 4, 8, "M", sequence_parallel=True)
    assert {layer.sp for layer in flagged.layers} == {"megatron"}
    no_tp = uniform_plan(tp=1).resolve(3, 4, 8)
    assert with_sequence_parallel(no_tp) is no_tp


def test_sequence_parallel_flag_on_the_command_line(tmp_path, monkeypatch):
    # viz draws a Galvatron strategy file with Megatron-SP on its TP layers
    import galvatron_fx.viz

    drawn = {}

    def fake_visualize(program, plan, out, **kwargs):
        drawn["plan"] = plan
        return {}

    monkeypatch.setattr(galvatron_fx.viz, "visualize", fake_visualize)
    path = _mixed_galvatron_file(tmp_path / "galvatron.json")
    argv = ["viz", "gpt2", "--plan", str(path), "--world-size", "4", "--out", str(tmp_path), "--format", "dot"]
    assert main(argv + ["--sequence-parallel"]) == 0
    assert [layer.sp for layer in drawn["plan"].layers] == ["megatron", "ulysses", "megatron", "none"]
    assert main(argv) == 0
    assert [layer.sp for layer in drawn["plan"].layers] == ["none", "ulysses", "none", "none"]

    # search: every TP layer with Megatron-SP, as Galvatron's --sequence_parallel searches
    assert _space("--sequence-parallel").sp_types == ("megatron", "ulysses")
    assert _space("--sequence-parallel", "--sp-types", "none").sp_types == ("megatron",)
    assert _space().sp_types == ("none", "megatron", "ulysses")


# 6. fine-grained mode --------------------------------------------------------------------------------------
def test_fine_grained_mode_0_searches_one_strategy_for_every_layer(tmp_path):
    assert _space("--fine-grained-mode", "0").uniform and not _space("--fine-grained-mode", "1").uniform
    assert _space("--space", "3d", "--fine-grained-mode", "1").uniform  # a uniform named space stays uniform
    layerwise = _search(tmp_path, "--fine-grained-mode", "1")
    uniform = _search(tmp_path, "--fine-grained-mode", "0")
    assert len(set(uniform.layers)) == 1
    assert len(set(layerwise.layers)) > 1  # here the layerwise optimum mixes strategies (checkpointing some)
    assert uniform.prediction.samples_per_s <= layerwise.prediction.samples_per_s * (1 + 1e-12)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["search", "llama", "--fine-grained-mode", "2"])


# 7. model size presets -------------------------------------------------------------------------------------
PUBLISHED_PARAMETERS = {  # parameters of each size with its head(s), as the papers and model cards quote them
    "llama-7b": 6.74e9,
    "llama-13b": 13.0e9,
    "llama-30b": 32.5e9,
    "llama-70b": 69.0e9,
    "gpt-1.5b": 1.56e9,
    "gpt-2.7b": 2.65e9,
    "gpt-6.7b": 6.66e9,
    "bert-base": 110e6,
    "bert-large": 336e6,
    "bert-huge": 672e6,  # Galvatron's BERT-Huge-32
    "t5-base": 223e6,
    "t5-large": 738e6,
    "vit-base": 86.6e6,
    "vit-large": 304e6,
    "vit-huge": 632e6,
    "swin-base": 88e6,
    "swin-large": 197e6,
    "swin-huge": 701e6,  # Galvatron's Swin-Huge-32
}


def _meta(build, *args, **kwargs):
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build(*args, **kwargs)


def test_presets_have_galvatrons_names_and_the_published_shapes():
    assert set(PRESETS) == set(PUBLISHED_PARAMETERS)
    shapes = {name: (p.hidden, p.layers, p.heads, p.ffn, p.vocab) for name, p in PRESETS.items()}
    assert shapes["llama-7b"] == (4096, 32, 32, 11008, 32000)
    assert shapes["llama-13b"] == (5120, 40, 40, 13824, 32000)
    assert shapes["llama-30b"] == (6656, 60, 52, 17920, 32000)
    assert shapes["llama-70b"] == (8192, 80, 64, 28672, 32000) and PRESETS["llama-70b"].kv_heads == 8
    assert shapes["gpt-2.7b"] == (2560, 32, 32, 10240, 50257)
    assert shapes["bert-large"] == (1024, 24, 16, 4096, 30522)
    assert shapes["t5-large"] == (1024, 24, 16, 4096, 32128)
    assert shapes["vit-huge"] == (1280, 32, 16, 5120, 0) and PRESETS["vit-huge"].patch_size == 14
    assert PRESETS["swin-large"].depths == (2, 2, 18, 2) and PRESETS["swin-large"].stage_heads == (6, 12, 24, 48)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_builds_its_published_size_on_the_meta_device(name):
    model, batch = _meta(build_model, name, size="small", batch=2, seq=16)  # size applies to plain names only
    parameters = sum(p.numel() for p in model.parameters())
    assert parameters == pytest.approx(PUBLISHED_PARAMETERS[name], rel=0.03)
    assert batch.keys() == example_batch(name, model, 2, 16).keys()
    config = model.config
    assert (config.embed_dim if name.startswith("swin") else config.hidden_size) == PRESETS[name].hidden


@pytest.mark.parametrize("name, layers", [("llama-70b", 2), ("t5-base", 3), ("swin-huge", 9), ("vit-base", 1)])
def test_num_layers_overrides_the_layer_count(name, layers):
    model, _ = _meta(build_preset, name, batch=2, seq=16, num_layers=layers)
    config = model.config
    if name.startswith("swin"):
        assert config.depths == [2, 2, 3, 2]  # the third stage takes what the others do not
    elif name.startswith("t5"):
        assert (config.num_layers, config.num_decoder_layers) == (layers, layers)
    else:
        assert config.num_hidden_layers == layers
    if PRESETS[name].vocab:
        assert config.vocab_size == PRESETS[name].vocab


def test_preset_errors():
    with pytest.raises(ConfigError, match="at least 7"):
        build_preset("swin-base", num_layers=6)
    with pytest.raises(ConfigError, match="at least 1"):
        build_preset("llama-7b", num_layers=0)
    with pytest.raises(ConfigError, match="llama-70b"):
        build_model("llama-65b")


def test_search_a_preset_with_num_layers(tmp_path, capsys):
    out = tmp_path / "plan.json"
    common = ["--cluster", "A100-80GB:1x8", "--batch", "8", "--seq", "128", "--out", str(out), "--quiet"]
    assert main(["search", "llama-70b", "--num-layers", "2", "--chunks", "1", "--max-pp", "1", *common]) == 0
    plan = Plan.load(out)
    assert len(plan.layers) == 2 and plan.provenance["model"] == "LlamaForCausalLM"
    assert main(["search", "llama", "--num-layers", "2", *common]) == 2
    assert "--num-layers applies to the size presets" in capsys.readouterr().err
