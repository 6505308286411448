"""DataLoader workers ignore the stop signals, and still never keep their process alive."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil

from fineclip_ds.data.workers import leave_stop_signals_to_the_trainer

STUCK_WORKER = textwrap.dedent("""
    import time
    import torch
    from torch.utils.data import DataLoader, Dataset
    from fineclip_ds.data.workers import leave_stop_signals_to_the_trainer

    class SecondItemHangs(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            if index:
                time.sleep(3600)  # a read that never returns (a stalled network shard)
            return torch.zeros(1)

    loader = iter(DataLoader(SecondItemHangs(), num_workers=1, worker_init_fn=leave_stop_signals_to_the_trainer))
    next(loader)
    print("first batch", flush=True)
""")


def test_a_worker_ignores_sigterm_and_sigusr1():
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        leave_stop_signals_to_the_trainer(0)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)  # still running: both ignored
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_a_worker_stuck_in_a_read_does_not_keep_its_process_alive():
    """torch ends a worker that does not stop with SIGTERM, and so does the interpreter's exit, which then
    joins it without a timeout: a worker that ignores SIGTERM kept the process alive for good."""
    process = subprocess.Popen([sys.executable, "-c", STUCK_WORKER], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "first batch\n"
        started = time.time()
        assert process.wait(timeout=60) == 0
        assert time.time() - started < 30  # torch's two 5 s joins, then the kill
    finally:
        for leftover in [process.pid, *_children(process.pid)]:
            try:
                os.kill(leftover, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _children(pid: int) -> list[int]:
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
