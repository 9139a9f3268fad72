"""The model's own initialisation, run on a meta model, writing only this rank's shards (``ShardInit``).

The model's initialisation (HF ``_init_weights`` applied to every module children-first as ``PreTrainedModel``
does, else each module's ``reset_parameters``, or any callable) runs on the full-shaped meta model under
``ShardInit``, a dispatch mode that replays each in-place elementwise op (``normal_``, ``uniform_``, ``fill_``,
``zero_``, ``clamp_``, ``mul_``..., ``copy_`` from a real tensor) on the rank's shard only. So fan-in/fan-out and
per-module rules are those of the full model, deterministic values (zeros, ones, constants, copies, a row
picked by ``weight[i]``, buffers such as rotary tables that the initialisation recomputes) are exactly the
eager ones, and every random element has exactly the distribution eager initialisation gives it. Random draws
come from a generator seeded by (seed, parameter, shard position), so replicas of a shard agree on every rank
and stage, and the values do not depend on the global RNG; they are *not* bitwise the values eager ``init``
gives under the same ``torch.manual_seed``. Initialisations that are not elementwise on the parameter (e.g.
``orthogonal_``) raise a ConfigError: pass a safetensors directory instead.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from galvatron_fx.errors import ConfigError

from .shard_maps import LocalShard, ShardMap

aten = torch.ops.aten
_RANDOM = {
    aten.normal_.default,
    aten.uniform_.default,
    aten.bernoulli_.float,
    aten.exponential_.default,
    aten.random_.default,
    getattr(aten.random_, "from"),
    aten.random_.to,
    aten.log_normal_.default,
    aten.cauchy_.default,
    aten.geometric_.default,
}
_FILLS = {aten.fill_.Scalar, aten.fill_.Tensor, aten.zero_.default}
_ALIASES = {aten.detach.default, aten.alias.default, aten.view.default, aten._unsafe_view.default, aten.reshape.default}


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest(), "little") >> 1


class ShardInit(TorchDispatchMode):
    """Runs an initialisation written for full meta parameters on local shards (see the module docstring).
    ``track(meta, name, shard)`` names the full meta tensors and this rank's piece (None: none of it)."""

    def __init__(self, seed: int):
        super().__init__()
        self.tracked: dict[int, tuple[torch.Tensor, str, LocalShard | None]] = {}
        self.seed = seed
        self.draws: dict[str, int] = {}
        self.written: set[str] = set()

    def track(self, meta: torch.Tensor, name: str, shard: LocalShard | None) -> None:
        self.tracked[id(meta)] = (meta, name, shard)

    def _lookup(self, value) -> tuple[torch.Tensor, str, LocalShard | None] | None:
        return self.tracked.get(id(value)) if isinstance(value, torch.Tensor) else None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        hits = [a for a in pytree.tree_leaves((args, kwargs)) if self._lookup(a)]
        if not hits:
            return out
        target = self._lookup(args[0]) if args else None
        mutates = (
            func._schema.arguments
            and func._schema.arguments[0].alias_info is not None
            and func._schema.arguments[0].alias_info.is_write
        )
        if target is not None and mutates:
            self._replay(func, target, args, kwargs)
        elif target is not None and func in _ALIASES and tuple(out.shape) == tuple(args[0].shape):
            self.track(out, target[1], target[2])
        elif target is not None and func in (aten.select.int, aten.slice.Tensor):
            self.track(out, target[1], self._view(func, target, args))
        elif target is not None and isinstance(out, torch.Tensor) and out.is_meta:
            self.track(out, target[1], _POISONED)  # a view we do not follow: writing to it would be lost
        return out

    def _view(self, func, target, args) -> LocalShard | None:
        meta, name, shard = target
        if shard is None or shard is _POISONED:
            return shard
        dim = args[1] % meta.dim() if len(args) > 1 else 0
        idx = shard.map.indices[dim]
        if func is aten.select.int:
            index = args[2] % meta.shape[dim]
            hits = (idx == index).nonzero().flatten()
            if len(hits) == 0:
                return None
            indices = shard.map.indices[:dim] + shard.map.indices[dim + 1 :]
            shape = shard.map.full_shape[:dim] + shard.map.full_shape[dim + 1 :]
            return LocalShard(shard.tensor.select(dim, int(hits[0])), ShardMap(shape, indices))
        start = 0 if args[2] is None else max(args[2] if args[2] >= 0 else args[2] + meta.shape[dim], 0)
        end = (
            meta.shape[dim]
            if len(args) < 4 or args[3] is None
            else min(args[3] if args[3] >= 0 else args[3] + meta.shape[dim], meta.shape[dim])
        )
        if len(args) > 4 and args[4] != 1:
            return _POISONED
        keep = ((idx >= start) & (idx < end)).nonzero().flatten()
        first, count = (int(keep[0]), len(keep)) if len(keep) else (0, 0)
        indices = list(shard.map.indices)
        indices[dim] = idx[first : first + count] - start
        full = list(shard.map.full_shape)
        full[dim] = max(end - start, 0)
        return LocalShard(shard.tensor.narrow(dim, first, count), ShardMap(tuple(full), tuple(indices)))

    def _replay(self, func, target, args, kwargs) -> None:
        meta, name, shard = target
        if shard is None:
            return  # another rank's (or stage's) piece
        if shard is _POISONED:
            raise ConfigError(
                f"the initialisation of {name} writes through a view this runtime cannot follow ({func})",
                "initialise from a safetensors directory (init='safetensors:DIR') or write an elementwise init",
            )
        local = shard.tensor
        self.written.add(name)
        rest = list(args[1:])
        if func is aten.copy_.default:
            src = args[1]
            known = self._lookup(src)
            if known is not None and known[2] not in (None, _POISONED) and known[2].map.key() == shard.map.key():
                value = known[2].tensor
            elif isinstance(src, torch.Tensor) and not src.is_meta:
                value = shard.map.select(src.expand(meta.shape)) if src.dim() else src
            else:
                raise ConfigError(
                    f"the initialisation of {name} copies values computed from the full tensor",
                    "initialise from a safetensors directory (init='safetensors:DIR')",
                )
            with torch.no_grad():
                local.copy_(value)
            return
        for value in rest:
            if isinstance(value, torch.Tensor) and (value.is_meta or value.numel() > 1):
                raise ConfigError(
                    f"the initialisation of {name} combines it with another tensor ({func})",
                    "initialise from a safetensors directory (init='safetensors:DIR')",
                )
        if func in _RANDOM:
            draw = self.draws[name] = self.draws.get(name, 0) + 1
            generator = torch.Generator(local.device).manual_seed(_seed(self.seed, name, shard.map.key(), draw))
            kwargs = {**kwargs, "generator": generator}
        elif func not in _FILLS and torch.Tag.pointwise not in func.tags:
            raise ConfigError(
                f"the initialisation of {name} is not elementwise ({func})",
                "initialise from a safetensors directory (init='safetensors:DIR')",
            )
        with torch.no_grad():
            func(local, *rest, **kwargs)


