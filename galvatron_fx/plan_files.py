"""Plan files: a Plan written as JSON, and read back from ours or from a Galvatron strategy file.

A Plan's JSON is a superset of Galvatron's strategy file: it carries Galvatron's keys (``pp_deg``,
``tp_sizes_enc``, ``dp_types_enc``, ``checkpoint``, ...) so that Galvatron reads it, and a
``galvatron_fx`` section with what those keys cannot say (per-layer DDP vs ZeRO-2, Megatron-SP, world
size, predictions, provenance). A Galvatron file without that section loads too, given the world size.

``Plan.to_json_dict``, ``Plan.save``, ``Plan.load`` and ``Plan.from_json_dict`` are the way in; they call
this module, which builds the plan class it is given (``plan_type``) so that it need not import plan.py.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .errors import PlanError
from .prediction import Prediction
from .strategy import DP_TYPES, EmbeddingStrategy, LayerStrategy, _require

FORMAT_VERSION = 1


def plan_to_json_dict(plan: Any) -> dict[str, Any]:
    """Galvatron's keys plus a ``galvatron_fx`` section (authoritative when present)."""
    dp_types = [layer.dp_type for layer in plan.layers]
    default_dp = max(("ddp", "zero2"), key=lambda t: dp_types.count(t))

    def csv(values):
        return ",".join(str(int(v)) for v in values)

    return {
        "pp_deg": plan.pp,
        "tp_sizes_enc": csv(layer.tp for layer in plan.layers),
        "tp_consecutive_flags": csv(layer.tp_consecutive for layer in plan.layers),
        "dp_types_enc": csv(layer.dp_type == "zero3" for layer in plan.layers),
        "use_sp": csv(layer.sp == "ulysses" for layer in plan.layers),
        "checkpoint": csv(layer.ckpt for layer in plan.layers),
        "global_bsz": plan.global_batch,
        "chunks": plan.chunks,
        "pp_division": csv(plan.pp_division),
        "pipeline_type": "gpipe" if plan.pipeline == "gpipe" else "pipedream_flush",
        "default_dp_type": default_dp,
        "vtp": plan.embedding.vtp,
        "vsp": int(plan.embedding.vsp),
        "embed_sdp": int(plan.embedding.embed_sdp),
        "galvatron_fx": {
            "format_version": FORMAT_VERSION,
            "world_size": plan.world_size,
            "embedding_dp_type": plan.embedding.dp_type,
            "layers": [dataclasses.asdict(layer) for layer in plan.layers],
            "grad_sync_every_micro_batch": plan.grad_sync_every_micro_batch,
            "prediction": dataclasses.asdict(plan.prediction) if plan.prediction else None,
            "provenance": plan.provenance,
        },
    }


def save_plan(plan: Any, path: str | Path) -> None:
    """Write ``plan.to_json_dict()`` to ``path``."""
    Path(path).write_text(json.dumps(plan.to_json_dict(), indent=2) + "\n")


