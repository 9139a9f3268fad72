"""The communication a plan implies: each layer's collectives, redistributions between layers, pipeline transfers.

These mirror the cost model's terms (cost/model.py) so that what the page shows is what was priced:
- TP (Megatron): 2 all-reduces of the hidden state in forward, 2 in backward; a grid ``tp_mode`` (2D, 2.5D, 3D):
  its row, pairs, column and depth collectives as ``cost.grid_tp`` counts them;
- Megatron-SP: 2 all-gathers + 2 reduce-scatters each way; Ulysses: 4 all-to-alls of ``hidden / tp`` each way;
- gradient sync over the ``dp`` replicas, once per step: DDP all-reduce; ZeRO-2 reduce-scatter of gradients
  and all-gather of the updated parameters; ZeRO-3 the same, plus a parameter all-gather in forward and
  again in backward of every micro-batch;
- vocab TP of the embedding / head: one all-reduce each way; under vsp none on the hidden state (it moves
  between the sequence-split layout and the body's as a redistribution), two scalar all-reduces of the loss
  (target count, value) over the vtp group, whole weights synchronised over the stage.
A collective's ``bytes_per_call`` is the tensor handed to it (the gathered output for all-gather), as in
cost/hardware.py; ``time_s`` covers all ``count`` calls and is None without a cost model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from galvatron_fx.cost.grid_tp import LayerShape, group_fit, tp_terms
from galvatron_fx.cost.layouts import layout_of, rank_pieces
from galvatron_fx.cost.memory import COMPUTE_BYTES_PER_PARAM, STATE_BYTES_PER_PARAM
from galvatron_fx.parallel_dims import activation_strategy
from galvatron_fx.plan import EmbeddingStrategy, LayerStrategy

SHORT_OP = {"all_reduce": "AR", "all_gather": "AG", "reduce_scatter": "RS", "all_to_all": "A2A", "send_recv": "P2P"}


@dataclass(frozen=True)
class Collective:
    """One kind of communication call a layer (or a boundary) makes."""

    op: str  # all_reduce | all_gather | reduce_scatter | all_to_all | send_recv
    purpose: str  # tp | megatron_sp | ulysses | ddp | zero2 | zero3 | vtp | vsp | redistribution | pipeline
    group_size: int
    consecutive: bool
    phase: str  # forward | backward (per micro-batch) | step (once per iteration)
    count: int
    bytes_per_call: int
    time_s: float | None = None

    def label(self) -> str:
        """A compact badge such as ``AR×2 tp g2 fwd``: op, calls, purpose, group of 2 ranks, phase."""
        phase = {"forward": "fwd", "backward": "bwd", "step": "step"}[self.phase]
        return f"{SHORT_OP[self.op]}×{self.count} {self.purpose} g{self.group_size} {phase}"


def _timed(hardware, op: str, nbytes: float, group: int, consecutive: bool, count: int) -> float | None:
    if hardware is None:
        return None
    return count * hardware.collective_s(op, nbytes, group, consecutive)


def tp_collectives(
    tp: int,
    sp: str,
    consecutive: bool,
    hidden_bytes: float,
    hardware=None,
    calls_per_pass: int = 2,
    recomputed: bool = False,
) -> list[Collective]:
    """Intra-layer collectives of a TP / Megatron-SP / Ulysses group on a hidden state of ``hidden_bytes``
    (Megatron-SP's backward gathers its projections' inputs again, unless the layer is ``recomputed``)."""
    if tp <= 1:
        return []
    if sp == "none":
        plan = [("all_reduce", "tp", hidden_bytes, calls_per_pass)]
    elif sp == "megatron":
        plan = [
            ("all_gather", "megatron_sp", hidden_bytes, calls_per_pass),
            ("reduce_scatter", "megatron_sp", hidden_bytes, calls_per_pass),
        ]
    else:
        plan = [("all_to_all", "ulysses", hidden_bytes / tp, 2 * calls_per_pass)]
    regathers = 0 if sp != "megatron" or recomputed else calls_per_pass
    plan_of = {
        "forward": plan,
        "backward": [(op, p, b, n + (regathers if op == "all_gather" else 0)) for op, p, b, n in plan],
    }
    return [
        Collective(
            op,
            purpose,
            tp,
            consecutive,
            phase,
            count,
            int(nbytes),
            _timed(hardware, op, nbytes, tp, consecutive, count),
        )
        for phase in ("forward", "backward")
        for op, purpose, nbytes, count in plan_of[phase]
    ]


def dp_collectives(
    dp: int, dp_type: str, consecutive: bool, params: float, mixed_precision: str = "fp32", hardware=None
) -> list[Collective]:
    """Gradient synchronisation (and ZeRO-3 parameter gathers) of ``params`` parameters over ``dp`` replicas."""
    if dp <= 1:
        return []
    # ZeRO gathers the copy layers compute on (bf16 under mixed precision) and reduces fp32 gradients
    grads = params * STATE_BYTES_PER_PARAM[mixed_precision][1]
    weights = params * COMPUTE_BYTES_PER_PARAM[mixed_precision]
    if dp_type == "ddp":
        plan = [("all_reduce", "step", grads)]
    elif dp_type == "zero2":
        plan = [("reduce_scatter", "step", grads), ("all_gather", "step", weights)]
    else:
        plan = [
            ("all_gather", "forward", weights),
            ("all_gather", "backward", weights),
            ("reduce_scatter", "step", grads),
        ]
    return [
        Collective(
            op, dp_type, dp, consecutive, phase, 1, int(nbytes), _timed(hardware, op, nbytes, dp, consecutive, 1)
        )
        for op, phase, nbytes in plan
    ]


def layer_collectives(
    strategy: LayerStrategy,
    hidden_bytes: float,
    param_count: int,
    *,
    mixed_precision: str = "fp32",
    hardware=None,
    hidden_features: int | None = None,
) -> list[Collective]:
    """Everything a body layer running ``strategy`` communicates (``hidden_bytes`` for one micro-batch, of
    ``hidden_features`` features per token: a grid ``tp_mode`` needs them)."""
    local_hidden = hidden_bytes / strategy.dp
    if strategy.tp_mode != "1d":
        return _grid_collectives(strategy, local_hidden, param_count, mixed_precision, hardware, hidden_features)
    params = param_count if strategy.sp == "ulysses" else param_count / strategy.tp
    dp_consecutive = not strategy.tp_consecutive or strategy.tp == 1
    tp = tp_collectives(strategy.tp, strategy.sp, strategy.tp_consecutive, local_hidden, hardware, 2, strategy.ckpt)
    return tp + dp_collectives(strategy.dp, strategy.dp_type, dp_consecutive, params, mixed_precision, hardware)


def _grid_collectives(
    strategy: LayerStrategy, local_hidden: float, param_count: int, mixed_precision: str, hardware, features
) -> list[Collective]:
    """A grid layer's collectives as the cost model counts them (``cost.grid_tp.tp_terms``), by group."""
    features = features or 1
    shape = LayerShape(local_hidden / features, features, 1.0, float(param_count), 0.0)
    terms = tp_terms(strategy, shape, mixed_precision)
    found = []
    for phase, collectives in (("forward", terms.forward), ("backward", terms.backward)):
        for c in collectives:
            if c.size <= 1 or c.nbytes <= 0:
                continue
            per_call = c.nbytes / c.calls
            time_s = (
                None if hardware is None else c.calls * group_fit(hardware, c.op, c.size, c.stride).time_s(per_call)
            )
            found.append(
                Collective(
                    c.op, f"{strategy.tp_mode}-{c.group}", c.size, c.stride == 1, phase, c.calls, int(per_call), time_s
                )
            )
    return found + dp_collectives(strategy.dp, strategy.dp_type, False, terms.stored_params, mixed_precision, hardware)


