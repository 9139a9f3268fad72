"""Pipeline schedules (GPipe, 1F1B) and the executor that runs one stage's part of a training step.

A schedule is the list of actions one stage takes: ``F i`` (forward micro-batch i) and ``B i`` (its
backward). GPipe runs every forward, then every backward; 1F1B (PipeDream-flush) runs ``pp - stage - 1``
warm-up forwards, then alternates one forward and one backward, then drains the backwards. Both run the
backwards in micro-batch order, so the last backward is always micro-batch ``chunks - 1``.

We run our own executor rather than ``torch.distributed.pipelining``: stages here receive batch inputs
(labels, T5's decoder ids) besides activations, pass integer and boolean tensors (masks) that carry no
gradient, and must tell the per-layer data-parallel wrappers which backward is the last one.
Activations travel with non-blocking sends and blocking receives, in micro-batch order in each direction
between a pair of ranks, which cannot deadlock; every floating-point activation sent forward gets a
gradient (zeros when unused) sent back.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from galvatron_fx.passes.lower_stage import StageModule

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


def _tag(micro_batch: int, index: int, backward: bool) -> int:
    return (_GRAD_TAG_OFFSET if backward else 0) + micro_batch * 256 + index


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
        for i, (spec, value) in enumerate(zip(self.stage.send_specs, outputs)):
            if tuple(value.shape) != spec.shape:
                raise RuntimeError(f"stage {self.stage.layout.stage} computed {spec.name} of shape {tuple(value.shape)}, "
                                   f"but the layer table says {spec.shape}")
            pending.append(dist.isend(value.detach().to(spec.dtype).contiguous(), self.next_rank, tag=_tag(mb, i, False)))
        return received, outputs

    def _backward(self, mb: int, saved: tuple, pending: list) -> None:
        received, outputs = saved
        if self.next_rank is None:
            torch.autograd.backward(outputs[0])
        else:
            grads = self._recv_grads(mb)
            pairs = [(out, grad.to(out.dtype)) for out, spec, grad in zip(outputs, self.stage.send_specs, grads)
                     if grad is not None and out.requires_grad]
            if pairs:
                torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs])
        if self.prev_rank is not None:
            for i, (spec, value) in enumerate(zip(self.stage.recv_specs, received)):
                if spec.dtype.is_floating_point:
                    grad = value.grad if value.grad is not None else torch.zeros_like(value)
                    pending.append(dist.isend(grad.detach().contiguous(), self.prev_rank, tag=_tag(mb, i, True)))

    # -- point to point ----------------------------------------------------------------------------------
    def _recv_activations(self, mb: int) -> list[torch.Tensor]:
        if self.prev_rank is None:
            return []
        buffers = [torch.empty(spec.shape, dtype=spec.dtype, device=self.device) for spec in self.stage.recv_specs]
        works = [dist.irecv(buf, self.prev_rank, tag=_tag(mb, i, False)) for i, buf in enumerate(buffers)]
        for work in works:
            work.wait()
        return [buf.requires_grad_() if buf.dtype.is_floating_point else buf for buf in buffers]

    def _recv_grads(self, mb: int) -> list[torch.Tensor | None]:
        grads: list[torch.Tensor | None] = []
        works = []
        for i, spec in enumerate(self.stage.send_specs):
            if spec.dtype.is_floating_point:
                buf = torch.empty(spec.shape, dtype=spec.dtype, device=self.device)
                works.append(dist.irecv(buf, self.next_rank, tag=_tag(mb, i, True)))
                grads.append(buf)
            else:
                grads.append(None)
        for work in works:
            work.wait()
        return grads
