"""Layers timed in place: each layer type lowered for a TP degree and run on every rank of a process group
at once, as Galvatron profiles each strategy on the cluster itself.

The one-process profile (cost/layer_profiler.py) times a layer alone; the cost model then scales it by the
hardware's ``compute_slowdown`` for ranks that share devices, and composes a TP layer from that compute
divided by ``tp``, the collectives' fits and the ranks' arrival skew. Where processes share CPU cores both
steps miss time, and by amounts that vary with the layer: how much two ranks slow each other depends on
the work, and a rank waits in each TP collective for peers the scheduler has not run yet, over a layer's
four collectives. Timing the lowered layer itself, with every rank of the world running its group's copy,
holds all of it in one figure. For TP degree 1 (with the embedding and the head) and each degree above
that divides the world and the heads, and for two or more micro-batch sizes, this module

1. captures the model at ``k`` samples per rank and lowers a uniform plan (``tp`` ranks per group,
   ``world / tp`` groups, so each layer runs ``k · tp`` samples per group),
2. runs the stage once without gradients, which leaves every layer's real, laid-out inputs in its env,
3. times forward and backward of one body layer per type that follows another body layer (its input needs
   no layout move), in rounds that take one call of every (layer, TP degree, size) in turn: a disturbance
   of the machine lasting seconds then spreads over every point instead of moving one point of a fit
   (and with it the fit's intercept by tens of milliseconds),

and the driver fits ``time(samples per group)`` from the slowest rank (``fit_time_formula``) into
``LayerTypeProfile.in_place_times[world][tp]``.
"""

from __future__ import annotations

import sys
import time
import warnings
from typing import Any, Callable, Sequence

import torch

from galvatron_fx.errors import ProfileError
from galvatron_fx.plan import LayerStrategy, Plan

from .layer_profiler import median_times, time_layer_once
from .layer_type_profile import LayerTypeProfile
from .model_profile import ModelProfile
from .time_formula import fit_time_formula

Builder = Callable[[int, int], "tuple[torch.nn.Module, dict[str, Any]]"]
ENDS = ("prologue", "epilogue")


def tp_degrees(world: int, num_heads: int) -> list[int]:
    """The TP degrees to time on ``world`` processes: 1, and the powers of two that divide the world and
    the attention heads (0 heads: any)."""
    degrees, tp = [1], 2
    while tp <= world:
        if world % tp == 0 and (num_heads == 0 or num_heads % tp == 0):
            degrees.append(tp)
        tp *= 2
    return degrees


def measure_in_place(
    profile: ModelProfile,
    build: Builder,
    world: int,
    *,
    samples_per_rank: Sequence[int] = (2, 4),
    warmup: int = 2,
    repeats: int = 10,
    backend: str = "gloo",
    progress: bool = True,
    merge: bool = False,
) -> ModelProfile:
    """Time ``profile``'s layer types in place on ``world`` processes for every degree of ``tp_degrees``
    and store the fits in each ``LayerTypeProfile.in_place_times[world]`` (in place; returns the profile).
    With ``merge``, the fits are of the mean of this pass's points and the earlier passes' stored in the
    profile (the same ``samples_per_rank``): passes taken minutes apart average out the machine's drift.

    ``build(batch, seq)`` builds the model and a batch, as for ``profile_model``; it runs in the spawned
    processes, so it must pickle (a module-level function, or a ``functools.partial`` of one).
    ``samples_per_rank``: the capture sizes, two or more, each ≥ 2.
    """
    from galvatron_fx.runtime import spawn

    if len(set(samples_per_rank)) < 2 or min(samples_per_rank) < 2:
        raise ProfileError(
            f"samples per rank {list(samples_per_rank)} must hold two sizes of 2 or more",
            "measure e.g. samples_per_rank=(2, 4)",
        )
    degrees = tp_degrees(world, profile.num_heads)
    started = time.perf_counter()
    per_rank = spawn(
        _time_in_place,
        world,
        build,
        profile.seq_length,
        degrees,
        tuple(samples_per_rank),
        warmup,
        repeats,
        backend=backend,
        timeout_s=3600.0,
        collective_timeout_s=600.0,
    )
    stored = profile.extra.setdefault("in_place_measurements", {}).setdefault(str(world), {})
    passes = profile.extra.setdefault("in_place_passes", {})
    earlier = passes.get(str(world), 0) if merge else 0
    for key, by_tp in per_rank[0].items():
        for tp, points in by_tp.items():
            # points are (samples per group, seq, forward s, backward s); the slowest rank's count
            slowest = [
                max((rank[key][tp][i] for rank in per_rank), key=lambda p: p[2] + p[3]) for i in range(len(points))
            ]
            if earlier:
                slowest = running_mean(stored[key][str(tp)], slowest, earlier)
            times = (
                fit_time_formula([(b, s, f) for b, s, f, _ in slowest]),
                fit_time_formula([(b, s, w) for b, s, _, w in slowest]),
            )
            _part(profile, key).in_place_times.setdefault(world, {})[int(tp)] = times
            stored.setdefault(key, {})[str(tp)] = slowest
    passes[str(world)] = earlier + 1
    if progress:
        sys.stderr.write(
            f"timed layers in place (tp {degrees}) on {world} processes in {time.perf_counter() - started:.1f}s\n"
        )
    return profile


