"""Train a small GPT-2 under torchrun, checkpointing every ``--every`` steps and resuming from the last
complete checkpoint on start (as after a torchrun restart).

    torchrun --standalone --nproc_per_node 2 --max-restarts 1 tests/checkpoint_resume_script.py ROOT \\
        [--steps 8] [--every 2] [--kill-rank 1 --kill-step 5]

Rank 0 appends ``attempt step loss`` to ROOT/losses.txt after every step. With ``--kill-rank``, that rank
SIGKILLs itself before step ``--kill-step`` of the first attempt (once: a marker file remembers it).
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist

import galvatron_fx
from galvatron_fx import runtime
from galvatron_fx.models import build_model, example_batch
from galvatron_fx.runtime import checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--kill-rank", type=int, default=-1)
    parser.add_argument("--kill-step", type=int, default=-1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    runtime.init_distributed(timeout_s=120)
    torch.manual_seed(0)
    model, _ = build_model("gpt2")
    batches = [example_batch("gpt2", model, 8, 16, seed=i) for i in range(2)]
    compiled = galvatron_fx.compile(
        model,
        example_kwargs=batches[0],
        plan=galvatron_fx.uniform_plan(sdp=True),
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-3, eps=1e-6),
    )
    last = checkpoint.latest(args.root / "checkpoints")
    if last is not None:
        compiled.load_checkpoint(last)
    rank, attempt = dist.get_rank(), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    marker = args.root / "killed"
    for step in range(compiled.trainer.steps_done, args.steps):
        if rank == args.kill_rank and step == args.kill_step and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        loss = compiled.train_step(batches[step % 2])
        if rank == 0:
            with open(args.root / "losses.txt", "a") as log:
                log.write(f"{attempt} {step} {loss!r}\n")
        if (step + 1) % args.every == 0:
            compiled.save_checkpoint(args.root / "checkpoints" / f"step{step + 1:05d}")
    runtime.shutdown()


if __name__ == "__main__":
    main()
