"""
Process groups for distributed training: MPI, torchrun, SLURM or a single process.

`setup_dist()` finds out how the job was launched, joins the other processes in a
torch.distributed group (NCCL on GPU, gloo on CPU) and selects this process's GPU:

- torchrun (or any launcher that sets RANK and WORLD_SIZE, with MASTER_ADDR and
  MASTER_PORT): rank, size and LOCAL_RANK come from the environment;
- mpiexec/mpirun: rank, size and local rank come from mpi4py, which is imported
  only in this case; rank 0 publishes its address and a free port;
- srun (SLURM): SLURM_PROCID, SLURM_STEP_NUM_TASKS and SLURM_LOCALID, with
  MASTER_ADDR defaulting to the step's first node and MASTER_PORT derived from the job
  and step ids;
- nothing: a one-process group backed by an in-memory store (no port, no MPI).

The GPU of a process is number LOCAL_RANK among the devices that
CUDA_VISIBLE_DEVICES exposes, or the only visible one when each process sees one;
that variable is never changed.
"""

import atexit
import datetime
import gc
import io
import os
import re
import socket

import blobfile as bf
import torch as th
import torch.distributed as dist

# Variables that MPI launchers (MPICH/Hydra, Open MPI, PMIx, MVAPICH) set in each process.
_MPI_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")
# Lowest port used for a SLURM job when MASTER_PORT is not given.
_SLURM_BASE_PORT = 20000


def setup_dist(timeout_minutes=30):
    """
    Join (or create) the default process group and select this process's device.

    Safe to call more than once; later calls only re-select the device.

    :param timeout_minutes: how long collective operations, including the initial
        rendezvous, may wait for the other processes before failing.
    :return: a dict with the launcher ("torchrun", "mpi", "slurm" or "none"), rank,
        world_size, local_rank and backend.
    """
    if dist.is_initialized():
        local_rank = _select_device(_local_rank_from_environment())
        return dict(
            launcher="existing",
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=local_rank,
            backend=dist.get_backend(),
        )
    launch = _detect_launch()
    local_rank = _select_device(launch["local_rank"])
    backend = "nccl" if th.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if launch["launcher"] == "none":
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )
    else:
        dist.init_process_group(
            backend,
            init_method=f"tcp://{_bracket_ipv6(launch['master_addr'])}:{launch['master_port']}",
            rank=launch["rank"],
            world_size=launch["world_size"],
            timeout=timeout,
        )
    atexit.register(_destroy_process_group)
    return dict(
        launcher=launch["launcher"],
        rank=launch["rank"],
        world_size=launch["world_size"],
        local_rank=local_rank,
        backend=backend,
    )


def _destroy_process_group():
    """
    Tear the group down before the interpreter exits: left to static destructors, gloo's
    threads can abort the process ("terminate called without an active exception").
    """
    if dist.is_initialized():
        dist.destroy_process_group()


def close_dist():
    """
    End this process's part in the process group once its work is done, in the order
    PyTorch documents: the DistributedDataParallel wrappers the caller dropped are
    freed (their reducer works through the group; collecting garbage frees those held in
    reference cycles), every rank waits at a barrier so that none is still inside a
    collective, then the group is destroyed. The scripts call it at their end; an exit
    by any other path destroys the group at exit.
    """
    if not dist.is_initialized():
        return
    gc.collect()
    if get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


