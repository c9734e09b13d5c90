"""The torch backend's step traces as one graph: ``torch.compile(fullgraph=True)`` of it runs
with no graph break and gives the eager result (to float32 rounding: inductor fuses the ops),
with every parameter active and with idle parameters."""

import contextlib

import pytest
import torch

from adam_mini_kernels import AdamMini
from adam_mini_kernels.dispatch import BackendStep
from adam_mini_kernels.torch_backend import torch_sums, torch_update
from grad_stream import clone_named, max_rel_err, run_stream


def _named():
    gen = torch.Generator().manual_seed(3)
    shapes = {"wte.weight": (10, 8), "layers.0.wq.weight": (8, 8), "mlp.weight": (6, 8), "ln.weight": (8,), "x.bias": (5,), "odd": (3, 3)}
    return [(n, torch.nn.Parameter(torch.randn(s, generator=gen))) for n, s in shapes.items()]


def test_torch_step_compiles_fullgraph_and_matches_eager():
    named = _named()
    eager_params, compiled_params = clone_named(named), clone_named(named)
    kw = dict(lr=1e-2, weight_decay=0.1, verbose=False, dim=8, n_heads=2, backend="torch")
    eager, compiled = AdamMini(eager_params, **kw), AdamMini(compiled_params, **kw)
    compiled._step_fn = BackendStep(torch.compile(torch_sums, fullgraph=True), torch.compile(torch_update, fullgraph=True))
    sets = [[p for _, p in eager_params], [p for _, p in compiled_params]]
    run_stream(sets, [eager, compiled], steps=4, seed=8, none_every=3)
    for a, b in zip(*sets):
        assert max_rel_err(a, b) <= 1e-6
    assert torch.equal(eager._flat[0].steps, compiled._flat[0].steps)
    assert max_rel_err(eager._flat[0].v, compiled._flat[0].v) <= 1e-6


# -- opt.step() inside torch.compile(fullgraph=True) ------------------------------------------------
# [Note: compiled steps] in optimizer.py / buffers.inspect_traced: the buffers are built by an
# eager step, after which a compiled function calling opt.step() traces with no graph break, on
# the torch backend (tensor ops) and the Triton backend (its kernels as torch.library operators;
# on a CPU under the interpreter).

BACKENDS = ["torch"] + (["triton"] if "triton" in __import__("adam_mini_kernels").available_backends([torch.device("cpu")]) else [])


class _TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = torch.nn.Embedding(11, 8)
        self.wq = torch.nn.Linear(8, 8, bias=False)
        self.mlp = torch.nn.Linear(8, 8)
        self.ln = torch.nn.LayerNorm(8)

    def forward(self, x):
        h = self.wte(x)
        return self.ln(self.mlp(torch.relu(self.wq(h)))).pow(2).mean()


def _pair(backend, **kwargs):
    torch.manual_seed(0)
    a = _TinyModel()
    b = _TinyModel()
    b.load_state_dict(a.state_dict())
    kw = dict(lr=1e-2, weight_decay=0.1, verbose=False, dim=8, n_heads=2, backend=backend, **kwargs)
    return (a, AdamMini(a.named_parameters(), **kw)), (b, AdamMini(b.named_parameters(), **kw))


def _assert_params_match(eager_model, compiled_model, tol=1e-6):
    for (n, a), (_, b) in zip(eager_model.named_parameters(), compiled_model.named_parameters()):
        assert max_rel_err(a, b) <= tol, n


def _set_tensor_lr(opts, value):
    """Every group of each optimizer takes one new tensor lr (per optimizer)."""
    for opt in opts:
        lr = torch.tensor(value)
        for group in opt.param_groups:
            group["lr"] = lr


def _train_both(eager, compiled_pair, compiled, steps, lr_values=None, seed=1):
    """The same steps (same data, same lrs) for the eager (model, opt) pair with ``opt.step`` and
    for the other pair with the compiled step."""
    (em, eo), (cm, co) = eager, compiled_pair
    _train(em, eo, eo.step, steps, False, lr_values, seed)
    _train(cm, co, compiled, steps, False, lr_values, seed)


