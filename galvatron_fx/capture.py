"""capture(): an unmodified nn.Module and example inputs → an annotated Program.

The steps, in order: check the inputs against the forward signature; export (non-strict) in training
mode so that dropout is recorded, with a symbolic batch dimension so that the Program runs at any batch;
give the Program its own copy of the parameters so that training it never touches the user's model; then
the passes — mark batched values and fix the example's sizes, discover layers, give each its own batch
sizes, split them into modules, annotate nodes, sum per layer.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from .errors import CaptureError
from .program import Program


def capture(
    model: nn.Module, example_args: tuple = (), example_kwargs: dict | None = None, *, training: bool = True
) -> Program:
    """Capture ``model`` called as ``model(*example_args, **example_kwargs)`` into a Program.

    The example batch's first dimension is taken as the batch; every input whose dim 0 has that size is
    batched. The batch is captured as a symbol, so the Program runs at any batch size (an example of one
    sample is captured at two). Pass ``use_cache=False`` to decoders. ``training=True`` records dropout as in
    training; the model's own mode and parameters are left as they were.
    """
    from galvatron_fx.passes.analysis.pipeline import ANALYSIS_PASSES, Capture
    from galvatron_fx.passes.infra import run_passes

    example_args = tuple(example_args) if isinstance(example_args, (tuple, list)) else (example_args,)
    example_kwargs = dict(example_kwargs or {})
    _check_signature(model, example_args, example_kwargs)
    batch_size = batch_size_of(pytree.tree_leaves((example_args, example_kwargs)))
    if batch_size == 1:  # a size-1 dimension would be specialised: capture at two, run at any batch
        example_args, example_kwargs = resize_batch(example_args, example_kwargs, 2)
        batch_size = 2
    exported, static_reason = _export(model, example_args, example_kwargs, training, batch_size)
    _check_no_cache(model, exported.call_spec.out_spec)
    graph_module = exported.module()
    _drop_guard_calls(graph_module)
    _own_parameters(graph_module)
    flat_inputs = pytree.tree_leaves((example_args, example_kwargs))
    done = run_passes(ANALYSIS_PASSES, Capture(graph_module, model, flat_inputs, batch_size, static_reason), None)
    placeholders = done.placeholders
    layers = done.layers
    return Program(
        graph_module=graph_module,
        layers=layers,
        batch_size=batch_size,
        placeholder_names=tuple(n.name for n in placeholders),
        in_spec=graph_module._in_spec,
        out_spec=graph_module._out_spec,
        model_name=type(model).__name__,
        exported=exported,
        dynamic_batch=not static_reason,
        static_batch_reason=static_reason,
    )


def _check_signature(model: nn.Module, args: tuple, kwargs: dict) -> None:
    try:
        inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as error:
        params = ", ".join(inspect.signature(model.forward).parameters)
        raise CaptureError(
            f"the example inputs do not fit {type(model).__name__}.forward({params}): {error}",
            "pass example_args/example_kwargs exactly as you would call the model",
        ) from None


def _check_no_cache(model: nn.Module, out_spec: pytree.TreeSpec) -> None:
    """A decoder that returns its key/value cache cannot be trained layer by layer: refuse it."""

    def keys(spec: pytree.TreeSpec):
        context = spec.context if isinstance(spec.context, (list, tuple)) else []
        yield from (k for k in context if isinstance(k, str))
        for child in spec.children():
            yield from keys(child)

    if "past_key_values" in set(keys(out_spec)):
        raise _cache_error(model)


def _cache_error(model: nn.Module) -> CaptureError:
    return CaptureError(
        f"{type(model).__name__} returns its decoder key/value cache (use_cache is on)",
        "pass use_cache=False in example_kwargs (and in every training batch), or set model.config.use_cache = False",
    )


@contextlib.contextmanager
def _mode(model: nn.Module, training: bool):
    was_training = {m: m.training for m in model.modules()}
    model.train(training)
    try:
        yield
    finally:
        for module, mode in was_training.items():
            module.training = mode


def _batch_shapes(model: nn.Module, args: tuple, kwargs: dict, batch_size: int) -> dict[str, Any]:
    """``dynamic_shapes`` for export: one symbol, ``batch``, on dim 0 of every input with the batch's size."""
    batch = torch.export.Dim("batch", min=1, max=1 << 30)
    bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments

    def spec(value):
        return (
            {0: batch} if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch_size else None
        )

    return {name: pytree.tree_map(spec, value) for name, value in bound.items()}


