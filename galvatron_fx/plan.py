"""The whole hybrid-parallel plan (Plan): one LayerStrategy per body layer, the pipeline (stages, their
division of the layers, schedule, micro-batches), the embedding's strategy, its validation and whether it fits a
model and a world size.

Its parts live in their own modules, re-exported here (``from galvatron_fx.plan import ...`` reaches all of them):
the per-layer and embedding strategies in ``strategy.py``, the cost model's ``Prediction`` in ``prediction.py``,
and the JSON files (ours, a superset of Galvatron's strategy file) in ``plan_files.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .plan_files import FORMAT_VERSION, plan_from_json_dict, plan_to_json_dict, read_plan_json, save_plan
from .prediction import Prediction
from .strategy import DP_TYPES, SP_TYPES, TP_MODES, EmbeddingStrategy, LayerStrategy, _require, tp_modes_for

__all__ = [
    "DP_TYPES",
    "FORMAT_VERSION",
    "PIPELINES",
    "PIPELINE_ALIASES",
    "SP_TYPES",
    "TP_MODES",
    "EmbeddingStrategy",
    "LayerStrategy",
    "Plan",
    "Prediction",
    "even_division",
    "normalize_pipeline",
    "tp_modes_for",
]

PIPELINES = ("gpipe", "1f1b")
PIPELINE_ALIASES = {"pipedream_flush": "1f1b"}  # Galvatron's name for 1F1B with a flush per step


def normalize_pipeline(name: str) -> str:
    """A pipeline schedule's name as plans store it: Galvatron's ``pipedream_flush`` is ``1f1b``; other names
    are returned unchanged (validation says what is allowed)."""
    return PIPELINE_ALIASES.get(name, name) if isinstance(name, str) else name


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

    # -- JSON (plan_files.py) --------------------------------------------------------------------
    def to_json_dict(self) -> dict[str, Any]:
        """Galvatron's keys plus a ``galvatron_fx`` section (authoritative when present)."""
        return plan_to_json_dict(self)

    def save(self, path: str | Path) -> None:
        save_plan(self, path)

    @classmethod
    def load(cls, path: str | Path, world_size: int | None = None) -> "Plan":
        """Load our plan JSON or a Galvatron strategy file (which needs ``world_size``)."""
        return cls.from_json_dict(read_plan_json(path), world_size=world_size, source=str(path))

    @classmethod
    def from_json_dict(cls, data: dict[str, Any], world_size: int | None = None, source: str = "plan") -> "Plan":
        return plan_from_json_dict(Plan, data, world_size=world_size, source=source)


def even_division(num_layers: int, pp: int) -> tuple[int, ...]:
    """Split ``num_layers`` into ``pp`` contiguous stages as evenly as possible (earlier stages get more)."""
    base, extra = divmod(num_layers, pp)
    return tuple(base + (1 if stage < extra else 0) for stage in range(pp))
