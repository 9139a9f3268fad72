"""The plan space the search explores: which per-layer strategies, embedding strategies, pipeline degrees,
batches and micro-batch counts are allowed (Galvatron's named spaces plus per-dimension switches).

requires: nothing but the world size and the number of body layers.
ensures:  every enumerated ``LayerStrategy`` uses exactly the stage's devices; duplicates that describe
          the same execution are left out (strided groups only when ``1 < tp < devices``; ZeRO only when
          ``dp > 1``; sequence parallelism only when ``tp > 1``), so the search and the brute-force
          enumerator walk the same, duplicate-free space.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from galvatron_fx.errors import ConfigError
from galvatron_fx.plan import (
    DP_TYPES,
    PIPELINES,
    SP_TYPES,
    TP_MODES,
    EmbeddingStrategy,
    LayerStrategy,
    normalize_pipeline,
    tp_modes_for,
)

SPACE_NAMES = ("full", "3d", "dp+tp", "dp+pp", "dp", "sdp", "tp", "pp")


def _powers_of_two_dividing(n: int, limit: int) -> list[int]:
    out, d = [], 1
    while d <= min(n, limit):
        if n % d == 0:
            out.append(d)
        d *= 2
    return out


@dataclass(frozen=True)
class SearchSpace:
    """What the search may choose. ``uniform``: one strategy for every layer (Megatron-style 3D; Galvatron's
    ``fine_grained_mode`` 0).

    ``global_batch`` is ``(min, max, step)``; ``chunks`` ``None`` means every divisor of the global
    batch, else the allowed micro-batch counts. ``pipelines``: ``gpipe`` and ``1f1b`` (Galvatron's
    ``pipedream_flush`` is read as ``1f1b``). ``dp_types`` / ``sp_types`` list the allowed values; the
    embedding and head may use ZeRO-3 (``embed_sdp``) only where ``dp_types`` holds ``zero3``. ``max_*`` cap
    degrees; ``disable_*`` switch a dimension off; ``disable_sdp`` (Galvatron's switch) rules out ZeRO of any
    kind, leaving ``dp_types`` ``("ddp",)``. ``grad_sync_every_micro_batch``: ``None``
    lets the search choose, per setting with several micro-batches and ZeRO allowed, between synchronising
    gradients once per step (less communication; ZeRO holds unsharded gradients until then) and after
    every micro-batch (Galvatron's ``no_async_grad_reduce`` off: less memory); a bool fixes it.
    ``tp_modes``: how a layer's tp ranks may split it (``LayerStrategy.tp_mode``): ``1d`` (Megatron, with the
    ``sp_types``), and the grids ``2d``, ``2.5d`` (at every depth that fits) and ``3d`` on consecutive ranks
    without sequence parallelism, wherever the tp degree forms such a grid (``plan.tp_modes_for``).
    """

    global_batch: tuple[int, int, int] = (8, 8, 1)
    chunks: tuple[int, ...] | None = None
    pipelines: tuple[str, ...] = ("1f1b", "gpipe")
    dp_types: tuple[str, ...] = DP_TYPES
    sp_types: tuple[str, ...] = SP_TYPES
    max_tp: int = 1 << 30
    max_pp: int = 1 << 30
    max_vtp: int = 1 << 30
    max_vsp: int = 1 << 30  # vsp with vtp up to this; max_vtp caps vocab TP (vtp without vsp)
    only_max_tp: bool = False  # Galvatron's "tp" space: just the largest tp allowed
    only_max_pp: bool = False  # Galvatron's "pp" space: just the largest pp allowed
    disable_dp: bool = False  # no plain data parallelism: dp > 1 only with ZeRO-3
    disable_sdp: bool = False  # no ZeRO (2 or 3) anywhere: dp_types becomes ("ddp",)
    disable_tp: bool = False
    disable_pp: bool = False
    disable_tp_consec: bool = False  # no consecutive TP groups (Galvatron's switch)
    disable_tp_strided: bool = False
    disable_ckpt: bool = False
    disable_vtp: bool = False
    disable_vsp: bool = False
    disable_embed_sdp: bool = False
    uniform: bool = False
    grad_sync_every_micro_batch: bool | None = None
    tp_modes: tuple[str, ...] = TP_MODES

    def __post_init__(self):
        lo, hi, step = self.global_batch
        if not (1 <= lo <= hi and step >= 1):
            raise ConfigError(f"global batch range {self.global_batch} is empty", "give min <= max and step >= 1")
        if all(isinstance(p, str) for p in self.pipelines):
            object.__setattr__(self, "pipelines", tuple(dict.fromkeys(normalize_pipeline(p) for p in self.pipelines)))
        if self.disable_sdp:
            if "ddp" not in self.dp_types:
                raise ConfigError(
                    f"dp_types {self.dp_types} allow only ZeRO, which disable_sdp rules out",
                    "allow ddp, or drop disable_sdp",
                )
            object.__setattr__(self, "dp_types", ("ddp",))
        for name, values, allowed in (
            ("pipelines", self.pipelines, PIPELINES),
            ("dp_types", self.dp_types, DP_TYPES),
            ("sp_types", self.sp_types, SP_TYPES),
            ("tp_modes", self.tp_modes, TP_MODES),
        ):
            bad = [v for v in values if v not in allowed]
            if bad or not values:
                raise ConfigError(
                    f"{name} {values} contains {bad or 'nothing'}", f"use a non-empty subset of {allowed}"
                )
        if self.chunks is not None and (not self.chunks or min(self.chunks) < 1):
            raise ConfigError(f"chunks {self.chunks} are not positive", "give micro-batch counts >= 1")

    @classmethod
    def named(cls, name: str, **overrides) -> "SearchSpace":
        """Galvatron's named spaces: ``full`` (``dp_types`` as given); ``3d`` (uniform tp × pp × dp, no ZeRO-3,
        no ckpt); ``dp+tp``; ``dp+pp`` (no ZeRO-3: ``dp_types`` less ``zero3``, as Galvatron switches its "sdp"
        off there); ``dp``, ``sdp`` (ZeRO-3), ``tp`` (the largest tp allowed), ``pp`` (the largest pp allowed),
        the last five uniform without checkpointing. ``overrides`` set any other field."""
        given = tuple(overrides.pop("dp_types", DP_TYPES))
        no_zero3 = tuple(t for t in given if t != "zero3") or ("ddp",)
        uniform = dict(uniform=True, dp_types=no_zero3, disable_ckpt=True)
        presets = {
            "full": dict(dp_types=given),
            "3d": uniform,
            "dp+tp": dict(disable_pp=True, dp_types=no_zero3),
            "dp+pp": dict(disable_tp=True, dp_types=no_zero3),
            "dp": dict(uniform, disable_tp=True, disable_pp=True),
            "sdp": dict(uniform, disable_tp=True, disable_pp=True, dp_types=("zero3",)),
            "tp": dict(uniform, disable_pp=True, only_max_tp=True),
            "pp": dict(uniform, disable_tp=True, only_max_pp=True),
        }
        if name not in presets:
            raise ConfigError(f"search space {name!r} is unknown", f"use one of {SPACE_NAMES}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - fields
        if unknown:
            raise ConfigError(
                f"unknown search option(s) {sorted(unknown)}", f"use fields of SearchSpace: {sorted(fields)}"
            )
        return cls(**{**presets[name], **overrides})

    # -- enumeration ---------------------------------------------------------------------------------
    def pp_degrees(self, world_size: int, num_layers: int) -> list[int]:
        """Pipeline degrees: powers of two dividing the world, at most the number of body layers."""
        if self.disable_pp:
            return [1]
        degrees = _powers_of_two_dividing(world_size, min(self.max_pp, num_layers))
        return degrees[-1:] if self.only_max_pp else degrees

    def tp_degrees(self, devices: int) -> list[int]:
        if self.disable_tp:
            return [1]
        degrees = _powers_of_two_dividing(devices, self.max_tp)
        return degrees[-1:] if self.only_max_tp else degrees

    def default_dp_types(self) -> list[str]:
        """The data-parallel types non-ZeRO-3 layers may share (Galvatron's ``default_dp_type``)."""
        return [t for t in ("ddp", "zero2") if t in self.dp_types] or ["ddp"]

    def layer_strategies(self, devices: int, default_dp_type: str = "ddp") -> list[LayerStrategy]:
        """Every distinct LayerStrategy on ``devices`` devices that this space allows, for plans whose
        non-ZeRO-3 layers use ``default_dp_type`` (layers with dp = 1 are labelled with it: the cost is the
        same, and the embedding follows the plan's dp type in CostModel.evaluate)."""
        out = []
        for tp in self.tp_degrees(devices):
            dp = devices // tp
            consecutive = (
                [True]
                if tp in (1, devices)
                else ([c for c, off in ((True, self.disable_tp_consec), (False, self.disable_tp_strided)) if not off])
            )
            sps = ["none"] if tp == 1 else list(self.sp_types)
            allowed = [
                t for t in (default_dp_type, "zero3") if t in self.dp_types and not (self.disable_dp and t != "zero3")
            ]
            dps = [default_dp_type] if dp == 1 else allowed
            ckpts = [False] if self.disable_ckpt else [False, True]
            modes = tp_modes_for(tp, self.tp_modes) if tp > 1 else [("1d", 1)]
            # a grid runs on consecutive ranks without sequence parallelism; 1D with every allowed sp and order
            layouts = [
                (mode, depth, sp, cons)
                for mode, depth in modes
                for sp, cons in (
                    [(sp, cons) for sp in sps for cons in consecutive]
                    if mode == "1d"
                    else [("none", True)]
                    if True in consecutive
                    else []
                )
            ]
            for mode, depth, sp, cons in layouts:
                for dp_type in dps:
                    for ckpt in ckpts:
                        out.append(
                            LayerStrategy(
                                tp=tp,
                                dp=dp,
                                dp_type=dp_type,
                                sp=sp,
                                tp_consecutive=cons,
                                ckpt=ckpt,
                                tp_mode=mode,
                                tp_depth=depth,
                            )
                        )
        return out

    def embedding_strategies(self, devices: int, default_dp_type: str = "ddp") -> list[EmbeddingStrategy]:
        """Embedding/head strategies: vocab TP degrees dividing the stage, sequence-parallel (vsp) and ZeRO-3
        variants; the replicas (``devices / vtp`` of each vocabulary shard, or under vsp every device of the
        stage) otherwise use ``default_dp_type``, like the non-ZeRO-3 layers."""
        no_sdp = self.disable_embed_sdp or "zero3" not in self.dp_types
        out = []
        for vtp in [1] if self.disable_vtp else _powers_of_two_dividing(devices, devices):
            vsps = [True] if 1 < vtp <= self.max_vsp and not self.disable_vsp else []
            for vsp in ([False] if vtp <= self.max_vtp else []) + vsps:
                replicas = devices if vsp else devices // vtp
                for sdp in [False] if replicas == 1 or no_sdp else [False, True]:
                    out.append(EmbeddingStrategy(vtp=vtp, vsp=vsp, embed_sdp=sdp, dp_type=default_dp_type))
        return out

    def global_batches(self) -> list[int]:
        lo, hi, step = self.global_batch
        return list(range(lo, hi + 1, step))

    def grad_sync_options(self, chunks: int) -> tuple[bool, ...]:
        """Values of ``Plan.grad_sync_every_micro_batch`` to try with ``chunks`` micro-batches: both where they
        differ in memory (several micro-batches, ZeRO allowed) and the space leaves it open."""
        if self.grad_sync_every_micro_batch is not None:
            return (self.grad_sync_every_micro_batch,)
        zero = any(t in ("zero2", "zero3") for t in self.dp_types)
        return (False, True) if chunks > 1 and zero else (False,)

    def chunk_counts(self, global_batch: int) -> list[int]:
        """Micro-batch counts dividing ``global_batch`` (Plan requires it)."""
        candidates = self.chunks if self.chunks is not None else range(1, global_batch + 1)
        return sorted({c for c in candidates if global_batch % c == 0})
