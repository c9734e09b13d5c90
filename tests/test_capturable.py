"""Tensor lr, capturable=True and CUDA graphs: the step reads everything it needs on the device,
makes no host sync, and replays of a captured step equal eager steps. CPU: tensor lr (also with
an LR scheduler), validation, rebuild after a model moves, the Triton operators' fake
implementations (opcheck). GPU (marker): capture and replay on every backend, with AMP and
clipping; no sync under set_sync_debug_mode("error"); compile of opt.step() on CUDA."""

import pytest
import torch

from adam_mini_kernels import AdamMini, available_backends
from grad_stream import clone_named, max_rel_err, run_stream

HAS_GPU = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
CPU = torch.device("cpu")
SHAPES = {"wte.weight": (12, 16), "layers.0.wq.weight": (16, 16), "mlp.weight": (20, 16), "ln.weight": (16,), "mlp.bias": (20,), "big_norm.weight": (9000,)}
KW = dict(weight_decay=0.1, verbose=False, dim=16, n_heads=2)


def _named(device=CPU, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(n, torch.nn.Parameter(torch.randn(s, generator=gen).to(device, dtype))) for n, s in SHAPES.items()]


# -- CPU ------------------------------------------------------------------------------------------


def test_tensor_lr_with_a_scheduler_matches_float_lr():
    """A tensor lr (shared by every group, as the constructor's default) driven by an LR
    scheduler, which updates it in place: same steps as float lrs."""
    named = _named()
    runs = []
    for lr in (1e-2, torch.tensor(1e-2, dtype=torch.float64)):
        params = clone_named(named)
        opt = AdamMini(params, lr=lr, **KW)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        for step in range(4):
            run_stream([[p for _, p in params]], [opt], steps=1, seed=step, none_every=3)
            scheduler.step()
        runs.append(params)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)  # still the tensor, filled in place
    for (n, a), (_, b) in zip(*runs):
        assert max_rel_err(a, b) <= 1e-7, n


def test_tensor_lr_per_group_and_mixed_with_floats():
    """Tensor lrs in some param groups, floats in others, changed between steps. The rows the
    tensor lrs are written into are built once (a re-upload for the floats keeps them: building
    them from a list on a GPU would sync every step)."""
    named = _named(seed=1)
    a_params, b_params = clone_named(named), clone_named(named)
    a, b = AdamMini(a_params, lr=1e-2, **KW), AdamMini(b_params, lr=1e-2, **KW)
    for i, group in enumerate(b.param_groups):
        if i % 2:
            group["lr"] = torch.tensor(group["lr"], dtype=torch.float64)
    plans = None
    for step in range(3):
        if step == 2:
            plans = [flat.cache["device_lr_rows"] for flat in b._flat]
            assert any(plan is not None for plan in plans)
        for i, (ga, gb) in enumerate(zip(a.param_groups, b.param_groups)):
            lr = 1e-2 * (i + 1) / (step + 1)
            ga["lr"] = lr
            if isinstance(gb["lr"], torch.Tensor) and step == 1 and i == 1:  # another tensor: followed
                gb["lr"] = torch.tensor(lr, dtype=torch.float32)
            elif isinstance(gb["lr"], torch.Tensor):
                gb["lr"].fill_(lr)
            else:
                gb["lr"] = lr
        run_stream([[p for _, p in a_params], [p for _, p in b_params]], [a, b], steps=1, seed=10 + step)
    assert all(flat.cache["device_lr_rows"] is plan for flat, plan in zip(b._flat, plans))
    for (n, x), (_, y) in zip(a_params, b_params):
        assert torch.equal(x, y), n


def test_tensor_lr_is_validated():
    for bad in (torch.tensor([1e-3, 1e-3]), torch.tensor(1), torch.tensor(-1e-3)):
        with pytest.raises(ValueError, match="lr|learning rate"):
            AdamMini(_named(), lr=bad, **KW)
    # An lr on a device (meta: the same path as CUDA) is not read, the other values are checked.
    device_lr = torch.tensor(1e-3, device="meta")
    for bad, match in ((dict(betas=(2.0, 0.999)), "beta1"), (dict(eps=-1.0), "eps"), (dict(weight_decay=-5.0), "weight_decay")):
        with pytest.raises(ValueError, match=match):
            AdamMini(_named(), lr=device_lr, **dict(KW, **bad))
    # ...but at the first step it must be on the parameters' device (or the CPU, read there).
    named = _named()
    opt = AdamMini(named, lr=device_lr, **KW)
    for _, p in named:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for _, p in named]
    with pytest.raises(ValueError, match=r"lr is a tensor on meta; it must be on the parameters' device \(cpu\)"):
        opt.step()
    assert all(torch.equal(p, b) for (_, p), b in zip(named, before))


