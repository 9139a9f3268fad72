"""``galvatron-fx train`` under torchrun, with a failure injected: the rank ``--kill-rank`` SIGKILLs itself
before its ``--kill-step``-th optimizer step of the first attempt (torchrun's restart count 0), as a crashed
node would. Every other argument goes to the command line unchanged.

    torchrun --nproc_per_node 2 --max-restarts 1 tests/train_cli_script.py --kill-rank 1 --kill-step 5 \\
        train gpt2 --data PREFIX --save DIR --resume auto ...
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import torch

from galvatron_fx import cli
from galvatron_fx.compiled_model import CompiledModel


def main() -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--kill-rank", type=int, default=-1)
    parser.add_argument("--kill-step", type=int, default=-1)
    args, command_line = parser.parse_known_args()
    torch.set_num_threads(1)
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if first_attempt and int(os.environ.get("RANK", "0")) == args.kill_rank:
        train_step = CompiledModel.train_step

        def train_step_or_die(self, batch):
            if self.trainer.steps_done == args.kill_step:
                os.kill(os.getpid(), signal.SIGKILL)
            return train_step(self, batch)

        CompiledModel.train_step = train_step_or_die
    return cli.main(command_line)


if __name__ == "__main__":
    sys.exit(main())
