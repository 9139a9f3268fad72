"""Hugging Face safetensors folders (``save_pretrained``'s layout), read slice by slice into a rank's shards.

Only headers are read to check a folder against a model; each rank then reads just the blocks it holds
(``safe_open(...).get_slice``). Nothing in a safetensors file is executed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from galvatron_fx.errors import ConfigError

from .shard_maps import LocalShard


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
        raise ConfigError(
            f"{directory} holds no .safetensors files",
            "point init='safetensors:DIR' at a Hugging Face checkpoint folder",
        )
    return files


@dataclass(frozen=True)
class Stored:
    """One tensor of a safetensors folder: its file, shape and key there."""

    path: Path
    shape: tuple[int, ...]
    key: str


def safetensors_index(directory: str | Path, model: nn.Module | None = None) -> dict[str, Stored]:
    """Model name → where the tensor is stored, for every tensor in a safetensors directory (headers only).
    Keys are renamed to ``model``'s names where Hugging Face renames them on load (``save_pretrained`` of
    transformers 5 writes some models' weights under their former names)."""
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(
            f"safetensors directory {directory} does not exist", "pass the folder of a Hugging Face checkpoint"
        )
    rename = _hf_renaming(model)
    out = {}
    for path in _safetensors_files(directory):
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    out[rename(key)] = Stored(path, tuple(handle.get_slice(key).get_shape()), key)
        except (SafetensorError, OSError) as error:
            raise ConfigError(
                f"{path} is not a readable safetensors file ({error})", "re-export the checkpoint"
            ) from None
    return out


def _hf_renaming(model: nn.Module | None) -> Callable[[str], str]:
    """The renaming Hugging Face applies to a checkpoint key when it loads ``model`` (identity for other models).
    Keys whose tensors HF would also convert (fuse, split...) keep their names: they are not read slice by slice."""
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:
        return lambda key: key
    if not isinstance(model, PreTrainedModel):
        return lambda key: key
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    names = {name: None for name in model.state_dict()}

    def rename(key: str) -> str:
        renamed, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, names)
        return key if converted is not None else renamed

    return rename


def check_safetensors(directory: str | Path, model: nn.Module) -> dict[str, Stored]:
    """Every parameter of ``model`` (under one of its tied names) is in ``directory`` with its shape; else
    ConfigError. Reads headers only; collective-free, so compile() calls it before any communication."""
    index = safetensors_index(directory, model)
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
        elif index[found[0]].shape != tuple(params[key].shape):
            wrong.append(f"{found[0]} {list(index[found[0]].shape)} ≠ {list(params[key].shape)}")
    if missing or wrong:
        raise ConfigError(
            f"the safetensors checkpoint {directory} does not fit the model: "
            + (f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}" if missing else "")
            + ("; " if missing and wrong else "")
            + (f"wrong shapes {wrong[:5]}" if wrong else ""),
            "pass the checkpoint of this model and configuration",
        )
    return index


def load_safetensors(
    model: nn.Module, shards: dict[str, LocalShard], directory: str | Path, buffers: dict[str, LocalShard] | None = None
) -> set[str]:
    """Read each rank's slices of a safetensors directory straight into ``shards`` (``get_slice``: only the
    blocks this rank holds are read), and those of ``buffers`` the folder holds (persistent buffers); returns
    the buffers read. Tied parameters may be stored under any of their names."""
    from safetensors import safe_open

    index = check_safetensors(directory, model)
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    wanted = {
        next(a for a in aliases[id(model.get_parameter(name))] if a in index): shard for name, shard in shards.items()
    }
    stored_buffers = {name: shard for name, shard in (buffers or {}).items() if name in index}
    wrong = [
        f"{name} {list(index[name].shape)} ≠ {list(shard.map.full_shape)}"
        for name, shard in stored_buffers.items()
        if index[name].shape != tuple(shard.map.full_shape)
    ]
    if wrong:
        raise ConfigError(
            f"the safetensors checkpoint {directory} does not fit the model: wrong buffer shapes {wrong[:5]}",
            "pass the checkpoint of this model and configuration",
        )
    handles: dict[Path, Any] = {}
    try:
        for name, shard in {**wanted, **stored_buffers}.items():
            path = index[name].path
            if path not in handles:
                handles[path] = safe_open(str(path), framework="pt").__enter__()
            piece = handles[path].get_slice(index[name].key)
            with torch.no_grad():
                for box in shard.map.boxes():
                    block = piece[tuple(slice(o, o + n) for o, n in zip(box.full_offsets, box.sizes))]
                    box.of(shard.tensor).copy_(block.reshape(box.sizes))
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)
    return set(stored_buffers)
