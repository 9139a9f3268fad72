"""Plans: what every layer does (LayerStrategy), and the whole hybrid-parallel plan (Plan).

A Plan's JSON is a superset of Galvatron's strategy file: it carries Galvatron's keys (``pp_deg``,
``tp_sizes_enc``, ``dp_types_enc``, ``checkpoint``, ...) so that Galvatron reads it, and a
``galvatron_fx`` section with what those keys cannot say (per-layer DDP vs ZeRO-2, Megatron-SP, world
size, predictions, provenance). A Galvatron file without that section loads too, given the world size.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PlanError

DP_TYPES = ("ddp", "zero2", "zero3")
SP_TYPES = ("none", "megatron", "ulysses")
TP_MODES = ("1d", "2d", "2.5d", "3d")
PIPELINES = ("gpipe", "1f1b")
PIPELINE_ALIASES = {"pipedream_flush": "1f1b"}  # Galvatron's name for 1F1B with a flush per step
FORMAT_VERSION = 1


def normalize_pipeline(name: str) -> str:
    """A pipeline schedule's name as plans store it: Galvatron's ``pipedream_flush`` is ``1f1b``; other names
    are returned unchanged (validation says what is allowed)."""
    return PIPELINE_ALIASES.get(name, name) if isinstance(name, str) else name


def _require(condition: bool, cause: str, remedy: str) -> None:
    if not condition:
        raise PlanError(cause, remedy)


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@dataclass(frozen=True)
class LayerStrategy:
    """How one layer runs on its pipeline stage's devices (``tp * dp`` of them).

    ``tp`` is the size of the layer's intra-layer group; ``sp`` says how that group splits the work:
    ``"none"``: Megatron tensor parallelism (column/row-parallel projections, activations replicated);
    ``"megatron"``: the same plus Megatron sequence parallelism outside the TP region;
    ``"ulysses"``: weights replicated, sequence sharded, all-to-all around attention (Galvatron's use_sp).
    ``tp_consecutive``: the group is on consecutive ranks (within a node) rather than strided.
    ``tp_mode``: how the ``tp`` ranks split the layer: ``"1d"`` (Megatron, above), or a process grid that
    splits activations by samples and by features and weights in blocks: ``"2d"`` (SUMMA/Optimus, tp = q²),
    ``"2.5d"`` (Tesseract, tp = q²·``tp_depth``, the depth splitting samples further) or ``"3d"`` (tp = q³);
    see ``grid_shape``.
    ``dp_type``: how the ``dp`` replicas synchronise: ``ddp`` all-reduce, ``zero2`` (sharded gradients and
    optimizer states) or ``zero3`` (parameters sharded too). ``ckpt``: recompute activations in backward.
    """

    tp: int = 1
    dp: int = 1
    dp_type: str = "ddp"
    sp: str = "none"
    tp_consecutive: bool = True
    ckpt: bool = False
    tp_mode: str = "1d"
    tp_depth: int = 1

    def __post_init__(self):
        _require(
            isinstance(self.tp, int) and _is_power_of_two(self.tp),
            f"tp={self.tp!r} is not a power of two",
            "use tp in 1, 2, 4, 8, ...",
        )
        _require(isinstance(self.dp, int) and self.dp >= 1, f"dp={self.dp!r} is not a positive integer", "use dp >= 1")
        _require(self.dp_type in DP_TYPES, f"dp_type={self.dp_type!r} is unknown", f"use one of {DP_TYPES}")
        _require(self.sp in SP_TYPES, f"sp={self.sp!r} is unknown", f"use one of {SP_TYPES}")
        _require(self.sp == "none" or self.tp > 1, f"sp={self.sp!r} needs a group: tp is 1", "set tp > 1 or sp='none'")
        for name in ("tp_consecutive", "ckpt"):
            value = getattr(self, name)
            _require(isinstance(value, bool), f"{name}={value!r} is not a boolean", f"write {name} as true or false")
        _require(self.tp_mode in TP_MODES, f"tp_mode={self.tp_mode!r} is unknown", f"use one of {TP_MODES}")
        _require(
            isinstance(self.tp_depth, int) and self.tp_depth >= 1 and (self.tp_depth == 1 or self.tp_mode == "2.5d"),
            f"tp_depth={self.tp_depth!r} with tp_mode={self.tp_mode!r}",
            "give tp_depth (a positive integer) only with tp_mode '2.5d'",
        )
        if self.tp_mode != "1d":
            _require(
                self.grid_shape is not None,
                f"tp={self.tp} is no {self.tp_mode} grid"
                + (f" of depth {self.tp_depth}" if self.tp_mode == "2.5d" else ""),
                {
                    "2d": "use tp = q² (4, 16, 64)",
                    "2.5d": "use tp = q²·tp_depth with q >= 2",
                    "3d": "use tp = q³ (8, 64)",
                }[self.tp_mode],
            )
            _require(
                self.sp == "none",
                f"sp={self.sp!r} with tp_mode={self.tp_mode!r}: a grid already splits the activations",
                "use sp='none' with a grid tp_mode",
            )
            _require(
                self.tp_consecutive,
                f"tp_mode={self.tp_mode!r} on strided ranks",
                "use tp_consecutive=True (a grid's ranks are consecutive)",
            )

    @property
    def devices(self) -> int:
        return self.tp * self.dp

    @property
    def grid_shape(self) -> tuple[int, int, int] | None:
        """``(q, depth, cube)`` of a grid ``tp_mode``: the grid is ``depth × q × q`` ranks (``2d``: depth 1;
        ``2.5d``: ``tp_depth``) or, for ``3d``, ``q × q × q`` (cube = q); None for ``1d`` or a ``tp`` that is
        no such grid."""
        if self.tp_mode == "1d":
            return None
        depth = self.tp_depth if self.tp_mode == "2.5d" else 1
        power = 3 if self.tp_mode == "3d" else 2
        q = round((self.tp / depth) ** (1 / power))
        if q < 2 or q**power * depth != self.tp:
            return None
        return (q, depth, q if power == 3 else 1)

    @property
    def lowering_key(self) -> str:
        """What lowering a layer's graph depends on, ``tp{tp}/{sp}`` (and a grid ``tp_mode``): the key of its
        lowering obstacles."""
        grid = "" if self.tp_mode == "1d" else f"/{self.tp_mode}" + (f"x{self.tp_depth}" if self.tp_depth > 1 else "")
        return f"tp{self.tp}/{self.sp}{grid}"

    def short(self) -> str:
        """A compact label such as ``tp2-megatron dp4 zero3 ckpt``."""
        parts = []
        if self.tp > 1:
            kind = {"none": "tp", "megatron": "tp", "ulysses": "ulysses"}[self.sp]
            parts.append(
                f"{kind}{self.tp}"
                + ("-sp" if self.sp == "megatron" else "")
                + ("" if self.tp_consecutive else "-strided")
                + ("" if self.tp_mode == "1d" else f"-{self.tp_mode}")
                + (f"-d{self.tp_depth}" if self.tp_depth > 1 else "")
            )
        if self.dp > 1 or not parts:
            parts.append(f"dp{self.dp}" + ("" if self.dp_type == "ddp" else f"-{self.dp_type}"))
        if self.ckpt:
            parts.append("ckpt")
        return " ".join(parts)


def tp_modes_for(tp: int, modes: tuple[str, ...] = TP_MODES) -> list[tuple[str, int]]:
    """Every ``(tp_mode, tp_depth)`` among ``modes`` that ``tp`` ranks can form (1d always; 2.5d at each depth
    d >= 2 with tp = q²·d, q >= 2)."""
    out = []
    for mode in modes:
        for depth in [d for d in range(2, tp // 4 + 1) if tp % d == 0] if mode == "2.5d" else [1]:
            try:
                LayerStrategy(tp=tp, tp_mode=mode, tp_depth=depth)
            except PlanError:  # no such grid
                continue
            out.append((mode, depth))
    return out


@dataclass(frozen=True)
class EmbeddingStrategy:
    """The embedding and LM head: vocab tensor parallelism ``vtp``, their ``devices / vtp`` replicas
    synchronising with ZeRO-3 when ``embed_sdp``, else with ``dp_type`` (``ddp`` or ``zero2``: Galvatron's
    ``default_dp_type``). ``vsp`` (Galvatron's Ulysses-style vocab sequence parallelism): the ``vtp`` ranks of a
    group instead keep the whole weights and split their samples along the sequence; every rank of the stage is
    then a replica of the weights (``parallel_dims.end_layout``, ``embedding_strategy``)."""

    vtp: int = 1
    vsp: bool = False
    embed_sdp: bool = False
    dp_type: str = "ddp"

    def __post_init__(self):
        _require(
            isinstance(self.vtp, int) and _is_power_of_two(self.vtp),
            f"vtp={self.vtp!r} is not a power of two",
            "use vtp in 1, 2, 4, 8, ...",
        )
        _require(
            self.dp_type in ("ddp", "zero2"),
            f"embedding dp_type={self.dp_type!r} is not ddp or zero2",
            "use embed_sdp=True for ZeRO-3, else dp_type 'ddp' or 'zero2'",
        )

    @property
    def data_parallel_type(self) -> str:
        """How the replicas synchronise: ``zero3`` with ``embed_sdp``, else ``dp_type``."""
        return "zero3" if self.embed_sdp else self.dp_type


@dataclass(frozen=True)
class Prediction:
    """What the cost model predicts for a plan, in the runtime's own terms."""

    iteration_time_s: float
    samples_per_s: float
    memory_bytes_per_stage: tuple[int, ...]
    # what the search checks against the memory budget: an upper bound on memory_bytes_per_stage that adds
    # up layer by layer (cost/memory.py); empty where not recorded (then the prediction itself counts)
    memory_bound_bytes_per_stage: tuple[int, ...] = ()

    @property
    def budgeted_bytes_per_stage(self) -> tuple[int, ...]:
        """Each stage's bytes as the search budgets them."""
        return self.memory_bound_bytes_per_stage or self.memory_bytes_per_stage

    @property
    def budgeted_bytes(self) -> int:
        """The largest stage's bytes as the search budgets them."""
        return max(self.budgeted_bytes_per_stage)


@dataclass(frozen=True)
class Plan:
    """A hybrid-parallel plan for ``world_size`` devices.

    ``layers`` has one LayerStrategy per body layer of the Program (prologue and epilogue follow
    ``embedding``); ``pp_division`` counts body layers per stage. Every layer of a stage uses all of the
    stage's ``world_size // pp`` devices (``tp * dp`` of them). ``chunks`` micro-batches of
    ``global_batch // chunks`` samples each run per iteration under the ``pipeline`` schedule.
    """

    world_size: int
    layers: tuple[LayerStrategy, ...]
    pp: int = 1
    pp_division: tuple[int, ...] = ()
    pipeline: str = "1f1b"
    chunks: int = 1
    global_batch: int = 8
    embedding: EmbeddingStrategy = EmbeddingStrategy()
    grad_sync_every_micro_batch: bool = False
    prediction: Prediction | None = None
    provenance: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "pipeline", normalize_pipeline(self.pipeline))
        if not self.pp_division:
            object.__setattr__(self, "pp_division", even_division(len(self.layers), self.pp))
        object.__setattr__(self, "pp_division", tuple(int(n) for n in self.pp_division))
        self.validate()

    # -- derived -----------------------------------------------------------------------------
    @property
    def devices_per_stage(self) -> int:
        return self.world_size // self.pp

    @property
    def micro_batch(self) -> int:
        return self.global_batch // self.chunks

    @property
    def defers_grad_sync(self) -> bool:
        """Whether gradients are accumulated over several micro-batches before they are synchronised (ZeRO
        then holds each layer's unsharded gradient from the first backward to the last)."""
        return self.chunks > 1 and not self.grad_sync_every_micro_batch

    def stage_of_layer(self, body_index: int) -> int:
        """The pipeline stage that runs body layer ``body_index``."""
        end = 0
        for stage, count in enumerate(self.pp_division):
            end += count
            if body_index < end:
                return stage
        raise IndexError(body_index)

    def stage_layers(self, stage: int) -> range:
        """Body-layer indices of ``stage``."""
        start = sum(self.pp_division[:stage])
        return range(start, start + self.pp_division[stage])

    # -- checks --------------------------------------------------------------------------------
    def validate(self) -> None:
        """Strict validation; raises PlanError naming the field and the fix."""
        _require(
            isinstance(self.world_size, int) and self.world_size >= 1,
            f"world_size={self.world_size!r} is invalid",
            "use a positive integer",
        )
        _require(
            self.pp >= 1 and self.world_size % self.pp == 0,
            f"pp={self.pp} does not divide world_size={self.world_size}",
            "pick pp among the divisors of the world size",
        )
        _require(
            self.pipeline in PIPELINES,
            f"pipeline={self.pipeline!r} is unknown",
            f"use one of {PIPELINES} (or pipedream_flush, Galvatron's name for 1f1b)",
        )
        _require(len(self.layers) >= 1, "the plan has no layers", "give one LayerStrategy per body layer")
        _require(
            len(self.pp_division) == self.pp,
            f"pp_division {list(self.pp_division)} has {len(self.pp_division)} stages, pp is {self.pp}",
            "give one layer count per stage",
        )
        _require(
            all(n >= 1 for n in self.pp_division) and sum(self.pp_division) == len(self.layers),
            f"pp_division {list(self.pp_division)} does not split {len(self.layers)} layers into non-empty stages",
            "make the counts positive and sum to the number of body layers",
        )
        _require(
            self.chunks >= 1 and self.global_batch >= 1 and self.global_batch % self.chunks == 0,
            f"global_batch={self.global_batch} is not divisible into chunks={self.chunks} micro-batches",
            "choose chunks that divide the global batch",
        )
        _require(
            self.micro_batch % self.devices_per_stage == 0,
            f"micro-batch {self.micro_batch} (global_batch / chunks) does not give each of the "
            f"{self.devices_per_stage} "
            "devices of a stage its own samples (the embedding and head run data-parallel over them)",
            f"use a global batch / chunks that is a multiple of {self.devices_per_stage}",
        )
        for i, layer in enumerate(self.layers):
            _require(
                layer.devices == self.devices_per_stage,
                f"layer {i}: tp {layer.tp} × dp {layer.dp} = {layer.devices} devices, but each of the {self.pp} "
                f"stages has {self.devices_per_stage}",
                "make tp × dp equal world_size / pp for every layer",
            )
            _require(
                self.micro_batch % layer.dp == 0,
                f"layer {i}: micro-batch {self.micro_batch} (global_batch / chunks) is not divisible by dp={layer.dp}",
                "raise the global batch or lower chunks so that every layer's dp divides the micro-batch",
            )
        _require(
            self.devices_per_stage % self.embedding.vtp == 0,
            f"vtp={self.embedding.vtp} does not divide the {self.devices_per_stage} devices of a stage",
            "pick vtp among the divisors of world_size / pp",
        )

    def check_fits(self, num_body_layers: int, world_size: int, model_name: str | None = None) -> None:
        """Raise PlanError before any collective if this plan is for another model or world size."""
        _require(
            world_size == self.world_size,
            f"the plan is for world size {self.world_size}, but {world_size} processes run",
            f"launch {self.world_size} processes, or search a plan for {world_size}",
        )
        _require(
            num_body_layers == len(self.layers),
            f"the plan has {len(self.layers)} layer strategies, but the model has {num_body_layers} body layers",
            "use a plan made for this model (galvatron-fx search), or inspect the model's layers with galvatron-fx "
            "inspect",
        )
        planned = self.provenance.get("model")
        _require(
            not (model_name and planned and planned != model_name),
            f"the plan was made for {planned}, not {model_name}",
            "use a plan made for this model",
        )

    # -- JSON ------------------------------------------------------------------------------------
    def to_json_dict(self) -> dict[str, Any]:
        """Galvatron's keys plus a ``galvatron_fx`` section (authoritative when present)."""
        dp_types = [layer.dp_type for layer in self.layers]
        default_dp = max(("ddp", "zero2"), key=lambda t: dp_types.count(t))

        def csv(values):
            return ",".join(str(int(v)) for v in values)

        return {
            "pp_deg": self.pp,
            "tp_sizes_enc": csv(layer.tp for layer in self.layers),
            "tp_consecutive_flags": csv(layer.tp_consecutive for layer in self.layers),
            "dp_types_enc": csv(layer.dp_type == "zero3" for layer in self.layers),
            "use_sp": csv(layer.sp == "ulysses" for layer in self.layers),
            "checkpoint": csv(layer.ckpt for layer in self.layers),
            "global_bsz": self.global_batch,
            "chunks": self.chunks,
            "pp_division": csv(self.pp_division),
            "pipeline_type": "gpipe" if self.pipeline == "gpipe" else "pipedream_flush",
            "default_dp_type": default_dp,
            "vtp": self.embedding.vtp,
            "vsp": int(self.embedding.vsp),
            "embed_sdp": int(self.embedding.embed_sdp),
            "galvatron_fx": {
                "format_version": FORMAT_VERSION,
                "world_size": self.world_size,
                "embedding_dp_type": self.embedding.dp_type,
                "layers": [dataclasses.asdict(layer) for layer in self.layers],
                "grad_sync_every_micro_batch": self.grad_sync_every_micro_batch,
                "prediction": dataclasses.asdict(self.prediction) if self.prediction else None,
                "provenance": self.provenance,
            },
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, world_size: int | None = None) -> "Plan":
        """Load our plan JSON or a Galvatron strategy file (which needs ``world_size``)."""
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise PlanError(f"plan file {path} does not exist", "check the path") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise PlanError(
                f"plan file {path} is not valid JSON ({error})", "write it with Plan.save or galvatron-fx search"
            ) from None
        return cls.from_json_dict(data, world_size=world_size, source=str(path))

    @classmethod
    def from_json_dict(cls, data: dict[str, Any], world_size: int | None = None, source: str = "plan") -> "Plan":
        if not isinstance(data, dict):
            raise PlanError(f"{source} is not a JSON object", "write it with Plan.save")
        try:
            ours = data.get("galvatron_fx")
            if ours is not None:
                return _from_ours(data, ours, world_size)
            return _from_galvatron(data, world_size, source)
        except PlanError as error:
            raise PlanError(f"{source}: {error.cause}", error.remedy) from None
        except (KeyError, ValueError, TypeError) as error:
            raise PlanError(
                f"{source}: missing or malformed key ({type(error).__name__}: {error})",
                "compare it with a file written by Plan.save or Galvatron's search",
            ) from None


def even_division(num_layers: int, pp: int) -> tuple[int, ...]:
    """Split ``num_layers`` into ``pp`` contiguous stages as evenly as possible (earlier stages get more)."""
    base, extra = divmod(num_layers, pp)
    return tuple(base + (1 if stage < extra else 0) for stage in range(pp))


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


def _from_ours(data: dict[str, Any], ours: Any, world_size: int | None) -> Plan:
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
    return Plan(
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


def _from_galvatron(data: dict[str, Any], world_size: int | None, source: str) -> Plan:
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
    return Plan(
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
