"""Test jobs of several processes (torch.multiprocessing, spawn start method), one per rank.

A worker that has written its results leaves with ``os._exit(0)``: interpreter shutdown after
gloo and torch.distributed.checkpoint sometimes aborts in a C++ destructor ("terminate called
without an active exception", a thread object left joinable), seen about once in a hundred
2-rank jobs on a loaded 2-core machine, after the worker's results were already on disk. A
worker that raises still reports its traceback as usual.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys

import torch.multiprocessing as mp


# For init_process_group: a rank that misses a collective (a deadlock) fails the job after this,
# not after gloo's default of 30 minutes.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=180)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_then_exit(rank: int, fn, *args) -> None:
    fn(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, nprocs: int, *args) -> None:
    """Run ``fn(rank, port, *args)`` in ``nprocs`` processes (``port``: a free TCP port for the
    process group's store) and wait for them; raises if any fails."""
    mp.start_processes(_run_then_exit, args=(fn, free_port(), *args), nprocs=nprocs, start_method="spawn")
