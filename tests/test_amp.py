"""AMP: ``torch.amp.GradScaler`` drives AdamMini the way it drives torch's fused AdamW: it sets
``grad_scale`` and ``found_inf`` on the optimizer, the step unscales inside the kernels, and a
step with an inf/NaN gradient changes nothing (params, m, v, step counters), with no host sync.

Run on every backend that runs here (torch; Triton under the interpreter on a CPU; Triton and
CUDA on a GPU)."""

import pytest
import torch

from adam_mini_kernels import AdamMini, available_backends
from grad_stream import clone_named

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = [b for b in ("torch", "triton", "cuda") if b in available_backends([DEVICE])]  # cuda: on a GPU
SHAPES = {"wte.weight": (12, 16), "layers.0.wq.weight": (16, 16), "mlp.weight": (20, 16), "ln.weight": (16,), "mlp.bias": (20,)}
KW = dict(lr=1e-2, weight_decay=0.1, verbose=False, dim=16, n_heads=2)


def _named(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(n, torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE))) for n, s in SHAPES.items()]


def _targets(step):
    """The gradient of each parameter at ``step`` (the loss is sum(p * target))."""
    gen = torch.Generator().manual_seed(100 + step)
    return {n: torch.randn(s, generator=gen).to(DEVICE) for n, s in SHAPES.items()}


def _scaled_backward(named, scaler, targets):
    loss = sum((p * targets[n]).sum() for n, p in named)
    scaler.scale(loss).backward()


def _snapshot(named, opt):
    group = opt._flat[0]
    return [p.detach().clone() for _, p in named] + [group.m.clone(), group.v.clone(), group.steps.clone()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaler_step_equals_unscaled_step(backend):
    """With a power-of-two scale, unscaling is exact: bitwise the plain step on true gradients."""
    amp_named, ref_named = _named(), clone_named(_named())
    amp_opt, ref_opt = AdamMini(amp_named, backend=backend, **KW), AdamMini(ref_named, backend=backend, **KW)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**14, growth_interval=2)
    for step in range(5):
        targets = _targets(step)
        amp_opt.zero_grad()
        _scaled_backward(amp_named, scaler, targets)
        scale = scaler.get_scale()
        scaler.step(amp_opt)
        scaler.update()
        # Unscaled inside the step, not by GradScaler (which unscales .grad in place for an
        # optimizer without _step_supports_amp_scaling): the gradients are left scaled.
        for n, p in amp_named:
            assert torch.equal(p.grad, targets[n] * scale), n
        for n, p in ref_named:
            p.grad = targets[n].clone()
        ref_opt.step()
    assert scaler.get_scale() > 2.0**14  # it grew: the scale really changed between steps
    for (n, a), (_, b) in zip(amp_named, ref_named):
        assert torch.equal(a, b), n
    assert torch.equal(amp_opt._flat[0].v, ref_opt._flat[0].v) and torch.equal(amp_opt._flat[0].m, ref_opt._flat[0].m)
    assert not hasattr(amp_opt, "grad_scale")  # GradScaler removes what it set


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_step_with_non_finite_gradient_changes_nothing(backend, bad):
    named = _named(1)
    opt = AdamMini(named, backend=backend, **KW)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**10)
    _scaled_backward(named, scaler, _targets(0))
    scaler.step(opt)
    scaler.update()
    before = _snapshot(named, opt)

    opt.zero_grad()
    targets = _targets(1)
    targets["mlp.weight"][3, 5] = bad
    _scaled_backward(named, scaler, targets)
    scaler.step(opt)
    scaler.update()
    after = _snapshot(named, opt)
    for x, y in zip(before, after):
        assert torch.equal(x, y)
    assert scaler.get_scale() == 2.0**9  # the scaler saw the inf and backed off

    opt.zero_grad()
    _scaled_backward(named, scaler, _targets(2))
    scaler.step(opt)
    assert torch.equal(opt._flat[0].steps, before[-1] + 1)  # and the next good step goes through


@pytest.mark.parametrize("backend", BACKENDS)
def test_unscale_then_clip_then_step(backend):
    """scaler.unscale_(opt) before clipping (the documented recipe): the step must not unscale
    again, and equals clip + step on the true gradients."""
    amp_named, ref_named = _named(2), clone_named(_named(2))
    amp_opt, ref_opt = AdamMini(amp_named, backend=backend, **KW), AdamMini(ref_named, backend=backend, **KW)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**12)
    for step in range(3):
        targets = _targets(10 + step)
        amp_opt.zero_grad()
        _scaled_backward(amp_named, scaler, targets)
        scaler.unscale_(amp_opt)
        torch.nn.utils.clip_grad_norm_([p for _, p in amp_named], 1.0)
        scaler.step(amp_opt)
        scaler.update()
        for n, p in ref_named:
            p.grad = targets[n].clone()
        torch.nn.utils.clip_grad_norm_([p for _, p in ref_named], 1.0)
        ref_opt.step()
    for (n, a), (_, b) in zip(amp_named, ref_named):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_grad_norm", [None, 1.0], ids=["plain", "clipped"])
