"""The ``galvatron-fx`` command line. Each subcommand lives in ``galvatron_fx/commands/<name>.py`` and
provides ``add_arguments(parser)`` and ``run(args) -> int``; errors a user can cause print as one line."""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import GalvatronError

# name → (module under galvatron_fx.commands, one-line help)
COMMANDS = {
    "inspect": ("inspect", "capture a model and print its layer table"),
    "profile-hardware": ("profile_hardware", "measure collectives, send/recv and overlap; write a hardware profile"),
    "profile-model": ("profile_model", "profile each layer type's time and memory; write a model profile"),
    "viz": ("viz", "draw a plan: HTML page, ONNX for Netron, Graphviz DOT"),
    "train": ("train", "train an example model under torchrun with a searched or given plan"),
    "search": ("search", "search the fastest hybrid-parallel plan under a memory budget (offline)"),
    "preprocess-data": ("preprocess_data", "tokenize a JSON-lines corpus into Megatron's indexed format (.bin + .idx)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="galvatron-fx", description="Automatic hybrid parallelism for PyTorch Transformers."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(f"galvatron_fx.commands.{module_name}")
        sub = subparsers.add_parser(
            name, help=help_text, description=module.__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except GalvatronError as error:
        print(f"galvatron-fx {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
