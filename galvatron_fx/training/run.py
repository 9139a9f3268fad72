"""A training run under torchrun: ``galvatron-fx train`` and the examples.

In order: join the process group; build the model and its data; compile it (search a plan, load one, or
apply Galvatron's global flags); resume from the latest checkpoint if asked; then train to ``--steps``
with each rank reading only its share of every global batch (``compiled.data_loader``), evaluating,
saving and logging as the options say. Rank 0 prints the plan, then one line per logged step.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import default_collate

from galvatron_fx import runtime
from galvatron_fx.cluster import Cluster
from galvatron_fx.compile import compile
from galvatron_fx.errors import ConfigError
from galvatron_fx.plan_sources import uniform_plan
from galvatron_fx.runtime import checkpoint

from .arguments import PLAN_FLAGS
from .figures import (
    ConsoleProgress,
    JsonLinesLog,
    StepFigures,
    StepTimer,
    TensorBoardLog,
    flops_per_token,
    gather_peak_memory,
    peak_memory_bytes,
)
from .sources import RunModel, load_data, load_model, split_eval


def train(model_spec: str, args: argparse.Namespace) -> list[float]:
    """Train ``model_spec`` (see ``sources.load_model``) as ``args`` say; returns the loss of every step this
    run made (on every rank)."""
    _check_arguments(args)  # before any collective
    device = runtime.init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    run_model = load_model(model_spec, args.size, args.global_batch, args.seq)
    dataset = load_data(run_model, args.data, args.seq, args.synthetic_batches, args.seed)
    train_set, eval_set = _split(run_model, dataset, args)
    example = _example(run_model, train_set, args.global_batch)
    plan = _plan(args)
    # a given plan brings the precision it was searched for; otherwise bf16 on GPUs, as `search` plans
    precision = args.mixed_precision or (None if plan else "bf16" if device.type == "cuda" else "fp32")
    compiled = compile(
        run_model.model,
        _cluster(args.cluster, world_size),
        example_kwargs=example,
        plan=plan,
        memory_budget=args.memory_budget,
        search_space=args.search_space,
        profile=args.model_profile or "analytic",
        hardware_profile=args.hardware_profile,
        mixed_precision=precision,
        lr=args.lr,
        seed=args.seed,
        clip_grad_norm=args.clip_grad,
        weight_decay=args.weight_decay,
        lr_schedule=runtime.LRSchedule(args.lr_schedule, args.warmup_steps, args.steps, args.min_lr_ratio),
    )
    precision = compiled.trainer.config.mixed_precision
    if rank == 0:
        print(compiled.explain(why=args.explain), flush=True)
    resumed = _resume(compiled, args)
    if rank == 0 and resumed:
        print(f"resumed from {resumed} at step {compiled.trainer.steps_done}", flush=True)

    sinks = _sinks(args, run_model, compiled, precision) if rank == 0 else []
    timer = StepTimer(
        args.global_batch,
        _tokens_per_sample(example),
        flops_per_token(run_model.model, len(compiled.program.body), args.seq),
        compiled.cluster.peak_flops.get(precision, 0.0) * world_size,
    )
    losses, since_log = [], 0  # device tensors: only a logged step waits for the device
    for batch in compiled.data_loader(train_set, seed=args.seed, stop_step=args.steps):
        losses.append(compiled.train_step(batch))
        step, since_log = compiled.trainer.steps_done, since_log + 1
        evaluating = bool(eval_set) and args.eval_every > 0 and step % args.eval_every == 0
        eval_loss = _evaluate(compiled, eval_set, args) if evaluating else None
        if step % args.log_every == 0 or step == args.steps or evaluating:
            loss = float(losses[-1])  # waits for the steps since the last log, before the timer reads the clock
            figures = _figures(compiled, timer, step, args.steps, loss, since_log, eval_loss, device)
            for sink in sinks:
                sink(figures)
            since_log = 0
        if args.save and (step == args.steps or (args.save_every and step % args.save_every == 0)):
            compiled.save_checkpoint(Path(args.save) / f"step_{step}")
    for sink in sinks:
        sink.close()
    if args.export:
        compiled.export_pretrained(args.export)
        if rank == 0:
            print(f"exported the trained weights to {args.export} (from_pretrained loads them)", flush=True)
    return torch.stack(losses).tolist() if losses else []


def train_example(name: str, args: argparse.Namespace) -> list[float]:
    """The examples' and ``galvatron-fx train``'s entry point: ``train`` model ``name``, then leave the process
    group once every rank is done (a process that exits with its group alive can abort in the group's
    destructor, after the run has succeeded)."""
    losses = train(name, args)
    dist.barrier()
    runtime.shutdown()
    return losses


def _check_arguments(args: argparse.Namespace) -> None:
    given_flags = [f"--{name.replace('_', '-')}" for name in PLAN_FLAGS if getattr(args, name) is not None]
    if args.plan and given_flags:
        raise ConfigError(f"--plan and {', '.join(given_flags)} both state the plan", "give one or the other")
    if args.resume == "auto" and not args.save:
        raise ConfigError("--resume auto looks for checkpoints in --save, which is not given", "add --save DIR")
    for name in ("steps", "global_batch", "log_every"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)} is not positive", "give at least 1")


def _cluster(spec: str | None, world_size: int) -> Cluster | None:
    if spec is None:
        return None
    if spec.endswith(".json"):
        return Cluster.load(spec)
    per_node = min(world_size, 8)
    return Cluster.preset(spec, nodes=max(world_size // per_node, 1), devices_per_node=per_node)


def _plan(args: argparse.Namespace):
    """The plan JSON, Galvatron's global flags as a uniform plan, or None to search."""
    flags = {name: getattr(args, name) for name in PLAN_FLAGS if getattr(args, name) is not None}
    if not flags:
        return args.plan
    for name in ("tp_consecutive", "sdp", "ckpt", "vsp"):
        if name in flags:
            flags[name] = bool(flags[name])
    if flags.get("pipeline") == "pipedream_flush":  # Galvatron's name for 1F1B with a flush per step
        flags["pipeline"] = "1f1b"
    return uniform_plan(**flags)


