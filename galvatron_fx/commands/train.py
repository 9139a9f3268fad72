"""Train a model under torchrun: a built-in name, a Hugging Face config.json, or an entry point
('module:function' / 'file.py:function' returning (model, example_kwargs)), on an indexed dataset (--data
PREFIX, from `galvatron-fx preprocess-data`) or synthetic batches, with a searched plan, a plan file, or
Galvatron's global flags (--pp --tp --sdp ...).

    torchrun --nproc_per_node 4 -m galvatron_fx.cli train gpt2 --data stdlib --steps 100 --save ckpt --log run.jsonl

Rank 0 prints the plan, then each logged step's loss, learning rate, gradient norm, throughput, MFU, peak
memory and the time left. --steps is the total: with --resume auto a stopped run continues to it."""

import argparse

from galvatron_fx.training import add_training_arguments, train_example


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="built-in name, config.json path, or entry point")
    add_training_arguments(parser)


def run(args: argparse.Namespace) -> int:
    train_example(args.model, args)
    return 0
