"""What every benchmark shares: the benchmark models, step timing, peak memory per rank, FLOPs and MFU,
tables and JSON under benchmarks/results/.

Peak memory per rank (``peak_step_bytes``):
- on CUDA, ``torch.cuda.max_memory_allocated`` over one training step (the caching allocator's count of
  live tensor bytes, the figure the field reports);
- on CPU, the same quantity at the allocator level: ``torch.profiler`` with ``profile_memory=True``
  records every allocation and free of the CPU allocator with a running total of bytes allocated. Two
  properties of that total need care. It only drops for frees on a thread that runs the profiler, and
  gloo's worker threads free the copies a collective makes (a reduce-scatter clones its input) when it
  completes: by default such a free is never counted, and the total stays high for the rest of the
  step by a collective buffer or more, on some steps and ranks and not on others. ``peak_step_bytes``
  therefore turns on the allocator's own accounting of every free (``caffe2_report_cpu_memory_usage``,
  left on for the rest of the process so that no allocation goes unaccounted). And the total is
  process-wide: what earlier sessions left in it is taken off (the total at the session's first event).
  Two steps run under the profiler and the second is measured: its peak is
  ``bytes live before the first`` (parameters, gradients and optimizer states, counted from the tensors
  themselves; DTensors by their local shard) plus the largest running total inside the second step. The
  first step makes every buffer the runtime keeps from one step to the next (reduce-scatter inputs,
  pipeline send buffers) an allocation the profiler saw, so that its free is counted too; the total is
  then exact in steady state. Memory that is not a tensor (gloo's buffers, Python objects) is not
  counted, on either device; the cost model does not predict it either.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent

# Benchmark configurations: big enough that a CPU step is not dominated by Python overhead, small enough
# that a plan runs in seconds on shared cores. "tiny" is what the smoke tests run.
SHAPES = {
    "bench": dict(layers=4, hidden=256, heads=4, ffn=1024, vocab=1024, seq=64),
    "tiny": dict(layers=2, hidden=32, heads=2, ffn=64, vocab=64, seq=8),
}


def build_model(name: str, shape: str = "bench", batch: int = 8, seq: int | None = None, *, seed: int = 0):
    """``(model, batch kwargs)`` for ``gpt2``, ``bert`` or ``llama`` at a SHAPES entry, fp32, dropout 0,
    fixed weights (``torch.manual_seed(0)``) and a fixed batch drawn from ``seed``."""
    import transformers

    transformers.logging.set_verbosity_error()
    s = SHAPES[shape]
    seq = seq or s["seq"]
    torch.manual_seed(0)
    if name == "gpt2":
        config = transformers.GPT2Config(
            n_layer=s["layers"],
            n_embd=s["hidden"],
            n_head=s["heads"],
            n_inner=s["ffn"],
            vocab_size=s["vocab"],
            n_positions=max(seq, 128),
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = transformers.GPT2LMHeadModel(config)
    elif name == "bert":
        config = transformers.BertConfig(
            num_hidden_layers=s["layers"],
            hidden_size=s["hidden"],
            num_attention_heads=s["heads"],
            intermediate_size=s["ffn"],
            vocab_size=s["vocab"],
            max_position_embeddings=max(seq, 128),
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        model = transformers.BertForMaskedLM(config)
    elif name == "llama":
        config = transformers.LlamaConfig(
            num_hidden_layers=s["layers"],
            hidden_size=s["hidden"],
            num_attention_heads=s["heads"],
            num_key_value_heads=s["heads"],
            intermediate_size=s["ffn"],
            vocab_size=s["vocab"],
            max_position_embeddings=max(seq, 128),
            attention_dropout=0.0,
            tie_word_embeddings=False,
        )
        model = transformers.LlamaForCausalLM(config)
    else:
        raise ValueError(f"unknown benchmark model {name!r}")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, s["vocab"], (batch, seq), generator=generator)
    kwargs: dict[str, Any] = {"input_ids": ids, "labels": torch.roll(ids, -1, dims=1)}
    if name != "bert":
        kwargs["use_cache"] = False
    return model, kwargs


# -- devices and processes ---------------------------------------------------------------------------
def backend() -> str:
    """NCCL on GPUs, gloo on CPU: the scripts run unchanged on both."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def spawn(fn: Callable, world_size: int, *args, timeout_s: float = 3000.0) -> list[Any]:
    """``fn(rank, world_size, *args)`` on ``world_size`` fresh processes (one CPU thread each, or one GPU)."""
    from galvatron_fx.runtime import spawn as runtime_spawn

    return runtime_spawn(fn, world_size, *args, backend=backend(), timeout_s=timeout_s, collective_timeout_s=300.0)


