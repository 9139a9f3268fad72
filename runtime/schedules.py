"""Pipeline schedules (GPipe, 1F1B) and the executor that runs one stage's part of a training step.

A schedule is the list of actions one stage takes: ``F i`` (forward micro-batch i) and ``B i`` (its
backward). GPipe runs every forward, then every backward; 1F1B (PipeDream-flush) runs ``pp - stage - 1``
warm-up forwards, then alternates one forward and one backward, then drains the backwards. Both run the
backwards in micro-batch order, so the last backward is always micro-batch ``chunks - 1``.

We run our own executor rather than ``torch.distributed.pipelining``: stages here receive batch inputs
(labels, T5's decoder ids) besides activations, pass integer and boolean tensors (masks) that carry no
gradient, and must tell the per-layer data-parallel wrappers which backward is the last one.
Activations travel with non-blocking sends and blocking receives, in micro-batch order in each direction
between a pair of ranks, which cannot deadlock. Each transfer is one message: the values crossing a cut
packed into one byte buffer (one latency per micro-batch and direction, not one per value); gradients
travel back only for values that can carry one (``StageModule.grad_names``: the rotary tables and masks
a cut also carries do not), zeros where the receiving stage left one unused.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from galvatron_fx.passes.lower_stage import StageModule
from galvatron_fx.program import TensorSpec

from .data_parallel import GradSync


@dataclass(frozen=True)
class Action:
    kind: str  # "F" or "B"
    micro_batch: int

    def __repr__(self) -> str:
        return f"{self.kind}{self.micro_batch}"


def gpipe(num_stages: int, stage: int, chunks: int) -> tuple[Action, ...]:
    """All forwards, then all backwards."""
    return tuple(Action("F", i) for i in range(chunks)) + tuple(Action("B", i) for i in range(chunks))


def one_f_one_b(num_stages: int, stage: int, chunks: int) -> tuple[Action, ...]:
    """Warm-up forwards, then one forward / one backward, then the remaining backwards."""
    warmup = min(num_stages - stage - 1, chunks)
    actions = [Action("F", i) for i in range(warmup)]
    for i in range(chunks - warmup):
        actions += [Action("F", warmup + i), Action("B", i)]
    actions += [Action("B", i) for i in range(chunks - warmup, chunks)]
    return tuple(actions)


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b}

_GRAD_TAG_OFFSET = 1 << 20  # gradients use their own tag range (gloo matches messages by peer and tag)


def _tag(micro_batch: int, backward: bool) -> int:
    return (_GRAD_TAG_OFFSET if backward else 0) + micro_batch


class StageExecutor:
    """Runs one stage's actions for a step: forward and backward of micro-batches, point-to-point
    transfers with the neighbouring stages, and the gradient-sync calls of ``GradSync``."""

    def __init__(self, stage: StageModule, sync: GradSync, chunks: int, device: torch.device,
                 autocast_dtype: torch.dtype | None = None):
        self.stage = stage
        self.sync = sync
        self.chunks = chunks
        self.device = device
        self.autocast_dtype = autocast_dtype
        layout = stage.layout
        self.prev_rank = layout.rank_of(layout.stage - 1) if not layout.is_first else None
        self.next_rank = layout.rank_of(layout.stage + 1) if not layout.is_last else None

    def run(self, actions: tuple[Action, ...], batches: list[dict[str, Any]], seeds: list[int | None]) -> list[torch.Tensor]:
        """Execute ``actions``; ``batches[i]`` holds micro-batch i's batch inputs. Returns the loss of each
        micro-batch on the last stage (detached), nothing elsewhere."""
        saved: dict[int, tuple] = {}
        losses: list[torch.Tensor] = []
        pending: list[dist.Work] = []
        backwards_done = 0
        for action in actions:
            if action.kind == "F":
                saved[action.micro_batch] = self._forward(action.micro_batch, batches[action.micro_batch],
                                                          seeds[action.micro_batch], losses, pending)
            else:
                last = backwards_done == self.chunks - 1
                self.sync.before_backward(last)
                self._backward(action.micro_batch, saved.pop(action.micro_batch), pending)
                self.sync.after_backward(last)
                backwards_done += 1
        for work in pending:
            work.wait()
        return losses

    # -- one micro-batch -------------------------------------------------------------------------------
    def _forward(self, mb: int, batch: dict[str, Any], seed: int | None, losses: list, pending: list) -> tuple:
        received = self._recv_activations(mb)
        env = {name: batch[name] for name in self.stage.batch_names}
        env.update(zip((s.name for s in self.stage.recv_specs), received))
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                    else contextlib.nullcontext())
        with autocast:
            outputs = self.stage(env, seed=seed)
        if self.next_rank is None:
            loss = outputs[0]
            losses.append(loss.detach().float())
            return received, [loss / self.chunks]
        for spec, value in zip(self.stage.send_specs, outputs):
            if tuple(value.shape) != spec.shape:
                raise RuntimeError(f"stage {self.stage.layout.stage} computed {spec.name} of shape {tuple(value.shape)}, "
                                   f"but the layer table says {spec.shape}")
            if value.requires_grad and spec.name not in self.stage.grad_names:  # its gradient would be lost
                raise RuntimeError(f"stage {self.stage.layout.stage} sends {spec.name}, which requires a gradient, but the "
                                   "graph analysis (differentiable_names) says it cannot carry one")
        payload = pack([value.detach().to(spec.dtype) for spec, value in zip(self.stage.send_specs, outputs)])
        pending.append(dist.isend(payload, self.next_rank, tag=_tag(mb, backward=False)))
        return received, outputs

    def _backward(self, mb: int, saved: tuple, pending: list) -> None:
        received, outputs = saved
        if self.next_rank is None:
            torch.autograd.backward(outputs[0])
        else:
            grads = self._recv_grads(mb)
            pairs = [(out, grads[spec.name].to(out.dtype)) for out, spec in zip(outputs, self.stage.send_specs)
                     if spec.name in grads and out.requires_grad]
            if pairs:
                torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs])
        if self.prev_rank is not None:
            grads = [value.grad if value.grad is not None else torch.zeros_like(value)
                     for spec, value in zip(self.stage.recv_specs, received) if spec.name in self.stage.grad_names]
            if grads:
                pending.append(dist.isend(pack([g.detach() for g in grads]), self.prev_rank, tag=_tag(mb, backward=True)))

    # -- point to point ----------------------------------------------------------------------------------
    def _recv_activations(self, mb: int) -> list[torch.Tensor]:
        if self.prev_rank is None:
            return []
        specs = self.stage.recv_specs
        values = unpack(self._recv(specs, mb, backward=False), specs)
        return [value.requires_grad_() if spec.name in self.stage.grad_names else value for spec, value in zip(specs, values)]

    def _recv_grads(self, mb: int) -> dict[str, torch.Tensor]:
        """Gradients of the sent values that carry one, by name."""
        specs = tuple(spec for spec in self.stage.send_specs if spec.name in self.stage.grad_names)
        if not specs:
            return {}
        return {spec.name: grad for spec, grad in zip(specs, unpack(self._recv(specs, mb, backward=True), specs))}

    def _recv(self, specs: tuple[TensorSpec, ...], mb: int, backward: bool) -> torch.Tensor:
        peer = self.next_rank if backward else self.prev_rank
        buffer = torch.empty(packed_bytes(specs), dtype=torch.uint8, device=self.device)
        dist.irecv(buffer, peer, tag=_tag(mb, backward)).wait()
        return buffer


# -- one message per transfer: values packed into one byte buffer ------------------------------------------
_ALIGN_BYTES = 16  # every value starts at a multiple of this, so that each unpacks as a view of its dtype


def _padded(nbytes: int) -> int:
    return -(-nbytes // _ALIGN_BYTES) * _ALIGN_BYTES


def packed_bytes(specs: tuple[TensorSpec, ...]) -> int:
    return sum(_padded(spec.nbytes) for spec in specs)


def pack(values: list[torch.Tensor]) -> torch.Tensor:
    """``values`` (any dtypes) as one uint8 buffer: one transfer pays one latency, not one per value."""
    pieces = []
    for value in values:
        raw = value.contiguous().reshape(-1).view(torch.uint8)
        pieces.append(raw)
        if _padded(raw.numel()) > raw.numel():
            pieces.append(raw.new_zeros(_padded(raw.numel()) - raw.numel()))
    return torch.cat(pieces)


def unpack(buffer: torch.Tensor, specs: tuple[TensorSpec, ...]) -> list[torch.Tensor]:
    """The values ``pack`` wrote, as views of ``buffer`` with the shapes and dtypes of ``specs``."""
    values, offset = [], 0
    for spec in specs:
        values.append(buffer[offset:offset + spec.nbytes].view(spec.dtype).view(spec.shape))
        offset += _padded(spec.nbytes)
    return values
