"""Which GPU a rank takes when the launcher's LOCAL_RANK and the GPUs it can see disagree (SLURM binding)."""
import os

import pytest
import torch

from fineclip_ds.training.process_group import default_to_single_process, launcher_rank, use_the_one_visible_gpu


def _gpus(monkeypatch, visible: int, local_rank: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))


@pytest.mark.parametrize("visible,local_rank,expected", [(1, 5, "0"), (8, 5, "5"), (1, 0, "0")],
                         ids=["bound-to-one", "all-visible", "first"])
def test_a_task_that_sees_one_gpu_uses_it_and_one_that_sees_all_keeps_its_local_rank(
        monkeypatch, visible, local_rank, expected):
    _gpus(monkeypatch, visible, local_rank)
    use_the_one_visible_gpu()
    assert os.environ["LOCAL_RANK"] == expected


def test_a_local_rank_past_several_visible_gpus_is_an_error_that_names_both(monkeypatch):
    _gpus(monkeypatch, 2, 5)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    with pytest.raises(RuntimeError, match=r"LOCAL_RANK 5 but this process sees 2 GPUs \(CUDA_VISIBLE_DEVICES=4,5\)"):
        use_the_one_visible_gpu()


@pytest.mark.parametrize("environment,rank", [({"RANK": "3", "OMPI_COMM_WORLD_RANK": "5"}, 3),
                                              ({"OMPI_COMM_WORLD_RANK": "5"}, 5), ({"PMI_RANK": "2"}, 2), ({}, 0)])
def test_the_launchers_rank_is_read_before_the_group_starts(monkeypatch, environment, rank):
    """Log lines are tagged (and filtered) by rank before init: under mpirun RANK is set only by DeepSpeed's
    MPI discovery, so every process was labelled rank 0 and none was filtered."""
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert launcher_rank() == rank


@pytest.mark.parametrize("launcher", ["RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", None])
def test_a_process_is_a_world_of_one_only_without_any_launchers_rank(monkeypatch, launcher):
    """Under MPICH (PMI_RANK only) every process made itself rank 0 of a world of one."""
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR",
                 "MASTER_PORT"):  # every variable it sets, so that monkeypatch restores them all
        monkeypatch.delenv(name, raising=False)
    if launcher:
        monkeypatch.setenv(launcher, "3")
    default_to_single_process()
    assert os.environ.get("WORLD_SIZE") == (None if launcher else "1")
    assert launcher_rank() == (3 if launcher else 0)
