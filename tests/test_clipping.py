"""max_grad_norm: fused global gradient clipping, equal to clip_grad_norm_ followed by step(), on
every backend that runs here (torch; Triton under the interpreter on a CPU; Triton and CUDA on
a GPU); composes with AMP; a non-finite norm skips the update."""

import pytest
import torch

from adam_mini_kernels import AdamMini, available_backends
from grad_stream import clone_named, max_rel_err

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = [b for b in ("torch", "triton", "cuda") if b in available_backends([DEVICE])]  # cuda: on a GPU
SHAPES = {"wte.weight": (12, 16), "layers.0.wq.weight": (16, 16), "mlp.weight": (20, 16), "ln.weight": (16,), "mlp.bias": (20,), "empty.weight": (0, 4)}
KW = dict(lr=1e-2, weight_decay=0.1, verbose=False, dim=16, n_heads=2)


def _named(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(n, torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE))) for n, s in SHAPES.items()]


def _grads(step, scale=1.0):
    gen = torch.Generator().manual_seed(300 + step)
    return {n: (torch.randn(s, generator=gen) * scale).to(DEVICE) for n, s in SHAPES.items()}


def _set_grads(named, grads):
    for n, p in named:
        p.grad = grads[n].clone()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_norm", [0.5, 1e3], ids=["clipped", "below-limit"])
def test_equals_clip_grad_norm_then_step(backend, max_norm):
    fused_named, ref_named = _named(), clone_named(_named())
    fused = AdamMini(fused_named, backend=backend, max_grad_norm=max_norm, **KW)
    ref = AdamMini(ref_named, backend=backend, **KW)
    for step in range(4):
        grads = _grads(step)
        for named in (fused_named, ref_named):
            for n, p in named:
                p.grad = None if (step == 1 and n == "ln.weight") else grads[n].clone()
        expected_norm = torch.nn.utils.clip_grad_norm_([p for _, p in ref_named if p.grad is not None], max_norm)
        fused.step()
        ref.step()
        assert abs(fused.last_grad_norm.item() - expected_norm.item()) <= 1e-6 * expected_norm.item()
        assert (expected_norm.item() > max_norm) == (max_norm == 0.5)  # both regimes really tested
    for (n, a), (_, b) in zip(fused_named, ref_named):
        assert max_rel_err(b, a) <= 1e-6, n


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_huge_finite_norm_clipped_equals_clip_grad_norm_then_step(backend):
    """Gradients of norm ~3e18 clipped to 1e-4: a multiplier of ~4e-23, whose square underflows
    float32 (v was 0 or subnormal, and the parameters jumped by ~lr/eps-scaled steps); applied to
    a block's sum twice it stays exact ([Note: gradient multiplier])."""
    max_norm = 1e-4
    fused_named, ref_named = _named(), clone_named(_named())
    fused = AdamMini(fused_named, backend=backend, max_grad_norm=max_norm, **KW)
    ref = AdamMini(ref_named, backend=backend, **KW)
    for step in range(3):
        grads = _grads(step, scale=1e17)
        _set_grads(fused_named, grads)
        _set_grads(ref_named, grads)
        norm = torch.nn.utils.clip_grad_norm_([p for _, p in ref_named], max_norm)
        assert torch.isfinite(norm) and (max_norm / norm.item()) ** 2 < 1.2e-38  # the square is subnormal or 0
        fused.step()
        ref.step()
        assert abs(fused.last_grad_norm.item() - norm.item()) <= 1e-6 * norm.item()
    for (n, a), (_, b) in zip(fused_named, ref_named):
        assert max_rel_err(b, a) <= 1e-6, n


@pytest.mark.parametrize("backend", BACKENDS)
def test_composes_with_amp(backend):
    """GradScaler + max_grad_norm == unscale_, clip_grad_norm_, step; the norm is of unscaled grads."""
    fused_named, ref_named = _named(1), clone_named(_named(1))
    fused = AdamMini(fused_named, backend=backend, max_grad_norm=0.5, **KW)
    ref = AdamMini(ref_named, backend=backend, **KW)
    scalers = [torch.amp.GradScaler(DEVICE.type, init_scale=2.0**10) for _ in range(2)]
    for step in range(3):
        grads = _grads(step)
        for named, opt, scaler in ((fused_named, fused, scalers[0]), (ref_named, ref, scalers[1])):
            opt.zero_grad()
            scaler.scale(sum((p * grads[n]).sum() for n, p in named)).backward()
            if opt is ref:
                scaler.unscale_(ref)
                norm = torch.nn.utils.clip_grad_norm_([p for _, p in ref_named], 0.5)
            scaler.step(opt)
            scaler.update()
        assert abs(fused.last_grad_norm.item() - norm.item()) <= 1e-6 * norm.item()
    for (n, a), (_, b) in zip(fused_named, ref_named):
        assert max_rel_err(b, a) <= 1e-6, n


