"""Backend selection, the drop-in constructor, and logging."""

from __future__ import annotations

import importlib.util
import inspect
import logging

import pytest
import torch
import torch.nn as nn

import adam_mini_kernels
from adam_mini_kernels import AdamMini, BackendUnavailableError, available_backends
from adam_mini_kernels.dispatch import BACKENDS

ENV = "ADAM_MINI_BACKEND"
LOGGER = "adam_mini_kernels"


class _Net(nn.Module):
    """Names for every logged rule: embedding, heads, rows, output, Adam, whole."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(11, 8)
        self.q_proj = nn.Linear(8, 8, bias=False)
        self.k_proj = nn.Linear(8, 4, bias=False)
        self.mlp = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.lm_head = nn.Linear(8, 11, bias=False)

    def forward(self, x):
        h = self.wte(x)
        h = h + self.q_proj(h) * self.k_proj(h).repeat(1, 1, 2)
        return self.lm_head(self.norm(self.mlp(h))).logsumexp(-1).mean()


def _net():
    torch.manual_seed(0)
    return _Net()


def _step(model, opt, seed=0):
    gen = torch.Generator().manual_seed(seed)
    opt.zero_grad()
    model(torch.randint(0, 11, (2, 5), generator=gen)).backward()
    opt.step()


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)


# -- backends --------------------------------------------------------------------------------------


def test_available_backends_lists_torch(monkeypatch):
    names = available_backends()
    assert "torch" in names
    assert all(name in ("cuda", "triton", "torch") for name in names)
    assert len(set(names)) == len(names)
    # Plain CPU tensors: only the PyTorch backend (Triton needs CUDA or its interpreter).
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert available_backends([torch.device("cpu")]) == ["torch"]


def test_available_backends_under_the_triton_interpreter(monkeypatch):
    """With TRITON_INTERPRET=1, Triton may run on CPU tensors (CI); CUDA never does. Fastest
    first: triton before torch."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    names = available_backends([torch.device("cpu")])
    # Every backend that can run is listed, also one auto does not pick yet (AUTO_ORDER).
    assert names == (["triton", "torch"] if importlib.util.find_spec("triton") else ["torch"])


@pytest.mark.parametrize("interpreter", [False, True])
def test_fused_backends_refuse_parameters_on_cpu_beside_cuda(interpreter, monkeypatch):
    """Some parameters on a CUDA device and some on the CPU: neither fused backend runs, also
    not Triton's interpreter (it is for all-CPU parameters)."""
    if interpreter:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    mixed = [torch.device("cuda", 0), torch.device("cpu")]
    for name in ("cuda", "triton"):
        assert "some parameters are not on a CUDA device" in BACKENDS[name].why_not(mixed), name


def test_auto_on_cpu_resolves_to_torch_and_steps():
    model = _net()
    opt = AdamMini(model.named_parameters(), dim=8, n_heads=2, n_kv_heads=1, verbose=False)
    assert opt.backend == "torch"
    before = model.mlp.weight.detach().clone()
    _step(model, opt)
    assert not torch.equal(before, model.mlp.weight.detach())


def test_explicit_torch_backend():
    model = _net()
    opt = AdamMini(model.named_parameters(), dim=8, n_heads=2, n_kv_heads=1, verbose=False, backend="torch")
    assert opt.backend == "torch"


