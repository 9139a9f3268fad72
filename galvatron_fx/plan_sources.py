"""Every way to state a plan, resolved into a Plan for one Program and world size.

- ``None``: search it (``compile`` does that on rank 0 and shares the result);
- a path: our plan JSON, or a Galvatron strategy file;
- ``uniform_plan(pp=2, tp=2, ...)``: global flags applied to every layer, Galvatron's command-line style;
- a ``Plan``: per-layer strategies written in Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import PlanError
from .plan import EmbeddingStrategy, LayerStrategy, Plan


@dataclass(frozen=True)
class UniformPlan:
    """Global flags for every layer. ``sdp``: ZeRO-3 (sharded data parallel) instead of ``dp_type``;
    ``tp_consecutive``: TP groups on consecutive ranks; ``sp``: ``none``, ``megatron`` or ``ulysses``;
    ``global_batch`` ``None`` takes the batch given to ``resolve``."""

    pp: int = 1
    tp: int = 1
    tp_consecutive: bool = True
    sdp: bool = False
    dp_type: str = "ddp"
    sp: str = "none"
    ckpt: bool = False
    chunks: int = 1
    pipeline: str = "1f1b"
    vtp: int = 1
    global_batch: int | None = None

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
        )
        return Plan(
            world_size=world_size,
            layers=(layer,) * num_body_layers,
            pp=self.pp,
            pipeline=self.pipeline,
            chunks=self.chunks,
            global_batch=self.global_batch or global_batch,
            embedding=EmbeddingStrategy(
                vtp=self.vtp, embed_sdp=self.sdp, dp_type=self.dp_type if self.dp_type != "zero3" else "ddp"
            ),
            provenance={"source": "uniform_plan"},
        )


def uniform_plan(**flags) -> UniformPlan:
    """Global flags applied to every layer, e.g. ``uniform_plan(pp=2, tp=2, chunks=4, pipeline="1f1b")``."""
    return UniformPlan(**flags)


def resolve_given_plan(
    plan: "Plan | UniformPlan | str | Path", num_body_layers: int, world_size: int, global_batch: int, model_name: str
) -> Plan:
    """A Plan from anything but ``None`` (searching is compile's job), checked against model and world."""
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
    resolved.check_fits(num_body_layers, world_size, model_name)
    return resolved
