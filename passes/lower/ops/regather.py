"""Gathered values saved for backward as the shards they were gathered from, gathered again when backward reads
them: what Megatron's sequence parallelism does for a column-parallel projection's input, and what SUMMA and
Colossal-AI's 3D linear do for their blocks.

A Megatron-SP layer all-gathers the sequence before each column-parallel group (``sequence_parallel``); a grid
layer (``grid_parallel``) gathers a feature or sample block before each projection and every parameter block
over its column before use. The projections save their inputs for backward, so without this the whole gathered
value would stay alive until backward: ``tp`` (or ``q``) times the shard, per projection and per layer of the
stage, and a grid's gathered weights of every layer at once. Under ``regather_saved()`` (entered by
``StageModule`` around such a layer's forward) the gathering ops announce their outputs (``note_gathered``);
when autograd saves such an output, or a view of it, the pack hook keeps the shard and how to gather it, and the
unpack hook gathers it again in backward (once for all the projections that saved it). The gathered value itself
is freed as soon as forward no longer reads it. The cost is one more all-gather per announced value in
backward, the same collective forward issued, over the same group, in the same order on every rank of it
(backward visits the same graph everywhere). Under autocast the gathers that only projections read run in
autocast's dtype (``sp_gather``'s ``into_matmul``), so what the projections save is the gathered value, not a
cast of it of their own.

Nothing changes where the context is not active (other layers, or inside ``torch.utils.checkpoint``, whose own
hooks take precedence: a checkpointed layer saves only its inputs and its recomputation keeps what it gathers).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Iterator

import torch

from galvatron_fx.errors import GalvatronError

Gather = Callable[[torch.Tensor], torch.Tensor]

_active: dict[tuple[str, int], "_Gathered"] | None = None  # storage key → announced value, while in the context


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return str(t.device), t.untyped_storage().data_ptr()


def _layout(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.stride(), t.storage_offset(), t.untyped_storage().nbytes()


class _Gathered:
    """One announced gathered value: its shard, how to gather it, and the packs still to be unpacked."""

    def __init__(self, full: torch.Tensor, shard: torch.Tensor, gather: Gather):
        # the storage's owner: alive while any view of it is, so while alive its storage was not reused
        self.owner = weakref.ref(full if full._base is None else full._base)
        self.shard, self.gather, self.version = shard.detach(), gather, shard._version
        self.layout = _layout(full)
        self.pending = 0
        self.regathered: torch.Tensor | None = None

    def materialize(self) -> torch.Tensor:
        if self.regathered is None:
            if self.shard._version != self.version:
                raise GalvatronError(
                    "a shard saved for backward by a grid layer was modified in place after forward, so gathering "
                    "it again would give other values than forward used",
                    "do not modify a layer's activations in place between forward and backward",
                )
            full = self.gather(self.shard)
            if _layout(full) != self.layout:
                raise GalvatronError(
                    f"gathering a saved shard again gave the layout {_layout(full)}, forward's was {self.layout} "
                    "(shape, stride, storage offset, storage bytes)",
                    "report this: the gathering op must return the same layout in forward and backward",
                )
            self.regathered = full
        return self.regathered

    def release(self) -> None:
        """One pack unpacked; the last one drops the regathered value."""
        self.pending -= 1
        if self.pending <= 0:
            self.regathered = None


class _Packed:
    """What autograd keeps instead of a view of a gathered value: the announcement and the view's geometry."""

    __slots__ = ("gathered", "size", "stride", "offset")

    def __init__(self, gathered: _Gathered, view: torch.Tensor):
        self.gathered, self.size, self.stride, self.offset = gathered, view.shape, view.stride(), view.storage_offset()
        gathered.pending += 1


def note_gathered(full: torch.Tensor, shard: torch.Tensor, gather: Gather) -> None:
    """Announce that ``full`` is ``gather(shard)``, gathered by a collective that ``gather`` repeats. Called by
    the gathering ops' forward; a no-op outside ``regather_saved()``."""
    if _active is None or type(full) is not torch.Tensor or full.device.type == "meta":  # fake values: no storage
        return
    if full.untyped_storage().data_ptr() != shard.untyped_storage().data_ptr():
        _active[_storage_key(full)] = _Gathered(full, shard, gather)


def _pack(t: torch.Tensor):
    if not _active or type(t) not in (torch.Tensor, torch.nn.Parameter):  # subclasses (DTensor) pass through
        return t
    entry = _active.get(_storage_key(t))
    if entry is None or entry.owner() is None:
        return t
    return _Packed(entry, t)


def _unpack(packed):
    if not isinstance(packed, _Packed):
        return packed
    full = packed.gathered.materialize()
    view = full.as_strided(packed.size, packed.stride, packed.offset)
    packed.gathered.release()
    return view


@contextlib.contextmanager
def regather_saved() -> Iterator[None]:
    """Within: gathered values announced by ``note_gathered`` are saved for backward as their shards."""
    global _active
    outer, _active = _active, {}
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _active = outer
