"""The torch backend's step traces as one graph: ``torch.compile(fullgraph=True)`` of it runs
with no graph break and gives the eager result (to float32 rounding: inductor fuses the ops),
with every parameter active and with idle parameters."""

import torch

from adam_mini_kernels import AdamMini
from adam_mini_kernels.torch_backend import torch_step
from grad_stream import clone_named, max_rel_err, run_stream


def _named():
    gen = torch.Generator().manual_seed(3)
    shapes = {"wte.weight": (10, 8), "layers.0.wq.weight": (8, 8), "mlp.weight": (6, 8), "ln.weight": (8,), "x.bias": (5,), "odd": (3, 3)}
    return [(n, torch.nn.Parameter(torch.randn(s, generator=gen))) for n, s in shapes.items()]


def test_torch_step_compiles_fullgraph_and_matches_eager():
    named = _named()
    eager_params, compiled_params = clone_named(named), clone_named(named)
    kw = dict(lr=1e-2, weight_decay=0.1, verbose=False, dim=8, n_heads=2, backend="torch")
    eager, compiled = AdamMini(eager_params, **kw), AdamMini(compiled_params, **kw)
    compiled._step_fn = torch.compile(torch_step, fullgraph=True)
    sets = [[p for _, p in eager_params], [p for _, p in compiled_params]]
    run_stream(sets, [eager, compiled], steps=4, seed=8, none_every=3)
    for a, b in zip(*sets):
        assert max_rel_err(a, b) <= 1e-6
    assert torch.equal(eager._flat[0].steps, compiled._flat[0].steps)
    assert max_rel_err(eager._flat[0].v, compiled._flat[0].v) <= 1e-6
