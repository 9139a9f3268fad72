"""Trained weights as a Hugging Face folder (``save_pretrained``'s layout), from any plan.

Each stage makes its parameters whole (``Trainer.full_parameters``: FSDP2 shards gathered, tensor-parallel and
vocabulary-parallel shards put back in place, padding rows dropped); the first rank of each stage writes them,
with the stage's persistent buffers, as one safetensors file. One stage gives ``model.safetensors``; several
give ``model-0000k-of-0000P.safetensors`` and ``model.safetensors.index.json``, as ``save_pretrained`` shards.
Tensors carry the user's module's names, so ``from_pretrained`` and ``init="safetensors:DIR"`` read the folder.

Tied weights. The Program keeps a tied weight once; every name it has in the user's module is known. As
``save_pretrained`` does when the config ties them, the weight is written once, under its first name in module
order (GPT-2's ``transformer.wte.weight``, not ``lm_head.weight``), by the lowest stage that holds it: under
pipeline parallelism the embedding and the head live on different stages.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from galvatron_fx.errors import ConfigError

from . import groups
from .checkpoint_files import replace_folder
from .shard_maps import local_buffers

INDEX = "model.safetensors.index.json"


def _aliases(trainer) -> dict[str, list[str]]:
    """Stage parameter name → every name of that parameter in the user's module, first in module order."""
    by_tensor: dict[int, list[str]] = {}
    for name, param in trainer.program.graph_module.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), []).append(name)
    return {name: names for names in by_tensor.values() for name in names}


def _ties(config) -> bool:
    if config is None:
        return True
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", True))


def _persistent_buffers(trainer) -> dict[str, torch.Tensor]:
    # the exported program's state_dict holds parameters and persistent buffers only, as the user's does
    exported = trainer.program.exported
    persistent = set(exported.state_dict) if exported is not None else set()
    return {name: shard.tensor for name, shard in local_buffers(trainer.stage).items() if name in persistent}


def _agree(error: str, directory: Path) -> None:
    """Raise ConfigError on every rank if rank 0 reports an error (a broadcast: no rank is left waiting)."""
    error = groups.broadcast_text(error or "ok").removeprefix("ok")
    if error:
        raise ConfigError(
            f"exporting {directory} failed: {error}",
            "check that the folder's parent exists on every rank, is writable, and has space",
        )


def export_pretrained(trainer, directory: str | Path, config=None, dtype: torch.dtype | None = None) -> Path:
    """Write ``trainer``'s model into ``directory`` as ``save_pretrained`` would: the weights under the
    user's module's names (with its persistent buffers), one safetensors file per pipeline stage plus the
    index when there are several, and ``config.json`` when ``config`` (a ``transformers.PretrainedConfig``)
    is given. ``dtype`` casts floating-point tensors on write (``torch.bfloat16``, say). Returns the folder.

    Collective: every rank calls it with the same folder, which every rank must see. The folder is written
    as ``.<name>.partial`` and renamed at the end, replacing one of that name (with everything in it); no
    rank returns before it is complete. A folder that cannot be written raises ConfigError on every rank."""
    from safetensors.torch import save_file

    directory = Path(directory).absolute()
    partial = directory.with_name(f".{directory.name}.partial")
    rank, position = dist.get_rank(), trainer.stage.position
    error = ""
    if rank == 0:
        try:
            shutil.rmtree(partial, ignore_errors=True)  # left by an export that died
            partial.mkdir(parents=True)
        except OSError as failure:
            error = f"rank 0: {type(failure).__name__}: {failure}"
    _agree(error, directory)  # also a barrier: the folder exists before any stage writes into it

    # which names each stage would write; a name held by several stages (a tied weight) goes to the lowest
    aliases, ties = _aliases(trainer), _ties(config)

    def written(name: str) -> list[str]:
        # a tied weight under its first name only, unless the config unties it (then every name is a weight)
        return aliases.get(name, [name])[: 1 if ties else None]

    buffers = _persistent_buffers(trainer)
    names = sorted({a for n in [*trainer.stage.user_parameters(), *buffers] for a in written(n)})
    held: dict[str, int] = {}
    for text in groups.gather_text(json.dumps([position.stage, names])):
        stage, stage_names = json.loads(text)
        for name in stage_names:
            held[name] = min(held.get(name, stage), stage)
    writing = sorted(set(held.values()))  # stages with something to write, in order: the files' numbers
    files = {
        stage: "model.safetensors" if len(writing) == 1 else f"model-{i + 1:05d}-of-{len(writing):05d}.safetensors"
        for i, stage in enumerate(writing)
    }

    full = trainer.full_parameters()  # collective over the stage's ranks: every rank of the stage calls it
    report: dict[str, Any] = {"error": "", "sizes": {}}
    if position.local == 0 and position.stage in files:
        tensors: dict[str, torch.Tensor] = {}
        for name, value in [*full.items(), *buffers.items()]:
            for alias in written(name):
                if held[alias] == position.stage:
                    if dtype is not None and value.is_floating_point():
                        value = value.to(dtype)
                    # safetensors refuses views and shared storage: each name its own contiguous CPU copy
                    tensors[alias] = value.detach().cpu().contiguous().clone()
        report["sizes"] = {name: tensor.numel() * tensor.element_size() for name, tensor in tensors.items()}
        try:
            save_file(tensors, str(partial / files[position.stage]), metadata={"format": "pt"})
        except Exception as failure:  # reported to every rank below, so that none waits for this one
            report["error"] = f"rank {rank}: {type(failure).__name__}: {failure}"
    reports = [json.loads(text) for text in groups.gather_text(json.dumps(report))]
    failures = [r["error"] for r in reports if r["error"]]
    error = ""
    if rank == 0:
        try:
            if failures:
                shutil.rmtree(partial, ignore_errors=True)
            else:
                if len(files) > 1:
                    weight_map = {n: files[held[n]] for r in reports for n in r["sizes"]}
                    total = sum(size for r in reports for size in r["sizes"].values())
                    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
                    (partial / INDEX).write_text(json.dumps(index, indent=2) + "\n")
                if config is not None:
                    config.save_pretrained(partial)
                replace_folder(partial, directory)
        except Exception as failure:  # any: the other ranks wait for rank 0's word
            error = f"rank 0: {type(failure).__name__}: {failure}"
    _agree("; ".join(failures) or error, directory)  # no rank returns before the folder is complete
    return directory