def read_plan_json(path: str | Path) -> Any:
    """The JSON value in the plan file ``path``; PlanError if it is missing or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PlanError(f"plan file {path} does not exist", "check the path") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PlanError(
            f"plan file {path} is not valid JSON ({error})", "write it with Plan.save or galvatron-fx search"
        ) from None


def plan_from_json_dict(
    plan_type: type, data: dict[str, Any], world_size: int | None = None, source: str = "plan"
) -> Any:
    """A ``plan_type`` (Plan) from our plan JSON or a Galvatron strategy file (which needs ``world_size``);
    every PlanError names ``source``."""
    if not isinstance(data, dict):
        raise PlanError(f"{source} is not a JSON object", "write it with Plan.save")
    try:
        ours = data.get("galvatron_fx")
        if ours is not None:
            return _from_ours(plan_type, data, ours, world_size)
        return _from_galvatron(plan_type, data, world_size, source)
    except PlanError as error:
        raise PlanError(f"{source}: {error.cause}", error.remedy) from None
    except (KeyError, ValueError, TypeError) as error:
        raise PlanError(
            f"{source}: missing or malformed key ({type(error).__name__}: {error})",
            "compare it with a file written by Plan.save or Galvatron's search",
        ) from None


def _whole(value: Any, key: str) -> int:
    """``value`` as an int: an int, an integral float, or a string of one; PlanError naming ``key`` otherwise."""
    if isinstance(value, bool):
        raise PlanError(f"key {key!r} is {value!r}, not a number", f"write {key} as a whole number")
    if isinstance(value, str):
        try:
            value = float(value.strip()) if value.strip() else None
        except ValueError:
            value = None
        if value is None:
            raise PlanError(f"key {key!r} is not a number", f"write {key} as a whole number")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int):
        raise PlanError(f"key {key!r} is {value!r}, not a whole number", f"write {key} as a whole number")
    return value


def _ints(csv_value: Any, key: str = "value") -> tuple[int, ...]:
    if isinstance(csv_value, (list, tuple)):
        return tuple(_whole(v, key) for v in csv_value)
    return tuple(_whole(v, key) for v in str(csv_value).split(",") if v.strip() != "")


def _flags(csv_value: Any, key: str) -> tuple[int, ...]:
    """Per-layer 0/1 flags of a Galvatron key; PlanError naming the key for anything else."""
    values = _ints(csv_value, key)
    _require(
        all(v in (0, 1) for v in values),
        f"key {key!r} has values {sorted(set(values) - {0, 1})} that are not 0 or 1",
        f"write {key} as comma-separated 0/1 flags, one per layer",
    )
    return values


def _flag(data: dict[str, Any], key: str, default: int = 0) -> bool:
    """One 0/1 (or true/false) flag; a string such as "false" is refused, not read as true."""
    value = data.get(key, default)
    if isinstance(value, bool):
        return value
    return bool(_flags([value], key)[0])


def _prediction(saved: dict[str, Any]) -> Prediction:
    return Prediction(
        float(saved["iteration_time_s"]),
        float(saved["samples_per_s"]),
        _ints(saved["memory_bytes_per_stage"], "memory_bytes_per_stage"),
        _ints(saved.get("memory_bound_bytes_per_stage", ()), "memory_bound_bytes_per_stage"),
    )


def _from_ours(plan_type: type, data: dict[str, Any], ours: Any, world_size: int | None) -> Any:
    _require(
        isinstance(ours, dict),
        f"key 'galvatron_fx' is a {type(ours).__name__}, not an object",
        "write the plan with Plan.save, or remove the galvatron_fx key to load Galvatron's keys alone",
    )
    _require(
        ours.get("format_version") == FORMAT_VERSION,
        f"format_version {ours.get('format_version')!r} is not {FORMAT_VERSION}",
        "write the plan again with this version of galvatron_fx",
    )
    saved_world = _whole(ours["world_size"], "world_size")
    _require(
        world_size is None or world_size == saved_world,
        f"the plan is for world size {saved_world}, not {world_size}",
        f"search a plan for {world_size} devices",
    )
    _require(
        isinstance(ours["layers"], list) and all(isinstance(e, dict) for e in ours["layers"]),
        "key 'layers' is not a list of objects",
        "write one object per body layer, as Plan.save does",
    )
    unknown = [set(entry) - {f.name for f in dataclasses.fields(LayerStrategy)} for entry in ours["layers"]]
    _require(not any(unknown), f"unknown layer keys {sorted(set().union(*unknown))}", "remove them")
    layers = []
    for i, entry in enumerate(ours["layers"]):
        try:
            layers.append(LayerStrategy(**entry))
        except PlanError as error:
            raise PlanError(f"layers[{i}]: {error.cause}", error.remedy) from None
    prediction = ours.get("prediction")
    sync = ours.get("grad_sync_every_micro_batch", False)
    _require(
        isinstance(sync, bool), f"key 'grad_sync_every_micro_batch' is {sync!r}, not a boolean", "write true or false"
    )
    return plan_type(
        world_size=saved_world,
        layers=tuple(layers),
        pp=_whole(data["pp_deg"], "pp_deg"),
        pp_division=_ints(data["pp_division"], "pp_division"),
        pipeline=_pipeline(data),
        chunks=_whole(data["chunks"], "chunks"),
        global_batch=_whole(data["global_bsz"], "global_bsz"),
        embedding=EmbeddingStrategy(
            vtp=_whole(data.get("vtp", 1), "vtp"),
            vsp=_flag(data, "vsp"),
            embed_sdp=_flag(data, "embed_sdp"),
            dp_type=ours.get("embedding_dp_type", "ddp"),
        ),
        grad_sync_every_micro_batch=sync,
        prediction=_prediction(prediction) if prediction else None,
        provenance=dict(ours.get("provenance") or {}),
    )


def _pipeline(data: dict[str, Any]) -> str:
    """Galvatron's ``pipeline_type``: ``gpipe``, or ``pipedream_flush`` (= 1F1B; ``1f1b`` accepted too)."""
    kind = data.get("pipeline_type", "pipedream_flush")
    _require(
        kind in ("gpipe", "pipedream_flush", "1f1b"),
        f"key 'pipeline_type' is {kind!r}",
        "use gpipe or pipedream_flush (1F1B)",
    )
    return "gpipe" if kind == "gpipe" else "1f1b"


