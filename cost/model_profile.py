"""ModelProfile: per layer type, what a layer costs on one device, as formulas and byte counts.

Times are ``TimeFormula``s (``cost.time_formula``, with their fits): sums of ``coefficient · b^i · s^j``
seconds for a micro-batch of ``b`` samples at sequence length ``s`` on one device, kept as sympy expressions
and lambdified for the search.
They come from measurement (cost/layer_profiler.py, fitted by least squares), from FLOPs ÷ sustained
throughput (``ModelProfile.from_program``, the analytic mode for clusters not at hand), or from
Galvatron's computation profile. Memory: parameters, saved activations per sample for every TP degree
(with and without checkpointing), the bytes a pipeline cut after each body layer sends per sample.
JSON stores the terms as numbers: loading a profile never evaluates text.

Profile modes, as Galvatron's ``profile_mode`` (``ModelProfile.profile_mode``; the measured micro-batch sizes
and sequence lengths are in ``profiled_batches`` / ``profiled_seqs``):
- ``static``: one micro-batch size at one sequence length; time proportional to the batch.
- ``batch``: several micro-batch sizes at one sequence length; time fitted linearly in the batch
  (``1, b``); memory per sample is exact in the batch.
- ``sequence``: several sequence lengths (at one or more batch sizes). Time is ``1, b·s, b·s²``: the
  projections and MLP are linear in the tokens, attention's score and value products quadratic. With three
  or more lengths the three terms are fitted freely; with two, the layer's FLOPs at the two lengths
  (exact, from the graph) fix the ratio of the quadratic to the linear part, and the fit finds the
  overhead and the throughput. Memory is kept per profiled length (``LayerTypeProfile.by_seq``) and fitted
  per figure: linear in ``s``, plus ``s²`` where it grows faster (attention that materialises its
  scores), or plus a constant where it grows slower (``fit_seq_terms``).
A ``static`` or ``batch`` profile describes its ``seq_length`` only (``check_seq`` refuses another);
``ModelProfile.at_seq`` evaluates a ``sequence`` profile at any length, with a ``SequenceRangeWarning``
outside the profiled range.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from galvatron_fx.errors import ProfileError
from galvatron_fx.passes.analysis.annotate import saved_bytes_under_autocast

from .hardware import read_json
from .memory import DTYPE_BYTES, grad_working_bytes, tp_activation_split
from .time_formula import (
    PROFILE_MODES,
    TimeFormula,
    eval_seq_terms,
    fit_seq_terms,
)

FORMAT = "galvatron_fx.model_profile/1"
MAX_TP = 64
# the figures of a LayerTypeProfile that depend on the sequence length (``by_seq`` keeps them per length)
SEQ_FIELDS = (
    "activation_bytes_per_sample",
    "sp_activation_bytes_per_sample",
    "ckpt_activation_bytes_per_sample",
    "boundary_bytes_per_sample",
    "grad_working_bytes_per_sample",
    "fwd_flops_per_sample",
    "bwd_flops_per_sample",
)
_TABLE_FIELDS = (
    "activation_bytes_per_sample",
    "sp_activation_bytes_per_sample",
    "grad_working_bytes_per_sample",
)


class SequenceRangeWarning(UserWarning):
    """A sequence-mode profile evaluated at a sequence length outside the range it was measured over."""


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

    def activation_per_sample(self, tp: int, sequence_sharded: bool) -> float:
        """Saved bytes per sample on one of ``tp`` ranks; ``sequence_sharded`` with Megatron-SP or Ulysses, which
        split every value (Megatron-SP's projections save their all-gathered inputs as the sequence shards they
        were gathered from: ``passes/lower/ops/regather.py``)."""
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
            **({"autocast_cast_param_count": self.autocast_cast_param_count} if self.autocast_cast_param_count else {}),
            **(
                {"by_seq": {str(s): _figures_to_json(fig) for s, fig in sorted(self.by_seq.items())}}
                if self.by_seq
                else {}
            ),
        }

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> "LayerTypeProfile":
        sp = data.get("sp_activation_bytes_per_sample")
        working = data.get("grad_working_bytes_per_sample")
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
            sp_activation_bytes_per_sample={int(k): int(v) for k, v in sp.items()} if sp else None,
            fwd_flops_per_sample=int(data.get("fwd_flops_per_sample", 0)),
            bwd_flops_per_sample=int(data.get("bwd_flops_per_sample", 0)),
            grad_working_bytes_per_sample={int(k): int(v) for k, v in working.items()} if working else None,
            in_place_times={
                int(world): {
                    int(tp): (TimeFormula.from_json(times["fwd"]), TimeFormula.from_json(times["bwd"]))
                    for tp, times in by_tp.items()
                }
                for world, by_tp in (data.get("in_place_times") or {}).items()
            },
            lowering_obstacles={str(k): str(v) for k, v in (data.get("lowering_obstacles") or {}).items()},
            bf16_activation_scale=_fraction(data.get("bf16_activation_scale")),
            autocast_cast_param_count=int(data.get("autocast_cast_param_count", 0)),
            by_seq={int(s): _figures_from_json(fig) for s, fig in (data.get("by_seq") or {}).items()},
        )


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


@dataclass
class ModelProfile:
    """Everything the cost model needs about a model (see module docstring).

    ``layer_types`` lists the type of every body layer in order; ``types`` profiles each type once;
    ``prologue`` / ``epilogue`` are the embedding and head parts; ``cut_bytes_per_sample[i]`` is what a
    pipeline cut after body layer ``i`` sends per sample (every live activation). ``dtype`` is the
    precision the times and activation bytes were taken in. ``profile_mode`` (module docstring): ``static``,
    ``batch`` or ``sequence``; ``profiled_batches`` / ``profiled_seqs`` the micro-batch sizes and sequence
    lengths measured (or captured, for an analytic profile); ``cut_bytes_by_seq`` the cut bytes per profiled
    length (sequence mode). ``unrecorded``: keys the file it was loaded from lacks (their defaults stand in,
    are not checked against a run, and are not written back).
    """

    name: str
    layer_types: list[str]
    types: dict[str, LayerTypeProfile]
    prologue: LayerTypeProfile
    epilogue: LayerTypeProfile
    cut_bytes_per_sample: list[int]
    seq_length: int
    hidden_size: int
    num_heads: int
    dtype: str = "fp32"
    mode: str = "analytic"  # analytic | measured | galvatron
    device: str = ""
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    tied_param_count: int = 0  # parameters the prologue and epilogue share (tied embedding and head)
    unrecorded: frozenset[str] = field(default_factory=frozenset, compare=False, repr=False)
    profile_mode: str = "batch"
    profiled_batches: list[int] = field(default_factory=list)
    profiled_seqs: list[int] = field(default_factory=list)
    cut_bytes_by_seq: dict[int, list[int]] = field(default_factory=dict)

    def parts(self) -> dict[str, LayerTypeProfile]:
        """Every profiled part by name: ``prologue``, each layer type, ``epilogue``."""
        return {"prologue": self.prologue, **self.types, "epilogue": self.epilogue}

    # -- sequence lengths ------------------------------------------------------------------------
    def seq_range(self) -> tuple[int, int]:
        """The sequence lengths the profile was measured over, as (shortest, longest): the lengths both its
        times and its memory figures were taken at."""
        sets = [set(self.profiled_seqs) or {self.seq_length}]
        memory = {s for part in self.parts().values() for s in part.by_seq}
        if memory:
            sets.append(memory)
        return max(min(s) for s in sets), min(max(s) for s in sets)

    def check_seq(self, seq: int) -> None:
        """Raise ProfileError if the profile cannot price sequence length ``seq``: a ``static`` or ``batch``
        profile describes its own ``seq_length`` only."""
        if seq == self.seq_length or self.profile_mode == "sequence":
            if seq < 1:
                raise ProfileError(f"sequence length {seq} is below 1", "give a positive sequence length")
            return
        where = self.source or "the model profile (in memory)"
        raise ProfileError(
            f"{where}: key seq_length is {self.seq_length} (a {self.profile_mode}-mode profile, measured at that "
            f"sequence length only), but the run's sequence length is {seq}",
            f"use sequence length {self.seq_length}, or profile the model again with galvatron-fx profile-model: "
            f"--seqs {seq} (its only length), or --profile-mode sequence with --seqs around {seq}",
        )

    def at_seq(self, seq: int) -> "ModelProfile":
        """This profile at sequence length ``seq`` (itself at its own ``seq_length``). A ``sequence`` profile's
        memory figures are fitted over its profiled lengths (``LayerTypeProfile.at_seq``) and its times are
        formulas in the length; outside the profiled range a ``SequenceRangeWarning`` names the range and the
        length. Other modes raise ProfileError (``check_seq``)."""
        self.check_seq(seq)
        if seq == self.seq_length:
            return self
        low, high = self.seq_range()
        if not low <= seq <= high:
            warnings.warn(
                f"{self.source or 'the model profile'} was profiled at sequence lengths {low}..{high}; sequence "
                f"length {seq} is outside that range, so its times and memory are extrapolated",
                SequenceRangeWarning,
                stacklevel=2,
            )
        profiled = self.seq_length
        cuts_by_seq = self.cut_bytes_by_seq or {profiled: list(self.cut_bytes_per_sample)}
        cuts = [
            max(0, round(eval_seq_terms(fit_seq_terms([(s, c[i]) for s, c in cuts_by_seq.items()]), seq)))
            for i in range(len(self.cut_bytes_per_sample))
        ]
        return dataclasses.replace(
            self,
            types={name: part.at_seq(seq, profiled) for name, part in self.types.items()},
            prologue=self.prologue.at_seq(seq, profiled),
            epilogue=self.epilogue.at_seq(seq, profiled),
            cut_bytes_per_sample=cuts,
            seq_length=seq,
        )

    def record_seq_figures(self, by_seq: "dict[int, ModelProfile]") -> None:
        """Keep the memory figures of ``by_seq`` (this model profiled from the graph at each sequence length,
        e.g. ``from_program``) in each part's ``by_seq`` and in ``cut_bytes_by_seq`` (in place): what a
        ``sequence`` profile fits against the length. Parts are matched by name; every profile must have
        this one's parts and body layers."""
        for seq, other in by_seq.items():
            theirs = other.parts()
            if set(theirs) != set(self.parts()) or len(other.cut_bytes_per_sample) != len(self.cut_bytes_per_sample):
                raise ProfileError(
                    f"the model has parts {sorted(theirs)} at sequence length {seq}, but {sorted(self.parts())} "
                    f"at {self.seq_length}",
                    "profile a model whose structure does not depend on the sequence length",
                )
            for name, part in self.parts().items():
                part.by_seq[seq] = theirs[name].seq_figures()
            self.cut_bytes_by_seq[seq] = list(other.cut_bytes_per_sample)

    def layer(self, layer_type: str) -> LayerTypeProfile:
        try:
            return self.types[layer_type]
        except KeyError:
            raise ProfileError(
                f"model profile {self.source or self.name} has no layer type {layer_type!r}",
                f"profile the model again; it knows {sorted(self.types)}",
            ) from None

    # -- construction from a Program ---------------------------------------------------------------
    @classmethod
    def from_program(
        cls,
        program,
        *,
        flops_per_s: float,
        dtype: str = "fp32",
        num_heads: int | None = None,
        device: str = "",
        name: str | None = None,
        bf16_activations: bool = True,
        op_overhead_s: float = 0.0,
    ) -> "ModelProfile":
        """Analytic profile: time = the operators dispatched × ``op_overhead_s`` (whatever the batch) + FLOPs ÷
        ``flops_per_s`` (sustained; both from ``HardwareProfile``), memory from the graph's annotations.

        Times are linear in the micro-batch at the captured sequence length (one capture cannot separate
        the sequence terms; profile-model measures them). Activation bytes per TP degree are derived from
        the graph (``tp_activation_split``), not measured: TP lowering is a later step. What a layer keeps
        under bf16 autocast is counted on a second fake run (``bf16_activation_scale``), unless
        ``bf16_activations`` is False (a profile that prices fp32 training only: then counted as half).
        """
        heads = num_heads if num_heads is not None else infer_num_heads(program)
        batch = program.batch_size
        autocast_saved = saved_bytes_under_autocast(program.graph_module, {}) if bf16_activations else None
        types: dict[str, LayerTypeProfile] = {}
        for layer in program.body:
            if layer.layer_type not in types:
                types[layer.layer_type] = dataclasses.replace(
                    layer_type_profile(program, layer, flops_per_s, heads, op_overhead_s=op_overhead_s),
                    bf16_activation_scale=bf16_activation_scale(layer, autocast_saved),
                )
        seq, hidden = infer_seq_hidden(program)
        return cls(
            name=name or program.model_name,
            layer_types=[layer.layer_type for layer in program.body],
            types=types,
            prologue=layer_type_profile(program, program.prologue, flops_per_s, 0, True, op_overhead_s),
            epilogue=layer_type_profile(program, program.epilogue, flops_per_s, 0, True, op_overhead_s),
            cut_bytes_per_sample=[_batched_bytes(layer.boundary_out) // batch for layer in program.body],
            seq_length=seq,
            hidden_size=hidden,
            num_heads=heads,
            dtype=dtype,
            mode="analytic",
            device=device,
            tied_param_count=_tied_param_count(program),
            profiled_seqs=[seq],
        )

    def add_lowering_obstacles(self, obstacles: dict[str, dict[str, str]]) -> None:
        """Record what lowering cannot do (``passes.lower.obstacles``): per layer type, and ``"embedding"``
        for vocab parallelism (kept on the epilogue's part)."""
        for layer_type, reasons in obstacles.items():
            part = self.epilogue if layer_type == "embedding" else self.types.get(layer_type)
            if part is not None:
                part.lowering_obstacles.update(reasons)

    # -- JSON ----------------------------------------------------------------------------------
    def to_json_dict(self) -> dict[str, Any]:
        data = {
            "format": FORMAT,
            "name": self.name,
            "mode": self.mode,
            "device": self.device,
            "dtype": self.dtype,
            "seq_length": self.seq_length,
            "hidden_size": self.hidden_size,
            "num_heads": self.num_heads,
            "layer_types": list(self.layer_types),
            "cut_bytes_per_sample": list(self.cut_bytes_per_sample),
            "types": {k: v.to_json_dict() for k, v in self.types.items()},
            "prologue": self.prologue.to_json_dict(),
            "epilogue": self.epilogue.to_json_dict(),
            "extra": self.extra,
            "tied_param_count": self.tied_param_count,
            "profile_mode": self.profile_mode,
            "profiled": {"batches": list(self.profiled_batches), "seqs": list(self.profiled_seqs)},
        }
        if self.cut_bytes_by_seq:
            data["cut_bytes_by_seq"] = {str(s): list(c) for s, c in sorted(self.cut_bytes_by_seq.items())}
        return {key: value for key, value in data.items() if key not in self.unrecorded}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, *, device: str | None = None) -> "ModelProfile":
        """Read a profile written by ``save`` / profile-model; ``device`` checks what it was measured on."""
        profile = cls.from_json_dict(read_json(path), source=str(path))
        if device is not None and profile.mode == "measured" and profile.device.lower() != device.lower():
            raise ProfileError(
                f"{path}: key device is {profile.device!r}, but the cluster has {device!r}",
                "profile the model on this device, or build an analytic profile for it",
            )
        return profile

    @classmethod
    def from_json_dict(cls, data: Any, source: str = "model profile") -> "ModelProfile":
        if not isinstance(data, dict):
            raise ProfileError(f"{source} is not a JSON object", "write it with galvatron-fx profile-model")
        if data.get("format") != FORMAT:
            raise ProfileError(
                f"{source}: key format is {data.get('format')!r}, not {FORMAT!r}",
                "write it with galvatron-fx profile-model (Galvatron's files load with cost.galvatron_import)",
            )
        key = "types"
        try:
            types = {}
            for name, entry in data["types"].items():
                key = f"types/{name}"
                types[str(name)] = LayerTypeProfile.from_json_dict(entry)
            key = "prologue"
            prologue = LayerTypeProfile.from_json_dict(data["prologue"])
            key = "epilogue"
            epilogue = LayerTypeProfile.from_json_dict(data["epilogue"])
            key = "layer_types"
            layer_types = [str(t) for t in data["layer_types"]]
            missing = sorted(set(layer_types) - set(types))
            if missing or not layer_types:
                raise ValueError(f"types {missing} are not profiled" if missing else "no body layers")
            key = "cut_bytes_per_sample"
            cuts = [int(v) for v in data["cut_bytes_per_sample"]]
            if len(cuts) != len(layer_types):
                raise ValueError(f"{len(cuts)} entries for {len(layer_types)} layers")
            key = "seq_length"
            scalars = {k: int(data[k]) for k in ("seq_length", "hidden_size", "num_heads")}
            key = "profile_mode"
            profile_mode = str(data.get("profile_mode", "batch"))
            if profile_mode not in PROFILE_MODES:
                raise ValueError(f"{profile_mode!r} is not one of {', '.join(PROFILE_MODES)}")
            key = "profiled"
            profiled = data.get("profiled") or {}
            batches, seqs = [int(b) for b in profiled.get("batches", [])], [int(s) for s in profiled.get("seqs", [])]
            key = "cut_bytes_by_seq"
            cuts_by_seq = {int(s): [int(v) for v in c] for s, c in (data.get("cut_bytes_by_seq") or {}).items()}
            if any(len(c) != len(layer_types) for c in cuts_by_seq.values()):
                raise ValueError(f"an entry does not have {len(layer_types)} layers")
        except (KeyError, ValueError, TypeError, AttributeError) as error:
            raise ProfileError(
                f"{source}: key {key} is missing or malformed ({type(error).__name__}: {error})",
                "profile the model again with galvatron-fx profile-model",
            ) from None
        return cls(
            str(data.get("name", "")),
            layer_types,
            types,
            prologue,
            epilogue,
            cuts,
            **scalars,
            dtype=str(data.get("dtype", "fp32")),
            mode=str(data.get("mode", "")),
            device=str(data.get("device", "")),
            source=source,
            extra=dict(data.get("extra") or {}),
            tied_param_count=int(data.get("tied_param_count", 0)),
            unrecorded=frozenset(
                key for key in ("dtype", "device", "mode", "profile_mode", "profiled") if key not in data
            ),
            profile_mode=profile_mode,
            profiled_batches=batches,
            profiled_seqs=seqs,
            cut_bytes_by_seq=cuts_by_seq,
        )