def running_mean(mean_points: list, new_points: list, passes: int) -> list:
    """(samples, seq, forward s, backward s) points: the mean over ``passes`` earlier passes, updated with
    one more pass at the same sizes."""
    if [tuple(p[:2]) for p in mean_points] != [tuple(p[:2]) for p in new_points]:  # JSON gives lists
        raise ProfileError(
            "the stored in-place points are at other sizes than this pass's",
            "merge passes taken with the same samples_per_rank, or profile again without merging",
        )
    return [
        (b, s, (f0 * passes + f) / (passes + 1), (w0 * passes + w) / (passes + 1))
        for (_, _, f0, w0), (b, s, f, w) in zip(mean_points, new_points)
    ]


def _part(profile: ModelProfile, key: str) -> LayerTypeProfile:
    return profile.prologue if key == "prologue" else profile.epilogue if key == "epilogue" else profile.layer(key)


def _time_in_place(
    rank: int,
    world: int,
    build: Builder,
    seq: int,
    degrees: list[int],
    samples_per_rank: tuple[int, ...],
    warmup: int,
    repeats: int,
) -> dict[str, dict[int, list[tuple[float, float, float, float]]]]:
    """Spawned worker: {layer type, "prologue" or "epilogue": {tp: [(samples per group, seq, forward s,
    backward s), ...]}}. Every rank runs the same layers in the same order (their collectives pair up)."""
    from galvatron_fx.capture import capture
    from galvatron_fx.passes.lower.pipeline import lower
    from galvatron_fx.runtime import groups
    from galvatron_fx.runtime.data_parallel import prepare_groups

    warnings.simplefilter("ignore")
    device = groups.current_device()
    timed = []  # (layer key, tp, samples per group, module, inputs)
    for tp in degrees:
        for k in samples_per_rank:
            model, batch = build(k * world, seq)
            mine = {name: _rows(value, rank * k, k, device) for name, value in batch.items()}
            program = capture(model.to(device), example_kwargs=mine)
            plan = Plan(
                world_size=world,
                layers=tuple(LayerStrategy(tp=tp, dp=world // tp) for _ in program.body),
                global_batch=k * world,
            )
            stage = lower(program, plan, rank, device)
            prepare_groups(program, plan)
            flat = program.flatten_inputs((), mine)
            values = {name: flat[name] for name in stage.batch_names}
            with torch.no_grad():
                stage(values)  # the stage writes every layer's outputs into ``values``: the inputs timed below
            for layer in _representatives(stage, with_ends=tp == 1):
                key = layer.kind if layer.kind in ENDS else layer.layer_type
                timed.append((key, tp, k * tp, stage.layers[layer.name], [values[name] for name in layer.input_names]))
    calls: list[list[tuple[float, float]]] = [[] for _ in timed]
    # no barrier between calls: in a step a rank that finishes a layer early goes on computing, and the
    # slowest rank's time includes that contention (a rank idling at a barrier would leave it the cores)
    for round_ in range(warmup + repeats):
        for i, (_, _, _, module, inputs) in enumerate(timed):
            times = time_layer_once(module, inputs, device)
            if round_ >= warmup:
                calls[i].append(times)
    out: dict[str, dict[int, list]] = {}
    for (key, tp, samples, _, _), times in zip(timed, calls):
        out.setdefault(key, {}).setdefault(tp, []).append((samples, seq, *median_times(times)))
    return out


def _rows(value: Any, start: int, count: int, device: torch.device) -> Any:
    """Samples ``start .. start + count`` of a batched tensor; anything else as it is."""
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return value[start : start + count].to(device)
    return value


def _representatives(stage, with_ends: bool) -> list:
    """One stage layer per body layer type, each following another body layer (its input is laid out for
    its TP degree already; the first body layer's move from the embedding's layout is priced on its own);
    with ``with_ends`` the embedding and the head too."""
    chosen: dict[str, Any] = {}
    body = [layer for layer in stage.stage_layers if layer.kind not in ENDS]
    for layer in body[1:]:
        chosen.setdefault(layer.layer_type, layer)
    ends = [layer for layer in stage.stage_layers if layer.kind in ENDS] if with_ends else []
    return ends + list(chosen.values())
