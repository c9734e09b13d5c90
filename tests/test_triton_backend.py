"""The Triton backend against the PyTorch backend and official adam-mini 1.1.1.

On a machine without a GPU the kernels run on CPU tensors in Triton's interpreter (conftest.py
switches it on), so sizes stay small; with a GPU the same tests run the compiled kernels on CUDA
tensors, and the ``gpu`` tests add real sizes.
"""

import pytest
import torch

pytest.importorskip("triton")  # CPU builds of torch come without it (required in CI: conftest.py)

import models
from adam_mini_kernels import AdamMini
from adam_mini_kernels import launch_tables
from grad_stream import assert_backends_close, backend_runs, clone_named, max_rel_err, run_stream

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Relative tolerance on params after a few steps, per storage dtype. fp32 differs from the torch
# backend only by summation order and FMA contraction; in bf16/fp16 such a difference can flip
# the rounding of the stored p (and m) by one unit in the last place at each step: 3 steps of
# 2^-7 (bf16) / 2^-10 (fp16), relative, with margin.
TOL = {torch.float32: 2e-6, torch.bfloat16: 4e-2, torch.float16: 5e-3}
KW = dict(lr=1e-2, weight_decay=0.1, verbose=False)


def _named(model_name):
    model, _, dims = models.build(model_name)
    return [(n, p) for n, p in model.named_parameters()], dims


