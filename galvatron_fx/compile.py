"""compile(): one call from an unmodified model to hybrid-parallel training, on every rank.

The steps, in order: join the process group; capture the model (with the loss function, if given, so the
loss is part of the graph), once: its batch is a symbol, so the same Program runs every layer at the batch the
plan gives it; build the cost model from the cluster; search the plan on rank 0 and share it (or take the
plan given); lower this rank's stage and wrap it in a runtime Trainer.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.utils._pytree as pytree

from galvatron_fx import runtime
from galvatron_fx.cost.analytic_layer import infer_seq_hidden
from galvatron_fx.cost.hardware import HardwareProfile
from galvatron_fx.cost.model import CostModel
from galvatron_fx.cost.model_profile import ModelProfile
from galvatron_fx.cost.profile_checks import (
    check_hardware_profile,
    check_model_profile,
    load_hardware_profile,
    load_model_profile,
    searched_for,
)
from galvatron_fx.passes.lower.obstacles import lowering_obstacles
from galvatron_fx.passes.search.engine import search
from galvatron_fx.passes.search.space import SearchSpace
from galvatron_fx.runtime import groups
from galvatron_fx.runtime.materialize import buffers_on_meta, has_meta_parameters, materialize, real_buffers
from galvatron_fx.runtime.safetensors_io import check_safetensors

from .capture import batch_size_of, capture, resize_batch
from .cluster import Cluster
from .compiled_model import CompiledModel
from .errors import ConfigError, GalvatronError, PlanError, ProfileError
from .plan import Plan
from .plan_sources import UniformPlan, check_plan_settings, resolve_given_plan
from .program import Program

LossFn = Callable[[Any, Any], torch.Tensor]


class _WithLoss(nn.Module):
    """``loss_fn(model(batch), batch)`` as one module, so that the loss is captured into the graph."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, *args, **kwargs):
        return self.loss_fn(self.model(*args, **kwargs), kwargs if kwargs else args)


