"""state_dtype=torch.int8 on the fused backends (issue 10): dequantize, update and requantize m
inside the step kernels, against the torch backend (the readable format of quantization.py).

On a machine without a GPU the Triton kernels run in Triton's interpreter on CPU tensors and the
CUDA kernels in the host emulator of tests/gpu/host_emulator.cpp ("cuda-emulated"); with a GPU
the same tests run both backends' compiled kernels on CUDA tensors. The parameter set has every kind of
span the kernels cut: rows of a full and a short chunk (300), rows narrower than a chunk (100, 16
under the size threshold), heads of 16 chunks (4096), a whole-tensor row (6000) and a whole-tensor
large block of 12588 elements (three full tiles and a tile of one full and one short chunk).
"""

import copy
import math

import pytest
import torch

pytest.importorskip("triton")  # CPU builds of torch come without it (required in CI: conftest.py)

from adam_mini_kernels import AdamMini
from adam_mini_kernels.buffers import chunk_lengths
from adam_mini_kernels.quantization import dequantize_runs, quantize_runs
from grad_stream import clone_named, max_rel_err, run_stream
from precision import FP32_TOL, ULP
from test_cuda_backend import emulated_optimizer, emulator  # noqa: F401  (emulator: the fixture)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = {
    "embed.weight": (20, 300),
    "layers.0.q_proj.weight": (64, 128),
    "conv.weight": (60, 100),
    "wide.weight": (3, 4196),
    "layers.0.mlp.up.weight": (50, 100),
    "mlp.weight": (40, 300),
    "mlp.bias": (40,),
    "ln.weight": (300,),
    "small.mlp.weight": (8, 16),
}
QUANTIZED = {"embed.weight", "layers.0.q_proj.weight", "conv.weight", "wide.weight", "layers.0.mlp.up.weight", "mlp.weight"}
KW = dict(lr=1e-2, weight_decay=0.1, verbose=False, dim=128, n_heads=4)
# Params (and float m) against the torch backend, per storage dtype: tests/precision.py.
TOL = {torch.float32: FP32_TOL, **ULP}
FUSED = ["triton", "cuda" if DEVICE.type == "cuda" else "cuda-emulated"]  # the fused kernels, as they run here


def _named(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (n, torch.nn.Parameter(torch.randn(s, generator=gen).to(device=DEVICE, dtype=dtype))) for n, s in SHAPES.items()
    ]


@pytest.fixture
def make_optimizer(request):
    """AdamMini(named, backend=...) for a backend of FUSED or "torch"; "cuda-emulated" is the torch
    backend's optimizer stepping through the emulated CUDA kernels."""

    def make(backend, named, **kw):
        if backend == "cuda-emulated":
            return emulated_optimizer(named, request.getfixturevalue("emulator"), **dict(KW, **kw))
        return AdamMini(named, backend=backend, **dict(KW, **kw))

    return make


def _runs(opt):
    return {s["name"]: tuple((n, c) for _, n, c in s["sections"]) for s in opt.partition_summary()}


def _code_diffs(a, b):
    """(largest difference, number of differing codes) of two int8 code tensors."""
    diff = (a.int() - b.int()).abs()
    return int(diff.max()), int((diff > 0).sum())


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize(
    "dtype, stochastic", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)]
)
def test_matches_torch_backend(make_optimizer, backend, dtype, stochastic):
    """Four steps, some parameters idle on some: the same parameters (to float32 rounding), v,
    scales (to 1e-6) and codes (within one, at most 0.5 % of them) as the torch backend. One
    parameter's gradients are all zero (as an embedding's rows of unseen tokens): its chunks
    keep scale 0 and codes 0 (the quantizer divides by 1 there, not by the zero absmax)."""
    named, ref_named = _named(dtype), _named(dtype)
    zero = [n for n, _ in named].index("conv.weight")
    kw = dict(state_dtype=torch.int8, stochastic_rounding=stochastic)
    torch.manual_seed(0)
    opt = make_optimizer(backend, named, **kw)
    torch.manual_seed(0)  # the same stochastic rounding seed
    ref = make_optimizer("torch", ref_named, **kw)
    run_stream([[p for _, p in named], [p for _, p in ref_named]], [opt, ref], steps=4, seed=3, none_every=4,
               grad_scale=lambda i: 0.0 if i == zero else 1.0)
    assert {n for n, p in named if "m_codes" in opt.state[p]} == QUANTIZED
    for (name, p), (_, q) in zip(named, ref_named):
        assert max_rel_err(p, q) <= TOL[dtype], name
        s, r = opt.state[p], ref.state[q]
        if name in QUANTIZED:
            largest, count = _code_diffs(s["m_codes"], r["m_codes"])
            assert largest <= 1 and count <= 0.005 * p.numel(), (name, largest, count)
            assert max_rel_err(s["m_scales"], r["m_scales"]) <= 1e-6, name
            top = 0 if name == "conv.weight" else 127  # the all-zero one: every code and scale 0
            assert torch.equal(s["m_codes"].abs().amax(), torch.tensor(top, dtype=torch.int8, device=DEVICE)), name
            assert torch.equal(s["m_scales"] == 0, r["m_scales"] == 0) and (s["m_scales"] == 0).any() == (top == 0), name
        else:
            assert max_rel_err(s["m"].float(), r["m"].float()) <= TOL[dtype], name
        assert int(s["step"]) == int(r["step"]), name


