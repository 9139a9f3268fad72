"""Each launcher's variables, mapped onto one description of this process's place in the job.

``launch_environment(env)`` is the whole mapping from a launcher's variables to rank, world size, local rank
and rendezvous address: a pure function of the environment, so that each launcher's conventions (torchrun,
SLURM's ``srun``, Open MPI's ``mpirun``, or one process with none) are tested without launching anything.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

from galvatron_fx.errors import ConfigError

DEFAULT_MASTER_PORT = 29500  # torchrun's default, for launchers that name no port


@dataclass(frozen=True)
class LaunchEnvironment:
    """Where this process stands in the job, as its launcher described it.

    ``launcher``: ``"torchrun"`` (torchrun, or anything setting ``RANK``/``WORLD_SIZE``), ``"mpirun"`` (Open MPI),
    ``"srun"`` (SLURM) or ``"none"`` (one process, no launcher). ``local_rank`` also picks the GPU.
    ``local_world_size``: processes on this node where the launcher says so, else ``None``."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str
    local_world_size: int | None = None


def launch_environment(env: Mapping[str, str]) -> LaunchEnvironment:
    """Map a launcher's environment variables onto rank, world size, local rank and rendezvous address.

    In order of precedence:

    - torchrun: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``;
    - Open MPI's mpirun: ``OMPI_COMM_WORLD_RANK``, ``OMPI_COMM_WORLD_SIZE``, ``OMPI_COMM_WORLD_LOCAL_RANK``;
      the address is ``MASTER_ADDR``, required when the ranks span several nodes (mpirun has no rendezvous host
      of its own), else 127.0.0.1;
    - SLURM's srun: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``; the address is ``MASTER_ADDR`` if set,
      else the first host of the step's node list (``SLURM_STEP_NODELIST``, else ``SLURM_NODELIST`` or
      ``SLURM_JOB_NODELIST``, compressed lists such as ``node[003-005,007],gpu01`` included);
    - nothing: one process.

    ``MASTER_PORT`` comes from the environment, else ``DEFAULT_MASTER_PORT``. Open MPI comes before SLURM because
    mpirun started inside a SLURM allocation hands its processes the allocation's ``SLURM_PROCID``, the same in
    every one. Raises ConfigError naming the variable at fault and the remedy.
    """
    if "RANK" in env or "WORLD_SIZE" in env:
        rank, world = _env_int(env, "RANK", "torchrun"), _env_int(env, "WORLD_SIZE", "torchrun")
        local = _env_int(env, "LOCAL_RANK", "torchrun") if "LOCAL_RANK" in env else 0
        local_world = _env_int(env, "LOCAL_WORLD_SIZE", "torchrun") if "LOCAL_WORLD_SIZE" in env else None
        addr = env.get("MASTER_ADDR") or None
        if addr is None and world > 1:
            raise ConfigError(
                f"RANK and WORLD_SIZE={world} are set but MASTER_ADDR is not",
                "launch with torchrun, or export MASTER_ADDR (the host of rank 0) and MASTER_PORT",
            )
        return _checked(LaunchEnvironment(rank, world, local, addr or "127.0.0.1", _port(env), "torchrun", local_world))
    if "OMPI_COMM_WORLD_RANK" in env:
        rank, world = _env_int(env, "OMPI_COMM_WORLD_RANK", "mpirun"), _env_int(env, "OMPI_COMM_WORLD_SIZE", "mpirun")
        local = _env_int(env, "OMPI_COMM_WORLD_LOCAL_RANK", "mpirun")
        local_world = (
            _env_int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", "mpirun") if "OMPI_COMM_WORLD_LOCAL_SIZE" in env else None
        )
        addr = env.get("MASTER_ADDR") or None
        if addr is None:
            if local_world != world:  # several nodes, or mpirun did not say
                raise ConfigError(
                    f"Open MPI runs {world} ranks on several nodes and MASTER_ADDR is not set",
                    "export MASTER_ADDR as the host of rank 0 to every rank, e.g. "
                    "mpirun -x MASTER_ADDR=$(hostname) -x MASTER_PORT=29500 ...",
                )
            addr = "127.0.0.1"
        return _checked(LaunchEnvironment(rank, world, local, addr, _port(env), "mpirun", local_world))
    if "SLURM_PROCID" in env:
        rank, world = _env_int(env, "SLURM_PROCID", "srun"), _env_int(env, "SLURM_NTASKS", "srun")
        local = _env_int(env, "SLURM_LOCALID", "srun")
        addr = env.get("MASTER_ADDR") or None
        if addr is None:
            name = next(
                (n for n in ("SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_JOB_NODELIST") if env.get(n)), None
            )
            if name is None:
                if world > 1:
                    raise ConfigError(
                        f"srun runs {world} tasks but SLURM_NODELIST is not set",
                        "launch with srun inside an allocation, or export MASTER_ADDR (the host of rank 0)",
                    )
                addr = "127.0.0.1"
            else:
                addr = first_host(env[name], name)
        return _checked(LaunchEnvironment(rank, world, local, addr, _port(env), "srun"))
    return LaunchEnvironment(0, 1, 0, env.get("MASTER_ADDR") or "127.0.0.1", _port(env), "none", 1)


