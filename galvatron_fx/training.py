"""The example training run behind ``examples/*/train.py`` and ``galvatron-fx train``, under torchrun.

Build a built-in model, compile it (searching a plan, or loading one), print the plan on rank 0, then
train on a small synthetic dataset the run makes (the same on every rank) and print the loss of every
step. The loss goes down as the model learns the dataset.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.distributed as dist

from .cluster import Cluster
from .models import build_model, example_batch


def add_training_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options every example shares."""
    parser.add_argument(
        "--size", choices=("small", "real"), default="small", help="small config (CPU) or the published one"
    )
    parser.add_argument("--plan", default=None, help="plan JSON (ours or Galvatron's); default: search one")
    parser.add_argument("--search-space", default="full", help="full, 3d, dp+tp, dp+pp, dp, sdp, tp or pp")
    parser.add_argument(
        "--cluster", default=None, help="a preset such as A100-80GB, or a cluster JSON; default: detect"
    )
    parser.add_argument(
        "--memory-budget", default=None, help='per-device memory budget such as "16GiB"; default: the device memory'
    )
    parser.add_argument("--global-batch", type=int, default=16, help="samples per optimizer step")
    parser.add_argument("--seq", type=int, default=32, help="sequence length of text models")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps")
    parser.add_argument(
        "--dataset-batches", type=int, default=2, help="distinct synthetic batches the run cycles through"
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument(
        "--mixed-precision",
        choices=("fp32", "bf16"),
        default=None,
        help="training precision (default: bf16 on GPUs, as `galvatron-fx search` plans; fp32 on CPU)",
    )
    return parser


def _cluster(spec: str | None, world_size: int) -> Cluster | None:
    if spec is None:
        return None
    if spec.endswith(".json"):
        return Cluster.load(spec)
    per_node = min(world_size, 8)
    return Cluster.preset(spec, nodes=max(world_size // per_node, 1), devices_per_node=per_node)


def train_example(name: str, args: argparse.Namespace) -> list[float]:
    """Run the example for built-in model ``name``; returns the loss of every step (on every rank)."""
    from galvatron_fx import compile, runtime

    runtime.init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial weights on every rank
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model, _ = build_model(name, size=args.size, batch=args.global_batch, seq=args.seq)
        dataset = [example_batch(name, model, args.global_batch, args.seq, seed=i) for i in range(args.dataset_batches)]
        compiled = compile(
            model,
            _cluster(args.cluster, world_size),
            example_kwargs=dataset[0],
            plan=args.plan,
            memory_budget=args.memory_budget,
            search_space=args.search_space,
            mixed_precision=args.mixed_precision or ("bf16" if torch.cuda.is_available() else "fp32"),
            lr=args.lr,
        )
    if rank == 0:
        print(compiled.explain(), flush=True)
    losses = []
    for step in range(args.steps):
        started = time.perf_counter()
        losses.append(compiled.train_step(dataset[step % len(dataset)]))
        if rank == 0:
            print(f"step {step:3d}  loss {losses[-1]:.4f}  {time.perf_counter() - started:.2f} s", flush=True)
    return losses
