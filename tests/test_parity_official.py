"""``AdamMini(backend="torch")`` against the official ``adam_mini.Adam_mini`` 1.1.1 (the oracle,
a test-only dependency), on every model tree official handles (``models.OFFICIAL_SAFE``), in
float32: parameters, per-parameter state (keys, shapes, dtypes, values) and step counters.

Two ways of running the pair, both on two identical copies of the model (built twice from the
same seed rather than deep-copied, because ``nanogpt``'s batch function toggles its ``gate`` on
the model object it built; the copies are checked to start bitwise equal):

* lockstep: ``models.train`` computes the gradients on official's model and ``_Lockstep.step``
  hands the same gradients (None where None) to ours. Only the optimizers' arithmetic differs, so
  every element of every parameter and state tensor is held to 1e-5 relative error.
* free running: each model computes its own gradients, as two users switching the import would.
  Differences of one float32 ulp then feed back through the gradients. Parameters stay within
  1e-5. The state tensors are gradient statistics, and the gradients now differ because the
  parameters do (by up to ~4e-6), amplified by the model: measured up to 1.2e-5 on GPT-2's
  ``ln_1.bias`` first moment, so in free running state is held to ``FREE_STATE_RTOL`` = 3e-5
  (the lockstep test holds it to 1e-5). Elements whose loss gradient is
  zero in exact arithmetic get a gradient of pure rounding noise (~1e-9, below ``eps``), which
  Adam turns into steps of random size; those elements (``NOISE_ONLY``: a conv bias followed by
  BatchNorm, GPT-2's key bias under softmax) are excluded, named here, and the test checks that
  their gradients really are noise. The lockstep test covers them.

Relative error of a tensor is ``max|ours - official| / max|official|``.
"""

from __future__ import annotations

import collections
import math

import pytest
import torch

import models
from adam_mini_kernels import AdamMini

Adam_mini = pytest.importorskip("adam_mini").Adam_mini  # the official oracle (required in CI)

STEPS = 10
RTOL = 1e-5
FREE_STATE_RTOL = 3e-5  # free running only; see the module docstring
HPARAMS = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
DROPOUT_SEED = 1234


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

# Free running only: model -> {parameter name: elements excluded (None: all)}. Their loss gradient
# is zero in exact arithmetic; see the module docstring.
NOISE_ONLY = {
    # BatchNorm (training mode) subtracts the per-channel batch mean right after conv1.
    "cnn": {"conv1.bias": None},
    # c_attn.bias is [query | key | value] biases of 32 each; a key bias adds q.b_k to every
    # attention logit of a query row, which softmax ignores.
    "gpt2_tied": {f"lm.transformer.h.{i}.attn.c_attn.bias": slice(32, 64) for i in range(2)},
}


# -- helpers ---------------------------------------------------------------------------------

