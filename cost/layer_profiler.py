"""The model profiler: time each layer type's own graph on the device, fit time(batch, sequence).

For every (micro-batch, sequence length) asked for, the model is captured again (shapes are baked into the
exported graph) and the batch is run through the layers once to obtain every layer's real inputs; one
layer of each type (plus the prologue and the epilogue) is kept with its inputs. Each is warmed up, then
timed forward and backward on its own in rounds that visit every case in turn (``measure_layers``), so
that the machine's drift over the run touches every point alike; each point is the median of its rounds
(or the least of them: ``statistic``), in elapsed time (or, on one CPU thread, that thread's CPU time:
``clock``).
``fit_profile`` fits the forward and backward times separately with ``fit_time_formula`` in the profile
mode (``static``, ``batch`` or ``sequence``; cost/model_profile.py). Memory comes from the graph's
annotations, as in the analytic mode: parameters, the bytes autograd saves (exact, counted while tracing),
their split under TP (``tp_activation_split``; TP lowering is a later step, so TP degrees are derived, not
measured), and the layer inputs a checkpointed layer keeps; in sequence mode at every profiled length
(``LayerTypeProfile.by_seq``). With ``compile_layers`` each timed layer is ``torch.compile``d as training
compiles it (``runtime.compiled_layers``); the warm-up compiles it, outside the timings.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from galvatron_fx.errors import ProfileError
from galvatron_fx.fx_utils import LAYER_COMPILE_OPTIONS
from galvatron_fx.program import run_layer

from .analytic_layer import infer_seq_hidden
from .model_profile import ModelProfile
from .time_formula import fit_seq_terms, fit_time_formula, resolve_profile_mode

Builder = Callable[[int, int], "tuple[torch.nn.Module, dict[str, Any]]"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_layer(
    layer, inputs: Sequence[Any], device: torch.device, warmup: int = 1, repeats: int = 3, compiled: bool = False
) -> tuple[float, float]:
    """Median (forward, backward) seconds of ``layer.module`` (``torch.compile``d if ``compiled``) on ``inputs``."""
    if compiled and warmup < 1:
        raise ProfileError("a compiled layer's first call compiles it", "time compiled layers with warmup >= 1")
    module = torch.compile(layer.module, options=LAYER_COMPILE_OPTIONS) if compiled else layer.module
    return median_times([time_layer_once(module, inputs, device) for _ in range(warmup + repeats)][warmup:])


def median_times(times: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """The median forward and the median backward seconds of (forward, backward) calls."""
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def min_times(times: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """The least forward and the least backward seconds of (forward, backward) calls."""
    return min(t[0] for t in times), min(t[1] for t in times)


STATISTICS = {"median": median_times, "min": min_times}  # what a point of ``measure_layers`` is of its rounds
# how ``measure_layers`` reads time: elapsed, or the CPU time of the calling thread (a CPU device computing on
# that one thread: the time the machine's other processes take from it is left out)
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def time_layer_once(
    module: torch.nn.Module, inputs: Sequence[Any], device: torch.device, clock: Callable[[], float] = time.perf_counter
) -> tuple[float, float]:
    """(forward, backward) seconds of one call of ``module`` on ``inputs`` by ``clock``; its gradients are dropped
    after."""

    def forward():
        leaves = [
            x.detach().requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor) else x for x in inputs
        ]
        with torch.enable_grad():
            outputs = module(*leaves)
        return [o for o in outputs if isinstance(o, torch.Tensor) and o.requires_grad]

    _sync(device)
    start = clock()
    outputs = forward()
    _sync(device)
    middle = clock()
    if outputs:
        torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])
    _sync(device)
    end = clock()
    for param in module.parameters():
        param.grad = None
    return middle - start, end - middle


@dataclass
class LayerMeasurements:
    """What ``measure_layers`` took. ``samples``: part name (``prologue``, a layer type, ``epilogue``) →
    ``{"fwd": [(batch, seq, seconds)], "bwd": [...]}``; ``graph_profiles``: sequence length → the model
    profiled from its graph there (memory and FLOPs; times unset), from the first batch captured at it;
    ``device_name``; ``compiled``: the layers were timed ``torch.compile``d. Sequence lengths are the
    model's own (an image model's patches), which may differ from those asked for."""

    samples: dict[str, dict[str, list[tuple[int, int, float]]]]
    graph_profiles: dict[int, ModelProfile]
    device_name: str
    compiled: bool
    # sequence length → part → (forward, backward) FLOPs per sample with attention's: the shape of a sequence
    # fit (``fit_profile``)
    work: dict[int, dict[str, tuple[int, int]]] = field(default_factory=dict)
    statistic: str = "median"  # of the rounds, for each point
    clock: str = "wall"


def measure_layers(
    build: Builder,
    cases: Sequence[tuple[int, int]],
    *,
    device: torch.device | str = "cpu",
    device_name: str | None = None,
    warmup: int = 2,
    repeats: int = 3,
    progress: bool = True,
    name: str | None = None,
    compile_layers: bool = False,
    statistic: str = "median",
    clock: str = "wall",
) -> LayerMeasurements:
    """Time every layer type of the model ``build(batch, seq)`` returns at each ``(batch, seq)`` of ``cases``
    (see module docstring): ``repeats`` rounds over all cases after ``warmup`` calls of each. Each point is
    the ``statistic`` of its rounds: ``median``, or ``min`` (on a machine that others load, the least
    disturbed round: other processes only ever add time). ``clock``: ``wall`` (elapsed time), or ``thread``
    (the CPU time of this thread: a CPU device with one intra-op thread, ``torch.set_num_threads(1)``, whose
    times then leave out what the operating system gives other processes)."""
    from galvatron_fx.capture import capture

    device = torch.device(device)
    if not cases or min(b for b, _ in cases) < 1:
        raise ProfileError(
            f"micro-batch sizes {sorted({b for b, _ in cases})} include one below 1",
            "profile batches of 1 sample or more",
        )
    if compile_layers and warmup < 1:
        raise ProfileError("a compiled layer's first call compiles it", "time compiled layers with warmup >= 1")
    if statistic not in STATISTICS:
        raise ProfileError(f"statistic {statistic!r} is unknown", f"use one of {', '.join(STATISTICS)}")
    if clock not in CLOCKS:
        raise ProfileError(f"clock {clock!r} is unknown", f"use one of {', '.join(CLOCKS)}")
    if clock == "thread" and (device.type != "cpu" or torch.get_num_threads() != 1):
        raise ProfileError(
            f"the thread clock times this thread only, but the layers run on {device} with "
            f"{torch.get_num_threads()} intra-op threads",
            'time with clock="wall", or on the CPU after torch.set_num_threads(1)',
        )
    prepared: list[tuple[int, int, list[tuple[str, Any, list]]]] = []
    graph_profiles: dict[int, ModelProfile] = {}
    work: dict[int, dict[str, tuple[int, int]]] = {}
    representatives: dict[str, int] | None = None
    layer_count = None
    started = time.perf_counter()
    for done, (batch, seq) in enumerate(cases, 1):
        model, kwargs = build(batch, seq)
        # capture on the device: exported graphs bake in the device of the tensors they create
        kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        program = capture(model.to(device), example_kwargs=kwargs)
        representatives = representatives or _representatives(program)
        if layer_count is not None and len(program.layers) != layer_count:
            raise ProfileError(
                f"the model has {len(program.layers)} layers at batch {batch}, seq {seq} but {layer_count} before",
                "profile a model whose structure does not depend on the batch or sequence length",
            )
        layer_count = len(program.layers)
        env = program.flatten_inputs((), kwargs)
        env_before = dict(env)
        with torch.no_grad():
            for layer in program.layers:
                run_layer(layer, env)
        true_seq = infer_seq_hidden(program)[0]
        if true_seq not in graph_profiles:
            graph_profiles[true_seq] = ModelProfile.from_program(program, flops_per_s=1.0, name=name)
            work[true_seq] = {}
            for index in representatives.values():
                layer = program.layers[index]
                key = layer.kind if layer.kind in ("prologue", "epilogue") else layer.layer_type
                extra_fwd, extra_bwd = uncounted_attention_flops(program, layer)
                work[true_seq][key] = (
                    (layer.stats.fwd_flops + extra_fwd) // program.batch_size,
                    (layer.stats.bwd_flops + extra_bwd) // program.batch_size,
                )
        parts = []
        for index in representatives.values():
            layer = program.layers[index]
            key = layer.kind if layer.kind in ("prologue", "epilogue") else layer.layer_type
            inputs = [env[n] if n in env else env_before[n] for n in layer.input_names]
            module = torch.compile(layer.module, options=LAYER_COMPILE_OPTIONS) if compile_layers else layer.module
            parts.append((key, module, inputs))
        if prepared and [key for key, _, _ in parts] != [key for key, _, _ in prepared[0][2]]:
            raise ProfileError(
                f"the model's layer types at batch {batch}, seq {seq} are {[key for key, _, _ in parts]}, "
                f"but {[key for key, _, _ in prepared[0][2]]} before",
                "profile a model whose structure does not depend on the batch or sequence length",
            )
        prepared.append((batch, true_seq, parts))
        del program, model, env, env_before
        if progress:
            sys.stderr.write(
                f"\rcaptured batch {batch} seq {seq} ({done}/{len(cases)}, {time.perf_counter() - started:.1f}s)   "
            )
            sys.stderr.flush()
    for _, _, parts in prepared:
        for _, module, inputs in parts:
            for _ in range(warmup):
                time_layer_once(module, inputs, device, CLOCKS[clock])
    timings: list[dict[str, list[tuple[float, float]]]] = [{key: [] for key, _, _ in parts} for *_, parts in prepared]
    for round_index in range(repeats):
        for (_, _, parts), times in zip(prepared, timings):
            for key, module, inputs in parts:
                times[key].append(time_layer_once(module, inputs, device, CLOCKS[clock]))
        if progress:
            sys.stderr.write(
                f"\rtimed round {round_index + 1}/{repeats} of {len(cases)} cases "
                f"({time.perf_counter() - started:.1f}s)          "
            )
            sys.stderr.flush()
    if progress:
        sys.stderr.write("\n")
    samples: dict[str, dict[str, list[tuple[int, int, float]]]] = {}
    for (batch, seq, _), times in zip(prepared, timings):
        for key, calls in times.items():
            fwd_s, bwd_s = STATISTICS[statistic](calls)
            entry = samples.setdefault(key, {"fwd": [], "bwd": []})
            entry["fwd"].append((batch, seq, fwd_s))
            entry["bwd"].append((batch, seq, bwd_s))
    return LayerMeasurements(
        samples,
        graph_profiles,
        device_name or (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
        compile_layers,
        work,
        statistic,
        clock,
    )


# attention kernels whose FLOPs torch.utils.flop_counter has no formula for (the CPU flash kernel, which
# scaled_dot_product_attention runs on CPU): the graph's FLOPs leave them out
_ATTENTION_OPS = ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu")


def uncounted_attention_flops(program, layer) -> tuple[int, int]:
    """(forward, backward) FLOPs of ``layer``'s attention calls that the graph's FLOP count left at 0:
    ``Q·Kᵀ`` and ``P·V`` forward, twice that backward, as torch.utils.flop_counter counts them on GPUs."""
    from galvatron_fx.program import node_meta

    nodes = {node.name: node for node in program.graph_module.graph.nodes}
    fwd = 0
    for name in layer.node_names:
        node = nodes[name]
        target = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        info = node_meta(node).info
        if node.op != "call_function" or target not in _ATTENTION_OPS or (info is not None and info.fwd_flops):
            continue
        query, key, value = (getattr(arg, "meta", {}).get("val") for arg in node.args[:3])
        if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (query, key, value)):
            continue
        batch, heads, seq_q, dim = query.shape
        fwd += 2 * batch * heads * seq_q * key.shape[2] * (dim + value.shape[3])
    return int(fwd), int(2 * fwd)


def fit_profile(
    measurements: LayerMeasurements, profile_mode: str | None = None, *, seqs: Sequence[int] | None = None
) -> ModelProfile:
    """The ModelProfile of ``measurements`` in ``profile_mode`` (None: from the measured sizes;
    ``resolve_profile_mode``), from the points at sequence lengths ``seqs`` (default: all). Its sequence
    length is the largest of them, its memory figures those there (and, in sequence mode, at each length:
    ``LayerTypeProfile.by_seq``); sequence mode shapes each time fit with the part's FLOPs at two lengths."""
    chosen = sorted(set(seqs) if seqs is not None else measurements.graph_profiles)
    missing = sorted(set(chosen) - set(measurements.graph_profiles))
    if missing:
        raise ProfileError(
            f"sequence lengths {missing} were not measured (the model's: {sorted(measurements.graph_profiles)})",
            "fit lengths that were measured",
        )
    samples = {
        key: {pass_: [p for p in points if p[1] in chosen] for pass_, points in entry.items()}
        for key, entry in measurements.samples.items()
    }
    batches = sorted({b for entry in samples.values() for b, _, _ in entry["fwd"]})
    if profile_mode == "sequence" and len(chosen) < 2:
        raise ProfileError(
            f"the model's sequence length is {chosen} at every length measured",
            "profile it in batch mode (its inputs do not follow --seqs: e.g. an image model)",
        )
    mode = resolve_profile_mode(profile_mode, batches, chosen)
    profile = copy.deepcopy(measurements.graph_profiles[chosen[-1]])
    graphs = {s: measurements.graph_profiles[s] for s in chosen}
    for key, part in profile.parts().items():
        for pass_ in ("fwd", "bwd"):
            shape = None
            if mode == "sequence":
                column = 0 if pass_ == "fwd" else 1
                shape = fit_seq_terms(
                    [(s, measurements.work[s][key][column]) for s in chosen if key in measurements.work.get(s, {})]
                )
            setattr(part, pass_, fit_time_formula(samples[key][pass_], mode, seq_shape=shape))
    if mode == "sequence":
        profile.record_seq_figures(graphs)
    profile.mode, profile.device = "measured", measurements.device_name
    profile.profile_mode, profile.profiled_batches, profile.profiled_seqs = mode, batches, chosen
    profile.extra["measurements"] = samples
    profile.extra["compiled_layers"] = measurements.compiled
    profile.extra["timing"] = {"statistic": measurements.statistic, "clock": measurements.clock}
    return profile


