"""DistributedDataParallel works unchanged: each rank steps the same averaged gradients, so the
parameters stay identical across ranks and equal a single-process run on the whole batch.

Two CPU processes with the gloo backend, spawned by the test."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import models
from adam_mini_kernels import AdamMini
from grad_stream import max_rel_err

STEPS = 4
WORLD = 2
KW = dict(lr=1e-2, weight_decay=0.1, verbose=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches(batch_fn):
    """The full batch of each step (every rank takes its half of it)."""
    return [batch_fn(step, torch.Generator().manual_seed(50 + step)) for step in range(STEPS)]


def _worker(rank, port, bucket_view, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        model, batch_fn, dims = models.build("nanogpt")
        ddp = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=bucket_view, find_unused_parameters=True)
        opt = AdamMini(ddp.module.named_parameters(), **dims, **KW)
        for step, batch in enumerate(_batches(batch_fn)):
            model.use_gate = step % 2 == 0
            opt.zero_grad()
            ddp(batch.chunk(WORLD)[rank]).backward()
            opt.step()
        torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, f"{out}/rank{rank}.pt")
        dist.barrier()  # no rank tears the group (rank 0: its TCP store) down while the other still uses it
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("bucket_view", [False, True])
def test_ddp_two_ranks_match_single_process(tmp_path, bucket_view):
    mp.start_processes(_worker, args=(_free_port(), bucket_view, str(tmp_path)), nprocs=WORLD, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    # Single process: the mean of the two halves' losses is DDP's averaged gradient.
    model, batch_fn, dims = models.build("nanogpt")
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = AdamMini(model.named_parameters(), **dims, **KW)
    for step, batch in enumerate(_batches(batch_fn)):
        model.use_gate = step % 2 == 0
        opt.zero_grad()
        (sum(model(half) for half in batch.chunk(WORLD)) / WORLD).backward()
        opt.step()

    for name, p in model.named_parameters():
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name} differs between ranks"
        assert max_rel_err(p, ranks[0][name]) <= 1e-5, name
        if p.requires_grad and p.numel():
            assert not torch.equal(p, initial[name]), f"{name} never moved"
