"""The CUDA backend: the extension ``adam_mini_kernels._C`` and its operators.

CI part (no GPU): the extension is built wherever it can be (a CUDA build of torch and nvcc: this
repo's CI), imports, registers its operators with the expected schemas and was compiled with the
table layout of this package; the fake implementations trace; the dispatch paths give useful
errors. Where the extension cannot be built (a CPU torch, no nvcc) those checks are skipped. The
kernels themselves run in CI too, compiled for the CPU by tests/gpu/host_emulator.cpp, against the
PyTorch backend.

GPU part (``-m gpu``, skipped without CUDA): ``backend="cuda"`` against the PyTorch backend, the
Triton backend and official adam-mini 1.1.1 on the model trees of ``models.py`` and on odd sizes,
fp32 / bf16 / fp16, bitwise determinism, opcheck, torch.compile, CUDA graphs, input checks; a flat
buffer of more than 2^31 elements: tests/test_big_buffer.py.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models
from adam_mini_kernels import AdamMini, BackendUnavailableError, coefficients, dispatch, launch_tables, rounding
from adam_mini_kernels.dispatch import BackendStep
from adam_mini_kernels.launch_tables import build_launch_tables, fused_sums, fused_update
from adam_mini_kernels.partition import BlockLayout, Section
from grad_stream import backend_runs, clone_named, max_rel_err, run_stream
from precision import assert_runs_close

OPS = ("rows_step", "large_blocks_sumsq", "large_blocks_update", "adam_step", "step_coefficients")
SCHEMAS = {
    "rows_step": "adam_mini_kernels::rows_step(Tensor(a!) p, Tensor g, Tensor(b!) m, Tensor(c!) m_scales, "
    "Tensor(d!) v, Tensor coef, Tensor rows, int width, bool stochastic_rounding) -> ()",
    "large_blocks_sumsq": "adam_mini_kernels::large_blocks_sumsq(Tensor g, Tensor? inv_scale, Tensor tiles, "
    "Tensor blocks, Tensor(a!) partial, Tensor(b!) block_sums) -> ()",
    "large_blocks_update": "adam_mini_kernels::large_blocks_update(Tensor(a!) p, Tensor g, Tensor(b!) m, "
    "Tensor(c!) m_scales, Tensor(d!) v, Tensor coef, Tensor tiles, Tensor blocks, Tensor block_sums, "
    "bool stochastic_rounding) -> ()",
    "adam_step": "adam_mini_kernels::adam_step(Tensor(a!) p, Tensor g, Tensor(b!) m, Tensor(c!) v, Tensor coef, "
    "Tensor tiles, bool stochastic_rounding) -> ()",
    "step_coefficients": "adam_mini_kernels::step_coefficients(Tensor(a!) steps, Tensor hparams, Tensor(b!) coef, "
    "Tensor? active, Tensor? inv_scale, Tensor? found_inf, Tensor? clip, int round_seed, bool stochastic_rounding) -> ()",
}
HAS_GPU = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")


def _nvcc_found() -> bool:
    cuda_home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return os.path.exists(os.path.join(cuda_home, "bin", "nvcc")) or shutil.which("nvcc") is not None


# setup.py builds the extension exactly when these hold; then a missing or broken extension is a
# failure (a silently broken build must not pass CI), otherwise the checks below are skipped.
BUILD_EXPECTED = (
    torch.version.cuda is not None and _nvcc_found() and os.environ.get("ADAM_MINI_SKIP_CUDA_BUILD") != "1"
)


def _import_backend():
    try:
        return importlib.import_module("adam_mini_kernels.cuda_backend")
    except ImportError as err:
        if BUILD_EXPECTED:
            pytest.fail(
                f"the CUDA extension should be built here (torch {torch.__version__} is a CUDA "
                f"{torch.version.cuda} build and nvcc exists) but does not import: {err}"
            )
        pytest.skip(f"CUDA extension not built here: {err}")


@pytest.fixture(scope="module")
def backend():
    return _import_backend()


# -- CI: build, import, registration ---------------------------------------------------------------


def test_csrc_readme_lists_the_schemas():
    """csrc/README.md's operator list is the registered schemas (it once kept old ones)."""
    readme = (Path(__file__).resolve().parents[1] / "csrc" / "README.md").read_text()
    block = readme.split("```")[1].strip().splitlines()
    assert block == [SCHEMAS[op].removeprefix("adam_mini_kernels::") for op in OPS]



def test_extension_imports_where_it_can_be_built(backend):
    module = importlib.import_module("adam_mini_kernels._C")
    assert module.__name__ == "adam_mini_kernels._C"
    assert hasattr(torch.ops, "adam_mini_kernels")


