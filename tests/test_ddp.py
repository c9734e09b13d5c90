"""DistributedDataParallel works unchanged: each rank steps the same averaged gradients, so the
parameters stay identical across ranks and equal a single-process run on the whole batch.

Two CPU processes with the gloo backend, spawned by the test."""

import os

import pytest
import torch
import torch.distributed as dist

import models
from adam_mini_kernels import AdamMini
from adam_mini_kernels.rounding import SEED_BOUND
from grad_stream import max_rel_err
from spawned import COLLECTIVE_TIMEOUT, spawn

STEPS = 4
WORLD = 2
KW = dict(lr=1e-2, weight_decay=0.1, verbose=False)


def _batches(batch_fn):
    """The full batch of each step (every rank takes its half of it)."""
    return [batch_fn(step, torch.Generator().manual_seed(50 + step)) for step in range(STEPS)]


def _optimizer(arch, model, dims) -> AdamMini:
    """The name rules, or for GPT-2 ``for_model`` (its Conv1D weights stored transposed in the
    flat buffers, c_attn in Q/K/V sections), whose re-pointed parameters DDP must live with."""
    if arch == "gpt2_tied":
        return AdamMini.for_model(model.lm, **KW)
    return AdamMini(model.named_parameters(), **dims, **KW)


def _before_step(model, step: int) -> None:
    if hasattr(model, "use_gate"):  # nanogpt: a parameter without a gradient every other step
        model.use_gate = step % 2 == 0


def _worker(rank, port, bucket_view, out, arch):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=COLLECTIVE_TIMEOUT)
    torch.set_num_threads(1)
    try:
        model, batch_fn, dims = models.build(arch)
        ddp = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=bucket_view, find_unused_parameters=True)
        opt = _optimizer(arch, ddp.module, dims)
        for step, batch in enumerate(_batches(batch_fn)):
            _before_step(model, step)
            opt.zero_grad()
            ddp(batch.chunk(WORLD)[rank]).backward()
            opt.step()
        torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, f"{out}/rank{rank}.pt")
        dist.barrier()  # no rank tears the group (rank 0: its TCP store) down while the other still uses it
    finally:
        dist.destroy_process_group()


# GPT-2's key bias (c_attn.bias[32:64]) has no true gradient (softmax ignores a shift of every
# score): Adam turns its rounding noise, which DDP's averaging changes, into full-size steps that
# change nothing downstream. It is left out of the comparison with one process.
NOISE_ONLY = {"lm.transformer.h.0.attn.c_attn.bias": slice(32, 64), "lm.transformer.h.1.attn.c_attn.bias": slice(32, 64)}


@pytest.mark.parametrize("arch, bucket_view", [("nanogpt", False), ("nanogpt", True), ("gpt2_tied", True)])
def test_ddp_two_ranks_match_single_process(tmp_path, arch, bucket_view):
    spawn(_worker, WORLD, bucket_view, str(tmp_path), arch)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    # Single process: the mean of the two halves' losses is DDP's averaged gradient.
    model, batch_fn, dims = models.build(arch)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = _optimizer(arch, model, dims)
    if arch == "gpt2_tied":
        assert any(layout.columns for layout in opt.layout_overrides.values())
    for step, batch in enumerate(_batches(batch_fn)):
        _before_step(model, step)
        opt.zero_grad()
        (sum(model(half) for half in batch.chunk(WORLD)) / WORLD).backward()
        opt.step()

    for name, p in model.named_parameters():
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name} differs between ranks"
        kept = torch.ones(p.numel(), dtype=torch.bool)
        if name in NOISE_ONLY:
            kept[NOISE_ONLY[name]] = False
        assert max_rel_err(p.reshape(-1)[kept], ranks[0][name].reshape(-1)[kept]) <= 1e-5, name
        if p.requires_grad and p.numel():
            assert not torch.equal(p, initial[name]), f"{name} never moved"


def _drawn_seed(rng_state) -> int:
    """The seed AdamMini draws from torch's default generator in state ``rng_state``."""
    torch.set_rng_state(rng_state)
    return int(torch.randint(SEED_BOUND, ()).item())


def _rounding_worker(rank, port, out, rounding_seed):
    """bf16 DDP with stochastic rounding, the ranks' default generators seeded differently
    (DDP broadcasts rank 0's weights, so scripts need not seed alike)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=COLLECTIVE_TIMEOUT)
    torch.set_num_threads(1)
    try:
        torch.manual_seed(rank)
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 4)).to(torch.bfloat16)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        rng = torch.get_rng_state()  # what the optimizer draws its own seed from
        broadcasts = []
        original = dist.broadcast
        dist.broadcast = lambda *a, **k: (broadcasts.append(1), original(*a, **k))[1]
        try:
            opt = AdamMini(ddp.module.named_parameters(), stochastic_rounding=True, rounding_seed=rounding_seed, **KW)
        finally:
            dist.broadcast = original
        for step in range(STEPS):
            opt.zero_grad()
            x = torch.randn(8, 64, generator=torch.Generator().manual_seed(step)).to(torch.bfloat16)
            ddp(x.chunk(WORLD)[rank]).float().square().mean().backward()
            opt.step()
        result = {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "seed": opt._round_seed,
                  "own_seed": _drawn_seed(rng), "broadcasts": len(broadcasts)}
        torch.save(result, f"{out}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("rounding_seed", [None, 2024])
def test_stochastic_rounding_replicas_round_alike(tmp_path, rounding_seed):
    """Without rounding_seed the ranks take rank 0's drawn seed (one broadcast at construction);
    with it, no collective. Either way the bf16 replicas stay bitwise equal (with each rank's own
    seed, thousands of elements differed after three steps)."""
    spawn(_rounding_worker, WORLD, str(tmp_path), rounding_seed)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert ranks[0]["own_seed"] != ranks[1]["own_seed"]
    expected = ranks[0]["own_seed"] if rounding_seed is None else rounding_seed
    for r in ranks:
        assert r["seed"] == expected and r["broadcasts"] == (rounding_seed is None)
    for name, p in ranks[0]["params"].items():
        assert torch.equal(p, ranks[1]["params"][name]), name
