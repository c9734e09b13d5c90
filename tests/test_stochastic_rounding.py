"""stochastic_rounding=True: unbiased bfloat16 stores of p and m, the same bits on every backend
(torch; Triton, under the interpreter on a CPU; CUDA on a GPU, and emulated on the CPU in
test_cuda_backend.py), reproducible from the seed and exact across save and load."""

import io

import numpy as np
import pytest
import torch

from adam_mini_kernels import AdamMini, available_backends, rounding
from adam_mini_kernels.optimizer import LEGACY_ROUNDING_KEY, ROUNDING_SEED_KEY
from grad_stream import clone_named, run_stream
from test_cuda_backend import emulator  # noqa: F401  (the fixture)
from test_fsdp import backend_arg  # noqa: F401  (the fixture)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = [b for b in ("torch", "triton", "cuda") if b in available_backends([DEVICE])]
FUSED = [b for b in BACKENDS if b != "torch"]  # compared with the torch backend (the emulated CUDA kernels: test_cuda_backend)
# Rows (mlp, wte), heads (wq), a whole-tensor block larger than a tile (norm: two-phase), Adam
# blocks (bias), odd sizes: every kind of work of the fused backends.
SHAPES = {"wte.weight": (12, 40), "layers.0.wq.weight": (16, 16), "mlp.weight": (5, 7), "norm.weight": (9000,), "mlp.bias": (21,)}
KW = dict(lr=1e-2, weight_decay=0.1, verbose=False, dim=16, n_heads=2)
BF16_ULP_AT_1 = 2.0**-7


def _named(seed=0, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    return [(n, torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE, dtype))) for n, s in SHAPES.items()]


def _run(backend, seed=0, steps=3, torch_seed=0, **kwargs):
    """``steps`` steps of gradients of +-1 with beta1 = 1/2: the sums of g^2 and the m updates are
    exact, so every backend computes bitwise the same float32 results (whether or not its
    compiler fuses m + w * (g - m) into an FMA) and the rounding alone can tell them apart."""
    named = _named(seed)
    torch.manual_seed(torch_seed)
    opt = AdamMini(named, backend=backend, betas=(0.5, 0.999), **KW, **kwargs)
    params = [p for _, p in named]
    run_stream([params], [opt], steps=steps, seed=100, none_every=4, signs=True)
    return params, opt


# -- the rounding itself ------------------------------------------------------------------------


def _mix32_numpy(x):
    """rounding.mix32 in numpy uint32 arithmetic (wrapping): an independent check of the int64
    emulation of 32-bit multiplies."""
    x = x.astype(np.uint32)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint32(16)
        x *= np.uint32(rounding.MIX_MUL1)
        x ^= x >> np.uint32(15)
        x *= np.uint32(rounding.MIX_MUL2)
        x ^= x >> np.uint32(15)
    return x


def test_mix32_tensor_int_and_numpy_agree():
    values = torch.randint(0, 2**32, (4096,), dtype=torch.int64)
    values[:3] = torch.tensor([0, 2**32 - 1, 2**31])
    got = rounding.mix32(values)
    assert torch.equal(got, torch.from_numpy(_mix32_numpy(values.numpy()).astype(np.int64)))
    assert [rounding.mix32(int(v)) for v in values[:64]] == got[:64].tolist()
    assert got.min() >= 0 and got.max() < 2**32


def test_each_flat_group_has_its_own_seed():
    """Flat groups number their elements from 0 each: the same seed for two of them would round
    their elements alike (correlated), so each group's seed is its own, and in [0, SEED_BOUND)."""
    for seed in (0, 1, 2**31 - 1):
        seeds = [rounding.group_seed(seed, k) for k in range(256)]
        assert len(set(seeds)) == len(seeds), seed
        assert all(0 <= s < rounding.SEED_BOUND for s in seeds)


def test_keys_survive_the_float32_table_bitwise():
    keys = torch.randint(0, 2**32, (10000,), dtype=torch.int64)
    column = rounding.keys_as_float(keys)
    assert column.dtype == torch.float32
    table = torch.cat([torch.zeros(len(keys), 2), column[:, None]], dim=1)  # as in coefficients.py
    assert torch.equal(rounding.keys_from_float(table[:, 2]), keys)