def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual - expected| / max|expected| in float64 (0 for empty tensors; an all-zero
    ``expected`` needs an all-zero ``actual``)."""
    if expected.numel() == 0:
        return 0.0
    a, e = actual.detach().double(), expected.detach().double()
    err = (a - e).abs().max().item()
    scale = e.abs().max().item()
    if scale == 0.0:
        return math.inf if err else 0.0
    return err / scale


def _keep(t: torch.Tensor, excluded) -> torch.Tensor:
    """The elements of ``t`` (param-shaped) outside the excluded slice of its first dim."""
    if excluded is None:
        return t.new_zeros(0)
    mask = torch.ones(t.shape[0], dtype=torch.bool)
    mask[excluded] = False
    return t[mask]


def make_pair(name: str, weight_decay: float, seed: int = 0):
    """Two identical copies of model ``name``: the first stepped by official, the second by
    ours. Returns ``(model_off, model_ours, batch_fn_off, batch_fn_ours, official, ours)``."""
    model_off, batch_off, dims = models.build(name, seed=seed)
    model_ours, batch_ours, _ = models.build(name, seed=seed)
    for (n, a), b in zip(model_off.state_dict().items(), model_ours.state_dict().values()):
        assert torch.equal(a, b), f"the two copies differ at {n}"
    official = Adam_mini(model_off.named_parameters(), **HPARAMS, weight_decay=weight_decay, verbose=False, **dims)
    ours = AdamMini(model_ours.named_parameters(), **HPARAMS, weight_decay=weight_decay, verbose=False, backend="torch", **dims)
    assert ours.backend == "torch"
    return model_off, model_ours, batch_off, batch_ours, official, ours


class _Lockstep:
    """An optimizer-like pair for ``models.train``: the gradients computed on ``model_off`` are
    copied onto ``model_ours`` (None stays None), then both optimizers step."""

    def __init__(self, model_off, model_ours, official, ours):
        self.pairs = list(zip(model_off.parameters(), model_ours.parameters()))
        self.official, self.ours = official, ours

    def zero_grad(self):
        self.official.zero_grad()
        self.ours.zero_grad()

    def step(self):
        for p_off, p_ours in self.pairs:
            p_ours.grad = None if p_off.grad is None else p_off.grad.detach().clone()
        self.official.step()
        self.ours.step()


def train_lockstep(model_off, model_ours, batch_off, official, ours, steps=STEPS, start=0):
    models.train(model_off, _Lockstep(model_off, model_ours, official, ours), batch_off, steps, start=start)


def train_free(model, opt, batch_fn, steps=STEPS, start=0):
    """``models.train`` with the global RNG (GPT-2's dropout) seeded the same for every run."""
    with torch.random.fork_rng():
        torch.manual_seed(DROPOUT_SEED + start)
        models.train(model, opt, batch_fn, steps, start=start)


def assert_params_match(model_off, model_ours, rtol=RTOL, excluded=None):
    excluded = excluded or {}
    for (name, a), b in zip(model_off.named_parameters(), model_ours.parameters()):
        if name in excluded:
            a, b = _keep(a, excluded[name]), _keep(b, excluded[name])
        err = rel_err(b, a)
        assert err <= rtol, f"parameter {name}: relative error {err:.3g} > {rtol}"


def _is_never_stepped(state) -> bool:
    return state["step"] == 0 and all(not torch.is_tensor(v) or not v.any() for v in state.values())


def assert_state_match(official, ours, rtol=RTOL, excluded=None, only_ours=()):
    """Entry by entry over ``state_dict()["state"]``: same parameters, keys, shapes, dtypes and
    metadata, equal step counts, values within ``rtol``.

    ``only_ours`` names the parameters that may have state in ours but not in official: official
    creates state for a query/key, row or Adam block only once it has a gradient, while ours lays
    out state for every parameter when it builds its flat buffers; such an entry must be a
    never-stepped one (step 0, all zeros), which is exactly what official would create. (For
    whole-tensor blocks official also creates that zero state without a gradient.) Official's
    state dict holds an empty entry for such a parameter (``self.state[p]`` is a defaultdict
    looked up before the grad-is-None check); an empty entry counts as no state."""
    excluded = excluded or {}
    names = [g["name"] for g in official.param_groups]
    assert names == [g["name"] for g in ours.param_groups]
    st_off, st_ours = official.state_dict()["state"], ours.state_dict()["state"]
    st_off = {idx: s for idx, s in st_off.items() if s}
    missing = sorted(names[i] for i in set(st_off) - set(st_ours))
    assert not missing, f"official has state that ours lacks: {missing}"
    extra = {names[i] for i in set(st_ours) - set(st_off)}
    assert extra == set(only_ours), f"state only in ours: {sorted(extra)}, expected {sorted(only_ours)}"
    for idx in set(st_ours) - set(st_off):
        assert _is_never_stepped(st_ours[idx]), f"{names[idx]}: state only in ours but not a zero state"
    for idx, s_off in st_off.items():
        s_ours, name = st_ours[idx], names[idx]
        assert set(s_ours) == set(s_off), f"{name}: state keys {sorted(s_ours)}, official {sorted(s_off)}"
        assert type(s_ours["step"]) is int and type(s_off["step"]) is int, f"{name}: step is not an int"
        for key, value in s_off.items():
            mine = s_ours[key]
            if not torch.is_tensor(value):
                assert not torch.is_tensor(mine) and mine == value, f"{name} {key}: {mine!r}, official {value!r}"
                continue
            assert torch.is_tensor(mine), f"{name} {key}: not a tensor in ours"
            assert mine.shape == value.shape, f"{name} {key}: shape {tuple(mine.shape)}, official {tuple(value.shape)}"
            assert mine.dtype == value.dtype, f"{name} {key}: dtype {mine.dtype}, official {value.dtype}"
            if name in excluded:
                assert mine.shape == official.param_groups[idx]["params"][0].shape, "exclusion needs param-shaped state"
                mine, value = _keep(mine, excluded[name]), _keep(value, excluded[name])
            err = rel_err(mine, value)
            assert err <= rtol, f"{name} {key}: relative error {err:.3g} > {rtol}"


def assert_trained(model, name, seed=0):
    """Every parameter that requires a gradient (and has elements) moved from its initial value."""
    initial, _, _ = models.build(name, seed=seed)
    for (n, p0), p in zip(initial.named_parameters(), model.parameters()):
        if p.requires_grad and p.numel():
            assert not torch.equal(p0, p), f"{n} never moved: the comparison would prove nothing"


def _steps(opt):
    return {opt.param_groups[i]["name"]: s["step"] for i, s in opt.state_dict()["state"].items()}


# -- parity ----------------------------------------------------------------------------------

@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("name", models.OFFICIAL_SAFE)
def test_lockstep_parity(name, weight_decay):
    model_off, model_ours, batch_off, _, official, ours = make_pair(name, weight_decay)
    train_lockstep(model_off, model_ours, batch_off, official, ours)

    assert_trained(model_ours, name)
    assert_params_match(model_off, model_ours)
    assert_state_match(official, ours)
    steps = _steps(ours)
    assert steps == _steps(official)
    expected = {n: STEPS // 2 if n == "gate" else STEPS for n in steps}  # nanogpt's gate: even steps only
    assert steps == expected


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("name", models.OFFICIAL_SAFE)
def test_free_running_parity(name, weight_decay):
    model_off, model_ours, batch_off, batch_ours, official, ours = make_pair(name, weight_decay)
    train_free(model_off, official, batch_off)
    train_free(model_ours, ours, batch_ours)

    excluded = NOISE_ONLY.get(name, {})
    assert_trained(model_ours, name)
    assert_params_match(model_off, model_ours, excluded=excluded)
    assert_state_match(official, ours, rtol=FREE_STATE_RTOL, excluded=excluded)
    assert _steps(ours) == _steps(official)

    # The excluded elements are there because their gradient is rounding noise: check that it is
    # (last step's gradients, official's model), against the largest gradient of the model.
    params = dict(model_off.named_parameters())
    largest = max(p.grad.abs().max().item() for p in params.values() if p.grad is not None and p.grad.numel())
    for pname, part in excluded.items():
        grad = params[pname].grad
        noise = (grad if part is None else grad[part]).abs().max().item()
        assert noise <= 1e-5 * largest, f"{pname}: gradient {noise:.3g} is not noise (largest {largest:.3g})"


# -- name sets edited after construction -------------------------------------------------------

@pytest.mark.parametrize("name, value_names", [("llama_gqa", ["v_proj"]), ("nanogpt", ["wv.weight"])])
def test_wv_names_emptied_after_construction(name, value_names):
    """The official README's ``optimizer.wv_names = {}``: one v for the whole value matrix."""
    model_off, model_ours, batch_off, _, official, ours = make_pair(name, 0.1)
    before = {s["name"]: s["rule"] for s in ours.partition_summary()}
    official.wv_names = {}
    ours.wv_names = {}
    after = {s["name"]: s for s in ours.partition_summary()}
    values = [n for n in after if any(k in n for k in value_names)]
    assert len(values) == 2 and all(before[n] == "wv" for n in values)
    assert all(after[n]["rule"] == "whole" and after[n]["num_blocks"] == 1 for n in values)

    train_lockstep(model_off, model_ours, batch_off, official, ours)

    assert_params_match(model_off, model_ours)
    assert_state_match(official, ours)
    names = [g["name"] for g in official.param_groups]
    st = official.state_dict()["state"]
    for n in values:  # official really used the whole-tensor layout
        assert "block_numel" in st[names.index(n)] and st[names.index(n)]["vmean"].dim() == 0


@pytest.mark.parametrize(
    "name, attr, key, param, rule",
    [
        # GPT-2's position embedding: no default key matches it, so official treats it as one
        # block unless the user adds it.
        ("gpt2_tied", "embd_names", "wpe", "lm.transformer.wpe.weight", "embd"),
        ("llama_gqa", "adam_block_names", "norm", "lm.model.norm.weight", "adam"),
    ],
)
def test_name_added_after_construction(name, attr, key, param, rule):
    model_off, model_ours, batch_off, _, official, ours = make_pair(name, 0.1)
    assert {s["name"]: s["rule"] for s in ours.partition_summary()}[param] == "whole"
    getattr(official, attr).add(key)
    getattr(ours, attr).add(key)
    assert {s["name"]: s["rule"] for s in ours.partition_summary()}[param] == rule

    train_lockstep(model_off, model_ours, batch_off, official, ours)

    assert_params_match(model_off, model_ours)
    assert_state_match(official, ours)
    state = official.state_dict()["state"][[g["name"] for g in official.param_groups].index(param)]
    assert ("neuron_per_gpu" if rule == "embd" else "v") in state  # official took the key too


# -- state of parameters without a gradient ----------------------------------------------------

@pytest.mark.parametrize("gate_rule", ["whole", "adam"])
def test_state_of_param_without_grad_at_first_step(gate_rule):
    """nanogpt's ``gate`` has no gradient on odd steps; start at step 1 so its first step has
    none. As a whole-tensor block (default) official creates a zero state for it anyway; as an
    Adam block it creates none, while ours holds a zero state (step 0) for it: the documented
    difference, allowed by name and checked to be all zeros. Both agree once it has stepped."""
    model_off, model_ours, batch_off, _, official, ours = make_pair("nanogpt", 0.1)
    if gate_rule == "adam":
        official.adam_block_names.add("gate")
        ours.adam_block_names.add("gate")
    gate = model_ours.gate.detach().clone()

    train_lockstep(model_off, model_ours, batch_off, official, ours, steps=1, start=1)
    assert torch.equal(model_ours.gate, gate) and torch.equal(model_off.gate, gate)
    assert _steps(ours)["gate"] == 0
    assert_params_match(model_off, model_ours)
    assert_state_match(official, ours, only_ours=["gate"] if gate_rule == "adam" else ())

    train_lockstep(model_off, model_ours, batch_off, official, ours, steps=4, start=2)
    assert _steps(ours)["gate"] == _steps(official)["gate"] == 2
    assert_params_match(model_off, model_ours)
    assert_state_match(official, ours)


# -- number of second-moment values --------------------------------------------------------------

def _official_num_v(state) -> int:
    return (state["v"] if "v" in state else state["vmean"]).numel()


_KIND = {"adam": "v", "wqk": "head_per_gpu", "embd": "neuron_per_gpu", "output": "neuron_per_gpu",
         "wv": "neuron_per_gpu", "attn_proj": "neuron_per_gpu", "mlp": "neuron_per_gpu", "whole": "block_numel"}


@pytest.mark.parametrize(
    "name, rules",
    [
        ("llama_gqa", {"wqk", "embd", "output", "wv", "attn_proj", "mlp", "whole"}),
        ("gpt2_tied", {"adam", "embd", "mlp", "whole"}),
    ],
)
def test_num_v_values_per_rule_match_official(name, rules):
    model_off, _, batch_off, _, official, ours = make_pair(name, 0.0)
    train_free(model_off, official, batch_off, steps=1)
    st = official.state_dict()["state"]
    summary = ours.partition_summary()
    assert len(summary) == len(official.param_groups) == len(st)

    per_rule = {}
    for idx, layout in enumerate(summary):
        assert layout["name"] == official.param_groups[idx]["name"]
        assert _KIND[layout["rule"]] in st[idx], f"{layout['name']}: ours says {layout['rule']}, official's state {sorted(st[idx])}"
        ours_n, off_n = per_rule.setdefault(layout["rule"], ([], []))
        ours_n.append((layout["name"], layout["num_blocks"]))
        off_n.append((layout["name"], _official_num_v(st[idx])))
    assert set(per_rule) == rules
    for rule, (ours_n, off_n) in per_rule.items():
        assert ours_n == off_n, f"rule {rule}: ours {ours_n}, official {off_n}"
    if name == "llama_gqa":  # GQA: k_proj (16, 32) holds 2 head blocks of 32*32/4, q_proj 4
        counts = dict(per_rule["wqk"][0])
        assert counts["lm.model.layers.0.self_attn.k_proj.weight"] == 2
        assert counts["lm.model.layers.0.self_attn.q_proj.weight"] == 4


def test_lr_scheduler_and_per_group_edits_match_official():
    """LR schedulers and code that edits ``group["lr"]``/``group["weight_decay"]`` work unchanged,
    per group: a warm-up LambdaLR on both, plus per-group edits between steps."""
    model_off, model_ours, batch_off, _, official, ours = make_pair("llama_gqa", 0.1)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4)) for opt in (official, ours)]
    pair = _Lockstep(model_off, model_ours, official, ours)
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(100 + step)
        pair.zero_grad()
        model_off(batch_off(step, gen)).backward()
        if step == 3:
            for opt, scheduler in zip((official, ours), schedulers):
                opt.param_groups[1]["lr"] *= 0.25
                scheduler.base_lrs[1] *= 0.25  # LambdaLR recomputes lr from its base at each step
                opt.param_groups[2]["weight_decay"] = 0.5
                opt.param_groups[3]["beta1"] = 0.8
        pair.step()
        for scheduler in schedulers:
            scheduler.step()
    assert [g["lr"] for g in ours.param_groups] == [g["lr"] for g in official.param_groups]
    assert len({g["lr"] for g in ours.param_groups}) > 1
    assert_params_match(model_off, model_ours)
    assert_state_match(official, ours)