def analytic_sequence_profile(by_seq: "dict[int, ModelProfile]", flops_per_s: float) -> ModelProfile:
    """A ``sequence``-mode analytic profile from analytic profiles at several lengths (``from_program`` at each,
    priced at ``flops_per_s``): each part's FLOPs fitted against the length (``fit_seq_terms``: linear, plus
    quadratic where attention's are counted) ÷ the throughput, and the memory figures of every length."""
    seqs = sorted(by_seq)
    profile = copy.deepcopy(by_seq[seqs[-1]])
    for name, part in profile.parts().items():
        for pass_ in ("fwd", "bwd"):
            flops = [(s, getattr(by_seq[s].parts()[name], f"{pass_}_flops_per_sample")) for s in seqs]
            terms = fit_seq_terms(flops)
            setattr(part, pass_, TimeFormula(tuple((1, j, c / flops_per_s) for j, c in terms)))
    profile.record_seq_figures(by_seq)
    profile.profile_mode, profile.profiled_seqs = "sequence", seqs
    return profile


# -- helpers shared with the measuring profiler ----------------------------------------------------
def _batched_bytes(specs) -> int:
    return sum(spec.nbytes for spec in specs if spec.batched)


def layer_type_profile(
    program, layer, flops_per_s: float, heads: int, vocab: bool = False, op_overhead_s: float = 0.0
) -> LayerTypeProfile:
    """A LayerTypeProfile of ``layer`` with analytic times (operators × ``op_overhead_s`` + FLOPs ÷
    ``flops_per_s``) and graph memory."""
    batch = program.batch_size
    stats = layer.stats
    replicated, sharded = tp_activation_split(program.graph_module, layer)
    per_tp, working = {}, {}
    tp = 1
    while tp <= MAX_TP:
        per_tp[tp] = int((replicated + sharded / tp) / batch)
        working[tp] = grad_working_bytes(program.graph_module, layer, tp) // batch
        tp *= 2
    outputs = [
        spec
        for spec in layer.boundary_out
        if spec.name in layer.output_names and spec.batched and spec.dtype.is_floating_point
    ]
    hidden_bytes = max((spec.nbytes for spec in outputs), default=0) // batch
    fwd_flops, bwd_flops = stats.fwd_flops // batch, stats.bwd_flops // batch
    return LayerTypeProfile(
        layer_type=layer.layer_type if layer.kind not in ("prologue", "epilogue") else layer.kind,
        fwd=_analytic_time(stats.fwd_ops * op_overhead_s, fwd_flops / flops_per_s),
        bwd=_analytic_time(stats.bwd_ops * op_overhead_s, bwd_flops / flops_per_s),
        param_count=stats.param_count,
        activation_bytes_per_sample=per_tp,
        ckpt_activation_bytes_per_sample=_batched_bytes(layer.inputs) // batch,
        boundary_bytes_per_sample=hidden_bytes,
        num_heads=heads,
        vocab_param_count=_vocab_params(program, layer) if vocab else 0,
        largest_param_count=max((program.graph_module.get_parameter(n).numel() for n in layer.param_names), default=0),
        fwd_flops_per_sample=fwd_flops,
        bwd_flops_per_sample=bwd_flops,
        grad_working_bytes_per_sample=working,
        autocast_cast_param_count=cast_param_count(program, layer),
    )


