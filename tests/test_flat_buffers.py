"""Flat buffers: O(1) ops per step, param/grad aliasing, and correctness when aliasing breaks.

The step must dispatch the same number of tensor ops whatever the number of parameters (counted
with a ``TorchDispatchMode``); ``p.data``/``p.grad`` become views of the flat buffers; and every
way a user can break that aliasing (``zero_grad()`` freeing grads, assigning ``p.grad``,
replacing ``p.data`` as ``module.to()`` does) still gives the right step, checked against an
optimizer fed the same grads through the aliased path and against ``reference.adam_mini_step``.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from adam_mini_kernels import AdamMini
from adam_mini_kernels.checkpoint import second_moment
from adam_mini_kernels.reference import adam_mini_step

DIM, N_HEADS = 8, 2
HP = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

# (name suffix, shape): one of each rule, cycled to build trees of any size.
KINDS = [
    ("attn.q_proj.weight", (DIM, DIM)),  # 2 heads
    ("mlp.linear.weight", (12, DIM)),  # rows
    ("ln_1.weight", (DIM,)),  # whole, no decay
    ("mlp.linear.bias", (12,)),  # Adam
    ("lm_head.weight", (5, DIM)),  # rows
    ("attn.wk.weight", (DIM // 2, DIM)),  # GQA K: 1 head
    ("wte.weight", (7, DIM)),  # rows
    ("conv.weight", (3, 2, 2)),  # whole
]


def _module(spec, seed=0, dtype=torch.float32):
    """An ``nn.Module`` whose ``named_parameters()`` are exactly the (name, shape) of ``spec``."""
    gen = torch.Generator().manual_seed(seed)
    root = nn.Module()
    for name, shape in spec:
        *path, leaf = name.split(".")
        owner = root
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        owner.register_parameter(leaf, nn.Parameter((torch.randn(shape, generator=gen) * 0.5).to(dtype)))
    assert sorted(n for n, _ in root.named_parameters()) == sorted(n for n, _ in spec)
    return root


def _spec(n):
    return [(f"layers.{i}.{KINDS[i % len(KINDS)][0]}", KINDS[i % len(KINDS)][1]) for i in range(n)]


def _grads(model, seed, skip=()):
    gen = torch.Generator().manual_seed(seed)
    return {
        n: (None if n in skip else torch.randn(p.shape, generator=gen, dtype=p.dtype))
        for n, p in model.named_parameters()
    }


def _backward(model, grads):
    """Accumulate exactly ``grads`` into ``p.grad`` through autograd (params with grad None are
    left out of the graph, so their ``.grad`` is not touched)."""
    loss = sum((p * grads[n]).sum() for n, p in model.named_parameters() if grads[n] is not None)
    loss.backward()


def _opt(model, **kwargs):
    return AdamMini(model.named_parameters(), **HP, dim=DIM, n_heads=N_HEADS, n_kv_heads=1, verbose=False, **kwargs)




class _Reference:
    """Per-parameter ``reference.adam_mini_step``, with the partition the optimizer reports."""

    def __init__(self, model, opt):
        layouts = {row["name"]: row for row in opt.partition_summary()}
        groups = {g["name"]: g for g in opt.param_groups}
        self.params = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.m = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.v = {n: torch.zeros(layouts[n]["num_blocks"]) for n in self.params}
        self.steps = {n: 0 for n in self.params}
        self.groups = groups

    def step(self, grads):
        for n, g in grads.items():
            if g is None:
                continue
            self.steps[n] += 1
            group = self.groups[n]
            adam_mini_step(
                self.params[n], g, self.m[n], self.v[n], step=self.steps[n], lr=group["lr"],
                beta1=group["beta1"], beta2=group["beta2"], eps=group["eps"], weight_decay=group["weight_decay"],
            )

    def check(self, model, opt, rtol=1e-5, atol=1e-6):
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), self.params[n], rtol=rtol, atol=atol, msg=f"param {n}")
            state = opt.state[p]
            if self.steps[n] == 0:
                assert "step" not in state or int(state["step"]) == 0
                continue
            assert int(state["step"]) == self.steps[n], n
            torch.testing.assert_close(state["m"].reshape(-1), self.m[n].reshape(-1), rtol=rtol, atol=atol, msg=f"m {n}")
            torch.testing.assert_close(
                second_moment(state).reshape(-1).float(), self.v[n], rtol=rtol, atol=1e-9, msg=f"v {n}"
            )


# -- O(1) ops per step -----------------------------------------------------------------------------


class _CountOps(TorchDispatchMode):
    def __init__(self, skip_views=False):
        super().__init__()
        self.skip_views = skip_views
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (self.skip_views and func.is_view):
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _ops_of_one_step(n_params, path):
    model = _module(_spec(n_params), seed=n_params)
    opt = _opt(model)
    idle = {f"layers.3.{KINDS[3][0]}"} if path == "masked" else set()
    set_to_none = path == "set_to_none"
    for seed in range(3):  # warm-up: first full, then the path measured
        model_idle = idle if seed else set()
        for n, p in model.named_parameters():
            if n in model_idle:
                p.grad = None
        opt.zero_grad(set_to_none=set_to_none)
        _backward(model, _grads(model, seed, skip=model_idle))
        opt.step()
    opt.zero_grad(set_to_none=set_to_none)
    _backward(model, _grads(model, 10, skip=idle))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with _CountOps(skip_views=set_to_none) as counter:
        opt.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert sorted(changed) == sorted(n for n in before if n not in idle)
    return counter.ops


@pytest.mark.parametrize("path", ["aliased", "masked"])
def test_step_dispatches_the_same_ops_for_10_and_200_params(path):
    small, large = _ops_of_one_step(10, path), _ops_of_one_step(200, path)
    assert sum(small.values()) > 0
    assert sum(small.values()) == sum(large.values()), (small, large)
    assert small == large


def test_repair_path_launches_the_same_compute_ops_for_10_and_200_params():
    """With ``zero_grad(set_to_none=True)`` every grad must be copied in; views aside (no kernel
    launches), that is still a fixed number of ops."""
    small, large = _ops_of_one_step(10, "set_to_none"), _ops_of_one_step(200, "set_to_none")
    assert sum(small.values()) > 0
    assert small == large, (small, large)


# -- aliasing --------------------------------------------------------------------------------------


def _ranges_disjoint(tensors):
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors if t.numel())
    return all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))


def _inside(t, storage):
    start = storage.data_ptr()
    return start <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= start + storage.nbytes()


def test_params_and_grads_become_views_of_flat_buffers():
    model = _module(_spec(12), seed=1)
    opt = _opt(model)
    params = [p for _, p in model.named_parameters()]
    separate = {p.untyped_storage().data_ptr() for p in params}
    assert len(separate) == len(params)  # before the first step: one storage each
    _backward(model, _grads(model, 1))
    opt.step()

    param_storage = params[0].untyped_storage()
    grad_storage = params[0].grad.untyped_storage()
    assert param_storage.data_ptr() != grad_storage.data_ptr()
    for p in params:
        assert p.untyped_storage().data_ptr() == param_storage.data_ptr()
        assert p.grad.untyped_storage().data_ptr() == grad_storage.data_ptr()
        assert _inside(p.detach(), param_storage) and _inside(p.grad, grad_storage)
        assert p.is_leaf and isinstance(p, nn.Parameter)
    assert _ranges_disjoint([p.detach() for p in params])
    assert _ranges_disjoint([p.grad for p in params])
    m_storage = opt.state[params[0]]["m"].untyped_storage()
    assert m_storage.data_ptr() not in (param_storage.data_ptr(), grad_storage.data_ptr())
    assert all(opt.state[p]["m"].untyped_storage().data_ptr() == m_storage.data_ptr() for p in params)

    # zero_grad(set_to_none=False) zeroes in place and keeps the views; backward fills them.
    grad_ptrs = [p.grad.data_ptr() for p in params]
    opt.zero_grad(set_to_none=False)
    assert [p.grad.data_ptr() for p in params] == grad_ptrs
    assert all(not p.grad.any() for p in params)
    grads = _grads(model, 2)
    _backward(model, grads)
    assert [p.grad.data_ptr() for p in params] == grad_ptrs
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n])
    param_ptrs = [p.data_ptr() for p in params]
    opt.step()
    assert [p.data_ptr() for p in params] == param_ptrs
    assert [p.grad.data_ptr() for p in params] == grad_ptrs


def _perturb(mode, model, opt, grads, step):
    """Feed ``grads`` for one step, breaking the aliasing the way ``mode`` says."""
    named = list(model.named_parameters())
    if mode == "aliased":
        opt.zero_grad(set_to_none=False)
        _backward(model, grads)
    elif mode == "set_to_none":
        opt.zero_grad()
        _backward(model, grads)
    elif mode == "assign_grad":
        opt.zero_grad(set_to_none=False)
        for n, p in named:
            p.grad = None if grads[n] is None else grads[n].clone()
    elif mode == "replace_data":
        for _, p in named:
            p.data = p.data.clone()
        opt.zero_grad(set_to_none=False)
        _backward(model, grads)
    elif mode == "module_apply":  # what module.to()/.float()/.cpu() do to every param and grad
        opt.zero_grad(set_to_none=False)
        model._apply(lambda t: t.clone())
        _backward(model, grads)
    elif mode == "detached_zeroed":  # grads that stopped aliasing, zeroed in place, accumulated into
        for n, p in named:
            if p.grad is not None:
                p.grad = p.grad.clone()
        opt.zero_grad(set_to_none=False)
        _backward(model, grads)
    elif mode == "mixed":  # some of each, changing with the step
        opt.zero_grad(set_to_none=False)
        for i, (n, p) in enumerate(named):
            kind = (i + step) % 4
            if kind == 1:
                p.grad = None
            elif kind == 2:
                p.data = p.data.clone()
            elif kind == 3 and p.grad is not None:
                p.grad = p.grad.clone()
        _backward(model, grads)
    else:
        raise AssertionError(mode)


def test_gradients_in_the_flat_buffer_save_and_load_with_weights_only(tmp_path):
    """The gradient views carry a mark (see [Note: gradient view marks]); a saved gradient
    still loads with ``torch.load(weights_only=True)``, torch's default (an object mark did not)."""
    model = _module(_spec(4), seed=1)
    opt = _opt(model)
    _backward(model, _grads(model, 1))
    opt.step()
    grads = {n: p.grad for n, p in model.named_parameters()}
    torch.save(grads, tmp_path / "grads.pt")
    loaded = torch.load(tmp_path / "grads.pt", weights_only=True)
    for n, g in grads.items():
        assert torch.equal(loaded[n], g), n