@pytest.mark.parametrize("shared", [True, False], ids=["one lr tensor", "a tensor per group"])
def test_tensor_lr_costs_no_op_per_parameter(shared):
    """A tensor lr read on the device: a warm step runs as many ops for 100 parameters as for
    10 (it ran a cast per parameter, each a kernel and a node of a captured CUDA graph). A tensor
    per group is stacked: views of each (metadata only, no kernel) are all that grows."""
    import collections

    from torch.profiler import ProfilerActivity, profile

    views = {"aten::reshape", "aten::view", "aten::unsqueeze", "aten::as_strided"}

    def ops(count):
        params = [(f"layers.{i}.mlp.weight", torch.nn.Parameter(torch.randn(4, 8))) for i in range(count)]
        opt = AdamMini(params, lr=torch.tensor(1e-2, dtype=torch.float32), **KW)
        if not shared:
            for group in opt.param_groups:
                group["lr"] = torch.tensor(1e-2, dtype=torch.float32)
        for p in (p for _, p in params):
            p.grad = torch.randn_like(p)
        opt.step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            opt.step()
        return collections.Counter(e.name for e in prof.events() if e.name.startswith("aten::") and (shared or e.name not in views))

    assert ops(100) == ops(10)


def test_capturable_needs_cuda_parameters():
    with pytest.raises(ValueError, match="capturable=True"):
        AdamMini(_named(), capturable=True, **KW)
    with pytest.raises(TypeError, match="capturable must be True or False"):
        AdamMini(_named(), capturable=1, **KW)


def test_parameters_moved_after_the_first_step_are_rebuilt():
    """``module.to(dtype)`` after the buffers were built: the next step rebuilds them in the new
    dtype, carrying m, v and the step counters over (before, the old buffers would have been
    stepped and the parameters re-pointed back to them)."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    opt = AdamMini(model.named_parameters(), lr=1e-2, **KW)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    m_before = {n: opt.state[p]["m"].clone() for n, p in model.named_parameters()}
    model.double()
    model.zero_grad()
    model(torch.randn(3, 8, dtype=torch.float64)).sum().backward()
    opt.step()
    assert [g.dtype for g in opt._flat] == [torch.float64]
    for n, p in model.named_parameters():
        assert p.dtype == torch.float64 and int(opt.state[p]["step"]) == 2, n
        assert opt.state[p]["m"].dtype == torch.float64 and not torch.equal(opt.state[p]["m"].float(), m_before[n]), n
    assert len({p.untyped_storage().data_ptr() for p in model.parameters()}) == 1


@pytest.mark.skipif("triton" not in available_backends([CPU]), reason="needs triton (TRITON_INTERPRET=1 on a CPU)")
@pytest.mark.parametrize("dtype, state_dtype", [(torch.float32, None), (torch.bfloat16, None), (torch.float32, torch.int8)])
def test_triton_operators_opcheck(dtype, state_dtype):
    """The Triton backend's operators: schema (what they mutate), fake implementations and
    dispatch agree with the real launches (torch.library.opcheck), here on CPU tensors; also with
    int8 m (codes and scales) and with active flags and AMP's tensors."""
    from adam_mini_kernels.launch_tables import build_launch_tables
    from adam_mini_kernels.triton_kernels import ops

    named = _named(dtype=dtype) + [("proj.weight", torch.nn.Parameter(torch.randn(64, 128, dtype=dtype)))]
    opt = AdamMini(named, lr=1e-2, backend="triton", state_dtype=state_dtype, **KW)
    run_stream([[p for _, p in named]], [opt], steps=1, none_every=0)  # int8 m: big_norm and proj
    [group] = [g for g in opt._flat if g.quantized == (state_dtype == torch.int8)]
    t = build_launch_tables(group)
    coef = group.cache["coef"]
    rounding = dtype == torch.bfloat16
    scales = group.m_scales if group.quantized else torch.empty(0)
    state = (group.param_buffer, group.grad_buffer, group.m, scales, group.v, coef)
    torch.library.opcheck(ops.OPERATORS.step_coefficients, (group.steps, group.hparams, coef, None, None, None, None, 7, rounding))
    active = torch.arange(len(group.params)) % 2 == 0
    amp_clip = (torch.tensor(0.5), torch.tensor(0.0), torch.tensor(0.25))
    torch.library.opcheck(ops.OPERATORS.step_coefficients, (group.steps, group.hparams, coef, active, *amp_clip, 7, rounding))
    width, rows = t.row_classes[-1]
    torch.library.opcheck(ops.OPERATORS.rows_step, state + (rows, width, rounding))
    sumsq = (group.grad_buffer, None, t.tiles, t.blocks, t.partial, t.block_sums)
    torch.library.opcheck(ops.OPERATORS.large_blocks_sumsq, (group.grad_buffer, torch.tensor(0.5)) + sumsq[2:])
    torch.library.opcheck(ops.OPERATORS.large_blocks_sumsq, sumsq)
    ops.OPERATORS.large_blocks_sumsq(*sumsq)  # opcheck ran on copies: the update reads real sums, not torch.empty's
    assert (t.block_sums > 0).all()
    torch.library.opcheck(ops.OPERATORS.large_blocks_update, state + (t.tiles, t.blocks, t.block_sums, rounding))
    if t.adam is not None:
        torch.library.opcheck(ops.OPERATORS.adam_step, (group.param_buffer, group.grad_buffer, group.m, group.v, coef, t.adam, rounding))
    assert (t.adam is None) == group.quantized  # int8 m: no bias in the group


