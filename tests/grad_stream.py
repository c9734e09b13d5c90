"""Run optimizers side by side on one stream of synthetic gradients.

Comparing two optimizers by training two model copies with backward() mixes the optimizers'
rounding differences with the model's sensitivity to them (Adam-like updates turn a tiny change
of a near-zero gradient into an lr-sized step). Here every optimizer gets the same gradients,
fresh random each step, with some parameters' gradients None on some steps.
"""

from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch


def clone_named(named: Sequence[Tuple[str, torch.Tensor]], device=None, dtype=None) -> List[Tuple[str, torch.nn.Parameter]]:
    """Fresh leaf parameters with the same names and values (optionally moved / cast)."""
    out = []
    for name, p in named:
        t = p.detach().clone().to(device=device or p.device, dtype=dtype or p.dtype)
        out.append((name, torch.nn.Parameter(t, requires_grad=p.requires_grad)))
    return out


def run_stream(
    param_sets: Sequence[Sequence[torch.Tensor]],
    optimizers: Sequence[torch.optim.Optimizer],
    steps: int,
    seed: int = 0,
    none_every: int = 5,
    grad_scale: Callable[[int], float] = lambda i: 1.0,
    signs: bool = False,
) -> None:
    """``steps`` steps; at step s parameter i gets no gradient when (i + s) % none_every == 0
    (none_every=0: never), else the same random gradient (drawn in float32) for every set.
    ``signs``: gradients of +-1 instead, whose block sums of g^2 are exact in any order, so that
    backends compute bitwise the same float32 results."""
    for step in range(steps):
        gen = torch.Generator().manual_seed(seed * 7919 + step)
        reference = param_sets[0]
        grads = []
        for i, p in enumerate(reference):
            if none_every and (i + step) % none_every == 0:
                grads.append(None)
            else:
                g = torch.randn(p.shape, generator=gen)
                grads.append((torch.where(g < 0, -1.0, 1.0) if signs else g) * grad_scale(i))
        for params, opt in zip(param_sets, optimizers):
            for p, g in zip(params, grads):
                p.grad = None if g is None else g.to(device=p.device, dtype=p.dtype)
            opt.step()


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |a| (0 for empty tensors), in float64."""
    if a.numel() == 0:
        return 0.0
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a64 - b64).abs().max() / a64.abs().max().clamp(min=1e-30)).item()


def backend_runs(named, dims, dtype, backends, device, **opt_kwargs):
    """One fresh copy of ``named`` (cast to ``dtype`` on ``device``) and one AdamMini per entry of
    ``backends``: (parameter lists, optimizers), ready for ``run_stream``."""
    from adam_mini_kernels import AdamMini

    sets, opts = [], []
    for backend in backends:
        params = clone_named(named, device=device, dtype=dtype)
        sets.append([p for _, p in params if p.requires_grad])
        opts.append(AdamMini(params, backend=backend, **dims, **opt_kwargs))
        assert opts[-1].backend == backend
    return sets, opts


def assert_backends_close(sets, opts, tol):
    """Params within ``tol`` (relative), first moments within 10 tol, second moments within
    max(tol, 1e-5), step counters equal, between the first two runs."""
    for a, b in zip(*sets):
        assert max_rel_err(a, b) <= tol, (a.shape, max_rel_err(a, b))
    for fa, fb in zip(opts[0]._flat, opts[1]._flat):
        assert torch.equal(fa.steps, fb.steps)
        assert max_rel_err(fa.v, fb.v) <= max(tol, 1e-5)
        assert max_rel_err(fa.m.float(), fb.m.float()) <= tol * 10
