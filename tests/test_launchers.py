"""Launchers: torchrun's, SLURM srun's and Open MPI mpirun's variables mapped onto rank, world size, local rank
and rendezvous address (runtime.launchers.launch_environment), SLURM's compressed node lists, precedence, the
errors; init_distributed alone, and two ranks started with srun's and mpirun's variables only."""

import dataclasses
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from galvatron_fx.errors import ConfigError
from galvatron_fx.runtime.launchers import (
    DEFAULT_MASTER_PORT,
    LaunchEnvironment,
    expand_nodelist,
    first_host,
    launch_environment,
)

LAUNCH_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_USE_AGENT_STORE",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "SLURM_NODELIST",
    "SLURM_JOB_NODELIST",
    "SLURM_STEP_NODELIST",
)


@pytest.fixture
def env(monkeypatch):
    """The process environment without any launcher's variables; returns a setter."""
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    def set_env(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, str(value))
        return os.environ

    return set_env


def test_torchrun(env):
    found = launch_environment(
        env(RANK=5, WORLD_SIZE=16, LOCAL_RANK=1, LOCAL_WORLD_SIZE=4, MASTER_ADDR="n0", MASTER_PORT=1234)
    )
    assert found == LaunchEnvironment(5, 16, 1, "n0", 1234, "torchrun", 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        found.rank = 0


@pytest.mark.parametrize(
    "nodelist, first",
    [
        ("gpu07", "gpu07"),
        ("node[003-005,007],gpu01", "node003"),
        ("node[8-10]", "node8"),
        ("gpu01,gpu02", "gpu01"),
        ("rack-2-node[01-04]-ib", "rack-2-node01-ib"),
        ("r[2-3]n[09-10]", "r2n09"),
    ],
)
def test_srun_master_is_the_first_host_of_the_node_list(env, nodelist, first):
    found = launch_environment(env(SLURM_PROCID=9, SLURM_NTASKS=16, SLURM_LOCALID=1, SLURM_NODELIST=nodelist))
    assert found == LaunchEnvironment(9, 16, 1, first, DEFAULT_MASTER_PORT, "srun")


def test_node_list_expansion_keeps_order_and_padding():
    assert expand_nodelist("node[003-005,007],gpu01") == ["node003", "node004", "node005", "node007", "gpu01"]
    assert expand_nodelist("node[8-10]") == ["node8", "node9", "node10"]
    assert expand_nodelist("r[1-2]n[1-2]") == ["r1n1", "r1n2", "r2n1", "r2n2"]
    assert expand_nodelist(" a1 , b[2] ") == ["a1", "b2"]
    assert first_host("x[0009-0011]") == "x0009"


@pytest.mark.parametrize("bad", ["", "node[1-2", "node]1[", "node[]", "node[5-3]", "node[a-b]", "a,,b", "n[1-[2]]"])
def test_malformed_node_lists_name_the_variable(bad):
    with pytest.raises(ConfigError, match="SLURM_STEP_NODELIST") as error:
        expand_nodelist(bad, "SLURM_STEP_NODELIST")
    assert "MASTER_ADDR" in error.value.remedy


def test_srun_prefers_the_step_node_list_and_an_explicit_address_and_port(env):
    common = dict(SLURM_PROCID=0, SLURM_NTASKS=8, SLURM_LOCALID=0, SLURM_NODELIST="job[1-4]")
    assert launch_environment(env(**common, SLURM_STEP_NODELIST="job[3-4]")).master_addr == "job3"
    found = launch_environment(env(MASTER_ADDR="10.0.0.7", MASTER_PORT=4000))
    assert (found.master_addr, found.master_port) == ("10.0.0.7", 4000)


def test_srun_job_node_list_and_single_task(env):
    assert launch_environment(env(SLURM_PROCID=1, SLURM_NTASKS=2, SLURM_LOCALID=1, SLURM_JOB_NODELIST="c[5-6]")) == (
        LaunchEnvironment(1, 2, 1, "c5", DEFAULT_MASTER_PORT, "srun")
    )


def test_srun_one_task_without_node_list(env):
    found = launch_environment(env(SLURM_PROCID=0, SLURM_NTASKS=1, SLURM_LOCALID=0))
    assert (found.world_size, found.master_addr, found.launcher) == (1, "127.0.0.1", "srun")


def test_open_mpi(env):
    found = launch_environment(
        env(
            OMPI_COMM_WORLD_RANK=3,
            OMPI_COMM_WORLD_SIZE=8,
            OMPI_COMM_WORLD_LOCAL_RANK=3,
            OMPI_COMM_WORLD_LOCAL_SIZE=4,
            MASTER_ADDR="head",
            MASTER_PORT=6000,
        )
    )
    assert found == LaunchEnvironment(3, 8, 3, "head", 6000, "mpirun", 4)


def test_open_mpi_on_one_node_needs_no_address(env):
    found = launch_environment(
        env(OMPI_COMM_WORLD_RANK=1, OMPI_COMM_WORLD_SIZE=4, OMPI_COMM_WORLD_LOCAL_RANK=1, OMPI_COMM_WORLD_LOCAL_SIZE=4)
    )
    assert (found.master_addr, found.master_port, found.local_world_size) == ("127.0.0.1", DEFAULT_MASTER_PORT, 4)


@pytest.mark.parametrize("local_size", [2, None])
def test_open_mpi_on_several_nodes_needs_master_addr(env, local_size):
    extra = {} if local_size is None else {"OMPI_COMM_WORLD_LOCAL_SIZE": local_size}
    with pytest.raises(ConfigError, match="MASTER_ADDR") as error:
        launch_environment(env(OMPI_COMM_WORLD_RANK=0, OMPI_COMM_WORLD_SIZE=4, OMPI_COMM_WORLD_LOCAL_RANK=0, **extra))
    assert "mpirun -x MASTER_ADDR" in error.value.remedy


def test_torchrun_variables_win_over_slurm_and_open_mpi(env):
    found = launch_environment(
        env(
            RANK=2,
            WORLD_SIZE=4,
            LOCAL_RANK=0,
            MASTER_ADDR="t0",
            MASTER_PORT=7000,
            SLURM_PROCID=0,
            SLURM_NTASKS=1,
            SLURM_LOCALID=0,
            SLURM_NODELIST="s[1-2]",
            OMPI_COMM_WORLD_RANK=1,
            OMPI_COMM_WORLD_SIZE=2,
            OMPI_COMM_WORLD_LOCAL_RANK=1,
        )
    )
    assert (found.launcher, found.rank, found.world_size, found.master_addr) == ("torchrun", 2, 4, "t0")


def test_open_mpi_wins_over_an_inherited_slurm_rank(env):
    """mpirun inside a SLURM allocation: every process inherits the batch script's SLURM_PROCID."""
    found = launch_environment(
        env(
            SLURM_PROCID=0,
            SLURM_NTASKS=4,
            SLURM_LOCALID=0,
            SLURM_NODELIST="s1",
            OMPI_COMM_WORLD_RANK=3,
            OMPI_COMM_WORLD_SIZE=4,
            OMPI_COMM_WORLD_LOCAL_RANK=3,
            OMPI_COMM_WORLD_LOCAL_SIZE=4,
        )
    )
    assert (found.launcher, found.rank) == ("mpirun", 3)


def test_no_launcher_is_one_process(env):
    assert launch_environment(env()) == LaunchEnvironment(0, 1, 0, "127.0.0.1", DEFAULT_MASTER_PORT, "none", 1)
    assert launch_environment({}) == launch_environment(env())  # any mapping, not only os.environ


@pytest.mark.parametrize(
    "values, match",
    [
        (dict(RANK=0), "WORLD_SIZE is not set"),
        (dict(RANK=0, WORLD_SIZE=2), "MASTER_ADDR is not"),
        (dict(RANK="one", WORLD_SIZE=2, MASTER_ADDR="h"), "RANK='one' is not a whole number"),
        (dict(RANK=4, WORLD_SIZE=4, MASTER_ADDR="h"), "rank 4 of world size 4"),
        (dict(RANK=0, WORLD_SIZE=1, MASTER_PORT="http"), "MASTER_PORT='http'"),
        (dict(RANK=0, WORLD_SIZE=1, MASTER_PORT=70000), "MASTER_PORT='70000'"),
        (dict(SLURM_PROCID=0, SLURM_LOCALID=0), "SLURM_NTASKS is not set"),
        (dict(SLURM_PROCID=0, SLURM_NTASKS=2, SLURM_LOCALID=0), "SLURM_NODELIST is not set"),
        (dict(SLURM_PROCID=-1, SLURM_NTASKS=2, SLURM_LOCALID=0, SLURM_NODELIST="a"), "negative"),
        (dict(SLURM_PROCID=0, SLURM_NTASKS=2, SLURM_LOCALID=0, SLURM_NODELIST="a[1-"), "not a SLURM node list"),
        (dict(OMPI_COMM_WORLD_RANK=0, OMPI_COMM_WORLD_SIZE=1), "OMPI_COMM_WORLD_LOCAL_RANK is not set"),
    ],
)
def test_errors_name_the_variable_and_a_remedy(env, values, match):
    with pytest.raises(ConfigError, match=match) as error:
        launch_environment(env(**values))
    assert error.value.remedy


def test_init_distributed_alone_and_under_one_srun_task(env):
    import torch.distributed as dist

    from galvatron_fx import runtime

    for values in ({}, dict(SLURM_PROCID=0, SLURM_NTASKS=1, SLURM_LOCALID=0)):
        env(**values)
        assert str(runtime.init_distributed(backend="gloo")) == "cpu"
        try:
            assert (dist.get_rank(), dist.get_world_size()) == (0, 1)
        finally:
            runtime.shutdown()


RANK_SCRIPT = textwrap.dedent(
    """
    import os, torch, torch.distributed as dist
    torch.set_num_threads(1)
    from galvatron_fx import runtime
    runtime.init_distributed(backend="gloo", timeout_s=120)
    value = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(value)
    print(dist.get_rank(), dist.get_world_size(), int(value.item()), os.environ["RANK"], os.environ["LOCAL_RANK"])
    runtime.shutdown()
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("launcher", ["srun", pytest.param("mpirun", marks=pytest.mark.full)])
def test_two_ranks_join_from_launcher_variables_alone(launcher):
    """Two processes that see only srun's (or mpirun's) variables form one group of two (the mapping itself is
    tested above for both; the full tier also starts mpirun's pair)."""
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    port = str(_free_port())
    processes = []
    for rank in range(2):
        if launcher == "srun":
            extra = dict(SLURM_PROCID=rank, SLURM_NTASKS=2, SLURM_LOCALID=rank, SLURM_NODELIST="localhost")
        else:
            extra = dict(
                OMPI_COMM_WORLD_RANK=rank,
                OMPI_COMM_WORLD_SIZE=2,
                OMPI_COMM_WORLD_LOCAL_RANK=rank,
                OMPI_COMM_WORLD_LOCAL_SIZE=2,
            )
        child_env = {**base, **{k: str(v) for k, v in extra.items()}, "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        processes.append(
            subprocess.Popen(
                [sys.executable, "-c", RANK_SCRIPT],
                env=child_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=240)
            assert process.returncode == 0, err
            outputs.append(out.split())
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    assert outputs == [["0", "2", "3", "0", "0"], ["1", "2", "3", "1", "1"]]
