"""Models too big for one device: each rank materialises only its own shards.

A model built under ``torch.device("meta")`` is captured and lowered without memory (lowering copies and
shards meta tensors; FSDP2 shards them on meta too). ``materialize(stage, model, init)`` then, on each rank:

1. allocates the stage's parameters on the device (``to_empty``): FSDP2 parameters as their local shards,
   tensor-parallel parameters at their local shapes, replicated parameters whole;
2. fills them, either with the model's own initialisation or from a Hugging Face safetensors directory.

Where a local tensor sits in the full one is a ``ShardMap``: along each dim, the increasing full indices it
holds (tensor parallelism keeps a set of heads along one dim, FSDP2 a range of dim 0 of that). Checkpoints
use the same maps (``runtime.checkpoint``).

What ``init="model"`` guarantees. The model's initialisation (HF ``_init_weights`` applied to every module
children-first as ``PreTrainedModel`` does, else each module's ``reset_parameters``, or any callable) runs on
the full-shaped meta model under ``ShardInit``, a dispatch mode that replays each in-place elementwise op
(``normal_``, ``uniform_``, ``fill_``, ``zero_``, ``clamp_``, ``mul_``..., ``copy_`` from a real tensor) on the
rank's shard only. So fan-in/fan-out and per-module rules are those of the full model, deterministic values
(zeros, ones, constants, copies, a row picked by ``weight[i]``) are exactly the eager ones, and every
random element has exactly the distribution eager initialisation gives it. Random draws come from a generator
seeded by (seed, parameter, shard position), so replicas of a shard agree on every rank and stage, and the
values do not depend on the global RNG; they are *not* bitwise the values eager ``init`` gives under the same
``torch.manual_seed``. Initialisations that are not elementwise on the parameter (e.g. ``orthogonal_``) raise
a ConfigError: pass a safetensors directory instead.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.utils._python_dispatch import TorchDispatchMode

from galvatron_fx.errors import ConfigError

aten = torch.ops.aten


# -- where a local tensor lives in the full one ----------------------------------------------------------
@dataclass(frozen=True)
class Box:
    """A block held locally: ``sizes`` elements from ``full_offsets`` of the full tensor, found at
    ``local_offsets`` of the local tensor."""

    full_offsets: tuple[int, ...]
    local_offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    def of(self, local: torch.Tensor) -> torch.Tensor:
        """The view of ``local`` this box covers."""
        for dim, (start, size) in enumerate(zip(self.local_offsets, self.sizes)):
            local = local.narrow(dim, start, size)
        return local


@dataclass(frozen=True)
class ShardMap:
    """A local tensor is ``full[indices[0]][:, indices[1]]...``: per dim, the full indices it holds (increasing)."""

    full_shape: tuple[int, ...]
    indices: tuple[torch.Tensor, ...]

    @classmethod
    def whole(cls, shape) -> "ShardMap":
        return cls(tuple(shape), tuple(torch.arange(n) for n in shape))

    @property
    def local_shape(self) -> tuple[int, ...]:
        return tuple(len(i) for i in self.indices)

    @property
    def is_whole(self) -> bool:
        return self.local_shape == self.full_shape

    def restrict(self, dim: int, start: int, length: int) -> "ShardMap":
        """The map of ``local.narrow(dim, start, length)``."""
        indices = list(self.indices)
        indices[dim] = indices[dim][start:start + length]
        return ShardMap(self.full_shape, tuple(indices))

    def runs(self, dim: int) -> list[tuple[int, int, int]]:
        """Contiguous runs along ``dim``: ``(full_start, local_start, length)``."""
        idx = self.indices[dim].tolist()
        out: list[tuple[int, int, int]] = []
        for local, full in enumerate(idx):
            if out and out[-1][0] + out[-1][2] == full:
                out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
            else:
                out.append((full, local, 1))
        return out

    def boxes(self) -> Iterator[Box]:
        """The local tensor as blocks of the full one (the product of each dim's runs)."""
        for combo in itertools.product(*(self.runs(d) for d in range(len(self.full_shape)))):
            yield Box(tuple(r[0] for r in combo), tuple(r[1] for r in combo), tuple(r[2] for r in combo))

    def select(self, full: torch.Tensor) -> torch.Tensor:
        """This shard of ``full`` (any tensor of ``full_shape``)."""
        for dim, idx in enumerate(self.indices):
            if len(idx) != full.shape[dim]:
                full = full.index_select(dim, idx.to(full.device))
        return full

    def key(self) -> str:
        """Names the shard: replicas of a shard have the same key."""
        return ";".join(",".join(f"{a}+{n}" for a, _, n in self.runs(d)) for d in range(len(self.full_shape)))


@dataclass
class LocalShard:
    """A rank's piece of a parameter: ``tensor`` (a plain tensor, the parameter's own storage) and its map."""

    tensor: torch.Tensor
    map: ShardMap


def _tp_records(stage) -> dict[str, Any]:
    from galvatron_fx.passes.lower_stage import unwrap
    from galvatron_fx.passes.tensor_parallel import META_KEY

    records = {}
    for layer in stage.stage_layers:
        records.update(unwrap(stage.layers[layer.name]).meta.get(META_KEY, {}))
    return records


def shard_map(param: torch.Tensor, record=None) -> ShardMap:
    """Where ``param`` (a stage parameter, maybe a DTensor, maybe tensor-parallel with ShardRecord
    ``record``) sits in the user's full parameter."""
    if record is not None:
        from galvatron_fx.passes.collectives import select_local

        full = tuple(record.full_shape)
        kept = select_local(torch.arange(full[record.dim]), ((0, record.digit_sizes, record.picks),))
        indices = [torch.arange(n) for n in full]
        indices[record.dim] = kept
        smap = ShardMap(full, tuple(indices))
    else:
        smap = ShardMap.whole(param.shape)
    if isinstance(param, DTensor):  # FSDP2: a block of the (tensor-parallel local) tensor
        sizes, offsets = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        for dim, (size, offset) in enumerate(zip(sizes, offsets)):
            if size != param.shape[dim]:
                smap = smap.restrict(dim, offset, size)
    return smap


def local_shards(stage) -> dict[str, LocalShard]:
    """User parameter name → this rank's piece of it, for every parameter of ``stage``."""
    records = _tp_records(stage)
    out = {}
    for name, param in stage.user_parameters().items():
        local = param.to_local() if isinstance(param, DTensor) else param
        out[name] = LocalShard(local.detach(), shard_map(param, records.get(name)))
    return out


# -- initialisation on shards ------------------------------------------------------------------------------
_RANDOM = {aten.normal_.default, aten.uniform_.default, aten.bernoulli_.float, aten.exponential_.default,
           aten.random_.default, getattr(aten.random_, "from"), aten.random_.to, aten.log_normal_.default, aten.cauchy_.default,
           aten.geometric_.default}
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
        mutates = func._schema.arguments and func._schema.arguments[0].alias_info is not None \
            and func._schema.arguments[0].alias_info.is_write
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
            indices = shard.map.indices[:dim] + shard.map.indices[dim + 1:]
            shape = shard.map.full_shape[:dim] + shard.map.full_shape[dim + 1:]
            return LocalShard(shard.tensor.select(dim, int(hits[0])), ShardMap(shape, indices))
        start = 0 if args[2] is None else max(args[2] if args[2] >= 0 else args[2] + meta.shape[dim], 0)
        end = meta.shape[dim] if len(args) < 4 or args[3] is None else min(args[3] if args[3] >= 0 else args[3] + meta.shape[dim], meta.shape[dim])
        if len(args) > 4 and args[4] != 1:
            return _POISONED
        keep = ((idx >= start) & (idx < end)).nonzero().flatten()
        first, count = (int(keep[0]), len(keep)) if len(keep) else (0, 0)
        indices = list(shard.map.indices)
        indices[dim] = idx[first:first + count] - start
        full = list(shard.map.full_shape)
        full[dim] = max(end - start, 0)
        return LocalShard(shard.tensor.narrow(dim, first, count), ShardMap(tuple(full), tuple(indices)))

    def _replay(self, func, target, args, kwargs) -> None:
        meta, name, shard = target
        if shard is None:
            return  # another rank's (or stage's) piece
        if shard is _POISONED:
            raise ConfigError(f"the initialisation of {name} writes through a view this runtime cannot follow ({func})",
                              "initialise from a safetensors directory (init='safetensors:DIR') or write an elementwise init")
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
                raise ConfigError(f"the initialisation of {name} copies values computed from the full tensor",
                                  "initialise from a safetensors directory (init='safetensors:DIR')")
            with torch.no_grad():
                local.copy_(value)
            return
        for value in rest:
            if isinstance(value, torch.Tensor) and (value.is_meta or value.numel() > 1):
                raise ConfigError(f"the initialisation of {name} combines it with another tensor ({func})",
                                  "initialise from a safetensors directory (init='safetensors:DIR')")
        if func in _RANDOM:
            draw = self.draws[name] = self.draws.get(name, 0) + 1
            generator = torch.Generator(local.device).manual_seed(_seed(self.seed, name, shard.map.key(), draw))
            kwargs = {**kwargs, "generator": generator}
        elif func not in _FILLS and torch.Tag.pointwise not in func.tags:
            raise ConfigError(f"the initialisation of {name} is not elementwise ({func})",
                              "initialise from a safetensors directory (init='safetensors:DIR')")
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


def init_shards(model: nn.Module, shards: dict[str, LocalShard], init: Callable[[nn.Module], None] | None = None,
                seed: int = 0) -> None:
    """Fill ``shards`` (user name → LocalShard) by running ``init`` (default ``model_init(model)``) on the
    meta ``model`` under ``ShardInit``. Collective-free."""
    init = init or model_init(model)
    mode = ShardInit(seed)
    named = dict(model.named_parameters(remove_duplicate=False))
    first_name: dict[int, str] = {}
    for name, param in named.items():
        first_name.setdefault(id(param), name)
        mode.track(param, first_name[id(param)], None)
    for name, shard in shards.items():
        if name not in named:
            raise ConfigError(f"parameter {name} of the compiled stage is not a parameter of the model",
                              "pass the model that was compiled")
        mode.track(named[name], first_name[id(named[name])], shard)  # tied names share one seed: copies agree
    flags = {}  # HF skips tensors marked initialised; the meta model's are not real values
    for param in model.parameters():
        flags[id(param)] = getattr(param, "_is_hf_initialized", None)
        if flags[id(param)]:
            param._is_hf_initialized = False
    try:
        with torch.no_grad(), mode:
            init(model)
    finally:
        for param in model.parameters():
            if flags.get(id(param)):
                param._is_hf_initialized = flags[id(param)]
    # an init that skips meta tensors (some torch.nn.init functions do) or a parameter no rule covers
    unset = sorted(name for name, shard in shards.items() if first_name[id(named[name])] not in mode.written)
    if unset:
        raise ConfigError(f"the initialisation did not set {unset[:5]}{' ...' if len(unset) > 5 else ''} (it skips meta "
                          "tensors, or no module rule covers them)", "pass init=<a function of the meta model> or "
                          "init='safetensors:DIR'")


# -- safetensors -----------------------------------------------------------------------------------------
def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"{index} is not a safetensors index ({error})", "fix or remove the index file") from None
        return sorted({directory / f for f in weight_map.values()})
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{directory} holds no .safetensors files", "point init='safetensors:DIR' at a Hugging Face checkpoint folder")
    return files