@pytest.mark.parametrize("mode", ["set_to_none", "assign_grad", "replace_data", "module_apply", "detached_zeroed", "mixed"])
def test_broken_aliasing_still_steps_correctly(mode):
    spec = _spec(len(KINDS) + 3)
    control_model, model = _module(spec, seed=3), _module(spec, seed=3)
    control, opt = _opt(control_model), _opt(model)
    reference = _Reference(model, opt)
    for step in range(5):
        grads = _grads(model, 100 + step)
        _perturb("aliased", control_model, control, grads, step)
        _perturb(mode, model, opt, grads, step)
        control.step()
        opt.step()
        reference.step(grads)
    reference.check(model, opt)
    reference.check(control_model, control)
    for (n, p), (_, q) in zip(model.named_parameters(), control_model.named_parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-8, msg=n)
        s, t = opt.state[p], control.state[q]
        torch.testing.assert_close(s["m"], t["m"], rtol=1e-6, atol=1e-8, msg=n)
        torch.testing.assert_close(second_moment(s), second_moment(t), rtol=1e-6, atol=1e-12, msg=n)
        assert int(s["step"]) == int(t["step"]) == 5
    # Whatever happened before, the step leaves everything aliased again.
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(storages) == 1


def test_grad_assigned_between_backward_and_step_is_used():
    spec = _spec(6)
    model = _module(spec, seed=4)
    opt = _opt(model)
    reference = _Reference(model, opt)
    for step in range(3):
        grads = _grads(model, 200 + step)
        opt.zero_grad(set_to_none=False)
        _backward(model, {n: g * 7 for n, g in grads.items()})  # overwritten below
        for n, p in model.named_parameters():
            p.grad = grads[n].clone()
        opt.step()
        reference.step(grads)
    reference.check(model, opt)


