"""The options of ``galvatron-fx train`` and of the examples: what to train, on what data, with which plan,
how (optimizer, schedule, clipping), and what to save and log."""

from __future__ import annotations

import argparse

from galvatron_fx.plan import TP_MODES

# Galvatron's global flags (and the grid's): one strategy for every layer, the alternative to --plan and to a search
PLAN_FLAGS = ("pp", "tp", "tp_consecutive", "tp_mode", "tp_depth", "sdp", "chunks", "ckpt", "pipeline", "vtp", "vsp")


def add_training_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every option of a training run to ``parser``."""
    model = parser.add_argument_group("model and data")
    model.add_argument(
        "--size", choices=("small", "real"), default="small", help="built-in models: small config (CPU) or published"
    )
    model.add_argument("--data", default=None, metavar="PREFIX", help="indexed dataset (PREFIX.bin + PREFIX.idx)")
    model.add_argument("--seq", type=int, default=32, help="sequence length of text models")
    model.add_argument(
        "--synthetic-batches", type=int, default=2, help="without --data: random global batches the run cycles through"
    )
    model.add_argument("--eval-data", default=None, metavar="PREFIX", help="held-out indexed dataset")
    model.add_argument(
        "--eval-samples", type=int, default=None, help="samples held out of --data for evaluation (default 4 batches)"
    )
    model.add_argument("--eval-every", type=int, default=0, metavar="N", help="evaluate every N steps (0: never)")
    model.add_argument("--seed", type=int, default=0, help="initial weights, data order and dropout")

    plan = parser.add_argument_group("plan (default: search one)")
    plan.add_argument("--plan", default=None, help="plan JSON (ours or Galvatron's)")
    plan.add_argument("--search-space", default="full", help="full, 3d, dp+tp, dp+pp, dp, sdp, tp or pp")
    plan.add_argument("--cluster", default=None, help="a preset such as A100-80GB, or a cluster JSON; default: detect")
    plan.add_argument("--memory-budget", default=None, help='per-device budget such as "16GiB"; default: the device')
    plan.add_argument("--model-profile", default=None, metavar="JSON", help="from galvatron-fx profile-model")
    plan.add_argument("--hardware-profile", default=None, metavar="JSON", help="from galvatron-fx profile-hardware")
    plan.add_argument("--explain", action="store_true", help="say why the plan won, and what plain DP would need")
    flags = parser.add_argument_group("global strategy flags (Galvatron's; instead of --plan or a search)")
    flags.add_argument("--pp", type=int, default=None, help="pipeline stages")
    flags.add_argument("--tp", type=int, default=None, help="tensor-parallel degree of every layer")
    flags.add_argument(
        "--tp-consecutive", type=int, choices=(0, 1), default=None, help="1: TP groups on consecutive ranks"
    )
    flags.add_argument(
        "--tp-mode", choices=TP_MODES, default=None, help="1d (Megatron) or a grid: 2d (tp=q²), 2.5d, 3d (tp=q³)"
    )
    flags.add_argument("--tp-depth", type=int, default=None, help="2.5d: the grid's depth d (tp = q²·d)")
    flags.add_argument("--sdp", type=int, choices=(0, 1), default=None, help="1: ZeRO-3 instead of plain DP")
    flags.add_argument("--chunks", type=int, default=None, help="micro-batches per step")
    flags.add_argument("--ckpt", type=int, choices=(0, 1), default=None, help="1: activation checkpointing")
    flags.add_argument(
        "--pipeline", choices=("gpipe", "1f1b", "pipedream_flush"), default=None, help="pipeline schedule"
    )
    flags.add_argument("--vtp", type=int, default=None, help="vocab-parallel degree of embedding and head")
    flags.add_argument(
        "--vsp", type=int, choices=(0, 1), default=None, help="1: embedding and head sequence-parallel over --vtp ranks"
    )

    train = parser.add_argument_group("training")
    train.add_argument("--global-batch", type=int, default=16, help="samples per optimizer step")
    train.add_argument("--steps", type=int, default=10, help="total optimizer steps (a resumed run continues to it)")
    train.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (Adam, AdamW with --weight-decay)")
    train.add_argument("--lr-schedule", choices=("constant", "cosine", "linear"), default="constant")
    train.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps")
    train.add_argument("--min-lr-ratio", type=float, default=0.1, help="decay floor, a multiple of --lr")
    train.add_argument("--clip-grad", type=float, default=None, metavar="NORM", help="clip by the global norm")
    train.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decay (biases and norms spared)")
    train.add_argument(
        "--mixed-precision",
        choices=("fp32", "bf16"),
        default=None,
        help="default: bf16 on GPUs (as `galvatron-fx search` plans), fp32 on CPU",
    )

    out = parser.add_argument_group("checkpoints and logs")
    out.add_argument("--save", default=None, metavar="DIR", help="write checkpoints into DIR/step_N")
    out.add_argument("--save-every", type=int, default=0, metavar="N", help="every N steps, and at the end")
    out.add_argument("--resume", default=None, metavar="auto|DIR", help="auto: the latest checkpoint in --save")
    out.add_argument(
        "--export", default=None, metavar="DIR", help="at the end, the weights as a Hugging Face safetensors folder"
    )
    out.add_argument(
        "--log-file",
        "--log",
        dest="log",
        default=None,
        metavar="FILE",
        help="append each step's figures as JSON lines (write --log-file under torchrun, whose own parser takes "
        "--log for its --log-dir)",
    )
    out.add_argument("--log-every", type=int, default=1, metavar="N", help="print and log every N steps")
    out.add_argument("--tensorboard", default=None, metavar="DIR", help="TensorBoard scalars (needs tensorboard)")
    return parser
