"""Capture a model and print its layer table: index, type, parameters, forward GFLOPs, saved-activation
and boundary megabytes per sample."""

import argparse
import warnings

from galvatron_fx.capture import capture
from galvatron_fx.models import MODELS, build_model
from galvatron_fx.report import layer_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        help=f"a built-in model ({', '.join(sorted(MODELS))}) or an entry point "
        "'module:function' / 'file.py:function' returning (model, example_kwargs)",
    )
    parser.add_argument(
        "--size", choices=("small", "real"), default="small", help="built-in models: configuration size"
    )
    parser.add_argument("--batch", type=int, default=4, help="example batch size")
    parser.add_argument("--seq", type=int, default=32, help="example sequence length for text models")


def run(args: argparse.Namespace) -> int:
    model, example_kwargs = build_model(args.model, size=args.size, batch=args.batch, seq=args.seq)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        program = capture(model, example_kwargs=example_kwargs)
    print(layer_table(program))
    return 0