def test_rounds_to_a_neighbour_and_keeps_exact_values():
    x = torch.randn(20000) * 10.0
    bits = torch.randint(0, 2**16, x.shape)
    y = rounding.stochastic_round_to_bf16(x, bits).float()
    # The two bfloat16 neighbours of x: truncation (towards zero) and one ulp further out.
    trunc = (x.view(torch.int32) & -(1 << 16)).view(torch.float32)
    away = ((x.view(torch.int32) & -(1 << 16)) + (1 << 16)).view(torch.float32)
    assert ((y == trunc) | (y == away)).all()
    exact = x.to(torch.bfloat16).float()
    assert torch.equal(rounding.stochastic_round_to_bf16(exact, bits).float(), exact)
    # Zero bits truncate; the largest bits round every inexact value away from zero.
    assert torch.equal(rounding.stochastic_round_to_bf16(x, torch.zeros_like(bits)).float(), trunc)
    inexact = trunc != x
    ones = torch.full_like(bits, 0xFFFF)
    assert torch.equal(rounding.stochastic_round_to_bf16(x, ones).float()[inexact], away[inexact])


def test_non_finite_values_round_to_nearest():
    x = torch.tensor([float("inf"), -float("inf"), float("nan"), 1.0])
    y = rounding.stochastic_round_to_bf16(x, torch.full((4,), 0xFFFF))
    assert y[0] == float("inf") and y[1] == -float("inf") and torch.isnan(y[2]) and y[3] == 1.0
    # NaNs whose payload is in the low 16 bits only: adding bits and truncating would make them inf.
    low_payload = torch.tensor([0x7F800001, 0xFF800001 - 2**32], dtype=torch.int32).view(torch.float32)
    assert torch.isnan(low_payload).all()
    assert torch.isnan(rounding.stochastic_round_to_bf16(low_payload, torch.zeros(2, dtype=torch.int64))).all()


def test_unbiased_for_one_value():
    """E[round(x)] = x: the mean of many independently rounded copies is within 4 standard errors."""
    n = 200_000
    keys = torch.full((n,), 12345, dtype=torch.int64)
    bits = rounding.random_bits(keys, torch.arange(n), 0)
    for value in (1.0 + 0.3 * BF16_ULP_AT_1, -3.7e-3, 0.1):
        x = torch.full((n,), value)
        y = rounding.stochastic_round_to_bf16(x, bits).double()
        lo, hi = y.min().item(), y.max().item()
        frac = (abs(value) - min(abs(lo), abs(hi))) / abs(hi - lo)
        standard_error = abs(hi - lo) * (frac * (1 - frac) / n) ** 0.5
        assert abs(y.mean().item() - value) < 4 * standard_error, value


HIGH_INDICES = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 2**40 + 123, 2**62 + 7]


def expected_bits(key, indices):
    return rounding.random_bits(torch.full((len(indices),), key), torch.tensor(indices), 0).tolist()


if "triton" in BACKENDS:
    import triton
    import triton.language as tl

    from adam_mini_kernels.triton_kernels.kernels import random_bits

    @triton.jit
    def bits_kernel(index_ptr, out_ptr, key, N: tl.constexpr):
        lanes = tl.arange(0, N)
        tl.store(out_ptr + lanes, random_bits(key.to(tl.uint32), tl.load(index_ptr + lanes)).to(tl.int64))


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton (a GPU, or TRITON_INTERPRET=1)")
def test_triton_random_bits_beyond_2_pow_32():
    """The hash of the Triton kernels at flat indices no test buffer reaches (the high word)."""
    n = 16
    indices = torch.tensor(HIGH_INDICES + [3] * (n - len(HIGH_INDICES)), device=DEVICE)
    for key in (0, 12345, 2**31 - 1):
        out = torch.empty(n, dtype=torch.int64, device=DEVICE)
        bits_kernel[(1,)](indices, out, key, N=n)
        assert out.cpu().tolist() == expected_bits(key, indices.cpu().tolist())


# -- the optimizer ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("state_dtype", [None, torch.float32])
def test_backends_round_bitwise_alike(backend, state_dtype):
    """Same float32 results (exact sums) in, the same stochastically rounded bits out, as the
    torch backend; and different bits than round-to-nearest (so the comparison can fail). Twelve
    steps: m gains a significant bit per step, so a bfloat16 m is rounded from the ninth on."""
    ref, ref_opt = _run("torch", steps=12, stochastic_rounding=True, state_dtype=state_dtype)
    got, got_opt = _run(backend, steps=12, stochastic_rounding=True, state_dtype=state_dtype)
    nearest, nearest_opt = _run("torch", steps=12, state_dtype=state_dtype)
    for a, b in zip(ref, got):
        _assert_same_rounding(a, b)
    _assert_same_rounding(ref_opt._flat[0].m, got_opt._flat[0].m)
    assert any(not torch.equal(a, c) for a, c in zip(ref, nearest))
    assert (state_dtype is None) != torch.equal(ref_opt._flat[0].m, nearest_opt._flat[0].m)  # m rounded too


