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

from .analytic_layer import (
    batched_bytes,
    bf16_activation_scale,
    bf16_activation_table,
    infer_num_heads,
    infer_seq_hidden,
    layer_type_profile,
    tied_param_count,
)
from .hardware import read_json
from .layer_type_profile import LayerTypeProfile
from .time_formula import PROFILE_MODES, TimeFormula, eval_seq_terms, fit_seq_terms

FORMAT = "galvatron_fx.model_profile/1"


class SequenceRangeWarning(UserWarning):
    """A sequence-mode profile evaluated at a sequence length outside the range it was measured over."""


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
    # the FLOP rate an analytic profile's times divide by (``from_program``'s ``flops_per_s``); 0: not recorded
    priced_flops_per_s: float = 0.0
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
                    bf16_activation_bytes_per_sample=bf16_activation_table(program, layer, autocast_saved),
                )
        seq, hidden = infer_seq_hidden(program)
        return cls(
            name=name or program.model_name,
            layer_types=[layer.layer_type for layer in program.body],
            types=types,
            prologue=layer_type_profile(program, program.prologue, flops_per_s, 0, True, op_overhead_s),
            epilogue=layer_type_profile(program, program.epilogue, flops_per_s, 0, True, op_overhead_s),
            cut_bytes_per_sample=[batched_bytes(layer.boundary_out) // batch for layer in program.body],
            seq_length=seq,
            hidden_size=hidden,
            num_heads=heads,
            dtype=dtype,
            mode="analytic",
            device=device,
            tied_param_count=tied_param_count(program),
            priced_flops_per_s=flops_per_s,
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
            **({"priced_flops_per_s": self.priced_flops_per_s} if self.priced_flops_per_s else {}),
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
            priced_flops_per_s=float(data.get("priced_flops_per_s", 0.0)),
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
    profile.priced_flops_per_s = flops_per_s
    return profile