def _analytic_time(fixed_s: float, s_per_sample: float) -> TimeFormula:
    return TimeFormula(tuple(term for term in ((0, 0, fixed_s), (1, 0, s_per_sample)) if term[2]))


# operators that multiply by a weight (autocast runs them in bf16, casting the weight), and the views between
_MATMULS = ("linear", "addmm", "mm", "bmm", "matmul", "baddbmm", "einsum", "conv1d", "conv2d", "conv3d")
_VIEWS = ("t", "transpose", "permute", "view", "reshape", "expand", "alias", "_to_copy", "to")


def cast_param_count(program, layer) -> int:
    """Parameters of ``layer`` that bf16 autocast casts at each forward: those a matrix multiplication of the
    layer reads, directly or through views (an embedding table only indexed is not cast; one tied to the head
    is cast by the head's layer)."""
    own = set(layer.node_names)

    def op(node) -> str:
        return getattr(node.target, "__name__", str(node.target)).split(".")[0]

    def multiplied(node) -> bool:
        users = [user for user in node.users if user.name in own and user.op == "call_function"]
        return any(op(user) in _MATMULS or (op(user) in _VIEWS and multiplied(user)) for user in users)

    nodes = {n.target: n for n in program.graph_module.graph.nodes if n.op == "get_attr"}
    return sum(
        program.graph_module.get_parameter(name).numel()
        for name in layer.param_names
        if name in nodes and multiplied(nodes[name])
    )


