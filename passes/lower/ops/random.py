"""Random streams of a lowered graph (``passes.lower.graph.random_streams`` says which op draws from which):
seeds per layer and data block, and ``in_stream``, the call a random op of a lowered graph runs through.

The graphs are captured in training mode, so dropout is part of them; ``without_dropout()`` runs them as the
model's ``eval()`` would: dropout ops return their input and attention drops nothing. A random op with no such
evaluation form (Swin's stochastic depth draws ``rand`` and rescales) is named by ``eval_obstacles``."""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor

_DRAW_LIMIT = 1 << 62
aten = torch.ops.aten
_DROPOUTS = (aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default)
_evaluating = False  # inside without_dropout()


def layer_seed(*parts: Any) -> int:
    """A 63-bit seed from ``parts`` (run seed, step, micro-batch, layer, data block...)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seed_generators(seed: int, device: torch.device) -> None:
    """Seed the generators random ops on ``device`` draw from: the CPU's and, on a GPU, that GPU's. Not
    ``torch.manual_seed``: on a machine without an initialised GPU it queues a lazy seed for every
    accelerator type, formatting a stack trace each time (0.07-0.6 ms a call, called per layer and
    micro-batch: a few percent of a pipeline step)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.default_generators[index].manual_seed(seed)


def in_stream(op: Callable, stream: int, *args, **kwargs):
    """``op(*args, **kwargs)`` on random stream ``stream`` (see the module docstring). The number that keys the
    stream comes from the CPU generator, so no device synchronises."""
    if _evaluating:
        return _as_in_eval(op, args, kwargs)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if any(isinstance(t, FakeTensor) or t.is_meta for t in tensors):  # shape propagation draws nothing
        return op(*args, **kwargs)
    base = int(torch.randint(0, _DRAW_LIMIT, (1,), generator=torch.default_generator))
    device = tensors[0].device if tensors else torch.device("cpu")
    seed_generators(layer_seed(base, stream), device)
    out = op(*args, **kwargs)
    seed_generators(layer_seed(base, "next"), device)
    return out


@contextlib.contextmanager
def without_dropout() -> Iterator[None]:
    """Random ops run as in ``model.eval()``: dropout is the identity, attention drops nothing; nothing is
    drawn, so the generators are left as they are."""
    global _evaluating
    previous, _evaluating = _evaluating, True
    try:
        yield
    finally:
        _evaluating = previous


def _as_in_eval(op: Callable, args: tuple, kwargs: dict):
    if op in _DROPOUTS:
        return args[0]
    if op is aten.native_dropout.default:
        return args[0].clone(), torch.ones_like(args[0], dtype=torch.bool)
    if op is aten.scaled_dot_product_attention.default:
        if len(args) > 4:
            args = (*args[:4], 0.0, *args[5:])
        elif "dropout_p" in kwargs:
            kwargs = {**kwargs, "dropout_p": 0.0}
        return op(*args, **kwargs)
    raise AssertionError(f"{op} has no evaluation form: eval_obstacles should have refused it")


def eval_obstacles(graph: fx.GraphModule) -> list[str]:
    """The random ops of a lowered ``graph`` that ``without_dropout`` cannot run as in evaluation."""
    evaluable = (*_DROPOUTS, aten.native_dropout.default, aten.scaled_dot_product_attention.default)
    return [
        f"{node.name} ({node.args[0]})"
        for node in graph.graph.nodes
        if node.op == "call_function" and node.target is in_stream and node.args[0] not in evaluable
    ]