def _export(model: nn.Module, args: tuple, kwargs: dict, training: bool, batch_size: int):
    """The export with a symbolic batch, and ``""``; or, where the model's code fixes the batch, a static export
    and the reason (plans then must run every layer at the example's batch)."""
    try:
        with _mode(model, training):
            return torch.export.export(
                model, args, kwargs, dynamic_shapes=_batch_shapes(model, args, kwargs, batch_size), strict=False
            ), ""
    except Exception as error:  # any failure of the symbolic export: try the static one, which names real problems
        reason = _gist(error)
    exported = _export_static(model, args, kwargs, training)
    warnings.warn(
        f"{type(model).__name__} could not be captured with a symbolic batch ({reason}); it is captured at "
        f"batch {batch_size}, and only plans whose layers all run that batch lower",
        stacklevel=3,
    )
    return exported, reason


def _gist(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__


def _export_static(model: nn.Module, args: tuple, kwargs: dict, training: bool):
    try:
        with _mode(model, training):
            return torch.export.export(model, args, kwargs, strict=False)
    except Exception as error:  # torch.export raises many types; we only translate the message
        if re.search(r"cache_utils\.\w*Cache", str(error)):
            raise _cache_error(model) from error
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {_gist(error)}",
            "make forward traceable: avoid Python control flow on tensor values (use torch.cond or fixed shapes), "
            "pass plain tensors as inputs, turn off caches (use_cache=False), and try the model in eager mode first",
        ) from error


def _drop_guard_calls(graph_module: torch.fx.GraphModule) -> None:
    """ep.module() re-checks input shapes in a ``_guards_fn`` call; the Program validates its inputs itself."""
    for node in list(graph_module.graph.nodes):
        if node.op == "call_module" and node.target.startswith("_guards"):
            graph_module.graph.erase_node(node)
    graph_module.recompile()


def _own_parameters(graph_module: torch.fx.GraphModule) -> None:
    """Replace parameters and buffers with copies (tied ones stay tied): the user's model stays untouched."""
    copies: dict[int, torch.Tensor] = {}
    for owner in list(graph_module.modules()):
        for name, param in list(owner.named_parameters(recurse=False)):
            if id(param) not in copies:
                copies[id(param)] = nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
            setattr(owner, name, copies[id(param)])
        for name, buffer in list(owner.named_buffers(recurse=False)):
            if id(buffer) not in copies:
                copies[id(buffer)] = buffer.detach().clone()
            owner._buffers[name] = copies[id(buffer)]
    # Tensor constants lifted by export are plain attributes; they are never trained, so sharing is fine.


def batch_size_of(flat_inputs: list[Any]) -> int:
    for value in flat_inputs:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise CaptureError("no example input is a tensor with a batch dimension", "pass at least one batched tensor input")


def resize_batch(args: tuple, kwargs: dict, size: int) -> tuple[tuple, dict]:
    """The example batch cut (or tiled) to ``size`` samples along dim 0 of its batched tensors."""
    batch = batch_size_of(pytree.tree_leaves((args, kwargs)))

    def resize(value):
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != batch:
            return value
        repeats = -(-size // value.shape[0])
        return value.repeat(repeats, *([1] * (value.dim() - 1)))[:size]

    return pytree.tree_map(resize, args), pytree.tree_map(resize, kwargs)