# -- params without a gradient ----------------------------------------------------------------------


@pytest.mark.parametrize("idle_kind", [0, 1, 2, 3, 7], ids=lambda k: KINDS[k][0])
@pytest.mark.parametrize("how", ["never_in_graph", "set_none_after_backward"])
def test_param_with_grad_none_is_untouched(idle_kind, how):
    model = _module(_spec(len(KINDS)), seed=5)
    opt = _opt(model)
    reference = _Reference(model, opt)
    for step in range(2):
        grads = _grads(model, 300 + step)
        _perturb("aliased", model, opt, grads, step)
        opt.step()
        reference.step(grads)
    idle_name = f"layers.{idle_kind}.{KINDS[idle_kind][0]}"
    idle = dict(model.named_parameters())[idle_name]
    grads = _grads(model, 302, skip={idle_name} if how == "never_in_graph" else set())
    if how == "never_in_graph":
        idle.grad = None
        opt.zero_grad(set_to_none=False)
        _backward(model, grads)
    else:
        opt.zero_grad(set_to_none=False)
        _backward(model, grads)
        # Leave garbage (NaN) in the flat gradient storage, then drop the grad: nothing of it
        # may reach the parameter or its state.
        idle.grad.fill_(float("nan"))
        idle.grad = None
        grads[idle_name] = None
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[idle].items()}
    value = idle.detach().clone()
    opt.step()
    reference.step(grads)
    assert torch.equal(idle.detach(), value)
    assert before.keys() == opt.state[idle].keys()
    for key, old in before.items():
        new = opt.state[idle][key]
        assert torch.equal(new, old) if isinstance(old, torch.Tensor) else new == old, key
    assert int(opt.state[idle]["step"]) == 2
    reference.check(model, opt)
    # It trains again once it has a gradient.
    grads = _grads(model, 303)
    _perturb("set_to_none", model, opt, grads, 3)
    opt.step()
    reference.step(grads)
    reference.check(model, opt)
    assert int(opt.state[idle]["step"]) == 3
    assert torch.isfinite(idle.detach()).all()


