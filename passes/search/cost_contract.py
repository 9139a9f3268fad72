"""The cost contract: everything the search asks of a cost model, and nothing more.

``galvatron_fx.cost.model.CostModel`` implements it from profiles; the search's tests implement it with random
terms, so that the search may rely on the contract alone. Times are seconds, memory bytes, on one device.

The search rebuilds ``evaluate`` from the per-layer terms, so they must agree with it: a stage's time per
micro-batch ``X_s`` is the sum of its layers' and its embedding part's ``fwd_s + bwd_s``, the redistribution
between consecutive layers of different layouts (and on the first and last stage between the embedding's or
head's layout, ``parallel_dims.end_layout``, and the first or last body layer's: boundaries 0 and L; a body
layer's layout is that of ``parallel_dims.activation_strategy``, and ``redistribution_s`` may depend on a body
layer's strategy only through its tp, sp and tp_consecutive there and whether it is a grid (whose rows split the
features), the search's layout classes) and,
before a cut, ``p2p_s``; its gradient sync ``G_s`` the
sum of the ``grad_sync_s``. The iteration takes ``Σ_s X_s + (chunks − 1)·max_s X_s + max_s G_s``. A stage's
memory is ``in_flight(...).layer_bytes(...)`` summed over its layers and part, plus the largest transient
(``LayerCost.transient_bound_bytes``).
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

from galvatron_fx.cost.layer_cost import LayerCost
from galvatron_fx.cost.memory import InFlight
from galvatron_fx.plan import EmbeddingStrategy, LayerStrategy, Plan, Prediction


@runtime_checkable
class CostContract(Protocol):
    """What ``passes.search`` needs of a cost model."""

    layer_types: Sequence[str]  # the type of every body layer, in order

    def layer_cost(
        self,
        layer_type: str,
        strategy: LayerStrategy,
        micro_batch: int,
        busy_share: float = 1.0,
        deferred_sync: bool = False,
    ) -> LayerCost:
        """One body layer of ``layer_type`` under ``strategy`` at ``micro_batch`` samples per micro-batch."""

    def embedding_cost(
        self,
        embedding: EmbeddingStrategy,
        devices: int,
        micro_batch: int,
        *,
        first_stage: bool,
        last_stage: bool,
        busy_share: float = 1.0,
        deferred_sync: bool = False,
    ) -> LayerCost:
        """The embedding (on the first stage) and/or head (on the last) part of a stage of ``devices``."""

    def redistribution_s(
        self, before: LayerStrategy, after: LayerStrategy, boundary_index: int, micro_batch: int
    ) -> float:
        """Moving the activations live at body boundary ``boundary_index`` from ``before``'s layout to ``after``'s."""

    def p2p_s(
        self, stage: int, plan_pp: int, devices_per_stage: int, micro_batch: int, cut_after_body_index: int
    ) -> float:
        """Sending one micro-batch's activations across the cut after body layer ``cut_after_body_index``."""

    def in_flight(self, pipeline: str, pp: int, stage: int, chunks: int) -> InFlight:
        """The micro-batches whose activations stage ``stage`` holds (``cost.memory.InFlight``)."""

    def busy_share(self, pp: int, chunks: int) -> float:
        """The share of the step a stage computes (the rest it waits): how much its ranks contend."""

    def unsupported_reason(self, layer_type: str, strategy: LayerStrategy) -> str | None:
        """Why a layer of ``layer_type`` cannot run ``strategy``, or None: the search leaves it out, with this."""

    def evaluate(self, plan: Plan) -> Prediction:
        """Iteration time, samples/s and memory per stage of ``plan``, by the formula above."""
