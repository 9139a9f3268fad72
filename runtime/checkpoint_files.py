"""The files of a checkpoint: the manifest that marks it complete (its step, plan, optimizer hyperparameters,
tensors, and every file's size and SHA-256), DCP's metadata read without unpickling anything else, the atomic
rename that completes a save, and the newest complete checkpoint of a folder. runtime/checkpoint.py saves and
loads through them."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from galvatron_fx.errors import GalvatronError

from . import groups

FORMAT = "galvatron-fx-checkpoint/1"
MANIFEST = "galvatron_checkpoint.json"
NOT_HYPERPARAMETERS = ("params", "param_names")  # which tensors a group holds depends on the plan


class CheckpointError(GalvatronError):
    """A checkpoint is half-written, corrupt, or belongs to another model."""


# -- DCP metadata, unpickled safely --------------------------------------------------------------------------
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", n)
    for n in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("collections", "OrderedDict"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("torch.distributed.checkpoint.planner", "WriteItemType"),
    ("torch.distributed.checkpoint.planner", "LoadItemType"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits DCP's metadata classes and torch dtypes/layouts/memory formats, nothing else."""

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(
            getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)
        ):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of checkpoint metadata")


class SafeReader(FileSystemReader):
    """DCP's file reader, whose metadata goes through ``_MetadataUnpickler``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        with open(Path(self.path) / ".metadata", "rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{self.path}/.metadata is not checkpoint metadata", "save the checkpoint again")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# -- manifest ------------------------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _json_safe(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_json_safe(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)


def _own_files(folder: Path, rank: int, world_size: int) -> list[Path]:
    """The files of a saved checkpoint that ``rank`` hashes: those DCP wrote for it (``__{rank}_*``); rank 0
    also takes the ones no rank's prefix claims (``.metadata``). Spreads the hashing over the ranks."""
    claimed = {f"__{r}_" for r in range(world_size)}
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return [
        p
        for p in files
        if p.name.startswith(f"__{rank}_") or (rank == 0 and not any(p.name.startswith(c) for c in claimed))
    ]


def hash_own_files(folder: Path) -> dict[str, dict[str, Any]]:
    """Every saved file with its size and SHA-256, each hashed by one rank (collective)."""
    mine = {
        p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)}
        for p in _own_files(folder, dist.get_rank(), dist.get_world_size())
    }
    files: dict[str, dict[str, Any]] = {}
    for text in groups.gather_text(json.dumps(mine)):
        files.update(json.loads(text))
    return dict(sorted(files.items()))


def write_manifest(folder: Path, metadata: Metadata, trainer, files: dict[str, dict[str, Any]]) -> None:
    tensors = {
        key: {"shape": list(md.size), "dtype": str(md.properties.dtype).removeprefix("torch.")}
        for key, md in sorted(metadata.state_dict_metadata.items())
    }
    groups = [
        {k: _json_safe(v) for k, v in group.items() if k not in NOT_HYPERPARAMETERS}
        for group in trainer.optimizer.param_groups
    ]
    manifest = {
        "format": FORMAT,
        "model": trainer.program.model_name,
        "step": trainer.steps_done,
        "world_size": dist.get_world_size(),
        "plan": trainer.plan.to_json_dict(),
        "optimizer": {"class": type(trainer.optimizer).__name__, "param_groups": groups},
        "tensors": tensors,
        "files": files,
    }
    temporary = folder / (MANIFEST + ".tmp")
    with open(temporary, "w") as handle:
        json.dump(manifest, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, folder / MANIFEST)


def read_manifest(folder: str | Path, verify_files: bool = True) -> dict[str, Any]:
    """The manifest of a complete checkpoint; CheckpointError if the folder is missing, half-written, not a
    galvatron_fx checkpoint, a file's size differs from the manifest, or (``verify_files``) its SHA-256."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist", "pass the folder save_checkpoint wrote")
    if not path.is_file():
        raise CheckpointError(
            f"{folder} has no {MANIFEST}: it is half-written or not a galvatron_fx checkpoint",
            "load a checkpoint that save_checkpoint completed",
        )
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(
            f"{path} is not valid JSON ({error})", "the checkpoint is corrupt: load another one"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} manifest", "load a checkpoint written by save_checkpoint")
    for name, entry in manifest["files"].items():
        file = folder / name
        if not file.is_file() or file.stat().st_size != entry["bytes"]:
            raise CheckpointError(
                f"checkpoint file {file} is missing or has the wrong size",
                "the checkpoint is corrupt: load another one",
            )
        if verify_files and sha256(file) != entry["sha256"]:
            raise CheckpointError(
                f"checkpoint file {file} does not match its SHA-256", "the checkpoint is corrupt: load another one"
            )
    return manifest


def check_hash(file: Path, manifest: dict[str, Any]) -> None:
    entry = manifest["files"].get(file.name)
    if entry is None or sha256(file) != entry["sha256"]:
        raise CheckpointError(
            f"checkpoint file {file} does not match its SHA-256", "the checkpoint is corrupt: load another one"
        )


# -- completing a save, finding the newest ---------------------------------------------------------------------
def replace_folder(partial: Path, folder: Path) -> None:
    """Put the written ``partial`` folder in the place of ``folder`` (replacing it), durably."""
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(partial, folder)
    shutil.rmtree(old, ignore_errors=True)
    descriptor = os.open(folder.parent, os.O_RDONLY)
    try:
        os.fsync(descriptor)  # the rename itself is durable
    finally:
        os.close(descriptor)


def latest(root: str | Path) -> Path | None:
    """The complete checkpoint with the highest step among the folders of ``root`` (None if there is none).
    Folders being written (``.name.partial``) and folders without a valid manifest are skipped."""
    best: tuple[int, str] | None = None
    root = Path(root)
    for child in sorted(root.iterdir()) if root.is_dir() else ():
        if child.name.startswith(".") or not (child / MANIFEST).is_file():
            continue
        try:
            manifest = read_manifest(child, verify_files=False)
        except CheckpointError:
            continue
        key = (int(manifest["step"]), child.name)
        best = max(best, key) if best else key
    return root / best[1] if best else None
