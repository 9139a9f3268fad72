"""What one layer costs one device: the record ``CostModel.layer_cost`` returns and the search and ``evaluate``
add up (the cost contract: passes/search/cost_contract.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerCost:
    """One layer (or the embedding/head part of a stage) on ONE device; see the cost contract."""

    fwd_s: float
    bwd_s: float
    grad_sync_s: float
    model_state_bytes: int
    activation_bytes: int
    peak_extra_bytes: int = 0
    grad_bytes: int = 0  # the part of model_state_bytes that exists only after a step's first backward
    optimizer_temp_bytes: int = 0  # the optimizer step's temporaries
    # a weight gradient computed whole before it is added to the stored one, in a backward that finds one
    accumulate_bytes: int = 0

    @property
    def transient_bound_bytes(self) -> int:
        """The largest transient of any of the layer's backwards (for additive memory bounds)."""
        return self.peak_extra_bytes + self.accumulate_bytes