def safetensors_index(directory: str | Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Tensor name → (file, shape) of every tensor in a safetensors directory (headers only)."""
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"safetensors directory {directory} does not exist", "pass the folder of a Hugging Face checkpoint")
    out = {}
    for path in _safetensors_files(directory):
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    out[key] = (path, tuple(handle.get_slice(key).get_shape()))
        except (SafetensorError, OSError) as error:
            raise ConfigError(f"{path} is not a readable safetensors file ({error})", "re-export the checkpoint") from None
    return out


def check_safetensors(directory: str | Path, model: nn.Module) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Every parameter of ``model`` (under one of its tied names) is in ``directory`` with its shape; else
    ConfigError. Reads headers only; collective-free, so compile() calls it before any communication."""
    index = safetensors_index(directory)
    names: dict[int, list[str]] = {}
    params = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
        params[id(param)] = param
    missing, wrong = [], []
    for key, aliases in names.items():
        found = [a for a in aliases if a in index]
        if not found:
            missing.append(aliases[0])
        elif index[found[0]][1] != tuple(params[key].shape):
            wrong.append(f"{found[0]} {list(index[found[0]][1])} ≠ {list(params[key].shape)}")
    if missing or wrong:
        raise ConfigError(f"the safetensors checkpoint {directory} does not fit the model: "
                          + (f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}" if missing else "")
                          + ("; " if missing and wrong else "") + (f"wrong shapes {wrong[:5]}" if wrong else ""),
                          "pass the checkpoint of this model and configuration")
    return index


def load_safetensors(model: nn.Module, shards: dict[str, LocalShard], directory: str | Path) -> None:
    """Read each rank's slices of a safetensors directory straight into ``shards`` (``get_slice``: only the
    blocks this rank holds are read). Tied parameters may be stored under any of their names."""
    from safetensors import safe_open

    index = check_safetensors(directory, model)
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    handles: dict[Path, Any] = {}
    try:
        for name, shard in shards.items():
            stored = next(a for a in aliases[id(model.get_parameter(name))] if a in index)
            path = index[stored][0]
            if path not in handles:
                handles[path] = safe_open(str(path), framework="pt").__enter__()
            piece = handles[path].get_slice(stored)
            with torch.no_grad():
                for box in shard.map.boxes():
                    block = piece[tuple(slice(o, o + n) for o, n in zip(box.full_offsets, box.sizes))]
                    box.of(shard.tensor).copy_(block.reshape(box.sizes))
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)


