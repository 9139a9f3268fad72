"""What a layer keeps for backward, measured: every tensor autograd saves in its forward, counted once per storage
(parameters left out), through the runtime's own pack hook (passes/lower/ops/regather.py), so that a value saved
as the shard it was gathered from counts as the shard."""

from __future__ import annotations

import torch

from galvatron_fx.passes.lower.ops import regather
from galvatron_fx.program import BLOCK, TRANSITION


class Metered(torch.nn.Module):
    """``layer``, whose forward records ``kept_bytes``: what autograd keeps of that call."""

    def __init__(self, layer: torch.nn.Module, params: set[int]):
        super().__init__()
        self.layer, self.params, self.kept_bytes = layer, params, 0

    def forward(self, *args):
        storages: dict[int, int] = {}

        def pack(t):
            kept = regather._pack(t)
            held = kept.gathered.shard if isinstance(kept, regather._Packed) else kept
            ptr = held.untyped_storage().data_ptr()
            if ptr not in self.params:
                storages[ptr] = held.untyped_storage().nbytes()
            return kept

        with torch.autograd.graph.saved_tensors_hooks(pack, regather._unpack):
            out = self.layer(*args)
        self.kept_bytes = sum(storages.values())
        return out


def meter_body_layers(stage) -> list[Metered]:
    """Wrap every body layer of ``stage`` (a ``StageModule``) in a ``Metered``; returns them in order."""
    params = {p.untyped_storage().data_ptr() for p in stage.parameters()}
    meters = []
    for layer in stage.stage_layers:
        if layer.kind in (BLOCK, TRANSITION):
            stage.layers[layer.name] = Metered(stage.layers[layer.name], params)
            meters.append(stage.layers[layer.name])
    assert meters, "the stage has no body layer to measure"
    return meters
