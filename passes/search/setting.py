"""``Setting``: one point of the search's outer loop (passes/search/engine.py), which fixes everything about a
plan but its layers' strategies, its stages' division and its embedding's strategy."""

from __future__ import annotations

from dataclasses import dataclass

from galvatron_fx.cost.memory import InFlight


@dataclass(frozen=True)
class Setting:
    """One point of the outer search: ``pp`` stages of ``devices`` devices, ``chunks`` micro-batches of the
    global batch under ``pipeline``, the micro-batches each stage holds in flight (``cost.memory.InFlight``),
    and the dp type every layer that is not ZeRO-3 shares (Galvatron's ``default_dp_type``); ``upper_bound``:
    samples/s no plan of this setting exceeds (0 until computed)."""

    upper_bound: float
    pp: int
    devices: int
    global_batch: int
    chunks: int
    pipeline: str
    in_flight: tuple[InFlight, ...]
    dp_mode: str
    sync_every_micro_batch: bool = False  # Plan.grad_sync_every_micro_batch

    @property
    def syncs(self) -> int:
        """Gradient synchronisations per step."""
        return self.chunks if self.sync_every_micro_batch else 1

    @property
    def defers_grad_sync(self) -> bool:
        """``Plan.defers_grad_sync`` of the setting's plans."""
        return self.syncs == 1 and self.chunks > 1

    @property
    def micro_batch(self) -> int:
        return self.global_batch // self.chunks