def _clear(opt, model):
    opt.state.clear()


def _new_state(opt, model):
    opt.state = collections.defaultdict(dict)


def _del_entry(opt, model):
    del opt.state[model.get_parameter(EDITED)]


def _zero_m(opt, model):
    entry = opt.state[model.get_parameter(EDITED)]
    entry["m"] = torch.zeros_like(entry["m"])


def _swap_param(opt, model):
    """A new Parameter put in the module and in its param group, the old one's state moved to it."""
    module_name, _, attr = EDITED.rpartition(".")
    old = model.get_parameter(EDITED)
    new = torch.nn.Parameter(old.detach() + 0.01)
    setattr(model.get_submodule(module_name), attr, new)
    group = next(g for g in opt.param_groups if g["params"][0] is old)
    group["params"] = [new]
    opt.state[new] = opt.state.pop(old)


EDITED = "lm.model.layers.0.self_attn.k_proj.weight"


@pytest.mark.parametrize("edit", [_clear, _new_state, _del_entry, _zero_m, _swap_param], ids=lambda f: f.__name__[1:])
def test_state_and_param_group_edits_between_steps_match_official(edit):
    """torch's optimizers read ``opt.state`` and ``param_groups`` afresh each step: a reset or
    replaced state entry, or a new parameter in a param group, takes effect at the next step
    (the flat buffers held the old ones: [Note: edited state] in optimizer.py), and every later
    ``state_dict()`` holds the live state."""
    model_off, model_ours, batch_off, _, official, ours = make_pair("llama_gqa", 0.1)
    assert EDITED in dict(model_ours.named_parameters())
    train_lockstep(model_off, model_ours, batch_off, official, ours, steps=3)
    edit(official, model_off)
    edit(ours, model_ours)
    train_lockstep(model_off, model_ours, batch_off, official, ours, steps=3, start=3)
    assert_params_match(model_off, model_ours)
    assert_state_match(official, ours)
    steps = {_clear: {3}, _new_state: {3}, _del_entry: {3, 6}}.get(edit, {6})  # counted since the reset
    assert {s["step"] for s in ours.state_dict()["state"].values()} == steps