def _from_galvatron(plan_type: type, data: dict[str, Any], world_size: int | None, source: str) -> Any:
    _require(
        world_size is not None,
        "this Galvatron strategy file does not record the world size",
        "pass world_size (the number of devices it was made for)",
    )
    pp = _whole(data["pp_deg"], "pp_deg")
    tp_sizes = _ints(data["tp_sizes_enc"], "tp_sizes_enc")
    count = len(tp_sizes)

    def per_layer(key: str, default: int) -> tuple[int, ...]:
        values = _flags(data[key], key) if key in data else (default,) * count
        _require(
            len(values) == count,
            f"{key} has {len(values)} entries, tp_sizes_enc has {count}",
            "give one entry per layer",
        )
        return values

    consecutive, zero3, ulysses, ckpt = (
        per_layer(k, d) for k, d in (("tp_consecutive_flags", 1), ("dp_types_enc", 0), ("use_sp", 0), ("checkpoint", 0))
    )
    default_dp = data.get("default_dp_type", "ddp")
    _require(default_dp in DP_TYPES, f"default_dp_type={default_dp!r} is unknown", f"use one of {DP_TYPES}")
    # Galvatron's embedding and head follow default_dp_type unless embed_sdp: a zero3 default shards them too
    embed_sdp = _flag(data, "embed_sdp") or default_dp == "zero3"
    stage_devices = world_size // pp if pp and world_size % pp == 0 else 0
    _require(
        stage_devices > 0,
        f"pp_deg={pp} does not divide world size {world_size}",
        "pass the world size the file was made for",
    )
    layers = tuple(
        LayerStrategy(
            tp=tp,
            dp=max(stage_devices // tp, 1),
            dp_type="zero3" if z3 else default_dp,
            sp="ulysses" if uly and tp > 1 else "none",
            tp_consecutive=bool(cons),
            ckpt=bool(ck),
        )
        for tp, cons, z3, uly, ck in zip(tp_sizes, consecutive, zero3, ulysses, ckpt)
    )
    return plan_type(
        world_size=world_size,
        layers=layers,
        pp=pp,
        pp_division=_ints(data["pp_division"], "pp_division") if "pp_division" in data else (),
        pipeline=_pipeline(data),
        chunks=_whole(data.get("chunks", 1), "chunks"),
        global_batch=_whole(data["global_bsz"], "global_bsz"),
        embedding=EmbeddingStrategy(
            vtp=_whole(data.get("vtp", 1), "vtp"),
            vsp=_flag(data, "vsp"),
            embed_sdp=embed_sdp,
            dp_type=default_dp if default_dp != "zero3" else "ddp",
        ),
        provenance={"source": "galvatron"},
    )