def _detect_launch():
    """
    Read rank, world size, local rank and rendezvous address from the launcher.

    :return: a dict with launcher, rank, world_size, local_rank, master_addr, master_port.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in env]
        if missing:
            raise ValueError(
                f"RANK and WORLD_SIZE are set but {', '.join(missing)} is not: launch with "
                "torchrun, or set MASTER_ADDR and MASTER_PORT to rank 0's address and a free port"
            )
        return dict(
            launcher="torchrun",
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=_local_rank_from_environment(fallback_rank=int(env["RANK"])),
            master_addr=env["MASTER_ADDR"],
            master_port=int(env["MASTER_PORT"]),
        )
    if any(int(env.get(name, "1")) > 1 for name in _MPI_SIZE_VARIABLES):
        return _detect_mpi_launch()
    if int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        return dict(
            launcher="slurm",
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_STEP_NUM_TASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            master_addr=env.get("MASTER_ADDR") or _slurm_first_host(env),
            master_port=int(env.get("MASTER_PORT") or _slurm_port(env)),
        )
    return dict(
        launcher="none", rank=0, world_size=1, local_rank=0, master_addr=None, master_port=None
    )


def _slurm_first_host(env):
    """
    :return: the first node of the SLURM step (where its rank 0 runs), from the step's
        node list (e.g. "gpu[07-09,12],cpu1" -> "gpu07"); the launch node under salloc is
        often a login node where no rank listens.
    """
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodes:
        return "127.0.0.1"
    prefix, ranges, suffix = re.match(r"([^,\[]+)(?:\[([^\]]+)\]([^,]*))?", nodes).groups()
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


def _slurm_port(env):
    """
    :return: a port for the step's rendezvous, different for the concurrent steps of a job
        (up to 16) and for most concurrent jobs.
    """
    job, step = int(env.get("SLURM_JOB_ID", "0")), int(env.get("SLURM_STEP_ID", "0"))
    return _SLURM_BASE_PORT + (job * 16 + step % 16) % 20000


def _detect_mpi_launch():
    """
    Use mpi4py to agree on rank, size, local rank and a rendezvous address.

    :return: a dict as `_detect_launch` returns.
    """
    try:
        from mpi4py import MPI
    except ImportError as error:
        sizes = {name: os.environ[name] for name in _MPI_SIZE_VARIABLES if name in os.environ}
        raise ImportError(
            f"launched by MPI ({sizes}) but mpi4py is not installed: "
            "`pip install mpi4py`, or launch with torchrun instead"
        ) from error
    comm = MPI.COMM_WORLD
    rank, world_size = comm.Get_rank(), comm.Get_size()
    node_comm = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank, local_size = node_comm.Get_rank(), node_comm.Get_size()
    node_comm.Free()
    if rank == 0:
        single_node = local_size == world_size
        address = os.environ.get("MASTER_ADDR") or (
            "127.0.0.1" if single_node else _reachable_address()
        )
        port = int(os.environ.get("MASTER_PORT") or _find_free_port())
        rendezvous = (address, port)
    else:
        rendezvous = None
    address, port = comm.bcast(rendezvous, root=0)
    return dict(
        launcher="mpi",
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        master_addr=address,
        master_port=port,
    )


def _reachable_address():
    """
    :return: an IPv4 address of this host that other nodes can reach: a non-loopback
        address of its name, else the address of the interface that routes outwards
        (stock Debian and Ubuntu map the host name to 127.0.1.1).
    """
    try:
        infos = socket.getaddrinfo(socket.getfqdn(), None, socket.AF_INET)
    except OSError:
        infos = []
    for *_, (address, _) in infos:
        if not address.startswith("127."):
            return address
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a route
            address = probe.getsockname()[0]
        except OSError:
            address = "127.0.0.1"
    if address.startswith("127.") or address == "0.0.0.0":
        raise ValueError(
            f"no address of this host ({socket.getfqdn()}) other than loopback: set MASTER_ADDR "
            "to an address of rank 0's node that the other nodes can reach"
        )
    return address


def _local_rank_from_environment(fallback_rank=0):
    """
    :param fallback_rank: the global rank, used when no launcher variable tells the local
        one: its remainder by the number of visible GPUs (nodes of equal size, ranks
        numbered node by node), 0 without GPUs.
    :return: this process's rank on its node, as the launcher reports it.
    """
    for name in ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID"):
        if name in os.environ:
            return int(os.environ[name])
    count = th.cuda.device_count() if th.cuda.is_available() else 0
    return fallback_rank % count if count else 0


def _select_device(local_rank):
    """
    Make this process's GPU the current device: number `local_rank` among the visible
    ones, or the only one when the launcher gives each process one GPU (SLURM
    --gpus-per-task=1, MPI wrappers that set CUDA_VISIBLE_DEVICES per rank).

    :param local_rank: this process's rank on its node.
    :return: local_rank.
    """
    if th.cuda.is_available():
        count = th.cuda.device_count()
        if local_rank >= count > 1:
            raise ValueError(
                f"local rank {local_rank} needs GPU {local_rank} but only {count} are visible "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start "
                "at most one process per visible GPU on each node, or make one GPU visible to "
                "each process"
            )
        th.cuda.set_device(local_rank if local_rank < count else 0)
    return local_rank


def _bracket_ipv6(address):
    """
    :return: address, in brackets if it is an IPv6 literal (as URLs need).
    """
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


def _find_free_port():
    """
    :return: a TCP port that was free on this host a moment ago.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def get_rank():
    """
    :return: this process's rank, or 0 when no process group exists.
    """
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size():
    """
    :return: the number of processes, or 1 when no process group exists.
    """
    return dist.get_world_size() if dist.is_initialized() else 1


def dev():
    """
    :return: the device this process computes on (its GPU, else the CPU).
    """
    if th.cuda.is_available():
        return th.device("cuda", th.cuda.current_device())
    return th.device("cpu")


def load_state_dict(path, **kwargs):
    """
    Load a checkpoint (weights only) from a local path or a blobfile URL.

    Every process reads the file itself, so any subset of ranks may call this
    without waiting for the others (the original read on rank 0 and broadcast
    through MPI, which deadlocked when only rank 0 called it).

    :param path: the checkpoint's path or URL.
    :param kwargs: passed to torch.load, e.g. map_location="cpu".
    :return: the loaded object (tensors, dicts, lists, numbers, strings).
    """
    if kwargs.pop("weights_only", True) is not True:
        raise ValueError("load_state_dict only loads with weights_only=True (no pickled code)")
    with bf.BlobFile(path, "rb") as f:
        data = f.read()
    return th.load(io.BytesIO(data), weights_only=True, **kwargs)


def sync_params(params):
    """
    Copy rank 0's values of tensors to every other rank, in place.

    A collective: every rank must call it with the same tensors in the same order.

    :param params: an iterable of tensors (e.g. model.parameters()).
    """
    if get_world_size() == 1:
        return
    for param in params:
        with th.no_grad():
            dist.broadcast(param, 0)


def on_rank_zero(check):
    """
    Run check() on rank 0 alone and share how it ended: every rank returns its result,
    or raises its ValueError (or FileNotFoundError), so that no rank waits for one that
    stopped. A collective when there are several processes: every rank calls it.

    :param check: a function of no arguments (a refusal raises ValueError).
    :return: check()'s result, a picklable value.
    """
    if get_world_size() == 1:
        return check()
    outcome = [None]
    if get_rank() == 0:
        try:
            outcome = [("result", check())]
        except (ValueError, FileNotFoundError) as error:
            outcome = [(type(error), str(error))]
    dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "result":
        return value
    raise kind(value)


def gather_by_rank(obj):
    """
    :param obj: a picklable object from this rank (a collective: every rank calls it).
    :return: a dict from rank to each rank's object.
    """
    if get_world_size() == 1:
        return {0: obj}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return dict(enumerate(gathered))
