"""Compile every Triton kernel of the step, in every configuration the launcher uses, to GPU
machine code (PTX and cubin) for the archs given, without a GPU.

Triton's CPU interpreter (what CI runs the kernels with) does not type-check or lower the kernels
as the compiler does, so a kernel can pass every interpreter test and still fail to compile on a
GPU. ``triton.compile`` with an explicit ``GPUTarget`` needs no device, only Triton's bundled
``ptxas``. Pointer arguments are compiled as the JIT specializes the optimizer's buffers (16-byte
aligned), and the streaming kernels must then have 128-bit accesses in their aligned branch
beside the scalar fallback ([Note: aligned spans] in kernels.py). An int argument is compiled
also as each value the JIT specializes (1 as a constexpr, multiples of 16), unless the kernel
marks it do_not_specialize: the interpreter never sees those variants. Each kernel is compiled
with the launcher's options, and the update kernels must then hold fused multiply-adds whatever
Triton's default ([Note: FMA contraction] in launch.py; the test runs this with that default
turned off), and no kernel an approximate square root or division ([Note: IEEE sqrt and
division] in kernels.py). A row kernel of more than one warp must have a barrier between its
threads' loads of the block's v and the one thread's store of the new v ([Note: one v per
program] in kernels.py). Run by tests/test_triton_compile.py in a process without
TRITON_INTERPRET:

    python tests/compile_triton_kernels.py 90 80
"""

from __future__ import annotations

import os
import re
import sys
import time

STORAGE = {  # (parameter/gradient dtype, m dtype) pairs the optimizer creates
    "fp32": ("fp32", "fp32"),
    "bf16": ("bf16", "bf16"),
    "fp16": ("fp16", "fp16"),
    "bf16, fp32 state": ("bf16", "fp32"),
    "fp16, fp32 state": ("fp16", "fp32"),
    "fp32, int8 state": ("fp32", "i8"),
    "bf16, int8 state": ("bf16", "i8"),
    "fp16, int8 state": ("fp16", "i8"),
}


def configurations():
    """(name, kernel, signature, constexprs, num_warps) for everything ``launch.py`` launches."""
    from adam_mini_kernels.launch_tables import ADAM_TILE, MIN_ROW_BLOCK, ROW_MAX, TILE
    from adam_mini_kernels.quantization import QBLOCK
    from adam_mini_kernels.triton_kernels import kernels as K
    from adam_mini_kernels.triton_kernels.launch import CHUNK, COEF_BLOCK, _warps

    widths = [1 << k for k in range(MIN_ROW_BLOCK.bit_length() - 1, ROW_MAX.bit_length())]
    tables = {"scales_ptr": "*fp32", "v_ptr": "*fp32", "coef_ptr": "*fp32", "rows_ptr": "*i64", "tiles_ptr": "*i64",
              "blocks_ptr": "*i64"}
    for label, (dtype, state) in STORAGE.items():
        buffers = {"p_ptr": f"*{dtype}", "g_ptr": f"*{dtype}", "m_ptr": f"*{state}", **tables}
        for rounding in (False, True) if dtype == "bf16" else (False,):
            tag = f"{label}{', stochastic rounding' if rounding else ''}"
            for block in widths:  # every row class the launch tables make
                yield (f"rows_step BLOCK={block} ({tag})", K.rows_step_kernel, buffers,
                       {"BLOCK": block, "QCHUNK": min(block, QBLOCK), "ROUNDING": rounding}, _warps(block))
            yield (f"tile_step ({tag})", K.tile_step_kernel, buffers, {"TILE": TILE, "ROUNDING": rounding}, 8)
            if state != "i8":  # Adam blocks never have an int8 m
                yield (f"adam_step ({tag})", K.adam_step_kernel, buffers, {"TILE": ADAM_TILE, "ROUNDING": rounding}, 4)
        for has_amp in (False, True):
            yield (f"tile_sumsq ({label}{', AMP' if has_amp else ''})", K.tile_sumsq_kernel,
                   {"g_ptr": f"*{dtype}", "inv_scale_ptr": "*fp32", "tiles_ptr": "*i64", "partial_ptr": "*fp32"},
                   {"HAS_AMP": has_amp, "TILE": TILE}, 8)
    yield ("block_sumsq", K.block_sumsq_kernel,
           {"partial_ptr": "*fp32", "blocks_ptr": "*i64", "sums_ptr": "*fp32"}, {"CHUNK": CHUNK}, 4)
    yield ("large_block_v", K.large_block_v_kernel,
           {"v_ptr": "*fp32", "coef_ptr": "*fp32", "sums_ptr": "*fp32", "blocks_ptr": "*i64"}, {}, 1)
    coef_args = {"steps_ptr": "*i64", "active_ptr": "*i1", "hp_ptr": "*fp64", "coef_ptr": "*fp32",
                 "inv_scale_ptr": "*fp32", "found_inf_ptr": "*fp32", "clip_ptr": "*fp32", "num_params": "i32",
                 "round_seed": "i32"}
    for has_active in (False, True):
        for has_amp in (False, True):
            for has_clip in (False, True):
                for rounding in (False, True):
                    flags = {"HAS_ACTIVE": has_active, "HAS_AMP": has_amp, "HAS_CLIP": has_clip, "ROUNDING": rounding,
                             "BLOCK": COEF_BLOCK}
                    yield (f"step_coefficients {flags}", K.step_coefficients_kernel, coef_args, flags, 4)


