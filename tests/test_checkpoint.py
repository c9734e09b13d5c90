"""Checkpoints: ``state_dict`` / ``load_state_dict`` of ``AdamMini`` (torch backend), through
``torch.save`` / ``torch.load`` (the default, weights-only loader) as a training stack does.

* Resume: N steps, save model and optimizer, load both into a fresh model (built from another
  seed, so everything must come from the checkpoint) and a fresh optimizer, N more steps: bitwise
  equal to 2N steps straight, for float32 and bfloat16 parameters (whose second moments must stay
  float32 through the load, where torch's default load path would cast them to bf16).
* Interchange with official ``adam_mini.Adam_mini`` 1.1.1, both ways: a checkpoint written by one
  optimizer continues in the other exactly as in the writer (float32, relative error <= 1e-5 after
  the N more steps; the two continuations compute their own gradients).
* A state dict whose moments do not fit a parameter (or lack its step count) is refused with ``ValueError`` before
  anything is changed: state, hyperparameters and later steps are as if the load was never tried.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

import models
from adam_mini_kernels import AdamMini, quantization
from adam_mini_kernels.checkpoint import second_moment

Adam_mini = pytest.importorskip("adam_mini").Adam_mini  # the official oracle (required in CI)

HPARAMS = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
RESUME_STEPS = 3
INTERCHANGE_STEPS = 5
RTOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def make_opt(kind, model, dims, **overrides):
    kwargs = dict(HPARAMS, **overrides)
    if kind == "official":
        return Adam_mini(model.named_parameters(), **kwargs, verbose=False, **dims)
    return AdamMini(model.named_parameters(), **kwargs, verbose=False, backend="torch", **dims)


def build(name, dtype=torch.float32, seed=0):
    model, batch_fn, dims = models.build(name, seed=seed)
    return model.to(dtype), batch_fn, dims


def roundtrip(obj):
    """``torch.save`` to memory and ``torch.load`` back (weights-only, torch's default): a deep
    copy that shares no storage with the live optimizer."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def rel_err(actual, expected):
    if expected.numel() == 0:
        return 0.0
    a, e = actual.detach().double(), expected.detach().double()
    err, scale = (a - e).abs().max().item(), e.abs().max().item()
    return (math.inf if err else 0.0) if scale == 0.0 else err / scale


def assert_states(actual, expected, rtol=None, what="state"):
    """Two ``state_dict()["state"]`` dicts: same entries (an empty entry, which official leaves
    for a parameter it looked up without a gradient, counts as none), same keys, equal metadata
    and step counts, tensors of equal shape and dtype, bitwise equal (``rtol=None``) or within
    ``rtol`` relative error."""
    actual = {k: s for k, s in actual.items() if s}
    expected = {k: s for k, s in expected.items() if s}
    assert actual.keys() == expected.keys(), f"{what}: entries {sorted(actual)} != {sorted(expected)}"
    for idx, exp in expected.items():
        act = actual[idx]
        assert set(act) == set(exp), f"{what} {idx}: keys {sorted(act)} != {sorted(exp)}"
        for key, e in exp.items():
            a = act[key]
            if not torch.is_tensor(e):
                assert not torch.is_tensor(a) and a == e and type(a) is type(e), f"{what} {idx} {key}: {a!r} != {e!r}"
                continue
            assert a.shape == e.shape and a.dtype == e.dtype, (
                f"{what} {idx} {key}: {tuple(a.shape)} {a.dtype} != {tuple(e.shape)} {e.dtype}"
            )
            if rtol is None:
                assert torch.equal(a, e), f"{what} {idx} {key}: not bitwise equal"
            else:
                err = rel_err(a, e)
                assert err <= rtol, f"{what} {idx} {key}: relative error {err:.3g} > {rtol}"


def assert_params(actual_model, expected_model, rtol=None):
    for (name, e), a in zip(expected_model.named_parameters(), actual_model.parameters()):
        assert a.dtype == e.dtype, name
        if rtol is None:
            assert torch.equal(a, e), f"parameter {name}: not bitwise equal"
        else:
            err = rel_err(a, e)
            assert err <= rtol, f"parameter {name}: relative error {err:.3g} > {rtol}"


def assert_second_moments_float32(opt, when):
    seen = 0
    for p, state in opt.state.items():
        if state:
            v = second_moment(state)
            assert v.dtype == torch.float32, f"{when}: second moment of a {p.dtype} parameter is {v.dtype}"
            seen += 1
    assert seen, f"{when}: no state"


# -- resume ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["llama_gqa", "nanogpt"])
def test_resume_is_bitwise_identical(name, dtype):
    n = RESUME_STEPS
    straight, batch_straight, dims = build(name, dtype)
    opt_straight = make_opt("ours", straight, dims)
    models.train(straight, opt_straight, batch_straight, 2 * n)

    first, batch_first, _ = build(name, dtype)
    opt_first = make_opt("ours", first, dims)
    models.train(first, opt_first, batch_first, n)
    checkpoint = roundtrip({"model": first.state_dict(), "optimizer": opt_first.state_dict()})
    saved_state = roundtrip(opt_first.state_dict())["state"]
    del first, opt_first

    resumed, batch_resumed, _ = build(name, dtype, seed=1)
    assert not all(torch.equal(a, b) for a, b in zip(resumed.parameters(), build(name, dtype)[0].parameters()))
    opt_resumed = make_opt("ours", resumed, dims)
    resumed.load_state_dict(checkpoint["model"])
    opt_resumed.load_state_dict(checkpoint["optimizer"])

    # What was loaded is what was saved, second moments float32 (also for bf16 parameters).
    assert_second_moments_float32(opt_resumed, "after load")
    assert_states(opt_resumed.state_dict()["state"], saved_state, what="loaded state")
    names = [g["name"] for g in opt_resumed.param_groups]
    steps = {names[i]: s["step"] for i, s in saved_state.items()}
    assert steps == {k: ((n + 1) // 2 if k == "gate" else n) for k in names}  # gate: even steps only

    models.train(resumed, opt_resumed, batch_resumed, n, start=n)

    assert_params(resumed, straight)
    assert_states(opt_resumed.state_dict()["state"], opt_straight.state_dict()["state"], what="resumed state")
    assert_second_moments_float32(opt_resumed, "after resumed steps")
    for group_resumed, group_straight in zip(opt_resumed.param_groups, opt_straight.param_groups):
        assert {k: v for k, v in group_resumed.items() if k != "params"} == {
            k: v for k, v in group_straight.items() if k != "params"
        }


# -- interchange with official -----------------------------------------------------------------

@pytest.mark.parametrize("writer, reader", [("official", "ours"), ("ours", "official")])
@pytest.mark.parametrize("name", ["llama_gqa", "nanogpt"])
def test_interchange_with_official(name, writer, reader):
    n = INTERCHANGE_STEPS
    model_w, batch_w, dims = build(name)
    opt_w = make_opt(writer, model_w, dims)
    models.train(model_w, opt_w, batch_w, n)
    checkpoint = roundtrip({"model": model_w.state_dict(), "optimizer": opt_w.state_dict()})

    model_r, batch_r, _ = build(name, seed=1)
    model_r.load_state_dict(checkpoint["model"])
    opt_r = make_opt(reader, model_r, dims)
    opt_r.load_state_dict(checkpoint["optimizer"])
    # Loaded as written: same entries, keys, shapes, dtypes and values.
    assert_states(opt_r.state_dict()["state"], checkpoint["optimizer"]["state"], what=f"{reader} after load")

    models.train(model_w, opt_w, batch_w, n, start=n)  # the writer goes on
    models.train(model_r, opt_r, batch_r, n, start=n)  # the reader goes on from the checkpoint

    assert_params(model_r, model_w, rtol=RTOL)
    assert_states(opt_r.state_dict()["state"], opt_w.state_dict()["state"], rtol=RTOL, what=f"{reader} vs {writer}")
    steps = {opt_r.param_groups[i]["name"]: s["step"] for i, s in opt_r.state_dict()["state"].items() if s}
    assert steps == {k: (n if k == "gate" else 2 * n) for k in steps}  # nanogpt's gate: even steps only


# -- refused loads -----------------------------------------------------------------------------

def _set(key, value):
    def damage(state):
        state[key] = value(state[key])
    return damage


BAD_STATE = {
    # m with one row too many: a different number of elements
    "m_extra_row": _set("m", lambda m: torch.cat([m, m[:1]])),
    # m with the same number of elements, wrong shape: loading it would scramble the first moment
    "m_transposed": _set("m", lambda m: m.t().contiguous()),
    # no second-moment value at all for a parameter with elements
    "vmean_empty": _set("vmean", lambda v: v[:0]),
    # moments without their step count: resuming at step 0 would bias-correct a trained m again
    "no_step": lambda state: state.pop("step"),
    # a step count without one of its moments: a new moment would be bias-corrected as trained
    # (both were once loaded as zeros, the step kept)
    "no_vmean": lambda state: state.pop("vmean"),
    "no_m": lambda state: state.pop("m"),
    # step counts that are not counts
    "negative_step": _set("step", lambda step: -3),
    "nan_step": _set("step", lambda step: float("nan")),
    # a mean of squares below zero: sqrt(v) NaN, every parameter of the block NaN after a step
    "negative_vmean": _set("vmean", lambda v: torch.where(torch.arange(v.numel()).reshape(v.shape) == 1, -1e-3, v)),
}


@pytest.mark.parametrize("trained", [False, True], ids=["fresh", "trained"])
@pytest.mark.parametrize("bad", sorted(BAD_STATE))
def test_mismatched_state_is_refused_and_changes_nothing(bad, trained):
    name, n = "nanogpt", 2
    model, batch_fn, dims = build(name)
    twin, batch_twin, _ = build(name)
    opt = make_opt("ours", model, dims)
    opt_twin = make_opt("ours", twin, dims)
    if trained:
        models.train(model, opt, batch_fn, n)
        models.train(twin, opt_twin, batch_twin, n)

    # A checkpoint from another run, with other hyperparameters, one parameter's state corrupted
    # (the last parameter, so that loading parameter by parameter would have changed the others).
    donor, batch_donor, _ = build(name, seed=3)
    opt_donor = make_opt("ours", donor, dims, lr=3e-2)
    models.train(donor, opt_donor, batch_donor, n + 1)
    checkpoint = roundtrip(opt_donor.state_dict())
    names = [g["name"] for g in opt.param_groups]
    target = names.index("lm_head.weight")
    assert target == len(names) - 1
    m = checkpoint["state"][target]["m"]
    assert m.dim() == 2 and m.shape[0] != m.shape[1]
    BAD_STATE[bad](checkpoint["state"][target])

    before = roundtrip(opt.state_dict())
    with pytest.raises(ValueError, match="lm_head.weight"):
        opt.load_state_dict(checkpoint)

    after = opt.state_dict()
    assert_states(after["state"], before["state"], what="state after the refused load")
    assert after["param_groups"] == before["param_groups"]
    assert all(g["lr"] == HPARAMS["lr"] for g in opt.param_groups)

    models.train(model, opt, batch_fn, n, start=n if trained else 0)
    models.train(twin, opt_twin, batch_twin, n, start=n if trained else 0)
    assert_params(model, twin)
    assert_states(opt.state_dict()["state"], opt_twin.state_dict()["state"], what="state after more steps")


def test_deepcopy_of_the_optimizer_steps_like_the_original():
    """copy.deepcopy of model and optimizer together (as some training frameworks do) gives an
    optimizer that keeps its name sets and state and steps exactly like the original."""
    import copy

    model, batch_fn, dims = models.build("llama_gqa")  # (nanogpt's batch_fn toggles the original)
    opt = make_opt("ours", model, dims)
    opt.wv_names = set()
    models.train(model, opt, batch_fn, RESUME_STEPS)
    model_copy, opt_copy = copy.deepcopy((model, opt))
    assert opt_copy.wv_names == set() and opt_copy.backend == opt.backend
    models.train(model, opt, batch_fn, RESUME_STEPS, start=RESUME_STEPS)
    models.train(model_copy, opt_copy, batch_fn, RESUME_STEPS, start=RESUME_STEPS)
    for (name, a), b in zip(model.named_parameters(), model_copy.parameters()):
        assert torch.equal(a, b), name
    assert opt.state_dict()["state"].keys() == opt_copy.state_dict()["state"].keys()


def test_second_moments_follow_the_blocks_when_only_the_storage_order_changes():
    """A square weight saved with one v per column (an HF Conv1D under ``for_model``) loads into
    an optimizer keeping one v per row (the name rules): the same (block_numel, num_blocks) runs,
    other blocks. Each element takes its column's v, each row the mean over its elements; and
    back, each column the mean of the rows' values."""
    from adam_mini_kernels.partition import BlockLayout, Section

    def optimizer(by_columns, seed):
        w = torch.nn.Parameter(torch.randn(4, 4, generator=torch.Generator().manual_seed(seed)))
        opt = AdamMini([("mlp.weight", w)], lr=1e-2, verbose=False, backend="torch")
        if by_columns:
            opt.layout_overrides["mlp.weight"] = BlockLayout(
                "mlp.weight", "neuron", (4, 4), (Section("neuron", 4, 4),), columns=True
            )
        return w, opt

    for saved_by_columns in (True, False):
        w, writer = optimizer(saved_by_columns, 0)
        scales = torch.tensor([1.0, 2.0, 3.0, 4.0])  # every block its own mean of g^2
        for step in range(2):
            grad = torch.randn(4, 4, generator=torch.Generator().manual_seed(10 + step))
            w.grad = grad * (scales if saved_by_columns else scales[:, None])
            writer.step()
        saved_v = writer.state[w]["vmean"].reshape(-1).clone()
        assert saved_v.unique().numel() == 4
        reader_w, reader = optimizer(not saved_by_columns, 1)
        reader.load_state_dict(roundtrip(writer.state_dict()))
        reader._prepare()  # builds the buffers from the loaded state, as the next step does
        torch.testing.assert_close(reader.state[reader_w]["vmean"].reshape(-1), saved_v.mean().expand(4), rtol=1e-6, atol=0)


def test_groups_keep_their_names_when_a_checkpoint_was_saved_under_others(caplog):
    """A checkpoint whose param groups carry other names (saved from a DDP-wrapped or compiled
    model: ``module.`` or ``_orig_mod.`` prefixes, or another naming altogether) loads by position,
    as in torch, and the groups keep this optimizer's names: the partition follows them (torch's
    loader would copy the saved names in, and the next step would re-partition by those)."""
    model, batch_fn, dims = models.build("llama_gqa")
    opt = make_opt("ours", model, dims)
    models.train(model, opt, batch_fn, RESUME_STEPS)
    saved = roundtrip(opt.state_dict())
    for i, group in enumerate(saved["param_groups"]):
        group["name"] = f"_orig_mod.p{i}"  # no name rule matches: every block would become whole
    copy_model, _, _ = models.build("llama_gqa")
    copy_model.load_state_dict(model.state_dict())
    resumed = AdamMini(copy_model.named_parameters(), **HPARAMS, verbose=True, backend="torch", **dims)
    with caplog.at_level("WARNING", logger="adam_mini_kernels"):
        resumed.load_state_dict(saved)
    assert "saved under other names" in caplog.text
    assert [g["name"] for g in resumed.param_groups] == [g["name"] for g in opt.param_groups]
    models.train(model, opt, batch_fn, RESUME_STEPS, start=RESUME_STEPS)
    models.train(copy_model, resumed, batch_fn, RESUME_STEPS, start=RESUME_STEPS)
    assert resumed.partition_summary() == opt.partition_summary()
    for (name, a), b in zip(model.named_parameters(), copy_model.parameters()):
        assert torch.equal(a, b), name


# -- int8 first moment through a float AdamMini --------------------------------------------------

@pytest.fixture
def small_int8(monkeypatch):
    """Quantize the m of these small models' matrices too (INT8_MIN_NUMEL is 4096)."""
    monkeypatch.setattr(quantization, "INT8_MIN_NUMEL", 64)

@pytest.mark.parametrize("name", ["llama_gqa", "nanogpt"])
def test_int8_checkpoint_saved_again_by_float_adammini_loads_into_official(name, small_int8):
    """An int8 checkpoint loaded into a float ``AdamMini`` and saved again before any step holds
    the dequantized ``m`` in official's layout (the state the next build makes), which official
    ``Adam_mini`` loads and continues as the float ``AdamMini`` does."""
    n = INTERCHANGE_STEPS
    model_w, batch_w, dims = build(name)
    opt_w = make_opt("ours", model_w, dims, state_dtype=torch.int8)
    models.train(model_w, opt_w, batch_w, n)
    checkpoint = roundtrip({"model": model_w.state_dict(), "optimizer": opt_w.state_dict()})
    assert any("m_codes" in s for s in checkpoint["optimizer"]["state"].values())

    model_f, batch_f, _ = build(name, seed=1)
    model_f.load_state_dict(checkpoint["model"])
    opt_f = make_opt("ours", model_f, dims)
    opt_f.load_state_dict(checkpoint["optimizer"])
    converted = roundtrip(opt_f.state_dict())
    assert not any("m_codes" in s or "m_scales" in s for s in converted["state"].values())
    opt_f._prepare()  # the build: what the next step starts from
    assert_states(converted["state"], opt_f.state_dict()["state"], what="saved before the build")

    model_o, batch_o, _ = build(name, seed=2)
    model_o.load_state_dict(checkpoint["model"])
    opt_o = make_opt("official", model_o, dims)
    opt_o.load_state_dict(converted)
    models.train(model_f, opt_f, batch_f, n, start=n)
    models.train(model_o, opt_o, batch_o, n, start=n)
    assert_params(model_o, model_f, rtol=RTOL)


@pytest.mark.parametrize("name", ["llama_gqa", "nanogpt"])
def test_float_checkpoint_saved_again_by_int8_adammini_holds_codes(name, small_int8):
    """The other way: a float checkpoint loaded into an int8 ``AdamMini`` and saved before any
    step holds the codes and scales the next build quantizes, bit for bit."""
    model_w, batch_w, dims = build(name)
    opt_w = make_opt("ours", model_w, dims)
    models.train(model_w, opt_w, batch_w, INTERCHANGE_STEPS)
    checkpoint = roundtrip(opt_w.state_dict())

    model_q, _, _ = build(name, seed=1)
    opt_q = make_opt("ours", model_q, dims, state_dtype=torch.int8)
    opt_q.load_state_dict(checkpoint)
    converted = roundtrip(opt_q.state_dict())
    assert any("m_codes" in s for s in converted["state"].values())
    opt_q._prepare()
    assert_states(converted["state"], opt_q.state_dict()["state"], what="saved before the build")


# -- torch's state dict hooks ------------------------------------------------------------------

def _trained(name="nanogpt", **overrides):
    model, batch_fn, dims = build(name)
    opt = make_opt("ours", model, dims, **overrides)
    models.train(model, opt, batch_fn, 2)
    return model, opt, dims


def test_state_dict_post_hook_sees_the_finished_state_dict_and_its_result_is_returned():
    """[Note: state dict hooks]: a post-hook sees int steps and the rounding seed (once it saw
    tensors, and no seed: torch's state_dict ran it before AdamMini finished), and what it
    returns (here re-keyed by parameter name, as some checkpointers do) is what state_dict()
    returns."""
    model, opt, _ = _trained(stochastic_rounding=False)
    names = [g["name"] for g in opt.param_groups]
    seen, pre_calls = [], []
    opt.register_state_dict_pre_hook(lambda o: pre_calls.append(o))

    def by_name(o, sd):
        seen.append({k: s["step"] for k, s in sd["state"].items()})
        return {**sd, "state": {names[k]: s for k, s in sd["state"].items()}}

    opt.register_state_dict_post_hook(by_name)
    sd = opt.state_dict()
    assert pre_calls == [opt]
    assert seen and all(type(step) is int for steps in seen for step in steps.values())
    assert set(sd["state"]) <= set(names) and sd["state"]


def test_load_state_dict_pre_hook_result_is_what_gets_loaded():
    """A load pre-hook's returned dict is loaded (once AdamMini parsed the caller's dict before
    torch ran the hooks): a checkpoint keyed by parameter name, mapped back to positions by the
    hook, loads, and the hook's changes to the moments are kept; post-hooks run after."""
    model, opt, dims = _trained()
    names = [g["name"] for g in opt.param_groups]
    sd = opt.state_dict()
    by_name = {**sd, "state": {names[k]: s for k, s in sd["state"].items()}}

    fresh_model, _, _ = build("nanogpt")
    fresh = make_opt("ours", fresh_model, dims)
    order = []

    def back_to_positions(o, loaded):
        order.append("pre")
        state = {names.index(k): {**s, **{key: torch.zeros_like(s[key]) for key in ("m",) if key in s}}
                 for k, s in loaded["state"].items()}
        return {**loaded, "state": state}

    fresh.register_load_state_dict_pre_hook(back_to_positions)
    fresh.register_load_state_dict_post_hook(lambda o: order.append("post"))
    fresh.load_state_dict(by_name)
    assert order == ["pre", "post"]
    loaded = fresh.state_dict()["state"]
    assert loaded.keys() == sd["state"].keys()
    for k, s in loaded.items():
        if "m" in s:
            assert not s["m"].any(), names[k]  # the hook's zeroed m, not the caller's
        assert torch.equal(s["vmean" if "vmean" in s else "v"], sd["state"][k]["vmean" if "vmean" in s else "v"])


def test_load_state_dict_with_another_parameter_count_says_so():
    """A checkpoint of a model with one parameter more: torch's message about the param group
    sizes (once a shape error about another parameter), and nothing changes."""
    model, opt, dims = _trained()
    sd = opt.state_dict()
    fresh = build("nanogpt")[0]
    kept = {g["name"] for g in opt.param_groups[1:]}
    smaller = [(n, p) for n, p in fresh.named_parameters() if n.lower() in kept]
    other = AdamMini(smaller, **HPARAMS, verbose=False, backend="torch", **dims)
    assert len(other.param_groups) == len(opt.param_groups) - 1
    with pytest.raises(ValueError, match="different number of parameter groups|doesn't match the size"):
        other.load_state_dict(sd)
    assert not other.state


def test_checkpoint_of_the_same_parameters_in_another_order_loads_by_name(caplog):
    """Param groups named as this optimizer's, in another order (the model now declares its
    parameters in another order): loaded by name, with a warning, so training continues as if
    uninterrupted; by position, q and k (same shape) would have swapped states."""
    model, batch_fn, dims = models.build("llama_gqa")
    opt = make_opt("ours", model, dims)
    models.train(model, opt, batch_fn, RESUME_STEPS)
    saved = roundtrip(opt.state_dict())
    copy_model, _, _ = models.build("llama_gqa")
    copy_model.load_state_dict(model.state_dict())
    reordered = list(reversed(list(copy_model.named_parameters())))
    resumed = AdamMini(reordered, **HPARAMS, verbose=False, backend="torch", **dims)
    with caplog.at_level("WARNING", logger="adam_mini_kernels"):
        resumed.load_state_dict(saved)
    assert "loaded by name" in caplog.text
    models.train(model, opt, batch_fn, RESUME_STEPS, start=RESUME_STEPS)
    models.train(copy_model, resumed, batch_fn, RESUME_STEPS, start=RESUME_STEPS)
    for (name, a), b in zip(model.named_parameters(), copy_model.parameters()):
        assert torch.equal(a, b), name