def test_random_idle_patterns_match_reference():
    model = _module(_spec(2 * len(KINDS)), seed=6)
    opt = _opt(model)
    reference = _Reference(model, opt)
    names = [n for n, _ in model.named_parameters()]
    gen = torch.Generator().manual_seed(7)
    for step in range(8):
        mask = torch.rand(len(names), generator=gen) < 0.35
        skip = {n for n, off in zip(names, mask.tolist()) if off} if step else set()
        grads = _grads(model, 400 + step, skip=skip)
        _perturb("set_to_none" if step % 2 else "aliased", model, opt, grads, step)
        for n, p in model.named_parameters():  # aliased path keeps zeroed grads: drop the idle ones
            if n in skip:
                p.grad = None
        opt.step()
        reference.step(grads)
    reference.check(model, opt)
    assert len({reference.steps[n] for n in names}) > 1  # the pattern did make counters differ


def test_all_grads_none_is_a_no_op():
    model = _module(_spec(5), seed=8)
    opt = _opt(model)
    _perturb("aliased", model, opt, _grads(model, 500), 0)
    opt.step()
    opt.zero_grad()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    steps = {n: int(opt.state[p]["step"]) for n, p in model.named_parameters()}
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n])
        assert int(opt.state[p]["step"]) == steps[n] == 1


# -- zero-size parameters ----------------------------------------------------------------------------


def test_zero_size_parameters():
    spec = [
        ("blocks.0.mlp.weight", (0, DIM)),
        ("blocks.0.mlp.bias", (0,)),
        ("blocks.0.attn.q_proj.weight", (0, DIM)),
        ("blocks.0.norm.weight", (0,)),
        ("blocks.0.mlp.proj.weight", (6, DIM)),
        ("blocks.0.attn.wq.weight", (DIM, DIM)),
        ("blocks.0.norm2.weight", (DIM,)),
        ("blocks.0.mlp.proj.bias", (6,)),
    ]
    model = _module(spec, seed=9)
    # A group made only of zero-size parameters: a different dtype gets its own flat buffers.
    model.extra = nn.Module()
    model.extra.register_parameter("empty_mlp", nn.Parameter(torch.zeros(0, 3, dtype=torch.float64)))
    model.extra.register_parameter("empty_norm", nn.Parameter(torch.zeros(0, dtype=torch.float64)))
    opt = _opt(model)
    reference = _Reference(model, opt)
    summary = {row["name"]: row for row in opt.partition_summary()}
    assert summary["blocks.0.mlp.weight"]["num_blocks"] == 0
    assert summary["blocks.0.attn.q_proj.weight"]["num_blocks"] == 0
    for step in range(4):
        grads = _grads(model, 600 + step)
        _perturb("aliased" if step % 2 else "set_to_none", model, opt, grads, step)
        opt.step()
        reference.step(grads)
    reference.check(model, opt)
    for name, p in model.named_parameters():
        if p.numel() == 0:
            assert opt.state[p]["m"].numel() == 0
            assert int(opt.state[p]["step"]) == 4, name