def compile(
    model: nn.Module,
    cluster: Cluster | None = None,
    *,
    example_args: tuple = (),
    example_kwargs: dict | None = None,
    loss_fn: LossFn | None = None,
    optimizer: Callable[[Any], torch.optim.Optimizer] | None = None,
    memory_budget: "int | str | None" = None,
    plan: "Plan | UniformPlan | str | Path | None" = None,
    search_space: str = "full",
    search_options: "dict[str, Any] | None" = None,
    profile: "str | Path | ModelProfile" = "analytic",
    hardware_profile: "str | Path | HardwareProfile | None" = None,
    mixed_precision: str | None = None,
    lr: float = 1e-3,
    seed: int | None = 0,
    init: "str | Callable[[nn.Module], None] | None" = None,
    compile_layers: bool | None = None,
    clip_grad_norm: float | None = None,
    weight_decay: float = 0.0,
    lr_schedule: "runtime.LRSchedule | None" = None,
) -> "CompiledModel":
    """Capture, plan and lower ``model`` for the running process group; call it on every rank.

    ``example_args`` / ``example_kwargs``: one global batch, as the model's forward takes it (its first
    dimension is the global batch size). ``loss_fn(output, batch)`` computes the loss, else the output
    carries it (a scalar, ``.loss`` or ``["loss"]``). ``optimizer``: a factory taking this rank's parameters
    as parameter groups of ``(name, parameter)`` pairs, one per kind of tensor (default Adam with ``lr``, AdamW
    when ``weight_decay`` is set, which biases and norms are spared; see ``runtime.train``).
    ``clip_grad_norm``: clip gradients by their global norm over all shards; ``lr_schedule``: the rate of each
    step (``runtime.LRSchedule``: warm-up, cosine or linear decay). ``plan``:
    ``None`` searches (in ``search_space`` under ``memory_budget``, default ``cluster.default_budget_bytes``:
    the device memory less headroom; ``search_options`` set fields of ``SearchSpace``, as the CLI's flags do,
    e.g. ``{"tp_modes": ("1d", "2d")}``), or a plan JSON path (Galvatron's too), ``uniform_plan(...)``, or a
    ``Plan``; a given plan is checked against the run (``check_plan_settings``: world size, global batch,
    sequence length, precision), and PlanError names the key that differs. ``cluster=None`` detects the cluster
    from the launcher's environment. ``profile``: ``"analytic"`` (FLOPs ÷ the hardware's sustained throughput,
    memory from the graph) or a model profile from ``galvatron-fx profile-model`` (its path, or a loaded
    ``ModelProfile``); ``hardware_profile``: ``None`` (the cluster's datasheet figures) or a hardware profile from
    ``galvatron-fx profile-hardware`` (its path, or a loaded ``HardwareProfile``). A profile made for another
    world size, device kind, model, sequence length or (measured) precision raises ProfileError; a searched
    plan's provenance names both profiles with their sha256. ``mixed_precision``: ``"fp32"`` or ``"bf16"``;
    ``None`` takes the given plan's, else ``"fp32"``.
    ``init``: how each rank fills its own shards (``runtime.materialize``): ``"model"`` (the model's own
    initialisation; the default for a model built on the meta device), ``"safetensors:DIR"`` (a Hugging Face
    checkpoint folder, read slice by slice), or a function of the full meta model; ``None`` keeps the values.
    ``compile_layers``: each kind of layer graph compiled once with ``torch.compile`` and shared by the layers
    that have it (default: on CUDA).
    """
    options = dict(search_options or {})
    if "global_batch" in options:
        raise ConfigError(
            "search_options sets global_batch, which compile() takes from the example batch",
            "give example_args / example_kwargs of the global batch to train",
        )
    SearchSpace.named(search_space, **options)  # an unknown space or option: ConfigError before any collective
    device = runtime.init_distributed()
    cluster = _check_cluster(cluster or Cluster.detect(), dist.get_world_size())
    init = _check_init(model, init)  # before any collective
    known_buffers = real_buffers(model) if has_meta_parameters(model) else {}  # real buffers of a meta model: kept
    example_args, example_kwargs = tuple(example_args), dict(example_kwargs or {})
    program = _capture(model, loss_fn, example_args, example_kwargs)
    global_batch = batch_size_of(pytree.tree_leaves((example_args, example_kwargs)))
    given = None
    if plan is not None:
        given = resolve_given_plan(plan, len(program.body), dist.get_world_size(), global_batch, program.model_name)
        mixed_precision = check_plan_settings(
            given,
            seq=infer_seq_hidden(program)[0],
            mixed_precision=mixed_precision,
            global_batch=global_batch,
            world_size=dist.get_world_size(),
            path=plan if isinstance(plan, (str, Path)) else None,
        ).mixed_precision
    mixed_precision = mixed_precision or "fp32"
    cost_model = build_cost_model(program, cluster, profile, mixed_precision, hardware_profile=hardware_profile)
    if plan is None:
        provenance = {
            "model": program.model_name,
            "cluster": f"{cluster.nodes}x{cluster.devices_per_node} {cluster.device}",
            **searched_for(cost_model, profile=profile, hardware_profile=hardware_profile),
        }
        budget = memory_budget or cluster.default_budget_bytes
        plan, space = _search_on_rank0(cost_model, program, budget, (search_space, options), global_batch, provenance)
    else:
        space = None
        plan = given
    local_batch = plan.micro_batch // plan.devices_per_stage
    if not program.dynamic_batch and local_batch != program.batch_size:  # a fixed batch: capture the one that runs
        program = _capture(model, loss_fn, *resize_batch(example_args, example_kwargs, local_batch))
    trainer = runtime.Trainer(
        program,
        plan,
        config=runtime.TrainConfig(
            lr=lr,
            seed=seed,
            mixed_precision=mixed_precision,
            compile_layers=device.type == "cuda" if compile_layers is None else compile_layers,
            clip_grad_norm=clip_grad_norm,
            weight_decay=weight_decay,
            lr_schedule=lr_schedule or runtime.LRSchedule(),
        ),
        optimizer=optimizer,
        device=device,
        model_name=program.model_name,
    )
    if init is not None:
        materialize(trainer.stage, model, init, seed or 0, device, known_buffers)
    constants = {k: v for k, v in example_kwargs.items() if not isinstance(v, torch.Tensor)}
    config = getattr(model, "config", None)
    hf_config = config if hasattr(config, "save_pretrained") else None  # written beside exported weights
    return CompiledModel(program, plan, trainer, cost_model, cluster, constants, space, hf_config)


def _check_cluster(cluster: Cluster, world_size: int) -> Cluster:
    if cluster.world_size != world_size:
        raise ConfigError(
            f"the cluster has {cluster.world_size} devices ({cluster.nodes} × {cluster.devices_per_node}) "
            f"but {world_size} processes run",
            "describe the cluster you launched on, or pass cluster=None to detect it",
        )
    return cluster


def _check_init(model: nn.Module, init):
    """The initialisation to run: the model's own for a model built on meta, unless given; a safetensors
    folder is checked against the model now, so that every rank refuses it before any collective."""
    init = init or ("model" if has_meta_parameters(model) else None)
    if isinstance(init, str) and init.startswith("safetensors:"):
        check_safetensors(init.removeprefix("safetensors:"), model)
    return init


def _capture(model: nn.Module, loss_fn: LossFn | None, args: tuple, kwargs: dict) -> Program:
    """The model (with its loss, if given apart) captured; a meta model with a meta batch and meta buffers."""
    on_meta = has_meta_parameters(model)
    if on_meta:
        args, kwargs = pytree.tree_map(lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v, (args, kwargs))
    with buffers_on_meta(model) if on_meta else contextlib.nullcontext():
        program = capture(_WithLoss(model, loss_fn) if loss_fn else model, args, kwargs)
    program.model_name = type(model).__name__  # the user's model, not the loss wrapper
    return program


