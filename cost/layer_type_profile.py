"""LayerTypeProfile: what one layer type costs on one device (``cost.model_profile`` holds one per type).

Its times are ``TimeFormula``s of the micro-batch and sequence length; its memory figures are bytes per
sample, tables of them by TP degree, and, for a ``sequence``-mode profile, the figures of every profiled length
(``by_seq``), from which ``at_seq`` fits them at another. JSON holds only numbers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .time_formula import TimeFormula, eval_seq_terms, fit_seq_terms

# the figures of a LayerTypeProfile that depend on the sequence length (``by_seq`` keeps them per length)
SEQ_FIELDS = (
    "activation_bytes_per_sample",
    "bf16_activation_bytes_per_sample",
    "sp_activation_bytes_per_sample",
    "ckpt_activation_bytes_per_sample",
    "boundary_bytes_per_sample",
    "grad_working_bytes_per_sample",
    "fwd_flops_per_sample",
    "bwd_flops_per_sample",
    "fwd_attention_flops_per_sample",
    "bwd_attention_flops_per_sample",
)
_TABLE_FIELDS = (
    "activation_bytes_per_sample",
    "bf16_activation_bytes_per_sample",
    "sp_activation_bytes_per_sample",
    "grad_working_bytes_per_sample",
)


@dataclass
class LayerTypeProfile:
    """One layer type on one device (also used for the prologue = embedding and epilogue = head)."""

    layer_type: str
    fwd: TimeFormula
    bwd: TimeFormula
    param_count: int
    activation_bytes_per_sample: dict[int, int]  # TP degree → saved bytes, Megatron TP without SP
    ckpt_activation_bytes_per_sample: int  # what a checkpointed layer keeps: its inputs
    boundary_bytes_per_sample: int  # the hidden-state tensor TP/SP collectives move
    num_heads: int = 0  # 0: no attention (any TP degree the projections allow)
    vocab_param_count: int = 0  # parameters split by vocab TP (embedding / head)
    sp_activation_bytes_per_sample: dict[int, int] | None = None  # with Megatron-SP/Ulysses; None: total / tp
    fwd_flops_per_sample: int = 0
    bwd_flops_per_sample: int = 0
    # fused attention (scaled_dot_product_attention): calls per layer and their part of the FLOPs, which an
    # analytic profile's times price at the matmul rate and the cost model prices again at attention's own
    # (CostModel.attention_repriced_s); 0: not counted (measured profiles time attention as it runs)
    attention_calls: int = 0
    fwd_attention_flops_per_sample: int = 0
    bwd_attention_flops_per_sample: int = 0
    # TP degree → the activation gradients its backward holds net of the activations it has freed
    # (cost/memory.py grad_working_bytes); None: not in the profile (Galvatron's files), counted as 0
    grad_working_bytes_per_sample: dict[int, int] | None = None
    # world size → TP degree → (forward, backward) of the lowered layer (collectives included) timed on
    # every rank of that world at once (cost/in_place_profiler.py), in samples per TP group; empty: not measured
    in_place_times: dict[int, dict[int, tuple[TimeFormula, TimeFormula]]] = field(default_factory=dict)
    # elements of the largest parameter: a backward adding to a stored gradient first computes this one whole
    # (0: not in the profile, Galvatron's files)
    largest_param_count: int = 0
    # ``LayerStrategy.lowering_key`` → why lowering cannot shard the layer so (passes.lower.obstacles);
    # for the embedding part, ``vtp{n}`` → why it cannot be vocab-parallel. Empty: nothing known against it
    lowering_obstacles: dict[str, str] = field(default_factory=dict)
    # bytes a layer saves under bf16 autocast per byte it saves in fp32, its weights' casts not included (the
    # residual stream, norms and softmax stay fp32); None: not in the profile, counted as 0.5
    bf16_activation_scale: float | None = None
    # TP degree → saved bytes under bf16 autocast, Megatron TP without SP, weights' casts not included: what
    # stays fp32 (the residual stream, norms) sits mostly outside the TP region and is not split, so the
    # scale above, taken whole, under-prices a TP rank. None: not in the profile (the scale stands in)
    bf16_activation_bytes_per_sample: dict[int, int] | None = None
    # parameters bf16 autocast casts at each forward (the weights and biases matrix multiplications read;
    # cast_param_count); 0: not counted (measured profiles, whose times hold the casts where measured in bf16)
    autocast_cast_param_count: int = 0
    # sequence mode: profiled sequence length → the figures of ``SEQ_FIELDS`` there (tables by TP degree);
    # empty: the figures above are those of the profile's one sequence length
    by_seq: dict[int, dict[str, Any]] = field(default_factory=dict)

    def seq_figures(self) -> dict[str, Any]:
        """The figures of ``SEQ_FIELDS`` as this profile holds them (copies of the tables)."""
        return {
            name: dict(value) if isinstance(value, dict) else value
            for name, value in ((name, getattr(self, name)) for name in SEQ_FIELDS)
        }

    def at_seq(self, seq: int, profiled_seq: int) -> "LayerTypeProfile":
        """This part at sequence length ``seq``: each figure of ``SEQ_FIELDS`` fitted over ``by_seq``
        (``fit_seq_terms``; without ``by_seq``, proportional to the length from ``profiled_seq``, the length
        the figures were taken at). Times are formulas in the length already; the in-place times, measured
        at one length, are left out."""
        points = self.by_seq or {profiled_seq: self.seq_figures()}

        def fitted(values: list[tuple[int, Any]]) -> int:
            return max(0, round(eval_seq_terms(fit_seq_terms(values), seq)))

        changes: dict[str, Any] = {}
        for name in SEQ_FIELDS:
            current = getattr(self, name)
            if name in _TABLE_FIELDS:
                if not current:
                    continue
                changes[name] = {
                    tp: fitted([(s, fig[name][tp]) for s, fig in points.items() if fig.get(name) and tp in fig[name]])
                    for tp in current
                }
            else:
                changes[name] = fitted([(s, fig[name]) for s, fig in points.items() if fig.get(name) is not None])
        return dataclasses.replace(self, **changes, in_place_times={})

    def activation_per_sample(self, tp: int, sequence_sharded: bool, autocast: bool = False) -> float:
        """Saved bytes per sample on one of ``tp`` ranks; ``sequence_sharded`` with Megatron-SP or Ulysses, which
        split every value (Megatron-SP's projections save their all-gathered inputs as the sequence shards they
        were gathered from: ``passes/lower/ops/regather.py``); ``autocast``: under bf16 autocast, from
        ``bf16_activation_bytes_per_sample`` (which must be present)."""
        if autocast:
            table = self.bf16_activation_bytes_per_sample
            return self._lookup(table, 1) / tp if sequence_sharded else self._lookup(table, tp)
        table = (
            self.sp_activation_bytes_per_sample if sequence_sharded and self.sp_activation_bytes_per_sample else None
        )
        if table is None and sequence_sharded:
            return self._lookup(self.activation_bytes_per_sample, 1) / tp
        return self._lookup(table or self.activation_bytes_per_sample, tp)

    def grad_working_per_sample(self, tp: int, sequence_sharded: bool) -> float:
        """Backward's activation-gradient working set per sample on one of ``tp`` ranks (sequence-sharded:
        every value is split, so tp 1's over ``tp``)."""
        table = self.grad_working_bytes_per_sample
        if not table:
            return 0.0
        return self._lookup(table, 1) / tp if sequence_sharded else self._lookup(table, tp)

    @staticmethod
    def _lookup(table: dict[int, int], tp: int) -> float:
        if tp in table:
            return float(table[tp])
        below = max((k for k in table if k <= tp), default=min(table))
        return table[below] * below / tp  # beyond the table: assume the rest shards perfectly

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "layer_type": self.layer_type,
            "fwd": self.fwd.to_json(),
            "bwd": self.bwd.to_json(),
            "param_count": self.param_count,
            "vocab_param_count": self.vocab_param_count,
            "largest_param_count": self.largest_param_count,
            "activation_bytes_per_sample": {str(k): v for k, v in self.activation_bytes_per_sample.items()},
            "sp_activation_bytes_per_sample": (
                {str(k): v for k, v in self.sp_activation_bytes_per_sample.items()}
                if self.sp_activation_bytes_per_sample
                else None
            ),
            "ckpt_activation_bytes_per_sample": self.ckpt_activation_bytes_per_sample,
            "boundary_bytes_per_sample": self.boundary_bytes_per_sample,
            "num_heads": self.num_heads,
            "fwd_flops_per_sample": self.fwd_flops_per_sample,
            "bwd_flops_per_sample": self.bwd_flops_per_sample,
            **(
                {
                    "attention_calls": self.attention_calls,
                    "fwd_attention_flops_per_sample": self.fwd_attention_flops_per_sample,
                    "bwd_attention_flops_per_sample": self.bwd_attention_flops_per_sample,
                }
                if self.attention_calls
                else {}
            ),
            "grad_working_bytes_per_sample": (
                {str(k): v for k, v in self.grad_working_bytes_per_sample.items()}
                if self.grad_working_bytes_per_sample
                else None
            ),
            "in_place_times": {
                str(world): {str(tp): {"fwd": fwd.to_json(), "bwd": bwd.to_json()} for tp, (fwd, bwd) in by_tp.items()}
                for world, by_tp in self.in_place_times.items()
            },
            "lowering_obstacles": dict(self.lowering_obstacles),
            **({"bf16_activation_scale": self.bf16_activation_scale} if self.bf16_activation_scale else {}),
            **(
                {
                    "bf16_activation_bytes_per_sample": {
                        str(k): v for k, v in self.bf16_activation_bytes_per_sample.items()
                    }
                }
                if self.bf16_activation_bytes_per_sample
                else {}
            ),
            **({"autocast_cast_param_count": self.autocast_cast_param_count} if self.autocast_cast_param_count else {}),
            **(
                {"by_seq": {str(s): _figures_to_json(fig) for s, fig in sorted(self.by_seq.items())}}
                if self.by_seq
                else {}
            ),
        }

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> "LayerTypeProfile":
        activation = {int(k): int(v) for k, v in data["activation_bytes_per_sample"].items()}
        if 1 not in activation:
            raise ValueError("activation_bytes_per_sample has no entry for tp 1")
        return cls(
            layer_type=str(data["layer_type"]),
            fwd=TimeFormula.from_json(data["fwd"]),
            bwd=TimeFormula.from_json(data["bwd"]),
            param_count=int(data["param_count"]),
            activation_bytes_per_sample=activation,
            ckpt_activation_bytes_per_sample=int(data["ckpt_activation_bytes_per_sample"]),
            boundary_bytes_per_sample=int(data["boundary_bytes_per_sample"]),
            num_heads=int(data.get("num_heads", 0)),
            vocab_param_count=int(data.get("vocab_param_count", 0)),
            largest_param_count=int(data.get("largest_param_count", 0)),
            sp_activation_bytes_per_sample=_table(data.get("sp_activation_bytes_per_sample")),
            fwd_flops_per_sample=int(data.get("fwd_flops_per_sample", 0)),
            bwd_flops_per_sample=int(data.get("bwd_flops_per_sample", 0)),
            attention_calls=int(data.get("attention_calls", 0)),
            fwd_attention_flops_per_sample=int(data.get("fwd_attention_flops_per_sample", 0)),
            bwd_attention_flops_per_sample=int(data.get("bwd_attention_flops_per_sample", 0)),
            grad_working_bytes_per_sample=_table(data.get("grad_working_bytes_per_sample")),
            in_place_times={
                int(world): {
                    int(tp): (TimeFormula.from_json(times["fwd"]), TimeFormula.from_json(times["bwd"]))
                    for tp, times in by_tp.items()
                }
                for world, by_tp in (data.get("in_place_times") or {}).items()
            },
            lowering_obstacles={str(k): str(v) for k, v in (data.get("lowering_obstacles") or {}).items()},
            bf16_activation_scale=_fraction(data.get("bf16_activation_scale")),
            bf16_activation_bytes_per_sample=_table(data.get("bf16_activation_bytes_per_sample")),
            autocast_cast_param_count=int(data.get("autocast_cast_param_count", 0)),
            by_seq={int(s): _figures_from_json(fig) for s, fig in (data.get("by_seq") or {}).items()},
        )


def _table(value: Any) -> dict[int, int] | None:
    """A JSON table by TP degree (string keys) as ints; None where absent or empty."""
    return {int(k): int(v) for k, v in value.items()} if value else None


def _fraction(value: Any) -> float | None:
    if value is None:
        return None
    if not 0.0 < float(value) <= 2.0:
        raise ValueError(f"{value!r} is not a ratio of bytes")
    return float(value)


def _figures_to_json(figures: dict[str, Any]) -> dict[str, Any]:
    return {
        name: {str(k): v for k, v in value.items()} if isinstance(value, dict) else value
        for name, value in figures.items()
    }


def _figures_from_json(figures: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in SEQ_FIELDS:
        value = figures.get(name)
        if name in _TABLE_FIELDS:
            out[name] = {int(k): int(v) for k, v in value.items()} if value else None
        else:
            out[name] = int(value) if value is not None else None
    return out
