"""The model profiler: time each layer type's own graph on the device, fit time(batch, sequence).

For every (micro-batch, sequence length) asked for, the model is captured again (shapes are baked into the
exported graph), the batch is run through the layers once to obtain every layer's real inputs, and then
one layer of each type (plus the prologue and the epilogue) runs forward and backward on its own:
warm-up, then the median of the repetitions. The forward and backward times are fitted separately with
``fit_time_formula`` (sympy, lambdified). Memory comes from the graph's annotations, as in the analytic
mode: parameters, the bytes autograd saves (exact, counted while tracing), their split under TP
(``tp_activation_split``; TP lowering is a later step, so TP degrees are derived, not measured), and the
layer inputs a checkpointed layer keeps. With ``compile_layers`` each timed layer is ``torch.compile``d as
training compiles it (``runtime.compiled_layers``); the warm-up compiles it, outside the timings.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any, Callable, Sequence

import torch

from galvatron_fx.errors import ProfileError
from galvatron_fx.fx_utils import LAYER_COMPILE_OPTIONS
from galvatron_fx.program import run_layer

from .model_profile import ModelProfile, fit_time_formula, infer_seq_hidden

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


def time_layer_once(module: torch.nn.Module, inputs: Sequence[Any], device: torch.device) -> tuple[float, float]:
    """(forward, backward) seconds of one call of ``module`` on ``inputs``; its gradients are dropped after."""

    def forward():
        leaves = [
            x.detach().requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor) else x for x in inputs
        ]
        with torch.enable_grad():
            outputs = module(*leaves)
        return [o for o in outputs if isinstance(o, torch.Tensor) and o.requires_grad]

    _sync(device)
    start = time.perf_counter()
    outputs = forward()
    _sync(device)
    middle = time.perf_counter()
    if outputs:
        torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])
    _sync(device)
    end = time.perf_counter()
    for param in module.parameters():
        param.grad = None
    return middle - start, end - middle


def profile_model(
    build: Builder,
    batches: Sequence[int] = (2, 4, 8),
    seqs: Sequence[int] = (32,),
    *,
    device: torch.device | str = "cpu",
    device_name: str | None = None,
    warmup: int = 2,
    repeats: int = 3,
    progress: bool = True,
    name: str | None = None,
    compile_layers: bool = False,
) -> ModelProfile:
    """Measure every layer type of the model ``build(batch, seq)`` returns; a ModelProfile with fitted times
    (of the compiled layers with ``compile_layers``, as ``compile(..., compile_layers=True)`` runs them).

    The memory figures are those of the largest sequence length, which becomes the profile's ``seq_length``.
    """
    from galvatron_fx.capture import capture

    device = torch.device(device)
    if min(batches) < 1:
        raise ProfileError(
            f"micro-batch sizes {list(batches)} include one below 1", "profile batches of 1 sample or more"
        )
    reference_seq = max(seqs)
    cases = [(b, s) for s in sorted(seqs) for b in sorted(batches)]
    base = None
    samples: dict[int, tuple[list, list]] = {}  # by layer index: type names may encode shapes
    representatives: dict[str, int] | None = None
    started = time.perf_counter()
    for done, (batch, seq) in enumerate(cases, 1):
        model, kwargs = build(batch, seq)
        # capture on the device: exported graphs bake in the device of the tensors they create
        kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        program = capture(model.to(device), example_kwargs=kwargs)
        if base is None or (seq == reference_seq and base[1] != reference_seq):
            base = (program, seq)
        representatives = representatives or _representatives(program)
        if base[0] is not program and len(program.layers) != len(base[0].layers):
            raise ProfileError(
                f"the model has {len(program.layers)} layers at batch {batch}, seq {seq} but {len(base[0].layers)} "
                "before",
                "profile a model whose structure does not depend on the batch or sequence length",
            )
        env = program.flatten_inputs((), kwargs)
        env_before = dict(env)
        with torch.no_grad():
            for layer in program.layers:
                run_layer(layer, env)
        true_seq = infer_seq_hidden(program)[0]
        for index in representatives.values():
            layer = program.layers[index]
            inputs = [env[n] if n in env else env_before[n] for n in layer.input_names]
            fwd_s, bwd_s = time_layer(layer, inputs, device, warmup, repeats, compile_layers)
            entry = samples.setdefault(index, ([], []))
            entry[0].append((batch, true_seq, fwd_s))
            entry[1].append((batch, true_seq, bwd_s))
        if progress:
            sys.stderr.write(
                f"\rprofiled batch {batch} seq {seq} ({done}/{len(cases)}, {time.perf_counter() - started:.1f}s)   "
            )
            sys.stderr.flush()
    if progress:
        sys.stderr.write("\n")
    program = base[0]
    profile = ModelProfile.from_program(
        program, flops_per_s=1.0, name=name
    )  # memory from the graph; times replaced below
    measurements = {}
    for index, (fwd, bwd) in samples.items():
        layer = program.layers[index]
        key = layer.kind if layer.kind in ("prologue", "epilogue") else layer.layer_type
        target = (
            profile.prologue if key == "prologue" else profile.epilogue if key == "epilogue" else profile.types[key]
        )
        target.fwd, target.bwd = fit_time_formula(fwd), fit_time_formula(bwd)
        measurements[key] = {"fwd": fwd, "bwd": bwd}
    profile.mode, profile.device = (
        "measured",
        device_name or (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
    )
    profile.extra["measurements"] = measurements
    profile.extra["compiled_layers"] = compile_layers
    return profile


def _representatives(program) -> dict[str, int]:
    """Layer type → index of its first layer; plus "prologue" and "epilogue"."""
    chosen = {"prologue": 0, "epilogue": len(program.layers) - 1}
    for layer in program.body:
        chosen.setdefault(layer.layer_type, layer.index)
    return chosen
