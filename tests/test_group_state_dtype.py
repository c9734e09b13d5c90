"""A param group's own ``state_dtype``: its parameters keep m in the dtype it names
while the rest of the optimizer follows the constructor's, exactly as if each kind had an
optimizer of its own; changing it between steps converts the state; it travels with the param
groups through state_dict; bad values are refused before anything changes. The torch backend
throughout, and the Triton backend for the equality (in its interpreter without a GPU)."""

import copy

import pytest
import torch

from adam_mini_kernels import AdamMini
from adam_mini_kernels.quantization import dequantize_runs, quantize_runs
from grad_stream import clone_named, run_stream

SHAPES = {
    "embed.weight": (20, 300),
    "layers.0.q_proj.weight": (64, 128),
    "mlp.weight": (40, 300),
    "mlp.bias": (40,),
    "ln.weight": (300,),
}
QUANTIZED = {"embed.weight", "layers.0.q_proj.weight", "mlp.weight"}  # under state_dtype=torch.int8
KW = dict(lr=1e-2, weight_decay=0.1, verbose=False, dim=128, n_heads=4, backend="torch")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Parameter name -> its group's state_dtype in the mixed optimizer (others: the constructor's int8).
OWN = {"embed.weight": None, "layers.0.q_proj.weight": torch.float32}


def _named(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [(n, torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE, dtype))) for n, s in SHAPES.items()]


def _mixed(named, **kw):
    opt = AdamMini(named, state_dtype=torch.int8, **dict(KW, **kw))
    for group in opt.param_groups:
        if group["name"] in OWN:
            group["state_dtype"] = OWN[group["name"]]
    return opt


def _float_m(state):
    """The float32 m of an int8 state (row-major blocks of equal runs: these shapes' layouts)."""
    runs = tuple(tuple(r) for r in state["block_runs"])
    return dequantize_runs(state["m_codes"].reshape(-1), state["m_scales"], runs).view(state["m_codes"].shape)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_state_dtype_equals_an_optimizer_of_that_dtype(backend, dtype):
    """Bitwise: each parameter of the mixed optimizer follows the optimizer built with its
    group's state_dtype for all parameters (the steps are independent per parameter)."""
    if backend == "triton":
        pytest.importorskip("triton")
    named = _named(dtype)
    refs = {d: clone_named(named) for d in (torch.int8, None, torch.float32)}
    mixed = _mixed(named, backend=backend)
    ref_opts = {d: AdamMini(n, state_dtype=d, **dict(KW, backend=backend)) for d, n in refs.items()}
    sets = [[p for _, p in named]] + [[p for _, p in n] for n in refs.values()]
    run_stream(sets, [mixed, *ref_opts.values()], steps=3, seed=3, none_every=3)  # each idle once
    for k, (name, p) in enumerate(named):
        want = OWN.get(name, torch.int8)
        q = refs[want][k][1]
        assert torch.equal(p, q), name
        state, ref_state = mixed.state[p], ref_opts[want].state[q]
        assert sorted(state) == sorted(ref_state), name
        for key, value in state.items():
            if torch.is_tensor(value):
                assert value.dtype == ref_state[key].dtype and torch.equal(value, ref_state[key]), (name, key)
    m_dtypes = {name: mixed.state[p].get("m", mixed.state[p].get("m_codes")).dtype for name, p in named}
    assert m_dtypes["embed.weight"] == dtype and m_dtypes["layers.0.q_proj.weight"] == torch.float32
    assert m_dtypes["mlp.weight"] == torch.int8


