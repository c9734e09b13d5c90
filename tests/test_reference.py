"""The torch backend of ``AdamMini`` against the eager per-parameter reference
(``adam_mini_kernels.reference.adam_mini_step``), on ``nanogpt_beyond_official``: 1-D and 3-D
parameters under a row rule (beyond what official 1.1.1 handles), a zero-size parameter, a frozen
parameter and a parameter (``gate``) whose gradient is None on odd steps.

Both run in lockstep on the same gradients: ``models.train`` computes them on the model that
``AdamMini`` steps, and ``_Lockstep.step`` first applies the reference, parameter by parameter,
to its own copies (same dtype as the parameters; block layout from
``opt.partition_summary()``), then steps the optimizer. Feeding both the same gradients makes the
comparison about the optimizer's arithmetic only, so tolerances can be tight.

Tolerances (see ``TOLERANCES``):

* float32: both compute in float32 and differ only in the order of operations (a segmented sum
  divided by the block size against a mean, float64 coefficients rounded once to float32 against
  Python-double scalars), so a few float32 ulps. The runs are left to accumulate for all steps
  and compared at the end: 2e-6 of the tensor's largest magnitude (measured: 2e-7).
* bfloat16 / float16: the reference also runs on bf16/fp16 parameters and first moments (and
  float32 second moments, like the optimizer), computing in float32 and rounding on store like
  the optimizer does. From the same inputs, the float32 results before rounding differ by a few
  float32 ulps, so the stored values are equal, or one storage ulp apart where the float32 value
  sits on a rounding boundary. Such a one-ulp difference would then persist and, once the value
  shrinks below a power of two, count as several ulps of the smaller value; so here the check is
  per step: after every step the optimizer's parameters and first moments must be within one
  ulp of the reference's (``rtol = finfo.eps``, plus a float32-sized slack for results that
  cancel to near zero, never below the subnormal spacing), with at most 1% of the step's
  elements differing at all, and the reference then restarts from the optimizer's values. A wrong
  formula or a missed step moves most elements by far more than one ulp (the step is about
  ``lr = 1e-2`` per element).
* float64: both compute in float64, with float32 second moments; the optimizer's per-step
  coefficients (step size, weight decay factor) are float32, the reference's Python doubles,
  so the float32 tolerance. What float64 storage needs beyond that, parameters without a
  gradient left bitwise as they were (not rounded through float32), is the idle check.
* Second moments are float32 in both and depend on the gradients only, which are shared, so they
  use the float32 tolerance whatever the parameter dtype, accumulated over all steps.
"""

from __future__ import annotations

import pytest
import torch

import models
from adam_mini_kernels import AdamMini
from adam_mini_kernels.checkpoint import second_moment
from adam_mini_kernels.reference import adam_mini_step

MODEL = "nanogpt_beyond_official"
STEPS = 10
HPARAMS = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

# dtype -> (rtol per element, atol as a fraction of the tensor's largest magnitude). The absolute
# bound is never below the dtype's subnormal spacing (tiny * eps): one ulp for values that
# underflow (fp16 first moments of ~1e-5 are subnormal).
TOLERANCES = {
    torch.float32: (0.0, 2e-6),
    torch.bfloat16: (torch.finfo(torch.bfloat16).eps, 1e-6),
    torch.float16: (torch.finfo(torch.float16).eps, 1e-6),
    torch.float64: (0.0, 2e-6),
}
V_TOLERANCE = TOLERANCES[torch.float32]
# bf16/fp16, per step: the share of all parameter and first-moment elements of the step that may
# differ from the reference at all (measured: about 0.1%).
MAX_DIFFERING = 0.01


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _subnormal_ulp(dtype):
    info = torch.finfo(dtype)
    return info.tiny * info.eps




def _clone_state(state):
    return {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in state.items()}


def assert_close(actual, expected, tol, what):
    """``|actual - expected| <= rtol * |expected| + atol_frac * max|expected|`` elementwise, in
    float64. Returns the number of elements that are not exactly equal."""
    rtol, atol_frac = tol
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return 0
    a, e = actual.detach().double().flatten(), expected.detach().double().flatten()
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    scale = e.abs().max().item()
    err = (a - e).abs()
    bound = rtol * e.abs() + max(atol_frac * scale, _subnormal_ulp(expected.dtype))
    worst = int((err - bound).argmax())
    assert bool((err <= bound).all()), (
        f"{what}: element {worst} is {a[worst].item():.8g}, expected {e[worst].item():.8g} "
        f"(|err| {err[worst].item():.3g} > bound {bound[worst].item():.3g}; max |expected| {scale:.3g})"
    )
    return int((a != e).sum())


