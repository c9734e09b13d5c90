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
from grad_stream import backend_runs, clone_named, max_rel_err, run_stream
from precision import assert_runs_close
from test_cuda_backend import _odd_named, _sectioned_named, coefficient_inputs, unaligned_starts  # the CUDA tests' sets: every path of the kernels

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KW = dict(lr=1e-2, weight_decay=0.1, verbose=False)
# Tolerances against the torch backend, per storage dtype: tests/precision.py (measured, and why).


def _named(model_name):
    model, _, dims = models.build(model_name)
    return [(n, p) for n, p in model.named_parameters()], dims


def _seed(name):
    return sum(map(ord, name))  # not hash(): string hashes change from process to process


# The official-safe trees (llama_gqa, gpt2_tied, cnn, nanogpt) are compared with the torch backend
# in test_matches_official_and_torch_backend, over its 10 steps.
def test_matches_torch_backend_fp32():
    model_name = "nanogpt_beyond_official"
    named, dims = _named(model_name)
    sets, opts = backend_runs(named, dims, torch.float32, ("torch", "triton"), DEVICE, **KW)
    assert opts[1].backend == "triton"
    run_stream(sets, opts, steps=4, seed=_seed(model_name))
    assert_runs_close(sets, opts, steps=4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_torch_backend_low_precision(dtype):
    named, dims = _named("nanogpt_beyond_official")
    sets, opts = backend_runs(named, dims, dtype, ("torch", "triton"), DEVICE, **KW)
    run_stream(sets, opts, steps=3, seed=11)
    assert_runs_close(sets, opts, steps=3)


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


def test_bf16_stores_round_ties_to_even():
    """Gradients of +-1 with beta1 = 1/2: every m update is exact and m gains a significant bit
    per step, so from the ninth step on, a bfloat16 m is rounded from float32 values exactly
    halfway between two bfloat16 ones. The kernels' stores must round those ties to even,
    bitwise as torch's conversion (random values almost never hit a tie), on every path."""
    named, dims = _odd_named()
    sets, opts = backend_runs(named, dims, torch.bfloat16, ("torch", "triton"), DEVICE, betas=(0.5, 0.999), **KW)
    run_stream(sets, opts, steps=12, seed=2, none_every=0, signs=True)
    for a, b in zip(opts[0]._flat, opts[1]._flat):
        assert torch.equal(a.m, b.m)


@pytest.mark.parametrize("model_name", models.OFFICIAL_SAFE)
def test_matches_official_and_torch_backend(model_name):
    """SPEC section 6: float32 parity with official 1.1.1, max relative error <= 1e-5 after 10
    steps, on every tree official handles (frozen and zero-size parameters included), with some
    parameters' gradients None on some steps (run_stream's none_every); the same 10 steps against
    the torch backend at its tighter tolerance."""
    Adam_mini = pytest.importorskip("adam_mini").Adam_mini

    named, dims = _named(model_name)
    theirs = clone_named(named, device=DEVICE)
    official = Adam_mini(theirs, **dims, **KW)
    sets, opts = backend_runs(named, dims, torch.float32, ("torch", "triton"), DEVICE, **KW)
    names = [n for n, p in theirs if p.requires_grad]
    official_set = [p for _, p in theirs if p.requires_grad]
    steps = 10
    run_stream([official_set] + sets, [official] + opts, steps=steps, seed=_seed(model_name), none_every=5)
    for group in opts[1]._flat:  # every parameter had no gradient on 2 of the 10 steps
        assert group.steps.eq(steps - 2).all()
    for name, a, b in zip(names, official_set, sets[1]):
        assert max_rel_err(a, b) <= 1e-5, name
    assert_runs_close(sets, opts, steps=steps)


# Storage dtype and state_dtype of the odd-size runs: the CUDA kernels' emulated set
# (test_cuda_backend.py), plus int8 m (tests/test_int8_fused.py has its own set for it).
ODD_CASES = {
    "fp32": (torch.float32, {}),
    "bf16": (torch.bfloat16, {}),
    "fp16": (torch.float16, {}),
    "bf16-state-fp32": (torch.bfloat16, dict(state_dtype=torch.float32)),
    "fp16-state-fp32": (torch.float16, dict(state_dtype=torch.float32)),
    "fp32-state-int8": (torch.float32, dict(state_dtype=torch.int8)),
    "bf16-state-int8": (torch.bfloat16, dict(state_dtype=torch.int8)),
}


@pytest.mark.parametrize("case", list(ODD_CASES))
def test_odd_sizes(case):
    dtype, extra = ODD_CASES[case]
    named, dims = _odd_named()
    sets, opts = backend_runs(named, dims, dtype, ("torch", "triton"), DEVICE, **KW, **extra)
    run_stream(sets, opts, steps=3, seed=9, none_every=4)
    tables = [group.cache["launch_tables"] for group in opts[1]._flat]
    assert any(t.tiles is not None for t in tables) and any(t.adam is not None for t in tables)
    assert sum(len(t.row_classes) for t in tables) >= 2
    state_dtype = extra.get("state_dtype")
    expected = {torch.int8, dtype} if state_dtype == torch.int8 else {state_dtype or dtype}  # int8: some m stay 16/32-bit
    assert {group.m.dtype for group in opts[1]._flat} == expected
    assert_runs_close(sets, opts, steps=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unaligned_starts_of_aligned_spans(dtype):
    """Rows and tiles of aligned lengths at unaligned starts (``_sectioned_named``) take the
    scalar body ([Note: aligned spans]: the aligned one would read a span shifted to the vector
    boundary): the torch backend's result."""
    named, dims, layouts = _sectioned_named()
    sets, opts = backend_runs(named, dims, dtype, ("torch", "triton"), DEVICE, **KW)
    for opt in opts:
        opt.layout_overrides.update(layouts)
    run_stream(sets, opts, steps=3, seed=14, none_every=4)
    rows, tiles = unaligned_starts(opts[1], 8)  # _VEC
    assert rows >= 4 and tiles >= 2, (rows, tiles)
    assert_runs_close(sets, opts, steps=3)


def _same_rounding(a, b):
    """Bitwise on the CPU (the interpreter's numpy float32); on a GPU one compiler may contract
    ``p * decay - scale * m`` into an FMA and the other not, which changes a stochastically rounded
    value with probability 2^-16 (see tests/test_stochastic_rounding.py)."""
    if a.device.type == "cpu":
        return torch.equal(a, b)
    return int((a != b).sum()) <= max(2, a.numel() // 1000)


@pytest.mark.parametrize("state_dtype", [None, torch.float32])
def test_odd_sizes_stochastic_rounding(state_dtype):
    """As the CUDA kernels' (test_cuda_backend.py): gradients of +-1 and beta1 = 1/2 give exact
    sums and m updates, so the same float32 results in both backends, and the stochastically
    rounded bf16 p and m must be the torch backend's bits, and not round-to-nearest's."""
    named, dims = _odd_named()
    kw = dict(KW, state_dtype=state_dtype, betas=(0.5, 0.999))
    rounded = dict(stochastic_rounding=True, rounding_seed=1234)
    sets, opts = backend_runs(named, dims, torch.bfloat16, ("torch", "triton"), DEVICE, **rounded, **kw)
    nearest_sets, nearest_opts = backend_runs(named, dims, torch.bfloat16, ("torch",), DEVICE, **kw)
    run_stream(sets + nearest_sets, opts + nearest_opts, steps=3, seed=51, none_every=4, signs=True)
    for a, b in zip(*sets):
        assert _same_rounding(a, b)
    for fa, fb in zip(opts[0]._flat, opts[1]._flat):
        assert fa.round_seed is not None and fa.round_seed == fb.round_seed
        assert _same_rounding(fa.m, fb.m)
        assert torch.equal(fa.v, fb.v) if DEVICE.type == "cpu" else max_rel_err(fa.v, fb.v) <= 1e-6
    assert any(not torch.equal(a, b) for a, b in zip(sets[0], nearest_sets[0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_deterministic(dtype):
    named, dims = _odd_named()
    sets, opts = backend_runs(named, dims, dtype, ("triton", "triton"), DEVICE, **KW)
    run_stream(sets, opts, steps=2, seed=4)
    for a, b in zip(*sets):
        assert torch.equal(a, b)
    for fa, fb in zip(opts[0]._flat, opts[1]._flat):
        assert torch.equal(fa.v, fb.v) and torch.equal(fa.m, fb.m) and torch.equal(fa.steps, fb.steps)


@pytest.mark.parametrize("case", ["plain", "idle", "amp", "scale_only", "skip_only", "clip"])
def test_coefficient_kernel_matches_torch_ops(case):
    """The one-launch coefficient kernel writes the table of ``coefficients`` (float64 math,
    rounded once to float32) and advances the same step counters, also at large step counts and
    with per-parameter hyperparameters, idle parameters, the AMP tensors together or one
    without the other (a gradient multiplier alone; a skip flag alone, which skips), and a clip
    factor with AMP's."""
    from adam_mini_kernels import coefficients
    from adam_mini_kernels.triton_kernels.launch import step_coefficients

    named, dims = _odd_named()
    params = clone_named(named, device=DEVICE)
    opt = AdamMini(params, backend="triton", **dims, **KW)
    run_stream([[p for _, p in params]], [opt], steps=1, seed=2, none_every=0)
    group = opt._flat[0]
    gen = torch.Generator().manual_seed(13)
    n = len(group.params)
    coefficient_inputs(group, gen)
    active = (torch.rand(n, generator=gen) > 0.3).to(DEVICE) if case == "idle" else None
    inv_scale = torch.tensor(1 / 1024.0, device=DEVICE) if case in ("amp", "scale_only", "clip") else None
    found_inf = {"amp": 0.0, "skip_only": 1.0, "clip": 0.0}.get(case)
    found_inf = None if found_inf is None else torch.tensor(found_inf, device=DEVICE)
    clip = torch.tensor(0.3125, device=DEVICE) if case == "clip" else None
    start = group.steps.clone()

    group.round_seed = 987654321  # the stochastic rounding keys too

    fused = torch.empty(n, coefficients.NUM_COEFFICIENTS, device=DEVICE)
    step_coefficients(group.steps, group.hparams, fused, active, inv_scale, found_inf, clip, group.round_seed, True)
    fused_steps = group.steps.clone()
    group.steps.copy_(start)
    expected = coefficients.next_step_coefficients(group, active, inv_scale, found_inf, clip)
    assert torch.equal(expected[:, coefficients.C_CLIP].cpu(), torch.full((n,), 1.0 if clip is None else 0.3125))
    assert torch.equal(fused_steps, group.steps)
    assert torch.equal(fused_steps, start) == (case == "skip_only")
    key = coefficients.C_ROUND_KEY
    torch.testing.assert_close(fused[:, :key], expected[:, :key], rtol=2**-22, atol=0)
    assert torch.equal(fused[:, key].view(torch.int32), expected[:, key].contiguous().view(torch.int32))