def build_cost_model(
    program: Program,
    cluster: Cluster,
    profile: "str | Path | ModelProfile" = "analytic",
    mixed_precision: str = "fp32",
    *,
    hardware_profile: "str | Path | HardwareProfile | None" = None,
) -> CostModel:
    """The CostModel for ``program`` on ``cluster`` training in ``mixed_precision``.

    ``profile``: ``"analytic"`` (FLOPs ÷ the hardware's sustained throughput, memory from the graph) or a model
    profile (a path, or a ModelProfile); ``hardware_profile``: ``None`` (the cluster's datasheet figures) or a
    hardware profile (a path, or a HardwareProfile). Each profile is checked against the cluster and the program
    (``cost.profile_checks``): one made for another world size, node size, device kind, model, sequence length
    (but a ``sequence``-mode profile, evaluated at the program's) or, measured, precision raises ProfileError
    naming the file and the key."""
    if hardware_profile is None:
        hardware = cluster.hardware_profile()
    else:
        hardware = load_hardware_profile(hardware_profile)
        check_hardware_profile(
            hardware, world_size=cluster.world_size, devices_per_node=cluster.devices_per_node, device=cluster.device
        )
    if isinstance(profile, str) and profile == "analytic":
        flops = hardware.flops_per_s
        # CostModel re-prices an analytic profile's fp32 times at the training dtype's throughput where the
        # hardware gives both; otherwise the times are priced at the training dtype here (once, not twice)
        rescaled = bool(flops.get("fp32") and flops.get(mixed_precision))
        flops_per_s = (
            flops["fp32"] if rescaled else flops.get(mixed_precision) or cluster.sustained_flops[mixed_precision]
        )
        model_profile = ModelProfile.from_program(
            program,
            flops_per_s=flops_per_s,
            dtype="fp32",
            bf16_activations=mixed_precision == "bf16",
            op_overhead_s=hardware.op_overhead_s,
        )
    else:
        model_profile = load_model_profile(profile)
        seq, hidden = infer_seq_hidden(program)
        check_model_profile(
            model_profile,
            seq=seq,
            mixed_precision=mixed_precision,
            device=cluster.device,
            num_layers=len(program.body),
            hidden_size=hidden,
        )
        # a sequence-mode profile is evaluated at the program's length (a warning outside its profiled range)
        return CostModel(model_profile, hardware, mixed_precision=mixed_precision, seq=seq)
    return CostModel(model_profile, hardware, mixed_precision=mixed_precision)


def _search_on_rank0(
    cost_model,
    program: Program,
    memory_budget,
    search_space: tuple[str, dict[str, Any]],
    global_batch: int,
    provenance: dict[str, Any],
) -> "tuple[Plan, SearchSpace | None]":
    """Rank 0 searches, over the strategies this Program lowers (``search_space``: a named space and the fields
    it overrides); the others receive the plan as JSON text (never pickled). Returns the plan and, on rank 0,
    the space it was searched in."""
    world_size = dist.get_world_size()
    text, space = "", None
    if dist.get_rank() == 0:
        try:
            obstacles = lowering_obstacles(program, world_size)
            cost_model.model.add_lowering_obstacles(obstacles)
            blocked = obstacles.get("embedding", {})
            blocked_vtp = [int(key.removeprefix("vtp")) for key in blocked if key.startswith("vtp")]
            blocked_vsp = [int(key.removeprefix("vsp")) for key in blocked if key.startswith("vsp")]
            name, options = search_space
            limits = {  # what the user allows and this Program lowers
                "max_vtp": min([options.get("max_vtp", 1 << 30)] + [v // 2 for v in blocked_vtp]),
                "max_vsp": min([options.get("max_vsp", 1 << 30)] + [v // 2 for v in blocked_vsp]),
            }
            space = SearchSpace.named(name, **{**options, **limits}, global_batch=(global_batch, global_batch, 1))
            provenance = {**provenance, "lowering_left_out": {t: dict(r) for t, r in obstacles.items()}}
            text = json.dumps(
                search(cost_model, world_size, memory_budget, space, provenance=provenance).to_json_dict()
            )
        except GalvatronError as error:  # every rank must raise it, not wait for a plan
            text = json.dumps({"error": {"type": type(error).__name__, "cause": error.cause, "remedy": error.remedy}})
    data = json.loads(groups.broadcast_text(text))
    if "error" in data:
        error_type = {cls.__name__: cls for cls in (PlanError, ConfigError, ProfileError)}.get(
            data["error"]["type"], GalvatronError
        )
        raise error_type(data["error"]["cause"], data["error"]["remedy"])
    return Plan.from_json_dict(data, source="searched plan"), space