def profile_model(
    build: Builder,
    batches: Sequence[int] = (2, 4, 8),
    seqs: Sequence[int] = (32,),
    *,
    profile_mode: str | None = None,
    device: torch.device | str = "cpu",
    device_name: str | None = None,
    warmup: int = 2,
    repeats: int = 3,
    progress: bool = True,
    name: str | None = None,
    compile_layers: bool = False,
    statistic: str = "median",
    clock: str = "wall",
) -> ModelProfile:
    """Measure every layer type of the model ``build(batch, seq)`` returns at each of ``batches`` × ``seqs``;
    a ModelProfile with fitted times (of the compiled layers with ``compile_layers``, as
    ``compile(..., compile_layers=True)`` runs them) in ``profile_mode``: ``static`` (one batch, one length),
    ``batch`` (several batches, one length), ``sequence`` (several lengths); None: from the lists.
    ``statistic``, ``clock``: of each point's rounds, and how they are timed (``measure_layers``).

    The memory figures are those of the largest sequence length, which becomes the profile's ``seq_length``
    (in sequence mode, those of every length too).
    """
    if min(batches) < 1:
        raise ProfileError(
            f"micro-batch sizes {list(batches)} include one below 1", "profile batches of 1 sample or more"
        )
    resolve_profile_mode(profile_mode, batches, seqs)  # refused before anything is measured
    cases = [(b, s) for s in sorted(set(seqs)) for b in sorted(set(batches))]
    measurements = measure_layers(
        build,
        cases,
        device=device,
        device_name=device_name,
        warmup=warmup,
        repeats=repeats,
        progress=progress,
        name=name,
        compile_layers=compile_layers,
        statistic=statistic,
        clock=clock,
    )
    return fit_profile(measurements, profile_mode)  # left out: from the model's own lengths (image models)


def _representatives(program) -> dict[str, int]:
    """Layer type → index of its first layer; plus "prologue" and "epilogue"."""
    chosen = {"prologue": 0, "epilogue": len(program.layers) - 1}
    for layer in program.body:
        chosen.setdefault(layer.layer_type, layer.index)
    return chosen
