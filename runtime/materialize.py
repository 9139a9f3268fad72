"""Models too big for one device: each rank materialises only its own shards.

A model built under ``torch.device("meta")`` is captured and lowered without memory (lowering copies and
shards meta tensors; FSDP2 shards them on meta too). ``materialize(stage, model, init)`` then, on each rank:

1. allocates the stage's parameters and buffers on the device (``to_empty``): FSDP2 parameters as their
   local shards, tensor-parallel parameters at their local shapes, replicated parameters and buffers whole;
2. fills the parameters, with the model's own initialisation (``runtime.shard_init``) or from a Hugging Face
   safetensors directory (``runtime.safetensors_io``);
3. fills the buffers, never leaving uninitialised memory: a buffer the user's model holds for real (built
   with parameters on meta and buffers real, as ``empty_parameters()`` or accelerate's ``init_empty_weights()``
   do) keeps that value; a persistent buffer in the safetensors folder is read from it; the rest are
   recomputed by the model's initialisation where it recomputes them (Hugging Face's ``_init_weights`` does
   for rotary tables, position ids and relative position indices). A buffer none of these gives raises a
   ConfigError that names it.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn as nn

from galvatron_fx.errors import ConfigError

from .safetensors_io import load_safetensors
from .shard_init import init_shards
from .shard_maps import LocalShard, local_buffers, local_shards


def has_meta_parameters(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def real_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers of ``model`` that hold values (not on the meta device), by name, as copies."""
    return {
        name: buffer.detach().clone()
        for name, buffer in model.named_buffers(remove_duplicate=False)
        if not buffer.is_meta
    }


@contextlib.contextmanager
def buffers_on_meta(model: nn.Module) -> Iterator[None]:
    """Within this context every buffer of ``model`` is a meta tensor (a meta model is captured with meta
    values only); the real ones are put back on exit."""
    saved = []
    for module in model.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and not buffer.is_meta:
                saved.append((module, name, buffer))
                module._buffers[name] = buffer.to("meta")
    try:
        yield
    finally:
        for module, name, buffer in saved:
            module._buffers[name] = buffer


@contextlib.contextmanager
def empty_parameters() -> Iterator[None]:
    """Build a model with its parameters on the meta device and its buffers real (computed as ``__init__``
    computes them): ``with galvatron_fx.empty_parameters(): model = MyModel(config)``. The same convention as
    accelerate's ``init_empty_weights()``; ``compile`` then keeps those buffers' values."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _to_empty_in_place(module: nn.Module, device: torch.device) -> None:
    """``to_empty`` keeping every Parameter object (the optimizer, gradient buckets and tied layers hold
    them): swap instead of replace. FSDP2 re-points its sharded storage at the new local tensors. A buffer
    that several layers read (LLaMA's ``inv_freq``: each layer rebuilds its rotary table) stays one tensor:
    ``to_empty`` would give each module its own, and only one would be filled."""
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for owner in module.modules():
        for name, buffer in owner._buffers.items():
            if buffer is not None:
                holders.setdefault(id(buffer), []).append((owner, name))
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        module.to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    for (first, first_name), *others in holders.values():
        for owner, name in others:
            owner._buffers[name] = first._buffers[first_name]


def materialize(
    stage,
    model: nn.Module,
    init: "str | Callable[[nn.Module], None]" = "model",
    seed: int = 0,
    device: torch.device | str | None = None,
    known_buffers: dict[str, torch.Tensor] | None = None,
) -> None:
    """Give ``stage`` (lowered and wrapped for data parallelism) real values, on each rank only its shards:
    allocate meta tensors on ``device`` in place (optimizer references stay valid), fill every parameter by
    ``init``: ``"model"`` (the model's own initialisation, ``runtime.shard_init``), a callable taking the full
    meta model, or ``"safetensors:DIR"``; then every buffer that was on meta (see the module docstring),
    ``known_buffers`` (name → value: the user's real buffers) first. Collective-free."""
    if not (init == "model" or callable(init) or (isinstance(init, str) and init.startswith("safetensors:"))):
        raise ConfigError(f"init={init!r} is unknown", "use 'model', 'safetensors:DIR' or a function of the model")
    empty = {name: shard for name, shard in local_buffers(stage).items() if shard.tensor.is_meta}
    if device is not None and (has_meta_parameters(stage) or empty):
        _to_empty_in_place(stage, torch.device(device))
    shards = local_shards(stage)
    buffers = {name: shard for name, shard in local_buffers(stage).items() if name in empty}
    unfilled = _copy_known(buffers, known_buffers or {})
    if isinstance(init, str):
        if init.startswith("safetensors:"):
            unfilled -= load_safetensors(
                model, shards, init.removeprefix("safetensors:"), {n: buffers[n] for n in unfilled}
            )
            shards = {}  # the parameters are read; the initialisation below only recomputes buffers
        init = None
    if shards or unfilled:
        unfilled -= init_shards(model, shards, init, seed, {n: buffers[n] for n in unfilled})
    if unfilled:
        raise ConfigError(
            f"buffers {sorted(unfilled)[:5]} of {type(model).__name__} are on the meta device and nothing "
            "gives their values (not the checkpoint, not the model's initialisation)",
            "build the model with parameters on meta and buffers real (with galvatron_fx.empty_parameters(): "
            "or accelerate's init_empty_weights()), or give them in the safetensors folder",
        )


def _copy_known(buffers: dict[str, LocalShard], known: dict[str, torch.Tensor]) -> set[str]:
    """Copy the values the user's model holds; returns the names still to fill."""
    with torch.no_grad():
        for name, shard in buffers.items():
            if name in known:
                shard.tensor.copy_(known[name])
    return {name for name in buffers if name not in known}
