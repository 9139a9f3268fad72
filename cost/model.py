"""CostModel: (layer type, LayerStrategy, micro-batch) → time and memory on one device; Plan → Prediction.

Terms of one layer, for a micro-batch of ``mb`` samples on a stage (each of the ``dp`` replicas runs
``mb / dp`` samples, each TP rank ``1 / tp`` of the compute):
- compute: the profile's forward and backward formulas at ``mb / dp`` samples, divided by ``tp`` except
  their batch-independent part (per-call overhead, which every TP rank pays whole);
  checkpointing adds the forward (compute and TP collectives) again to the backward. A measured profile
  was timed on one process: where processes share CPU cores they compute slower together than alone, by
  the hardware's ``compute_slowdown`` when every rank computes. A pipeline's ranks compute only for their
  ``busy_share`` = c / (c + pp − 1) of the step (the rest is bubble): that share of the ranks computes at
  once on average and shares the cores, so the slowdown is max(1, compute_slowdown · busy_share). An
  analytic profile is priced at the hardware's sustained throughput, which profile-hardware measures on
  every rank at once: its times hold the whole slowdown, and a pipeline's take max(1, compute_slowdown ·
  busy_share) / compute_slowdown of them (before, they kept the whole slowdown in pipelines too, and an
  out-of-sample LLaMA pp4 read +146 %). An analytic profile's formulas price fused attention's FLOPs at the
  matmuls' rate; where the hardware profile has attention's own line (a cost per call and a rate, per pass
  and dtype: cost/step_probe.py) they are priced on it instead (``attention_repriced_s``): on CPUs the bf16
  attention backward runs at a fraction of fp32's rate, where a bf16 matmul rate priced it faster.
- TP collectives on the hidden state ``h`` = boundary bytes × ``mb / dp``: Megatron 2 all-reduces in
  forward and 2 in backward; Megatron-SP 2 all-gathers + 2 reduce-scatters each way; Ulysses 4
  all-to-alls of ``h / tp`` each way (q, k, v in, output back). Where the profile timed the lowered
  layer on every rank of this world at once (``LayerTypeProfile.in_place_times``: Megatron TP, or none,
  the embedding and the head without vocab TP), that one figure replaces the layer's compute and
  collectives: it holds the contention and the waits for peers that processes sharing cores add.
- a sequence-parallel layer's gradients computed on sequence shards (norms and biases; under Ulysses every
  weight) are partial sums over its tp group: one all-reduce of them per step, after the gradient sync.
- gradient sync over the ``dp`` group on the device's gradient bytes: DDP all-reduce (buckets span layers:
  a layer pays its share of a bucket's latency, and the ranks' drift over its compute, which they wait out
  at that all-reduce: they meet nowhere else in the step); ZeRO-2 reduce-scatter plus the all-gather of updated
  parameters; ZeRO-3 reduce-scatter, and a parameter all-gather in forward and again in backward.
  Communication overlapped with compute (grad sync with the backward, ZeRO-3 gathers with the layer's
  compute, as with prefetching) is hidden up to the compute time, and the hidden part costs
  ``overlap_slowdown − 1`` of itself.
- optimizer step: the parameters the device updates (its ZeRO shard) × the hardware's measured
  ``optimizer_s_per_param`` (the gradient norm's pass and the Adam step); it follows the gradient sync, so it
  is counted in ``grad_sync_s`` (0 for profiles without the figure: presets and Galvatron's files). So are the
  step's blocking collectives after it: the gradient norm's and the loss's all-reduces over the world, and a
  tied embedding/head gradient between a pipeline's first and last stages.
- memory: model states (cost/memory.py: 16 bytes/param, fp32 masters under bf16 too; ZeRO shards), the
  activations one micro-batch keeps (the layer's inputs only, if checkpointed), by phase of the step
  (cost/memory.py ``InFlight``: gradients do not exist before the first backward, except in DDP's
  persistent buckets; the predicted peak walks the stage's backward layer by layer, the search budgets an
  additive bound on it), and transient peaks of the layer in backward: the activation gradients its backward
  holds, net of the activations it has freed (the profile's ``grad_working_bytes_per_sample``; the
  embedding's and the head's too, the head's at the start of a stage's backward); FSDP2 holds a ZeRO layer's gathered
  parameters and the next layer's prefetched ones (ZeRO-3), and the layer's unsharded gradients next to
  the previous layer's, whose reduce-scatter is in flight (ZeRO-2 and -3); a checkpointed layer's
  recomputed activations; a DDP layer's backward that finds a stored gradient (every backward with
  persistent buckets, a step's later ones without) holds the new gradient of its largest weight before
  adding it. ZeRO-2 keeps the gathered parameters from forward to backward besides their
  shard. The default optimizer's step holds no temporaries: fused Adam on GPUs, and on CPU single-tensor
  Adam, whose temporaries are one tensor's at a time.
Precision: activation and hidden-state bytes are rescaled from the profile's dtype to the training
dtype (bf16 halves fp32 bytes; so do pipeline messages, which travel in bf16); ZeRO gathers bf16
parameters and reduces fp32 gradients; a replicated layer under bf16 autocast keeps a bf16 cast of its
weights per micro-batch in flight (``autocast_cast_bytes``), unless it is checkpointed: then the casts are
made again by its recomputation and count with that transient. Tied weights shared by embedding and head
count once per stage. A stage holding both the embedding and the head takes their activations from the
profile's one-stage figure where it has one (``cost.embedding_cost.embedding_activation_per_sample``).

Where the terms live: this module prices a layer's compute and puts its terms together (``layer_cost``); data
parallelism's in cost/data_parallel_cost.py, tensor and sequence parallelism's in cost/tensor_parallel_cost.py,
grid layers' in cost/grid_tp.py, the embedding's and head's in cost/embedding_cost.py, and the whole plan's
(pipeline formula, moves between layers and stages, the memory walk) in cost/plan_cost.py.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from galvatron_fx.errors import ConfigError
from galvatron_fx.plan import EmbeddingStrategy, LayerStrategy, Plan, Prediction

from .data_parallel_cost import ddp_drift_s, dp_comm, model_states, optimizer_s, visible_s
from .embedding_cost import ONE_STAGE_ACTIVATION as ONE_STAGE_ACTIVATION  # also importable from here, as before
from .embedding_cost import ends_cost
from .grid_tp import ROW_GATHERS, grid_layer_cost
from .hardware import HardwareProfile
from .layer_cost import LayerCost as LayerCost  # also importable from here, as before
from .layer_type_profile import LayerTypeProfile
from .memory import (
    COMPUTE_BYTES_PER_PARAM,
    DTYPE_BYTES,
    InFlight,
    check_precision,
)
from .model_profile import ModelProfile
from .plan_cost import evaluate_plan, p2p_s, redistribution_s
from .tensor_parallel_cost import in_place_s, partial_grad_sum_s, tp_comm_s


class CostModel:
    """Predicts per-layer costs and whole-plan iteration time and memory (see module docstring)."""

    def __init__(
        self,
        model: ModelProfile,
        hardware: HardwareProfile,
        *,
        mixed_precision: str = "fp32",
        optimizer: str = "adam",
        seq: int | None = None,
    ):
        check_precision(mixed_precision)
        if optimizer != "adam":
            raise ConfigError(f"optimizer={optimizer!r} has no memory model", "use optimizer='adam'")
        # seq: price another sequence length than the profile's own (a sequence-mode profile; ModelProfile.at_seq)
        model = model.at_seq(seq) if seq is not None else model
        self.model, self.hardware = model, hardware
        self.mixed_precision, self.optimizer = mixed_precision, optimizer
        self.layer_types: list[str] = list(model.layer_types)
        self.compute_dtype = compute_dtype = "bf16" if mixed_precision == "bf16" else "fp32"
        self.activation_scale = DTYPE_BYTES[compute_dtype] / DTYPE_BYTES.get(model.dtype, 4)
        # An analytic profile priced in one dtype is re-priced at the training dtype's throughput.
        self.time_scale, self.cast_s_per_param = 1.0, 0.0
        if model.mode == "analytic" and model.dtype != compute_dtype:
            have, want = hardware.flops_per_s.get(model.dtype), hardware.flops_per_s.get(compute_dtype)
            if have and want:
                self.time_scale = have / want
            if compute_dtype == "bf16":  # autocast casts the weights at each forward, which FLOPs do not count
                self.cast_s_per_param = hardware.autocast_cast_s_per_param
        # processes sharing cores slow each other's compute (cost/hardware.py); analytic times already
        # describe one device of the cluster
        # analytic times (FLOPs over the throughput profile-hardware measures on every rank at once) hold the
        # slowdown of all ranks computing; where fewer do (pipeline bubbles), they take the contention left
        self.compute_slowdown = hardware.compute_slowdown if model.mode in ("measured", "analytic") else 1.0
        self.throughput_slowdown = self.compute_slowdown if model.mode == "analytic" else 1.0
        self.seq = model.seq_length
        self.overlap = hardware.overlap_slowdown
        # redistribution_s depends only on the two layouts, the boundary's bytes and the micro-batch; its
        # rank-by-rank geometry costs ~1 ms, and the search asks for the same pairs many times.
        self.redistribution_cache: dict[tuple, float] = {}

    # -- contention ------------------------------------------------------------------------------
    def busy_share(self, pp: int, chunks: int) -> float:
        """Share of a step each rank of a ``pp``-stage pipeline computes, with ``chunks`` micro-batches: the
        share of the ranks computing at once, on average. 1.0 wherever compute does not slow down with
        other ranks (then the value changes nothing, and callers may share what they priced with it)."""
        return 1.0 if self.compute_slowdown == 1.0 else chunks / (chunks + pp - 1)

    def contention(self, busy_share: float) -> float:
        """How much slower a rank computes while ``busy_share`` of the ranks compute, on average, than alone."""
        return max(1.0, self.compute_slowdown * busy_share)

    def compute_s(
        self,
        part: LayerTypeProfile,
        pass_: Literal["fwd", "bwd"],
        local: float,
        tp: int,
        busy_share: float,
        cast_params: float = 0.0,
    ) -> float:
        """Seconds of ``part``'s forward or backward at ``local`` samples on one of ``tp`` ranks: they split the
        work, but each pays the batch-independent part (per-operator overhead, which the dtype does not change)
        whole; ``cast_params``: the parameters this rank's autocast casts, half of their cost in each pass."""
        formula = getattr(part, pass_)
        fixed = formula.fixed_s(self.seq)
        marginal = (formula(local, self.seq) - fixed) / tp * self.time_scale
        casts = self.cast_s_per_param * cast_params / 2
        attention = self.attention_repriced_s(part, pass_, local / tp)
        return (fixed + casts + marginal + attention) * self.contention(busy_share) / self.throughput_slowdown

    def attention_repriced_s(self, part: LayerTypeProfile, pass_: Literal["fwd", "bwd"], samples: float) -> float:
        """What an analytic profile's time for ``part`` misses of its fused attention at ``samples`` samples'
        share of the work: its formula prices attention's FLOPs at the matmuls' rate; the hardware's
        attention line (``HardwareProfile.attention``: a cost per call, its own rate) prices them instead.
        0 for measured profiles (their times hold attention as it ran) and where either side lacks the figures."""
        fit = self.hardware.attention.get(f"{pass_}/{self.compute_dtype}")
        if self.model.mode != "analytic" or not part.attention_calls or not self.model.priced_flops_per_s or not fit:
            return 0.0
        flops = getattr(part, f"{pass_}_attention_flops_per_sample") * samples
        return fit.time_s(part.attention_calls, flops) - flops * self.time_scale / self.model.priced_flops_per_s

    def cast_params(self, profile: LayerTypeProfile, split: float, dp: int, dp_type: str) -> float:
        """Parameters one rank's bf16 autocast casts of a layer whose weights are split ``split`` ways (a ZeRO
        layer's FSDP2 casts its shard)."""
        return profile.autocast_cast_param_count / split / (dp if dp > 1 and dp_type != "ddp" else 1)

    # -- one layer ------------------------------------------------------------------------------
    def layer_cost(
        self,
        layer_type: str,
        strategy: LayerStrategy,
        micro_batch: int,
        busy_share: float = 1.0,
        deferred_sync: bool = False,
    ) -> LayerCost:
        """One body layer of ``layer_type`` under ``strategy`` at ``micro_batch`` samples per stage, while
        ``busy_share`` of the ranks compute (``busy_share(pp, chunks)``; 1 without a pipeline);
        ``deferred_sync``: gradients are synchronised after the step's last micro-batch only
        (``Plan.defers_grad_sync``)."""
        if strategy.tp_mode != "1d":  # 2D, 2.5D, 3D: cost/grid_tp.py
            g = grid_layer_cost(self, layer_type, strategy, micro_batch, busy_share, deferred_sync)
            cost = LayerCost(g.fwd_s, g.bwd_s, g.grad_sync_s, 0, g.activation_bytes, g.peak_extra_bytes)
            return self._with_states(cost, g.params, strategy.dp, strategy.dp_type, g.largest_param, deferred_sync)
        profile = self.model.layer(layer_type)
        local = micro_batch / strategy.dp
        sharded_seq = strategy.sp != "none"
        split = 1 if strategy.sp == "ulysses" else strategy.tp  # Ulysses keeps whole weights
        casts = self.cast_params(profile, split, strategy.dp, strategy.dp_type)
        fwd_compute = self.compute_s(profile, "fwd", local, strategy.tp, busy_share, casts)
        bwd_compute = self.compute_s(profile, "bwd", local, strategy.tp, busy_share, casts)
        # the layer's own time, compute and TP collectives: timed in place where the profile has it
        own = (
            in_place_s(self, profile, strategy.tp, local, busy_share)
            if strategy.tp == 1 or strategy.sp == "none"
            else None
        )
        if own is None:
            hidden_bytes = profile.boundary_bytes_per_sample * local * self.activation_scale
            own = (
                fwd_compute + tp_comm_s(self, strategy, hidden_bytes, fwd_compute),
                bwd_compute + tp_comm_s(self, strategy, hidden_bytes, bwd_compute, backward=True),
            )
        params, largest = profile.param_count / split, profile.largest_param_count / split
        gather_s, sync_s, transient_bytes = dp_comm(
            self,
            params,
            strategy.dp,
            strategy.dp_type,
            not strategy.tp_consecutive or strategy.tp == 1,
            (fwd_compute, bwd_compute),
            deferred_sync,
        )
        fwd_s = own[0] + visible_s(self, gather_s, fwd_compute, strategy.dp_type)
        bwd_s = own[1] + visible_s(self, gather_s, bwd_compute, strategy.dp_type) + ddp_drift_s(self, strategy, own)
        if strategy.ckpt:
            bwd_s += own[0]
        full_activation = self.kept_activation_per_sample(profile, strategy, sharded_seq) * local
        if strategy.ckpt:
            kept = (
                profile.ckpt_activation_bytes_per_sample
                * local
                * self.activation_scale
                / (strategy.tp if sharded_seq else 1)
            )
        else:
            kept = full_activation
        # autocast's weight casts: saved for backward by a layer that is not checkpointed; a checkpointed one
        # keeps only its inputs and makes the casts again when it recomputes (docs/memory-7b.md)
        cast = self.autocast_cast_bytes(params, strategy.dp, strategy.dp_type)
        scale = self.kept_activation_scale(profile, strategy.dp, strategy.dp_type)
        working = profile.grad_working_per_sample(strategy.tp, sharded_seq) * local * scale
        if strategy.ckpt:
            peak_extra = transient_bytes + working + full_activation + cast
            if strategy.sp == "megatron":  # its recomputation keeps what it gathers whole (no regather there):
                # a Transformer block's two column-parallel groups, each reading a whole [seq, hidden] input
                whole_input = profile.ckpt_activation_bytes_per_sample * local * self.activation_scale
                peak_extra += ROW_GATHERS * whole_input * (1 - 1 / strategy.tp)
        else:
            kept += cast
            peak_extra = transient_bytes + working
        sync_s = (
            visible_s(self, sync_s, bwd_compute, strategy.dp_type)
            + partial_grad_sum_s(self, profile, strategy)
            + optimizer_s(self, params, strategy.dp, strategy.dp_type)
        )
        return self._with_states(
            LayerCost(fwd_s, bwd_s, sync_s, 0, int(kept), int(peak_extra)),
            params,
            strategy.dp,
            strategy.dp_type,
            largest,
            deferred_sync,
        )

    def kept_activation_per_sample(
        self, profile: LayerTypeProfile, strategy: LayerStrategy, sharded_seq: bool
    ) -> float:
        """Bytes per sample a layer keeps for backward on one of its ``strategy.tp`` ranks at the training dtype:
        under bf16 autocast on fp32 weights, the profile's autocast table where it has one (what stays fp32 is
        mostly replicated over the TP group, so one scale for every degree under-prices a TP rank)."""
        zero = strategy.dp > 1 and strategy.dp_type != "ddp"
        autocast = self.mixed_precision == "bf16" and self.model.dtype == "fp32" and not zero
        if autocast and profile.bf16_activation_bytes_per_sample:
            return profile.activation_per_sample(strategy.tp, sharded_seq, autocast=True)
        scale = self.kept_activation_scale(profile, strategy.dp, strategy.dp_type)
        return profile.activation_per_sample(strategy.tp, sharded_seq) * scale

    def kept_activation_scale(self, profile: LayerTypeProfile, dp: int, dp_type: str) -> float:
        """Bytes a layer keeps for backward at the training dtype per byte its profile counts. Under bf16
        autocast on fp32 weights (DDP, TP) its residual stream, norms and softmax stay fp32: what the profile
        measured under autocast, where it did. A ZeRO layer computes on FSDP2's bf16 parameters and inputs,
        its residual stream included: half, as every other figure."""
        zero = dp > 1 and dp_type != "ddp"
        if self.mixed_precision == "bf16" and self.model.dtype == "fp32" and profile.bf16_activation_scale and not zero:
            return profile.bf16_activation_scale
        return self.activation_scale

    def autocast_cast_bytes(self, params: float, dp: int, dp_type: str) -> float:
        """Bytes one micro-batch keeps of a layer's weights cast by bf16 autocast: the forward casts every
        weight a matmul reads and autograd keeps the cast until the backward (a checkpointed layer's
        forward keeps none: its recomputation casts again). ZeRO layers compute on FSDP2's bf16 gather
        instead (priced with it); in fp32 there is no cast."""
        if self.mixed_precision != "bf16" or (dp > 1 and dp_type != "ddp"):
            return 0.0
        return params * COMPUTE_BYTES_PER_PARAM["bf16"]

    def _with_states(
        self, cost: LayerCost, params: float, dp: int, dp_type: str, largest_param: float, deferred_sync: bool
    ) -> LayerCost:
        """``cost`` with the model states of ``params`` parameters on a ``dp``-way ``dp_type`` group, the
        largest of them ``largest_param`` elements (cost/data_parallel_cost.py)."""
        states, grads, accumulate = model_states(self, params, dp, dp_type, largest_param, deferred_sync)
        return dataclasses.replace(cost, model_state_bytes=states, grad_bytes=grads, accumulate_bytes=accumulate)

    # -- embedding and head: cost/embedding_cost.py ------------------------------------------------------
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
        """The prologue (embedding, on the first stage) and/or epilogue (head and loss, on the last stage), with
        their model states (``ends_cost`` says how vocab TP and vsp split them)."""
        ends = ends_cost(self, embedding, devices, micro_batch, first_stage, last_stage, busy_share, deferred_sync)
        if ends is None:
            return LayerCost(0.0, 0.0, 0.0, 0, 0, 0)
        cost = LayerCost(ends.fwd_s, ends.bwd_s, ends.grad_sync_s, 0, ends.activation_bytes, ends.peak_extra_bytes)
        return self._with_states(cost, ends.params, ends.dp, ends.dp_type, ends.largest_param, deferred_sync)

    # -- between layers and stages, the whole plan: cost/plan_cost.py ------------------------------------
    def redistribution_s(
        self, before: LayerStrategy, after: LayerStrategy, boundary_index: int, micro_batch: int
    ) -> float:
        """Moving the activations between body layers ``boundary_index - 1`` and ``boundary_index`` from
        ``before``'s layout to ``after``'s and their gradients back (``plan_cost.redistribution_s``)."""
        return redistribution_s(self, before, after, boundary_index, micro_batch)

    def p2p_s(
        self, stage: int, plan_pp: int, devices_per_stage: int, micro_batch: int, cut_after_body_index: int
    ) -> float:
        """Send/recv of one micro-batch's activations and gradients at a cut (``plan_cost.p2p_s``)."""
        return p2p_s(self, stage, plan_pp, devices_per_stage, micro_batch, cut_after_body_index)

    def evaluate(self, plan: Plan) -> Prediction:
        """Iteration time, samples/s and peak bytes per stage of ``plan`` (``plan_cost.evaluate_plan``)."""
        return evaluate_plan(self, plan)

    def in_flight(self, pipeline: str, pp: int, stage: int, chunks: int) -> InFlight:
        """Micro-batches whose activations a stage holds, before and after its first backward (cost/memory.py)."""
        return InFlight.of(pipeline, pp, stage, chunks)

    def in_flight_micro_batches(self, pipeline: str, pp: int, stage: int, chunks: int) -> int:
        """Micro-batches whose activations a stage holds at once: GPipe all, 1F1B at most ``pp - stage``."""
        return self.in_flight(pipeline, pp, stage, chunks).first

    def unsupported_reason(self, layer_type: str, strategy: LayerStrategy) -> str | None:
        """None if the layer can run ``strategy``; otherwise why not."""
        if layer_type not in self.model.types:
            return f"layer type {layer_type!r} is not in the model profile"
        # a grid splits the heads over its rows' q ranks (the samples over the rest)
        heads, tp = self.model.types[layer_type].num_heads, (strategy.grid_shape or (strategy.tp,))[0]
        obstacle = self.model.types[layer_type].lowering_obstacles.get(strategy.lowering_key)
        if obstacle:
            return f"lowering: {obstacle}"
        if tp > 1 and heads and heads % tp:
            if strategy.tp_mode != "1d":
                return f"the rows of {tp} ranks of a {strategy.tp_mode} grid do not divide {heads} heads"
            return f"tp {tp} does not divide {heads} heads"
        if tp > 1 and strategy.sp != "none" and self.seq % tp:
            return f"tp {tp} does not divide sequence length {self.seq} ({strategy.sp} sequence parallelism)"
        return None
