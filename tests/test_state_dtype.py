"""state_dtype=torch.float32: float32 first moment for bf16/fp16 parameters, on every backend
(torch; Triton, under the interpreter on a CPU; the CUDA kernels, emulated on the CPU in
test_cuda_backend.py and compiled on a GPU), and kept float32 through save and load."""

import io

import pytest
import torch

from adam_mini_kernels import AdamMini, available_backends
from adam_mini_kernels.reference import adam_mini_step
from grad_stream import clone_named, max_rel_err, run_stream

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = [b for b in ("torch", "triton", "cuda") if b in available_backends([DEVICE])]  # cuda: on a GPU
SHAPES = {"wte.weight": (12, 16), "layers.0.wq.weight": (16, 16), "mlp.weight": (20, 16), "ln.weight": (16,), "mlp.bias": (20,)}
KW = dict(lr=1e-2, weight_decay=0.1, verbose=False, dim=16, n_heads=2)


def _named(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(n, torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE, dtype))) for n, s in SHAPES.items()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_state_matches_reference(backend, dtype):
    """Each step against the reference on the same tensors: p in ``dtype``, m float32, so the only
    rounding is that of the stored p (at most one unit in its last place)."""
    named = _named(dtype)
    opt = AdamMini(named, backend=backend, state_dtype=torch.float32, **KW)
    ref = {n: (p.detach().clone(), None, None) for n, p in named}
    summary = {s["name"]: s for s in opt.partition_summary()}
    for step in range(1, 4):
        run_stream([[p for _, p in named]], [opt], steps=1, seed=step, none_every=0)
        assert opt._flat[0].m.dtype == torch.float32
        for n, p in named:
            p_ref, m_ref, v_ref = ref[n]
            m_ref = torch.zeros(p.shape, dtype=torch.float32, device=DEVICE) if m_ref is None else m_ref
            v_ref = torch.zeros(summary[n]["num_blocks"], device=DEVICE) if v_ref is None else v_ref
            adam_mini_step(p_ref, p.grad, m_ref, v_ref, step=step, lr=KW["lr"], beta1=0.9, beta2=0.999, eps=1e-8,
                           weight_decay=0.0 if ("ln" in n or "bias" in n) else KW["weight_decay"])
            ulp = torch.finfo(dtype).eps * p_ref.float().abs().clamp(min=torch.finfo(dtype).tiny)
            assert ((p.float() - p_ref.float()).abs() <= ulp * 1.01).all(), n
            assert max_rel_err(m_ref.reshape(-1), opt.state[p]["m"].reshape(-1)) <= 1e-6, n
            ref[n] = (p.detach().clone(), m_ref, v_ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_state_survives_save_and_load(backend):
    named = _named(torch.bfloat16, seed=1)
    opt = AdamMini(named, backend=backend, state_dtype=torch.float32, **KW)
    run_stream([[p for _, p in named]], [opt], steps=2, seed=5)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    assert all(s["m"].dtype == torch.float32 for s in saved["state"].values())

    resumed_named = clone_named(named)
    resumed = AdamMini(resumed_named, backend=backend, state_dtype=torch.float32, **KW)
    resumed.load_state_dict(saved)
    run_stream([[p for _, p in named], [p for _, p in resumed_named]], [opt, resumed], steps=2, seed=6)
    for (n, a), (_, b) in zip(named, resumed_named):
        assert torch.equal(a, b), n
    assert torch.equal(opt._flat[0].m, resumed._flat[0].m) and resumed._flat[0].m.dtype == torch.float32


def test_state_dtype_is_validated():
    with pytest.raises(ValueError, match="state_dtype"):
        AdamMini(_named(torch.bfloat16), state_dtype=torch.bfloat16, **KW)


def test_default_state_dtype_is_the_parameter_dtype():
    named = _named(torch.bfloat16)
    opt = AdamMini(named, **KW)
    run_stream([[p for _, p in named]], [opt], steps=1)
    assert opt._flat[0].m.dtype == torch.bfloat16