def _assert_same_rounding(a, b):
    """Bitwise on the CPU. On a GPU the float32 p may differ in its last bit where one backend's
    compiler contracts ``p * decay - scale * m`` into an FMA and another does not; that changes
    the stochastically rounded value with probability 2^-16, so all but a handful of elements
    must still match (a wrong hash or key changes about half of them)."""
    if a.device.type == "cpu":
        assert torch.equal(a, b)
    else:
        assert (a != b).sum().item() <= max(2, a.numel() // 1000)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rounds_to_a_neighbour_of_the_float32_step(backend):
    """Each stochastically rounded p is one of the two bfloat16 neighbours of the float32 result:
    the same step on float32 copies of the parameters (``_run``'s gradients make every float32
    value exact), truncated or one ulp further out. (This once compared with the step rounded to
    nearest, within one to two ulps.)"""
    params, _ = _run(backend, steps=1, stochastic_rounding=True, state_dtype=torch.float32)
    named32 = [(n, torch.nn.Parameter(p.detach().float())) for n, p in _named()]
    opt32 = AdamMini(named32, backend="torch", betas=(0.5, 0.999), **KW)
    run_stream([[p for _, p in named32]], [opt32], steps=1, seed=100, none_every=4, signs=True)
    inexact = 0
    for p, (name, x) in zip(params, named32):
        bits = x.detach().cpu().view(torch.int32)
        trunc = (bits & -(1 << 16)).view(torch.float32)
        away = ((bits & -(1 << 16)) + (1 << 16)).view(torch.float32)
        got = p.detach().cpu().float()
        assert ((got == trunc) | (got == away)).all(), name
        inexact += int((trunc != x.detach().cpu()).sum())
    assert inexact > 1000  # most float32 results fall between two bfloat16 values


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_updates_survive_on_average(backend):
    """The pure-bf16 failure that stochastic rounding fixes: a weight at 1.0 with an update of a
    tenth of a bfloat16 ulp never moves under round-to-nearest; rounded stochastically, the mean
    of many such weights follows the float32 trajectory (within 4 standard errors), and so does
    the bfloat16 m."""
    n, steps, lr = 4096, 20, BF16_ULP_AT_1 / 10

    def train(**kwargs):
        w = torch.nn.Parameter(torch.ones(n, device=DEVICE, dtype=kwargs.pop("dtype", torch.bfloat16)))
        torch.manual_seed(3)
        opt = AdamMini([("mlp.bias", w)], lr=lr, backend=kwargs.pop("backend", backend), verbose=False, **kwargs)
        for _ in range(steps):
            w.grad = torch.full_like(w, 0.5)
            opt.step()
        return w.detach().double(), opt.state[w]["m"].double()

    # (Round-to-nearest shown with the torch backend: Triton's CPU interpreter truncates float32
    # to bfloat16, where the GPU rounds to nearest.)
    nearest, _ = train(backend="torch")
    assert (nearest == 1.0).all()
    fp32, m32 = train(dtype=torch.float32, backend="torch")
    w, m = train(stochastic_rounding=True)
    # Each step rounds every weight independently: the error of the mean is a sum of `steps`
    # independent roundings of at most one ulp each.
    standard_error = BF16_ULP_AT_1 / 2 * (steps / n) ** 0.5
    assert abs(w.mean().item() - fp32[0].item()) < 4 * standard_error
    assert fp32[0].item() < 1.0 - 10 * standard_error  # the float32 run did move
    # m (below 0.5: ulp <= 2^-9) decays each rounding error by beta1 = 0.9 per step:
    # sum 0.9^(2k) <= 1 / 0.19.
    m_standard_error = 2.0**-9 / 2 * (1 / 0.19 / n) ** 0.5
    assert abs(m.mean().item() - m32[0].item()) < 4 * m_standard_error


@pytest.mark.parametrize("backend", BACKENDS)
def test_reproducible_from_the_seed(backend):
    a, _ = _run(backend, torch_seed=7, stochastic_rounding=True)
    b, _ = _run(backend, torch_seed=7, stochastic_rounding=True)
    c, _ = _run(backend, torch_seed=8, stochastic_rounding=True)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x, z) for x, z in zip(a, c))


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_is_exact(backend):
    """Save after 3 steps, load into an optimizer built under another global seed, go on: the
    same bits as the uninterrupted run (the seed travels in the state dict)."""
    named = _named(seed=2)
    torch.manual_seed(11)
    opt = AdamMini(named, backend=backend, stochastic_rounding=True, **KW)
    params = [p for _, p in named]
    run_stream([params], [opt], steps=3, seed=4)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    assert [g[ROUNDING_SEED_KEY] for g in saved["param_groups"]] == [opt._round_seed] * len(opt.param_groups)
    assert LEGACY_ROUNDING_KEY not in saved and ROUNDING_SEED_KEY not in opt.param_groups[0]

    resumed_named = clone_named(named)
    torch.manual_seed(12)
    resumed = AdamMini(resumed_named, backend=backend, stochastic_rounding=True, **KW)
    assert resumed._round_seed != opt._round_seed
    resumed.load_state_dict(saved)
    assert resumed._round_seed == opt._round_seed and all(ROUNDING_SEED_KEY not in g for g in resumed.param_groups)
    run_stream([params, [p for _, p in resumed_named]], [opt, resumed], steps=3, seed=5)
    for (n, a), (_, b) in zip(named, resumed_named):
        assert torch.equal(a, b), n
    assert torch.equal(opt._flat[0].m, resumed._flat[0].m)


