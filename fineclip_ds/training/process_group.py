"""Start and end the process group the same way under every launcher, and undo DeepSpeed's CPU /dev/shm leak."""
from __future__ import annotations

import atexit
import logging
import os
import socket
import sys
from pathlib import Path
from typing import NoReturn

import deepspeed
import torch
import torch.distributed as dist

SHARED_MEMORY = Path("/dev/shm")


# Where launchers put a process's rank: torchrun / deepspeed, Open MPI's mpirun, MPICH / Intel MPI (PMI).
LAUNCHER_RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def launcher_rank() -> int:
    """This process's rank as its launcher set it, before the process group starts (and sets RANK under mpirun)."""
    return int(next((os.environ[name] for name in LAUNCHER_RANK_VARIABLES if os.environ.get(name)), 0))


def default_to_single_process() -> None:
    """Without a launcher (python -m ..., notebooks, the ablation), run as a world of one. Under MPICH's
    mpiexec only PMI_RANK is set: taking that for 'no launcher' made every process a world of one, all
    writing the same run folder, where DeepSpeed's MPI discovery would have joined them."""
    if any(name in os.environ for name in LAUNCHER_RANK_VARIABLES):
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})


def use_the_one_visible_gpu() -> None:
    """A process that sees one GPU uses it, whatever its LOCAL_RANK.

    Where SLURM binds GPUs to tasks (--gpus-per-task, --gpu-bind, a site's default), each task sees only its
    own GPU while LOCAL_RANK still counts the node's tasks, so DeepSpeed's cuda:LOCAL_RANK failed with
    'invalid device ordinal' on every task but the first. LOCAL_RANK past the visible GPUs otherwise is an
    error that says so, before DeepSpeed reads it."""
    if not torch.cuda.is_available():
        return
    local_rank, visible = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local_rank < visible:
        return
    if visible != 1:
        raise RuntimeError(f"LOCAL_RANK {local_rank} but this process sees {visible} GPUs (CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): give each process every GPU of "
                           "its node, or exactly one")
    os.environ["LOCAL_RANK"] = "0"


def cpu_allreduce_buffer(rank: int) -> Path:
    """The segment DeepSpeed's CPU shared-memory all-reduce (ops/csrc/cpu/comm/shm.cpp) creates for `rank`."""
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}"
    return SHARED_MEMORY / f"{name}_{rank}"


def init_process_group() -> tuple[int, int]:
    """deepspeed.init_distributed, then release this rank's CPU all-reduce segment; returns (rank, world size).

    On CPU, DeepSpeed 0.19.8 maps a 66 MB /dev/shm segment per rank and never unlinks it, so every
    run left RAM behind until reboot (a day of tests filled a 24 GiB machine). Once every rank has
    mapped its peers' segments (the barrier), each rank unlinks its own name: the mappings stay
    valid and the kernel frees the memory when the processes exit."""
    default_to_single_process()
    use_the_one_visible_gpu()
    deepspeed.init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if not torch.cuda.is_available():
        dist.barrier()
        cpu_allreduce_buffer(rank).unlink(missing_ok=True)
    return rank, world_size


def exit_without_finalization(code: int) -> NoReturn:
    """End the process group, run the atexit handlers, flush, and end the process before the interpreter
    finalizes. Call it only where every rank gets (a normal end): destroying the group while a peer still
    waits in a collective would hang.

    A C++ thread (gloo's workers, which DeepSpeed's groups keep alive past destroy_process_group) that
    releases a tensor while Python finalizes takes the GIL, is ended with pthread_exit, and its unwinding
    through a noexcept frame aborts the process ("terminate called without an active exception", exit
    -6): CI saw it about once in 15 two-rank runs that had finished and saved. See pytorch#190489."""
    if dist.is_initialized():
        dist.destroy_process_group()
    atexit._run_exitfuncs()
    exit_alone(code)


def exit_alone(code: int) -> NoReturn:
    """End this process only: a rank that stops by itself (its data failed) while its peers may wait in a
    collective for it. Ending the group would wait for them; the launcher (deepspeed, torchrun, srun
    --kill-on-bad-exit) ends the others when this process exits non-zero."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