@pytest.mark.parametrize("backend", ["torch"] + FUSED)
def test_requantizes_its_own_update_exactly(make_optimizer, backend):
    """The codes and scales the kernels write are exactly quantization.quantize_runs of the m they
    computed: an int8 optimizer and a float32-state one loaded from its checkpoint (codes
    dequantized, exact in float32) take the same step on the same backend; the int8 one's new
    codes and scales must equal the float one's new m quantized by the reference, and the
    parameters must be equal (the update uses m before requantization)."""
    named = _named()
    opt = make_optimizer(backend, named, state_dtype=torch.int8)
    run_stream([[p for _, p in named]], [opt], steps=2, seed=5, none_every=0)
    float_named = clone_named(named)
    float_opt = make_optimizer(backend, float_named)
    step_fn = float_opt._step_fn  # load_state_dict re-dispatches the step: keep an emulated one
    float_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # state_dict() holds live views, as torch's
    float_opt._step_fn = step_fn
    run_stream([[p for _, p in named], [p for _, p in float_named]], [opt, float_opt], steps=1, seed=6, none_every=0)
    runs = _runs(opt)
    for (name, p), (_, q) in zip(named, float_named):
        if DEVICE.type == "cpu":  # the interpreter: numpy float32, no FMA contraction
            assert torch.equal(p, q), name
        else:
            assert max_rel_err(p, q) <= 1e-6, name
        if name in QUANTIZED:
            codes, scales = quantize_runs(float_opt.state[q]["m"].reshape(-1), runs[name])
            assert torch.equal(opt.state[p]["m_scales"], scales), name
            assert torch.equal(opt.state[p]["m_codes"].reshape(-1), codes), name


def _chunk_ids(runs):
    """Every element's quantization chunk (an int per chunk of the parameter), in storage order."""
    lengths = chunk_lengths(torch.tensor([n for n, count in runs for _ in range(count)]))
    return torch.repeat_interleave(torch.arange(len(lengths)), lengths)