@pytest.mark.parametrize("backend", BACKENDS)
def test_idle_parameters_stay_bitwise_still(backend):
    named = _named(seed=3)
    opt = AdamMini(named, backend=backend, stochastic_rounding=True, **KW)
    params = [p for _, p in named]
    run_stream([params], [opt], steps=2, seed=1, none_every=0)
    before = [p.detach().clone() for p in params]
    m_before = opt._flat[0].m.clone()
    for i, p in enumerate(params):
        p.grad = None if i % 2 else torch.randn_like(p)
    opt.step()
    for i, (p, b) in enumerate(zip(params, before)):
        assert torch.equal(p, b) == bool(i % 2), i
    idle = [i for i in range(len(params)) if i % 2]
    for i in idle:
        assert torch.equal(opt._flat[0].m_view(i), m_before[opt._flat[0].offsets[i] :][: params[i].numel()])


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")  # the interpreter's inf * 0
@pytest.mark.parametrize("backend", FUSED)
def test_non_finite_results_stay_non_finite(backend):
    """An inf or NaN gradient with no GradScaler to skip the step makes inf/NaN parameters and m
    (a whole row or block through its v, one element of an Adam block): the stochastic stores
    keep them non-finite, where the torch backend's do. Adding 16 random bits to a NaN's float32
    pattern can carry out of it: the GPU's canonical NaN 0x7FFFFFFF would be stored as -0.0. (The
    CPU's NaNs have zero low bits, which do not carry: only a GPU run can catch that one.)"""
    runs = []
    for name in ("torch", backend):
        named = _named(seed=5)
        opt = AdamMini(named, backend=name, stochastic_rounding=True, **KW)
        for i, (_, p) in enumerate(named):
            g = torch.randn_like(p)
            g.view(-1)[(7 * i) % p.numel()] = float("nan") if i % 2 else float("inf")
            p.grad = g
        opt.step()
        runs.append([p.detach() for _, p in named] + [opt._flat[0].m])
    for i, (ref, got) in enumerate(zip(*runs)):
        assert not torch.isfinite(ref).all(), i
        assert torch.equal(torch.isfinite(got), torch.isfinite(ref)), i
        assert torch.equal(torch.isnan(got), torch.isnan(ref)), i


def test_mixed_dtypes_round_only_bfloat16():
    named = _named(seed=4)
    named[0] = (named[0][0], torch.nn.Parameter(named[0][1].detach().float()))
    opt = AdamMini(named, stochastic_rounding=True, **KW)
    run_stream([[p for _, p in named]], [opt], steps=1)
    seeds = {g.dtype: g.round_seed for g in opt._flat}
    assert seeds[torch.float32] is None and seeds[torch.bfloat16] is not None