@pytest.mark.parametrize("model_name", ["nanogpt_beyond_official", "llama_gqa", "gpt2_tied", "cnn"])
def test_matches_torch_backend_fp32(model_name):
    named, dims = _named(model_name)
    sets, opts = backend_runs(named, dims, torch.float32, ("torch", "triton"), DEVICE, **KW)
    assert opts[1].backend == "triton"
    run_stream(sets, opts, steps=4, seed=hash(model_name) % 1000)
    assert_backends_close(sets, opts, TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_torch_backend_low_precision(dtype):
    named, dims = _named("nanogpt_beyond_official")
    sets, opts = backend_runs(named, dims, dtype, ("torch", "triton"), DEVICE, **KW)
    run_stream(sets, opts, steps=3, seed=11)
    assert_backends_close(sets, opts, TOL[dtype])


@pytest.mark.parametrize("state_dtype", [None, torch.float32])
def test_bf16_stores_round_to_nearest_even(state_dtype):
    """One step: the bf16 parameters (and m) the kernels store are the torch backend's, rounded
    to nearest even, but for the rare element whose float32 result differs in the last bit (a
    different summation order) right at a rounding boundary. Truncating stores (what Triton's
    interpreter does with a plain cast, see [Note: bfloat16 stores]) would differ in about half
    of them."""
    named, dims = _named("nanogpt_beyond_official")
    sets, opts = backend_runs(named, dims, torch.bfloat16, ("torch", "triton"), DEVICE, state_dtype=state_dtype, **KW)
    run_stream(sets, opts, steps=1, seed=12, none_every=0)
    differ = sum(int((a != b).sum()) for a, b in zip(*sets))
    total = sum(p.numel() for p in sets[0])
    assert differ <= 1e-3 * total, (differ, total)
    if state_dtype is None:
        m = [(fa.m, fb.m) for fa, fb in zip(opts[0]._flat, opts[1]._flat)]
        assert sum(int((a != b).sum()) for a, b in m) <= 1e-3 * total


def test_matches_official():
    Adam_mini = pytest.importorskip("adam_mini").Adam_mini

    named, dims = _named("llama_gqa")
    ours = clone_named(named, device=DEVICE)
    theirs = clone_named(named, device=DEVICE)
    opts = [Adam_mini(theirs, **dims, **KW), AdamMini(ours, backend="triton", **dims, **KW)]
    sets = [[p for _, p in theirs], [p for _, p in ours]]
    run_stream(sets, opts, steps=4, seed=3, none_every=0)
    for a, b in zip(*sets):
        assert max_rel_err(a, b) <= 1e-5


def _odd_named():
    """Every kind of work and its edges: a row of 1 element, rows not a multiple of any vector
    width, a whole-tensor block and a head block larger than one tile (the three-phase path), a
    row class at exactly ROW_MAX, zero-size parameters, a row rule on a 1-D tensor."""
    big = launch_tables.TILE * 2 + 3
    shapes = {
        "one.weight": (1,),
        "mlp.odd": (5, 7),
        "mlp.row_of_one": (3, 1),
        "mlp.exact": (2, launch_tables.ROW_MAX),
        "big_norm.weight": (big,),
        "layers.0.wq.weight": (4, 16 * 3 * 1000 // 4 + 5),  # reshaped below to head blocks
        "empty.weight": (0, 3),
        "mlp.empty_rows": (4, 0),
        "mlp.vector": (33,),
        "lone.bias": (1,),
        "long.bias": (launch_tables.ADAM_TILE + 17,),
    }
    gen = torch.Generator().manual_seed(5)
    named = []
    for name, shape in shapes.items():
        if "wq" in name:
            shape = (2 * 96, 96)  # dim 96, n_heads 1: one head block of 9216 > ROW_MAX elements
        named.append((name, torch.nn.Parameter(torch.randn(shape, generator=gen))))
    return named, dict(dim=96, n_heads=1)


def test_odd_sizes():
    named, dims = _odd_named()
    sets, opts = backend_runs(named, dims, torch.float32, ("torch", "triton"), DEVICE, **KW)
    run_stream(sets, opts, steps=3, seed=9, none_every=4)
    tables = opts[1]._flat[0].cache["launch_tables"]
    assert tables.tiles is not None and tables.adam is not None and len(tables.row_classes) >= 2
    assert_backends_close(sets, opts, TOL[torch.float32])


def test_bitwise_deterministic():
    named, dims = _odd_named()
    sets, opts = backend_runs(named, dims, torch.float32, ("triton", "triton"), DEVICE, **KW)
    run_stream(sets, opts, steps=2, seed=4)
    for a, b in zip(*sets):
        assert torch.equal(a, b)
    assert torch.equal(opts[0]._flat[0].v, opts[1]._flat[0].v)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_buffer_over_2_pow_31_elements():
    """A bf16 group of more than 2^31 elements: offsets past 2^31 must be 64-bit."""
    n = 2**31 + 4096
    need = n * 2 * 3 + (1 << 30)
    if torch.cuda.mem_get_info()[0] < need:
        pytest.skip("not enough GPU memory")
    first = torch.nn.Parameter(torch.zeros(n - 4096, dtype=torch.bfloat16, device="cuda"))
    tail = torch.nn.Parameter(torch.randn(64, 64, dtype=torch.bfloat16, device="cuda"))
    tail_ref = clone_named([("mlp.tail", tail)])
    opt = AdamMini([("norm.first", first), ("mlp.tail", tail)], backend="triton", **KW)
    ref = AdamMini(tail_ref, backend="torch", **KW)
    run_stream([[first, tail]], [opt], steps=1, none_every=0)
    # The tail sits past element 2^31 of the flat buffer: compare it with a small torch-backend run.
    gen = torch.Generator().manual_seed(0)
    torch.randn(first.shape, generator=gen)
    tail_ref[0][1].grad = torch.randn(tail.shape, generator=gen).to(tail.device, tail.dtype)
    ref.step()
    assert opt._flat[0].offsets[1] >= 2**31 - 4096
    assert max_rel_err(tail_ref[0][1], tail) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("with_idle", [False, True])
def test_coefficient_kernel_matches_torch_ops(with_idle):
    """The one-launch coefficient kernel writes the table of ``coefficients`` (float64 math,
    rounded once to float32) and advances the same step counters, also at large step counts and
    with per-parameter hyperparameters and idle parameters."""
    from adam_mini_kernels import coefficients
    from adam_mini_kernels.triton_kernels.launch import step_coefficients

    named, dims = _odd_named()
    params = clone_named(named, device=DEVICE)
    opt = AdamMini(params, backend="triton", **dims, **KW)
    run_stream([[p for _, p in params]], [opt], steps=1, seed=2, none_every=0)
    group = opt._flat[0]
    gen = torch.Generator().manual_seed(13)
    n = len(group.params)
    u = torch.rand(n, 5, generator=gen, dtype=torch.float64)
    group.set_hparams(u * torch.tensor([1.0, 0.2, 0.19, 0.0999, 1e-8], dtype=torch.float64) + torch.tensor([1e-4, 0.0, 0.8, 0.9, 0.0], dtype=torch.float64))
    group.steps.copy_(torch.randint(0, 200_000, (n,), generator=gen))
    active = (torch.rand(n, generator=gen) > 0.3).to(DEVICE) if with_idle else None
    start = group.steps.clone()

    group.round_seed = 987654321  # the stochastic rounding keys too

    fused = torch.empty(n, coefficients.NUM_COEFFICIENTS, device=DEVICE)
    step_coefficients(group.steps, group.hparams, fused, active, None, None, group.round_seed, True)
    fused_steps = group.steps.clone()
    group.steps.copy_(start)
    expected = coefficients.next_step_coefficients(group, active)
    assert torch.equal(fused_steps, group.steps)
    key = coefficients.C_ROUND_KEY
    torch.testing.assert_close(fused[:, :key], expected[:, :key], rtol=2**-22, atol=0)
    assert torch.equal(fused[:, key].view(torch.int32), expected[:, key].contiguous().view(torch.int32))