def test_changing_group_state_dtype_converts_the_state():
    """int8 -> None dequantizes exactly, None -> int8 quantizes (absmax per chunk), and the step
    goes on from the converted state as a fresh optimizer loaded with it does."""
    named = _named()
    opt = AdamMini(named, state_dtype=torch.int8, **KW)
    run_stream([[p for _, p in named]], [opt], steps=2, none_every=0)
    embed = named[0][1]
    before = _float_m(opt.state[embed])
    opt.param_groups[0]["state_dtype"] = None
    opt._prepare()  # the buffers are rebuilt at the next step; build them without stepping
    assert "m_codes" not in opt.state[embed] and torch.equal(opt.state[embed]["m"], before)
    assert opt.state[named[2][1]]["m_codes"].dtype == torch.int8  # the other groups keep theirs

    twin_named = clone_named(named)
    twin = AdamMini(twin_named, state_dtype=torch.int8, **KW)
    twin.param_groups[0]["state_dtype"] = None
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    run_stream([[p for _, p in named], [p for _, p in twin_named]], [opt, twin], steps=2, seed=1, none_every=0)
    for (name, p), (_, q) in zip(named, twin_named):
        assert torch.equal(p, q), name

    m = opt.state[embed]["m"].clone()
    del opt.param_groups[0]["state_dtype"]  # back to the constructor's int8
    opt._prepare()
    runs = tuple(tuple(r) for r in opt.state[embed]["block_runs"])
    codes, scales = quantize_runs(m.reshape(-1), runs)
    assert torch.equal(opt.state[embed]["m_codes"].reshape(-1), codes)
    assert torch.equal(opt.state[embed]["m_scales"], scales)


def test_group_state_dtype_travels_with_the_param_groups():
    """Saved with the groups and restored by a plain int8 optimizer (resume bitwise); a loaded
    group without it keeps the loading optimizer's."""
    named = _named()
    mixed = _mixed(named)
    run_stream([[p for _, p in named]], [mixed], steps=2, none_every=0)
    saved = copy.deepcopy(mixed.state_dict())
    assert [g.get("state_dtype", "absent") for g in saved["param_groups"]][:3] == [None, torch.float32, "absent"]

    resumed_named = clone_named(named)
    resumed = AdamMini(resumed_named, state_dtype=torch.int8, **KW)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["state_dtype"] is None
    run_stream([[p for _, p in named], [p for _, p in resumed_named]], [mixed, resumed], steps=2, seed=1, none_every=0)
    for (name, p), (_, q) in zip(named, resumed_named):
        assert torch.equal(p, q), name
        assert sorted(mixed.state[p]) == sorted(resumed.state[q]), name

    plain = AdamMini(clone_named(named), state_dtype=torch.int8, **KW)
    run_stream([plain._index_to_param()], [plain], steps=1, none_every=0)
    keeper = _mixed(clone_named(named))
    keeper.load_state_dict(copy.deepcopy(plain.state_dict()))
    assert keeper.param_groups[0]["state_dtype"] is None and keeper.param_groups[1]["state_dtype"] == torch.float32
    keeper._prepare()
    embed = keeper._index_to_param()[0]
    assert torch.equal(keeper.state[embed]["m"], _float_m(plain.state[plain._index_to_param()[0]]))


def test_bad_group_state_dtype_is_refused_before_anything_changes():
    named = _named()
    opt = AdamMini(named, **KW)
    run_stream([[p for _, p in named]], [opt], steps=1, none_every=0)
    before = [p.detach().clone() for _, p in named]
    m_before = opt.state[named[0][1]]["m"].clone()
    opt.param_groups[0]["state_dtype"] = torch.float16
    for _, p in named:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="param group 'embed.weight': state_dtype must be None"):
        opt.step()
    assert all(torch.equal(b, p) for b, (_, p) in zip(before, named))
    assert torch.equal(opt.state[named[0][1]]["m"], m_before)

    with pytest.raises(ValueError, match="param group 'extra': state_dtype must be"):
        opt.add_param_group({"name": "extra", "params": torch.nn.Parameter(torch.zeros(3)), "state_dtype": "int8"})
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0]["state_dtype"] = torch.bfloat16
    with pytest.raises(ValueError, match="state dict param group 'embed.weight'"):
        AdamMini(clone_named(named), **KW).load_state_dict(saved)
