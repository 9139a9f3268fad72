"""Profiles checked against the run they price, and named in a plan's provenance.

A hardware profile describes ``world_size`` processes, ``devices_per_node`` of them per node, of one device
kind; a model profile describes one model (its body layers and hidden size) at one sequence length
(``seq_length``; a ``sequence``-mode profile any length, fitted over the lengths it measured, with a warning
outside them: ``ModelProfile.at_seq``), on one device kind, in one precision (``dtype``: what a measured
profile's times were taken in; an analytic profile is re-priced at any precision). Using a profile for
anything else gives wrong prices without failing, so each of these recorded keys is compared with the run
and a difference is refused with a ProfileError naming the file, the key, both values and a remedy. A key
the file does not record (an older file; a hand-written one; ``ModelProfile.unrecorded``) is not compared.

``profile_record`` is what a plan's provenance keeps of a profile: its path and sha256.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from galvatron_fx.errors import ProfileError

from .hardware import HardwareProfile
from .model_profile import ModelProfile


def device_kind(name: str) -> str:
    """A device's kind as the Cluster presets name it ("H100-80GB"), from a preset name or a CUDA device name
    ("NVIDIA H100 80GB HBM3"); any other name as it is, lower-cased ("cpu")."""
    upper = name.upper()
    if "H200" in upper:
        return "h200"
    if "H100" in upper:
        return "h100-80gb"
    if "A100" in upper:
        return "a100-40gb" if "40GB" in upper else "a100-80gb"
    return name.strip().lower()


def _where(profile: HardwareProfile | ModelProfile, kind: str) -> str:
    return profile.source or f"the {kind} profile (in memory)"


def check_hardware_profile(
    profile: HardwareProfile,
    *,
    world_size: int | None = None,
    devices_per_node: int | None = None,
    device: str | None = None,
) -> None:
    """Raise ProfileError if ``profile`` was measured for another world size, node size or device kind."""
    where = _where(profile, "hardware")
    remedy = (
        f"run galvatron-fx profile-hardware on the cluster the plan is for ({world_size or profile.world_size} "
        "processes), or leave the hardware profile out to price from datasheet figures"
    )
    if world_size is not None and world_size != profile.world_size:
        raise ProfileError(
            f"{where}: key world_size is {profile.world_size}, but the run has {world_size} devices", remedy
        )
    if devices_per_node is not None and devices_per_node != profile.devices_per_node:
        raise ProfileError(
            f"{where}: key devices_per_node is {profile.devices_per_node}, but the run has {devices_per_node} "
            "devices per node",
            remedy,
        )
    if device is not None and device_kind(device) != device_kind(profile.device):
        raise ProfileError(f"{where}: key device is {profile.device!r}, but the run is on {device!r}", remedy)


def check_model_profile(
    profile: ModelProfile,
    *,
    seq: int | None = None,
    mixed_precision: str | None = None,
    device: str | None = None,
    num_layers: int | None = None,
    hidden_size: int | None = None,
) -> None:
    """Raise ProfileError if ``profile`` describes another model (body layers, hidden size), sequence length
    (a ``static`` or ``batch`` profile: any but its own; ``ModelProfile.check_seq``), device kind or, for a
    measured profile, precision than the run's."""
    where = _where(profile, "model")
    again = "profile the model again with galvatron-fx profile-model"
    if num_layers is not None and num_layers != len(profile.layer_types):
        raise ProfileError(
            f"{where}: key layer_types lists {len(profile.layer_types)} body layers, but the model has {num_layers}",
            f"{again} for this model and size (e.g. the same --size)",
        )
    if hidden_size and profile.hidden_size and hidden_size != profile.hidden_size:
        raise ProfileError(
            f"{where}: key hidden_size is {profile.hidden_size}, but the model's is {hidden_size}",
            f"{again} for this model and size (e.g. the same --size)",
        )
    if seq is not None:
        profile.check_seq(seq)  # a sequence-mode profile prices any length (ModelProfile.at_seq)
    if device is not None and profile.device and device_kind(device) != device_kind(profile.device):
        raise ProfileError(
            f"{where}: key device is {profile.device!r}, but the run is on {device!r}",
            f"{again} on that device, or build an analytic one for it (--mode analytic --cluster ...)",
        )
    measured_dtype = profile.mode == "measured" and "dtype" not in profile.unrecorded
    if mixed_precision is not None and measured_dtype and profile.dtype != mixed_precision:
        raise ProfileError(
            f"{where}: key dtype is {profile.dtype!r} (the precision its times were measured in), but the run "
            f"trains in {mixed_precision}",
            f"train in {profile.dtype}, or price {mixed_precision} with an analytic profile "
            f"(galvatron-fx profile-model --mode analytic --dtype {mixed_precision})",
        )


def load_hardware_profile(value: "str | Path | HardwareProfile") -> HardwareProfile:
    """A hardware profile from a path (ProfileError naming a missing or corrupt file) or as given."""
    if isinstance(value, HardwareProfile):
        return value
    if isinstance(value, (str, Path)):
        return HardwareProfile.load(value)
    raise ProfileError(
        f"hardware_profile={value!r} is not a hardware profile",
        "pass the path of a galvatron-fx profile-hardware file, or a loaded HardwareProfile",
    )


def load_model_profile(value: "str | Path | ModelProfile") -> ModelProfile:
    """A model profile from a path (ProfileError naming a missing or corrupt file) or as given."""
    if isinstance(value, ModelProfile):
        return value
    if isinstance(value, (str, Path)):
        return ModelProfile.load(value)
    raise ProfileError(
        f"profile={value!r} is not a model profile",
        'pass "analytic", the path of a galvatron-fx profile-model file, or a loaded ModelProfile',
    )


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, in hex (what ``sha256sum`` prints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def profile_record(value: "str | Path | HardwareProfile | ModelProfile") -> dict[str, Any]:
    """What a plan's provenance keeps of a profile: ``{"path", "sha256"}``. A path: the file's sha256; a loaded
    profile: its ``source`` and the sha256 of the file ``save`` would write (the same as its file's, for a
    profile loaded and left unchanged)."""
    if isinstance(value, (str, Path)):
        return {"path": str(value), "sha256": file_sha256(value)}
    text = json.dumps(value.to_json_dict(), indent=2) + "\n"
    return {"path": value.source or None, "sha256": hashlib.sha256(text.encode()).hexdigest()}


def searched_for(cost_model, *, profile=None, hardware_profile=None) -> dict[str, Any]:
    """Provenance keys for a plan searched with ``cost_model``: the sequence length and precision it priced,
    the device kind, and a record of each profile (``profile_record``; ``None``: analytic from the graph, or
    the cluster's datasheet figures). ``profile`` / ``hardware_profile``: as given to ``build_cost_model``."""
    from_file = profile is not None and not (isinstance(profile, str) and profile == "analytic")
    return {
        "seq": cost_model.model.seq_length,
        "mixed_precision": cost_model.mixed_precision,
        "device": cost_model.hardware.device,
        "model_profile": profile_record(profile) if from_file else None,
        "hardware_profile": profile_record(hardware_profile) if hardware_profile is not None else None,
    }