def _compile_after_an_eager_step(eager, compiled_pair):
    """One eager step for both pairs (it builds the buffers), then the second pair's compiled step."""
    _train_both(eager, compiled_pair, compiled_pair[1].step, 1)
    return torch.compile(lambda: compiled_pair[1].step(), fullgraph=True)


def _train(model, opt, step_fn, steps, set_to_none, lr_values=None, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for i in range(steps):
        if lr_values is not None:  # in place for a tensor lr, as LR schedulers do
            for group in opt.param_groups:
                if isinstance(group["lr"], torch.Tensor):
                    group["lr"].fill_(lr_values[i])
                else:
                    group["lr"] = lr_values[i]
        x = torch.randint(0, 11, (4, 5), generator=gen)
        model(x).backward()
        step_fn()
        opt.zero_grad(set_to_none=set_to_none)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("set_to_none", [False, True])
def test_compiled_opt_step_fullgraph_matches_eager(backend, set_to_none):
    """fullgraph=True: a graph break inside opt.step() would raise. set_to_none=True makes every
    step re-point the fresh gradients (the repair path, traced too)."""
    torch._dynamo.reset()
    (em, eo), (cm, co) = _pair(backend)
    _train(em, eo, eo.step, 1, set_to_none)
    _train(cm, co, co.step, 1, set_to_none)  # the eager step that builds the buffers
    compiled = torch.compile(lambda: co.step(), fullgraph=True)
    _train(em, eo, eo.step, 4, set_to_none)
    _train(cm, co, compiled, 4, set_to_none)
    _assert_params_match(em, cm)
    assert torch.equal(eo._flat[0].steps, co._flat[0].steps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_clipped_step_leaves_each_steps_grad_norm(backend):
    """max_grad_norm under fullgraph=True: the clipped parameters and ``last_grad_norm`` of every
    step equal eager's (the norm was once left at the last eager step's value: dynamo drops
    attribute writes on an Optimizer inside a trace, see [Note: compiled steps])."""
    torch._dynamo.reset()
    eager, pair = _pair(backend, max_grad_norm=0.05)
    (em, eo), (cm, co) = eager, pair
    compiled = _compile_after_an_eager_step(eager, pair)
    gen = torch.Generator().manual_seed(5)
    norms = []
    for _ in range(3):
        x = torch.randint(0, 11, (4, 5), generator=gen)
        em(x).backward()
        cm(x).backward()
        eo.step()
        compiled()
        assert eo.last_grad_norm > 0.05  # the clip is active
        assert max_rel_err(eo.last_grad_norm, co.last_grad_norm) <= 1e-6
        norms.append(co.last_grad_norm)
        eo.zero_grad(set_to_none=False)
        co.zero_grad(set_to_none=False)
    assert len({n.item() for n in norms}) == 3  # a new norm each step, none overwritten
    _assert_params_match(em, cm)


def test_compiled_step_with_tensor_lr_does_not_recompile():
    """A tensor lr changed in place every step (as an LR scheduler does) is read on the device:
    the result of float lrs (to the float32 rounding of the tensor), one compiled graph."""
    torch._dynamo.reset()
    lrs = [1e-2, 5e-3, 2e-3, 1e-3, 5e-4]
    (fm, fo), (tm, to) = _pair("torch")
    for group in to.param_groups:
        group["lr"] = torch.tensor(lrs[0])
    _train(tm, to, to.step, 1, False, lrs[:1])
    compiled = torch.compile(lambda: to.step(), fullgraph=True)
    counters = torch._dynamo.utils.counters
    counters.clear()
    _train(tm, to, compiled, 4, False, lrs[1:], seed=2)
    _train(fm, fo, fo.step, 1, False, lrs[:1])
    _train(fm, fo, fo.step, 4, False, lrs[1:], seed=2)
    _assert_params_match(fm, tm)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_compiled_step_with_float_lr_changed_each_step_matches_eager():
    """A float lr an LR scheduler changes before every step (the hyperparameter check and upload
    traced with new values each time): the eager result."""
    torch._dynamo.reset()
    lrs = [1e-2, 5e-3, 2e-3, 1e-3, 5e-4]
    (em, eo), (cm, co) = _pair("torch")
    _train(cm, co, co.step, 1, False, lrs[:1])
    compiled = torch.compile(lambda: co.step(), fullgraph=True)
    _train(cm, co, compiled, 4, False, lrs[1:], seed=2)
    _train(em, eo, eo.step, 1, False, lrs[:1])
    _train(em, eo, eo.step, 4, False, lrs[1:], seed=2)
    _assert_params_match(em, cm)
    assert torch.equal(co._flat[0].hparams[:, 0], torch.full_like(co._flat[0].hparams[:, 0], lrs[-1]))


def test_compiled_step_with_tensor_lr_and_weight_decay_changed_matches_eager():
    """A tensor lr (on the parameters' device, the CPU) and a weight decay changed between
    compiled steps (a wd schedule): the changed row is checked inside the trace, which once read
    the lr tensor's value on the host (``lr.item()``: "Could not guard on data-dependent
    expression" under fullgraph=True)."""
    torch._dynamo.reset()
    eager, pair = _pair("torch")
    (em, eo), (cm, co) = eager, pair
    _set_tensor_lr((eo, co), 1e-2)
    compiled = _compile_after_an_eager_step(eager, pair)
    _train_both(eager, pair, compiled, 1, seed=2)
    for opt in (eo, co):
        opt.param_groups[1]["weight_decay"] = 0.2
    _train_both(eager, pair, compiled, 2, [5e-3, 2e-3], seed=3)
    _assert_params_match(em, cm)
    assert torch.equal(eo._flat[0].hparams, co._flat[0].hparams)


def test_compiled_step_with_float_lr_replaced_by_a_tensor_matches_eager():
    """Float lrs for the first compiled steps, then every group's lr replaced by one tensor
    (changed in place after): the new lr is checked inside the trace without reading it."""
    torch._dynamo.reset()
    eager, pair = _pair("torch")
    (em, eo), (cm, co) = eager, pair
    compiled = _compile_after_an_eager_step(eager, pair)
    _train_both(eager, pair, compiled, 2, seed=2)
    _set_tensor_lr((eo, co), 5e-3)
    _train_both(eager, pair, compiled, 3, [5e-3, 2e-3, 1e-3], seed=3)
    _assert_params_match(em, cm)
    assert torch.equal(eo._flat[0].hparams, co._flat[0].hparams)


def test_compiled_step_refuses_an_lr_read_on_the_host(monkeypatch):
    """A CPU tensor lr beside CUDA parameters is read on the host (``item()``) by eager steps; a
    compiled step cannot read it and says to put it on the parameters' device. Simulated on the
    CPU: ``_lr_on_device`` answers False, as it does for a CPU lr beside CUDA parameters."""
    torch._dynamo.reset()
    monkeypatch.setattr(AdamMini, "_lr_on_device", lambda self, lr, device: False)
    (m, o), _ = _pair("torch")
    for group in o.param_groups:
        group["lr"] = torch.tensor(1e-2)
    _train(m, o, o.step, 2, False)  # eager: read on the host, as before
    compiled = torch.compile(lambda: o.step(), fullgraph=True)
    with pytest.raises(Exception, match=r"lr is a CPU tensor beside parameters on cpu; a compiled step .* put the lr tensor on the parameters' device"):
        _train(m, o, compiled, 1, False, seed=2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("replaced", ["wte.weight", "mlp.weight"])
def test_compiled_step_takes_a_gradient_replaced_after_aliased_ones(backend, replaced):
    """Steps compiled while every gradient aliases the flat buffer, then one gradient replaced
    out of place (``p.grad = p.grad * 0.5``, as user code scaling a gradient does): the compiled
    step copies the new one in, as eager does. It once stepped the old flat gradient for the
    first parameter (the one at offset 0: see [Note: gradient view marks] in buffers.py)."""
    torch._dynamo.reset()
    eager, pair = _pair(backend)
    (em, eo), (cm, co) = eager, pair
    compiled = _compile_after_an_eager_step(eager, pair)
    gen = torch.Generator().manual_seed(6)
    for step in range(5):
        x = torch.randint(0, 11, (4, 5), generator=gen)
        for model, step_fn in ((em, eo.step), (cm, compiled)):
            model(x).backward()
            if step >= 2:
                p = model.get_parameter(replaced)
                p.grad = p.grad * 0.5
            step_fn()
        eo.zero_grad(set_to_none=False)
        co.zero_grad(set_to_none=False)
    _assert_params_match(em, cm)


def test_compiled_step_needs_an_eager_step_first():
    torch._dynamo.reset()
    (m, o), _ = _pair("torch")
    m(torch.zeros(2, 3, dtype=torch.long)).backward()
    with pytest.raises(Exception, match="call opt.step\\(\\) once eagerly first"):
        torch.compile(lambda: o.step(), fullgraph=True)()


# -- a compiled model beside an eager step ----------------------------------------------------------

def test_compiled_model_follows_the_parameters_the_step_re_points():
    """torch.compile(model) before the first step, which re-points the parameters into the flat
    buffer: the compiled forward reads the new storage (losses and parameters as eager, to float32
    rounding) and does not recompile."""

    def run(compile_model):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
        opt = AdamMini(model.named_parameters(), lr=1e-2, verbose=False, backend="torch")
        forward = torch.compile(model) if compile_model else model
        gen = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(4):
            loss = forward(torch.randn(8, 16, generator=gen)).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
            losses.append(loss.detach())
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        flat = opt._flat[0].param_buffer.untyped_storage().data_ptr()
        repointed = all(p.untyped_storage().data_ptr() == flat for p in model.parameters())
        return torch.stack(losses), [p.detach().clone() for p in model.parameters()], graphs, repointed

    eager_losses, eager_params, _, _ = run(False)
    losses, params, graphs, repointed = run(True)
    assert repointed  # the parameters the compiled forward reads live in the flat buffer
    assert max_rel_err(eager_losses, losses) <= 1e-5 and eager_losses[-1] < eager_losses[0]
    for a, b in zip(eager_params, params):
        assert max_rel_err(a, b) <= 1e-5
    assert graphs == 1


# -- the device Triton launches on ([Note: launch device] in triton_kernels/launch.py) -------------

def test_on_device_enters_a_cuda_device_only_when_it_is_not_current(monkeypatch):
    launch = pytest.importorskip("adam_mini_kernels.triton_kernels.launch")
    entered = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda device: entered.append(device) or contextlib.nullcontext())
    for device in ("cuda:1", "cuda:0", "cpu"):
        with launch.on_device(torch.device(device)):
            pass
    assert entered == [torch.device("cuda:1")]


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton")
def test_triton_launches_enter_their_tensors_device_eager_and_compiled(monkeypatch):
    """The eager step enters the group's device once per half (sums, update); a step compiled with a backend that adds
    no device guard of its own (``aot_eager``, unlike Inductor) enters it in every operator."""
    launch = pytest.importorskip("adam_mini_kernels.triton_kernels.launch")
    torch._dynamo.reset()
    devices = []
    on_device = launch.on_device
    monkeypatch.setattr(launch, "on_device", lambda device: devices.append(device) or on_device(device))
    (em, eo), (cm, co) = _pair("triton")
    _train(em, eo, eo.step, 1, False)
    _train(em, eo, eo.step, 1, False)
    assert devices == [torch.device("cpu")] * 4
    _train(cm, co, co.step, 1, False)
    compiled = torch.compile(lambda: co.step(), backend="aot_eager", fullgraph=True)
    devices.clear()
    _train(cm, co, compiled, 1, False)
    t = co._flat[0].cache["launch_tables"]  # one operator call per kind of work (launch_tables.fused_sums, fused_update)
    calls = 1 + len(t.row_classes) + 2 * (t.tiles is not None) + (t.adam is not None)
    assert devices == [torch.device("cpu")] * calls
    _assert_params_match(em, cm)