class _Lockstep:
    """Drives ``opt`` and the eager reference on the same gradients; ``models.train`` calls
    ``zero_grad`` and ``step`` on it. Checks at every step that each parameter without a
    gradient is left untouched by the optimizer (value, first and second moments, step). With
    ``per_step_tol``, also compares parameters and first moments after every step and restarts
    the reference from the optimizer's values (for bf16/fp16, see the module docstring)."""

    def __init__(self, opt: AdamMini, set_to_none: bool = True, per_step_tol=None):
        self.opt = opt
        self.set_to_none = set_to_none
        self.per_step_tol = per_step_tol
        self.idle_checks = 0
        self.entries = []
        for index, (group, layout) in enumerate(zip(opt.param_groups, opt.partition_summary())):
            (p,) = group["params"]
            assert layout["name"] == group["name"]
            self.entries.append(
                dict(
                    index=index,
                    name=group["name"],
                    group=group,
                    param=p,
                    p=p.detach().clone(),
                    m=torch.zeros_like(p),
                    v=torch.zeros(layout["num_blocks"], dtype=torch.float32),
                    step=0,
                )
            )

    def zero_grad(self):
        self.opt.zero_grad(set_to_none=self.set_to_none)

    def step(self):
        active = [e for e in self.entries if e["param"].grad is not None]
        idle = [e for e in self.entries if e["param"].grad is None]
        for e in active:
            e["step"] += 1
            g = e["group"]
            adam_mini_step(
                e["p"], e["param"].grad, e["m"], e["v"], step=e["step"], lr=g["lr"], beta1=g["beta1"],
                beta2=g["beta2"], eps=g["eps"], weight_decay=g["weight_decay"],
            )
        before = {}
        if idle and self.opt.state:
            saved = self.opt.state_dict()["state"]
            before = {e["index"]: (e["param"].detach().clone(), _clone_state(saved[e["index"]])) for e in idle}

        self.opt.step()

        if before:
            after = self.opt.state_dict()["state"]
            for e in idle:
                p_before, s_before = before[e["index"]]
                s_after = after[e["index"]]
                assert torch.equal(e["param"], p_before), f"{e['name']}: changed at a step without a gradient"
                assert s_after["step"] == s_before["step"], f"{e['name']}: step counter moved without a gradient"
                assert torch.equal(s_after["m"], s_before["m"]), f"{e['name']}: m changed without a gradient"
                assert torch.equal(second_moment(s_after), second_moment(s_before)), f"{e['name']}: v changed without a gradient"
                self.idle_checks += 1
        if self.per_step_tol is not None:
            state = self.opt.state_dict()["state"]
            differing = total = 0
            for e in active:
                m = state[e["index"]]["m"].reshape(e["m"].shape)
                differing += assert_close(e["param"], e["p"], self.per_step_tol, f"{e['name']} param")
                differing += assert_close(m, e["m"], self.per_step_tol, f"{e['name']} m")
                total += 2 * e["p"].numel()
                e["p"].copy_(e["param"].detach())
                e["m"].copy_(m)
            assert differing <= MAX_DIFFERING * total, f"{differing} of {total} elements differ from the reference"

    def assert_matches(self, tol):
        state = self.opt.state_dict()["state"]
        for e in self.entries:
            s = state[e["index"]]
            assert s["step"] == e["step"], f"{e['name']}: step {s['step']}, reference {e['step']}"
            assert e["param"].dtype == e["p"].dtype
            assert_close(e["param"], e["p"], tol, f"{e['name']} param")
            assert_close(s["m"].reshape(-1), e["m"].reshape(-1), tol, f"{e['name']} m")
            v = second_moment(s)
            assert v.dtype == torch.float32, f"{e['name']}: second moment is {v.dtype}"
            assert_close(v.reshape(-1), e["v"], V_TOLERANCE, f"{e['name']} v")


def _build(dtype, seed=0):
    model, batch_fn, dims = models.build(MODEL, seed=seed)
    model.to(dtype)
    opt = AdamMini(model.named_parameters(), **HPARAMS, **dims, verbose=False, backend="torch")
    return model, batch_fn, opt


def test_partition_of_corner_cases():
    """The corner cases are really there, laid out as the spec says."""
    _, _, opt = _build(torch.float32)
    layouts = {s["name"]: s for s in opt.partition_summary()}
    assert "frozen_scale" not in layouts  # requires_grad=False: skipped
    assert (layouts["mlp_scale_1d"]["rule"], layouts["mlp_scale_1d"]["num_blocks"]) == ("whole", 1)
    assert layouts["mlp_mix_3d"]["rule"] == "mlp"
    assert (layouts["mlp_mix_3d"]["num_blocks"], layouts["mlp_mix_3d"]["block_numel"]) == (3, 4 * 32)
    assert layouts["empty_mlp"]["num_blocks"] == 0
    assert layouts["gate"]["rule"] == "whole"
    assert layouts["blocks.0.wq.weight"]["num_blocks"] == 4  # (32, 32), head block 32*32/4
    assert layouts["blocks.0.wk.weight"]["num_blocks"] == 2  # GQA: (16, 32), same head block
    assert layouts["blocks.0.wv.bias"]["rule"] == "adam"


