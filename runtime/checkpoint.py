"""Checkpoints with torch.distributed.checkpoint (DCP): sharded, atomic, loadable under another plan.

What is saved. Every parameter under the user's fully-qualified name (``model/<name>``) in its full shape,
each rank writing only the blocks it holds: FSDP2 shards, tensor-parallel shards (their ``ShardMap``, see
``runtime.materialize``, cut into boxes) and replicated tensors (DCP keeps one copy). Optimizer states of the
parameter's shape follow the parameter's blocks (``optim/<name>/<state>``); scalars such as Adam's ``step``
are saved whole. Each rank's RNG state is ``rng/<rank>/<device>``. A JSON manifest holds the step counter, the
plan, the optimizer's hyperparameters, every tensor's shape and dtype, and the size and SHA-256 of every file
(each rank hashes the files it wrote, so that hashing a large checkpoint is spread over the ranks).

Resharding. On load each rank asks DCP for the blocks *it* holds under the current plan; DCP reads the
overlapping parts of the saved blocks, whatever plan or world size wrote them. RNG states are restored only
when the world size is the same (the trainer's dropout draws from (seed, step) anyway).

Atomicity. All ranks write into ``.<name>.partial`` next to the target; rank 0 then writes the manifest (the
completion marker) and renames the folder to its name. A folder without a valid manifest, with a file whose
size differs, a file a rank reads whose hash differs (each rank hashes only what it reads), or written for
another model is refused with a CheckpointError on every rank before the load's collectives (one all-gather
of the ranks' findings first, so that none is left waiting). Nothing is unpickled freely: tensors load with
``weights_only=True`` and DCP's metadata file with an unpickler that admits only DCP's own metadata classes.
The folder must be visible to all ranks.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from . import groups
from .checkpoint_files import (
    MANIFEST,
    NOT_HYPERPARAMETERS,
    CheckpointError,
    SafeReader,
    check_hash,
    hash_own_files,
    latest,
    read_manifest,
    replace_folder,
    write_manifest,
)
from .shard_maps import LocalShard, ShardMap, local_shards, local_tensor

__all__ = ["MANIFEST", "CheckpointError", "latest", "load", "read_manifest", "save", "state_shards"]


# -- what each rank holds ------------------------------------------------------------------------------------
def _local(value: torch.Tensor) -> torch.Tensor:
    return local_tensor(value).detach()


def _rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def state_shards(trainer, with_optimizer: bool = True) -> dict[str, LocalShard]:
    """Checkpoint key → this rank's piece of it (a view of the live tensor and where it sits in the full one)."""
    params = local_shards(trainer.stage)
    out = {f"model/{name}": shard for name, shard in params.items()}
    if with_optimizer:
        live = trainer.stage.user_parameters()
        for name, param in live.items():
            for key, value in trainer.optimizer.state.get(param, {}).items():
                if not isinstance(value, torch.Tensor):
                    continue
                local = _local(value)
                same = local.dim() > 0 and tuple(local.shape) == params[name].map.local_shape
                out[f"optim/{name}/{key}"] = LocalShard(
                    local, params[name].map if same else ShardMap.whole(local.shape)
                )
    rank = dist.get_rank()
    for device, state in _rng_states(trainer.device).items():
        out[f"rng/{rank}/{device}"] = LocalShard(state, ShardMap.whole(state.shape))
    return out


# -- DCP planners over boxes -----------------------------------------------------------------------------------
class _BoxSavePlanner(DefaultSavePlanner):
    """Writes each LocalShard as the boxes of the full tensor it covers; DCP drops duplicate boxes (replicas)."""

    def __init__(self, shards: dict[str, LocalShard]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.shards = shards
        self.blocks: dict[MetadataIndex, torch.Tensor] = {}

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator: bool = False) -> None:
        self.state_dict, self.is_coordinator = state_dict, is_coordinator

    def create_local_plan(self) -> SavePlan:
        items = []
        for key, shard in self.shards.items():
            properties = TensorProperties.create_from_tensor(shard.tensor)
            for box in shard.map.boxes():
                index = MetadataIndex(key, box.full_offsets)
                self.blocks[index] = box.of(shard.tensor)
                chunk = ChunkStorageMetadata(offsets=torch.Size(box.full_offsets), sizes=torch.Size(box.sizes))
                items.append(
                    WriteItem(
                        index=index,
                        type=WriteItemType.SHARD,
                        tensor_data=TensorWriteData(
                            chunk=chunk, properties=properties, size=torch.Size(shard.map.full_shape)
                        ),
                    )
                )
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        return self.blocks[write_item.index].detach().clone()  # its own storage: only the block is written