def test_is_validated():
    with pytest.raises(TypeError, match="stochastic_rounding must be True or False"):
        AdamMini(_named(), stochastic_rounding=1, **KW)
    # The first parameter's dtype, the others': float16 beside bfloat16 is refused too.
    for first, rest in ((torch.float16, torch.float16), (torch.float32, torch.float32), (torch.float16, torch.bfloat16)):
        named = _named(dtype=rest)
        named[0] = (named[0][0], torch.nn.Parameter(named[0][1].detach().to(first)))
        opt = AdamMini(named, stochastic_rounding=True, **KW)
        for _, p in named:
            p.grad = torch.ones_like(p)
        before = [p.detach().clone() for _, p in named]
        with pytest.raises(ValueError, match="stochastic_rounding=True rounds bfloat16"):
            opt.step()
        assert all(torch.equal(p, b) for (_, p), b in zip(named, before))
    opt = AdamMini(_named(), stochastic_rounding=True, **KW)
    seed = opt._round_seed

    def saved_with(first, rest, legacy=None):  # the first param group's seed, the others' (None: no key)
        saved = opt.state_dict()
        for i, group in enumerate(saved["param_groups"]):
            value = first if i == 0 else rest
            if value is None:
                del group[ROUNDING_SEED_KEY]
            else:
                group[ROUNDING_SEED_KEY] = value
        if legacy is not None:
            saved[LEGACY_ROUNDING_KEY] = legacy
        return saved

    for bad, match in ((saved_with(-1, -1), "must be an int"), (saved_with(1.5, 1.5), "must be an int"),
                       (saved_with(1, 2), "different stochastic rounding seeds"),
                       (saved_with(None, None, {"seed": -1}), "must be an int"),
                       (saved_with(None, None, 7), "must be {'seed'"), (saved_with(1, 1, {"seed": 2}), "different")):
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(bad)
        assert opt._round_seed == seed


def test_rounding_seed_is_used_as_given_and_validated():
    state = torch.get_rng_state()
    a = AdamMini(_named(), stochastic_rounding=True, rounding_seed=12345, **KW)
    assert torch.equal(state, torch.get_rng_state())  # a given seed draws nothing
    assert a._round_seed == 12345 and a.state_dict()["param_groups"][0][ROUNDING_SEED_KEY] == 12345
    torch.manual_seed(7)
    drawn = AdamMini(_named(), stochastic_rounding=True, **KW)._round_seed
    assert AdamMini(_named(), stochastic_rounding=True, rounding_seed=drawn, **KW)._round_seed == drawn
    for bad in (-1, 2**31, 1.0, True, "1"):
        with pytest.raises(ValueError, match=r"rounding_seed must be an int in \[0, 2\*\*31\)"):
            AdamMini(_named(), stochastic_rounding=True, rounding_seed=bad, **KW)
    with pytest.raises(ValueError, match="needs stochastic_rounding=True"):
        AdamMini(_named(), rounding_seed=1, **KW)


def test_off_by_default_and_no_seed_drawn():
    state = torch.get_rng_state()
    opt = AdamMini(_named(), **KW)
    assert torch.equal(state, torch.get_rng_state())  # constructing does not consume randomness
    saved = opt.state_dict()
    assert opt._round_seed is None and all(ROUNDING_SEED_KEY not in g for g in saved["param_groups"])
    assert LEGACY_ROUNDING_KEY not in saved


def test_seed_of_a_legacy_state_dict_is_loaded():
    """State dicts written before the seed moved into the param groups hold it at the top level."""
    opt = AdamMini(_named(), stochastic_rounding=True, rounding_seed=99, **KW)
    legacy = opt.state_dict()
    for g in legacy["param_groups"]:
        del g[ROUNDING_SEED_KEY]
    legacy[LEGACY_ROUNDING_KEY] = {"seed": 4321}
    opt.load_state_dict(legacy)
    assert opt._round_seed == 4321


# -- sharded parameters --------------------------------------------------------------------------

# A bf16 (4, 64) weight whose two Shard(0) shards hold the same values and get the same gradients,
# and a replicated norm weight, on 2 gloo ranks; lr small enough that most updates are below half
# a bf16 ulp: where parameters move is up to the random bits.
SHARD_KW = dict(lr=1e-3, verbose=False, dim=16, n_heads=2, stochastic_rounding=True, rounding_seed=1234)
SHARD_STEPS = 10