@pytest.mark.parametrize(
    "dtype, set_to_none",
    [(torch.float32, True), (torch.float32, False), (torch.bfloat16, True), (torch.float16, True), (torch.float64, True)],
    ids=["fp32-grad_none", "fp32-grad_zeroed", "bf16-grad_none", "fp16-grad_none", "fp64-grad_none"],
)
def test_torch_backend_matches_reference(dtype, set_to_none):
    model, batch_fn, opt = _build(dtype)
    frozen_before = model.frozen_scale.detach().clone()
    per_step = None if dtype in (torch.float32, torch.float64) else TOLERANCES[dtype]
    driver = _Lockstep(opt, set_to_none=set_to_none, per_step_tol=per_step)

    models.train(model, driver, batch_fn, STEPS)

    driver.assert_matches(TOLERANCES[dtype])
    # Every parameter moved (except the zero-size one): the comparison is not between two copies
    # of the initial values.
    initial, _, _ = _build(dtype)
    for (name, p0), p in zip(initial.named_parameters(), model.parameters()):
        if p.requires_grad and p.numel():
            assert not torch.equal(p0, p), f"{name} was never updated"

    # The frozen parameter is not the optimizer's: untouched, no state, no gradient.
    assert torch.equal(model.frozen_scale, frozen_before)
    assert model.frozen_scale not in opt.state and model.frozen_scale.grad is None

    gate = next(e for e in driver.entries if e["name"] == "gate")
    empty = next(e for e in driver.entries if e["name"] == "empty_mlp")
    state = opt.state_dict()["state"]
    assert tuple(state[empty["index"]]["m"].shape) == (0, 32)
    assert tuple(state[empty["index"]]["vmean"].shape) == (0, 1)
    assert state[empty["index"]]["step"] == STEPS
    if set_to_none:
        # The gate had no gradient on the odd steps: 5 steps taken, 5 idle steps checked.
        assert gate["step"] == STEPS // 2 and state[gate["index"]]["step"] == STEPS // 2
        assert driver.idle_checks == STEPS // 2
    else:
        # zero_grad(set_to_none=False) keeps a zero gradient: a step with g = 0, as in torch.
        assert gate["step"] == STEPS and state[gate["index"]]["step"] == STEPS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_two_runs_are_bitwise_identical(dtype):
    if dtype == torch.float32:
        torch.set_num_threads(2)  # also with several threads, where a reduction could be split differently
    runs = []
    for _ in range(2):
        model, batch_fn, opt = _build(dtype)
        models.train(model, opt, batch_fn, STEPS, seed=7)
        runs.append((model, opt.state_dict()["state"]))
    (model_a, state_a), (model_b, state_b) = runs
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(a, b), f"{name} differs between two identical runs"
    assert state_a.keys() == state_b.keys()
    for idx in state_a:
        assert state_a[idx].keys() == state_b[idx].keys()
        for key, value in state_a[idx].items():
            other = state_b[idx][key]
            if torch.is_tensor(value):
                assert torch.equal(value, other), f"state {idx} {key} differs between two identical runs"
            else:
                assert value == other


def test_float64_parameters_are_stepped_in_float64():
    """float64 parameters of values float32 cannot hold: a step computes in float64 (within
    float32 ulps of the update, the coefficients being float32, without weight decay), an lr of
    0 and a parameter without a gradient leave them bitwise as they were (a float32 computation
    rounds them all: 6e-8 of their magnitude)."""
    gen = torch.Generator().manual_seed(3)
    shapes = {"mlp.weight": (6, 8), "norm.weight": (8,), "mlp.bias": (6,)}
    named = [(n, torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64) * (1 + 1e-12))) for n, s in shapes.items()]
    assert any(not torch.equal(p, p.float().double()) for _, p in named)
    still = AdamMini([(n, torch.nn.Parameter(p.detach().clone())) for n, p in named], lr=0.0, verbose=False, backend="torch")
    opt = AdamMini(named, lr=1e-2, weight_decay=0.0, verbose=False, backend="torch")
    reference = {n: (p.detach().clone(), torch.zeros_like(p), torch.zeros(s["num_blocks"]))
                 for (n, p), s in zip(named, opt.partition_summary())}
    for step in (1, 2):
        for name, p in named:
            p.grad = None if (step == 2 and name == "norm.weight") else torch.randn(p.shape, generator=gen, dtype=torch.float64)
        idle = named[1][1].detach().clone()
        opt.step()
        for name, p in named:
            if p.grad is not None:
                ref_p, ref_m, ref_v = reference[name]
                adam_mini_step(ref_p, p.grad, ref_m, ref_v, step=step, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                               weight_decay=0.0)
                assert_close(p, ref_p, (0.0, 1e-8), f"{name} param")
        if step == 2:
            assert torch.equal(named[1][1], idle), "a float64 parameter without a gradient changed"
    for group in still.param_groups:
        (q,) = group["params"]
        q.grad = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    before = [g["params"][0].detach().clone() for g in still.param_groups]
    still.step()
    for b, g in zip(before, still.param_groups):
        assert torch.equal(g["params"][0], b), f"{g['name']}: changed by a step with lr=0"
