"""Test jobs of several processes (torch.multiprocessing), one per rank.

Ranks are forked from a forkserver that has imported torch, its distributed packages and the
libraries the workers use, once per test session (``PRELOAD``): a rank starts in a fraction of a
second instead of the ~3 s a fresh interpreter takes to import them, which was most of the time of
the distributed tests on 2 cores. The forkserver starts at the first job, with the environment and
``sys.path`` of that moment (conftest.py has set ``TRITON_INTERPRET`` by then); it never runs a
torch operation (imports only), so the forked ranks inherit no intra-op thread pool. Where CUDA is
available the ranks are spawned as before (fresh interpreters: a CUDA rank must not inherit a
driver that some import initialized, and the GPU machine has cores to spare).

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

import torch
import torch.multiprocessing as mp

# Imported by the forkserver before it forks the ranks (an ImportError is ignored, e.g. where
# transformers is not installed).
PRELOAD = [
    "torch",
    "torch.distributed.checkpoint",
    "torch.distributed.fsdp",
    "torch.distributed.tensor",
    "torch.nn.parallel",
    "numpy",
    "adam_mini_kernels",
    "transformers.models.gpt2.modeling_gpt2",
]


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
    start_method = "spawn" if torch.cuda.is_available() else "forkserver"
    if start_method == "forkserver":
        mp.set_forkserver_preload(PRELOAD)
    mp.start_processes(_run_then_exit, args=(fn, free_port(), *args), nprocs=nprocs, start_method=start_method)