class _BoxLoadPlanner(DefaultLoadPlanner):
    """Reads, for each LocalShard, the parts of the saved blocks that overlap the boxes this rank holds."""

    def __init__(self, shards: dict[str, LocalShard]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.shards = shards
        self.targets: dict[tuple[str, int], torch.Tensor] = {}

    def set_up_planner(self, state_dict, metadata: Metadata | None = None, is_coordinator: bool = False) -> None:
        self.state_dict, self.metadata, self.is_coordinator = state_dict, metadata, is_coordinator

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, shard in self.shards.items():
            boxes = list(shard.map.boxes())
            for i, box in enumerate(boxes):
                self.targets[(key, i)] = box.of(shard.tensor)
            chunks = [ChunkStorageMetadata(torch.Size(b.full_offsets), torch.Size(b.sizes)) for b in boxes]
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], chunks)
        return LoadPlan(items)

    def resolve_tensor(self, read_item) -> torch.Tensor:
        target = self.targets[(read_item.dest_index.fqn, read_item.dest_index.index)]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            target = target.narrow(dim, start, length)
        return target

    def commit_tensor(self, read_item, tensor: torch.Tensor) -> None:
        pass  # resolve_tensor returned a view of the live tensor: the data is already in place


def _verify_what_is_read(folder: Path, manifest: dict[str, Any], shards: dict[str, LocalShard]) -> None:
    """SHA-256 of the metadata and of the files this rank's shards are read from (DCP's read plan, made
    locally), against the manifest: no rank hashes a file it does not read."""
    check_hash(folder / ".metadata", manifest)
    planner = _BoxLoadPlanner(shards)
    metadata = SafeReader(folder).read_metadata()
    planner.set_up_planner({}, metadata)
    read = {metadata.storage_data[item.storage_index].relative_path for item in planner.create_local_plan().items}
    for name in sorted(read):
        check_hash(folder / name, manifest)


def _check_fits(manifest: dict[str, Any], trainer, shards: dict[str, LocalShard], folder: Path) -> None:
    tensors = manifest["tensors"]
    saved = {k.removeprefix("model/"): tuple(v["shape"]) for k, v in tensors.items() if k.startswith("model/")}
    expected = trainer.program.parameter_shapes()
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    wrong = [f"{n} {list(saved[n])} ≠ {list(s)}" for n, s in expected.items() if n in saved and saved[n] != s]
    if missing or extra or wrong:
        parts = [
            f"missing {missing[:4]}" if missing else "",
            f"unexpected {extra[:4]}" if extra else "",
            f"wrong shapes {wrong[:4]}" if wrong else "",
        ]
        raise CheckpointError(
            f"checkpoint {folder} (model {manifest.get('model')}) does not fit {trainer.program.model_name}: "
            + "; ".join(p for p in parts if p),
            "load a checkpoint of this model and configuration",
        )
    for key, shard in shards.items():
        if key.startswith("rng/"):
            continue
        entry = tensors.get(key)
        if entry is None:
            raise CheckpointError(
                f"checkpoint {folder} has no {key}", "load a checkpoint saved with the same optimizer"
            )
        if tuple(entry["shape"]) != shard.map.full_shape or entry["dtype"] != str(shard.tensor.dtype).removeprefix(
            "torch."
        ):
            raise CheckpointError(
                f"{key} is {entry['dtype']}{entry['shape']} in {folder} but {shard.tensor.dtype}"
                f"{list(shard.map.full_shape)} here",
                "load a checkpoint of this model and configuration",
            )


