"""The figures a user watches during a run, and where they go.

Per logged step: loss, learning rate, gradient norm (before clipping), samples/s and tokens/s, MFU and the
peak memory of every rank. ``StepTimer`` turns wall-clock time and the step's size into rates;
``flops_per_token`` is the field's estimate of training FLOPs, ``6 N + 12 L d T`` (N parameters, each
used in one multiply-add forward and two backward; plus attention's score and value products, which no
parameter counts: L layers of width d over T positions), as in PaLM's and nanoGPT's MFU. MFU is achieved
FLOPs over the peak of every device of the run, at the precision it trains in (the cluster's datasheet).

Sinks: ``JsonLinesLog`` appends one JSON object per line (a resumed run continues the same file),
``TensorBoardLog`` writes scalars where TensorBoard is installed, ``ConsoleProgress`` prints one line per
logged step with a bar and the time left. Only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist

from galvatron_fx.errors import ConfigError
from galvatron_fx.units import format_bytes

_WIDTH_NAMES = ("hidden_size", "n_embd", "d_model", "embed_dim", "dim")


def flops_per_token(model: torch.nn.Module, num_layers: int, seq: int) -> float:
    """Training FLOPs per token, ``6 N + 12 L d T``: N the model's parameters (tied ones once), L its
    ``num_layers`` blocks, d its width read from the config (``hidden_size``, ``n_embd``, ``d_model``...; the
    attention term is left out when the model names none), T the sequence length."""
    params = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    config = getattr(model, "config", None)
    width = next((getattr(config, name) for name in _WIDTH_NAMES if isinstance(getattr(config, name, None), int)), 0)
    return 6.0 * params + 12.0 * num_layers * width * seq


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    """This process's peak memory so far and what measured it: the CUDA caching allocator's peak of allocated
    bytes on a GPU, else the process's peak resident set (``ru_maxrss``: Linux counts KiB)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale, "max_rss"


def gather_peak_memory(device: torch.device) -> list[int]:
    """Every rank's peak memory, on every rank (one small all-gather: call it on every rank together)."""
    mine = torch.tensor([peak_memory_bytes(device)[0]], dtype=torch.int64, device=device)
    out = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [int(t.item()) for t in out]


@dataclass(frozen=True)
class StepFigures:
    """What one logged step reports. Rates cover the steps since the previous logged one."""

    step: int
    total_steps: int
    loss: float
    lr: float
    grad_norm: float
    samples_per_s: float
    tokens_per_s: float | None
    mfu: float | None
    step_time_s: float
    elapsed_s: float
    peak_memory_bytes: list[int]
    memory_source: str
    eval_loss: float | None = None

    def record(self) -> dict[str, Any]:
        """The figures as one JSON-safe dict (non-finite numbers as strings, which JSON has no literal for)."""
        return {k: (repr(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


class StepTimer:
    """Rates of the steps between two ``lap`` calls: samples/s, tokens/s and MFU."""

    def __init__(self, global_batch: int, tokens_per_sample: int | None, flops_per_token: float, peak_flops: float):
        self.global_batch, self.tokens_per_sample = global_batch, tokens_per_sample
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.started = self._last = time.perf_counter()

    def lap(self, steps: int) -> tuple[float, float, float | None, float | None]:
        """(seconds per step, samples/s, tokens/s, MFU) over the last ``steps`` steps."""
        now = time.perf_counter()
        seconds, self._last = max(now - self._last, 1e-9), now
        samples_per_s = steps * self.global_batch / seconds
        if self.tokens_per_sample is None:
            return seconds / steps, samples_per_s, None, None
        tokens_per_s = samples_per_s * self.tokens_per_sample
        mfu = tokens_per_s * self.flops_per_token / self.peak_flops if self.peak_flops > 0 else None
        return seconds / steps, samples_per_s, tokens_per_s, mfu

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started


class JsonLinesLog:
    """Appends each step's figures to ``path`` as one JSON line; the run's settings first, as ``{"run": ...}``."""

    def __init__(self, path: str | Path, run: dict[str, Any]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = self.path.open("a", encoding="utf-8")
        self._write({"run": run})

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a run stopped at any moment keeps every line written so far

    def __call__(self, figures: StepFigures) -> None:
        self._write(figures.record())

    def close(self) -> None:
        self._file.close()


class TensorBoardLog:
    """Scalars under ``train/`` and ``eval/`` for TensorBoard, in folder ``log_dir``."""

    def __init__(self, log_dir: str | Path, writer=None):
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "--tensorboard needs the tensorboard package, which is not installed",
                    "pip install tensorboard, or drop --tensorboard (--log FILE writes the same figures as JSON)",
                ) from None
            writer = SummaryWriter(str(log_dir))
        self.writer = writer

    def __call__(self, figures: StepFigures) -> None:
        scalars = {
            "train/loss": figures.loss,
            "train/lr": figures.lr,
            "train/grad_norm": figures.grad_norm,
            "train/samples_per_s": figures.samples_per_s,
            "train/tokens_per_s": figures.tokens_per_s,
            "train/mfu": figures.mfu,
            "train/peak_memory_gib": max(figures.peak_memory_bytes) / 2**30,
            "eval/loss": figures.eval_loss,
        }
        for tag, value in scalars.items():
            if value is not None:
                self.writer.add_scalar(tag, value, figures.step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class ConsoleProgress:
    """One line per logged step on ``stream``: a bar, the figures, elapsed time and the time left."""

    def __init__(self, stream: IO[str] | None = None, width: int = 20):
        self.stream, self.width = stream or sys.stdout, width

    def __call__(self, figures: StepFigures) -> None:
        done = figures.step / max(figures.total_steps, 1)
        filled = round(self.width * done)
        parts = [
            f"step {figures.step:>{len(str(figures.total_steps))}}/{figures.total_steps}",
            f"[{'#' * filled}{'.' * (self.width - filled)}]",
            f"loss {figures.loss:.4f}",
        ]
        if figures.eval_loss is not None:
            parts.append(f"eval {figures.eval_loss:.4f}")
        parts += [f"lr {figures.lr:.2e}", f"gnorm {figures.grad_norm:.3f}", f"{figures.samples_per_s:.1f} samples/s"]
        if figures.tokens_per_s is not None:
            parts.append(f"{figures.tokens_per_s:,.0f} tok/s")
        if figures.mfu is not None:
            parts.append(f"MFU {100 * figures.mfu:.2f}%")
        parts.append(f"mem {format_bytes(max(figures.peak_memory_bytes))}")
        left = (figures.total_steps - figures.step) * figures.step_time_s
        parts.append(f"{_clock(figures.elapsed_s)} < ETA {_clock(left)}")
        print("  ".join(parts), file=self.stream, flush=True)

    def close(self) -> None:
        pass


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