def _shard_data():
    """(half of the weight, the norm weight, the gradients of the half and of the norm per step)."""
    gen = torch.Generator().manual_seed(7)
    half, norm = torch.randn(2, 64, generator=gen).bfloat16(), torch.randn(64, generator=gen).bfloat16()
    grads = [(torch.randn(2, 64, generator=gen).bfloat16(), torch.randn(64, generator=gen).bfloat16()) for _ in range(SHARD_STEPS)]
    return half, norm, grads


def _shard_optimizer(named, backend_arg) -> AdamMini:
    from test_cuda_backend import emulated_optimizer, load_emulator

    backend, emulator_path = backend_arg
    if emulator_path:
        return emulated_optimizer(named, load_emulator(emulator_path), **SHARD_KW)
    return AdamMini(named, backend=backend, **SHARD_KW)


def _shard_steps(weight, norm, opt, place_weight, place_norm) -> None:
    for g_half, g_norm in _shard_data()[2]:
        weight.grad, norm.grad = place_weight(g_half.clone()), place_norm(g_norm.clone())
        opt.step()


def _shards_worker(rank, port, out, backend_arg):
    from test_fsdp import _init, _teardown
    from torch.distributed.tensor import DTensor, Replicate, Shard, init_device_mesh

    _init(rank, port)
    try:
        mesh = init_device_mesh("cpu", (2,))
        half, norm, _ = _shard_data()
        shard = lambda t: DTensor.from_local(t, mesh, [Shard(0)], run_check=False, shape=torch.Size((4, 64)), stride=(64, 1))  # noqa: E731
        replica = lambda t: DTensor.from_local(t, mesh, [Replicate()], run_check=False)  # noqa: E731
        weight, norm = torch.nn.Parameter(shard(half.clone())), torch.nn.Parameter(replica(norm.clone()))
        opt = _shard_optimizer([("mlp.weight", weight), ("norm.weight", norm)], backend_arg)
        _shard_steps(weight, norm, opt, shard, replica)
        torch.save({"weight": weight._local_tensor.clone(), "norm": norm._local_tensor.clone()}, f"{out}/rank{rank}.pt")
    finally:
        _teardown()


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda-emulated"])
def test_shards_of_a_parameter_draw_their_own_bits_and_replicas_the_same(tmp_path, backend_arg):
    """The two shards of the weight round with different bits (keyed by their local positions
    alone, they drew the same ones: identical values stayed identical, the rounding errors of
    the whole parameter one error repeated per shard); the first shard and the replicated norm
    draw what one process draws for the same local values (bitwise), on both ranks alike."""
    from spawned import spawn

    spawn(_shards_worker, 2, str(tmp_path), backend_arg)
    half, norm, _ = _shard_data()
    weight, single_norm = torch.nn.Parameter(half.clone()), torch.nn.Parameter(norm.clone())
    _shard_steps(weight, single_norm, _shard_optimizer([("mlp.weight", weight), ("norm.weight", single_norm)], backend_arg),
                 lambda t: t, lambda t: t)
    first, second = (torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2))
    assert torch.equal(first["weight"], weight.detach()) and not torch.equal(first["weight"], half)
    assert not torch.equal(second["weight"], half)
    assert (first["weight"] != second["weight"]).sum() >= 16, (first["weight"] != second["weight"]).sum()
    assert torch.equal(first["norm"], single_norm.detach()) and torch.equal(second["norm"], single_norm.detach())
    assert not torch.equal(single_norm.detach(), norm)


def test_seed_survives_torch_distributed_checkpoint(tmp_path):
    """get_optimizer_state_dict keeps only "state" and "param_groups" (a top-level entry is
    dropped): saved with dcp and loaded into an optimizer of another seed, the seed comes back."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    def build(seed):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.LayerNorm(16)).to(torch.bfloat16)
        return model, AdamMini(model.named_parameters(), stochastic_rounding=True, rounding_seed=seed, **KW)

    model, opt = build(1234)
    model(torch.randn(4, 16, dtype=torch.bfloat16)).sum().backward()
    opt.step()
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(tmp_path / "ckpt"))
    model2, opt2 = build(5678)
    state = {"optim": get_optimizer_state_dict(model2, opt2)}
    dcp.load(state, checkpoint_id=str(tmp_path / "ckpt"))
    set_optimizer_state_dict(model2, opt2, state["optim"])
    assert opt2._round_seed == 1234