# -- GPU: CUDA graphs -----------------------------------------------------------------------------

GPU_BACKENDS = [b for b in ("torch", "triton", "cuda") if HAS_GPU and b in available_backends([torch.device("cuda")])]
VARIANTS = {"plain": {}, "amp": {}, "clip": {"max_grad_norm": 0.5}}


def _grads(params, step):
    gen = torch.Generator(device="cuda").manual_seed(step)
    return [torch.randn(p.shape, generator=gen, device="cuda") for p in params]


def _set_amp(opt, scale):
    opt.grad_scale = torch.full((), scale, device="cuda")
    opt.found_inf = torch.zeros((), device="cuda")


@gpu
@needs_gpu
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_captured_step_replays_equal_eager_steps(backend, variant):
    """Warm up, capture one step, replay it with new gradients copied into the (aliased, static)
    gradient buffers and a tensor lr changed between replays: the same as eager steps."""
    named = _named(torch.device("cuda"))
    eager_params, graph_params = clone_named(named), clone_named(named)
    kw = dict(KW, backend=backend, **VARIANTS[variant])
    eager = AdamMini(eager_params, lr=torch.tensor(1e-2, device="cuda"), **kw)
    graphed = AdamMini(graph_params, lr=torch.tensor(1e-2, device="cuda"), capturable=True, **kw)
    amp_scale = 1024.0 if variant == "amp" else 1.0
    if variant == "amp":
        _set_amp(eager, amp_scale), _set_amp(graphed, amp_scale)

    def load(params, step):
        for p, g in zip(params, _grads(params, step)):
            if p.grad is None:
                p.grad = g * amp_scale
            else:
                p.grad.copy_(g * amp_scale)

    eager_list, graph_list = [p for _, p in eager_params], [p for _, p in graph_params]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for step in range(3):  # warm-up: builds the buffers, compiles kernels
            load(graph_list, step)
            graphed.step()
    torch.cuda.current_stream().wait_stream(side)
    for step in range(3):
        load(eager_list, step)
        eager.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step()
    for step in range(3, 7):
        lr = 1e-2 / step
        eager.param_groups[0]["lr"].fill_(lr)
        graphed.param_groups[0]["lr"].fill_(lr)
        load(eager_list, step)
        eager.step()
        load(graph_list, step)
        graph.replay()
    torch.cuda.synchronize()
    for (n, a), (_, b) in zip(eager_params, graph_params):
        assert max_rel_err(a, b) <= 1e-6, n
    assert torch.equal(eager._flat[0].steps, graphed._flat[0].steps)


def _steps_without_host_sync(step):
    """``step(k)`` for k = 0, 1 (they build: allocations and uploads may sync), then k = 2, 3
    under ``torch.cuda.set_sync_debug_mode("error")``: any host-device sync raises."""
    for k in range(2):
        step(k)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for k in range(2, 4):
            step(k)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _set_grads(params, k):
    for p, g in zip(params, _grads(params, k)):
        p.grad = g if p.grad is None else p.grad.copy_(g)


