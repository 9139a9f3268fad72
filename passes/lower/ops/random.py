"""Random streams of a lowered graph (``passes.lower.graph.random_streams`` says which op draws from which):
seeds per layer and data block, and ``in_stream``, the call a random op of a lowered graph runs through."""

from __future__ import annotations

import hashlib
from typing import Any, Callable

import torch
from torch._subclasses.fake_tensor import FakeTensor

_DRAW_LIMIT = 1 << 62


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
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if any(isinstance(t, FakeTensor) or t.is_meta for t in tensors):  # shape propagation draws nothing
        return op(*args, **kwargs)
    base = int(torch.randint(0, _DRAW_LIMIT, (1,), generator=torch.default_generator))
    device = tensors[0].device if tensors else torch.device("cpu")
    seed_generators(layer_seed(base, stream), device)
    out = op(*args, **kwargs)
    seed_generators(layer_seed(base, "next"), device)
    return out
