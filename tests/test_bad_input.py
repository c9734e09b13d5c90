"""Bad input gets a clear error and leaves everything as it was.

Every error is checked for its type and for a message that names the problem (the argument or
the parameter). Where the error comes at ``step()``, a good step is taken first so that there is
optimizer state to corrupt, and params, grads and state are compared bitwise before/after.
NaN/Inf gradients are not input errors: they propagate exactly as in official ``adam-mini``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from adam_mini_kernels import AdamMini

DIM, N_HEADS = 8, 2  # head block: 8 * 8 / 2 = 32 elements


def _named(seed: int = 0):
    """A small named tree touching several rules: heads, rows, Adam, whole."""
    gen = torch.Generator().manual_seed(seed)

    def param(*shape):
        return nn.Parameter(torch.randn(*shape, generator=gen))

    return [
        ("layer.attn.q_proj.weight", param(DIM, DIM)),
        ("layer.attn.k_proj.weight", param(DIM // 2, DIM)),  # GQA K: one head block
        ("layer.mlp.weight", param(12, DIM)),
        ("layer.mlp.bias", param(12)),
        ("layer.norm.weight", param(DIM)),
    ]


def _random_grads(named, seed: int):
    gen = torch.Generator().manual_seed(seed)
    for _, p in named:
        p.grad = torch.randn(p.shape, generator=gen)


def _good_step(named, opt, seed: int):
    opt.zero_grad()
    _random_grads(named, seed)
    opt.step()


def _clone_value(value):
    if isinstance(value, torch.Tensor):
        value = value.detach()
        return value.to_dense().clone() if value.layout != torch.strided else value.clone()
    return value


def _snapshot(named, opt=None):
    """Bitwise copies of every param, grad and (if ``opt``) every state entry."""
    snap = {}
    for name, p in named:
        state = {}
        if opt is not None and p in opt.state:
            state = {k: _clone_value(v) for k, v in opt.state[p].items()}
        snap[name] = (_clone_value(p), None if p.grad is None else _clone_value(p.grad), state)
    return snap


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


def _assert_unchanged(before, after):
    assert before.keys() == after.keys()
    for name in before:
        (p0, g0, s0), (p1, g1, s1) = before[name], after[name]
        assert _same(p0, p1), f"parameter {name} changed"
        assert (g0 is None) == (g1 is None) and (g0 is None or _same(g0, g1)), f"grad of {name} changed"
        assert s0.keys() == s1.keys(), f"state keys of {name} changed: {sorted(s0)} -> {sorted(s1)}"
        for key in s0:
            assert _same(s0[key], s1[key]), f"state[{key!r}] of {name} changed"


# -- constructor errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(lr=-1e-3), ["learning rate", "-0.001"]),
        (dict(lr=float("nan")), ["learning rate"]),
        (dict(eps=-1e-8), ["eps"]),
        (dict(weight_decay=-0.1), ["weight_decay"]),
        (dict(betas=(-0.1, 0.999)), ["beta1"]),
        (dict(betas=(1.0, 0.999)), ["beta1"]),
        (dict(betas=(1.5, 0.999)), ["beta1"]),
        (dict(betas=(0.9, -0.5)), ["beta2"]),
        (dict(betas=(0.9, 1.0)), ["beta2"]),
        (dict(betas=(0.9, 2.0)), ["beta2"]),
        (dict(n_heads=4, n_kv_heads=3), ["n_kv_heads", "n_heads"]),
        (dict(dim=0), ["dim"]),
        (dict(dim=-8), ["dim"]),
        (dict(dim=7.5), ["dim"]),
        (dict(n_heads=0), ["n_heads"]),
        (dict(n_heads=-2), ["n_heads"]),
        (dict(n_heads=2.5), ["n_heads"]),
        (dict(n_kv_heads=0), ["n_kv_heads"]),
        (dict(head_dim=0), ["head_dim"]),
        (dict(head_dim=-4), ["head_dim"]),
        # inf passes ">= 0": every parameter would become inf or NaN (lr, weight decay) or still (eps)
        (dict(lr=float("inf")), ["learning rate", "finite"]),
        (dict(eps=float("inf")), ["eps", "finite"]),
        (dict(weight_decay=float("inf")), ["weight_decay", "finite"]),
        (dict(betas=(0.9, 0.99, 0.999)), ["betas", "pair"]),  # once cut to its first two silently
        (dict(betas=(0.9,)), ["betas", "pair"]),
        (dict(dim=True), ["dim"]),
        (dict(dim=float("nan")), ["dim"]),
        (dict(n_heads=float("inf")), ["n_heads"]),
    ],
    ids=lambda x: repr(x) if isinstance(x, dict) else None,
)
def test_bad_hyperparameter_is_rejected_and_changes_nothing(kwargs, words):
    named = _named()
    _random_grads(named, seed=1)
    before = _snapshot(named)
    args = dict(dim=DIM, n_heads=N_HEADS, verbose=False)
    args.update(kwargs)
    with pytest.raises(ValueError) as err:
        AdamMini(named, **args)
    message = str(err.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    _assert_unchanged(before, _snapshot(named))


@pytest.mark.parametrize("lr", [None, "1e-3", True])
def test_lr_that_is_not_a_number_is_a_type_error(lr):
    """An lr that is no number (None stands for a device tensor's value inside the optimizer)
    is refused by the constructor, and set into a param group, at every step that follows: a
    second step must not go on with the lr of the last good step."""
    named = _named()
    with pytest.raises(TypeError, match="lr must be a number"):
        AdamMini(named, lr=lr, dim=DIM, n_heads=N_HEADS, verbose=False)
    opt = AdamMini(named, dim=DIM, n_heads=N_HEADS, verbose=False)
    _good_step(named, opt, seed=1)
    opt.param_groups[2]["lr"] = lr
    _random_grads(named, seed=2)
    before = _snapshot(named, opt)
    for _ in range(2):
        with pytest.raises(TypeError, match="param group 'layer.mlp.weight': lr must be a number"):
            opt.step()
    _assert_unchanged(before, _snapshot(named, opt))


@pytest.mark.parametrize("model", ["model", [nn.Linear(2, 2)]], ids=["str", "list"])
def test_model_that_is_not_a_module_is_a_type_error(model):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module or None"):
        AdamMini(_named(), dim=DIM, n_heads=N_HEADS, verbose=False, model=model)


def test_model_is_not_pickled_with_the_optimizer():
    """A copy (deepcopy, pickle) of the optimizer does not drag the model along: it copies
    sharded parameters into its flat buffer instead of sharing FSDP2's storage."""
    import copy

    model = nn.Linear(4, 3)
    opt = AdamMini(model.named_parameters(), verbose=False, model=model)
    assert opt._model is model
    assert copy.deepcopy(opt)._model is None
    opt.load_state_dict(opt.state_dict())  # loading keeps it
    assert opt._model is model


def test_integral_float_dims_are_accepted():
    """Only non-integers are errors: 8.0 heads is 8 heads."""
    named = _named()
    opt = AdamMini(named, dim=8.0, n_heads=2.0, verbose=False)
    _good_step(named, opt, seed=2)
    assert opt.partition_summary()[0]["num_blocks"] == 2


def test_complex_parameter_is_rejected():
    named = _named() + [("layer.mlp.complex_weight", nn.Parameter(torch.randn(3, 4, dtype=torch.complex64)))]
    before = _snapshot(named)
    with pytest.raises(ValueError) as err:
        AdamMini(named, dim=DIM, n_heads=N_HEADS, verbose=False)
    assert "complex" in str(err.value)
    assert "layer.mlp.complex_weight" in str(err.value)
    _assert_unchanged(before, _snapshot(named))


def test_same_parameter_twice_is_rejected():
    named = _named()
    shared = named[2][1]
    named.append(("other.mlp.weight", shared))
    before = _snapshot(named[:-1])
    with pytest.raises(ValueError) as err:
        AdamMini(named, dim=DIM, n_heads=N_HEADS, verbose=False)
    message = str(err.value)
    assert "layer.mlp.weight" in message and "other.mlp.weight" in message
    _assert_unchanged(before, _snapshot(named[:-1]))


@pytest.mark.parametrize("how", ["data", "view"])
def test_parameters_over_one_memory_are_rejected(how):
    """Two Parameters over the same memory (old-style tying, ``b.data = a.data``, or a parameter
    made from a view of another): the flat buffers would give each a copy of its own and untie
    them silently; a clear error instead, at construction."""
    named = _named()
    a = named[2][1]
    b = nn.Parameter(torch.empty_like(a)) if how == "data" else nn.Parameter(a.detach()[3:])
    if how == "data":
        b.data = a.data
    named.append(("other.mlp.weight", b))
    with pytest.raises(ValueError, match=r"'layer.mlp.weight' and 'other.mlp.weight' share memory"):
        AdamMini(named, dim=DIM, n_heads=N_HEADS, verbose=False)


def test_parameters_from_one_storage_in_disjoint_spans_are_fine():
    """Parameters cut from one storage without overlap (a checkpoint loader's single buffer,
    as safetensors' mmap gives) are separate parameters."""
    storage = torch.randn(12 * DIM + DIM)
    named = [("layer.mlp.weight", nn.Parameter(storage[: 12 * DIM].view(12, DIM))),
             ("layer.norm.weight", nn.Parameter(storage[12 * DIM :]))]
    opt = AdamMini(named, dim=DIM, n_heads=N_HEADS, verbose=False)
    _good_step(named, opt, seed=4)
    assert all(int(opt.state[p]["step"]) == 1 for _, p in named)


@pytest.mark.parametrize("bad", ["int64", "complex", "duplicate", "shared"])
def test_parameter_put_into_param_groups_later_is_checked_and_changes_nothing(bad):
    """A parameter swapped into ``param_groups`` after construction passes the constructor's
    checks at the next build (an int64 one once got int64 state; a complex one crashed the step
    after other groups had stepped; one already in another group was stepped twice)."""
    named = _named()
    opt = AdamMini(named, dim=DIM, n_heads=N_HEADS, verbose=False)
    _good_step(named, opt, seed=5)
    group = opt.param_groups[2]
    w = group["params"][0]
    replacement = {
        "int64": lambda: nn.Parameter(torch.ones(w.shape, dtype=torch.int64), requires_grad=False),
        "complex": lambda: nn.Parameter(torch.randn(w.shape, dtype=torch.complex64)),
        "duplicate": lambda: opt.param_groups[4]["params"][0],
        "shared": lambda: nn.Parameter(opt.param_groups[4]["params"][0].detach()),
    }[bad]()
    if replacement.dtype.is_floating_point or replacement.is_complex():
        replacement.grad = torch.zeros_like(replacement)
    group["params"][0] = replacement
    before = _snapshot(named, opt)
    with pytest.raises((ValueError, TypeError)):
        opt.step()
    _assert_unchanged(before, _snapshot(named, opt))


def test_gradient_data_of_another_dtype_is_rejected_and_changes_nothing():
    """``p.grad.data = other`` skips autograd's dtype check: a float64 gradient of a float32
    parameter was cast silently (official raises)."""
    named = _named()
    opt = AdamMini(named, dim=DIM, n_heads=N_HEADS, verbose=False)
    _good_step(named, opt, seed=6)
    name, w = named[2]
    w.grad.data = torch.ones(w.shape, dtype=torch.float64)
    before = _snapshot(named, opt)
    with pytest.raises(RuntimeError, match=r"gradient of 'layer.mlp.weight' is torch.float64"):
        opt.step()
    _assert_unchanged(before, _snapshot(named, opt))


def test_tied_weights_through_named_parameters_are_fine():
    """``named_parameters()`` yields a tied weight once, so that is not a duplicate."""
    torch.manual_seed(3)
    model = nn.ModuleDict(dict(wte=nn.Embedding(10, DIM), lm_head=nn.Linear(DIM, 10, bias=False)))
    model["lm_head"].weight = model["wte"].weight
    names = [n for n, _ in model.named_parameters()]
    assert names == ["wte.weight"]
    opt = AdamMini(model.named_parameters(), dim=DIM, n_heads=N_HEADS, verbose=False)
    tokens = torch.randint(0, 10, (4, 5))
    before = model["wte"].weight.detach().clone()
    model["lm_head"](model["wte"](tokens)).logsumexp(-1).mean().backward()
    opt.step()
    assert not torch.equal(before, model["wte"].weight)
    assert model["lm_head"].weight is model["wte"].weight


@pytest.mark.parametrize("kind", ["parameters", "tensors", "param_group_dicts", "name_only"])
def test_input_that_is_not_name_param_pairs_is_a_type_error(kind):
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    before = _snapshot(list(model.named_parameters()))
    items = {
        "parameters": lambda: model.parameters(),
        "tensors": lambda: [torch.randn(3, requires_grad=True)],
        "param_group_dicts": lambda: [{"params": list(model.parameters())}],
        "name_only": lambda: ["0.weight", "0.bias"],
    }[kind]()
    with pytest.raises(TypeError) as err:
        AdamMini(items, verbose=False)
    assert "named_parameters" in str(err.value) or "(name, parameter)" in str(err.value)
    _assert_unchanged(before, _snapshot(list(model.named_parameters())))


# -- step-time errors ------------------------------------------------------------------------------


class _SparseModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(16, DIM, sparse=True)
        self.mlp = nn.Linear(DIM, DIM)
        self.ln_f = nn.LayerNorm(DIM)

    def forward(self, x, use_embedding=True):
        h = self.wte(x) if use_embedding else torch.randn(x.shape + (DIM,))
        return self.ln_f(self.mlp(h)).pow(2).mean()


def test_sparse_gradient_is_rejected_after_steps_and_changes_nothing():
    torch.manual_seed(4)
    model = _SparseModel()
    opt = AdamMini(model.named_parameters(), dim=DIM, n_heads=N_HEADS, verbose=False)
    tokens = torch.randint(0, 16, (3, 5))
    for _ in range(2):  # the embedding is idle: its grad stays None, the rest trains
        opt.zero_grad()
        model(tokens, use_embedding=False).backward()
        opt.step()
    opt.zero_grad()
    model(tokens).backward()
    assert model.wte.weight.grad.is_sparse
    named = list(model.named_parameters())
    before = _snapshot(named, opt)
    with pytest.raises(RuntimeError) as err:
        opt.step()
    message = str(err.value)
    assert "sparse" in message and "wte" in message, message
    _assert_unchanged(before, _snapshot(named, opt))


@pytest.mark.parametrize("reshape", ["view", "narrow"])
def test_parameter_reshaped_in_its_storage_is_rejected_and_changes_nothing(reshape):
    """``p.data = p.data.view(...)`` (or a narrowed view) after steps: the same storage, so the
    same data pointer, and gradients still aliasing the flat buffer (the per-step fast path), but
    the partition was built for the old shape: the step refuses and changes nothing."""
    named = _named(3)
    opt = AdamMini(named, dim=DIM, n_heads=N_HEADS, verbose=False)
    for seed in range(2):
        _good_step(named, opt, seed)
    opt.zero_grad(set_to_none=False)  # gradients stay views of the flat buffer
    gen = torch.Generator().manual_seed(9)
    for _, p in named:
        p.grad.copy_(torch.randn(p.shape, generator=gen))
    name, w = named[2]  # layer.mlp.weight, (12, 8)
    ptr = w.data_ptr()
    w.data = w.data.view(-1) if reshape == "view" else w.data[:4]
    assert w.data_ptr() == ptr
    before = _snapshot(named, opt)
    with pytest.raises(RuntimeError, match="changed shape") as err:
        opt.step()
    assert name in str(err.value)
    _assert_unchanged(before, _snapshot(named, opt))


def test_gradient_data_of_another_shape_is_rejected_and_changes_nothing():
    """``p.grad.data = t`` with ``t`` of another shape (torch allows it; ``p.grad = t`` it
    refuses): the gradient no longer fits its parameter, the step refuses and changes nothing."""
    named = _named(4)
    opt = AdamMini(named, dim=DIM, n_heads=N_HEADS, verbose=False)
    for seed in range(2):
        _good_step(named, opt, seed)
    name, w = named[2]  # layer.mlp.weight, (12, 8)
    w.grad.data = torch.ones(8, 12)
    before = _snapshot(named, opt)
    with pytest.raises(RuntimeError, match=r"gradient of 'layer.mlp.weight' is torch.float32 of shape \[8, 12\], the parameter torch.float32 of shape \[12, 8\]"):
        opt.step()
    _assert_unchanged(before, _snapshot(named, opt))


def test_sparse_gradient_at_first_step_is_rejected():
    torch.manual_seed(5)
    model = _SparseModel()
    opt = AdamMini(model.named_parameters(), dim=DIM, n_heads=N_HEADS, verbose=False)
    model(torch.randint(0, 16, (3, 5))).backward()
    named = list(model.named_parameters())
    before = _snapshot(named)
    with pytest.raises(RuntimeError) as err:
        opt.step()
    message = str(err.value)
    assert "sparse" in message and "wte" in message, message
    _assert_unchanged(before, _snapshot(named))
    # No step happened: whatever state exists is still at step 0 with zero moments.
    for _, p in named:
        state = opt.state.get(p, {})
        if "step" in state:
            assert int(state["step"]) == 0
        if "m" in state:
            assert not state["m"].any()


def test_query_key_not_a_multiple_of_head_block_at_first_step():
    named = _named()
    named[1] = ("layer.attn.k_proj.weight", nn.Parameter(torch.randn(6, DIM)))  # 48 elements, head 32
    opt = AdamMini(named, dim=DIM, n_heads=N_HEADS, verbose=False)
    _random_grads(named, seed=6)
    before = _snapshot(named, opt)
    with pytest.raises(ValueError) as err:
        opt.step()
    message = str(err.value)
    assert "layer.attn.k_proj.weight" in message
    for arg in ("dim", "n_heads", "head_dim"):
        assert arg in message, f"{arg!r} not in {message!r}"
    _assert_unchanged(before, _snapshot(named, opt))


def test_query_key_rule_added_after_steps_that_does_not_fit_changes_nothing():
    named = _named()
    opt = AdamMini(named, dim=DIM, n_heads=N_HEADS, verbose=False)
    for seed in (7, 8):
        _good_step(named, opt, seed)
    opt.wqk_names.add("norm")  # 8 elements: not a multiple of the 32-element head block
    opt.zero_grad()
    _random_grads(named, seed=9)
    before = _snapshot(named, opt)
    with pytest.raises(ValueError) as err:
        opt.step()
    assert "layer.norm.weight" in str(err.value)
    _assert_unchanged(before, _snapshot(named, opt))
    # Undo the bad edit: training goes on from the untouched state.
    opt.wqk_names.discard("norm")
    opt.step()
    for _, p in named:
        assert int(opt.state[p]["step"]) == 3


def test_dim_squared_not_divisible_by_n_heads_with_query_key_param():
    named = _named()
    _random_grads(named, seed=10)
    before = _snapshot(named)
    with pytest.raises(ValueError) as err:
        opt = AdamMini(named, dim=DIM, n_heads=3, verbose=False)  # 64 % 3 != 0
        opt.step()
    message = str(err.value)
    assert "n_heads" in message and "dim" in message
    _assert_unchanged(before, _snapshot(named))


def test_dim_squared_not_divisible_by_n_heads_is_fine_without_query_key_params():
    named = [(n, p) for n, p in _named() if "proj" not in n]
    opt = AdamMini(named, dim=DIM, n_heads=3, verbose=False)
    before = _snapshot(named)
    _good_step(named, opt, seed=11)
    for name, p in named:
        assert not torch.equal(before[name][0], p.detach()), name


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("lr", -1e-3, ["learning rate"]),
        ("lr", float("nan"), ["learning rate"]),  # only a float lr changed: the scheduler's check
        ("eps", -1.0, ["eps"]),
        ("weight_decay", -0.5, ["weight_decay"]),
        ("beta1", 1.0, ["beta1"]),
        ("beta2", -0.1, ["beta2"]),
        ("lr", float("inf"), ["learning rate", "finite"]),  # the scheduler's fast check too
        ("weight_decay", float("inf"), ["weight_decay", "finite"]),
        # torch's spelling, which the step would ignore (the groups hold beta1 and beta2)
        ("betas", (0.5, 0.9), ["'betas'", "beta1", "beta2"]),
    ],
)
def test_param_group_set_invalid_after_steps(key, value, words):
    named = _named()
    opt = AdamMini(named, dim=DIM, n_heads=N_HEADS, weight_decay=0.1, verbose=False)
    for seed in (12, 13, 14):
        _good_step(named, opt, seed)
    group = opt.param_groups[2]
    assert group["name"] == "layer.mlp.weight"
    good = group.get(key, None)
    group[key] = value
    opt.zero_grad()
    _random_grads(named, seed=15)
    before = _snapshot(named, opt)
    with pytest.raises(ValueError) as err:
        opt.step()
    message = str(err.value)
    assert "layer.mlp.weight" in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    _assert_unchanged(before, _snapshot(named, opt))
    # Fixing the value lets training continue, with every step counter advancing once.
    if good is None:
        del group[key]
    else:
        group[key] = good
    opt.step()
    for _, p in named:
        assert int(opt.state[p]["step"]) == 4


