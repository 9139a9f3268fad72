"""The profiles the accuracy benchmarks price with: ``galvatron-fx profile-hardware`` launched on ``world``
processes (stored, or one more pass to average), and a model's measured profile, its layers timed on one process
and in place on each world size (cost/in_place_profiler.py)."""

from __future__ import annotations

import functools
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Sequence

import torch

from benchmarks.common import SHAPES, backend, build_model


def hardware_profile(world: int, folder: Path, source: str, reprofile: bool):
    """The measured profile of ``world`` processes (profile-hardware, reused unless ``reprofile``), or with
    ``source="cluster"`` the detected cluster's datasheet-style estimate (fast; for smoke runs)."""
    from galvatron_fx.cluster import Cluster
    from galvatron_fx.cost.hardware import HardwareProfile

    if source == "cluster":
        return Cluster.detect({"WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world)}).hardware_profile()
    path = folder / f"hardware_profile_{world}.json"
    if reprofile or not path.exists():
        profile_hardware(world, path)
    return HardwareProfile.load(path)


def hardware_pass(world: int, folder: Path):
    """One more profile-hardware pass on ``world`` processes, not stored: the caller averages the passes."""
    from galvatron_fx.cost.hardware import HardwareProfile

    path = folder / f"hardware_profile_{world}.pass.json"
    profile_hardware(world, path)
    try:
        return HardwareProfile.load(path)
    finally:
        path.unlink()


def profile_hardware(world: int, path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "galvatron_fx.cli",
            "profile-hardware",
            "--nprocs",
            str(world),
            "--out",
            str(path),
            "--no-progress",
        ],
        check=True,
    )


IN_PLACE_SAMPLES = (2, 4, 8)  # three sizes: one disturbed point moves a two-point fit's intercept by tens of ms


def model_profile(name: str, shape: str, folder: Path, reprofile: bool, worlds: Sequence[int], repeats: int = 10):
    """The measured model profile: layer types timed here, one thread, as each rank runs; and timed in place
    on each of ``worlds`` processes (cost/in_place_profiler.py)."""
    from galvatron_fx.cost.layer_profiler import profile_model
    from galvatron_fx.cost.model_profile import ModelProfile

    path = _model_profile_path(name, shape, folder)
    build = functools.partial(build_model, name, shape)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if reprofile or not path.exists():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            profile = profile_model(
                build,
                batches=(2, 4, 8),
                seqs=(SHAPES[shape]["seq"],),
                repeats=repeats,
                progress=False,
                name=name,
                device=device,
            )
        torch.set_num_threads(threads)
        _in_place_pass(profile, name, shape, worlds, repeats, merge=False)
        profile.save(path)
    return ModelProfile.load(path)


def in_place_again(name: str, shape: str, folder: Path, worlds: Sequence[int], repeats: int = 10) -> None:
    """Time the stored model profile's layers in place once more and average with its stored passes: passes
    before, between and after the measurements price them at the machine's mean speed over the run."""
    from galvatron_fx.cost.model_profile import ModelProfile

    path = _model_profile_path(name, shape, folder)
    profile = ModelProfile.load(path)
    _in_place_pass(profile, name, shape, worlds, repeats, merge=True)
    profile.save(path)


def _in_place_pass(profile, name: str, shape: str, worlds: Sequence[int], repeats: int, merge: bool) -> None:
    from galvatron_fx.cost.in_place_profiler import measure_in_place

    for world in worlds:
        measure_in_place(
            profile,
            functools.partial(build_model, name, shape),
            world,
            samples_per_rank=IN_PLACE_SAMPLES,
            repeats=repeats,
            backend=backend(),
            progress=False,
            merge=merge,
        )


def _model_profile_path(name: str, shape: str, folder: Path) -> Path:
    return folder / f"model_profile_{name}_{shape}.json"
