"""The per-step collectives that keep ranks in agreement (skip a non-finite micro-batch, stop on a
signal) run on the device of the process group: NCCL reduces CUDA tensors only, so a CPU flag would
fail the first step of every multi-GPU run. A one-process group with world_size=2 passed in forces
the all-reduce path."""
import signal

import pytest
import torch
import torch.distributed as dist

from fineclip_ds.training.nonfinite import NonFiniteGuard
from fineclip_ds.training.preemption import STOP_SIGNALS, PreemptionWatch

BACKEND_DEVICES = [("gloo", "cpu")] + ([("nccl", "cuda")] if torch.cuda.is_available() else [])


@pytest.fixture(params=BACKEND_DEVICES, ids=lambda backend_device: backend_device[0])
def group_device(request, tmp_path):
    backend, device = request.param
    dist.init_process_group(backend, init_method=f"file://{tmp_path}/group", rank=0, world_size=1)
    handlers = {stop_signal: signal.getsignal(stop_signal) for stop_signal in STOP_SIGNALS}
    yield torch.device(device)
    for stop_signal, handler in handlers.items():
        signal.signal(stop_signal, handler)
    dist.destroy_process_group()


def test_non_finite_losses_are_skipped_counted_and_exhaust_the_guard(group_device):
    guard = NonFiniteGuard(max_in_a_row=2)
    assert guard.all_ranks_finite(torch.tensor(1.5, device=group_device), world_size=2)
    assert not guard.all_ranks_finite(torch.tensor(float("nan"), device=group_device), world_size=2)
    assert not guard.exhausted
    assert not guard.all_ranks_finite(torch.tensor(float("inf"), device=group_device), world_size=2)
    assert guard.exhausted and guard.skipped == 2
    assert guard.all_ranks_finite(torch.tensor(0.0, device=group_device), world_size=2)
    assert guard.exhausted  # in a row until an optimizer step is applied: a NaN gradient may still follow
    guard.step_applied()
    assert not guard.exhausted and guard.skipped == 2


def test_a_stop_signal_is_agreed_on_the_group_device(group_device):
    watch = PreemptionWatch()
    assert not watch.requested(world_size=2, device=group_device)
    signal.raise_signal(signal.SIGUSR1)
    assert watch.requested(world_size=2, device=group_device)
