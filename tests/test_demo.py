"""The README's demo on 4 gloo ranks, as a new user runs it: GPT-2 on Python's standard library text under a
memory budget plain data parallelism does not meet. The search must find a plan that is not plain DP, say why
(``--explain``), and the loss must fall."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from galvatron_fx import cli

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "gpt2" / "train.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_demo_trains_a_hybrid_plan_on_stdlib_text(tmp_path):
    prefix = str(tmp_path / "stdlib")
    assert cli.main(["preprocess-data", "--stdlib", "--max-files", "20", "--output-prefix", prefix]) == 0
    command = [
        str(TORCHRUN),
        "--nproc_per_node=4",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{_port()}",
        str(EXAMPLE),
        f"--data={prefix}",
        "--memory-budget=3.5MiB",
        "--explain",
        "--steps=10",
        "--warmup-steps=2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert re.search(r"plain data parallelism would need .* it does not fit the 3\.50 MiB budget", out), out
    assert "explain: searched" in out
    plan = re.search(r"plan for 4 devices: pp (\d+).*\n", out)
    strategies = re.findall(r"GPT2Block\s+\d+\s+(\S+(?: ckpt)?)", out)
    assert plan and strategies, out
    assert int(plan.group(1)) > 1 or any(s != "dp4" for s in strategies), (plan.group(0), strategies)
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", out)]
    assert len(losses) == 10 and losses[-1] < losses[0] - 0.3, losses