def _optimizer_shards(trainer, manifest: dict[str, Any]) -> dict[str, LocalShard]:
    """Empty optimizer states for this rank's parameters, shaped as the checkpoint says, registered with the
    optimizer (DCP fills them in place)."""
    saved_class = manifest["optimizer"]["class"]
    if saved_class != type(trainer.optimizer).__name__:
        raise CheckpointError(
            f"the checkpoint's optimizer is {saved_class}, this one is {type(trainer.optimizer).__name__}",
            "use the optimizer the checkpoint was trained with",
        )
    params = local_shards(trainer.stage)
    dtypes = {k: getattr(torch, v["dtype"]) for k, v in manifest["tensors"].items()}
    out = {}
    for name, param in trainer.stage.user_parameters().items():
        prefix = f"optim/{name}/"
        state = {}
        for key in (k for k in manifest["tensors"] if k.startswith(prefix)):
            shape = tuple(manifest["tensors"][key]["shape"])
            if shape and shape == params[name].map.full_shape:
                value = torch.zeros_like(param, dtype=dtypes[key])
                out[key] = LocalShard(_local(value), params[name].map)
            else:
                value = torch.zeros(shape, dtype=dtypes[key])
                out[key] = LocalShard(value, ShardMap.whole(shape))
            state[key.removeprefix(prefix)] = value
        if state:
            trainer.optimizer.state[param] = state
    return out


# -- save and load -------------------------------------------------------------------------------------------
def save(trainer, folder: str | Path) -> Path:
    """Write a checkpoint of ``trainer`` into ``folder`` (replaced if it exists), atomically. Collective: every
    rank calls it with the same folder, which all ranks see."""

    folder = Path(folder).absolute()
    partial = folder.with_name(f".{folder.name}.partial")
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)  # left by a save that died
        partial.mkdir(parents=True)
    dist.barrier()
    planner = _BoxSavePlanner(state_shards(trainer))
    dcp.save({}, storage_writer=FileSystemWriter(partial), planner=planner)
    files = hash_own_files(partial)
    error = ""
    if dist.get_rank() == 0:
        try:
            write_manifest(partial, planner.metadata, trainer, files)
            replace_folder(partial, folder)
        except OSError as failure:
            error = f"{type(failure).__name__}: {failure}"
    error = groups.broadcast_text(error or "ok").removeprefix("ok")
    if error:
        raise CheckpointError(
            f"writing checkpoint {folder} failed on rank 0: {error}", "check the folder's space and permissions"
        )
    return folder


def load(trainer, folder: str | Path, verify_files: bool = True) -> dict[str, Any]:
    """Load a checkpoint into ``trainer``, whatever plan or world size saved it; returns its manifest.
    Checks that it is complete, of this model, and intact where this rank reads it (each rank hashes only the
    files it reads); the ranks then agree, so a problem any rank finds is a CheckpointError on every rank
    before the load's collectives."""
    folder = Path(folder).absolute()
    error, manifest, shards = "", None, {}
    try:  # every rank checks what it reads; then all agree, so that every rank raises, none waits in a collective
        manifest = read_manifest(folder, verify_files=False)
        shards = state_shards(trainer, with_optimizer=False)
        same_world = manifest["world_size"] == dist.get_world_size()
        shards = {k: s for k, s in shards.items() if same_world or not k.startswith("rng/")}
        _check_fits(manifest, trainer, shards, folder)
        rng = {k: s for k, s in shards.items() if k.startswith("rng/")}
        shards.update(_optimizer_shards(trainer, manifest))
        if verify_files:
            _verify_what_is_read(folder, manifest, shards)
    except CheckpointError as failure:
        error = f"rank {dist.get_rank()}: {failure}"
    failures = [text for text in groups.gather_text(error) if text]
    if failures:
        raise CheckpointError("; ".join(failures), "the checkpoint is corrupt or of another model: load another one")
    dcp.load({}, storage_reader=SafeReader(folder), planner=_BoxLoadPlanner(shards))
    for key, shard in rng.items():
        if key.endswith("/cpu"):
            torch.set_rng_state(shard.tensor)
        else:
            torch.cuda.set_rng_state(shard.tensor, trainer.device)
    saved_groups = manifest["optimizer"]["param_groups"]
    if len(saved_groups) == len(trainer.optimizer.param_groups):
        for group, saved in zip(trainer.optimizer.param_groups, saved_groups):
            group.update(
                {
                    k: tuple(v) if isinstance(group.get(k), tuple) else v
                    for k, v in saved.items()
                    if k in group and k not in NOT_HYPERPARAMETERS and not isinstance(group[k], torch.Tensor)
                }
            )
    trainer.steps_done = int(manifest["step"])
    return manifest