def bf16_activation_scale(layer, autocast_saved: dict[str, int] | None) -> float | None:
    """What ``layer`` saves under bf16 autocast (``saved_bytes_under_autocast``) less its weights' casts (the
    cost model adds those itself: ``CostModel.autocast_cast_bytes``), per byte it saves in fp32; None where it
    saves nothing in fp32 or was not run under autocast (a model on the meta device)."""
    fp32 = layer.stats.saved_activation_bytes
    if autocast_saved is None or fp32 <= 0:
        return None
    casts = layer.stats.param_count * DTYPE_BYTES["bf16"]
    return max(sum(autocast_saved.get(name, 0) for name in layer.node_names) - casts, 1) / fp32


def _tied_param_count(program) -> int:
    """Parameters used by both the prologue and the epilogue (a tied embedding and LM head)."""
    shared = set(program.prologue.param_names) & set(program.epilogue.param_names)
    return sum(program.graph_module.get_parameter(name).numel() for name in shared)


def _vocab_params(program, layer) -> int:
    """Parameters of ``layer`` with a vocabulary dimension (the largest dimension among its 2-D weights)."""
    params = [program.graph_module.get_parameter(n) for n in layer.param_names]  # tied names too
    matrices = [p for p in params if p.dim() == 2]
    if not matrices:
        return 0
    vocab = max(max(p.shape) for p in matrices)
    return sum(p.numel() for p in matrices if vocab in p.shape)


def infer_num_heads(program) -> int:
    """Attention heads, read from the first scaled-dot-product attention (or 4-D score) in the body."""
    names = {name for layer in program.body for name in layer.node_names}
    for node in program.graph_module.graph.nodes:
        if node.name in names and "scaled_dot_product" in str(node.target):
            value = node.args[0].meta.get("val")
            if value is not None and value.dim() == 4:
                return int(value.shape[1])
    for node in program.graph_module.graph.nodes:  # eager attention: softmax over a [b, h, s, s] tensor
        if node.name in names and "softmax" in str(node.target):
            value = node.meta.get("val")
            if value is not None and value.dim() == 4:
                return int(value.shape[1])
    return 0


def infer_seq_hidden(program) -> tuple[int, int]:
    """(sequence length, hidden size) from the first body layer's 3-D batched outputs."""
    for layer in program.body:
        for spec in layer.boundary_out:
            if spec.batched and len(spec.shape) == 3 and spec.dtype.is_floating_point:
                return spec.shape[1], spec.shape[2]
    return 1, 0