# Kernels that stream p, g and m (programs of at least 1024 elements: one 16-byte unit per thread
# and more): their aligned branch must use vector accesses.
STREAMING = tuple(f"rows_step BLOCK={b} " for b in (1024, 2048, 4096, 8192)) + ("tile_step", "tile_sumsq", "adam_step")
# Kernels that update p and m (decay * p - scale * m and the like): contracted into FMAs.
UPDATES = ("rows_step", "tile_step", "adam_step")
# What Triton's tl.sqrt and float32 `/` lower to: no kernel may hold them ([Note: IEEE sqrt and
# division] in kernels.py; the interpreter computes both exactly).
APPROXIMATE = ("sqrt.approx", "div.full", "div.approx", "rcp.approx", "rsqrt.approx")


def value_specializations(kernel, args):
    """(label, constexprs, attrs) of the variants the JIT compiles for the values of the kernel's
    int arguments, beside the plain one: an argument equal to 1 becomes a constexpr and one that
    is a multiple of 16 gets that divisibility, unless the kernel marks it do_not_specialize."""
    yield "", {}, {}
    for param in kernel.params:
        if param.is_constexpr or param.do_not_specialize or not args[param.name].startswith("i"):
            continue
        yield f" [{param.name} = 1]", {param.name: 1}, {}
        yield f" [{param.name} % 16 = 0]", {}, {(param.num,): [["tt.divisibility", 16]]}


def variants():
    """configurations() with the value specializations of each one's int arguments."""
    for name, kernel, args, constexprs, num_warps in configurations():
        for label, values, attrs in value_specializations(kernel, args):
            yield name + label, kernel, args, {**constexprs, **values}, attrs, num_warps


def _v_store_follows_barrier(ptx):
    """Whether a barrier separates the block's v load from its store in a rows_step kernel: the
    store is the kernel's first scalar store made by one thread (predicated, ``[ %rd + 0 ]``),
    the load the last one from the same address before it."""
    lines = ptx.splitlines()
    store = next(i for i, line in enumerate(lines) if re.search(r"@%p\d+ st\.global\.b32 \[ %rd\d+ \+ 0 \]", line))
    address = re.search(r"\[ (%rd\d+) \+ 0 \]", lines[store]).group(1)
    load = max(i for i in range(store) if "ld.global" in lines[i] and f"[ {address} + 0 ]" in lines[i])
    return any("bar.sync" in line or "barrier.sync" in line for line in lines[load:store])


def compile_all(archs):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from adam_mini_kernels.triton_kernels.launch import LAUNCH_OPTIONS

    count = 0
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for name, kernel, args, constexprs, value_attrs, num_warps in variants():
            # The kernel's own arguments, in order: pointers/scalars typed, the rest constexpr;
            # pointers 16-byte aligned, as the JIT specializes the optimizer's buffers.
            signature = {arg: "constexpr" if arg in constexprs else args[arg] for arg in kernel.arg_names}
            aligned = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(kernel.arg_names)
                       if arg not in constexprs and args[arg].startswith("*")}
            source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs={**aligned, **value_attrs})
            try:
                compiled = triton.compile(source, target=target, options={"num_warps": num_warps, **LAUNCH_OPTIONS})
            except Exception as err:  # report which configuration, then fail
                raise RuntimeError(f"sm_{arch}: {name} does not compile: {err}") from err
            assert compiled.asm.get("cubin"), f"sm_{arch}: {name}: no cubin"
            if name.startswith(STREAMING):  # tile_sumsq only loads
                accesses = ("ld.global.v4",) if name.startswith("tile_sumsq") else ("ld.global.v4", "st.global.v4")
                for access in accesses:
                    assert access in compiled.asm["ptx"], f"sm_{arch}: {name}: no 128-bit access ({access}) in the aligned branch"
            if name.startswith(UPDATES):
                assert "fma.rn.f32" in compiled.asm["ptx"], f"sm_{arch}: {name}: no fused multiply-add in the update"
            if name.startswith("rows_step") and num_warps > 1:
                assert _v_store_follows_barrier(compiled.asm["ptx"]), \
                    f"sm_{arch}: {name}: no barrier between the loads of v and its store ([Note: one v per program])"
            approximate = [op for op in APPROXIMATE if op in compiled.asm["ptx"]]
            assert not approximate, f"sm_{arch}: {name}: approximate {approximate} in the PTX ([Note: IEEE sqrt and division])"
            count += 1
    return count


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter replaces the kernels this script compiles")
    start = time.perf_counter()
    n = compile_all([int(a) for a in sys.argv[1:]] or [90])
    print(f"compiled {n} kernel configurations in {time.perf_counter() - start:.1f} s")
