"""
Tests for guided_diffusion.dist_util: launcher detection, checkpoint loading, sync.

Real multi-process runs (mpiexec, torchrun) are in test_training_scripts.py.
"""

import socket
import sys

import pytest
import torch as th

from guided_diffusion import dist_util

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PMI_SIZE",
                      "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS",
                      "SLURM_PROCID", "SLURM_LOCALID", "SLURM_JOB_ID", "SLURM_LAUNCH_NODE_IPADDR")


@pytest.fixture
def clean_env(monkeypatch):
    """An environment without any launcher's variables."""
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_no_launcher_means_one_process(clean_env):
    launch = dist_util._detect_launch()
    summary = (launch["launcher"], launch["rank"], launch["world_size"], launch["local_rank"])
    assert summary == ("none", 0, 1, 0)


def test_torchrun_variables_give_rank_size_and_rendezvous(clean_env):
    for name, value in dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", MASTER_ADDR="10.0.0.2",
                            MASTER_PORT="29400").items():
        clean_env.setenv(name, value)
    assert dist_util._detect_launch() == dict(
        launcher="torchrun", rank=3, world_size=4, local_rank=1, master_addr="10.0.0.2", master_port=29400
    )


def test_torchrun_variables_without_a_master_are_an_error(clean_env):
    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("MASTER_ADDR", "localhost")
    with pytest.raises(ValueError, match="MASTER_PORT is not"):
        dist_util._detect_launch()


def test_slurm_steps_rendezvous_on_their_first_node_with_a_port_per_step(clean_env):
    # Under salloc the launch node is a login node: no rank listens there.
    for name, value in dict(SLURM_STEP_NUM_TASKS="8", SLURM_PROCID="5", SLURM_LOCALID="1",
                            SLURM_JOB_ID="123456", SLURM_STEP_ID="0",
                            SLURM_LAUNCH_NODE_IPADDR="10.1.2.3",
                            SLURM_STEP_NODELIST="gpu[007-009,012],cpu1").items():
        clean_env.setenv(name, value)
    first = dist_util._detect_launch()
    assert first == dict(
        launcher="slurm", rank=5, world_size=8, local_rank=1, master_addr="gpu007",
        master_port=20000 + (123456 * 16) % 20000,
    )
    clean_env.setenv("SLURM_STEP_ID", "1")  # a concurrent step of the same job
    assert dist_util._detect_launch()["master_port"] == first["master_port"] + 1


@pytest.mark.parametrize("nodes, first", [
    ("node1", "node1"), ("a-b12,c3", "a-b12"), ("gpu[3-4]", "gpu3"), ("rack[02,05]-n", "rack02-n"),
])
def test_the_first_host_of_a_slurm_node_list(nodes, first):
    assert dist_util._slurm_first_host({"SLURM_STEP_NODELIST": nodes}) == first


def test_a_slurm_allocation_without_srun_is_one_process(clean_env):
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_JOB_ID", "7")
    assert dist_util._detect_launch()["launcher"] == "none"


def test_an_mpi_launch_without_mpi4py_says_how_to_fix_it(clean_env):
    clean_env.setenv("PMI_SIZE", "2")
    clean_env.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(ImportError, match="launched by MPI .*PMI_SIZE.*pip install mpi4py.*torchrun"):
        dist_util._detect_launch()


def test_rank_and_world_size_without_a_process_group():
    if th.distributed.is_initialized():
        pytest.skip("another test initialised a process group in this interpreter")
    assert (dist_util.get_rank(), dist_util.get_world_size()) == (0, 1)
    param = th.nn.Parameter(th.ones(3))
    dist_util.sync_params([param])  # one process: nothing to synchronise, no error
    assert th.equal(param, th.ones(3))


def test_load_state_dict_reads_tensors_on_any_rank_alone(tmp_path):
    state = {"weight": th.arange(6.0).reshape(2, 3), "nested": {"step": 7}}
    path = tmp_path / "state.pt"
    th.save(state, path)
    loaded = dist_util.load_state_dict(str(path), map_location="cpu")
    assert th.equal(loaded["weight"], state["weight"]) and loaded["nested"] == {"step": 7}
    with pytest.raises(ValueError, match="weights_only=True"):
        dist_util.load_state_dict(str(path), weights_only=False)
    with pytest.raises(FileNotFoundError):
        dist_util.load_state_dict(str(tmp_path / "missing.pt"))


class _Payload:
    """An object whose unpickling would need this module's code."""


def test_load_state_dict_refuses_pickled_objects(tmp_path):
    path = tmp_path / "code.pt"
    th.save({"object": _Payload()}, path)
    with pytest.raises(Exception, match="Weights only load failed"):
        dist_util.load_state_dict(str(path))


def test_dev_is_the_cpu_without_cuda():
    if th.cuda.is_available():
        assert dist_util.dev().type == "cuda"
    else:
        assert dist_util.dev() == th.device("cpu")


@pytest.fixture
def simulated_gpus(monkeypatch):
    """Pretend torch sees `count` GPUs; returns the devices set_device was called with."""
    selected = []

    def visible(count):
        monkeypatch.setattr(th.cuda, "is_available", lambda: True)
        monkeypatch.setattr(th.cuda, "device_count", lambda: count)
        monkeypatch.setattr(th.cuda, "set_device", selected.append)
        return selected

    return visible


def test_one_visible_gpu_per_process_is_used_whatever_the_local_rank(simulated_gpus):
    selected = simulated_gpus(1)  # SLURM --gpus-per-task=1, or CUDA_VISIBLE_DEVICES per rank
    assert dist_util._select_device(3) == 3
    assert selected == [0]


def test_the_local_rank_picks_among_several_visible_gpus(simulated_gpus):
    selected = simulated_gpus(4)
    dist_util._select_device(2)
    assert selected == [2]
    with pytest.raises(ValueError, match="local rank 5 needs GPU 5 but only 4 are visible"):
        dist_util._select_device(5)


def test_without_local_rank_the_global_rank_is_taken_modulo_the_node_gpus(clean_env, simulated_gpus):
    simulated_gpus(8)
    for name, value in dict(RANK="11", WORLD_SIZE="16", MASTER_ADDR="10.0.0.2",
                            MASTER_PORT="29400").items():
        clean_env.setenv(name, value)
    assert dist_util._detect_launch()["local_rank"] == 3  # second node, its fourth GPU


class _RoutedSocket:
    """A UDP socket whose outward route leaves from `address`."""

    address = "10.0.0.5"

    def __init__(self, *args):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def connect(self, target):
        pass

    def getsockname(self):
        return (self.address, 40000)


def test_mpi_rank_zero_publishes_an_address_other_nodes_reach(monkeypatch):
    loopback_name = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.1.1", 0))]
    monkeypatch.setattr(dist_util.socket, "getaddrinfo", lambda *args: loopback_name)
    monkeypatch.setattr(dist_util.socket, "socket", _RoutedSocket)
    assert dist_util._reachable_address() == "10.0.0.5"  # not Debian's 127.0.1.1
    named = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.1.1", 0))]
    monkeypatch.setattr(dist_util.socket, "getaddrinfo", lambda *args: named)
    assert dist_util._reachable_address() == "10.1.1.1"
    monkeypatch.setattr(dist_util.socket, "getaddrinfo", lambda *args: loopback_name)
    monkeypatch.setattr(_RoutedSocket, "address", "127.0.0.1")
    with pytest.raises(ValueError, match="set MASTER_ADDR"):
        dist_util._reachable_address()
