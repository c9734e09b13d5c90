"""GPU (``-m gpu``): a flat buffer of more than 2^31 elements on each fused backend, so that
every 64-bit offset of the kernels is used (the CPU checks the same offsets with shifted base
pointers: test_cuda_backend.py's emulated kernels). About 20 GiB each; deselect with
``-k 'not 2_pow_31'`` on small GPUs (it skips itself when memory is short)."""

import gc

import pytest
import torch

from adam_mini_kernels import AdamMini, available_backends, launch_tables
from grad_stream import clone_named, max_rel_err
from precision import ULP
from test_cuda_backend import _import_backend


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_buffer_over_2_pow_31_elements(backend):
    """A bf16 group of more than 2^31 elements (4 GiB each of p, g and m): a whole-tensor block
    whose last tiles start past element 2^31, then a row-rule parameter and a bias (two Adam
    tiles) that sit entirely past it. The rows and the bias are compared with a small
    torch-backend run, the large block with its closed form after one step
    (p = -lr * g / (sqrt(mean(g^2)) + eps))."""
    if backend == "cuda":
        _import_backend()  # a failure where the extension should be built, else a skip
    elif "triton" not in available_backends([torch.device("cuda")]):
        pytest.skip("triton is not importable here")
    gc.collect()
    torch.cuda.empty_cache()  # the other backend's run: its cached 20 GiB
    n_first = 2**31 + launch_tables.TILE + 5
    need = n_first * 2 * 4 + (4 << 30)  # p, g, m, the parameter before adoption; scratch
    if torch.cuda.mem_get_info()[0] < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory")
    bf16 = dict(dtype=torch.bfloat16, device="cuda")
    first = torch.nn.Parameter(torch.zeros(n_first, **bf16))
    gen = torch.Generator().manual_seed(8)
    tail = [
        ("mlp.tail", torch.nn.Parameter(torch.randn(48, 72, generator=gen).to(**bf16))),
        ("tail.bias", torch.nn.Parameter(torch.randn(launch_tables.ADAM_TILE + 5, generator=gen).to(**bf16))),
    ]
    tail_ref = clone_named(tail)
    kw = dict(lr=1e-2, eps=1e-8, verbose=False)
    opt = AdamMini([("norm.first", first)] + tail, backend=backend, **kw)
    ref = AdamMini(tail_ref, backend="torch", **kw)
    opt.step()  # no gradients yet: builds the flat buffers only
    (group,) = opt._flat
    assert group.offsets[1] >= 2**31 and group.numel > 2**31 + 4096
    # Gradients written straight into the flat gradient buffer (no 4 GiB temporary, no CPU randn).
    first.grad = group.grad_view(0)
    first.grad.normal_(generator=torch.Generator(device="cuda").manual_seed(9))
    for i, ((_, p), (_, q)) in enumerate(zip(tail, tail_ref)):
        p.grad = group.grad_view(i + 1)
        p.grad.copy_(torch.randn(p.shape, generator=gen).to(**bf16))
        q.grad = p.grad.clone()
    opt.step()
    ref.step()
    T, tables = launch_tables, group.cache["launch_tables"]
    assert int(tables.tiles[:, T.TILE_START].max()) >= 2**31  # a large-block tile starts past 2^31
    assert int(tables.adam[:, T.ROW_START].min()) >= 2**31  # and every Adam tile
    assert int(torch.cat([r for _, r in tables.row_classes])[:, T.ROW_START].min()) >= 2**31  # and every row
    for (_, p), (_, q) in zip(tail, tail_ref):
        assert max_rel_err(q, p) <= ULP[torch.bfloat16]  # one step: at most a rounding flip
    # The large block: v = (1 - beta2) * mean(g^2); after one step p = -lr * g / (sqrt(mean) + eps).
    g = first.grad
    sumsq = sum(chunk.double().square().sum() for chunk in g.split(1 << 28))
    mean = (sumsq / n_first).item()
    assert abs(group.v_view(0).item() / (0.001 * mean) - 1) < 1e-4
    last = slice(n_first - launch_tables.TILE - 5, n_first)  # the tiles past 2^31
    expected = -kw["lr"] * g[last].double() / (mean**0.5 + kw["eps"])
    assert max_rel_err(expected, first.detach()[last]) <= ULP[torch.bfloat16]
    head = slice(0, launch_tables.TILE)  # and a tile before it
    expected = -kw["lr"] * g[head].double() / (mean**0.5 + kw["eps"])
    assert max_rel_err(expected, first.detach()[head]) <= ULP[torch.bfloat16]
