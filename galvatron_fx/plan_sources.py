"""Every way to state a plan, resolved into a Plan for one Program and world size.

- ``None``: search it (``compile`` does that on rank 0 and shares the result);
- a path: our plan JSON, or a Galvatron strategy file;
- ``uniform_plan(pp=2, tp=2, ...)``: global flags applied to every layer, Galvatron's command-line style;
- a ``Plan``: per-layer strategies written in Python.

``sequence_parallel=True`` adds Megatron sequence parallelism to every tensor-parallel layer of any of them, as
Galvatron's ``--sequence_parallel`` flag does: Galvatron's strategy files do not record it.

``check_plan_settings`` compares what a plan was searched for (world size, global batch, and what its
provenance records: sequence length, precision) with the run that uses it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import PlanError
from .plan import EmbeddingStrategy, LayerStrategy, Plan, normalize_pipeline


@dataclass(frozen=True)
class UniformPlan:
    """Global flags for every layer. ``sdp``: ZeRO-3 (sharded data parallel) instead of ``dp_type``;
    ``tp_consecutive``: TP groups on consecutive ranks; ``sp``: ``none``, ``megatron`` or ``ulysses``;
    ``tp_mode``: ``1d`` or a grid (``2d``, ``2.5d`` with ``tp_depth``, ``3d``; see ``LayerStrategy``);
    ``pipeline``: ``1f1b`` (or Galvatron's name for it, ``pipedream_flush``) or ``gpipe``; ``vtp``: the
    embedding's and head's vocab TP degree, or with ``vsp`` the group over which they run sequence-parallel;
    ``global_batch`` ``None`` takes the batch given to ``resolve``."""

    pp: int = 1
    tp: int = 1
    tp_consecutive: bool = True
    tp_mode: str = "1d"
    tp_depth: int = 1
    sdp: bool = False
    dp_type: str = "ddp"
    sp: str = "none"
    ckpt: bool = False
    chunks: int = 1
    pipeline: str = "1f1b"
    vtp: int = 1
    vsp: bool = False
    global_batch: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "pipeline", normalize_pipeline(self.pipeline))

    def resolve(self, num_body_layers: int, world_size: int, global_batch: int) -> Plan:
        """The Plan these flags describe for a model with ``num_body_layers`` body layers."""
        if self.pp < 1 or world_size % self.pp:
            raise PlanError(f"pp={self.pp} does not divide the world size {world_size}", "choose pp among its divisors")
        stage_devices = world_size // self.pp
        if self.tp < 1 or stage_devices % self.tp:
            raise PlanError(
                f"tp={self.tp} does not divide the {stage_devices} devices of a stage",
                "choose tp among the divisors of world_size / pp",
            )
        layer = LayerStrategy(
            tp=self.tp,
            dp=stage_devices // self.tp,
            dp_type="zero3" if self.sdp else self.dp_type,
            sp=self.sp,
            tp_consecutive=self.tp_consecutive,
            ckpt=self.ckpt,
            tp_mode=self.tp_mode,
            tp_depth=self.tp_depth,
        )
        return Plan(
            world_size=world_size,
            layers=(layer,) * num_body_layers,
            pp=self.pp,
            pipeline=self.pipeline,
            chunks=self.chunks,
            global_batch=self.global_batch or global_batch,
            embedding=EmbeddingStrategy(
                vtp=self.vtp,
                vsp=self.vsp,
                embed_sdp=self.sdp,
                dp_type=self.dp_type if self.dp_type != "zero3" else "ddp",
            ),
            provenance={"source": "uniform_plan"},
        )


def uniform_plan(**flags) -> UniformPlan:
    """Global flags applied to every layer, e.g. ``uniform_plan(pp=2, tp=2, chunks=4, pipeline="1f1b")``."""
    return UniformPlan(**flags)


def with_sequence_parallel(plan: Plan) -> Plan:
    """``plan`` with Megatron sequence parallelism on every tensor-parallel layer (``tp > 1``) that has no
    sequence parallelism (Ulysses layers keep theirs); its prediction, made for the other layers, is dropped."""
    layers = tuple(
        dataclasses.replace(layer, sp="megatron") if layer.tp > 1 and layer.sp == "none" else layer
        for layer in plan.layers
    )
    if layers == plan.layers:
        return plan
    return dataclasses.replace(
        plan, layers=layers, prediction=None, provenance={**plan.provenance, "sequence_parallel": "megatron"}
    )


def resolve_given_plan(
    plan: "Plan | UniformPlan | str | Path",
    num_body_layers: int,
    world_size: int,
    global_batch: int,
    model_name: str,
    sequence_parallel: bool = False,
) -> Plan:
    """A Plan from anything but ``None`` (searching is compile's job), checked against model and world;
    ``sequence_parallel``: Megatron-SP on every TP layer (``with_sequence_parallel``)."""
    if isinstance(plan, (str, Path)):
        resolved = Plan.load(plan, world_size=world_size)
    elif isinstance(plan, UniformPlan):
        resolved = plan.resolve(num_body_layers, world_size, global_batch)
    elif isinstance(plan, Plan):
        resolved = plan
    else:
        raise PlanError(
            f"plan={plan!r} is not a plan", "pass None (search), a path, galvatron_fx.uniform_plan(...) or a Plan"
        )
    if sequence_parallel:
        resolved = with_sequence_parallel(resolved)
    resolved.check_fits(num_body_layers, world_size, model_name)
    return resolved


@dataclass(frozen=True)
class PlanSettings:
    """The settings a run takes from its plan: each the caller's value, else the plan's (``None``: neither
    says). ``seq``: the sequence length the plan was priced at (tokens per sample; patches for vision
    models); ``mixed_precision``: ``"fp32"`` or ``"bf16"``."""

    seq: int | None
    mixed_precision: str | None
    global_batch: int
    world_size: int


def check_plan_settings(
    plan: Plan,
    *,
    seq: int | None = None,
    mixed_precision: str | None = None,
    global_batch: int | None = None,
    world_size: int | None = None,
    path: "str | Path | None" = None,
) -> PlanSettings:
    """The settings to run ``plan`` with: where the caller gives none (``None``), the plan's; where the caller
    gives one the plan records otherwise, PlanError naming the plan file (``path``), the key and both values.

    The plan always records ``world_size`` and ``global_bsz``; ``seq`` and ``mixed_precision`` are in the
    provenance of plans searched since they were recorded (``galvatron-fx search``, ``compile``), and are
    not compared where absent. Pure: reads nothing but its arguments."""
    where = f"plan file {path}" if path else "the plan"
    recorded = plan.provenance.get("seq"), plan.provenance.get("mixed_precision")
    checks: list[tuple[str, Any, Any, str]] = [
        (
            "world_size",
            plan.world_size,
            world_size,
            f"launch {plan.world_size} processes, or search a plan for {world_size} devices",
        ),
        (
            "global_bsz",
            plan.global_batch,
            global_batch,
            f"use a global batch of {plan.global_batch} samples, or search a plan for {global_batch} "
            f"(galvatron-fx search --batch {global_batch})",
        ),
        (
            "seq",
            recorded[0],
            seq,
            f"run at sequence length {recorded[0]} (leave it unset to take the plan's), or search a plan for "
            f"{seq} (galvatron-fx search --seq {seq})",
        ),
        (
            "mixed_precision",
            recorded[1],
            mixed_precision,
            f"train in {recorded[1]} (leave the precision unset to take the plan's), or search a plan with "
            f"--mixed-precision {mixed_precision}",
        ),
    ]
    for key, planned, given, remedy in checks:
        if planned is not None and given is not None and planned != given:
            raise PlanError(
                f"{where}: key {key} is {planned!r} (what it was searched for), but the run has {given!r}", remedy
            )
    return PlanSettings(
        seq=seq if seq is not None else recorded[0],
        mixed_precision=mixed_precision if mixed_precision is not None else recorded[1],
        global_batch=global_batch if global_batch is not None else plan.global_batch,
        world_size=world_size if world_size is not None else plan.world_size,
    )
