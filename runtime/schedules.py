"""Pipeline schedules (GPipe, 1F1B) and the executor that runs one stage's part of a training step.

A schedule is the list of actions one stage takes: ``F i`` (forward micro-batch i) and ``B i`` (its
backward). GPipe runs every forward, then every backward; 1F1B (PipeDream-flush) runs ``pp - stage - 1``
warm-up forwards, then alternates one forward and one backward, then drains the backwards. Both run the
backwards in micro-batch order, so the last backward is always micro-batch ``chunks - 1``.

We run our own executor rather than ``torch.distributed.pipelining``: stages here receive batch inputs
(labels, T5's decoder ids) besides activations, pass integer and boolean tensors (masks) that carry no
gradient, and must tell the per-layer data-parallel wrappers which backward is the last one.
Activations travel with non-blocking sends and blocking receives, in micro-batch order in each direction
between a pair of ranks, which cannot deadlock. Gloo reports a send complete only once it is waited on, so
a sent buffer would live to the end of the step: each send is waited on (and its buffer freed) as soon as
the peer is known to have received it, which never blocks: an activation sent downstream once its gradient
has come back, a gradient sent upstream once the upstream stage sends a forward it runs after that
backward. Each transfer is one message: the values crossing a cut packed into one byte buffer (one
latency per micro-batch and direction, not one per value); gradients travel back only for values that can
carry one (``StageModule.grad_names``: the rotary tables and masks a cut also carries do not), zeros where
the receiving stage left one unused.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from galvatron_fx.passes.lower.stage import StageModule
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

    def __init__(
        self,
        stage: StageModule,
        sync: GradSync,
        chunks: int,
        device: torch.device,
        autocast_dtype: torch.dtype | None = None,
    ):
        self.stage = stage
        self.sync = sync
        self.chunks = chunks
        self.device = device
        self.autocast_dtype = autocast_dtype
        position = stage.position
        self.prev_rank = position.rank_of(position.stage - 1) if not position.is_first else None
        self.next_rank = position.rank_of(position.stage + 1) if not position.is_last else None

    def run(
        self,
        actions: tuple[Action, ...],
        batches: list[dict[str, Any]],
        seeds: list[int | None],
        upstream_actions: tuple[Action, ...] = (),
    ) -> list[torch.Tensor]:
        """Execute ``actions``; ``batches[i]`` holds micro-batch i's batch inputs; ``upstream_actions`` are
        the previous stage's (they tell when a gradient sent to it has arrived). Returns the loss of each
        micro-batch on the last stage (detached), nothing elsewhere."""
        saved: dict[int, tuple] = {}
        losses: list[torch.Tensor] = []
        sends = _Sends(_backwards_before_forwards(upstream_actions))
        backwards_done = 0
        for action in actions:
            if action.kind == "F":
                saved[action.micro_batch] = self._forward(
                    action.micro_batch, batches[action.micro_batch], seeds[action.micro_batch], losses, sends
                )
            else:
                last = backwards_done == self.chunks - 1
                self.sync.before_backward(last)
                self._backward(action.micro_batch, saved.pop(action.micro_batch), sends)
                self.sync.after_backward(last)
                backwards_done += 1
        sends.wait_all()
        return losses

    # -- one micro-batch -------------------------------------------------------------------------------
    def _forward(self, mb: int, batch: dict[str, Any], seed: int | None, losses: list, sends: "_Sends") -> tuple:
        received = self._recv_activations(mb)
        sends.upstream_sent_forward(mb)
        env = {name: batch[name] for name in self.stage.batch_names}
        env.update(zip((s.name for s in self.stage.recv_specs), received))
        autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype
            else contextlib.nullcontext()
        )
        with autocast:
            outputs = self.stage(env, seed=seed)
        if self.next_rank is None:
            loss = outputs[0]
            losses.append(loss.detach().float())
            return received, [loss / self.chunks]
        for spec, value in zip(self.stage.send_specs, outputs):
            if tuple(value.shape) != spec.shape:
                raise RuntimeError(
                    f"stage {self.stage.position.stage} computed {spec.name} of shape {tuple(value.shape)}, "
                    f"but the layer table says {spec.shape}"
                )
            if value.requires_grad and spec.name not in self.stage.grad_names:  # its gradient would be lost
                raise RuntimeError(
                    f"stage {self.stage.position.stage} sends {spec.name}, which requires a gradient, but the "
                    "graph analysis (differentiable_names) says it cannot carry one"
                )
        payload = pack([value.detach().to(spec.dtype) for spec, value in zip(self.stage.send_specs, outputs)])
        sends.add("F", mb, dist.isend(payload, self.next_rank, tag=_tag(mb, backward=False)))
        return received, outputs

    def _backward(self, mb: int, saved: tuple, sends: "_Sends") -> None:
        received, outputs = saved
        if self.next_rank is None:
            torch.autograd.backward(outputs[0])
        else:
            grads = self._recv_grads(mb)
            if grads:
                sends.complete("F", mb)  # its gradient came back: the next stage has received it
            pairs = [
                (out, grads[spec.name].to(out.dtype))
                for out, spec in zip(outputs, self.stage.send_specs)
                if spec.name in grads and out.requires_grad
            ]
            if pairs:
                torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs])
        if self.prev_rank is not None:
            grads = [
                value.grad if value.grad is not None else torch.zeros_like(value)
                for spec, value in zip(self.stage.recv_specs, received)
                if spec.name in self.stage.grad_names
            ]
            if grads:
                sends.add(
                    "B", mb, dist.isend(pack([g.detach() for g in grads]), self.prev_rank, tag=_tag(mb, backward=True))
                )

    # -- point to point ----------------------------------------------------------------------------------
    def _recv_activations(self, mb: int) -> list[torch.Tensor]:
        if self.prev_rank is None:
            return []
        specs = self.stage.recv_specs
        values = unpack(self._recv(specs, mb, backward=False), specs)
        return [
            value.requires_grad_() if spec.name in self.stage.grad_names else value
            for spec, value in zip(specs, values)
        ]

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


class _Sends:
    """Sends in flight by (kind, micro-batch); ``complete`` waits on one the peer has received, freeing its
    buffer. ``released_by_forward[m]``: the gradients sent upstream that have arrived once the upstream
    stage's forward of micro-batch m does (it runs after their backwards)."""

    def __init__(self, released_by_forward: dict[int, tuple[int, ...]]):
        self.works: dict[tuple[str, int], dist.Work] = {}
        self.released_by_forward = released_by_forward

    def add(self, kind: str, mb: int, work: dist.Work) -> None:
        self.works[kind, mb] = work

    def complete(self, kind: str, mb: int) -> None:
        work = self.works.pop((kind, mb), None)
        if work is not None:
            work.wait()

    def upstream_sent_forward(self, mb: int) -> None:
        for backward in self.released_by_forward.get(mb, ()):
            self.complete("B", backward)

    def wait_all(self) -> None:
        for work in self.works.values():
            work.wait()
        self.works.clear()


def _backwards_before_forwards(actions: tuple[Action, ...]) -> dict[int, tuple[int, ...]]:
    """For each forward in ``actions``, the backwards that run before it and after the previous forward."""
    out, since_last = {}, []
    for action in actions:
        if action.kind == "B":
            since_last.append(action.micro_batch)
        else:
            out[action.micro_batch], since_last = tuple(since_last), []
    return out


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
        values.append(buffer[offset : offset + spec.nbytes].view(spec.dtype).view(spec.shape))
        offset += _padded(spec.nbytes)
    return values
