"""Starting processes: ``init_distributed`` under torchrun (env rendezvous, one node or many), under SLURM's
``srun`` or Open MPI's ``mpirun`` without torchrun, or alone as one process; and ``spawn``, which runs a function
on N local processes for tests and demos.

``runtime.launchers.launch_environment`` maps each launcher's variables onto rank, world size, local rank and
rendezvous address.

``spawn`` gives each process one CPU thread and a gloo group (or NCCL on one GPU each when asked), saves
what the function returns, and watches the processes: when one dies, the others get ``grace_s`` to fail on
their own (their collectives error out when a peer's connection closes, or time out after
``collective_timeout_s``), then are killed, and ``SpawnError`` names the rank that failed and why.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from . import groups
from .launchers import export_torchrun_variables, launch_environment


class SpawnError(RuntimeError):
    """A spawned rank failed or the group ran past its time limit."""


def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> torch.device:
    """Join the process group from the launcher's environment (``launch_environment``: torchrun, srun, Open MPI's
    mpirun, or one process with no launcher); returns this rank's device (``cuda:LOCAL_RANK`` with NCCL, modulo
    the GPUs this process sees, else the CPU)."""
    backend = backend or groups.default_backend()
    launch = launch_environment(os.environ)
    if backend == "nccl":
        torch.cuda.set_device(launch.local_rank % max(torch.cuda.device_count(), 1))
    if dist.is_initialized():
        return groups.current_device()
    timeout = datetime.timedelta(seconds=timeout_s)
    if launch.launcher == "torchrun" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent keeps one store across restarts, and the backend publishes each rank's address under
        # fixed keys: join under a prefix per restart so that a restarted rank never reads a dead peer's address.
        store = dist.TCPStore(launch.master_addr, launch.master_port, is_master=False, timeout=timeout)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            backend,
            store=dist.PrefixStore(f"attempt{attempt}", store),
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timeout,
        )
    elif launch.world_size == 1:  # one process needs no rendezvous, nor a port that another job may hold
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        if launch.launcher != "torchrun":
            export_torchrun_variables(launch)
        dist.init_process_group(
            backend, init_method="env://", rank=launch.rank, world_size=launch.world_size, timeout=timeout
        )
    return groups.current_device()


def shutdown() -> None:
    """Leave the process group and forget its cached sub-groups."""
    groups.clear_cache()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    collective_timeout_s: float,
    folder: str,
    fn: Callable[..., Any],
    args: tuple,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=collective_timeout_s)
        )
        result = fn(rank, world_size, *args)
        # rank 0 hosts the store: a rank done early waits for the others, which may still be creating
        # groups through it (a gloo group of one, say, needs no peer but the store)
        dist.barrier()
        torch.save(result, Path(folder) / f"{rank}.pt")
    except BaseException:
        (Path(folder) / f"{rank}.err").write_text(traceback.format_exc())
        os._exit(1)  # skip destroy_process_group: peers may be gone and it could block
    shutdown()


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout_s: float = 600.0,
    collective_timeout_s: float = 60.0,
    grace_s: float = 30.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` fresh processes; return their results by rank.

    ``fn`` must be importable (module level) and return tensors, numbers, strings, lists or dicts of them.
    Raises SpawnError when a rank fails (with its traceback) or the whole run exceeds ``timeout_s``.
    """
    context = mp.get_context("spawn")
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="galvatron_spawn_") as folder:
        processes = [
            context.Process(
                target=_entry,
                args=(rank, world_size, port, backend, collective_timeout_s, folder, fn, args),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for process in processes:
            process.start()
        start = time.monotonic()
        first_failure: float | None = None
        failed_order: list[int] = []  # ranks in the order they were seen failing

        def note_failures(now: float) -> float | None:
            for rank, process in enumerate(processes):
                if process.exitcode not in (None, 0) and rank not in failed_order:
                    failed_order.append(rank)
            return first_failure or (now if failed_order else None)

        while any(p.is_alive() for p in processes):
            now = time.monotonic()
            first_failure = note_failures(now)
            if now - start > timeout_s or (first_failure is not None and now - first_failure > grace_s):
                break
            time.sleep(0.05)
        note_failures(time.monotonic())  # ranks that ended between the last poll and the loop's end
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join()
        return _collect(processes, Path(folder), time.monotonic() - start, timeout_s, failed_order)


def _collect(processes: list, folder: Path, elapsed_s: float, timeout_s: float, failed_order: list[int]) -> list[Any]:
    failures = []
    for rank, process in enumerate(processes):
        error = folder / f"{rank}.err"
        if error.exists():
            failures.append(f"rank {rank} raised:\n{error.read_text().rstrip()}")
        elif process.exitcode != 0:
            how = (
                "was killed after the others failed or the time limit"
                if process.exitcode == -9
                else f"exited with code {process.exitcode} without an error report"
            )
            failures.append(f"rank {rank} {how}")
    if failures:
        # A rank that died without a report (crash, os._exit, OOM kill) is the likely cause: the others' errors
        # usually report its absence. Among those, and otherwise, the first seen failing.
        silent = [rank for rank in failed_order if not (folder / f"{rank}.err").exists()]
        first = (silent or failed_order or [None])[0]
        headline = (
            f"{len(failures)} of {len(processes)} ranks failed after {elapsed_s:.1f} s"
            + (f" (first: rank {first})" if first is not None else "")
            + (f"; the run exceeded its {timeout_s:.0f} s limit" if elapsed_s > timeout_s else "")
        )
        raise SpawnError(headline + "\n" + "\n".join(failures))
    return [torch.load(folder / f"{rank}.pt", weights_only=True) for rank in range(len(processes))]