def test_add_param_group_takes_torch_style_betas_as_beta1_and_beta2():
    named = _named()
    first, extra = named[:-1], named[-1]
    opt = AdamMini(first, dim=DIM, n_heads=N_HEADS, verbose=False)
    opt.add_param_group({"name": extra[0], "params": [extra[1]], "betas": (0.5, 0.75)})
    group = opt.param_groups[-1]
    assert "betas" not in group and (group["beta1"], group["beta2"]) == (0.5, 0.75)
    with pytest.raises(ValueError, match="disagree"):
        opt.add_param_group({"name": "other", "params": [torch.zeros(3, requires_grad=True)], "betas": (0.5, 0.75), "beta1": 0.9})
    with pytest.raises(ValueError, match="pair"):
        opt.add_param_group({"name": "other", "params": [torch.zeros(3, requires_grad=True)], "betas": (0.5,)})
    # The step uses them: m after one step is (1 - beta1) * g for the added parameter.
    _random_grads(named, seed=14)
    grad = extra[1].grad.clone()
    opt.step()
    torch.testing.assert_close(opt.state[extra[1]]["m"].reshape(-1).float(), (0.5 * grad).reshape(-1).float(), rtol=1e-6, atol=0)


# -- NaN / Inf gradients: propagated exactly as official does ------------------------------------


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Linear(6, 5)  # weight: one block per row; bias: Adam
        self.norm = nn.LayerNorm(5)  # weight: one whole-tensor block
        self.head = nn.Linear(5, 3, bias=False)  # whole-tensor block, stays finite


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_gradients_propagate_like_official(bad):
    adam_mini = pytest.importorskip("adam_mini")
    torch.manual_seed(16)
    ours_model = _Tiny()
    official_model = _Tiny()
    official_model.load_state_dict(ours_model.state_dict())
    kwargs = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, dim=DIM, n_heads=N_HEADS, verbose=False)
    ours = AdamMini(ours_model.named_parameters(), **kwargs)
    official = adam_mini.Adam_mini(official_model.named_parameters(), **kwargs)

    gen = torch.Generator().manual_seed(17)
    for step in range(3):
        grads = {n: torch.randn(p.shape, generator=gen) for n, p in ours_model.named_parameters()}
        if step == 1:
            grads["mlp.weight"][2, 3] = bad
            grads["norm.weight"][1] = bad
        for model, opt in ((ours_model, ours), (official_model, official)):
            opt.zero_grad()
            for n, p in model.named_parameters():
                p.grad = grads[n].clone()
            opt.step()
        for (n, p), (_, q) in zip(ours_model.named_parameters(), official_model.named_parameters()):
            a, b = p.detach(), q.detach()
            assert torch.equal(a.isnan(), b.isnan()), f"NaN pattern of {n} differs at step {step}"
            assert torch.equal(a.isinf(), b.isinf()), f"Inf pattern of {n} differs at step {step}"
            finite = a.isfinite()
            torch.testing.assert_close(a[finite], b[finite], rtol=1e-5, atol=1e-7)

    w = ours_model.mlp.weight.detach()
    assert not w[2].isfinite().all(), "the poisoned row should not stay finite"
    assert w[[0, 1, 3, 4]].isfinite().all(), "other rows must stay finite"
    assert not ours_model.norm.weight.detach().isfinite().all()
    assert ours_model.mlp.bias.detach().isfinite().all()
    assert ours_model.head.weight.detach().isfinite().all()
    assert math.isfinite(float(ours_model.norm.bias.detach().sum()))
