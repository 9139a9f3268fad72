"""Train a built-in example model under torchrun with a searched or given plan, on a synthetic dataset.

Run it on every rank, e.g. ``torchrun --nproc_per_node 4 -m galvatron_fx.cli train gpt2`` (or with the
path of the ``galvatron-fx`` script instead of ``-m galvatron_fx.cli``). Multi-node: torchrun's usual
``--nnodes``/``--rdzv-endpoint`` options. The plan is printed on rank 0, then the loss of every step."""

import argparse

from galvatron_fx.models import MODELS
from galvatron_fx.training import add_training_arguments, train_example


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", choices=sorted(MODELS), help="built-in example model")
    add_training_arguments(parser)


def run(args: argparse.Namespace) -> int:
    train_example(args.model, args)
    return 0