def test_a_group_built_over_parameters_with_gradients_adopts_them():
    """``FlatGroup`` (what the optimizer and bench/microbench.py build) copies the gradients the
    parameters already have into its buffer and points ``p.grad`` there; None stays None."""
    from adam_mini_kernels.buffers import FlatGroup
    from adam_mini_kernels.partition import layout_for

    p, q = nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(5))
    grad = torch.randn(3, 4)
    p.grad = grad.clone()
    group = FlatGroup([p, q], [layout_for("mlp.weight", (3, 4), "mlp", None), layout_for("ln.weight", (5,), "whole", None)])
    assert torch.equal(group.grad_view(0), grad)
    assert p.grad.data_ptr() == group.grad_view(0).data_ptr() and torch.equal(p.grad, grad)
    assert q.grad is None and not group.grad_view(1).any()


def test_each_buffer_is_allocated_once_what_it_replaces_is_released(monkeypatch):
    """[Note: first-build memory]: when the gradient buffer is allocated, every parameter already
    lives in the parameter buffer (its own storage released, as nothing else holds it); when m is,
    every gradient lives in the gradient buffer. (All three were once allocated first: the first
    step held the parameters and the gradients twice at once.)"""
    from adam_mini_kernels.buffers import FlatGroup
    from adam_mini_kernels.partition import layout_for

    params = [nn.Parameter(torch.randn(6, 8)), nn.Parameter(torch.randn(8)), nn.Parameter(torch.randn(4, 8))]
    layouts = [layout_for("mlp.weight", (6, 8), "mlp", None), layout_for("ln.weight", (8,), "whole", None),
               layout_for("mlp.up", (4, 8), "mlp", None)]
    for p in params:
        p.grad = torch.randn_like(p)
    own = [(p.data_ptr(), p.grad.data_ptr()) for p in params]
    allocations = []
    zeros = torch.zeros

    def recording_zeros(*args, **kwargs):
        out = zeros(*args, **kwargs)
        moved = [(p.data_ptr() != pp, p.grad.data_ptr() != gp) for p, (pp, gp) in zip(params, own)]
        allocations.append((out.numel(), all(m for m, _ in moved), all(g for _, g in moved)))
        return out

    monkeypatch.setattr(torch, "zeros", recording_zeros)
    group = FlatGroup(params, layouts)
    monkeypatch.undo()
    big = [(params_moved, grads_moved) for numel, params_moved, grads_moved in allocations if numel == group.numel]
    # param buffer (before any copy), gradient buffer (parameters moved), m (both moved)
    assert big == [(False, False), (True, False), (True, True)]
    for i, p in enumerate(params):
        assert p.data_ptr() == group.param_view(i).data_ptr() and p.grad.data_ptr() == group.grad_view(i).data_ptr()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_first_step_peaks_at_one_extra_copy_of_the_parameters_on_cuda():
    """[Note: first-build memory] on the caching allocator: the first step (which builds the
    buffers) allocates at most about one more copy of the parameters beyond what it holds after
    (P + G + M before it, as AdamW's step), not three."""
    torch.cuda.empty_cache()
    named = [(f"layers.{k}.mlp.weight", nn.Parameter(torch.randn(1024, 4096, device="cuda"))) for k in range(4)]
    for _, p in named:
        p.grad = torch.randn_like(p)
    param_bytes = sum(p.numel() * p.element_size() for _, p in named)
    opt = AdamMini(named, lr=1e-3, verbose=False, dim=4096, n_heads=32)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    opt.step()
    torch.cuda.synchronize()
    after, peak = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
    assert after - before <= 1.05 * param_bytes  # m (and v), the old parameters and gradients released
    assert peak - after <= 1.05 * param_bytes, (peak - after) / param_bytes
