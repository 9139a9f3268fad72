"""Checkpoints: sharded save, load under the same plan, under another plan and another world size (resharding),
and refusal of half-written, corrupt and foreign checkpoints before any collective.

One group of 2 ranks trains GPT-2 under tensor parallelism (tp=2: its weights are saved as tensor-parallel
shards), saves, and goes on training (the uninterrupted reference). Then the same ranks compile the model again
with other weights under other plans (ZeRO-3, PP2), load the checkpoint and must continue with the reference's
losses. A group of 4 ranks loads the same checkpoint under pp2 × zero3(2) (another world size).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import galvatron_fx
from galvatron_fx.models import build_model, example_batch
from galvatron_fx.runtime import checkpoint as ckpt
from galvatron_fx.runtime import checkpoint_files, spawn

STEPS_BEFORE, STEPS_AFTER = 2, 3
BATCH, SEQ = 8, 16


def _adam(params):
    return torch.optim.Adam(params, lr=1e-3, eps=1e-6)


def _batches():
    torch.manual_seed(0)
    model, _ = build_model("gpt2")
    # two batches in turn: the loss goes down, and each step still differs from the one before
    pair = [example_batch("gpt2", model, BATCH, SEQ, seed=i) for i in range(2)]
    return model, [pair[i % 2] for i in range(STEPS_BEFORE + STEPS_AFTER)]


def _compile_other(flags: dict, batch) -> galvatron_fx.compile:
    torch.manual_seed(123)  # different weights: only the checkpoint can make the losses match
    model, _ = build_model("gpt2")
    return galvatron_fx.compile(model, example_kwargs=batch, plan=galvatron_fx.uniform_plan(**flags), optimizer=_adam)


def _save_and_reshard(rank: int, world: int, folder: str) -> dict:
    model, batches = _batches()
    first = galvatron_fx.compile(
        model, example_kwargs=batches[0], plan=galvatron_fx.uniform_plan(tp=2), optimizer=_adam
    )
    before = [float(first.train_step(b)) for b in batches[:STEPS_BEFORE]]
    target = Path(folder) / "step2"
    first.save_checkpoint(target)
    full = {k: v for k, v in first.trainer.full_parameters().items()}
    reference = [float(first.train_step(b)) for b in batches[STEPS_BEFORE:]]
    out = {"before": before, "reference": reference, "files": sorted(p.name for p in target.iterdir())}
    for name, flags in (("zero3", dict(sdp=True)), ("pp2", dict(pp=2, chunks=2))):
        other = _compile_other(flags, batches[0])
        manifest = other.load_checkpoint(target)
        out[f"{name}_step"] = other.trainer.steps_done
        if name == "zero3":  # right after loading, the parameters are those that were saved
            loaded = other.trainer.full_parameters()
            out["max_param_diff"] = max(float((loaded[k] - full[k]).abs().max()) for k in full)
        out[name] = [float(other.train_step(b)) for b in batches[STEPS_BEFORE:]]
        out["manifest_world"] = manifest["world_size"]
    out["errors"] = _bad_checkpoints(target, batches[0])
    return out


def _bad_checkpoints(good: Path, batch) -> dict[str, str]:
    """Load broken copies of ``good``; each must raise CheckpointError on every rank, before any collective
    (a collective would hang here: the ranks raise at different times otherwise)."""
    root = good.parent
    if dist.get_rank() == 0:
        cases = {
            "half_written": lambda d: (d / ckpt.MANIFEST).unlink(),
            "corrupt_data": lambda d: _flip_byte(next(p for p in d.iterdir() if p.suffix == ".distcp")),
            "bad_manifest": lambda d: (d / ckpt.MANIFEST).write_text("{not json"),
            "truncated": lambda d: _truncate(next(p for p in d.iterdir() if p.suffix == ".distcp")),
        }
        for name, damage in cases.items():
            shutil.copytree(good, root / name)
            damage(root / name)
    dist.barrier()
    errors = {}
    other = _compile_other(dict(sdp=True), batch)
    for name in ("half_written", "corrupt_data", "bad_manifest", "truncated", "missing"):
        try:
            other.load_checkpoint(root / name)
            errors[name] = "loaded"
        except ckpt.CheckpointError as error:
            errors[name] = str(error)
    # another model: a GPT-2 with one layer less
    torch.manual_seed(0)
    small, _ = build_model("gpt2")
    small.transformer.h = small.transformer.h[:3]
    foreign = galvatron_fx.compile(
        small, example_kwargs=batch, plan=galvatron_fx.uniform_plan(sdp=True), optimizer=_adam
    )
    try:
        foreign.load_checkpoint(good)
        errors["another_model"] = "loaded"
    except ckpt.CheckpointError as error:
        errors["another_model"] = str(error)
    dist.barrier()  # every rank reached here: no rank is stuck in a collective
    return errors


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def _load_on_four(rank: int, world: int, folder: str) -> dict:
    _, batches = _batches()
    other = _compile_other(dict(pp=2, sdp=True, chunks=2), batches[0])
    other.load_checkpoint(Path(folder) / "step2")
    return {"losses": [float(other.train_step(b)) for b in batches[STEPS_BEFORE:]]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    return folder, spawn(_save_and_reshard, 2, str(folder), timeout_s=500)


def test_same_and_other_plans_continue_the_losses(saved):
    _, results = saved
    out = results[0]
    assert all(r["reference"] == out["reference"] for r in results)
    assert out["reference"][-1] < out["before"][0] - 0.01  # it trains
    assert out["max_param_diff"] == 0.0  # the exact saved values come back, resharded from tp2 to ZeRO-3
    for name in ("zero3", "pp2"):
        assert out[f"{name}_step"] == STEPS_BEFORE
        assert out[name] == pytest.approx(out["reference"], abs=1e-5), name
    # the saved folder is complete and nothing of the temporary folder is left
    assert ckpt.MANIFEST in out["files"] and ".metadata" in out["files"]
    folder, _ = saved
    assert not any(p.name.endswith(".partial") for p in folder.iterdir())
    assert ckpt.latest(folder) == folder / "step2"


def test_broken_and_foreign_checkpoints_are_refused_on_every_rank(saved):
    _, results = saved
    for errors in (r["errors"] for r in results):
        assert "half-written" in errors["half_written"]
        assert "SHA-256" in errors["corrupt_data"]
        assert "not valid JSON" in errors["bad_manifest"]
        assert "wrong size" in errors["truncated"]
        assert "does not exist" in errors["missing"]
        assert "does not fit" in errors["another_model"] and "unexpected" in errors["another_model"]


@pytest.mark.full
def test_another_world_size_continues_the_losses(saved):
    folder, results = saved
    four = spawn(_load_on_four, 4, str(folder), timeout_s=500)
    for result in four:
        assert result["losses"] == pytest.approx(results[0]["reference"], abs=1e-5)


def test_metadata_unpickler_refuses_foreign_classes(tmp_path):
    import os
    import pickle

    path = tmp_path / ".metadata"
    path.write_bytes(pickle.dumps(os.system))  # unpickling it would hand out a way to run commands
    reader = checkpoint_files.SafeReader(tmp_path)
    with pytest.raises(pickle.UnpicklingError):
        reader.read_metadata()


def _hashes_worker(rank: int, world: int, folder: str) -> dict:
    """Save and load a PP2 checkpoint of LLaMA (no tied weights: each stage's parameters in its own rank's
    file), recording which files each rank hashes."""
    hashed: list[str] = []
    original = checkpoint_files.sha256

    def recording(path):
        hashed.append(Path(path).name)
        return original(path)

    checkpoint_files.sha256 = recording
    try:
        torch.manual_seed(0)
        model, _ = build_model("llama")
        batch = example_batch("llama", model, BATCH, SEQ, seed=0)
        compiled = galvatron_fx.compile(model, example_kwargs=batch, plan=galvatron_fx.uniform_plan(pp=2, chunks=2))
        compiled.train_step(batch)
        compiled.save_checkpoint(f"{folder}/pp2")
        saved, hashed[:] = sorted(hashed), []
        compiled.load_checkpoint(f"{folder}/pp2")
        loaded = sorted(hashed)
    finally:
        checkpoint_files.sha256 = original
    return {"saved": saved, "loaded": loaded, "files": sorted(p.name for p in Path(f"{folder}/pp2").iterdir())}


def test_each_rank_hashes_the_files_it_wrote_and_those_it_reads(tmp_path):
    results = spawn(_hashes_worker, 2, str(tmp_path), timeout_s=300)
    data_files = [name for name in results[0]["files"] if name.endswith(".distcp")]
    assert len(data_files) == 2
    for rank, result in enumerate(results):
        own = [name for name in data_files if name.startswith(f"__{rank}_")]
        assert result["saved"] == sorted(own + ([".metadata"] if rank == 0 else []))  # hashing is spread
        assert result["loaded"] == sorted([".metadata", *own])  # a stage reads its own parameters only