_POISONED = LocalShard(torch.empty(0), ShardMap((), ()))


def model_init(model: nn.Module) -> Callable[[nn.Module], None]:
    """The model's own initialisation: HF-style ``_init_weights`` on every module children-first (as
    ``PreTrainedModel.init_weights`` applies it), else ``reset_parameters`` of every module that has one."""
    if callable(getattr(model, "_init_weights", None)):
        return lambda m: m.apply(m._init_weights)

    def reset(m: nn.Module) -> None:
        for module in m.modules():
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()

    return reset


def init_shards(
    model: nn.Module,
    shards: dict[str, LocalShard],
    init: Callable[[nn.Module], None] | None = None,
    seed: int = 0,
    buffers: dict[str, LocalShard] | None = None,
) -> set[str]:
    """Fill ``shards`` (user parameter name → LocalShard; every one must be set) and whatever of ``buffers``
    (user buffer name → LocalShard) the initialisation writes, by running ``init`` (default
    ``model_init(model)``) on the meta ``model`` under ``ShardInit``. Returns the buffers written.
    Collective-free."""
    init = init or model_init(model)
    mode = ShardInit(seed)
    named = dict(model.named_parameters(remove_duplicate=False))
    first_name: dict[int, str] = {}
    for name, param in named.items():
        first_name.setdefault(id(param), name)
        mode.track(param, first_name[id(param)], None)
    for name, shard in shards.items():
        if name not in named:
            raise ConfigError(
                f"parameter {name} of the compiled stage is not a parameter of the model",
                "pass the model that was compiled",
            )
        mode.track(named[name], first_name[id(named[name])], shard)  # tied names share one seed: copies agree
    model_buffers = dict(model.named_buffers(remove_duplicate=False))
    for name, shard in (buffers or {}).items():
        if name in model_buffers:
            mode.track(model_buffers[name], name, shard)
    tensors = [*model.parameters(), *model.buffers()]
    flags = {}  # HF skips tensors marked initialised; the meta model's are not real values
    for tensor in tensors:
        flags[id(tensor)] = getattr(tensor, "_is_hf_initialized", None)
        if flags[id(tensor)]:
            tensor._is_hf_initialized = False
    try:
        with torch.no_grad(), mode:
            init(model)
    finally:
        for tensor in tensors:
            if flags.get(id(tensor)):
                tensor._is_hf_initialized = flags[id(tensor)]
    # an init that skips meta tensors (some torch.nn.init functions do) or a parameter no rule covers
    unset = sorted(name for name, shard in shards.items() if first_name[id(named[name])] not in mode.written)
    if unset:
        raise ConfigError(
            f"the initialisation did not set {unset[:5]}{' ...' if len(unset) > 5 else ''} (it skips meta "
            "tensors, or no module rule covers them)",
            "pass init=<a function of the meta model> or init='safetensors:DIR'",
        )
    return {name for name in buffers or {} if name in mode.written}