def embedding_collectives(
    embedding: EmbeddingStrategy,
    devices: int,
    part: str,
    hidden_bytes: float,
    param_count: int,
    vocab_param_count: int,
    *,
    mixed_precision: str = "fp32",
    hardware=None,
) -> list[Collective]:
    """The embedding (``part="prologue"``) or head (``"epilogue"``) under vocab TP (or vsp) and its data
    parallelism (the ids' and labels' moves under vsp, a few bytes per token, are left out)."""
    vtp, vsp = embedding.vtp, embedding.vsp and embedding.vtp > 1
    split = 1 if vsp else vtp  # vsp keeps the weights whole
    dp = devices if vsp else max(devices // vtp, 1)
    local_hidden = hidden_bytes / max(devices // vtp, 1)
    found: list[Collective] = []
    if vsp and part != "prologue":
        time_s = None if hardware is None else 2 * hardware.collective_s("all_reduce", 4, vtp)
        found.append(Collective("all_reduce", "vsp", vtp, True, "forward", 2, 4, time_s))
    elif vtp > 1 and not vsp:
        phase = "forward" if part == "prologue" else "backward"  # embedding output forward, head input-grad backward
        found += [
            dataclasses.replace(c, purpose="vtp")
            for c in tp_collectives(vtp, "none", True, local_hidden, hardware, calls_per_pass=1)
            if c.phase == phase
        ]
    params = param_count - vocab_param_count + vocab_param_count / split
    found += dp_collectives(dp, embedding.data_parallel_type, split == 1, params, mixed_precision, hardware)
    return found


# -- redistribution between layers --------------------------------------------------------------------
def _pieces(strategy: LayerStrategy) -> list[tuple]:
    """Per rank of the stage: the (batch, sequence, features) fractions it holds of an activation."""
    rows = activation_strategy(strategy)
    return rank_pieces(rows, rows.devices, strategy.tp_mode != "1d")


def redistribution_op(before: LayerStrategy, after: LayerStrategy) -> str | None:
    """How activations move from ``before``'s layout to ``after``'s: None (every rank keeps the same piece),
    ``slice`` (every rank already holds what it needs), ``all_gather`` (every rank's piece grows) or
    ``all_to_all``."""
    if layout_of(before) == layout_of(after):
        return None
    held, needed = _pieces(before), _pieces(after)
    if held == needed:  # e.g. replicated activations under consecutive vs strided TP: nothing moves
        return None

    def inside(inner, outer):
        return all(o0 <= i0 and i1 <= o1 for (i0, i1), (o0, o1) in zip(inner, outer))

    if all(inside(n, h) for h, n in zip(held, needed)):
        return "slice"
    if all(inside(h, n) for h, n in zip(held, needed)):
        return "all_gather"
    return "all_to_all"
