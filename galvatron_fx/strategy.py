"""Strategies: how one layer runs on its stage's devices (LayerStrategy), and the embedding and LM head
(EmbeddingStrategy).

A LayerStrategy checks itself when it is made: tensor-parallel size, data-parallel type, sequence parallelism,
and the process grid of a ``tp_mode`` other than ``1d`` (``grid_shape``); ``tp_modes_for`` lists the grids a
``tp`` can form. The whole-model plan that holds these strategies is ``plan.Plan``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import PlanError

DP_TYPES = ("ddp", "zero2", "zero3")
SP_TYPES = ("none", "megatron", "ulysses")
TP_MODES = ("1d", "2d", "2.5d", "3d")


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