# -- the step compile() runs ---------------------------------------------------------------------------------
def has_meta_parameters(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def _to_empty_in_place(module: nn.Module, device: torch.device) -> None:
    """``to_empty`` keeping every Parameter object (the optimizer, gradient buckets and tied layers hold
    them): swap instead of replace. FSDP2 re-points its sharded storage at the new local tensors."""
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        module.to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)


def materialize(stage, model: nn.Module, init: "str | Callable[[nn.Module], None]" = "model", seed: int = 0,
                device: torch.device | str | None = None) -> None:
    """Give ``stage`` (lowered and wrapped for data parallelism) real values, on each rank only its shards:
    allocate meta parameters on ``device`` in place (optimizer references stay valid), then fill every
    parameter by ``init``: ``"model"`` (the model's own initialisation, see the module docstring), a callable
    taking the full meta model, or ``"safetensors:DIR"``. Collective-free."""
    if device is not None and has_meta_parameters(stage):
        _to_empty_in_place(stage, torch.device(device))
    shards = local_shards(stage)
    if isinstance(init, str) and init.startswith("safetensors:"):
        load_safetensors(model, shards, init.removeprefix("safetensors:"))
    elif init == "model" or callable(init):
        init_shards(model, shards, None if init == "model" else init, seed)
    else:
        raise ConfigError(f"init={init!r} is unknown", "use 'model', 'safetensors:DIR' or a function of the model")
