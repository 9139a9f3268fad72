"""Tensor parallelism found in the graph: single layers under real gloo groups, against the unsharded layer."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.distributed as dist

import galvatron_fx
from galvatron_fx.errors import PlanError
from galvatron_fx.fx_utils import copy_layer_modules
from galvatron_fx.models import build_model
from galvatron_fx.passes.lower.graph.tensor_parallel import TPConfig, tensor_parallel
from galvatron_fx.passes.lower.ops.collectives import tp_copy, tp_reduce, tp_scatter
from galvatron_fx.program import layer_meta
from galvatron_fx.runtime import spawn

GROUPS = {"tp4": [(0, 1, 2, 3)], "tp2": [(0, 1), (2, 3)], "tp2-strided": [(0, 2), (1, 3)]}


@functools.lru_cache(maxsize=None)
def _capture(name: str):
    torch.manual_seed(0)
    model, kwargs = build_model(name, batch=2, seq=16)
    return galvatron_fx.capture(model, example_kwargs=kwargs), kwargs


def _layer_inputs(program, kwargs) -> dict:
    """Every value the layers read, from one eager pass layer by layer."""
    env = program.flatten_inputs((), kwargs)
    with torch.no_grad():
        for layer in program.layers:
            layer_env_out = layer.module(*[env[n] for n in layer.input_names])
            env.update(zip(layer.output_names, layer_env_out))
    return env


def _run(module, layer, env, seed):
    inputs = [
        env[n].detach().clone().requires_grad_(env[n].is_floating_point())
        if isinstance(env[n], torch.Tensor)
        else env[n]
        for n in layer.input_names
    ]
    outputs = module(*inputs)
    generator = torch.Generator().manual_seed(seed)
    grads = [torch.randn(o.shape, generator=generator) for o in outputs]
    pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return (
        [o.detach() for o in outputs],
        [i.grad for i in inputs if isinstance(i, torch.Tensor) and i.grad is not None],
        {n: p.grad for n, p in module.named_parameters()},
    )


def _worker(rank: int, world: int, names: list[str], plans: list[str]) -> dict:
    groups = {key: [dist.new_group(list(g)) for g in gs] for key, gs in GROUPS.items()}  # noqa: F841 (funcol finds them by ranks)
    errors = {}
    for name in names:
        program, kwargs = _capture(name)
        env = _layer_inputs(program, kwargs)
        for layer in program.body:
            reference = _run(copy_layer_modules([layer.module])[0], layer, env, seed=layer.index)
            for plan in plans:
                ranks = next(g for g in GROUPS[plan] if rank in g)
                module = copy_layer_modules([layer.module])[0]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    tensor_parallel(module, TPConfig(len(ranks), ranks.index(rank), ranks), f"layer{layer.index}")
                outs, in_grads, param_grads = _run(module, layer, env, seed=layer.index)
                records = layer_meta(module).shards
                worst = max(
                    [_error(a, b) for a, b in zip(outs, reference[0])]
                    + [_error(a, b) for a, b in zip(in_grads, reference[1])]
                    + [
                        _error(g, records[n].select(reference[2][n]) if n in records else reference[2][n])
                        for n, g in param_grads.items()
                    ]
                )
                errors[f"{name}/{plan}/layer{layer.index}/{layer.kind}"] = (worst, len(records))
    return errors


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest difference, relative to the reference's scale where that exceeds 1 (a TP rank sums its shards
    in another order: fp32 rounding grows with the values, as in T5, whose attention is not scaled)."""
    got, want = got.double(), want.double()  # masks are bool
    return ((got - want).abs().max() / want.abs().max().clamp(min=1.0)).item()


def _check(results: list[dict], expect_sharded: bool = True):
    for rank_errors in results:
        for key, (worst, sharded) in rank_errors.items():
            assert worst < 1e-5, f"{key}: max error {worst}"
            if expect_sharded and "transition" not in key:
                assert sharded > 0 or "swin" in key, f"{key}: nothing sharded"


