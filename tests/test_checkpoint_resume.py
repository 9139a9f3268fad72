"""Kill-and-resume under torchrun: one rank is SIGKILLed in the middle of training, torchrun restarts the
group, training resumes from the last checkpoint, and the loss of every step equals an uninterrupted run's."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("checkpoint_resume_script.py")
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(root: Path, *extra: str) -> subprocess.Popen:
    root.mkdir()
    command = [
        str(TORCHRUN),
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--max-restarts",
        "1",
        "--monitor-interval",
        "0.5",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{_port()}",
        str(SCRIPT),
        str(root),
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _losses(root: Path) -> list[tuple[int, int, float]]:
    return [
        (int(a), int(s), float(x))
        for a, s, x in (line.split() for line in (root / "losses.txt").read_text().splitlines())
    ]


def test_sigkilled_rank_resumes_from_the_last_checkpoint_with_the_same_losses(tmp_path):
    codes, outputs = [], []
    for root, extra in (("plain", ()), ("killed", ("--kill-rank", "1", "--kill-step", "5"))):
        process = _launch(tmp_path / root, *extra)  # one after the other: the machine has few cores
        try:
            outputs.append(process.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            process.kill()  # the agent; its workers fail in their collectives after the script's timeout
            raise
        codes.append(process.returncode)
    assert codes[0] == 0, outputs[0][-3000:]
    assert codes[1] == 0, outputs[1][-3000:]
    assert (tmp_path / "killed" / "killed").exists()  # the kill happened
    reference = {step: loss for _, step, loss in _losses(tmp_path / "plain")}
    assert sorted(reference) == list(range(8))
    records = _losses(tmp_path / "killed")
    first = [step for attempt, step, _ in records if attempt == 0]
    second = [step for attempt, step, _ in records if attempt == 1]
    assert first == [0, 1, 2, 3, 4]  # rank 1 died before step 5
    assert second == [4, 5, 6, 7]  # resumed from the checkpoint after step 4's predecessor (steps_done == 4)
    resumed = {step: loss for _, step, loss in records}  # the restart's losses replace the first attempt's
    assert resumed == reference  # exactly: same plan, same arithmetic
    assert reference[7] < reference[0]
