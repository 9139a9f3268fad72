"""The executor of one stage's part of a training step: forwards and backwards of micro-batches, the
point-to-point traffic with the neighbouring stages as ``runtime.schedules.transfer_plan`` groups it, and
the gradient-sync calls of ``GradSync``.

We run our own executor rather than ``torch.distributed.pipelining``: stages here receive batch inputs
(labels, T5's decoder ids) besides activations, pass integer and boolean tensors (masks) that carry no
gradient, and must tell the per-layer data-parallel wrappers which backward is the last one. Each transfer
is one message: the values crossing a cut packed into one byte buffer (one latency per micro-batch and
direction, not one per value); gradients travel back only for values that can carry one
(``StageModule.grad_names``: the rotary tables and masks a cut also carries do not), zeros where the
receiving stage left one unused. Under bf16 mixed precision floating-point values travel as bf16 (half
the bytes, as the cost model prices them) and are restored to the captured dtype on arrival, so that a
stage computes as it would without the cut but for that rounding. Every message goes through
``dist.batch_isend_irecv``, in the groups the transfer plan says, so the same code is safe under NCCL
and gloo.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
import torch.distributed as dist

from galvatron_fx.passes.lower.stage import StageModule
from galvatron_fx.program import TensorSpec

from .data_parallel import GradSync
from .schedules import Action, Post, Run, Transfer, WaitAll, WaitSends, transfer_plan

_GRAD_TAG_OFFSET = 1 << 20  # gradients use their own tag range (gloo matches messages by peer and tag)
_SEND, _RECEIVE = dist.isend, dist.irecv  # only ever posted in groups (P2POp), never called alone


class StageExecutor:
    """Runs one stage's actions for a step (see the module docstring)."""

    def __init__(
        self,
        stage: StageModule,
        sync: GradSync,
        chunks: int,
        device: torch.device,
        low_precision: torch.dtype | None = None,
    ):
        self.stage = stage
        self.sync = sync
        self.chunks = chunks
        self.device = device
        self.low_precision = low_precision  # autocast's dtype, and that of floating-point messages
        position = stage.position
        self.peers = {
            "prev": position.rank_of(position.stage - 1) if not position.is_first else None,
            "next": position.rank_of(position.stage + 1) if not position.is_last else None,
        }

    def run(
        self, actions: tuple[Action, ...], batches: list[dict[str, Any]], seeds: list[int | None]
    ) -> list[torch.Tensor]:
        """Execute ``actions``; ``batches[i]`` holds micro-batch i's batch inputs. Returns the loss of each
        micro-batch on the last stage (detached), nothing elsewhere."""
        step = _Step()
        for event in transfer_plan(actions, self.peers["prev"] is None, self.peers["next"] is None):
            if isinstance(event, Run):
                self._run(event.action, batches, seeds, step)
            elif isinstance(event, Post):
                self._post(event, step)
            elif isinstance(event, WaitSends):
                step.wait_sends(event.peer)
            elif isinstance(event, WaitAll):
                step.wait_sends("prev"), step.wait_sends("next")
        return step.losses

    # -- communication -------------------------------------------------------------------------------------
    def _specs(self, transfer: Transfer) -> tuple[TensorSpec, ...]:
        """The values of ``transfer`` as the stages compute them."""
        if transfer.kind == "act":
            return self.stage.send_specs if transfer.send else self.stage.recv_specs
        cut = self.stage.recv_specs if transfer.send else self.stage.send_specs
        return tuple(spec for spec in cut if spec.name in self.stage.grad_names)

    def _wire_specs(self, transfer: Transfer) -> tuple[TensorSpec, ...]:
        """The values of ``transfer`` as they travel: floating point in ``low_precision`` when set."""
        return tuple(
            dataclasses.replace(spec, dtype=self.low_precision)
            if self.low_precision and spec.dtype.is_floating_point
            else spec
            for spec in self._specs(transfer)
        )

    def _pack(self, transfer: Transfer, values: list[torch.Tensor]) -> torch.Tensor:
        return pack([value.detach().to(spec.dtype) for spec, value in zip(self._wire_specs(transfer), values)])

    def _unpack(self, transfer: Transfer, buffer: torch.Tensor) -> list[torch.Tensor]:
        wire = unpack(buffer, self._wire_specs(transfer))
        return [value.to(spec.dtype) for spec, value in zip(self._specs(transfer), wire)]

    def _post(self, post: Post, step: "_Step") -> None:
        ops, receives = [], []
        for transfer in post.transfers:
            peer, tag = (
                self.peers[transfer.peer],
                transfer.micro_batch + (_GRAD_TAG_OFFSET if transfer.kind == "grad" else 0),
            )
            if transfer.send:
                ops.append(dist.P2POp(_SEND, step.outgoing.pop(transfer), peer, tag=tag))
            else:
                buffer = torch.empty(packed_bytes(self._wire_specs(transfer)), dtype=torch.uint8, device=self.device)
                ops.append(dist.P2POp(_RECEIVE, buffer, peer, tag=tag))
                receives.append((transfer, buffer))
        works = dist.batch_isend_irecv(ops) if ops else []
        if post.blocking:
            for work in works:  # the whole group, its sends included: the peer has posted their receives
                work.wait()
            for transfer, buffer in receives:
                step.incoming[transfer] = self._unpack(transfer, buffer)
        else:
            step.lone_sends[post.transfers[0].peer].extend(works)

    # -- one micro-batch -------------------------------------------------------------------------------
    def _run(self, action: Action, batches: list[dict[str, Any]], seeds: list[int | None], step: "_Step") -> None:
        mb = action.micro_batch
        if action.kind == "F":
            step.saved[mb] = self._forward(mb, batches[mb], seeds[mb], step)
            return
        last = step.backwards_done == self.chunks - 1
        self.sync.before_backward(last)
        self._backward(mb, step.saved.pop(mb), step)
        self.sync.after_backward(last)
        step.backwards_done += 1

    def _forward(self, mb: int, batch: dict[str, Any], seed: int | None, step: "_Step") -> tuple:
        received = []
        if self.peers["prev"] is not None:
            values = step.incoming.pop(Transfer("act", mb, send=False))
            received = [
                v.requires_grad_() if spec.name in self.stage.grad_names else v
                for spec, v in zip(self.stage.recv_specs, values)
            ]
        env = {name: batch[name] for name in self.stage.batch_names}
        env.update(zip((s.name for s in self.stage.recv_specs), received))
        autocast = (
            torch.autocast(self.device.type, dtype=self.low_precision)
            if self.low_precision
            else contextlib.nullcontext()
        )
        with autocast:
            outputs = self.stage(env, seed=seed)
        if self.peers["next"] is None:
            loss = outputs[0]
            step.losses.append(loss.detach().float())
            return received, [loss / self.chunks]
        self._check_sent(outputs)
        sent = Transfer("act", mb, send=True)
        step.outgoing[sent] = self._pack(sent, outputs)
        return received, outputs

    def _check_sent(self, outputs: list[torch.Tensor]) -> None:
        for spec, value in zip(self.stage.send_specs, outputs):
            if tuple(value.shape) != spec.shape:
                raise RuntimeError(
                    f"stage {self.stage.position.stage} computed {spec.name} of shape {tuple(value.shape)}, "
                    f"but the layer table says {spec.shape}"
                )
            if value.requires_grad and spec.name not in self.stage.grad_names:  # its gradient would be lost
                raise RuntimeError(
                    f"stage {self.stage.position.stage} sends {spec.name}, which requires a gradient, but "
                    "the graph analysis (differentiable_names) says it cannot carry one"
                )

    def _backward(self, mb: int, saved: tuple, step: "_Step") -> None:
        received, outputs = saved
        if self.peers["next"] is None:
            torch.autograd.backward(outputs[0])
        else:
            specs = self._specs(Transfer("grad", mb, send=False))
            grads = (
                dict(zip((s.name for s in specs), step.incoming.pop(Transfer("grad", mb, send=False)))) if specs else {}
            )
            pairs = [
                (out, grads[spec.name].to(out.dtype))
                for out, spec in zip(outputs, self.stage.send_specs)
                if spec.name in grads and out.requires_grad
            ]
            if pairs:
                torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs])
        if self.peers["prev"] is not None:
            grads = [
                value.grad if value.grad is not None else torch.zeros_like(value)
                for spec, value in zip(self.stage.recv_specs, received)
                if spec.name in self.stage.grad_names
            ]
            sent = Transfer("grad", mb, send=True)
            step.outgoing[sent] = self._pack(sent, grads)


class _Step:
    """What one step's executor holds: payloads to send and received ones by transfer, forwards waiting for
    their backward, lone sends in flight per peer, the losses."""

    def __init__(self):
        self.outgoing: dict[Transfer, torch.Tensor] = {}
        self.incoming: dict[Transfer, list[torch.Tensor]] = {}
        self.saved: dict[int, tuple] = {}
        self.lone_sends: dict[str, list] = {"prev": [], "next": []}
        self.losses: list[torch.Tensor] = []
        self.backwards_done = 0

    def wait_sends(self, peer: str) -> None:
        for work in self.lone_sends[peer]:
            work.wait()
        self.lone_sends[peer].clear()


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
    return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.uint8)


def unpack(buffer: torch.Tensor, specs: tuple[TensorSpec, ...]) -> list[torch.Tensor]:
    """The values ``pack`` wrote, as views of ``buffer`` with the shapes and dtypes of ``specs``."""
    values, offset = [], 0
    for spec in specs:
        values.append(buffer[offset : offset + spec.nbytes].view(spec.dtype).view(spec.shape))
        offset += _padded(spec.nbytes)
    return values
