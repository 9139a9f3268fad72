"""Plan visualisation: the annotated layer graph, the pipeline schedule, the ONNX and DOT renderers, the CLI.

Heterogeneous plans on the small GPT-2 (4 blocks) and T5 (3 + 3 blocks and a transition) over 4 devices,
pp 2, with mixed tp / dp / ZeRO / Megatron-SP / Ulysses / checkpointing; expectations are derived by hand.
"""

import re
import shutil
import subprocess

import onnx
import pytest

from galvatron_fx import capture
from galvatron_fx.cli import main
from galvatron_fx.cluster import Cluster
from galvatron_fx.cost.model import CostModel
from galvatron_fx.cost.model_profile import ModelProfile
from galvatron_fx.errors import ConfigError, PlanError
from galvatron_fx.models import build_model
from galvatron_fx.plan import EmbeddingStrategy, Plan, Prediction
from galvatron_fx.plan import LayerStrategy as S
from galvatron_fx.viz import build_layer_graph, render_dot, visualize
from galvatron_fx.viz.collectives import redistribution_op
from galvatron_fx.viz.schedule import BACKWARD, FORWARD, simulate_schedule

GPT2_PLAN = dict(
    world_size=4,
    pp=2,
    pp_division=(2, 2),
    pipeline="1f1b",
    chunks=4,
    global_batch=8,
    layers=(S(tp=2), S(dp=2, dp_type="zero3", ckpt=True), S(tp=2, sp="megatron"), S(dp=2, dp_type="zero2")),
    embedding=EmbeddingStrategy(vtp=2),
)
T5_PLAN = dict(
    world_size=4,
    pp=2,
    pp_division=(4, 3),
    pipeline="gpipe",
    chunks=2,
    global_batch=8,
    layers=(
        S(dp=2),
        S(dp=2, ckpt=True),
        S(tp=2, sp="ulysses"),
        S(tp=2),
        S(tp=2, tp_consecutive=False),
        S(dp=2, dp_type="zero3"),
        S(tp=2, ckpt=True),
    ),
)
# by hand: (program index before, after) of every layout change inside a stage, and of every stage cut
EXPECTED = {
    "gpt2": dict(redistributions={(1, 2): "slice", (3, 4): "all_to_all"}, transfers=[(2, 3)]),
    "t5": dict(
        redistributions={(2, 3): "all_to_all", (3, 4): "all_gather", (5, 6): "slice", (6, 7): "all_gather"},
        transfers=[(4, 5)],
    ),
}


@pytest.fixture(scope="module")
def programs():
    captured = {}
    for name in ("gpt2", "t5"):
        model, kwargs = build_model(name, batch=4, seq=32)
        captured[name] = capture(model, example_kwargs=kwargs)
    return captured


def cost_model_for(program):
    cluster = Cluster.preset("A100-80GB", nodes=1, devices_per_node=4)
    return CostModel(
        ModelProfile.from_program(program, flops_per_s=cluster.sustained_flops["fp32"]), cluster.hardware_profile()
    )


def plan_for(name, **changes):
    return Plan(**{**(GPT2_PLAN if name == "gpt2" else T5_PLAN), **changes})


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_layers_stages_boundaries_and_memory(programs, name):
    program, plan = programs[name], plan_for(name)
    cost_model = cost_model_for(program)
    graph = build_layer_graph(program, plan, cost_model)
    assert [n.index for n in graph.layers] == [layer.index for layer in program.layers]
    assert [n.kind for n in graph.layers] == [layer.kind for layer in program.layers]
    for node in graph.layers:
        if node.body_index is None:
            assert node.stage == (0 if node.kind == "prologue" else plan.pp - 1)
        else:
            assert node.stage == plan.stage_of_layer(node.body_index)
            assert node.strategy_label == plan.layers[node.body_index].short()
    colors = {}
    for node in graph.layers:
        assert colors.setdefault(node.strategy_label, node.color) == node.color
    assert len(set(colors.values())) == len(colors) == len(graph.legend)
    assert {(r.src, r.dst): r.op for r in graph.redistributions} == EXPECTED[name]["redistributions"]
    assert [(t.src, t.dst) for t in graph.transfers] == EXPECTED[name]["transfers"]
    assert all(t.bytes > 0 and t.time_s > 0 for t in graph.transfers)
    assert [s.layer_indices for s in graph.stages] == [
        tuple(n.index for n in graph.layers if n.stage == s) for s in range(plan.pp)
    ]
    # the per-layer breakdown adds up to the cost model's own per-stage peak and iteration time
    prediction = cost_model.evaluate(plan)
    assert tuple(s.memory_bytes for s in graph.stages) == prediction.memory_bytes_per_stage
    assert graph.iteration_s == pytest.approx(prediction.iteration_time_s)
    assert graph.source == "cost model"
    in_flight = [s.in_flight for s in graph.stages]
    assert in_flight == (
        [min(plan.chunks, plan.pp - s) for s in range(plan.pp)] if plan.pipeline == "1f1b" else [plan.chunks] * plan.pp
    )