# (parameter, index, value): a row's full and short chunk, a head, and a whole-tensor large block.
NON_FINITE = [
    ("embed.weight", (2, 10), float("nan")),
    ("embed.weight", (5, 280), float("inf")),
    ("layers.0.q_proj.weight", (20, 7), float("nan")),
    ("wide.weight", (1, 4000), float("nan")),
    ("wide.weight", (2, 2000), -float("inf")),
]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaNs
@pytest.mark.parametrize("backend", ["torch"] + FUSED)
def test_non_finite_m_makes_its_chunk_non_finite(make_optimizer, backend):
    """[Note: non-finite int8 m]: NaN and inf gradient elements in a step that is taken (no AMP,
    no clipping): the chunk holding each gets a NaN or inf scale and codes 0, so that all of it
    decodes to NaN, on every backend; the other chunks as the torch backend's. (A float max
    drops NaNs, on a GPU and in Triton's interpreter alike: the fused kernels wrote a finite
    scale and the NaN element's code -127, a finite m.)"""
    named, ref_named = _named(), _named()
    opt = make_optimizer(backend, named, state_dtype=torch.int8)
    ref = make_optimizer("torch", ref_named, state_dtype=torch.int8)
    run_stream([[p for _, p in named], [p for _, p in ref_named]], [opt, ref], steps=1, seed=4, none_every=0)
    gen = torch.Generator().manual_seed(5)
    grads = {n: torch.randn(p.shape, generator=gen) for n, p in named}
    for name, index, value in NON_FINITE:
        grads[name][index] = value
    for params, o in ((named, opt), (ref_named, ref)):
        for name, p in params:
            p.grad = grads[name].to(DEVICE)
        o.step()
    runs = _runs(opt)
    for (name, p), (_, q) in zip(named, ref_named):
        assert torch.equal(p.isnan(), q.isnan()), name
        finite = p.isfinite() & q.isfinite()
        assert max_rel_err(p[finite], q[finite]) <= FP32_TOL, name
        if name not in QUANTIZED:
            continue
        s, r = opt.state[p], ref.state[q]
        codes, ref_codes = s["m_codes"].reshape(-1), r["m_codes"].reshape(-1)
        ids = _chunk_ids(runs[name]).to(DEVICE)
        hits = {int(ids[i * p.shape[1] + j]): value for n, (i, j), value in NON_FINITE if n == name}
        bad_chunk = torch.zeros(len(s["m_scales"]), dtype=torch.bool, device=DEVICE)
        bad_chunk[list(hits)] = True
        bad = bad_chunk[ids]
        m = dequantize_runs(codes, s["m_scales"], runs[name])
        assert torch.equal(m.isnan(), bad), name  # each hit chunk decodes to NaN, the others finite
        assert not codes[bad].any(), name
        for chunk, value in hits.items():
            scale = s["m_scales"][chunk]
            assert scale.isnan() if math.isnan(value) else scale == float("inf"), (name, chunk, scale)
        assert max_rel_err(s["m_scales"][~bad_chunk], r["m_scales"][~bad_chunk]) <= 1e-6, name
        assert _code_diffs(codes[~bad], ref_codes[~bad])[0] <= 1, name


@pytest.mark.parametrize("backend", FUSED)
def test_bitwise_deterministic(make_optimizer, backend):
    results = []
    for _ in range(2):
        named = _named(torch.bfloat16)
        opt = make_optimizer(backend, named, state_dtype=torch.int8)
        run_stream([[p for _, p in named]], [opt], steps=2, seed=1)
        results.append((named, opt))
    (a_named, a), (b_named, b) = results
    for (name, p), (_, q) in zip(a_named, b_named):
        assert torch.equal(p, q), name
        for key, value in a.state[p].items():
            if torch.is_tensor(value):
                assert torch.equal(value, b.state[q][key]), (name, key)


@pytest.mark.parametrize("backend", ["torch"] + FUSED)
def test_idle_and_skipped_parameters_keep_codes_and_scales(make_optimizer, backend):
    """A parameter without a gradient, beside stepped ones in its int8 group, and every parameter
    of a step that AMP skips (found_inf) keep their codes and scales bitwise. (Requantizing an
    unchanged m is not the identity: 127 * scale / 127 rounds to another float32 for about 0.4 %
    of scales, hence the 1024 chunks of the big parameter.)"""
    gen = torch.Generator().manual_seed(7)
    big = ("big.mlp.weight", torch.nn.Parameter(torch.randn(256, 1024, generator=gen).to(DEVICE)))
    named = _named() + [big]
    opt = make_optimizer(backend, named, state_dtype=torch.int8)
    run_stream([[p for _, p in named]], [opt], steps=1, seed=8, none_every=0)

    def snapshot():
        return {n: [opt.state[p][k].clone() for k in ("m_codes", "m_scales")] + [p.detach().clone()]
                for n, p in named if "m_codes" in opt.state[p]}

    def grads(idle=()):
        for name, p in named:
            p.grad = None if name in idle else torch.randn(p.shape, generator=gen).to(DEVICE)

    before = snapshot()
    grads(idle={big[0]})
    opt.step()
    after = snapshot()
    assert all(torch.equal(a, b) for a, b in zip(before[big[0]], after[big[0]]))
    assert not torch.equal(before["mlp.weight"][1], after["mlp.weight"][1])  # the others stepped

    grads()
    opt.grad_scale = torch.ones((), device=DEVICE)
    opt.found_inf = torch.ones((), device=DEVICE)
    opt.step()
    del opt.grad_scale, opt.found_inf
    skipped = snapshot()
    for name, values in after.items():
        assert all(torch.equal(a, b) for a, b in zip(values, skipped[name])), name
