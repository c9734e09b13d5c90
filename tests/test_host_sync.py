"""A step reads nothing back to the host, checked on the CPU: the profiler records every aten op
the step runs, and none may be one that returns a tensor's value to Python (``.item()``,
``bool(t)``, ``if t:``) or sizes its output from data (``nonzero``, ``masked_select``). On a GPU
each of them is a device-to-host sync (a stall every step, and an error inside CUDA graph
capture); ``set_sync_debug_mode`` checks the same on the GPU (tests/test_capturable.py), this
test keeps CI from regressing there. Warm steps only: the first step builds buffers and tables."""

import collections

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from adam_mini_kernels import AdamMini, available_backends

CPU = torch.device("cpu")
READS_BACK = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero", "aten::masked_select")
SHAPES = {"wte.weight": (12, 16), "layers.0.wq.weight": (16, 16), "mlp.weight": (20, 16), "ln.weight": (16,),
          "mlp.bias": (20,), "big_norm.weight": (9000,), "proj.weight": (64, 128)}
CONFIGS = {
    "fp32": dict(),
    "clip+amp": dict(max_grad_norm=0.5, amp=True),
    "int8 m": dict(state_dtype=torch.int8),
    "bf16 rounding": dict(dtype=torch.bfloat16, stochastic_rounding=True),
    "idle params": dict(idle=True),
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("backend", [b for b in ("torch", "triton") if b in available_backends([CPU])])
def test_warm_step_reads_nothing_back(backend, config):
    kw = dict(CONFIGS[config])
    dtype, amp, idle = kw.pop("dtype", torch.float32), kw.pop("amp", False), kw.pop("idle", False)
    gen = torch.Generator().manual_seed(0)
    params = [(n, torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype))) for n, s in SHAPES.items()]
    opt = AdamMini(params, lr=torch.tensor(1e-2), weight_decay=0.1, verbose=False, dim=16, n_heads=2,
                   backend=backend, **kw)
    if amp:  # what GradScaler sets: device tensors
        opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(0.0)

    def grads(step):
        for i, (_, p) in enumerate(params):
            p.grad = None if idle and (i + step) % 3 == 0 else torch.randn(p.shape, generator=gen).to(dtype)

    for step in range(2):
        grads(step)
        opt.step()
    grads(2)
    opt.param_groups[0]["lr"].fill_(5e-3)  # what an LR scheduler does to a tensor lr
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step()
    reads = collections.Counter(e.name for e in prof.events() if e.name in READS_BACK)
    assert not reads, dict(reads)
    assert int(opt.state[params[0][1]]["step"]) == (2 if idle else 3)  # the steps ran (idle: none at step 0)