@gpu
@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_capturable_step_makes_no_host_sync(backend):
    named = _named(torch.device("cuda"))
    opt = AdamMini(named, lr=torch.tensor(1e-2, device="cuda"), capturable=True, max_grad_norm=1.0, backend=backend, **KW)
    params = [p for _, p in named]

    def step(k):
        _set_grads(params, k)
        opt.step()

    _steps_without_host_sync(step)


@gpu
@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_scheduled_float_lrs_beside_a_device_lr_make_no_host_sync(backend):
    """A device-tensor lr in one param group and float lrs that a scheduler changes every step in
    the others: each step re-uploads the hyperparameter table and must still not sync (the rows
    the device lr is written into are kept, not built again from a list)."""
    named = _named(torch.device("cuda"))
    opt = AdamMini(named, lr=1e-2, capturable=True, backend=backend, **KW)
    assert len(opt.param_groups) > 1
    opt.param_groups[1]["lr"] = torch.tensor(1e-2, device="cuda")
    params = [p for _, p in named]

    def step(k):
        for i, group in enumerate(opt.param_groups):
            if i != 1:
                group["lr"] = 1e-2 / (k + 1)
        _set_grads(params, k)
        opt.step()

    _steps_without_host_sync(step)


@gpu
@needs_gpu
def test_capturable_refuses_a_cpu_lr_tensor_beside_cuda_parameters():
    """A captured graph would keep the value read on the host at capture and ignore later
    changes of the tensor: refused at the step, before anything changes."""
    named = _named(torch.device("cuda"))
    opt = AdamMini(named, lr=torch.tensor(1e-2), capturable=True, **KW)
    for p in (p for _, p in named):
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for _, p in named]
    with pytest.raises(ValueError, match=r"lr is a CPU tensor beside parameters on cuda.*capturable=True .*parameters' device"):
        opt.step()
    assert all(torch.equal(p, b) for (_, p), b in zip(named, before))


@gpu
@needs_gpu
def test_capture_without_capturable_is_an_error():
    named = _named(torch.device("cuda"))
    opt = AdamMini(named, lr=1e-2, **KW)
    for p in (p for _, p in named):
        p.grad = torch.ones_like(p)
    opt.step()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="capturable=True"):
        with torch.cuda.graph(graph):
            opt.step()


def _eager_and_compiled_on_cuda(backend):
    """Two optimizers over copies of the same CUDA parameters after one eager step each (which
    builds the buffers): the parameter sets, the eager optimizer, and the other's compiled step."""
    named = _named(torch.device("cuda"))
    eager_params, compiled_params = clone_named(named), clone_named(named)
    eager = AdamMini(eager_params, lr=1e-2, backend=backend, **KW)
    compiled = AdamMini(compiled_params, lr=1e-2, backend=backend, **KW)
    sets = [[p for _, p in eager_params], [p for _, p in compiled_params]]
    run_stream(sets, [eager, compiled], steps=1, seed=0, none_every=0)
    return sets, eager, compiled, torch.compile(lambda: compiled.step(), fullgraph=True)


def _step_both(sets, eager, compiled_step, i):
    """Step ``i``'s gradients into both sets, then the eager step and the compiled one."""
    for params in sets:
        for p, g in zip(params, _grads(params, i)):
            p.grad.copy_(g)
    eager.step()
    compiled_step()


@gpu
@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_compiled_opt_step_fullgraph_on_cuda(backend):
    sets, eager, _, step = _eager_and_compiled_on_cuda(backend)
    for i in range(1, 4):
        _step_both(sets, eager, step, i)
    for a, b in zip(*sets):
        assert max_rel_err(a, b) <= 1e-6


@gpu
@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_compiled_step_with_a_cuda_lr_set_between_compiled_steps(backend):
    """Float lrs replaced by one CUDA tensor lr between compiled steps (fullgraph=True): the
    next compiled step uploads the rows of device lrs inside the trace (``FlatGroup.upload``, no
    pinned copy there) and reads the tensor on the device; changed in place after, it takes
    effect. Equal to eager."""
    sets, eager, compiled, step = _eager_and_compiled_on_cuda(backend)
    lrs = {}
    for i in range(1, 5):
        if i == 2:
            for opt in (eager, compiled):
                lrs[id(opt)] = torch.tensor(5e-3, device="cuda")
                for group in opt.param_groups:
                    group["lr"] = lrs[id(opt)]
        if i == 3:
            for lr in lrs.values():
                lr.fill_(2e-3)
        _step_both(sets, eager, step, i)
    for a, b in zip(*sets):
        assert max_rel_err(a, b) <= 1e-6

