"""Data parallelism per layer: DDP-style all-reduce, ZeRO-2 and ZeRO-3, and sums of tied weights' gradients.

Each layer of a stage follows its LayerStrategy on its data-parallel mesh:

- ``zero3``: FSDP2 ``fully_shard`` on the layer (parameters, gradients and optimizer states sharded;
  parameters gathered for forward and again for backward; the embedding and head, which run first and
  last, are one unit that stays gathered from forward to backward, as FSDP2's root does);
- ``zero2``: ``fully_shard`` with ``reshard_after_forward=False`` (parameters stay gathered from forward to
  backward; gradients and optimizer states sharded);
- ``ddp``: parameters replicated; gradients accumulate in flat buckets spanning consecutive layers (up
  to DDP's 25 MiB), each averaged by one all-reduce started during backward as soon as it is complete.

The stage module itself becomes the FSDP2 root over its ZeRO layers (it manages no parameter of its own).
One root shares one communication context across the layers: each layer's reduce-scatter input (its whole
unsharded gradient) is freed once the next layer's reduce-scatter is issued rather than at the end of
backward, and the next layer's all-gather is prefetched during the current layer's compute.

Sequence-parallel layers compute some gradients on sequence shards (their norms, say): partial sums over the
layer's tensor-parallel group, added up after the gradient synchronisation (``PartialGradSum``).

Weights that several layers use (GPT-2's ``wte``/``lm_head``, T5's shared embedding) are left out of
sharding and kept replicated where they may sit in layers with different strategies or on different
stages; a weight only the embedding and head of one stage use is sharded with them.
When they are on several stages, their gradients are summed over the ranks with the same local index on
those stages (Megatron's embedding group). Gradients are accumulated over micro-batches and synchronised
once per step, or after every micro-batch when ``plan.grad_sync_every_micro_batch``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from galvatron_fx.cost.memory import GRAD_BUCKET_CAP_BYTES
from galvatron_fx.passes.lower.ops.collectives import all_reduce_sum
from galvatron_fx.passes.lower.stage import StageModule, stage_layer_indices, unwrap
from galvatron_fx.plan import Plan
from galvatron_fx.program import EPILOGUE, PROLOGUE, Program, layer_meta, layers_using

from . import groups
from .shard_maps import local_tensor


class ReplicatedBucket:
    """The replicated parameters of consecutive layers on one data-parallel group of ``size`` ranks, whose
    gradients live in one flat buffer (DDP's ``gradient_as_bucket_view``).

    Before each step's first backward every ``.grad`` becomes a view of the zeroed buffer, so backward
    accumulates into it in place. In the backward that synchronises, the moment the last of these
    gradients is accumulated a hook starts the buffer's all-reduce asynchronously, so that it overlaps
    with the backward of the layers before; ``wait`` completes it and averages. A parameter that got no
    gradient in that backward holds the bucket back until ``wait``, which then launches it with its zeros.

    The buffer persists between steps (it is the gradients' storage), and no copy is made: a bucket may
    span layers (up to ``GRAD_BUCKET_CAP_BYTES``), which saves a collective's latency per layer.
    """

    def __init__(self, group: dist.ProcessGroup, size: int):
        self.group, self.size = group, size
        self.params: list[nn.Parameter] = []
        self.flat: torch.Tensor | None = None  # allocated at the first backward: parameters may be materialised late
        self._views: list[torch.Tensor] = []
        self._stash: torch.Tensor | None = None  # per-micro-batch mode: the averaged sums so far
        self._armed, self._ready, self._work = False, 0, None

    def add(self, param: nn.Parameter) -> None:
        self.params.append(param)
        param.register_post_accumulate_grad_hook(self._on_grad_accumulated)

    @property
    def nbytes(self) -> int:
        return _param_bytes(self.params)

    def arm(self, syncing: bool) -> None:
        """Called before each backward: whether this backward's gradients are to be all-reduced."""
        self._attach_views()
        self._armed, self._ready = syncing, 0

    def _attach_views(self) -> None:
        """Make every ``.grad`` a view of the buffer: after ``zero_grad(set_to_none=True)`` a zeroed one,
        a gradient set from outside is copied in."""
        if self.flat is None:
            self.flat = torch.zeros(
                sum(p.numel() for p in self.params), dtype=self.params[0].dtype, device=self.params[0].device
            )
            self._views = list(_unflatten_dense_tensors(self.flat, self.params))
        for param, view in zip(self.params, self._views):
            if param.grad is None:
                view.zero_()
            elif param.grad.data_ptr() != view.data_ptr():
                view.copy_(param.grad)
            else:
                continue
            param.grad = view

    def _on_grad_accumulated(self, param: nn.Parameter) -> None:
        if self._armed:
            self._ready += 1
            if self._ready == len(self.params):
                self._launch()

    def _launch(self) -> None:
        self._work = dist.all_reduce(self.flat, group=self.group, async_op=True)
        self._armed = False

    @property
    def in_flight(self) -> bool:
        """Whether this backward's all-reduce has started and not yet been waited for."""
        return self._work is not None

    def wait(self) -> None:
        """Finish this backward's all-reduce: every ``.grad`` of the bucket then holds the mean."""
        if self._work is None:
            self._launch()
        self._work.wait()
        self.flat /= self.size
        self._work = None

    def stash(self, last: bool) -> None:
        """Per-micro-batch mode, after ``wait``: set this micro-batch's averaged gradients aside (the next
        backward accumulates into a zeroed buffer), or after the last one add the earlier ones back."""
        if last:
            if self._stash is not None:
                self.flat += self._stash
            self._stash = None
        else:
            self._stash = self.flat.clone() if self._stash is None else self._stash.add_(self.flat)
            self.flat.zero_()


class PartialGradSum:
    """The parameters of one sequence-parallel layer whose gradients each rank computed on its own sequence
    shard (``LayerMeta.partial_grads``: norms, biases after row-parallel projections; under Ulysses every
    weight): partial sums over the layer's tensor-parallel ``ranks``, added up by one all-reduce of their
    flattened gradients after the step's gradient synchronisation (Megatron-LM's sum of sequence-parallel
    gradients), rather than one all-reduce per parameter and micro-batch inside backward. The data-parallel
    mean taken before is linear, so the order does not matter; a ZeRO layer's peers hold the same shard."""

    def __init__(self, ranks: tuple[int, ...], params: list[nn.Parameter]):
        self.ranks, self.params = ranks, params

    def sum_(self) -> None:
        for param in self.params:
            if param.grad is None:  # no gradient in this step (on every rank alike): sum zeros
                param.grad = torch.zeros_like(param)
        grads = [local_tensor(param.grad) for param in self.params]
        for dtype in dict.fromkeys(g.dtype for g in grads):
            same = [g for g in grads if g.dtype == dtype]
            summed = all_reduce_sum(_flatten_dense_tensors(same), self.ranks)
            for grad, total in zip(same, _unflatten_dense_tensors(summed, same)):
                grad.copy_(total)


@dataclass
class TiedWeight:
    name: str
    param: nn.Parameter
    group: dist.ProcessGroup


class GradSync:
    """Gradient synchronisation of one stage. The schedule calls ``before_backward`` and
    ``after_backward`` around each micro-batch's backward, and ``finish`` once after the last one."""

    def __init__(
        self,
        fsdp_units: list[FSDPModule],
        buckets: list[ReplicatedBucket],
        tied: list[TiedWeight],
        every_micro_batch: bool,
        partial: list[PartialGradSum] = (),
    ):
        self.fsdp_units = fsdp_units
        self.buckets = buckets
        self.tied = tied
        self.partial = list(partial)
        self.every_micro_batch = every_micro_batch

    def before_backward(self, last: bool) -> None:
        syncing = self.every_micro_batch or last
        for unit in self.fsdp_units:
            unit.set_requires_gradient_sync(syncing)
        for bucket in self.buckets:
            bucket.arm(syncing)

    def after_backward(self, last: bool) -> None:
        if not self.every_micro_batch:
            return
        for bucket in self.buckets:
            bucket.wait()
            bucket.stash(last)

    def finish(self) -> None:
        if not self.every_micro_batch:
            for bucket in self.buckets:
                bucket.wait()
        for layer in self.partial:
            layer.sum_()
        for weight in self.tied:
            if weight.param.grad is None:
                weight.param.grad = torch.zeros_like(weight.param)
            dist.all_reduce(weight.param.grad, group=weight.group)

    def reshard(self) -> None:
        """Free the gathered parameters a forward without backward leaves behind: FSDP2 keeps the root unit's
        parameters unsharded after forward (its backward would need them at once), and an evaluation has no
        backward. Until resharded, the module would expose the unsharded tensors as its parameters, which the
        optimizer and checkpoints do not know."""
        for unit in self.fsdp_units:
            unit.reshard()

    def grad_buffers(self) -> list[torch.Tensor]:
        """The buckets' flat gradient buffers: they persist between steps."""
        return [bucket.flat for bucket in self.buckets if bucket.flat is not None]

    def describe(self) -> str:
        return (
            f"{len(self.fsdp_units)} sharded units, {sum(len(b.params) for b in self.buckets)} replicated "
            f"parameters in {len(self.buckets)} all-reduce buckets, tied: {[w.name for w in self.tied]}, "
            f"sequence-parallel partial gradients of {len(self.partial)} layers"
        )


def tied_stages(program: Program, plan: Plan) -> dict[str, tuple[int, ...]]:
    """Shared parameter name → the stages that hold a copy (only those on more than one stage)."""
    stage_of = {index: stage for stage in range(plan.pp) for index in stage_layer_indices(program, plan, stage)}
    tied = {}
    for name, users in layers_using(program).items():
        stages = tuple(sorted({stage_of[i] for i in users}))
        if len(stages) > 1:
            tied[name] = stages
    return tied


def prepare_groups(program: Program, plan: Plan) -> None:
    """Create every group the plan needs, in the same order on every rank (group creation is collective)."""
    if plan.devices_per_stage > 1:
        for tp, consecutive in dict.fromkeys((layer.tp, layer.tp_consecutive) for layer in plan.layers):
            groups.world_mesh(plan, tp, consecutive)
        for grid in dict.fromkeys(layer for layer in plan.layers if layer.tp_mode != "1d"):
            groups.grid_mesh(plan, grid)
        groups.world_mesh(plan)  # prologue and epilogue
        groups.world_mesh(plan, plan.embedding.vtp)  # their vocab-parallel shards (the same mesh when vtp is 1)
    for stages in dict.fromkeys(tied_stages(program, plan).values()):
        groups.tied_group(plan, stages, 0)


def apply_data_parallel(stage: StageModule, program: Program, plan: Plan, mixed_precision: str = "fp32") -> GradSync:
    """Requires: ``prepare_groups`` ran on every rank. Ensures: ZeRO layers are FSDP2 modules on their dp
    mesh (the embedding and head of a stage one unit, as FSDP2's root holds both), all other parameters
    are in all-reduce buckets, tied weights know their cross-stage group. Under ``"bf16"`` ZeRO layers
    gather bf16 parameters and reduce fp32 gradients (``_ZERO_BF16``)."""
    users = layers_using(program)
    params = stage.user_parameters()
    fsdp_units: list[FSDPModule] = []
    replicated: list[tuple[dist.ProcessGroup, int, list[nn.Parameter]]] = []  # per layer, in forward order
    seen: set[int] = set()
    root_mesh = None
    for layers in _units(stage):
        strategy = layers[0].strategy
        indices = {layer.index for layer in layers}
        names = list(
            dict.fromkeys(n for layer in layers for n in program.layers[layer.index].param_names if n in params)
        )
        if strategy.dp == 1:  # one replica (a vocab shard, say): nothing to synchronise, and no later layer may
            seen.update(id(params[n]) for n in names)  # average this weight over a group that holds other shards
            continue
        mesh = groups.layer_mesh(plan, strategy)
        # a weight other layers use too (tied embedding and head on other stages, say) stays replicated
        outside = [n for n in names if not set(users[n]) <= indices]
        if strategy.dp_type in ("zero2", "zero3") and len(outside) < len(names):
            # Like FSDP2's root, the embedding and head stay gathered from forward to backward: they run
            # first and last, so resharding them would only gather them again (cost model: priced as ZeRO-2)
            reshard = strategy.dp_type == "zero3" and layers[0].kind not in (PROLOGUE, EPILOGUE)
            modules = [stage.layers[layer.name] for layer in layers]
            fully_shard(
                modules if len(modules) > 1 else modules[0],
                mesh=mesh,
                reshard_after_forward=reshard,
                ignored_params={params[n] for n in outside},
                mp_policy=_ZERO_BF16 if mixed_precision == "bf16" else MixedPrecisionPolicy(),
            )
            fsdp_units += modules
            root_mesh = root_mesh or mesh
            names = outside
        mine = [params[n] for n in names if id(params[n]) not in seen]
        seen.update(id(p) for p in mine)
        if mine:
            replicated.append((mesh.get_group(), strategy.dp, mine))
    if fsdp_units:
        sharded = {id(p) for unit in fsdp_units for p in unit.parameters() if isinstance(p, DTensor)}
        fully_shard(stage, mesh=root_mesh, ignored_params={p for p in stage.parameters() if id(p) not in sharded})
    tied = [
        TiedWeight(name, params[name], groups.tied_group(plan, stages, stage.position.local))
        for name, stages in sorted(tied_stages(program, plan).items())
        if name in params
    ]
    return GradSync(fsdp_units, bucket_layers(replicated), tied, plan.grad_sync_every_micro_batch, _partial_sums(stage))


def _partial_sums(stage: StageModule) -> list[PartialGradSum]:
    """The sequence-parallel layers' partial gradients, as their parameters are after sharding (FSDP2 registers
    its DTensors under the same names)."""
    out = []
    for layer in stage.stage_layers:
        module = unwrap(stage.layers[layer.name])
        partial = layer_meta(module).partial_grads
        for ranks in dict.fromkeys(partial.values()):
            out.append(PartialGradSum(ranks, [module.get_parameter(t) for t, r in partial.items() if r == ranks]))
    return out


# bf16 ZeRO, as the cost model prices it (cost/memory.py): the fp32 shards are the master copy, all-gathers
# move bf16 and the layer computes on the bf16 copy, its inputs cast to bf16 too (ops such as CPU layer
# norms refuse fp32 inputs with bf16 weights); gradients are reduced and accumulated in fp32, so that
# small updates survive.
_ZERO_BF16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def _units(stage: StageModule) -> list[list]:
    """The stage's layers grouped as they synchronise, in forward order (the first to use a weight owns it):
    each layer alone, except that a ZeRO embedding and head of one stage form one FSDP2 unit (they share a
    strategy and run first and last; DDP keeps them apart, so that the head's gradients need not wait for
    the embedding's backward)."""
    units, ends = [], []
    for layer in stage.stage_layers:
        if layer.kind in (PROLOGUE, EPILOGUE) and layer.strategy.dp > 1 and layer.strategy.dp_type != "ddp":
            if not ends:
                units.append(ends)  # the unit sits where the embedding does; the head joins it
            ends.append(layer)
        else:
            units.append([layer])
    return units


def bucket_layers(
    replicated: list[tuple[dist.ProcessGroup, int, list[nn.Parameter]]], cap_bytes: int = GRAD_BUCKET_CAP_BYTES
) -> list[ReplicatedBucket]:
    """Buckets over consecutive layers' replicated parameters (``(group, size, params)`` per layer, in
    forward order) that share a group, filled in backward order up to ``cap_bytes`` (a layer above the cap
    gets a bucket of its own): the last layers' bucket is ready first, as in DDP."""
    buckets: list[ReplicatedBucket] = []
    for group, size, params in reversed(replicated):
        bucket = buckets[-1] if buckets else None
        nbytes = _param_bytes(params)
        same_kind = bucket is not None and bucket.group is group and bucket.params[0].dtype == params[0].dtype
        if not same_kind or bucket.nbytes + nbytes > cap_bytes:
            bucket = ReplicatedBucket(group, size)
            buckets.append(bucket)
        for param in params:
            bucket.add(param)
    return buckets


def _param_bytes(params: list[nn.Parameter]) -> int:
    return sum(p.numel() * p.element_size() for p in params)