def test_tp_single_layers_gpt2_llama():
    _check(spawn(_worker, 4, ["gpt2", "llama"], ["tp4", "tp2", "tp2-strided"], timeout_s=600))


@pytest.mark.full
def test_tp_single_layers_other_models():
    _check(spawn(_worker, 4, ["bert", "t5", "vit", "swin", "nanogpt"], ["tp4", "tp2"], timeout_s=900))


# -- one process: structure of the rewritten graphs -------------------------------------------------------
def _rewrite(name: str, index: int, tp: int, tp_rank: int = 0, strict: bool = False):
    program, _ = _capture(name)
    module = copy_layer_modules([program.layers[index].module])[0]
    result = tensor_parallel(module, TPConfig(tp, tp_rank, tuple(range(tp)), strict=strict), f"layer{index}")
    return program, module, result


def _calls(module, fn):
    return [n for n in module.graph.nodes if n.op == "call_function" and n.target is fn]


def _sizes(module, target):
    """The size arguments of every ``target`` call; a size read from a tensor (the batch) as "B"."""
    return [
        ["B" if isinstance(s, torch.fx.Node) else s for s in n.args[1]]
        for n in module.graph.nodes
        if n.target is target
    ]


def test_gpt2_fused_qkv_shards_heads_of_each_section():
    program, module, result = _rewrite("gpt2", 1, tp=2, tp_rank=1)
    records = layer_meta(module).shards
    qkv = records["transformer.h.0.attn.c_attn.weight"]
    assert qkv.full_shape == (64, 192) and qkv.dim == 1
    full = program.layers[1].module.get_parameter("transformer.h.0.attn.c_attn.weight")
    local = module.get_parameter("transformer.h.0.attn.c_attn.weight")
    assert local.shape == (64, 96)
    # rank 1 holds heads 2..3 of q, of k and of v
    expected = torch.cat([full[:, s * 64 + 32 : s * 64 + 64] for s in range(3)], dim=1)
    torch.testing.assert_close(local, expected)
    assert module.get_parameter("transformer.h.0.attn.c_proj.weight").shape == (32, 64)
    assert module.get_parameter("transformer.h.0.attn.c_proj.bias").shape == (
        64,
    )  # row-parallel bias: whole, added after the sum
    views = _sizes(module, torch.ops.aten.view.default)
    assert ["B", 16, 96] in views and [-1, 32] in views and [-1, 128] in views
    assert len(_calls(module, tp_reduce)) == 2 and len(_calls(module, tp_copy)) == 2


def test_llama_gqa_tp4_shares_kv_heads_between_pairs():
    _, module, _ = _rewrite("llama", 1, tp=4, tp_rank=3)
    records = layer_meta(module).shards
    k = records["model.layers.0.self_attn.k_proj.weight"]
    assert module.get_parameter("model.layers.0.self_attn.k_proj.weight").shape == (16, 64)  # one of two kv heads
    assert k.replicas == 2 and k.picks[0] == (1, 1)  # tp rank 3 holds kv head 1, like rank 2
    assert module.get_parameter("model.layers.0.self_attn.q_proj.weight").shape == (16, 64)
    slotted = {n.args[2:] for n in _calls(module, tp_copy) if len(n.args) > 2}
    assert slotted == {(1, 2)}  # gradients of the shared kv head are summed over its pair (slot 1 of 2)
    assert ["B", 1, 1, 16, 16] in _sizes(module, torch.ops.aten.expand.default)


def test_position_bias_is_scattered_t5():
    _, module, _ = _rewrite("t5", 1, tp=2)
    assert len(_calls(module, tp_scatter)) == 1


def test_indivisible_heads_replicate_with_warning_or_refuse():
    with pytest.warns(UserWarning, match="tp=8 does not divide"):
        _, module, result = _rewrite("gpt2", 1, tp=8)
    assert "transformer.h.0.attn.c_attn.weight" not in result.sharded
    assert "transformer.h.0.mlp.c_fc.weight" in result.sharded  # the MLP (256 wide) still splits 8 ways
    with pytest.raises(PlanError, match="c_attn"):
        _rewrite("gpt2", 1, tp=8, strict=True)
