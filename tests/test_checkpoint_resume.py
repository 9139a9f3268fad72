"""``galvatron-fx train`` on real text, killed and resumed under torchrun: one rank is SIGKILLed in the middle
of a run, torchrun restarts the group, ``--resume auto`` continues from the last checkpoint, and every step's
loss, gradient norm and learning rate equal an uninterrupted run's. The JSON log carries every figure, and
the loss falls."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from galvatron_fx import cli

SCRIPT = Path(__file__).with_name("train_cli_script.py")
TORCHRUN = Path(sys.executable).with_name("torchrun")
STEPS, KILL_STEP = 8, 5
FIGURES = {"loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "mfu", "peak_memory_bytes", "step_time_s"}


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """The first files of Python's standard library, tokenized to bytes in Megatron's indexed format."""
    prefix = str(tmp_path_factory.mktemp("data") / "stdlib")
    assert cli.main(["preprocess-data", "--stdlib", "--max-files", "20", "--output-prefix", prefix]) == 0
    return prefix


def _train(root: Path, corpus: str, ranks: int, *kill: str) -> subprocess.CompletedProcess:
    root.mkdir()
    command = [
        str(TORCHRUN),
        "--nnodes=1",
        f"--nproc_per_node={ranks}",
        "--max-restarts=1",
        "--monitor-interval=0.5",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{_port()}",
        str(SCRIPT),
        *kill,
        "train",
        "gpt2",
        f"--data={corpus}",
        "--seq=24",  # head dim 16, 4 heads: no size equals another
        "--global-batch=8",
        f"--steps={STEPS}",
        "--sdp=1",
        "--chunks=2",
        "--lr=3e-3",
        "--lr-schedule=cosine",
        "--warmup-steps=2",
        "--clip-grad=0.5",
        "--weight-decay=0.1",
        "--eval-every=4",
        "--eval-samples=8",
        f"--save={root / 'ckpt'}",
        "--save-every=2",
        "--resume=auto",
        f"--log-file={root / 'log.jsonl'}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=400)


def _records(root: Path) -> tuple[list[dict], dict[int, dict]]:
    """The run headers, and the last record of each step (a restart's records replace the first attempt's)."""
    lines = [json.loads(line) for line in (root / "log.jsonl").read_text().splitlines()]
    return [r["run"] for r in lines if "run" in r], {r["step"]: r for r in lines if "step" in r}


def test_a_killed_run_resumes_with_the_same_figures(tmp_path, corpus):
    plain = _train(tmp_path / "plain", corpus, 2)  # one after the other: the machine has few cores
    assert plain.returncode == 0, plain.stdout[-3000:] + plain.stderr[-3000:]
    killed = _train(tmp_path / "killed", corpus, 2, "--kill-rank=1", f"--kill-step={KILL_STEP}")
    assert killed.returncode == 0, killed.stdout[-3000:] + killed.stderr[-3000:]

    runs, reference = _records(tmp_path / "plain")
    assert len(runs) == 1 and runs[0]["start_step"] == 0 and sorted(reference) == list(range(1, STEPS + 1))
    for record in reference.values():
        assert FIGURES <= set(record) and len(record["peak_memory_bytes"]) == 2, record
        assert record["tokens_per_s"] > 0 and 0 < record["mfu"] < 1 and min(record["peak_memory_bytes"]) > 0
    assert reference[4]["eval_loss"] is not None and reference[STEPS]["eval_loss"] is not None
    assert reference[3]["eval_loss"] is None
    assert reference[STEPS]["loss"] < reference[1]["loss"] - 0.1, "the loss falls"
    assert reference[STEPS]["lr"] < reference[3]["lr"], "the cosine decay"

    runs, resumed = _records(tmp_path / "killed")
    assert [r["start_step"] for r in runs] == [0, 4], runs  # rank 1 died before step 6; the last checkpoint: 4
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step, record in reference.items():  # exactly: same plan, same data order, same arithmetic
        for figure in ("loss", "grad_norm", "lr", "eval_loss"):
            assert resumed[step][figure] == record[figure], (step, figure, resumed[step], record)