def _split(run_model: RunModel, dataset, args: argparse.Namespace):
    if args.eval_data:
        return dataset, load_data(run_model, args.eval_data, args.seq, 0, args.seed)
    held_out = args.eval_samples if args.eval_samples is not None else (4 * args.global_batch if args.eval_every else 0)
    return split_eval(dataset, held_out, args.global_batch)


def _example(run_model: RunModel, dataset, global_batch: int) -> dict:
    """The first global batch of the data, with the model's non-tensor kwargs (``use_cache=False``)."""
    if len(dataset) < global_batch:
        raise ConfigError(
            f"the training data holds {len(dataset)} samples, fewer than one global batch of {global_batch}",
            "use more data, a shorter --seq, or a smaller --global-batch",
        )
    first = default_collate([dataset[i] for i in range(global_batch)])
    constants = {k: v for k, v in run_model.example.items() if not isinstance(v, torch.Tensor)}
    vocab = getattr(getattr(run_model.model, "config", None), "vocab_size", None)
    ids = first.get("input_ids")
    if vocab and isinstance(ids, torch.Tensor) and int(ids.max()) >= vocab:
        raise ConfigError(
            f"the data holds token id {int(ids.max())}, beyond the model's vocabulary of {vocab}",
            "preprocess with the model's tokenizer, or give the model a vocabulary that covers it",
        )
    return {**constants, **first}


def _tokens_per_sample(example: dict) -> int | None:
    """Tokens a sample feeds the model (encoder and decoder inputs); None for images."""
    names = [n for n in ("input_ids", "decoder_input_ids", "idx") if isinstance(example.get(n), torch.Tensor)]
    return sum(example[n][0].numel() for n in names) or None


def _resume(compiled, args: argparse.Namespace) -> Path | None:
    if not args.resume:
        return None
    folder = Path(args.save if args.resume == "auto" else args.resume)
    if not (folder / checkpoint.MANIFEST).is_file():
        folder = checkpoint.latest(folder)
    if folder is None:
        if args.resume == "auto":
            return None  # nothing saved yet: a fresh start
        raise ConfigError(f"--resume {args.resume}: no complete checkpoint there", "give a checkpoint folder or auto")
    compiled.load_checkpoint(folder)
    return folder


def _sinks(args: argparse.Namespace, run_model: RunModel, compiled, precision: str) -> list:
    sinks: list = [ConsoleProgress()]
    if args.log:
        run = {
            "model": run_model.name,
            "data": args.data,
            "plan": compiled.plan.to_json_dict(),
            "world_size": compiled.plan.world_size,
            "global_batch": args.global_batch,
            "seq": args.seq,
            "precision": precision,
            "start_step": compiled.trainer.steps_done,
            "total_steps": args.steps,
            "memory_source": peak_memory_bytes(compiled.trainer.device)[1],
        }
        sinks.append(JsonLinesLog(args.log, run))
    if args.tensorboard:
        sinks.append(TensorBoardLog(args.tensorboard))
    return sinks


def _evaluate(compiled, eval_set, args: argparse.Namespace) -> float:
    """The mean loss over the held-out samples, in whole global batches, dropout off."""
    batches = len(eval_set) // args.global_batch
    loader = compiled.data_loader(eval_set, shuffle=False, start_step=0, stop_step=batches)
    return sum(compiled.eval_step(batch) for batch in loader) / batches


def _figures(compiled, timer: StepTimer, step, total, loss, steps, eval_loss, device) -> StepFigures:
    step_time_s, samples_per_s, tokens_per_s, mfu = timer.lap(steps)
    return StepFigures(
        step=step,
        total_steps=total,
        loss=loss,
        lr=compiled.trainer.last_lr,
        grad_norm=float(compiled.trainer.last_grad_norm),
        samples_per_s=samples_per_s,
        tokens_per_s=tokens_per_s,
        mfu=mfu,
        step_time_s=step_time_s,
        elapsed_s=timer.elapsed_s,
        peak_memory_bytes=gather_peak_memory(device),
        memory_source=peak_memory_bytes(device)[1],
        eval_loss=eval_loss,
    )
