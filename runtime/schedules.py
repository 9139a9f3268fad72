"""Pipeline schedules (GPipe, 1F1B) and the point-to-point traffic each stage's schedule implies.

A schedule is the list of actions one stage takes: ``F i`` (forward micro-batch i) and ``B i`` (its
backward). GPipe runs every forward, then every backward; 1F1B (PipeDream-flush) runs ``pp - stage - 1``
warm-up forwards, then alternates one forward and one backward, then drains the backwards. Both run the
backwards in micro-batch order, so the last backward is always micro-batch ``chunks - 1``.

``transfer_plan`` turns a stage's actions into the events the executor (``runtime.executor``) follows. NCCL
runs a pair of ranks' sends and receives on one stream and requires concurrent ones to be posted together
(``dist.batch_isend_irecv``), or large messages can block each other; so a send is held until the stage next
receives and posted in one group with that receive (Megatron's ``send_forward_recv_backward`` and
``send_backward_recv_forward``), or posted alone right away when the next action receives nothing. Before a
group receives from a peer, the stage waits for its earlier lone sends to that peer: the peer receives those
before it sends anything this stage waits for, so the wait never blocks for long, and a send and a receive
with the same peer are never outstanding in two groups. Messages between two stages go in micro-batch order
in each direction, which is how NCCL matches them (it ignores tags); ``tests/test_runtime_schedules.py``
replays every stage's plan against a model of those semantics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Action:
    kind: Literal["F", "B"]
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


# -- point-to-point traffic ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Transfer:
    """One message: the activations of a micro-batch (``act``, to the next stage) or their gradients (``grad``,
    to the previous one), sent or received."""

    kind: Literal["act", "grad"]
    micro_batch: int
    send: bool

    @property
    def peer(self) -> Literal["next", "prev"]:
        return "next" if (self.kind == "act") == self.send else "prev"


@dataclass(frozen=True)
class Post:
    """Post ``transfers`` as one group; a group that receives is waited for at once (``blocking``)."""

    transfers: tuple[Transfer, ...]

    @property
    def blocking(self) -> bool:
        return any(not t.send for t in self.transfers)


@dataclass(frozen=True)
class WaitSends:
    """Wait for the lone sends posted earlier to ``peer``."""

    peer: Literal["next", "prev"]


@dataclass(frozen=True)
class Run:
    action: Action


@dataclass(frozen=True)
class WaitAll:
    """Wait for every send still outstanding (the step's end)."""


Event = Post | WaitSends | Run | WaitAll


def _receives(action: Action, first: bool, last: bool) -> Transfer | None:
    if action.kind == "F":
        return None if first else Transfer("act", action.micro_batch, send=False)
    return None if last else Transfer("grad", action.micro_batch, send=False)


def _sends(action: Action, first: bool, last: bool) -> Transfer | None:
    if action.kind == "F":
        return None if last else Transfer("act", action.micro_batch, send=True)
    return None if first else Transfer("grad", action.micro_batch, send=True)


def transfer_plan(actions: tuple[Action, ...], first: bool, last: bool) -> list[Event]:
    """The events of one stage's step (see the module docstring); ``first`` / ``last``: the stage has no
    previous / next stage."""
    events: list[Event] = []
    held: list[Transfer] = []
    for k, action in enumerate(actions):
        receive = _receives(action, first, last)
        if receive is not None:
            events += [WaitSends(receive.peer), Post((*held, receive))]
            held = []
        events.append(Run(action))
        send = _sends(action, first, last)
        if send is not None:
            held.append(send)
        upcoming = _receives(actions[k + 1], first, last) if k + 1 < len(actions) else None
        if held and upcoming is None:  # nothing to receive next: send now, alone
            events.append(Post(tuple(held)))
            held = []
    return [*events, WaitAll()]