@pytest.mark.parametrize("op", OPS)
def test_op_is_registered_with_its_schema(backend, op):
    packet = getattr(torch.ops.adam_mini_kernels, op)
    assert str(packet.default._schema) == SCHEMAS[op]
    qualname = f"adam_mini_kernels::{op}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU")
    # The alias annotations (what functionalization and torch.compile rely on): what is mutated.
    mutated = [a.name for a in packet.default._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    expected = {
        "rows_step": ["p", "m", "m_scales", "v"],
        "large_blocks_sumsq": ["partial", "block_sums"],
        "large_blocks_update": ["p", "m", "m_scales", "v"],
        "step_coefficients": ["steps", "coef"],
    }
    assert mutated == expected.get(op, ["p", "m", "v"])
    assert packet.default._schema.returns == []


def test_compiled_constants_match_python(backend):
    """The kernels index the launch tables and the coefficient table by compile-time columns; they
    must be the columns launch_tables.py and coefficients.py write."""
    compiled = dict(backend._C.CONSTANTS)
    for name, value in backend._expected_constants().items():
        assert compiled[name] == value, name
    per_thread = compiled["ELEMS_PER_THREAD"]
    for span in ("ROW_MAX", "TILE", "ADAM_TILE"):
        assert compiled[span] % (32 * per_thread) == 0, span  # whole warps per span
    assert compiled["ROW_MAX"] // per_thread <= 1024  # one CUDA block holds the widest row


def test_stale_build_is_an_import_error(backend, monkeypatch):
    monkeypatch.setitem(backend._C.CONSTANTS, "ROW_V", 7)
    with pytest.raises(ImportError, match="ROW_V.*rebuild"):
        backend._check_constants()


def _cpu_inputs(dtype=torch.float32):
    """Flat buffers, launch tables and a (zero) coefficient table of the odd set, as CPU tensors:
    templates for fake CUDA tensors of the same shapes, or copied to the GPU (``_gpu_inputs``)."""
    named, dims = _odd_named()
    group = _cpu_group(named, dims)
    tables = build_launch_tables(group)
    coef = torch.zeros(len(group.params), coefficients.NUM_COEFFICIENTS)
    real = dict(
        p=group.param_buffer.to(dtype), g=group.grad_buffer.to(dtype), m=group.m.to(dtype), v=group.v, coef=coef,
        m_scales=torch.empty(0),
        rows=tables.row_classes, tiles=tables.tiles, blocks=tables.blocks, partial=tables.partial,
        block_sums=tables.block_sums, adam=tables.adam,
        steps=group.steps, hparams=group.hparams,
    )
    return real


def _fake_like(t):
    return torch.empty(t.shape, dtype=t.dtype, device="cuda")


def test_fake_implementations_under_fake_tensor_mode(backend):
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = _cpu_inputs()
    with FakeTensorMode():
        p, g, m, s, v, coef = (_fake_like(real[k]) for k in ("p", "g", "m", "m_scales", "v", "coef"))
        ops = torch.ops.adam_mini_kernels
        for width, rows in real["rows"]:
            assert ops.rows_step(p, g, m, s, v, coef, _fake_like(rows), width, False) is None
        tiles, blocks, partial, sums = (_fake_like(real[k]) for k in ("tiles", "blocks", "partial", "block_sums"))
        assert ops.large_blocks_sumsq(g, None, tiles, blocks, partial, sums) is None
        assert ops.large_blocks_sumsq(g, _fake_like(torch.ones(())), tiles, blocks, partial, sums) is None
        assert ops.large_blocks_update(p, g, m, s, v, coef, tiles, blocks, sums, False) is None
        with pytest.raises(RuntimeError, match="block_sums must be float32 with one slot per block"):
            ops.large_blocks_sumsq(g, None, tiles, blocks, partial, sums[:1])
        with pytest.raises(RuntimeError, match="inv_scale must be a one-element float32"):
            ops.large_blocks_sumsq(g, _fake_like(torch.ones(2)), tiles, blocks, partial, sums)
        assert ops.adam_step(p, g, m, v, coef, _fake_like(real["adam"]), False) is None
        steps, hparams = _fake_like(real["steps"]), _fake_like(real["hparams"])
        assert ops.step_coefficients(steps, hparams, coef, None, None, None, None, 0, False) is None
        with pytest.raises(RuntimeError, match="hparams must be a float64"):
            ops.step_coefficients(steps, hparams.float(), coef, None, None, None, None, 0, False)
        with pytest.raises(RuntimeError, match="hparams must be a float64"):  # a column short
            ops.step_coefficients(steps, hparams[:, :-1], coef, None, None, None, None, 0, False)
        with pytest.raises(RuntimeError, match="g must be float32, bfloat16 or float16"):
            ops.large_blocks_sumsq(g.double(), None, tiles, blocks, partial, sums)
        with pytest.raises(RuntimeError, match="clip must be a one-element float32"):
            ops.step_coefficients(steps, hparams, coef, None, None, None, _fake_like(torch.ones((), dtype=torch.float64)), 0, False)
        # What the fake implementations can see is checked, as the CUDA kernels' launchers do.
        with pytest.raises(RuntimeError, match="coef"):
            ops.adam_step(p, g, m, v, coef[:, :3], _fake_like(real["adam"]), False)
        with pytest.raises(RuntimeError, match="tiles"):
            ops.adam_step(p, g, m, v, coef, tiles, False)
        with pytest.raises(RuntimeError, match="stochastic_rounding needs bfloat16"):
            ops.adam_step(p, g, m, v, coef, _fake_like(real["adam"]), True)
        with pytest.raises(RuntimeError, match="dtype"):
            ops.rows_step(p, g.to(torch.bfloat16), m, s, v, coef, _fake_like(real["rows"][0][1]), 16, False)


def test_traces_with_make_fx(backend):
    """The operators trace into a graph on fake tensors (what torch.compile does first), in the
    order of the step, with their in-place semantics intact."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = _cpu_inputs(torch.bfloat16)

    def step(p, g, m, s, v, coef, tiles, blocks, partial, sums, adam, *rows):
        ops = torch.ops.adam_mini_kernels
        ops.large_blocks_sumsq(g, None, tiles, blocks, partial, sums)
        for (width, _), table in zip(real["rows"], rows):
            ops.rows_step(p, g, m, s, v, coef, table, width, True)
        ops.large_blocks_update(p, g, m, s, v, coef, tiles, blocks, sums, True)
        ops.adam_step(p, g, m, v, coef, adam, True)

    with FakeTensorMode():
        keys = ("p", "g", "m", "m_scales", "v", "coef", "tiles", "blocks", "partial", "block_sums", "adam")
        args = [_fake_like(real[k]) for k in keys]
        args += [_fake_like(rows) for _, rows in real["rows"]]
        graph = make_fx(step)(*args)
    called = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    expected = ["adam_mini_kernels.large_blocks_sumsq.default"] + ["adam_mini_kernels.rows_step.default"] * len(real["rows"])
    expected += ["adam_mini_kernels.large_blocks_update.default", "adam_mini_kernels.adam_step.default"]
    assert called == expected


# -- CI: dispatch ----------------------------------------------------------------------------------


def test_cuda_backend_on_cpu_params_says_why():
    named, dims = _odd_named()
    with pytest.raises(BackendUnavailableError) as err:
        AdamMini(named, backend="cuda", verbose=False, **dims)
    message = str(err.value)
    assert "'cuda'" in message and "CUDA" in message


def _block_extension(monkeypatch):
    """Make `import adam_mini_kernels._C` fail as it does where the extension was not built."""
    import adam_mini_kernels

    monkeypatch.setitem(sys.modules, "adam_mini_kernels._C", None)
    monkeypatch.delitem(sys.modules, "adam_mini_kernels.cuda_backend", raising=False)
    monkeypatch.delattr(adam_mini_kernels, "_C", raising=False)
    monkeypatch.delattr(adam_mini_kernels, "cuda_backend", raising=False)


def test_missing_extension_explains_how_to_build(monkeypatch):
    _block_extension(monkeypatch)
    cuda = [torch.device("cuda", 0)]
    reason = dispatch.BACKENDS["cuda"].why_not(cuda)
    assert reason is not None and "not built" in reason and "pip install" in reason
    with pytest.raises(BackendUnavailableError, match="not built"):
        dispatch.resolve_backend("cuda", cuda)
    assert dispatch.resolve_backend("auto", cuda) in dispatch.PREFERENCE  # auto never fails
    assert "cuda" not in dispatch.available_backends(cuda)


def test_a_gpu_the_extension_was_not_built_for_is_refused_before_the_first_step(backend, monkeypatch):
    """An sm_75 GPU with the default "8.0;9.0+PTX" build: every launch would fail with "no kernel
    image"; the availability check asks the extension first ([Note: kernel images]), so
    ``backend="cuda"`` says how to rebuild and ``auto`` moves on."""
    images = {0: True, 1: False}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (7, 5))
    monkeypatch.setattr(backend, "_has_kernel_image", images.__getitem__)
    monkeypatch.setattr(dispatch, "AUTO_ORDER", ("cuda", "torch"))
    assert dispatch.resolve_backend("cuda", [torch.device("cuda", 0)]) == "cuda"
    both = [torch.device("cuda", 0), torch.device("cuda", 1)]
    with pytest.raises(BackendUnavailableError, match=r"not built for the arch of cuda:1 \(sm_75\).*TORCH_CUDA_ARCH_LIST"):
        dispatch.resolve_backend("cuda", both)
    assert dispatch.resolve_backend("auto", both) == "torch"
    assert "cuda" not in dispatch.available_backends(both)


def test_no_visible_gpu_is_a_reason_not_a_crash(backend, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dispatch.BACKENDS["cuda"].why_not([torch.device("cuda", 0)]) == "torch sees no CUDA device"


def test_cuda_stays_out_of_auto_until_verified():
    assert "cuda" not in dispatch.AUTO_ORDER


# -- the odd-size parameter set --------------------------------------------------------------------


def _odd_named():
    """Every kind of work and each of its code paths: Adam tiles whose v starts on a 16-byte
    boundary and not, a row of one element, rows whose length is not a multiple of any vector
    width (so also unaligned row starts), rows at exactly ROW_MAX and just under it, a whole-tensor
    block larger than TILE (three-phase path, unaligned last tile), head blocks larger than
    ROW_MAX, zero-size parameters and zero-length rows, a row rule on a 1-D tensor."""
    big = launch_tables.TILE * 2 + 3
    shapes = {
        "first.bias": (64,),
        "one.weight": (1,),
        "mlp.odd": (5, 7),
        "mlp.row_of_one": (3, 1),
        "mlp.exact": (2, launch_tables.ROW_MAX),
        "mlp.wide_odd": (2, launch_tables.ROW_MAX - 3),
        "big_norm.weight": (big,),
        "layers.0.wq.weight": (2 * 96, 96),  # dim 96, n_heads 1: head blocks of 9216 > ROW_MAX
        "empty.weight": (0, 3),
        "mlp.empty_rows": (4, 0),
        "mlp.vector": (33,),
        "lone.bias": (1,),
        "long.bias": (launch_tables.ADAM_TILE + 17,),
        "mid.bias": (64,),
    }
    gen = torch.Generator().manual_seed(5)
    named = [(name, torch.nn.Parameter(torch.randn(shape, generator=gen))) for name, shape in shapes.items()]
    return named, dict(dim=96, n_heads=1)


def _sectioned_named():
    """``_odd_named`` plus a parameter of several sections (a layout ``AdamMini.for_model`` may
    give a fused weight), with the layouts to put in ``opt.layout_overrides``: after its odd first
    section, rows and the tiles of a large block whose lengths are multiples of every vector width
    start off the vector boundary. The name rules never give such spans (parameters start aligned,
    their blocks are equal); the fast paths must leave them to the scalar ones: on a GPU a vector
    access there faults, in the emulator it fails an assert ([Note: alignment check of the
    emulator] in csrc/kernels.cuh), and Triton's aligned body would read a shifted span. A second
    such parameter has two large blocks of an odd length: the first one's last tile starts on a
    vector boundary but ends inside a vector, just before the next block (a vector access there
    would step the next block's first elements too)."""
    named, dims = _odd_named()
    gen = torch.Generator().manual_seed(6)
    layouts = {}
    for name, sections in (
        ("fused.weight", (Section("mlp", 5, 3), Section("mlp", 8, 5), Section("mlp", 2 * launch_tables.TILE + 8, 1))),
        ("odd_blocks.weight", (Section("mlp", 2 * launch_tables.TILE + 3, 2),)),
    ):
        numel = sum(s.block_numel * s.num_blocks for s in sections)
        named.append((name, torch.nn.Parameter(torch.randn(numel, generator=gen))))
        layouts[name] = BlockLayout(name, "mlp", (numel,), sections)
    return named, dims, layouts


def unaligned_starts(opt, vec):
    """How many rows and tiles of ``opt``'s launch tables have a length that is a multiple of
    ``vec`` but start off a multiple of it."""
    T = launch_tables

    def count(table, start, numel):
        if table is None:
            return 0
        return int(((table[:, start] % vec != 0) & (table[:, numel] % vec == 0) & (table[:, numel] > 0)).sum())

    rows = tiles = 0
    for group in opt._flat:
        tables = group.cache["launch_tables"]
        rows += sum(count(r, T.ROW_START, T.ROW_NUMEL) for _, r in tables.row_classes)
        tiles += count(tables.tiles, T.TILE_START, T.TILE_NUMEL)
    return rows, tiles


def _cpu_group(named, dims):
    """The flat group the optimizer builds for ``named`` (built on the CPU by a no-gradient step)."""
    opt = AdamMini(clone_named(named), backend="torch", verbose=False, **dims)
    opt.step()  # no gradients: builds the buffers, steps nothing
    (group,) = opt._flat
    return group


@pytest.mark.parametrize("vec", [4, 8])  # elements per 16-byte access: fp32, bf16/fp16
def test_odd_set_covers_every_kernel_path(vec):
    """The GPU tests below only exercise the fast and fallback paths if the odd set has spans of
    each kind; checked here on the launch tables, without a GPU."""
    named, dims = _odd_named()
    tables = build_launch_tables(_cpu_group(named, dims))
    T = launch_tables

    def aligned(table, start, numel):
        return (table[:, start] % vec == 0) & (table[:, numel] % vec == 0)

    widths = [w for w, _ in tables.row_classes]
    assert launch_tables.MIN_ROW_BLOCK in widths and launch_tables.ROW_MAX in widths
    rows = torch.cat([r for _, r in tables.row_classes])
    row_aligned = aligned(rows, T.ROW_START, T.ROW_NUMEL)
    assert row_aligned.any() and (~row_aligned).any()
    assert (rows[:, T.ROW_NUMEL] == 0).any() and (rows[:, T.ROW_NUMEL] == 1).any()
    assert (rows[:, T.ROW_NUMEL] == launch_tables.ROW_MAX).any()
    assert ((rows[:, T.ROW_START] % vec != 0) & (rows[:, T.ROW_NUMEL] > 1)).any()  # unaligned starts
    tile_aligned = aligned(tables.tiles, T.TILE_START, T.TILE_NUMEL)
    assert tile_aligned.any() and (~tile_aligned).any()
    assert (tables.blocks[:, T.LB_NUMEL] > launch_tables.TILE).all() and len(tables.blocks) >= 3
    adam_aligned = aligned(tables.adam, T.ROW_START, T.ROW_NUMEL)
    v_aligned = tables.adam[:, T.ROW_V] % 4 == 0
    assert (adam_aligned & v_aligned).any() and (adam_aligned & ~v_aligned).any() and (~adam_aligned).any()


# -- comparing runs ------------------------------------------------------------------------------

DEVICE = torch.device("cuda")
# Tolerances against the torch backend, per storage dtype: tests/precision.py (measured, and why;
# fp32 differs by summation order and FMA contraction, which the emulation on the CPU does not do).
KW = dict(lr=1e-2, weight_decay=0.1, verbose=False)


def _model_named(model_name):
    model, _, dims = models.build(model_name)
    return list(model.named_parameters()), dims


# -- CI: the kernels, emulated on the CPU ----------------------------------------------------------
# tests/gpu/host_emulator.cpp compiles csrc/kernels.cuh with the host compiler and runs each CUDA
# block with one fiber per CUDA thread (see [Note: host emulation] there): the kernels' own
# indexing, masking, vector and scalar paths and reductions, checked without a GPU.

EMULATOR = Path(__file__).resolve().parent / "gpu" / "host_emulator.cpp"
DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
WIDE_STATE = 8  # added to the code when m is float32 for 16-bit parameters (host_emulator.cpp)
INT8_STATE = 16  # added to the code when m is int8 codes


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the kernel emulator")
    library = tmp_path_factory.mktemp("emulator") / "libemulator.so"
    include = Path(torch.__file__).resolve().parent / "include"
    command = [cxx, "-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", "-Wno-unknown-pragmas", f"-I{include}",
               str(EMULATOR), "-o", str(library)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        if BUILD_EXPECTED:  # the CUDA build works here, so the kernels compile: a real failure
            pytest.fail(f"the kernel emulator does not compile:\n{result.stderr[-4000:]}")
        pytest.skip(f"the kernel emulator does not compile with {cxx}: {result.stderr[-500:]}")
    return load_emulator(library)


def load_emulator(library):
    """The compiled emulator (``emulator`` builds it; a spawned test process loads it by path)."""
    lib = ctypes.CDLL(str(library))
    lib.path = str(library)
    ptr, i64, flag = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.emulate_rows_step.argtypes = [flag] + [ptr] * 7 + [i64, i64, flag, flag]
    lib.emulate_large_blocks_sumsq.argtypes = [flag, ptr, ptr, ptr, i64, ptr, i64, ptr, ptr, flag]
    lib.emulate_large_blocks_update.argtypes = [flag] + [ptr] * 7 + [i64, ptr, i64, ptr, flag, flag]
    lib.emulate_adam_step.argtypes = [flag] + [ptr] * 6 + [i64, flag, flag, flag]
    lib.emulate_step_coefficients.argtypes = [ptr] * 7 + [i64, ctypes.c_uint32, flag]
    lib.emulate_random_bits.argtypes = [ctypes.c_uint32, i64]
    lib.emulate_random_bits.restype = ctypes.c_uint32
    return lib


def _ptr(t):
    return None if t is None else t.data_ptr()


class _EmulatedOps:
    """The operators of csrc/bindings.cpp (same schemas, so ``launch_tables.fused_sums`` and
    ``fused_update`` drive them as they drive the real ones), running the emulated kernels with the launchers' arguments
    (``force_scalar``: every span takes the masked scalar path)."""

    def __init__(self, lib, force_scalar=False):
        self.lib, self.force_scalar = lib, force_scalar

    def _aligned(self, *tensors):
        return int(not self.force_scalar and all(t.data_ptr() % 16 == 0 for t in tensors))

    @staticmethod
    def _check(failures):
        assert failures == 0, "a CUDA_KERNEL_ASSERT failed"

    @staticmethod
    def _state(p, g, m, v, coef, m_scales=None):
        code = DTYPE_CODE[p.dtype] + {torch.int8: INT8_STATE, p.dtype: 0}.get(m.dtype, WIDE_STATE)
        scales = () if m_scales is None else (m_scales.data_ptr(),)
        return (code, p.data_ptr(), g.data_ptr(), m.data_ptr(), *scales, v.data_ptr(), coef.data_ptr())

    def step_coefficients(self, steps, hparams, coef, active, inv_scale, found_inf, clip, round_seed, rounding):
        self._check(self.lib.emulate_step_coefficients(
            steps.data_ptr(), _ptr(active), hparams.data_ptr(), coef.data_ptr(), _ptr(inv_scale), _ptr(found_inf),
            _ptr(clip), steps.shape[0], round_seed, int(rounding),
        ))

    def rows_step(self, p, g, m, m_scales, v, coef, rows, width, rounding):
        self._check(self.lib.emulate_rows_step(
            *self._state(p, g, m, v, coef, m_scales), rows.data_ptr(), rows.shape[0], width, self._aligned(p, g, m), int(rounding)
        ))

    def large_blocks_sumsq(self, g, inv_scale, tiles, blocks, partial, block_sums):
        self._check(self.lib.emulate_large_blocks_sumsq(
            DTYPE_CODE[g.dtype], g.data_ptr(), _ptr(inv_scale), tiles.data_ptr(), tiles.shape[0], blocks.data_ptr(),
            blocks.shape[0], partial.data_ptr(), block_sums.data_ptr(), self._aligned(g),
        ))

    def large_blocks_update(self, p, g, m, m_scales, v, coef, tiles, blocks, block_sums, rounding):
        self._check(self.lib.emulate_large_blocks_update(
            *self._state(p, g, m, v, coef, m_scales), tiles.data_ptr(), tiles.shape[0], blocks.data_ptr(),
            blocks.shape[0], block_sums.data_ptr(), self._aligned(p, g, m), int(rounding),
        ))

    def adam_step(self, p, g, m, v, coef, tiles, rounding):
        self._check(self.lib.emulate_adam_step(
            *self._state(p, g, m, v, coef), tiles.data_ptr(), tiles.shape[0], self._aligned(p, g, m), self._aligned(v),
            int(rounding),
        ))


def _emulated_coefficients(lib, group, active, inv_scale, found_inf, clip=None):
    """The coefficient table of this step from the emulated step_coefficients_kernel (advancing
    the group's step counters)."""
    coef = torch.empty(len(group.params), coefficients.NUM_COEFFICIENTS)
    _EmulatedOps(lib).step_coefficients(
        group.steps, group.hparams, coef, active, inv_scale, found_inf, clip, group.round_seed or 0,
        group.round_seed is not None,
    )
    return coef


def _emulated_step(lib, force_scalar=False):
    """A step like ``cuda_step``, through the emulated kernels."""
    ops = _EmulatedOps(lib, force_scalar)
    return BackendStep(
        lambda group, inv_scale=None: fused_sums(group, ops, inv_scale),
        lambda group, sums, *factors: fused_update(group, ops, sums, *factors),
    )


def emulated_optimizer(params, lib, force_scalar=False, **kwargs) -> AdamMini:
    """An AdamMini whose steps run the emulated CUDA kernels: built as a torch-backend optimizer,
    whose step function it replaces (``load_state_dict`` restores the backend's: set it again)."""
    opt = AdamMini(params, backend="torch", **kwargs)
    opt._step_fn = _emulated_step(lib, force_scalar)
    return opt


def _emulated_runs(named, dims, dtype, lib, variants, **opt_kwargs):
    """The torch backend and one optimizer per variant ("fast" or "scalar") stepping through the
    emulated kernels, on clones of ``named``."""
    sets, opts = [], []
    for variant in ("torch",) + tuple(variants):
        params = clone_named(named, dtype=dtype)
        sets.append([p for _, p in params if p.requires_grad])
        torch.manual_seed(0)  # the same stochastic rounding seed for every optimizer
        if variant == "torch":
            opts.append(AdamMini(params, backend="torch", **dims, **KW, **opt_kwargs))
        else:
            opts.append(emulated_optimizer(params, lib, variant == "scalar", **dims, **KW, **opt_kwargs))
    return sets, opts


def _assert_padding_zero(group):
    """Elements between parameters belong to no block: no kernel may write them."""
    for i, p in enumerate(group.params):
        start, end = group.offsets[i] + p.numel(), (group.offsets[i + 1] if i + 1 < len(group.params) else group.numel)
        for buffer in (group.param_buffer, group.m):
            assert not buffer[start:end].any(), (group.layouts[i].name, "padding written")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_emulated_kernels_match_torch_backend(emulator, dtype):
    named, dims = _odd_named()
    sets, opts = _emulated_runs(named, dims, dtype, emulator, ["fast"])
    run_stream(sets, opts, steps=3, seed=9, none_every=4)
    assert_runs_close(sets, opts, steps=3)
    _assert_padding_zero(opts[1]._flat[0])


@pytest.mark.parametrize("dtype, state_dtype", [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.int8)])
def test_emulated_kernels_unaligned_starts_of_aligned_spans(emulator, dtype, state_dtype):
    """Rows and tiles of aligned lengths at unaligned starts (``_sectioned_named``): the scalar
    path, no misaligned vector access (the emulator aborts at one), the torch backend's result,
    bitwise the forced-scalar run's; also with int8 m."""
    named, dims, layouts = _sectioned_named()
    sets, opts = _emulated_runs(named, dims, dtype, emulator, ["fast", "scalar"], state_dtype=state_dtype)
    for opt in opts:
        opt.layout_overrides.update(layouts)
    run_stream(sets, opts, steps=3, seed=14, none_every=4)
    vec = 16 // torch.empty((), dtype=dtype).element_size()
    rows, tiles = unaligned_starts(opts[1], vec)
    assert rows >= 4 and tiles >= 2, (rows, tiles)
    assert_runs_close(sets[:2], opts[:2], steps=3)
    for a, b in zip(sets[1], sets[2]):
        assert torch.equal(a, b)
    for fast, scalar in zip(opts[1]._flat, opts[2]._flat):
        assert torch.equal(fast.v, scalar.v) and torch.equal(fast.m, scalar.m)


def test_emulated_scalar_path_is_bitwise_the_vector_path(emulator):
    """[Note: thread fragments]: both paths hold the same elements in the same slots, so they give
    bitwise the same result (also the same sums of g^2)."""
    named, dims = _odd_named()
    for dtype in (torch.float32, torch.bfloat16):
        sets, opts = _emulated_runs(named, dims, dtype, emulator, ["fast", "scalar"])
        run_stream(sets, opts, steps=2, seed=12, none_every=3)
        for a, b in zip(sets[1], sets[2]):
            assert torch.equal(a, b)
        assert torch.equal(opts[1]._flat[0].v, opts[2]._flat[0].v)
        assert torch.equal(opts[1]._flat[0].m, opts[2]._flat[0].m)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_emulated_kernels_float32_state(emulator, dtype):
    """state_dtype=torch.float32: m float32 beside 16-bit p and g, on both load/store paths."""
    named, dims = _odd_named()
    sets, opts = _emulated_runs(named, dims, dtype, emulator, ["fast", "scalar"], state_dtype=torch.float32)
    run_stream(sets, opts, steps=3, seed=31, none_every=4)
    assert all(opt._flat[0].m.dtype == torch.float32 for opt in opts)
    assert_runs_close(sets[:2], opts[:2], steps=3)
    for a, b in zip(sets[1], sets[2]):
        assert torch.equal(a, b)
    assert torch.equal(opts[1]._flat[0].m, opts[2]._flat[0].m)


def test_emulated_kernels_fused_clipping(emulator):
    """max_grad_norm folds the clip factor into the gradient multiplier: same result as the torch
    backend with the same setting."""
    named, dims = _odd_named()
    sets, opts = _emulated_runs(named, dims, torch.float32, emulator, ["fast"], max_grad_norm=0.5)
    run_stream(sets, opts, steps=3, seed=41, none_every=4)
    assert opts[1].last_grad_norm > 0.5  # the clip was active
    assert_runs_close(sets, opts, steps=3)


def test_emulated_kernels_amp_unscale_and_skip(emulator):
    """AMP (grad_scale / found_inf set on the optimizer, as GradScaler does): the kernels unscale
    like the torch backend, and a step with found_inf set changes nothing."""
    named, dims = _odd_named()
    sets, opts = _emulated_runs(named, dims, torch.float32, emulator, ["fast"])
    for opt in opts:
        opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(0.0)
    run_stream(sets, opts, steps=2, seed=21, none_every=4, grad_scale=lambda i: 1024.0)
    assert_runs_close(sets, opts, steps=2)
    group = opts[1]._flat[0]
    before = [t.clone() for t in (group.param_buffer, group.m, group.v, group.steps)]
    for opt in opts:
        opt.found_inf = torch.tensor(1.0)
    run_stream(sets, opts, steps=1, seed=22, none_every=0, grad_scale=lambda i: float("inf") if i == 2 else 1.0)
    for x, y in zip(before, (group.param_buffer, group.m, group.v, group.steps)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("max_grad_norm", [None, 0.5], ids=["plain", "clipped"])
def test_emulated_kernels_amp_scale_past_float32_squares(emulator, max_grad_norm):
    """An AMP scale of 2^100: finite scaled gradients whose squares overflow float32. The kernels
    square unscaled gradients (rows on chip, the large blocks' tiles with ``inv_scale``), the clip
    factor applied after: the torch backend's result, v finite, no step skipped."""
    named, dims = _odd_named()
    sets, opts = _emulated_runs(named, dims, torch.float32, emulator, ["fast"], max_grad_norm=max_grad_norm)
    for opt in opts:
        opt.grad_scale, opt.found_inf = torch.tensor(2.0**100), torch.tensor(0.0)
    run_stream(sets, opts, steps=2, seed=24, none_every=0, grad_scale=lambda i: 2.0**100)
    assert_runs_close(sets, opts, steps=2)
    group = opts[1]._flat[0]
    assert group.cache["launch_tables"].tiles is not None  # the large blocks' path ran
    assert torch.isfinite(group.v).all() and bool((group.steps == 2).all())
    if max_grad_norm is not None:
        assert torch.isfinite(opts[1].last_grad_norm) and opts[1].last_grad_norm > max_grad_norm


@pytest.mark.parametrize("state_dtype", [None, torch.float32])
def test_emulated_kernels_stochastic_rounding(emulator, state_dtype):
    """The kernels' stochastic rounding gives the torch backend's bits (gradients of +-1 and
    beta1 = 1/2: exact sums and m updates, so the same float32 results), on both load/store
    paths, and not round-to-nearest's. Twelve steps: m gains a significant bit per step, so a
    bfloat16 m (8 bits) is rounded from the ninth on, with its own stream of random bits."""
    named, dims = _odd_named()
    kwargs = dict(state_dtype=state_dtype, betas=(0.5, 0.999))  # beta1 = 1/2: exact m updates
    sets, opts = _emulated_runs(named, dims, torch.bfloat16, emulator, ["fast", "scalar"], stochastic_rounding=True, **kwargs)
    nearest_sets, nearest_opts = _emulated_runs(named, dims, torch.bfloat16, emulator, [], **kwargs)
    run_stream(sets + nearest_sets, opts + nearest_opts, steps=12, seed=51, none_every=4, signs=True)
    for params in sets[1:]:
        for a, b in zip(sets[0], params):
            assert torch.equal(a, b)
    for opt in opts[1:]:
        assert torch.equal(opts[0]._flat[0].m, opt._flat[0].m)
    assert any(not torch.equal(a, b) for a, b in zip(sets[0], nearest_sets[0]))
    assert (state_dtype is None) != torch.equal(opts[0]._flat[0].m, nearest_opts[0]._flat[0].m)  # m rounded too
    _assert_padding_zero(opts[1]._flat[0])


def coefficient_inputs(group, gen):
    """Per-parameter hyperparameters and step counters for the coefficient kernel tests: random
    (lr, weight decay, beta1 in [0.8, 0.99], beta2 in [0.9, 0.9999], eps) and steps below 200 000,
    and two parameters with beta2 near 1 (where beta2^t still matters at large t) at steps past 16
    and 32 bits (3 * 2^16 + 5 and 2^33 + 7: a power taken from the counter's low bits, or from an
    int32 of it, is far off there)."""
    n = len(group.params)
    u = torch.rand(n, 5, generator=gen, dtype=torch.float64)
    hparams = u * torch.tensor([1.0, 0.2, 0.19, 0.0999, 1e-8], dtype=torch.float64) + torch.tensor([1e-4, 0.0, 0.8, 0.9, 0.0], dtype=torch.float64)
    hparams[:2, 3] = torch.tensor([0.99999, 0.9999999], dtype=torch.float64)
    group.set_hparams(hparams)
    steps = torch.randint(0, 200_000, (n,), generator=gen)
    steps[:2] = torch.tensor([3 * 2**16 + 5, 2**33 + 7])
    group.steps.copy_(steps)


@pytest.mark.parametrize("case", ["plain", "idle", "amp", "amp_skip", "scale_only", "skip_only", "clip", "amp_clip", "rounding"])
def test_emulated_coefficient_kernel_matches_torch_ops(emulator, case):
    """The one-launch coefficient kernel writes the table of ``coefficients`` (float64 math,
    rounded once to float32) and advances the same step counters, at large step counts, with
    per-parameter hyperparameters, idle parameters, AMP (unscale and skip; either tensor also
    without the other), a clip factor and rounding keys."""
    named, dims = _odd_named()
    group = _cpu_group(named, dims)
    gen = torch.Generator().manual_seed(17)
    n = len(group.params)
    coefficient_inputs(group, gen)
    active = (torch.rand(n, generator=gen) > 0.3) if case == "idle" else None
    inv_scale = torch.tensor(1 / 1024.0) if case in ("amp", "amp_skip", "scale_only") else None
    found_inf = {"amp": 0.0, "amp_skip": 1.0, "skip_only": 1.0}.get(case)
    found_inf = None if found_inf is None else torch.tensor(found_inf)
    if case == "amp_clip":
        inv_scale, found_inf = torch.tensor(2.0**-40), torch.tensor(0.0)
    clip = torch.tensor(0.3125) if case in ("clip", "amp_clip") else None
    group.round_seed = 123456789 if case == "rounding" else None
    start = group.steps.clone()

    fused = _emulated_coefficients(emulator, group, active, inv_scale, found_inf, clip)
    fused_steps = group.steps.clone()
    group.steps.copy_(start)
    expected = coefficients.next_step_coefficients(group, active, inv_scale, found_inf, clip)
    assert torch.equal(expected[:, coefficients.C_CLIP], torch.full((n,), 1.0 if clip is None else 0.3125))
    assert torch.equal(fused_steps, group.steps)
    assert torch.equal(fused_steps, start) == (case in ("amp_skip", "skip_only"))
    key = coefficients.C_ROUND_KEY
    torch.testing.assert_close(fused[:, :key], expected[:, :key], rtol=2**-22, atol=0)
    assert torch.equal(fused[:, key].contiguous().view(torch.int32), expected[:, key].contiguous().view(torch.int32))


def test_emulated_random_bits_beyond_2_pow_32(emulator):
    """The kernels' hash at flat indices no CPU test buffer reaches (the high word)."""
    from test_stochastic_rounding import HIGH_INDICES, expected_bits

    for key in (0, 12345, 2**32 - 1):
        assert [emulator.emulate_random_bits(key, i) for i in HIGH_INDICES] == expected_bits(key, HIGH_INDICES)


# [Note: offsets past 2^31 on the CPU]
# The kernels address p, g, m as base + start and v as base + index, with start and index read
# from the int64 launch tables. Adding SHIFT to every start (V_SHIFT to every v index) and passing
# base pointers SHIFT (V_SHIFT) elements before the real buffers addresses the very same memory,
# with offsets past 2^31 and byte offsets past 2^32, no big buffer needed: the results must be
# bitwise those of the unshifted step. An offset computed in 32 bits (an int start, an int
# product) lands GiBs away from the buffers instead: wrong results, or a crash. Each pointer the
# kernels form is base + offset inside real memory; only the shifted bases (plain integers
# handed over through ctypes) point outside it, which on x86-64 is just an address. The shifted
# step runs in a forked child, on buffers in shared memory, so that a wild write or a crash
# fails this test and nothing else. (No stochastic rounding: its bits hash the flat index.)
SHIFT = 2**31 + 2**23  # a multiple of 16 elements: every span keeps its alignment, so its path
V_SHIFT = 2**31 + 2**20  # a multiple of 4 floats: the Adam tiles' v alignment too


def _fixed_coefficients(num_params):
    C = coefficients
    row = {C.C_DECAY: 0.999, C.C_STEP_SIZE: 1e-2, C.C_BC2_SQRT: 0.3, C.C_EPS: 1e-8, C.C_BETA2: 0.999,
           C.C_V_WEIGHT: 1e-3, C.C_M_WEIGHT: 0.1, C.C_GRAD_SCALE: 1.0, C.C_CLIP: 1.0}
    coef = torch.zeros(num_params, C.NUM_COEFFICIENTS)
    for column, value in row.items():
        coef[:, column] = value
    return coef


def _emulated_kernel_calls(lib, x, tables, shift, v_shift):
    """One step of every kernel (large-block sums, each row class, large-block update, Adam
    tiles) over the buffers ``x``, with ``tables`` whose starts carry ``shift`` and v indices
    ``v_shift``; the base pointers are moved back by as much. Only ctypes calls: safe in a forked
    child. Returns the number of failed kernel asserts (or -1: unknown dtype)."""
    p, g, m, v = x["p"], x["g"], x["m"], x["v"]
    code = DTYPE_CODE[p.dtype]
    es = p.element_size()
    p_, g_, m_ = (t.data_ptr() - shift * es for t in (p, g, m))
    v_ = v.data_ptr() - v_shift * v.element_size()
    scales, coef = x["m_scales"].data_ptr(), x["coef"].data_ptr()
    aligned = int(all(t.data_ptr() % 16 == 0 for t in (p, g, m)))
    failures = lib.emulate_large_blocks_sumsq(code, g_, None, tables["tiles"].data_ptr(), tables["tiles"].shape[0],
                                              tables["blocks"].data_ptr(), tables["blocks"].shape[0],
                                              x["partial"].data_ptr(), x["block_sums"].data_ptr(), aligned)
    for width, rows in tables["rows"]:
        failures += lib.emulate_rows_step(code, p_, g_, m_, scales, v_, coef, rows.data_ptr(), rows.shape[0], width,
                                          aligned, 0)
    failures += lib.emulate_large_blocks_update(code, p_, g_, m_, scales, v_, coef, tables["tiles"].data_ptr(),
                                                tables["tiles"].shape[0], tables["blocks"].data_ptr(),
                                                tables["blocks"].shape[0], x["block_sums"].data_ptr(), aligned, 0)
    failures += lib.emulate_adam_step(code, p_, g_, m_, v_, coef, tables["adam"].data_ptr(), tables["adam"].shape[0],
                                      aligned, int(v.data_ptr() % 16 == 0), 0)
    return failures


def _shifted_tables(tables, shift, v_shift):
    """The launch tables with ``shift`` added to every start and ``v_shift`` to every v index."""
    T = launch_tables

    def moved(table, start_col, v_col):
        table = table.clone()
        if start_col is not None:
            table[:, start_col] += shift
        if v_col is not None:
            table[:, v_col] += v_shift
        return table

    return dict(
        rows=[(width, moved(rows, T.ROW_START, T.ROW_V)) for width, rows in tables.row_classes],
        tiles=moved(tables.tiles, T.TILE_START, None),
        blocks=moved(tables.blocks, None, T.LB_V),
        adam=moved(tables.adam, T.ROW_START, T.ROW_V),
    )


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_kernels_with_offsets_beyond_int32(emulator, dtype):
    """[Note: offsets past 2^31 on the CPU]: the row, large-block (tile) and Adam kernels with
    every start past element 2^31 and every v index past 2^31, against the same step unshifted."""
    named, dims = _odd_named()
    group = _cpu_group(named, dims)
    tables = build_launch_tables(group)
    gen = torch.Generator().manual_seed(61)
    start = dict(
        p=torch.randn(group.numel, generator=gen).to(dtype), g=torch.randn(group.numel, generator=gen).to(dtype),
        m=(0.1 * torch.randn(group.numel, generator=gen)).to(dtype), v=torch.rand(group.num_v, generator=gen) * 1e-3,
        m_scales=torch.empty(0), coef=_fixed_coefficients(len(group.params)),
        partial=tables.partial, block_sums=tables.block_sums,
    )
    runs = []
    for shift, v_shift in ((0, 0), (SHIFT, V_SHIFT)):
        x = {k: t.clone().share_memory_() for k, t in start.items()}
        moved = _shifted_tables(tables, shift, v_shift)
        runs.append(x)
        if shift == 0:
            assert _emulated_kernel_calls(emulator, x, moved, 0, 0) == 0
            continue
        assert min(int(r[:, launch_tables.ROW_START].min()) for _, r in moved["rows"]) > 2**31
        assert int(moved["tiles"][:, launch_tables.TILE_START].min()) > 2**31
        assert int(moved["adam"][:, launch_tables.ROW_V].min()) > 2**31
        assert all(x[k].data_ptr() > SHIFT * x[k].element_size() for k in ("p", "g", "m", "v"))
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: ctypes calls only, then leave without any clean-up
            try:
                os._exit(min(_emulated_kernel_calls(emulator, x, moved, shift, v_shift), 100) & 0xFF)
            except BaseException:
                os._exit(101)
        _, status = os.waitpid(pid, 0)
        assert not os.WIFSIGNALED(status), f"the shifted step died of signal {os.WTERMSIG(status)} (a 32-bit offset?)"
        assert os.WEXITSTATUS(status) == 0, f"the shifted step failed: exit status {os.WEXITSTATUS(status)}"
    unshifted, shifted = runs
    for key in ("p", "m", "v", "partial", "block_sums"):
        assert not torch.equal(unshifted[key], start[key]), key  # the step wrote it
        assert torch.equal(unshifted[key], shifted[key]), key


@pytest.mark.parametrize("model_name", ["nanogpt_beyond_official", "llama_gqa", "cnn"])
def test_emulated_kernels_on_model_trees(emulator, model_name):
    named, dims = _model_named(model_name)
    sets, opts = _emulated_runs(named, dims, torch.float32, emulator, ["fast"])
    run_stream(sets, opts, steps=3, seed=sum(map(ord, model_name)))
    assert_runs_close(sets, opts, steps=3)


# -- GPU: parity -----------------------------------------------------------------------------------

@gpu
@needs_gpu
def test_the_extension_has_an_image_for_this_gpu(backend):
    """The real runtime answer of [Note: kernel images] on the GPU the suite runs on (built for
    it): True, so the availability check lets the backend run."""
    index = torch.cuda.current_device()
    assert backend._C.has_kernel_image(index) is True
    assert dispatch.BACKENDS["cuda"].why_not([torch.device("cuda", index)]) is None


@gpu
@needs_gpu
@pytest.mark.parametrize("model_name", ["nanogpt_beyond_official", "llama_gqa", "gpt2_tied", "cnn"])
def test_matches_torch_backend_fp32(backend, model_name):
    named, dims = _model_named(model_name)
    sets, opts = backend_runs(named, dims, torch.float32, ("torch", "cuda"), DEVICE, **KW)
    run_stream(sets, opts, steps=4, seed=sum(map(ord, model_name)))
    assert_runs_close(sets, opts, steps=4)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("model_name", ["nanogpt_beyond_official", "llama_gqa"])
def test_matches_torch_backend_low_precision(backend, model_name, dtype):
    named, dims = _model_named(model_name)
    sets, opts = backend_runs(named, dims, dtype, ("torch", "cuda"), DEVICE, **KW)
    run_stream(sets, opts, steps=3, seed=11)
    assert_runs_close(sets, opts, steps=3)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_odd_sizes(backend, dtype):
    named, dims = _odd_named()
    sets, opts = backend_runs(named, dims, dtype, ("torch", "cuda"), DEVICE, **KW)
    run_stream(sets, opts, steps=3, seed=9, none_every=4)
    tables = opts[1]._flat[0].cache["launch_tables"]
    assert tables.tiles is not None and tables.adam is not None and len(tables.row_classes) >= 2
    assert_runs_close(sets, opts, steps=3)


@gpu
@needs_gpu
def test_matches_official(backend):
    Adam_mini = pytest.importorskip("adam_mini").Adam_mini

    named, dims = _model_named("llama_gqa")
    ours = clone_named(named, device=DEVICE)
    theirs = clone_named(named, device=DEVICE)
    opts = [Adam_mini(theirs, **dims, **KW), AdamMini(ours, backend="cuda", **dims, **KW)]
    sets = [[p for _, p in theirs], [p for _, p in ours]]
    run_stream(sets, opts, steps=10, seed=3, none_every=0)
    for a, b in zip(*sets):
        assert max_rel_err(a, b) <= 1e-5


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tree", ["odd", "llama_gqa"])
def test_matches_triton_backend(backend, tree, dtype):
    """Same tables, same decomposition, same math: equal up to float32 summation order."""
    pytest.importorskip("triton")
    named, dims = _odd_named() if tree == "odd" else _model_named(tree)
    sets, opts = backend_runs(named, dims, dtype, ("triton", "cuda"), DEVICE, **KW)
    run_stream(sets, opts, steps=4, seed=21)
    assert_runs_close(sets, opts, steps=4)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_deterministic(backend, dtype):
    named, dims = _odd_named()
    sets, opts = backend_runs(named, dims, dtype, ("cuda", "cuda"), DEVICE, **KW)
    run_stream(sets, opts, steps=3, seed=4)
    for a, b in zip(*sets):
        assert torch.equal(a, b)
    for fa, fb in zip(opts[0]._flat, opts[1]._flat):
        assert torch.equal(fa.v, fb.v) and torch.equal(fa.m, fb.m)


# -- GPU: the operators as torch sees them ---------------------------------------------------------


def _gpu_inputs(dtype=torch.float32, seed=0):
    """Real CUDA flat buffers, tables and a coefficient table of the odd set, random state."""
    real = _cpu_inputs(dtype)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    out = {}
    for key in ("p", "g", "m"):
        out[key] = torch.randn(real[key].shape, generator=gen, device="cuda").to(dtype)
    out["m_scales"] = torch.empty(0, device="cuda")
    out["v"] = torch.rand(real["v"].shape, generator=gen, device="cuda")
    C = coefficients
    row = {C.C_DECAY: 0.999, C.C_STEP_SIZE: 1e-3, C.C_BC2_SQRT: 0.3, C.C_EPS: 1e-8, C.C_BETA2: 0.999,
           C.C_V_WEIGHT: 1e-3, C.C_M_WEIGHT: 0.1, C.C_GRAD_SCALE: 1.0, C.C_CLIP: 1.0}
    coef = torch.zeros(C.NUM_COEFFICIENTS)
    for column, value in row.items():
        coef[column] = value
    coef = coef.repeat(real["coef"].shape[0], 1)
    coef[:, C.C_ROUND_KEY] = rounding.keys_as_float(torch.arange(coef.shape[0]) * 7919 + 12345)
    out["coef"] = coef.cuda()
    out["rows"] = [(w, r.cuda()) for w, r in real["rows"]]
    for key in ("tiles", "blocks", "adam"):
        out[key] = real[key].cuda()
    out["partial"] = real["partial"].cuda()
    out["block_sums"] = real["block_sums"].cuda()
    out["steps"] = torch.randint(0, 1000, real["steps"].shape, generator=gen, device="cuda")
    out["hparams"] = real["hparams"].cuda()
    return out


def _call_all(x, rounding=False):
    ops = torch.ops.adam_mini_kernels
    ops.step_coefficients(x["steps"], x["hparams"], x["coef"], None, None, None, None, 12345, rounding)
    ops.large_blocks_sumsq(x["g"], None, x["tiles"], x["blocks"], x["partial"], x["block_sums"])
    for width, rows in x["rows"]:
        ops.rows_step(x["p"], x["g"], x["m"], x["m_scales"], x["v"], x["coef"], rows, width, rounding)
    ops.large_blocks_update(
        x["p"], x["g"], x["m"], x["m_scales"], x["v"], x["coef"], x["tiles"], x["blocks"], x["block_sums"], rounding
    )
    ops.adam_step(x["p"], x["g"], x["m"], x["v"], x["coef"], x["adam"], rounding)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype, rounding", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_opcheck(backend, dtype, rounding):
    """Schema (exactly what each operator mutates), fake implementation and AOT dispatch, on real
    inputs."""
    x = _gpu_inputs(dtype)
    base = (x["p"], x["g"], x["m"], x["m_scales"], x["v"], x["coef"])
    width, rows = x["rows"][-1]
    torch.library.opcheck(torch.ops.adam_mini_kernels.rows_step.default, base + (rows, width, rounding))
    sumsq = (x["g"], None, x["tiles"], x["blocks"], x["partial"], x["block_sums"])
    torch.library.opcheck(torch.ops.adam_mini_kernels.large_blocks_sumsq.default, sumsq)
    torch.library.opcheck(torch.ops.adam_mini_kernels.large_blocks_sumsq.default, (x["g"], torch.ones((), device="cuda")) + sumsq[2:])
    torch.ops.adam_mini_kernels.large_blocks_sumsq(*sumsq)  # opcheck ran on copies: real sums for the update
    assert (x["block_sums"] > 0).all()
    torch.library.opcheck(
        torch.ops.adam_mini_kernels.large_blocks_update.default,
        base + (x["tiles"], x["blocks"], x["block_sums"], rounding),
    )
    adam_args = (x["p"], x["g"], x["m"], x["v"], x["coef"], x["adam"], rounding)
    torch.library.opcheck(torch.ops.adam_mini_kernels.adam_step.default, adam_args)
    amp = (torch.ones((), device="cuda"), torch.zeros((), device="cuda"))
    torch.library.opcheck(
        torch.ops.adam_mini_kernels.step_coefficients.default,
        (x["steps"], x["hparams"], x["coef"], x["steps"] > 500) + amp + (torch.full((), 0.5, device="cuda"), 12345, rounding),
    )


@gpu
@needs_gpu
def test_torch_compile_fullgraph(backend):
    eager, compiled = _gpu_inputs(seed=1), _gpu_inputs(seed=1)
    _call_all(eager)
    torch.compile(_call_all, fullgraph=True)(compiled)
    for key in ("p", "m", "v"):
        assert torch.equal(eager[key], compiled[key]), key


@gpu
@needs_gpu
def test_cuda_graph_capture(backend):
    eager, captured = _gpu_inputs(seed=2), _gpu_inputs(seed=2)
    for _ in range(2):
        _call_all(eager)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        warm = _gpu_inputs(seed=3)
        _call_all(warm)  # warm-up outside the graph, as CUDA graphs want
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _call_all(captured)
    # Capture does not run the kernels: replaying twice is two steps.
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    for key in ("p", "m", "v"):
        assert torch.equal(eager[key], captured[key]), key


# Bad inputs of the operators, each with what its error says (the launchers' wording and the
# fake implementations' alike): (id, operator, arguments from the inputs x, message, whether the
# fake implementation can tell; it sees no data, and no strides: contiguity is the launchers').
BAD_INPUTS = [
    ("g_dtype", "rows_step", lambda x, w, r: (x["p"], x["g"].half(), x["m"], x["m_scales"], x["v"], x["coef"], r, w, False),
     r"rows_step: g has dtype", True),
    ("g_numel", "rows_step", lambda x, w, r: (x["p"], x["g"][:-1], x["m"], x["m_scales"], x["v"], x["coef"], r, w, False),
     r"rows_step: g has (shape|\d+ elements)", True),
    ("p_2d", "rows_step", lambda x, w, r: (x["p"][None], x["g"], x["m"], x["m_scales"], x["v"], x["coef"], r, w, False),
     r"rows_step: p must be 1-D", True),
    ("m_strided", "rows_step",
     lambda x, w, r: (x["p"], x["g"], torch.stack([x["m"], x["m"]], 1)[:, 0], x["m_scales"], x["v"], x["coef"], r, w, False),
     r"rows_step: m must be contiguous", False),
    ("v_dtype", "rows_step", lambda x, w, r: (x["p"], x["g"], x["m"], x["m_scales"], x["v"].double(), x["coef"], r, w, False),
     r"rows_step: v must be (1-D )?float32", True),
    ("v_device", "rows_step", lambda x, w, r: (x["p"], x["g"], x["m"], x["m_scales"], x["v"].cpu(), x["coef"], r, w, False),
     r"rows_step: v is on cpu", True),
    ("coef_cols", "rows_step",
     lambda x, w, r: (x["p"], x["g"], x["m"], x["m_scales"], x["v"], x["coef"][:, :4].contiguous(), r, w, False),
     r"rows_step: coef must be a float32", True),
    ("scales_dtype", "rows_step", lambda x, w, r: (x["p"], x["g"], x["m"], x["m_scales"].double(), x["v"], x["coef"], r, w, False),
     r"rows_step: m_scales must be (a 1-D )?float32", True),
    ("int8_m_no_scales", "rows_step",
     lambda x, w, r: (x["p"], x["g"], x["m"].to(torch.int8), x["m_scales"], x["v"], x["coef"], r, w, False),
     r"rows_step: int8 m needs its quantization scales", True),
    ("rows_dtype", "rows_step", lambda x, w, r: (x["p"], x["g"], x["m"], x["m_scales"], x["v"], x["coef"], r.int(), w, False),
     r"rows_step: rows must be an int64", True),
    ("rows_device", "rows_step", lambda x, w, r: (x["p"], x["g"], x["m"], x["m_scales"], x["v"], x["coef"], r.cpu(), w, False),
     r"rows_step: rows is on cpu", True),
    ("width", "rows_step",
     lambda x, w, r: (x["p"], x["g"], x["m"], x["m_scales"], x["v"], x["coef"], r, launch_tables.ROW_MAX * 2, False),
     r"rows_step: width must be in", True),
    ("p_dtype", "rows_step",
     lambda x, w, r: (x["p"].double(), x["g"].double(), x["m"].double(), x["m_scales"], x["v"], x["coef"], r, w, False),
     r"rows_step: p must be float32, bfloat16 or float16", True),
    ("sumsq_g_2d", "large_blocks_sumsq", lambda x, w, r: (x["g"][None], None, x["tiles"], x["blocks"], x["partial"], x["block_sums"]),
     r"large_blocks_sumsq: g must be 1-D", True),
    ("sumsq_tiles_cols", "large_blocks_sumsq",
     lambda x, w, r: (x["g"], None, x["tiles"][:, :2].contiguous(), x["blocks"], x["partial"], x["block_sums"]),
     r"large_blocks_sumsq: tiles must be an int64", True),
    ("sumsq_partial", "large_blocks_sumsq", lambda x, w, r: (x["g"], None, x["tiles"], x["blocks"], x["partial"][:1], x["block_sums"]),
     r"large_blocks_sumsq: partial must be float32 with one slot per tile", True),
    ("sumsq_sums_device", "large_blocks_sumsq",
     lambda x, w, r: (x["g"], None, x["tiles"], x["blocks"], x["partial"], x["block_sums"].cpu()),
     r"large_blocks_sumsq: block_sums is on cpu", True),
    ("update_sums", "large_blocks_update",
     lambda x, w, r: (x["p"], x["g"], x["m"], x["m_scales"], x["v"], x["coef"], x["tiles"], x["blocks"], x["block_sums"][:0], False),
     r"large_blocks_update: block_sums must be float32 with one slot per block", True),
    ("update_blocks_device", "large_blocks_update",
     lambda x, w, r: (x["p"], x["g"], x["m"], x["m_scales"], x["v"], x["coef"], x["tiles"], x["blocks"].cpu(), x["block_sums"], False),
     r"large_blocks_update: blocks is on cpu", True),
    ("adam_int8_m", "adam_step", lambda x, w, r: (x["p"], x["g"], x["m"].to(torch.int8), x["v"], x["coef"], x["adam"], False),
     r"adam_step: m has dtype", True),
    ("adam_tiles_device", "adam_step", lambda x, w, r: (x["p"], x["g"], x["m"], x["v"], x["coef"], x["adam"].cpu(), False),
     r"adam_step: tiles is on cpu", True),
    ("adam_rounding", "adam_step", lambda x, w, r: (x["p"], x["g"], x["m"], x["v"], x["coef"], x["adam"], True),
     r"adam_step: stochastic_rounding needs bfloat16 p", True),
    ("steps_dtype", "step_coefficients", lambda x, w, r: (x["steps"].int(), x["hparams"], x["coef"], None, None, None, None, 0, False),
     r"step_coefficients: steps must be (1-D )?int64", True),
    ("hparams_dtype", "step_coefficients",
     lambda x, w, r: (x["steps"], x["hparams"].float(), x["coef"], None, None, None, None, 0, False),
     r"step_coefficients: hparams must be a float64", True),
    ("hparams_device", "step_coefficients",
     lambda x, w, r: (x["steps"], x["hparams"].cpu(), x["coef"], None, None, None, None, 0, False),
     r"step_coefficients: hparams is on cpu", True),
    ("coef_rows", "step_coefficients", lambda x, w, r: (x["steps"], x["hparams"], x["coef"][:1], None, None, None, None, 0, False),
     r"step_coefficients: coef must be a float32", True),
    ("active_dtype", "step_coefficients",
     lambda x, w, r: (x["steps"], x["hparams"], x["coef"], x["steps"], None, None, None, 0, False),
     r"step_coefficients: active must be a bool tensor", True),
    ("inv_scale_dtype", "step_coefficients",
     lambda x, w, r: (x["steps"], x["hparams"], x["coef"], None, x["coef"][0, :1].double(), None, None, 0, False),
     r"step_coefficients: inv_scale must be a one-element float32 tensor", True),
    ("clip_numel", "step_coefficients",
     lambda x, w, r: (x["steps"], x["hparams"], x["coef"], None, None, None, x["coef"][0, :2], 0, False),
     r"step_coefficients: clip must be a one-element float32 tensor", True),
    ("sumsq_inv_scale_device", "large_blocks_sumsq",
     lambda x, w, r: (x["g"], torch.ones(()), x["tiles"], x["blocks"], x["partial"], x["block_sums"]),
     r"large_blocks_sumsq: inv_scale is on cpu", True),
    ("found_inf_numel", "step_coefficients",
     lambda x, w, r: (x["steps"], x["hparams"], x["coef"], None, None, x["coef"][0, :2], None, 0, False),
     r"step_coefficients: found_inf must be a one-element float32 tensor", True),
] + [  # rounding.SEED_BOUND, the fake implementations' bound too
    (f"seed_{seed}", "step_coefficients", lambda x, w, r, seed=seed: (x["steps"], x["hparams"], x["coef"], None, None, None, None, seed, False),
     r"step_coefficients: round_seed must be in \[0, 2\^31\)", True)
    for seed in (-1, 2**31)
]


@gpu
@needs_gpu
@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_launchers_check_their_inputs(backend, case):
    _, op, args, message, _ = case
    x = _gpu_inputs()
    width, rows = x["rows"][0]
    with pytest.raises(RuntimeError, match=message):
        getattr(torch.ops.adam_mini_kernels, op)(*args(x, width, rows))


@pytest.mark.parametrize("operators", ["cuda", "triton"])
def test_fake_implementations_refuse_what_the_launchers_refuse(operators, request):
    """Under FakeTensorMode (what torch.compile traces with) each operator's fake implementation
    refuses the bad inputs it can see, with the launchers' message, for both backends' operators
    (the CUDA extension's and the Triton backend's ``triton_*``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if operators == "cuda":
        request.getfixturevalue("backend")  # the extension's operators (skips where it is not built)
        prefix = ""
    else:
        pytest.importorskip("triton")
        import adam_mini_kernels.triton_kernels.ops  # noqa: F401  (registers the triton_* operators)

        prefix = "triton_"
    real = _cpu_inputs()
    checked = [c for c in BAD_INPUTS if c[4]]
    missed = []
    with FakeTensorMode():
        x = {k: _fake_like(t) for k, t in real.items() if torch.is_tensor(t)}
        width, rows = real["rows"][0]
        for case_id, op, args, message, _ in checked:
            try:
                getattr(torch.ops.adam_mini_kernels, prefix + op)(*args(x, width, _fake_like(rows)))
                missed.append((case_id, "accepted"))
            except RuntimeError as err:
                if not re.search(message, str(err)):
                    missed.append((case_id, str(err)))
    assert missed == []
    assert len(checked) == len(BAD_INPUTS) - 1  # all but contiguity


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")  # the interpreter's 0 / 0, not selected
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda-emulated", pytest.param("cuda", marks=[gpu, needs_gpu])])
def test_never_stepped_idle_parameters_stay_still_with_eps_zero(backend, request):
    """eps = 0 and parameters that never had a gradient (v = 0): h = 0 and their step size over h
    is 0 / 0; idle parameters must still not move (step size 0 is selected, not divided), on every
    backend's kernels: rows, a large block, Adam tiles. Triton on CUDA tensors where there is a
    GPU (CPU tensors need its interpreter, which is off there)."""
    device = torch.device("cpu")
    if backend == "triton":
        pytest.importorskip("triton")
    if backend == "cuda":
        _import_backend()
    if backend in ("cuda", "triton") and HAS_GPU:
        device = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator().manual_seed(11)
    shapes = (("mlp.weight", (4, 8)), ("ln.weight", (8,)), ("mlp.bias", (4,)), ("wte.weight", (3, 8)),
              ("big.weight", (2 * launch_tables.ROW_MAX + 8,)))
    named = [(n, torch.nn.Parameter(torch.randn(s, generator=gen).to(device))) for n, s in shapes]
    if backend == "cuda-emulated":
        opt = emulated_optimizer(named, request.getfixturevalue("emulator"), eps=0.0, verbose=False)
    else:
        opt = AdamMini(named, eps=0.0, verbose=False, backend=backend)
    before = [p.detach().clone() for _, p in named]
    named[0][1].grad = torch.randn(4, 8, generator=gen).to(device)
    opt.step()
    assert not torch.equal(named[0][1].detach(), before[0])
    for (n, p), b in zip(named[1:], before[1:]):
        assert torch.equal(p.detach(), b), n