def time_steps(step: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds of ``repeats`` calls of ``step`` after ``warmup`` untimed ones; every rank starts each timed
    call together (a barrier), so the figure is the step's wall time, not a rank's share of it."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        sync(device)
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a DTensor counts its local shard)."""
    from torch.distributed.tensor import DTensor

    seen, total = set(), 0
    for tensor in tensors:
        if tensor is None:
            continue
        if isinstance(tensor, DTensor):
            tensor = tensor.to_local()
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen and storage.nbytes():
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def training_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    """Parameters, gradients and optimizer states: what is live between two steps."""
    out = []
    for param in module.parameters():
        out += [param, param.grad]
    if optimizer is not None:
        for state in optimizer.state.values():
            out += [v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    return out


def trainer_peak_bytes(trainer, batch: dict[str, Any]) -> int:
    """``peak_step_bytes`` of ``trainer.step(batch)``: the state live between steps is the stage's
    parameters, gradients and optimizer states, and the DDP buckets that hold gradients between steps."""
    return peak_step_bytes(
        lambda: trainer.step(batch),
        trainer.device,
        lambda: training_state(trainer.stage, trainer.optimizer) + trainer.sync.grad_buffers(),
    )


def peak_step_bytes(step: Callable[[], Any], device: torch.device, state: Callable[[], list[torch.Tensor]]) -> int:
    """Peak bytes of live tensors on this rank during a call of ``step`` in steady state (see the module
    docstring; ``step`` runs twice on CPU); ``state()`` lists the tensors live before the step (parameters,
    gradients, optimizer states)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    from torch.profiler import ProfilerActivity, profile, record_function

    _count_cpu_frees_on_every_thread()
    before = tensor_bytes(state())
    # The readings are the allocator's total against its total when profiling began: garbage of earlier work
    # (a previous trainer's reference cycles) collected inside the window would lower every reading by its
    # bytes, by chance. Collect it first, and let no collection run while profiling.
    gc.collect()
    gc.disable()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
            with record_function(_MEASURED):
                step()
    finally:
        gc.enable()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    window = next(e for e in events if e.get("name") == _MEASURED and e.get("ph") == "X")
    start, end = window["ts"], window["ts"] + window["dur"]
    memory = sorted(
        (e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0),
        key=lambda e: e["ts"],
    )
    if not memory:
        return before
    at_start = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"]  # left by earlier sessions
    totals = [e["args"]["Total Allocated"] - at_start for e in memory if start <= e["ts"] <= end]
    return before + max(totals, default=0)


_MEASURED = "galvatron_fx.benchmarks.measured_step"


def _count_cpu_frees_on_every_thread() -> None:
    """Turn on c10's ``caffe2_report_cpu_memory_usage``: the CPU allocator then keeps its running total
    of allocated bytes for frees on every thread, not only on threads that run the profiler. Left on: turned
    off, allocations made while it was on could later be freed uncounted."""
    import ctypes

    library = Path(torch.__file__).parent / "lib" / ("libc10.dylib" if sys.platform == "darwin" else "libc10.so")
    try:
        ctypes.c_bool.in_dll(ctypes.CDLL(str(library)), "FLAGS_caffe2_report_cpu_memory_usage").value = True
    except (OSError, ValueError) as error:
        import warnings

        warnings.warn(
            f"cannot turn on the CPU allocator's accounting in {library} ({error}): frees on gloo's "
            "threads go uncounted, so CPU peak memory may read high by a collective's buffers",
            stacklevel=2,
        )


# -- FLOPs and MFU -------------------------------------------------------------------------------------
def model_flops_per_sample(model_profile) -> float:
    """Forward + backward FLOPs of one sample (graph-counted; recomputation not included, as MFU wants)."""
    parts = [model_profile.types[t] for t in model_profile.layer_types] + [
        model_profile.prologue,
        model_profile.epilogue,
    ]
    return float(sum(p.fwd_flops_per_sample + p.bwd_flops_per_sample for p in parts))


def device_peak_flops(mixed_precision: str = "fp32") -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from): the cluster preset of the detected device
    (datasheet dense peak on GPUs; the CPU entry on CPU), for the training dtype."""
    from galvatron_fx.cluster import Cluster

    cluster = Cluster.detect({"WORLD_SIZE": "1"})
    dtype = "bf16" if mixed_precision == "bf16" else "fp32"
    peak = cluster.peak_flops.get(dtype) or cluster.peak_flops.get("fp32")
    return float(peak), f"Cluster preset {cluster.device!r} peak_flops[{dtype}] = {peak / 1e12:.3g} TFLOP/s per device"


def mfu(flops_per_step: float, step_s: float, world_size: int, peak_flops: float) -> float:
    """Model FLOPs utilisation: model FLOPs per second over the peak of all devices."""
    return flops_per_step / step_s / (world_size * peak_flops) if step_s > 0 else 0.0


# -- output --------------------------------------------------------------------------------------------
def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]], file=sys.stdout) -> str:
    """Print ``rows`` as a Markdown table; ``columns`` are (key, header, format). Returns the text."""

    def cell(row, key, fmt):
        value = row.get(key)
        if value is None:
            return "-"
        return format(value, fmt) if fmt else str(value)

    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r, k, f) for k, _, f in columns) + " |" for r in rows]
    text = "\n".join(lines)
    print(text, file=file, flush=True)
    return text


def environment() -> dict[str, Any]:
    """Where the figures were taken: host, torch, device, load."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "backend": backend(),
        "load_average_1_5_15_min": load,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_json(name: str, payload: dict[str, Any], folder: Path | None = None) -> Path:
    """Write ``payload`` (with the environment) to ``<folder>/<name>.json``; returns the path."""
    folder = Path(folder) if folder else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(
        json.dumps({"benchmark": name, "environment": environment(), **payload}, indent=2, default=str) + "\n"
    )
    return path


def command_line() -> str:
    """The command that is running, as a user would type it again."""
    return "python " + " ".join(
        [str(Path(sys.argv[0]).resolve().relative_to(REPO)) if Path(sys.argv[0]).exists() else sys.argv[0]]
        + sys.argv[1:]
    )


def spearman(x, y) -> float:
    """Spearman rank correlation (average ranks for ties)."""

    def ranks(values):
        values = np.asarray(values, dtype=float)
        order = values.argsort()
        r = np.empty(len(values))
        r[order] = np.arange(len(values))
        for v in np.unique(values):  # ties share their mean rank
            r[values == v] = r[values == v].mean()
        return r

    if len(x) < 2:
        return float("nan")
    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])