@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_gpu_backend_on_cpu_params_says_why(name, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # no interpreter: Triton needs CUDA too
    model = _net()
    with pytest.raises(BackendUnavailableError) as err:
        AdamMini(model.named_parameters(), dim=8, n_heads=2, n_kv_heads=1, verbose=False, backend=name)
    message = str(err.value)
    assert name in message
    assert "CUDA" in message  # the reason: these backends need CUDA tensors
    assert ("TRITON_INTERPRET=1" in message) == (name == "triton")  # the way to run Triton on the CPU
    assert isinstance(err.value, RuntimeError)


@pytest.mark.parametrize("name", ["TORCH", "cpu", "fused", "", "torch "])
def test_unknown_backend_name_is_a_value_error(name):
    model = _net()
    with pytest.raises(ValueError) as err:
        AdamMini(model.named_parameters(), dim=8, n_heads=2, n_kv_heads=1, verbose=False, backend=name)
    assert repr(name) in str(err.value)
    assert "torch" in str(err.value)  # lists the valid choices


def test_env_var_overrides_auto(monkeypatch):
    model = _net()
    monkeypatch.setenv(ENV, "torch")
    opt = AdamMini(model.named_parameters(), dim=8, n_heads=2, n_kv_heads=1, verbose=False)
    assert opt.backend == "torch"
    # A backend that cannot run here, asked for through the variable, is refused with the reason,
    # which shows the variable was read instead of auto's choice.
    monkeypatch.setenv(ENV, "cuda")
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        AdamMini(model.named_parameters(), dim=8, n_heads=2, n_kv_heads=1, verbose=False)


def test_env_var_selects_a_backend_auto_would_not_pick(monkeypatch):
    """Under Triton's interpreter, ``auto`` on CPU tensors is the PyTorch backend; the variable
    turns Triton on without touching the code."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if "triton" not in available_backends([torch.device("cpu")]):
        pytest.skip("triton is not importable here")
    model = _net()
    auto = AdamMini(model.named_parameters(), dim=8, n_heads=2, n_kv_heads=1, verbose=False)
    monkeypatch.setenv(ENV, "triton")
    chosen = AdamMini(model.named_parameters(), dim=8, n_heads=2, n_kv_heads=1, verbose=False)
    assert chosen.backend == "triton"
    assert auto.backend in available_backends([torch.device("cpu")])
    explicit = AdamMini(model.named_parameters(), dim=8, n_heads=2, n_kv_heads=1, verbose=False, backend="torch")
    assert explicit.backend == "torch"


def _preferred_auto(monkeypatch, without_extension=False):
    """``auto`` as it will be once the fused backends are verified on a GPU (every backend, fastest
    first); optionally with the CUDA extension missing."""
    import dataclasses

    from adam_mini_kernels import dispatch

    monkeypatch.setattr(dispatch, "AUTO_ORDER", dispatch.PREFERENCE)
    if without_extension:
        missing = dataclasses.replace(dispatch.BACKENDS["cuda"], module="._C_not_built")
        monkeypatch.setitem(dispatch.BACKENDS, "cuda", missing)
    return dispatch


def test_preferred_auto_moves_on_when_the_extension_is_missing(monkeypatch):
    dispatch = _preferred_auto(monkeypatch, without_extension=True)
    cuda = [torch.device("cuda", 0)]
    triton = dispatch.BACKENDS["triton"].why_not(cuda) is None  # importable here (no GPU needed to check)
    assert dispatch.resolve_backend("auto", cuda) == ("triton" if triton else "torch")
    with pytest.raises(BackendUnavailableError, match="not built"):
        dispatch.resolve_backend("cuda", cuda)


def test_preferred_auto_never_picks_the_triton_interpreter(monkeypatch):
    """TRITON_INTERPRET=1 runs Triton on CPU tensors for tests; ``auto`` on CPU parameters stays
    the PyTorch backend (by name, the interpreter still runs)."""
    dispatch = _preferred_auto(monkeypatch)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = _net()
    assert AdamMini(model.named_parameters(), dim=8, n_heads=2, n_kv_heads=1, verbose=False).backend == "torch"
    if "triton" in available_backends([torch.device("cpu")]):
        assert dispatch.resolve_backend("triton", [torch.device("cpu")]) == "triton"


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_fused_backends_refuse_float64_parameters(name, monkeypatch):
    """Their kernels store fp32/bf16/fp16: float64 parameters are refused by name (Triton computed
    them in float32, silently), and ``auto`` takes the PyTorch backend for them."""
    dispatch = _preferred_auto(monkeypatch)
    cuda = [torch.device("cuda", 0)]
    with pytest.raises(BackendUnavailableError, match="not torch.float64"):
        dispatch.resolve_backend(name, cuda, [torch.float32, torch.float64])
    assert dispatch.resolve_backend("auto", cuda, [torch.float64]) == "torch"
    assert dispatch.BACKENDS[name].dtype_reason([torch.float32, torch.bfloat16, torch.float16]) is None


def test_parameters_cast_to_an_unsupported_dtype_after_construction_are_refused():
    """A fused backend built on float32 parameters, then ``model.double()``: the next step says
    so before changing anything (the torch backend rebuilds in float64: test_capturable.py)."""
    if "triton" not in available_backends([torch.device("cpu")]):  # the kernels' mode is set when they are defined
        pytest.skip("Triton steps CPU tensors only with TRITON_INTERPRET=1 from the start (conftest sets it without a GPU)")
    model = _net()
    opt = AdamMini(model.named_parameters(), dim=8, n_heads=2, n_kv_heads=1, verbose=False, backend="triton")
    _step(model, opt)
    model.double()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="backend 'triton' cannot step these parameters.*float64"):
        _step(model, opt, seed=1)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_env_var_does_not_override_an_explicit_backend(monkeypatch):
    model = _net()
    monkeypatch.setenv(ENV, "cuda")
    opt = AdamMini(model.named_parameters(), dim=8, n_heads=2, n_kv_heads=1, verbose=False, backend="torch")
    assert opt.backend == "torch"


def test_empty_env_var_means_auto(monkeypatch):
    monkeypatch.setenv(ENV, "")
    model = _net()
    opt = AdamMini(model.named_parameters(), dim=8, n_heads=2, n_kv_heads=1, verbose=False)
    assert opt.backend == "torch"


@pytest.mark.parametrize("value", ["gpu", "Torch", "tritonn"])
def test_invalid_env_var_names_the_variable(monkeypatch, value):
    monkeypatch.setenv(ENV, value)
    model = _net()
    with pytest.raises(ValueError) as err:
        AdamMini(model.named_parameters(), dim=8, n_heads=2, n_kv_heads=1, verbose=False)
    assert ENV in str(err.value)
    assert repr(value) in str(err.value)


# -- drop-in constructor ---------------------------------------------------------------------------


def test_adam_mini_is_an_alias():
    assert adam_mini_kernels.Adam_mini is adam_mini_kernels.AdamMini
    assert issubclass(AdamMini, torch.optim.Optimizer)


def test_constructor_takes_official_positional_and_keyword_arguments():
    model = _net()
    opt = AdamMini(
        model.named_parameters(), 3e-3, (0.8, 0.95), 1e-6, 0.05,
        model_sharding=False, dim=8, n_heads=2, n_kv_heads=1, verbose=False,
    )
    group = next(g for g in opt.param_groups if g["name"] == "mlp.weight")
    assert (group["lr"], group["beta1"], group["beta2"], group["eps"], group["weight_decay"]) == (3e-3, 0.8, 0.95, 1e-6, 0.05)
    norm = next(g for g in opt.param_groups if g["name"] == "norm.weight")
    assert norm["weight_decay"] == 0.0
    before = model.q_proj.weight.detach().clone()
    _step(model, opt)
    assert not torch.equal(before, model.q_proj.weight.detach())


def test_constructor_keywords_by_name_as_official_readme():
    model = _net()
    opt = AdamMini(
        named_parameters=model.named_parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0,
        model_sharding=True, dim=8, n_heads=2, n_kv_heads=1, verbose=False,
    )
    assert len(opt.param_groups) == len(list(model.parameters()))


def test_signature_covers_official():
    adam_mini = pytest.importorskip("adam_mini")
    official = inspect.signature(adam_mini.Adam_mini.__init__).parameters
    ours = inspect.signature(AdamMini.__init__).parameters
    for name, param in official.items():
        assert name in ours, f"official argument {name!r} missing"
        assert ours[name].kind == param.kind, name
        assert ours[name].default == param.default, name
    positional = [n for n, p in official.items() if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert [n for n, p in ours.items() if p.kind == p.POSITIONAL_OR_KEYWORD] == positional
    # Our additions are keyword-only.
    for name in set(ours) - set(official):
        assert ours[name].kind == inspect.Parameter.KEYWORD_ONLY, name


# -- logging ---------------------------------------------------------------------------------------


def test_verbose_logs_partition_once_and_prints_nothing(caplog, capsys):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    model = _net()
    opt = AdamMini(model.named_parameters(), dim=8, n_heads=2, n_kv_heads=1, verbose=True, model_sharding=True)
    _step(model, opt, seed=1)
    info = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.INFO]
    assert len(info) >= 1
    text = "\n".join(r.getMessage() for r in info)
    assert "torch" in text  # the backend in use
    for rule in {row["rule"] for row in opt.partition_summary()}:
        assert rule in text, f"rule {rule!r} not in the logged partition {text!r}"
    count = len(caplog.records)
    _step(model, opt, seed=2)
    _step(model, opt, seed=3)
    assert len(caplog.records) == count, "the partition is logged once, not every step"
    opt.load_state_dict(opt.state_dict())  # the next step rebuilds the buffers, same partition
    _step(model, opt, seed=4)
    assert len(caplog.records) == count, "a rebuild that keeps the partition does not log it again"
    opt.mlp_names = set()  # a new partition: logged
    _step(model, opt, seed=5)
    assert len([r for r in caplog.records if r.levelno == logging.INFO]) == len(info) + 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ""


def test_verbose_false_logs_nothing_at_info(caplog, capsys):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    model = _net()
    opt = AdamMini(model.named_parameters(), dim=8, n_heads=2, n_kv_heads=1, verbose=False, model_sharding=True)
    for seed in range(3):
        _step(model, opt, seed)
    assert [r for r in caplog.records if r.name.startswith(LOGGER) and r.levelno >= logging.INFO] == []
    assert capsys.readouterr().out == ""


def test_verbose_warns_through_logging_when_a_name_set_matches_nothing(caplog, capsys):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = AdamMini(model.named_parameters(), verbose=True)
    opt.zero_grad()
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    # One warning per name set that matched nothing, each with an example fit for that set.
    examples = {"embd_names": "embd_names.add('tok_emb')", "output_names": "output_names.add('head')",
                "wqk_names": "wqk_names.update({'q_lin', 'k_lin'})"}
    for attr, example in examples.items():
        (message,) = [m for m in warnings if f"optimizer.{attr} " in m]
        assert example in message and "AdamMini.for_model(model)" in message, message
    assert capsys.readouterr().out == ""