def _calls(node):
    return {(c.op, c.purpose, c.phase, c.count, c.group_size) for c in node.collectives}


def test_collectives_follow_each_layers_strategy(programs):
    program = programs["gpt2"]
    graph = build_layer_graph(program, plan_for("gpt2"), cost_model_for(program))
    prologue, tp, zero3, sp, zero2, epilogue = graph.layers
    hidden_bytes = 2 * 32 * 64 * 4  # micro-batch 2 × seq 32 × hidden 64 × fp32
    assert _calls(tp) == {("all_reduce", "tp", "forward", 2, 2), ("all_reduce", "tp", "backward", 2, 2)}
    assert {c.bytes_per_call for c in tp.collectives} == {hidden_bytes}
    assert _calls(zero3) == {
        ("all_gather", "zero3", "forward", 1, 2),
        ("all_gather", "zero3", "backward", 1, 2),
        ("reduce_scatter", "zero3", "step", 1, 2),
    }
    assert {c.bytes_per_call for c in zero3.collectives} == {zero3.param_count * 4}
    assert _calls(sp) == {  # backward gathers the projections' inputs again (saved as sequence shards)
        ("all_gather", "megatron_sp", "forward", 2, 2),
        ("reduce_scatter", "megatron_sp", "forward", 2, 2),
        ("all_gather", "megatron_sp", "backward", 4, 2),
        ("reduce_scatter", "megatron_sp", "backward", 2, 2),
    }
    assert _calls(zero2) == {("reduce_scatter", "zero2", "step", 1, 2), ("all_gather", "zero2", "step", 1, 2)}
    assert _calls(prologue) == {("all_reduce", "vtp", "forward", 1, 2)}
    assert _calls(epilogue) == {("all_reduce", "vtp", "backward", 1, 2)}
    # a layer's forward time includes its forward TP collectives; a checkpointed layer recomputes its forward
    assert sum(c.time_s for c in tp.collectives if c.phase == "forward") < tp.fwd_s
    assert zero3.bwd_s > zero3.fwd_s

    t5 = programs["t5"]
    ulysses = build_layer_graph(t5, plan_for("t5"), cost_model_for(t5)).layers[3]
    assert _calls(ulysses) == {("all_to_all", "ulysses", "forward", 4, 2), ("all_to_all", "ulysses", "backward", 4, 2)}
    assert {c.bytes_per_call for c in ulysses.collectives} == {4 * 32 * 64 * 4 // 2}  # micro-batch 4, split over tp 2


def test_grid_layers_show_their_groups_collectives(programs):
    program = programs["gpt2"]
    layers = (S(tp=4, tp_mode="2d"), S(tp=4), S(tp=4, tp_mode="2d"), S(tp=4, tp_mode="2d", ckpt=True))
    plan = Plan(world_size=4, layers=layers, global_batch=8)
    graph = build_layer_graph(program, plan, cost_model_for(program))
    _, grid, one_d, *_ = graph.layers
    assert grid.strategy_label == "tp4-2d"
    row = 8 // 2 * 32 * 64 * 4  # the samples of a row (global batch 8 over 2 rows) × seq 32 × hidden 64 × fp32
    # forward: the two column-parallel groups' inputs gathered, the two row-parallel outputs scattered
    assert ("all_gather", "2d-row", "forward", 2, 2) in _calls(grid)
    assert ("reduce_scatter", "2d-row", "forward", 2, 2) in _calls(grid)
    assert {c.bytes_per_call for c in grid.collectives if c.purpose == "2d-row" and c.op != "all_reduce"} == {row}
    assert {c.group_size for c in grid.collectives if c.purpose == "2d-column"} == {2}
    assert all(c.time_s is not None and c.time_s > 0 for c in grid.collectives)
    assert _calls(one_d) == {("all_reduce", "tp", "forward", 2, 4), ("all_reduce", "tp", "backward", 2, 4)}
    # a grid's rows hold half the samples each, split along the features: the 1D layer gathers all samples
    assert redistribution_op(layers[0], layers[1]) == "all_gather"
    assert redistribution_op(layers[0], layers[2]) is None  # the same grid: nothing moves
    assert redistribution_op(layers[0], S(tp=2, dp=2)) == "all_gather"  # its rows' samples, whole features


def test_redistribution_ops():
    assert redistribution_op(S(tp=2), S(tp=2, ckpt=True)) is None
    assert redistribution_op(S(dp=2, dp_type="ddp"), S(dp=2, dp_type="zero3")) is None
    assert redistribution_op(S(tp=2), S(dp=2)) == "slice"  # replicated batch → each rank keeps its half
    assert redistribution_op(S(dp=2), S(tp=2)) == "all_gather"
    assert redistribution_op(S(tp=2, sp="megatron"), S(tp=2)) == "all_gather"
    assert redistribution_op(S(dp=2), S(tp=2, sp="ulysses")) == "all_to_all"
    assert redistribution_op(S(tp=2, dp=2), S(tp=2, dp=2, tp_consecutive=False)) == "all_to_all"
    assert redistribution_op(S(tp=2), S(tp=2, tp_consecutive=False)) is None  # replicated either way


def test_schedule_uniform_stages_take_the_textbook_time():
    for pipeline in ("gpipe", "1f1b"):
        ops = simulate_schedule(pipeline, 8, [1.0] * 4, [2.0] * 4)
        assert max(op.end_s for op in ops) == pytest.approx((8 + 4 - 1) * 3.0)


@pytest.mark.parametrize("pipeline", ["gpipe", "1f1b"])
def test_schedule_respects_dependencies_and_memory_bound(pipeline):
    fwd, bwd, chunks = [1.0, 2.0, 1.5], [2.0, 3.0, 2.5], 5
    ops = simulate_schedule(pipeline, chunks, fwd, bwd, [0.5, 0.0, 0.25])
    boxes = {(op.phase, op.stage, op.micro_batch): op for op in ops if op.micro_batch >= 0}
    assert len(boxes) == 2 * len(fwd) * chunks
    for (phase, stage, m), op in boxes.items():
        assert op.end_s - op.start_s == pytest.approx((fwd if phase == FORWARD else bwd)[stage])
        if phase == FORWARD and stage > 0:
            assert op.start_s >= boxes[(FORWARD, stage - 1, m)].end_s
        if phase == BACKWARD:
            assert op.start_s >= boxes[(FORWARD, stage, m)].end_s
            if stage < len(fwd) - 1:
                assert op.start_s >= boxes[(BACKWARD, stage + 1, m)].end_s
    for stage in range(len(fwd)):
        mine = sorted((op for op in ops if op.stage == stage), key=lambda op: op.start_s)
        assert all(a.end_s <= b.start_s + 1e-12 for a, b in zip(mine, mine[1:]))  # one thing at a time
        held = peak = 0
        for op in mine:
            held += {FORWARD: 1, BACKWARD: -1}.get(op.phase, 0)
            peak = max(peak, held)
        assert peak == (chunks if pipeline == "gpipe" else len(fwd) - stage)
    syncs = [op for op in ops if op.micro_batch < 0]
    assert [op.stage for op in syncs] == [0, 2]
    with pytest.raises(PlanError):
        simulate_schedule("interleaved", 2, [1.0], [1.0])


def test_without_cost_model_predictions_come_from_the_plan(programs):
    program = programs["gpt2"]
    predicted = Prediction(iteration_time_s=0.25, samples_per_s=32.0, memory_bytes_per_stage=(3_000_000, 2_000_000))
    graph = build_layer_graph(program, plan_for("gpt2", prediction=predicted))
    assert graph.source == "plan prediction" and graph.iteration_s == 0.25
    assert graph.schedule_s == pytest.approx(0.25)  # per-layer times apportioned so the timeline lasts the prediction
    assert [s.memory_bytes for s in graph.stages] == [3_000_000, 2_000_000]
    for s in graph.stages:
        assert s.model_state_bytes + s.activation_bytes + s.peak_extra_bytes == pytest.approx(s.memory_bytes, abs=3)
    assert all(c.time_s is None for n in graph.layers for c in n.collectives)
    bare = build_layer_graph(program, plan_for("gpt2"))
    assert bare.source == "annotations" and bare.iteration_s == pytest.approx(bare.schedule_s) and bare.iteration_s > 0
    blocks = [n for n in bare.layers if n.kind == "block"]
    assert all(n.fwd_s > 0 and n.model_state_bytes > 0 for n in blocks)
    assert blocks[1].bwd_s > blocks[3].bwd_s  # the checkpointed layer recomputes its forward
    with pytest.raises(PlanError, match="body layers"):
        build_layer_graph(program, plan_for("t5"))


def test_onnx_export_passes_the_checker_and_carries_the_plan(programs, tmp_path):
    program = programs["gpt2"]
    graph = build_layer_graph(program, plan_for("gpt2"), cost_model_for(program))
    files = visualize(program, plan_for("gpt2"), tmp_path, cost_model=cost_model_for(program), formats="onnx")
    model = onnx.load(str(files["onnx"]))
    onnx.checker.check_model(model, full_check=True)
    nodes = list(model.graph.node)
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    layer_nodes = [(n, a) for n, a in zip(nodes, attrs) if "layer_type" in a]
    assert [n.op_type for n, _ in layer_nodes] == [
        "Prologue",
        "GPT2Block",
        "GPT2Block",
        "GPT2Block",
        "GPT2Block",
        "Epilogue",
    ]
    for (_, a), layer in zip(layer_nodes, graph.layers):
        assert a["stage"] == layer.stage and a["strategy"].decode() == layer.strategy_label
        assert a["fwd_flops"] == layer.fwd_flops and a["memory_bytes"] == layer.memory_bytes
    kinds = [a["collective_kind"].decode() for a in attrs if "collective_kind" in a and "purpose" in a]
    assert sorted(kinds) == sorted(c.op for layer in graph.layers for c in layer.collectives)
    assert sum(n.op_type == "Redistribute" for n in nodes) == len(graph.redistributions) == 2
    send = [n for n in nodes if n.op_type == "SendRecv"]
    assert len(send) == 1 and all(name.endswith("@stage1") for name in send[0].output)
    assert all(n.domain == "ai.galvatron_fx" for n in nodes)
    first_on_stage1 = layer_nodes[3][0]
    assert any(name.endswith("@stage1") for name in first_on_stage1.input)  # its inputs come through the send/recv
    assert {i.name for i in model.graph.input} >= {"input_ids", "labels"}
    assert len(model.graph.output) >= 1


_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|->|[{}\[\];=,]|[A-Za-z0-9_.#]+|\S')


def parse_dot(text):
    """A small recursive-descent DOT parser: {node: (attrs, cluster)}, [(src, dst, attrs)]; raises on bad syntax."""
    tokens, pos = _TOKEN.findall(text), 0
    nodes, edges = {}, []

    def take(expected=None):
        nonlocal pos
        token = tokens[pos]
        assert expected is None or token == expected, f"expected {expected!r} at token {pos}, got {token!r}"
        pos += 1
        return token.strip('"') if token.startswith('"') else token

    def attrs():
        found = {}
        if tokens[pos] == "[":
            take("[")
            while tokens[pos] != "]":
                key = take()
                take("=")
                found[key] = take()
                if tokens[pos] == ",":
                    take(",")
            take("]")
        return found

    def block(cluster):
        take("{")
        while tokens[pos] != "}":
            if tokens[pos] in ("graph", "node", "edge"):
                take()
                attrs()
            elif tokens[pos] == "subgraph":
                take()
                name = take()
                block(name)
            else:
                chain = [take()]
                while tokens[pos] == "->":
                    take("->")
                    chain.append(take())
                found = attrs()
                if len(chain) == 1:
                    assert chain[0] not in nodes, f"node {chain[0]} declared twice"
                    nodes[chain[0]] = (found, cluster)
                edges.extend((a, b, found) for a, b in zip(chain, chain[1:]))
            if tokens[pos] == ";":  # optional in DOT's grammar
                take(";")
        take("}")

    take("digraph")
    take()
    block(None)
    assert pos == len(tokens), "text after the graph"
    return nodes, edges


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_dot_structure(programs, name, tmp_path):
    program, plan = programs[name], plan_for(name)
    graph = build_layer_graph(program, plan, cost_model_for(program))
    text = render_dot(graph)
    nodes, edges = parse_dot(text)
    for src, dst, _ in edges:
        assert src in nodes and dst in nodes, (src, dst)
    for layer in graph.layers:
        found, cluster = nodes[f"L{layer.index}"]
        assert cluster == f"cluster_stage{layer.stage}" and found["fillcolor"] == layer.color
        assert sum(1 for node in nodes if node.startswith(f"L{layer.index}_c")) == len(layer.collectives)
    red = [(a, b) for a, b, found in edges if found.get("color") == "#c92a2a"]
    assert red == [(f"L{t.src}", f"L{t.dst}") for t in graph.transfers]
    solid = {a: b for a, b, found in edges if found.get("style") not in ("dashed", "dotted")}
    walk, here = [], "L0"
    while here in solid:  # the execution path visits every layer once, through the redistributions
        here = solid[here]
        walk.append(here)
    assert [n for n in walk if n.startswith("L")] == [f"L{layer.index}" for layer in graph.layers[1:]]
    assert [n for n in walk if n.startswith("R")] == [f"R{r.src}_{r.dst}" for r in graph.redistributions]
    assert {found["label"] for node, (found, cluster) in nodes.items() if cluster == "cluster_legend"} == {
        label for label, _ in graph.legend
    }
    if shutil.which("dot"):  # Graphviz is optional; when present it must accept the text too
        (tmp_path / "plan.dot").write_text(text)
        done = subprocess.run(["dot", "-Tsvg", str(tmp_path / "plan.dot")], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "Warning" not in done.stderr, done.stderr


def test_visualize_formats_and_paths(programs, tmp_path):
    program, plan = programs["gpt2"], plan_for("gpt2")
    files = visualize(program, plan, tmp_path / "out" / "mine.html", formats="html,dot")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mine.dot", "mine.html"] and set(files) == {
        "html",
        "dot",
    }
    files = visualize(program, plan, tmp_path / "dir", formats=["onnx"])
    assert files["onnx"].name == "GPT2LMHeadModel.onnx" and files["onnx"].stat().st_size > 0
    with pytest.raises(ConfigError, match="svg"):
        visualize(program, plan, tmp_path, formats="html,svg")


def test_cli_viz(tmp_path, capsys):
    plan = plan_for("gpt2", provenance={"memory_budget_bytes": 2_000_000})
    plan.save(tmp_path / "plan.json")
    out = tmp_path / "viz"
    code = main(
        [
            "viz",
            "gpt2",
            "--plan",
            str(tmp_path / "plan.json"),
            "--out",
            str(out),
            "--format",
            "html,dot",
            "--cluster",
            "A100-80GB",
            "--devices-per-node",
            "4",
        ]
    )
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["GPT2LMHeadModel.dot", "GPT2LMHeadModel.html"]
    page = (out / "GPT2LMHeadModel.html").read_text()
    assert "predictions: cost model" in page and "memory budget 1.91 MiB" in page
    capsys.readouterr()
    assert main(["viz", "gpt2", "--plan", str(tmp_path / "plan.json"), "--format", "png"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "png" in error and "html, onnx, dot" in error
    assert main(["viz", "gpt2", "--plan", str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["viz", "--help"])
    help_text = capsys.readouterr().out
    for option in (
        "--plan",
        "--out",
        "--format",
        "--world-size",
        "--cluster",
        "--hardware-profile",
        "--model-profile",
        "--memory-budget",
        "--mixed-precision",
    ):
        assert option in help_text