@pytest.mark.parametrize("bad", [float("inf"), -float("inf"), float("nan")], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_norm_skips_the_update(backend, bad):
    """Parameters, m, v and step counters unchanged bit for bit. A NaN norm once made the clip
    factor NaN, and 0 * NaN (the skipped gradient times the factor) put NaN into m, p and, in
    the fused kernels, v."""
    named = _named(2)
    opt = AdamMini(named, backend=backend, max_grad_norm=1.0, **KW)
    _set_grads(named, _grads(0))
    opt.step()
    group = opt._flat[0]
    before = [t.clone() for t in (group.param_buffer, group.m, group.v, group.steps)]
    grads = _grads(1)
    grads["mlp.weight"][2, 3] = bad
    _set_grads(named, grads)
    opt.step()
    assert not torch.isfinite(opt.last_grad_norm)
    assert torch.isnan(opt.last_grad_norm) == (bad != bad)  # a NaN norm is reported as NaN
    for x, y in zip(before, (group.param_buffer, group.m, group.v, group.steps)):
        assert torch.equal(x, y)


@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")  # the interpreter's g * g
@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_overflowing_float32_skips_the_update_under_amp(backend):
    """Finite gradients whose norm overflows float32 (so GradScaler finds no inf) skip the update
    as a non-finite gradient does: the skip flag is AMP's found_inf or the norm's."""
    named = _named(3)
    opt = AdamMini(named, backend=backend, max_grad_norm=1.0, **KW)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=1.0)

    def amp_step(grads):
        opt.zero_grad()
        scaler.scale(sum((p * grads[n]).sum() for n, p in named)).backward()
        scaler.step(opt)
        scaler.update()

    amp_step(_grads(0))
    group = opt._flat[0]
    before = [t.clone() for t in (group.param_buffer, group.m, group.v, group.steps)]
    grads = _grads(1)
    grads["mlp.weight"][2, 3] = 1e20  # its square overflows float32
    amp_step(grads)
    assert scaler.get_scale() == 1.0  # GradScaler saw no inf: the skip is the norm's
    assert torch.isinf(opt.last_grad_norm)
    for x, y in zip(before, (group.param_buffer, group.m, group.v, group.steps)):
        assert torch.equal(x, y)


def test_max_grad_norm_is_validated():
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="max_grad_norm"):
            AdamMini(_named(), max_grad_norm=bad, **KW)
    for bad in (True, "1.0", torch.tensor(1.0)):  # True would clip at 1.0
        with pytest.raises(TypeError, match="max_grad_norm"):
            AdamMini(_named(), max_grad_norm=bad, **KW)
    opt = AdamMini(_named(), max_grad_norm=2, **KW)
    assert opt.max_grad_norm == 2.0
    with pytest.raises(ValueError, match="max_grad_norm"):  # set later: checked the same way
        opt.max_grad_norm = -1.0
    assert opt.max_grad_norm == 2.0
    opt.max_grad_norm = None


@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_of_a_step_without_gradients_is_zero(backend):
    """last_grad_norm is each step's: a step where no parameter has a gradient leaves 0 (as
    clip_grad_norm_ of no gradients), not the norm of the step before."""
    named = _named(4)
    opt = AdamMini(named, backend=backend, max_grad_norm=1.0, **KW)
    _set_grads(named, _grads(0))
    opt.step()
    assert opt.last_grad_norm > 0
    opt.zero_grad()
    opt.step()
    assert opt.last_grad_norm.item() == 0.0 and opt.last_grad_norm.device == named[0][1].device  # cuda:0, not DEVICE's cuda


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_norm_of_16_bit_gradients_in_float32(backend, dtype):
    """16-bit gradients: the per-tensor norms are taken in float32 (clip_grad_norm_ takes them in
    the gradients' dtype, 2e-3 off in bf16), so the norm is the float64 one to float32 rounding."""
    named = [(n, torch.nn.Parameter(p.detach().to(dtype))) for n, p in _named(3)]
    opt = AdamMini(named, backend=backend, max_grad_norm=0.5, **KW)
    for step in range(2):
        grads = _grads(step, scale=30.0)
        for n, p in named:
            p.grad = grads[n].to(dtype)
        opt.step()
        exact = torch.cat([p.grad.double().flatten() for _, p in named]).norm()
        assert abs(opt.last_grad_norm.double() - exact) <= 1e-6 * exact
