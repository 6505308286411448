"""DataLoader workers of a run that stops on a signal: they leave the stop to their rank, and never outlive it.

Slurm (scancel, preemption, the time limit's --signal) signals every process of the job step, workers
included, and torch's own SIGTERM handler in a worker ended it: the trainer then failed with 'DataLoader
worker ... is killed by signal: Terminated' instead of finishing its step and saving. Workers therefore
ignore the stop signals, and the trainer ends them itself. What torch and the interpreter use to end a
worker that did not stop by itself is that same SIGTERM (terminate, then a join without a timeout at exit),
so workers still alive when their process exits are killed outright first (`end_leftover_workers`).
"""
from __future__ import annotations

import atexit
import multiprocessing
import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: this worker ignores the stop signals."""
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, signal.SIG_IGN)


def end_leftover_workers() -> None:
    """At exit, SIGKILL the daemonic children (DataLoader workers) still alive: a crash left their loader
    unclosed, or one was stuck in a read when it shut down. Registered after multiprocessing's own exit
    handler, so it runs before that one's join."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


atexit.register(end_leftover_workers)
