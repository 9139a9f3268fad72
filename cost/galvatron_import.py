"""Galvatron's profile files → HardwareProfile and ModelProfile.

Hardware (one folder): ``allreduce_bandwidth_{N}nodes_{G}gpus_per_node.json`` (all-reduce *bus*
bandwidth in GB/s per group size, ``consec_1`` consecutive / ``consec_0`` strided),
``p2p_bandwidth_*.json`` (GB/s per pipeline degree ``pp_size_k``), ``overlap_coefficient.json``
(``overlap_coe``), and optionally ``sp_time_*.json`` (all-reduce / all-to-all milliseconds per group size
and message size in MB). Bus bandwidth becomes our algorithm bandwidth with the ring factors
(all-reduce ``2(g-1)/g``, all-gather and reduce-scatter ``(g-1)/g``); ``sp_time`` gives all-to-all
fits and the all-reduce latency.

Model: ``computation_profiling_{dtype}_{name}_all.json`` (``layertype_{t}_bsz{b}_seq{s}``: forward ms
per sample of one layer; ``layertype_other_...``: of embedding + head), ``memory_profiling_..._all.json``
(``layertype_{t}[_sp]``: parameter MB of one layer in fp32 and activation MB per sample per TP degree
and with checkpointing; ``other_memory_pp_on_{first,last}[_sp]``: model states and activation MB of the
embedding and the head per vocab-TP degree; ``other_memory_pp_off[_sp]``: the activation MB of both on one
stage, kept in ``ModelProfile.extra`` for stages that hold both: the two ``pp_on`` figures were measured on
the first and last stage of a pipeline, and their sum exceeds it) and the model's YAML (hidden size, layers,
heads).
Profile modes, as Galvatron's: one sequence length in the computation file makes a ``static`` (one batch
size) or ``batch`` profile (time linear in the batch); several (``layertype_{t}_bsz1_seq{s}``, Galvatron's
``profile_mode sequence``) a ``sequence`` profile, fitted as Galvatron's search fits it: per-sample forward
time ``a·s² + b·s + c`` for a layer (``b·s + c`` with two lengths), ``b·s + c`` for the embedding and head;
memory from each length of the memory file (``layertype_{t}[_sp]/{s}``, ``other_memory_pp_on_*[_sp]/{s}``)
into ``LayerTypeProfile.by_seq``, fitted against the length (``ModelProfile.at_seq``), and the profile's own
length the largest there.
Conventions taken from Galvatron: backward = 2 × forward; the head gets all of the "other" time (the
embedding lookup is negligible); model states are 16 bytes per parameter in these files. The ``_sp``
activation tables were measured with Megatron-SP; they serve for plain TP too (the files say nothing else).

On the fixture's strategy (ZeRO-3 everywhere, 20 of 32 layers checkpointed, vtp 2) the cost model predicts
about 15.2 samples/s where Galvatron's search estimated 14.73: the compute is the same profile, so the
few-percent gap is in the communication terms — we hide ZeRO-3 gathers and gradient sync behind compute
up to its length at the measured overlap slowdown, and price collectives with latency + bandwidth fits
rather than Galvatron's per-strategy coefficients.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import yaml

from galvatron_fx.errors import ProfileError

from .embedding_cost import ONE_STAGE_ACTIVATION
from .hardware import CommFit, HardwareProfile, fit_latency_bandwidth, read_json
from .layer_type_profile import LayerTypeProfile
from .model_profile import ModelProfile
from .time_formula import TimeFormula, fit_terms, fit_time_formula

MiB = 2**20
GB = 1e9


def _one(folder: Path, pattern: str, what: str, required: bool = True) -> Path | None:
    matches = sorted(folder.glob(pattern))
    if not matches and required:
        raise ProfileError(
            f"{folder}: no {what} file ({pattern})", "point to the folder holding Galvatron's profile files"
        )
    return matches[0] if matches else None


def _number(path: Path, data: dict, key: str) -> float:
    try:
        value = float(data[key])
    except (KeyError, TypeError, ValueError):
        raise ProfileError(
            f"{path}: key {key} is missing or not a number", "re-run Galvatron's profiler for this file"
        ) from None
    if not value > 0:
        raise ProfileError(
            f"{path}: key {key} is {data[key]!r}, not positive", "re-run Galvatron's profiler for this file"
        )
    return value


def _object(path: Path) -> dict:
    data = read_json(path)
    if not isinstance(data, dict):
        raise ProfileError(f"{path} is not a JSON object", "use the file Galvatron's profiler wrote")
    return data


def load_hardware(
    folder: str | Path, *, memory_bytes: "int | str | None" = None, device: str = "unknown"
) -> HardwareProfile:
    """A HardwareProfile from the Galvatron hardware files in ``folder``; ``memory_bytes`` may be "36GB"."""
    from galvatron_fx.units import parse_bytes

    memory_bytes = parse_bytes(memory_bytes) if memory_bytes is not None else None
    folder = Path(folder)
    if not folder.is_dir():
        raise ProfileError(f"hardware profile folder {folder} does not exist", "check the path")
    allreduce_path = _one(folder, "allreduce_bandwidth_*nodes_*gpus_per_node.json", "all-reduce bandwidth")
    shape = re.search(r"(\d+)nodes_(\d+)gpus_per_node", allreduce_path.name)
    nodes, per_node = int(shape.group(1)), int(shape.group(2))
    allreduce = _object(allreduce_path)
    sp_path = _one(folder, f"sp_time_{nodes}nodes_{per_node}gpus_per_node.json", "sp_time", required=False)
    timed = _timed_fits(sp_path, _object(sp_path)) if sp_path else {}

    collectives: dict[str, CommFit] = {}
    for key in allreduce:
        match = re.fullmatch(r"allreduce_size_(\d+)_consec_([01])", key)
        if not match:
            raise ProfileError(
                f"{allreduce_path}: key {key} is not allreduce_size_<g>_consec_<0|1>", "use the file Galvatron wrote"
            )
        group, layout = int(match.group(1)), "consecutive" if match.group(2) == "1" else "strided"
        bus_Bps = _number(allreduce_path, allreduce, key) * GB
        latency = timed.get(("all_reduce", group), CommFit(0.0, 1.0)).latency_s
        collectives[f"all_reduce/{group}/{layout}"] = CommFit(latency, bus_Bps * group / (2 * (group - 1)))
        for op in ("all_gather", "reduce_scatter"):
            collectives[f"{op}/{group}/{layout}"] = CommFit(latency / 2, bus_Bps * group / (group - 1))
    for (op, group), fit in timed.items():
        if op == "all_to_all":
            collectives[f"all_to_all/{group}/consecutive"] = fit

    p2p_path = _one(folder, f"p2p_bandwidth_{nodes}nodes_{per_node}gpus_per_node.json", "p2p bandwidth")
    p2p_data = _object(p2p_path)
    p2p = {}
    for key in p2p_data:
        match = re.fullmatch(r"pp_size_(\d+)", key)
        if not match:
            raise ProfileError(f"{p2p_path}: key {key} is not pp_size_<k>", "use the file Galvatron wrote")
        p2p[int(match.group(1))] = CommFit(0.0, _number(p2p_path, p2p_data, key) * GB)
    overlap_path = folder / "overlap_coefficient.json"
    overlap = _number(overlap_path, _object(overlap_path), "overlap_coe")
    return HardwareProfile(
        nodes * per_node,
        per_node,
        device,
        memory_bytes,
        collectives,
        p2p,
        max(overlap, 1.0),
        {},
        backend="nccl (Galvatron)",
        source=str(allreduce_path),
    )


def _timed_fits(path: Path, data: dict) -> dict[tuple[str, int], CommFit]:
    samples: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
    for key in data:
        match = re.fullmatch(r"(allreduce|all2all)_size_(\d+)_(\d+)MB_time", key)
        if not match:
            raise ProfileError(
                f"{path}: key {key} is not <allreduce|all2all>_size_<g>_<m>MB_time", "use the file Galvatron wrote"
            )
        op = "all_reduce" if match.group(1) == "allreduce" else "all_to_all"
        samples[(op, int(match.group(2)))].append((int(match.group(3)) * MiB, _number(path, data, key) / 1e3))
    return {key: fit_latency_bandwidth([x for x, _ in pts], [t for _, t in pts]) for key, pts in samples.items()}


def load_model(folder: str | Path, *, config: str | Path | None = None) -> ModelProfile:
    """A ModelProfile from Galvatron's computation and memory profiles (and model YAML) in ``folder``, in the
    profile mode its files were measured in (module docstring)."""
    return _with_profile_mode(_read_model(folder, config=config))


def _read_model(folder: str | Path, *, config: str | Path | None = None) -> ModelProfile:
    folder = Path(folder)
    if not folder.is_dir():
        raise ProfileError(f"model profile folder {folder} does not exist", "check the path")
    compute_path = _one(folder, "computation_profiling_*_all.json", "computation profile")
    match = re.fullmatch(r"computation_profiling_(fp32|bf16|fp16)_(.+)_all\.json", compute_path.name)
    if not match:
        raise ProfileError(
            f"{compute_path}: name is not computation_profiling_<dtype>_<model>_all.json", "keep Galvatron's file name"
        )
    dtype, name = match.group(1), match.group(2)
    memory_path = folder / f"memory_profiling_{dtype}_{name}_all.json"
    config_path = Path(config) if config else _one(folder, "*.yaml", "model configuration (YAML)")
    try:
        settings = yaml.safe_load(config_path.read_text())
        hidden, layers, heads = (int(settings[k]) for k in ("hidden_size", "num_layers", "num_attention_heads"))
    except FileNotFoundError:
        raise ProfileError(
            f"model configuration {config_path} does not exist", "pass config= the model's YAML"
        ) from None
    except (yaml.YAMLError, KeyError, TypeError, ValueError) as error:
        raise ProfileError(
            f"{config_path}: key hidden_size/num_layers/num_attention_heads is missing or malformed ({error})",
            "give Galvatron's model YAML",
        ) from None

    compute = _object(compute_path)
    times: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for key in compute:
        found = re.fullmatch(r"layertype_(\w+?)_bsz(\d+)_seq(\d+)", key)
        if found:
            batch, seq = int(found.group(2)), int(found.group(3))
            times[found.group(1)].append((batch, seq, _number(compute_path, compute, key) * batch / 1e3))
    if "0" not in times or "other" not in times:
        raise ProfileError(
            f"{compute_path}: key layertype_0_bsz<b>_seq<s> or layertype_other_... is missing",
            "profile the model with Galvatron's computation profiler",
        )
    seq = _reference_seq(memory_path, times["0"])
    token_bytes = (2 if dtype in ("bf16", "fp16") else 4) * hidden

    memory = _object(memory_path)
    types: dict[str, LayerTypeProfile] = {}
    for type_name in sorted(k for k in times if k != "other"):
        entry = _memory_entry(memory_path, memory, f"layertype_{type_name}", seq)
        try:
            table = {
                int(k): int(float(v) * MiB) for k, v in entry["tp_activation_per_bsz_dict"].items() if k != "checkpoint"
            }
            ckpt = int(float(entry["tp_activation_per_bsz_dict"]["checkpoint"]) * MiB)
            params = int(float(entry["parameter_size"]) * MiB / 4)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ProfileError(
                f"{memory_path}: key layertype_{type_name}/{seq}/tp_activation_per_bsz_dict or parameter_size "
                f"is malformed ({error})",
                "re-run Galvatron's memory profiler",
            ) from None
        fwd = _fit_forward(times[type_name], quadratic=True)
        types[type_name] = LayerTypeProfile(
            type_name,
            fwd,
            fwd.scaled(2.0),
            params,
            table,
            ckpt,
            seq * token_bytes,
            num_heads=heads,
            sp_activation_bytes_per_sample=dict(table),
        )
    other = _fit_forward(times["other"], quadratic=False)
    prologue = _other(memory_path, memory, "first", seq, TimeFormula(), seq * token_bytes)
    epilogue = _other(memory_path, memory, "last", seq, other, seq * token_bytes)
    layer_types = ["0"] * layers if len(types) == 1 else _layer_types(types, layers)
    extra = {ONE_STAGE_ACTIVATION: _one_stage_activation(memory_path, memory, seq)}
    return ModelProfile(
        name,
        layer_types,
        types,
        prologue,
        epilogue,
        [seq * token_bytes] * layers,
        seq,
        hidden,
        heads,
        dtype=dtype,
        mode="galvatron",
        device="",
        source=str(compute_path),
        extra=extra,
    )


def _fit_forward(samples: list[tuple[float, float, float]], quadratic: bool) -> TimeFormula:
    """Forward time of ``(batch, seq, seconds)`` points: several sequence lengths as Galvatron's search fits
    them (per sample ``c + b·s``, plus ``a·s²`` for a layer with three or more lengths), else linear in the
    batch (``fit_time_formula``)."""
    seqs = {s for _, s, _ in samples}
    if len(seqs) < 2:
        return fit_time_formula(samples)
    powers = (0, 1, 2) if quadratic and len(seqs) >= 3 else (0, 1)
    return fit_terms(samples, [((1, j, 1.0),) for j in powers])


def _reference_seq(memory_path: Path, layer_times: list[tuple[float, float, float]]) -> int:
    """The sequence length the profile's figures are read at: the computation file's (its largest); with
    several (sequence mode), the largest the memory file has for layer type 0."""
    seqs = sorted({int(s) for _, s, _ in layer_times})
    if len(seqs) < 2:
        return seqs[-1]
    memory = _object(memory_path)
    return max(_memory_seqs(memory, "layertype_0"), default=seqs[-1])


def _memory_seqs(memory: dict, key: str) -> list[int]:
    entry = memory.get(f"{key}_sp", memory.get(key))
    return sorted(int(s) for s in entry if str(s).isdigit()) if isinstance(entry, dict) else []


def _with_profile_mode(profile: ModelProfile) -> ModelProfile:
    """``profile`` (read at one sequence length) with its profile mode and measured points; in sequence mode
    with the memory figures of every length in the memory file (``by_seq``)."""
    compute_path = Path(profile.source)
    compute = _object(compute_path)
    points = [re.fullmatch(r"layertype_0_bsz(\d+)_seq(\d+)", key) for key in compute]
    batches = sorted({int(m.group(1)) for m in points if m})
    seqs = sorted({int(m.group(2)) for m in points if m})
    profile.profiled_batches, profile.profiled_seqs = batches, seqs
    if len(seqs) < 2:
        profile.profile_mode = "batch" if len(batches) >= 2 else "static"
        return profile
    profile.profile_mode = "sequence"
    memory_path = compute_path.with_name(compute_path.name.replace("computation_profiling_", "memory_profiling_", 1))
    memory = _object(memory_path)
    token_bytes = profile.prologue.boundary_bytes_per_sample // profile.seq_length
    for name, part in profile.types.items():
        for seq in _memory_seqs(memory, f"layertype_{name}"):
            table, ckpt = _layer_activation(memory_path, memory, name, seq)
            figures = part.seq_figures()
            figures.update(
                activation_bytes_per_sample=table,
                sp_activation_bytes_per_sample=dict(table),
                ckpt_activation_bytes_per_sample=ckpt,
                boundary_bytes_per_sample=seq * token_bytes,
            )
            part.by_seq[seq] = figures
    for where, part in (("first", profile.prologue), ("last", profile.epilogue)):
        for seq in _memory_seqs(memory, f"other_memory_pp_on_{where}"):
            entry = _memory_entry(memory_path, memory, f"other_memory_pp_on_{where}", seq)
            try:
                table = {int(k): int(float(v) * MiB) for k, v in entry["activation"].items()}
            except (KeyError, TypeError, ValueError, AttributeError) as error:
                raise ProfileError(
                    f"{memory_path}: key other_memory_pp_on_{where}/{seq}/activation is malformed ({error})",
                    "re-run Galvatron's memory profiler",
                ) from None
            figures = part.seq_figures()
            figures.update(
                activation_bytes_per_sample=table,
                sp_activation_bytes_per_sample=dict(table),
                boundary_bytes_per_sample=seq * token_bytes,
            )
            part.by_seq[seq] = figures
    for seq in profile.types[profile.layer_types[0]].by_seq:
        profile.cut_bytes_by_seq[seq] = [seq * token_bytes] * len(profile.layer_types)
    return profile


def _layer_activation(path: Path, memory: dict, type_name: str, seq: int) -> tuple[dict[int, int], int]:
    """(activation bytes per sample per TP degree, with checkpointing) of a layer type at ``seq``."""
    entry = _memory_entry(path, memory, f"layertype_{type_name}", seq)
    try:
        per_bsz = entry["tp_activation_per_bsz_dict"]
        table = {int(k): int(float(v) * MiB) for k, v in per_bsz.items() if k != "checkpoint"}
        return table, int(float(per_bsz["checkpoint"]) * MiB)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ProfileError(
            f"{path}: key layertype_{type_name}/{seq}/tp_activation_per_bsz_dict is malformed ({error})",
            "re-run Galvatron's memory profiler",
        ) from None


def _memory_entry(path: Path, memory: dict, key: str, seq: int) -> dict:
    entry = memory.get(f"{key}_sp", memory.get(key))
    if not isinstance(entry, dict) or not isinstance(entry.get(str(seq)), dict):
        raise ProfileError(
            f"{path}: key {key}_sp/{seq} (or {key}/{seq}) is missing",
            "re-run Galvatron's memory profiler at this sequence length",
        )
    return entry[str(seq)]


def _one_stage_activation(path: Path, memory: dict, seq: int) -> dict[int, int]:
    """Activation bytes per sample of the embedding and the head on one stage, per vocab-TP degree."""
    entry = _memory_entry(path, memory, "other_memory_pp_off", seq)
    try:
        return {int(k): int(float(v) * MiB) for k, v in entry["activation"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ProfileError(
            f"{path}: key other_memory_pp_off/{seq}/activation is malformed ({error})",
            "re-run Galvatron's memory profiler",
        ) from None


def _other(path: Path, memory: dict, where: str, seq: int, fwd: TimeFormula, token_bytes_seq: int) -> LayerTypeProfile:
    entry = _memory_entry(path, memory, f"other_memory_pp_on_{where}", seq)
    try:
        states = {int(k): float(v) for k, v in entry["model_states"].items()}
        activation = {int(k): int(float(v) * MiB) for k, v in entry["activation"].items()}
        params = int(states[1] * MiB / 16)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ProfileError(
            f"{path}: key other_memory_pp_on_{where}/{seq}/model_states or activation is malformed ({error})",
            "re-run Galvatron's memory profiler",
        ) from None
    return LayerTypeProfile(
        "prologue" if where == "first" else "epilogue",
        fwd,
        fwd.scaled(2.0),
        params,
        activation,
        0,
        token_bytes_seq,
        vocab_param_count=params,
        sp_activation_bytes_per_sample=dict(activation),
    )


def _layer_types(types: dict[str, LayerTypeProfile], layers: int) -> list[str]:
    """Several layer types (e.g. encoder-decoder): Galvatron orders them type by type, split evenly."""
    names = sorted(types, key=int)
    per_type = layers // len(names)
    return [name for name in names for _ in range(per_type)]