def test_float16_parameters_with_a_large_scale(backend, max_grad_norm):
    """fp16 parameters and gradients under GradScaler at its default scale (2^16), where the
    scaled gradient of a large weight has an L2 norm above fp16's range (65504) while every element
    is finite: the step must go through (a 16-bit norm would be inf and skip every step while the
    scaler, seeing no inf, never backs off) and equal the step on the unscaled fp16 gradients."""
    shapes = {"mlp.weight": (400, 256), "ln.weight": (256,), "mlp.bias": (400,)}
    gen = torch.Generator().manual_seed(5)
    named = [(n, torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE, torch.float16))) for n, s in shapes.items()]
    ref_named = clone_named(named)
    kw = dict(KW, backend=backend, max_grad_norm=max_grad_norm)
    opt, ref = AdamMini(named, **kw), AdamMini(ref_named, **kw)
    scaler = torch.amp.GradScaler(DEVICE.type)
    assert scaler.get_scale() == 2.0**16
    for step in range(3):
        targets = {n: (5e-3 * torch.randn(s, generator=gen)).to(DEVICE, torch.float16) for n, s in shapes.items()}
        opt.zero_grad()
        scaler.scale(sum((p.float() * targets[n].float()).sum() for n, p in named)).backward()
        scaled = named[0][1].grad
        assert torch.isfinite(scaled).all() and scaled.float().norm() > 65504
        scaler.step(opt)
        scaler.update()
        for n, p in ref_named:
            p.grad = targets[n].clone()
        ref.step()
    assert scaler.get_scale() == 2.0**16  # no inf was found, no step was skipped
    assert torch.equal(opt._flat[0].steps, torch.full_like(opt._flat[0].steps, 3))
    if max_grad_norm is not None:
        assert torch.equal(opt.last_grad_norm, ref.last_grad_norm) and torch.isfinite(opt.last_grad_norm)
    for (n, a), (_, b) in zip(named, ref_named):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_parameters_under_float16_autocast(backend):
    """The usual mixed-precision recipe: float32 parameters, the forward under fp16 autocast,
    GradScaler: equal to unscaling the same gradients by hand and stepping."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8)).to(DEVICE)
    ref_named = clone_named(list(model.named_parameters()))
    opt, ref = AdamMini(model.named_parameters(), backend=backend, **KW), AdamMini(ref_named, backend=backend, **KW)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**12)
    for step in range(3):
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(step)).to(DEVICE)
        opt.zero_grad()
        with torch.autocast(DEVICE.type, dtype=torch.float16):
            assert model[0](x).dtype == torch.float16  # autocast really runs the matmuls in fp16
            loss = model(x).float().square().mean()
        scaler.scale(loss).backward()
        scale = scaler.get_scale()
        for (n, p), (_, q) in zip(model.named_parameters(), ref_named):
            assert p.dtype == torch.float32
            q.grad = p.grad / scale  # exact: a power of two
        scaler.step(opt)
        scaler.update()
        ref.step()
    for (n, a), (_, b) in zip(model.named_parameters(), ref_named):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_grad_norm", [None, 1.0], ids=["plain", "clipped"])
def test_a_scale_grown_past_float32_squares_does_not_overflow(backend, max_grad_norm):
    """GradScaler's scale keeps doubling while no inf is found (bfloat16 or float32 autocast):
    at 2^100 every scaled gradient is finite, but its square is not (past 1.8e19). The step must
    equal the step on the true gradients (unscaling by a power of two is exact): the sums of
    squares are of unscaled gradients, in rows, in a large block (a 128 x 256 head, past
    ROW_MAX, summed by tiles before the coefficient table exists) and in Adam blocks, and the
    clipping norm is finite. (Squares of scaled gradients once made v inf and froze the blocks;
    with max_grad_norm the norm was inf and every step was skipped.)"""
    shapes = {"layers.0.wq.weight": (256, 256), "mlp.weight": (48, 256), "ln.weight": (256,), "mlp.bias": (48,)}
    gen = torch.Generator().manual_seed(9)
    named = [(n, torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE))) for n, s in shapes.items()]
    ref_named = clone_named(named)
    kw = dict(KW, dim=256, n_heads=2, backend=backend, max_grad_norm=max_grad_norm)
    opt, ref = AdamMini(named, **kw), AdamMini(ref_named, **kw)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**100, growth_interval=1000)
    for step in range(3):
        targets = {n: torch.randn(s, generator=gen).to(DEVICE) for n, s in shapes.items()}
        opt.zero_grad()
        scaler.scale(sum((p * targets[n]).sum() for n, p in named)).backward()
        assert all(torch.isfinite(p.grad).all() for _, p in named)
        assert not torch.isfinite(named[0][1].grad.square()).all()  # the squares of scaled grads overflow
        scaler.step(opt)
        scaler.update()
        for n, p in ref_named:
            p.grad = targets[n].clone()
        ref.step()
    assert scaler.get_scale() == 2.0**100  # no inf was found
    group, ref_group = opt._flat[0], ref._flat[0]
    assert max(int(layout.block_sizes().max()) for layout in group.layouts) == 128 * 256  # a large block
    assert torch.equal(group.steps, torch.full_like(group.steps, 3)) and torch.isfinite(group.v).all()
    if max_grad_norm is None:
        for (n, a), (_, b) in zip(named, ref_named):
            assert torch.equal(a, b), n
        assert torch.equal(group.v, ref_group.v)
    else:  # the norms differ in rounding only (float64 here, float32 on the true gradients)
        torch.testing.assert_close(opt.last_grad_norm, ref.last_grad_norm, rtol=1e-6, atol=0)
        assert opt.last_grad_norm > 1.0  # the clip is active
        for (n, a), (_, b) in zip(named, ref_named):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