def _env_int(env: Mapping[str, str], name: str, launcher: str) -> int:
    value = env.get(name)
    if value is None:
        raise ConfigError(
            f"environment variable {name} is not set, though other {launcher} variables are",
            f"launch every process with {launcher}, or unset the {launcher} variables to run one process",
        )
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ConfigError(
            f"environment variable {name}={value!r} is not a whole number", f"unset {name} or give an integer"
        ) from None
    if number < 0:
        raise ConfigError(f"environment variable {name}={value!r} is negative", f"give {name} >= 0")
    return number


def _port(env: Mapping[str, str]) -> int:
    value = env.get("MASTER_PORT") or str(DEFAULT_MASTER_PORT)
    try:
        port = int(value.strip())
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise ConfigError(f"MASTER_PORT={value!r} is not a port number", "export MASTER_PORT between 1 and 65535")
    return port


def _checked(launch: LaunchEnvironment) -> LaunchEnvironment:
    if launch.world_size < 1 or launch.rank >= launch.world_size:
        raise ConfigError(
            f"{launch.launcher} gives rank {launch.rank} of world size {launch.world_size}",
            "check the launcher's rank and size variables: the rank must be below the world size",
        )
    return launch


_NODELIST_TOKEN = re.compile(r"([^\[\],]*)(?:\[([^\[\]]*)\])?")


def expand_nodelist(nodelist: str, name: str = "SLURM_NODELIST") -> list[str]:
    """Hosts of a SLURM node list, in order: ``node[003-005,007],gpu01`` → node003, node004, node005, node007,
    gpu01. Bracket ranges keep their zero padding; several bracket groups in one name expand as a product
    (``r[1-2]n[1-2]`` → r1n1, r1n2, r2n1, r2n2). ConfigError naming ``name`` when the list is malformed."""
    hosts: list[str] = []
    for entry in _split_top_level(nodelist, name):
        parts: list[list[str]] = []
        position = 0
        while position < len(entry):
            match = _NODELIST_TOKEN.match(entry, position)
            text, ranges = match.group(1), match.group(2)
            if match.end() == position:
                raise _bad_nodelist(nodelist, name)
            parts.append([text])
            if ranges is not None:
                parts.append(_expand_ranges(ranges, nodelist, name))
            position = match.end()
        names = [""]
        for choices in parts:
            names = [prefix + choice for prefix in names for choice in choices]
        hosts.extend(names)
    if not hosts:
        raise _bad_nodelist(nodelist, name)
    return hosts


def first_host(nodelist: str, name: str = "SLURM_NODELIST") -> str:
    """The first host of a SLURM node list (where SLURM places task 0)."""
    return expand_nodelist(nodelist, name)[0]


def _split_top_level(nodelist: str, name: str) -> list[str]:
    """Split at the commas outside brackets; refuse unbalanced brackets and empty entries."""
    entries, depth, current = [], 0, ""
    for char in nodelist.strip():
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if depth not in (0, 1):
            raise _bad_nodelist(nodelist, name)
        if char == "," and depth == 0:
            entries.append(current)
            current = ""
        else:
            current += char
    entries.append(current)
    if depth != 0 or any(not e.strip() for e in entries):
        raise _bad_nodelist(nodelist, name)
    return [e.strip() for e in entries]


def _expand_ranges(ranges: str, nodelist: str, name: str) -> list[str]:
    out = []
    for item in ranges.split(","):
        item = item.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not match:
            raise _bad_nodelist(nodelist, name)
        low, high = match.group(1), match.group(2) or match.group(1)
        if int(high) < int(low):
            raise _bad_nodelist(nodelist, name)
        width = len(low)  # SLURM pads every number of a range to the width of its first
        out.extend(str(n).zfill(width) for n in range(int(low), int(high) + 1))
    return out


def _bad_nodelist(nodelist: str, name: str) -> ConfigError:
    return ConfigError(
        f"{name}={nodelist!r} is not a SLURM node list",
        "export MASTER_ADDR as the host of rank 0, or give hosts such as node[001-004,007],gpu01",
    )


def export_torchrun_variables(launch: LaunchEnvironment) -> None:
    """Give srun's and mpirun's processes torchrun's variables, for code that reads them (torch's env://
    rendezvous, Cluster.detect); variables already set are kept."""
    values = {
        "RANK": launch.rank,
        "WORLD_SIZE": launch.world_size,
        "LOCAL_RANK": launch.local_rank,
        "MASTER_ADDR": launch.master_addr,
        "MASTER_PORT": launch.master_port,
    }
    if launch.local_world_size is not None:
        values["LOCAL_WORLD_SIZE"] = launch.local_world_size
    for key, value in values.items():
        os.environ.setdefault(key, str(value))
