"""Capture and layer discovery on the seven reference models; annotations against eager measurements."""

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import galvatron_fx
from galvatron_fx.models import build_model
from galvatron_fx.passes.analysis.annotate import CPU_ATTENTION_FLOPS
from galvatron_fx.report import layer_table

# Body layer types in execution order, for the small configurations of galvatron_fx.models.
EXPECTED_BODY_TYPES = {
    "gpt2": ["GPT2Block"] * 4,
    "llama": ["LlamaDecoderLayer"] * 4,
    "bert": ["BertLayer"] * 4,
    "vit": ["ViTLayer"] * 4,
    "nanogpt": ["Block"] * 4,
    # The first block of each T5 stack owns the relative position bias, so it is a type of its own;
    # the encoder's final norm and the decoder's embedding form the transition between the stacks.
    "t5": ["T5Block.0", "T5Block.1", "T5Block.1", "Transition", "T5Block.2", "T5Block.3", "T5Block.3"],
    # Swin alternates plain and shifted windows, each stage has its own width, patch merging joins stages;
    # the last stage's window covers its whole resolution, so neither of its blocks shifts.
    "swin": [
        "SwinLayer.0",
        "SwinLayer.1",
        "Transition.0",
        "SwinLayer.2",
        "SwinLayer.3",
        "Transition.1",
        "SwinLayer.4",
        "SwinLayer.4",
    ],
}
MODELS = sorted(EXPECTED_BODY_TYPES)


@pytest.fixture(scope="module")
def captured():
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            model, batch = build_model(name, size="small", batch=2, seq=16)
            cache[name] = (model, batch, galvatron_fx.capture(model, example_kwargs=batch))
        return cache[name]

    return get


def _loss(output):
    return output if isinstance(output, torch.Tensor) else output.loss


@pytest.mark.parametrize("name", MODELS)
def test_layer_discovery(captured, name):
    _, _, program = captured(name)
    assert [layer.layer_type for layer in program.body] == EXPECTED_BODY_TYPES[name]
    assert program.layers[0].kind == "prologue" and program.layers[-1].kind == "epilogue"
    assert [layer.index for layer in program.layers] == list(range(len(program.layers)))
    # Every call node belongs to exactly one layer.
    calls = [n.name for n in program.graph_module.graph.nodes if n.op in ("call_function", "call_module")]
    owned = [name for layer in program.layers for name in layer.node_names]
    assert sorted(owned) == sorted(calls)


@pytest.mark.parametrize("name", MODELS)
def test_flops_and_parameter_bytes(captured, name):
    model, batch, program = captured(name)
    # eager attention on CPU runs the flash kernel, which torch's counter has no formula for: ours for both
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        _loss(model(**batch)).backward()
    model.zero_grad(set_to_none=True)
    program_flops = sum(layer.stats.fwd_flops + layer.stats.bwd_flops for layer in program.layers)
    assert program_flops == pytest.approx(counter.get_total_flops(), rel=0.01)
    assert program.param_bytes == sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_saved_activation_bytes(captured, name):
    model, batch, program = captured(name)
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, saved_bytes, keep = set(), 0, []

    def pack(tensor):
        nonlocal saved_bytes
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen and storage.data_ptr() not in param_storages:
            seen.add(storage.data_ptr())
            saved_bytes += storage.nbytes()
            keep.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch)
    predicted = sum(layer.stats.saved_activation_bytes for layer in program.layers)
    assert predicted == pytest.approx(saved_bytes, rel=0.10)


@pytest.mark.parametrize("name", MODELS)
def test_program_trains_like_eager(captured, name):
    model, batch, program = captured(name)
    before = copy.deepcopy(model.state_dict())
    eager_loss = _loss(model(**batch))
    eager_loss.backward()
    program_loss = _loss(program.run_layers(**batch))
    program_loss.backward()
    assert abs(program_loss.item() - eager_loss.item()) <= 1e-6
    for param_name, param in program.named_parameters():
        reference = model.get_parameter(param_name).grad
        assert param.grad is not None, param_name
        assert (param.grad - reference).abs().max().item() <= 1e-6, param_name
    # The user's model is untouched by training the Program: its parameters are not the Program's.
    model_params = {id(p) for p in model.parameters()}
    assert not any(id(p) in model_params for _, p in program.named_parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    model.zero_grad(set_to_none=True)


def test_layer_table_and_boundaries(captured):
    _, _, program = captured("gpt2")
    text = layer_table(program)
    assert "GPT2Block" in text and "boundary MB/sample" in text
    hidden = program.body[0].boundary_out
    # After a GPT-2 block the residual stream [batch, seq, hidden] is live (the causal mask is not: is_causal).
    assert any(t.shape == (2, 16, 64) and t.batched for t in hidden)
    assert all(layer.boundary_bytes > 0 for layer in program.layers[:-1])


def test_every_node_is_annotated(captured):
    from galvatron_fx.program import node_meta

    _, _, program = captured("gpt2")
    graph = program.graph_module.graph
    assert all(node_meta(node).info is not None for node in graph.nodes if node.op != "output")
    # Tied weights (wte / lm_head) are one parameter behind two names: count each parameter once.
    get_attr_bytes = {
        id(program.graph_module.get_parameter(n.target)): node_meta(n).info.param_bytes
        for n in graph.nodes
        if n.op == "get_attr"
    }
    assert sum(get_attr_bytes.values()) == program.param_bytes
    # GPT-2's fused QKV projection is addmm(bias, x[M, K], W[K, N]): 2·M·K·N forward; backward computes
    # the input and the weight gradients, twice that.
    addmm = next(n for n in graph.nodes if n.op == "call_function" and "addmm" in str(n.target))
    info = node_meta(addmm).info
    (m, k), (_, n) = addmm.args[1].meta["val"].shape, addmm.args[2].meta["val"].shape
    assert info.shape == (m, n) and info.dtype == torch.float32
    assert info.fwd_flops == 2 * m * k * n
    assert info.bwd_flops == 2 * info.fwd_flops


@pytest.mark.parametrize("name", ["t5", "swin"])
def test_module_hierarchy_is_kept(captured, name):
    model, batch, program = captured(name)
    tree = program.hierarchy
    for layer in program.body:
        if layer.kind == "block":
            block = tree.get_submodule(layer.module_path)
            assert hasattr(block, "graph")  # each block is its own submodule with its own graph
    ours = {id(p) for _, p in program.named_parameters()}
    assert {id(p) for p in tree.parameters()} <= ours
    assert torch.allclose(tree(**batch).loss, model(**batch).loss, atol=1e-6)


def test_meta_device_model_is_captured_without_memory(captured):
    _, _, on_cpu = captured("gpt2")
    torch.manual_seed(0)
    with torch.device("meta"):
        model, batch = build_model("gpt2", size="small", batch=2, seq=16)
    program = galvatron_fx.capture(model, example_kwargs=batch)
    assert all(p.device.type == "meta" for _, p in program.named_parameters())
    for meta_layer, cpu_layer in zip(program.layers, on_cpu.layers):
        assert meta_layer.stats.param_bytes == cpu_layer.stats.param_bytes
        # On meta, attention dispatches to a fused kernel whose FLOP formula differs slightly from the
        # CPU math path's matmuls; everything else is counted identically.
        assert meta_layer.stats.fwd_flops == pytest.approx(cpu_layer.stats.fwd_flops, rel=0.05)
        assert meta_layer.stats.saved_activation_bytes == pytest.approx(
            cpu_layer.stats.saved_activation_bytes, rel=0.05
        )
