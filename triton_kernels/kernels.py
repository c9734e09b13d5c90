"""Triton kernels of the fused Adam-mini step, one per kind of work of the launch tables (see
[Note: launch tables] in ``adam_mini_kernels/launch_tables.py``); ``launch.py`` launches them.

* ``rows_step_kernel``: one program per small block (a row, a head, a norm weight), held in
  registers: sum of g^2, v update, m and p in one pass (fp32: read p, g, m; write p, m = 20 B).
* ``tile_sumsq_kernel``, ``block_sumsq_kernel``, ``large_block_v_kernel``, ``tile_step_kernel``:
  the phases of a large block (or a block split across ranks), deterministic (fixed slots, fixed
  order), no atomics; a sharded group all-reduces the split blocks' sums between the second and
  the third.
* ``adam_step_kernel``: Adam blocks (biases), one v per element.
* ``step_coefficients_kernel``: advances the step counters and writes the coefficient table, the
  same table as ``coefficients.step_coefficients`` in one launch.

All math is float32 whatever the storage dtype; table entries and flat indices are int64, a
span's accesses its own pointers plus int32 lanes ([Note: span pointers]). Each parameter's scalar
coefficients come from the table of ``coefficients.step_coefficients``. With ``ROUNDING`` the
bfloat16 stores of p and m round stochastically (``adam_mini_kernels/rounding.py``: the same
hash, so the same bits, as the other backends).

An int8 ``m`` (``state_dtype=torch.int8``; the kernels see it from ``m_ptr``'s dtype, so each
storage is a compiled variant of the same kernel) is dequantized on load and requantized on
store in the same pass: a program's span (a row, a tile) starts at a quantization chunk
boundary, so it holds whole chunks, takes each chunk's new absmax on chip and writes the chunk's
scale and codes (``_load_m``, ``_store_m``; the format of ``adam_mini_kernels/quantization.py``).

[Note: IEEE sqrt and division] On a GPU, Triton's ``tl.sqrt`` is the approximate
``sqrt.approx.ftz.f32`` (which also flushes denormals to zero) and float32 ``/`` the approximate
``div.full.f32`` (2 ulp); the interpreter computes both exactly, so no CPU run can tell. The
kernels use ``tl.sqrt_rn`` and ``tl.math.div_rn`` (correctly rounded, as the CUDA and PyTorch
backends are): they run once per block, or per element only in Adam tiles, so exactness costs
nothing measurable (tests/compile_triton_kernels.py checks that no approximate one is in the PTX).
"""

import triton
import triton.language as tl

from .. import launch_tables as T
from .. import rounding as R
from ..buffers import HP_BETA1, HP_BETA2, HP_EPS, HP_LR, HP_WEIGHT_DECAY, NUM_HPARAMS
from ..quantization import CODE_MAX, QBLOCK
from ..coefficients import (
    C_BC2_SQRT,
    C_BETA2,
    C_CLIP,
    C_DECAY,
    C_EPS,
    C_GRAD_SCALE,
    C_M_WEIGHT,
    C_ROUND_KEY,
    C_STEP_SIZE,
    C_V_WEIGHT,
    NUM_COEFFICIENTS,
)

# Triton kernels may only read globals that are constexpr: the column indices, as constexprs.
ROW_START, ROW_NUMEL, ROW_V, ROW_PARAM, ROW_SCALE, ROW_COLS = (
    tl.constexpr(c) for c in (T.ROW_START, T.ROW_NUMEL, T.ROW_V, T.ROW_PARAM, T.ROW_SCALE, T.ROW_COLS)
)
TILE_START, TILE_NUMEL, TILE_BLOCK, TILE_SCALE, TILE_COLS = (
    tl.constexpr(c) for c in (T.TILE_START, T.TILE_NUMEL, T.TILE_BLOCK, T.TILE_SCALE, T.TILE_COLS)
)
LB_V, LB_PARAM, LB_NUM_TILES, LB_FIRST_TILE, LB_NUMEL, LB_COLS = (
    tl.constexpr(c) for c in (T.LB_V, T.LB_PARAM, T.LB_NUM_TILES, T.LB_FIRST_TILE, T.LB_NUMEL, T.LB_COLS)
)
_C_DECAY = tl.constexpr(C_DECAY)
_C_STEP_SIZE = tl.constexpr(C_STEP_SIZE)
_C_BC2_SQRT = tl.constexpr(C_BC2_SQRT)
_C_EPS = tl.constexpr(C_EPS)
_C_BETA2 = tl.constexpr(C_BETA2)
_C_V_WEIGHT = tl.constexpr(C_V_WEIGHT)
_C_M_WEIGHT = tl.constexpr(C_M_WEIGHT)
_C_GRAD_SCALE = tl.constexpr(C_GRAD_SCALE)
_C_CLIP = tl.constexpr(C_CLIP)
_C_ROUND_KEY = tl.constexpr(C_ROUND_KEY)
_NUM_COEF = tl.constexpr(NUM_COEFFICIENTS)
_HP_LR, _HP_WEIGHT_DECAY, _HP_BETA1, _HP_BETA2, _HP_EPS, _NUM_HP = (
    tl.constexpr(c) for c in (HP_LR, HP_WEIGHT_DECAY, HP_BETA1, HP_BETA2, HP_EPS, NUM_HPARAMS)
)
_MIX_MUL1, _MIX_MUL2, _GOLDEN, _MOMENT_STREAM = (
    tl.constexpr(c) for c in (R.MIX_MUL1, R.MIX_MUL2, R.GOLDEN, R.MOMENT_STREAM)
)
_QBLOCK = tl.constexpr(QBLOCK)
_VEC = tl.constexpr(8)  # elements of an aligned span's unit: 16 bytes of 16-bit storage, 32 of float32
_CODE_MAX = tl.constexpr(float(CODE_MAX))
_RINT_MAGIC = tl.constexpr(1.5 * 2.0**23)  # x + this - this rounds |x| < 2^22 to nearest even


@triton.jit
def _mix32(x):
    """rounding.mix32 on uint32 (wrapping multiplies)."""
    x = x ^ (x >> 16)
    x = x * tl.full((), _MIX_MUL1, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full((), _MIX_MUL2, tl.uint32)
    return x ^ (x >> 15)


@triton.jit
def random_bits(key, offs):
    """rounding.random_bits for a salted uint32 ``key`` and int64 flat indices ``offs``."""
    lo = offs.to(tl.uint32)
    hi = (offs >> 32).to(tl.uint32)
    return _mix32(lo ^ (key + hi * tl.full((), _GOLDEN, tl.uint32))) >> 16


@triton.jit
def _store(span, lanes, mask, x, key, stream, start, ROUNDING: tl.constexpr):
    """Store float32 ``x`` at ``span + lanes`` in ``span``'s dtype (``span`` points at the span's
    first element, flat index ``start``): round to nearest even, or for bfloat16 with
    ``ROUNDING`` stochastically with the bits of rounding.random_bits(key, start + lanes, stream).

    [Note: bfloat16 stores] A bfloat16 store rounds by hand in the float32 bit pattern (adding
    16 random bits, or 0x7FFF plus the lowest kept bit for nearest-even) and then converts a value
    that bfloat16 holds exactly: Triton's CPU interpreter (what CI runs) truncates float32 to
    bfloat16 conversions, the GPU's rounds to nearest even; this way both store the same."""
    if span.dtype.element_ty == tl.bfloat16:
        raw = x.to(tl.uint32, bitcast=True)
        if ROUNDING:
            bits16 = random_bits(key ^ tl.full((), stream, tl.uint32), start + lanes)  # int64 flat indices
        else:
            bits16 = tl.full((), 0x7FFF, tl.uint32) + ((raw >> 16) & 1)
        rounded = ((raw + bits16) & tl.full((), 0xFFFF0000, tl.uint32)).to(tl.float32, bitcast=True)
        exponent = tl.full((), 0x7F800000, tl.uint32)
        x = tl.where((raw & exponent) != exponent, rounded, x)  # inf/NaN: as they are
    tl.store(span + lanes, x.to(span.dtype.element_ty), mask=mask)


@triton.jit
def _unscaled_grad(g, coef):
    """The gradient times AMP's multiplier, before clipping (see [Note: gradient multiplier] in
    coefficients.py)."""
    scale = tl.load(coef + _C_GRAD_SCALE)
    return tl.where(scale == 0, 0.0, g) * scale  # selected first: no inf * 0 is ever formed


@triton.jit
def _clipped(g, coef):
    """An unscaled gradient times the clip factor."""
    return g * tl.load(coef + _C_CLIP)


@triton.jit
def _new_v(v_ptr, v_index, sumsq, numel, coef):
    """v <- beta2 * v + (1 - beta2) * mean(g^2) for one block (mean 0 for an empty block), from the
    block's sum of squares of the unscaled (not yet clipped) gradient; stores and returns the new v.

    [Note: one v per program] Every thread of the program loads the old v and computes the new
    one; the store of a scalar is made by one thread. Without a barrier between them, a warp
    whose load comes late reads the v another warp stored already and updates its part of the
    block with v applied twice (a race the interpreter, one program at a time, cannot show):
    the barrier keeps every load before the store."""
    clip = tl.load(coef + _C_CLIP)
    sumsq = tl.where(tl.load(coef + _C_GRAD_SCALE) == 0, 0.0, sumsq) * clip * clip
    mean = tl.math.div_rn(sumsq, tl.maximum(numel, 1).to(tl.float32))
    v = tl.load(v_ptr + v_index) * tl.load(coef + _C_BETA2) + tl.load(coef + _C_V_WEIGHT) * mean
    tl.debug_barrier()
    tl.store(v_ptr + v_index, v)
    return v


@triton.jit
def _load_m(m_span, scales_span, lanes, mask):
    """m of a span as float32: an int8 m dequantized, code * its chunk's scale / 127
    (``scales_span``: the span's first chunk's scale)."""
    m = tl.load(m_span + lanes, mask=mask, other=0).to(tl.float32)
    if m_span.dtype.element_ty == tl.int8:
        scale = tl.load(scales_span + lanes // _QBLOCK, mask=mask, other=0.0)
        m = tl.math.div_rn(m * scale, _CODE_MAX)
    return m


@triton.jit
def _store_m(
    m_span, scales_span, lanes, mask, m, numel, key, changed, start,
    ROUNDING: tl.constexpr, SPAN: tl.constexpr, QCHUNK: tl.constexpr,
):
    """Store float32 ``m`` of a span of ``numel`` (<= SPAN) elements: in m's dtype, or for int8 m
    each chunk's absmax in its scale slot and rint(m * 127 / scale) as codes, only where ``changed``
    (the parameter had an update: [Note: idle int8 m] in quantization.py). QCHUNK is
    min(SPAN, QBLOCK): the span's chunks seen as the rows of a (SPAN / QCHUNK, QCHUNK) tile."""
    if m_span.dtype.element_ty == tl.int8:
        chunked = tl.reshape(m, (SPAN // QCHUNK, QCHUNK))
        # A NaN m makes its chunk's scale NaN: the magnitudes' bit patterns compared as integers
        # ([Note: NaN-propagating absmax] in csrc/kernels.cuh; tl.max of floats drops NaNs).
        magnitudes = tl.abs(chunked).to(tl.uint32, bitcast=True)  # lanes past the span hold m = 0
        absmax = tl.max(magnitudes, axis=1).to(tl.float32, bitcast=True)
        chunk = tl.arange(0, SPAN // QCHUNK)
        tl.store(scales_span + chunk, absmax, mask=tl.where(changed, chunk * QCHUNK < numel, False))
        divisor = tl.where(absmax == 0, 1.0, absmax)
        y = tl.math.div_rn(chunked * _CODE_MAX, divisor[:, None])
        codes = (y + _RINT_MAGIC) - _RINT_MAGIC
        codes = tl.where(codes == codes, tl.minimum(tl.maximum(codes, -_CODE_MAX), _CODE_MAX), 0.0)  # NaN: 0
        tl.store(m_span + lanes, tl.reshape(codes, (SPAN,)).to(tl.int8), mask=tl.where(changed, mask, False))
    else:
        _store(m_span, lanes, mask, m, key, _MOMENT_STREAM, start, ROUNDING)


@triton.jit
def _update_elements(
    p_span, m_span, scales_span, start, lanes, mask, numel, g, v, coef,
    ROUNDING: tl.constexpr, SPAN: tl.constexpr, QCHUNK: tl.constexpr,
):
    """m <- m + (1 - beta1) (g - m);  p <- p * decay - step_size * m / (sqrt(v) / bc2_sqrt + eps)
    over a span of ``numel`` elements (``lanes`` < SPAN from the span's first element, flat
    index ``start``, which ``p_span`` and ``m_span`` point at). ``g`` is scaled already; ``v`` is
    the block's value (scalar) or one per element.

    [Note: span pointers] A span's accesses are ``span + lanes``: the buffer's pointer moved to
    the span's first element once (``p_ptr + start``, a scalar) plus the int32 ``lanes``, as
    tile_sumsq loads, and its length ``numel`` (at most SPAN) is int32, so the masks are 32-bit
    compares. The int64 flat index ``start + lanes`` is formed only where stochastic rounding
    hashes it. The addresses and values are those of ``ptr + (start + lanes)`` with an int64
    offset per element, as before; that form kept a 64-bit offset, address and compare per
    element live in the masked fallback of [Note: aligned spans] (ptxas for sm_90: tile_step
    fp32 148 registers per thread, up to 174, one program of 8 warps per SM). The counts
    before and after, with [Note: fallback pieces]: bench/NOTES.md, Triton kernel v2.6."""
    h = tl.math.div_rn(tl.sqrt_rn(v), tl.load(coef + _C_BC2_SQRT)) + tl.load(coef + _C_EPS)
    step_size = tl.load(coef + _C_STEP_SIZE)
    # An idle parameter (no gradient this step) has step size 0: keep it still even if h is 0.
    scale = tl.where(step_size == 0, 0.0, tl.math.div_rn(step_size, h))
    m = _load_m(m_span, scales_span, lanes, mask)
    m_weight = tl.load(coef + _C_M_WEIGHT)
    m = m + m_weight * (g - m)
    p = tl.load(p_span + lanes, mask=mask, other=0.0).to(tl.float32)
    p = p * tl.load(coef + _C_DECAY) - scale * m
    key = tl.load(coef + _C_ROUND_KEY).to(tl.uint32, bitcast=True)
    _store_m(m_span, scales_span, lanes, mask, m, numel, key, m_weight != 0, start, ROUNDING, SPAN, QCHUNK)
    _store(p_span, lanes, mask, p, key, 0, start, ROUNDING)


@triton.jit
def _is_aligned(start, numel):
    """[Note: aligned spans] Triton vectorizes an access only where it can prove the alignment.
    The buffers' pointers are 16-byte aligned (the JIT specializes such arguments), but a span's
    first element and length come from a launch table at run time: unhinted, every load and store
    of p, g and m is a 32-bit (float32) or 16-bit (bfloat16) scalar access (seen in the PTX). So
    each program tests its span: where its first element and its length are multiples of _VEC
    elements (the rows and tiles of the usual shapes: parameters start at multiples of 32
    elements), it runs its body with the first element and length passed through ``_down``,
    whose result the compiler knows to be a multiple, and the accesses become 128-bit; otherwise
    the same body with them as they are (masked scalar accesses, any offset and length). The
    branch is uniform per program; both bodies are compiled (tests/test_triton_compile.py checks
    the vector accesses in the PTX)."""
    return ((start % _VEC) == 0) & ((numel % _VEC) == 0)


@triton.jit
def _down(x):
    """``x`` rounded down to a multiple of _VEC: ``x`` itself in an aligned span, computed so
    that the compiler sees the multiple (a ``tl.multiple_of`` hint would attach to the load of
    ``x`` and so hold in both branches of the test)."""
    return x // _VEC * _VEC


@triton.constexpr_function
def _piece(span, qchunk):
    """Lanes of a piece of the masked fallback ([Note: fallback pieces]): a quarter of the span,
    in whole quantization chunks of ``qchunk`` lanes (rows of at most 256 lanes: one piece)."""
    return max(span // 4, qchunk)


@triton.jit
def _update_pieces(
    p_ptr, g_ptr, m_ptr, scales, start, numel, v, coef,
    ROUNDING: tl.constexpr, SPAN: tl.constexpr, PIECE: tl.constexpr, QCHUNK: tl.constexpr,
):
    """_update_elements over a span of ``numel`` (<= SPAN) elements from flat index ``start``,
    in SPAN / PIECE pieces of PIECE lanes one after the other, each loading its own clipped g;
    ``scales``: the span's first chunk's scale.

    [Note: fallback pieces] A kernel gets the registers of its heaviest branch, and the masked
    fallback of [Note: aligned spans] was it by far (ptxas for sm_90: 137 against the aligned
    branch's 48 in tile_step fp32, compiled alone): p, g and m of 16 elements per thread
    loaded at once, each element with its own address and mask (the masks spilled from
    predicate to general registers), and, in the kernel with both branches, a layout
    conversion through shared memory before its stores (Triton's coalescing gives the
    fallback's loads the aligned accesses' 4 elements per thread, its stores 1). So the
    fallback updates its span in pieces of a quarter (``_piece``), one after the other: the
    same arithmetic per element, with the registers of a quarter. A piece holds whole
    quantization chunks, so an int8 m's chunks and their absmax are those of before. A row's
    sum of g^2 still loads the whole row (the same reduction, in the same layout, so the same
    sum), and its pieces load g again: the fallback reads g twice, the aligned spans (one
    piece, g kept on chip) are as they were."""
    for k in tl.static_range(0, SPAN, PIECE):
        lanes = tl.arange(0, PIECE)
        mask = lanes < numel - k
        first = start + k
        g = _clipped(_unscaled_grad(tl.load(g_ptr + first + lanes, mask=mask, other=0.0).to(tl.float32), coef), coef)
        _update_elements(
            p_ptr + first, m_ptr + first, scales + k // _QBLOCK, first, lanes, mask, numel - k, g, v, coef,
            ROUNDING, PIECE, QCHUNK,
        )


@triton.jit
def _row_step(
    p_ptr, g_ptr, m_ptr, scales_ptr, v_ptr, coef, row, start, numel,
    BLOCK: tl.constexpr, PIECE: tl.constexpr, QCHUNK: tl.constexpr, ROUNDING: tl.constexpr,
):
    lanes = tl.arange(0, BLOCK)
    mask = lanes < numel
    g = _unscaled_grad(tl.load(g_ptr + start + lanes, mask=mask, other=0.0).to(tl.float32), coef)
    v = _new_v(v_ptr, tl.load(row + ROW_V), tl.sum(g * g, axis=0), numel, coef)
    scales = scales_ptr + tl.load(row + ROW_SCALE)
    if PIECE == BLOCK:  # g stays on chip
        _update_elements(
            p_ptr + start, m_ptr + start, scales, start, lanes, mask, numel, _clipped(g, coef), v, coef,
            ROUNDING, BLOCK, QCHUNK,
        )
    else:
        _update_pieces(p_ptr, g_ptr, m_ptr, scales, start, numel, v, coef, ROUNDING, BLOCK, PIECE, QCHUNK)


@triton.jit
def rows_step_kernel(
    p_ptr, g_ptr, m_ptr, scales_ptr, v_ptr, coef_ptr, rows_ptr,
    BLOCK: tl.constexpr, QCHUNK: tl.constexpr, ROUNDING: tl.constexpr,
):
    """One program per small block of at most BLOCK elements: the whole step in one pass."""
    row = rows_ptr + tl.program_id(0).to(tl.int64) * ROW_COLS
    start = tl.load(row + ROW_START)
    numel = tl.load(row + ROW_NUMEL).to(tl.int32)  # at most BLOCK: [Note: span pointers]
    coef = coef_ptr + tl.load(row + ROW_PARAM) * _NUM_COEF
    if _is_aligned(start, numel):
        _row_step(p_ptr, g_ptr, m_ptr, scales_ptr, v_ptr, coef, row, _down(start),
                  _down(numel), BLOCK, BLOCK, QCHUNK, ROUNDING)
    else:
        _row_step(p_ptr, g_ptr, m_ptr, scales_ptr, v_ptr, coef, row, start, numel,
                  BLOCK, _piece(BLOCK, QCHUNK), QCHUNK, ROUNDING)


@triton.jit
def _sumsq(g_ptr, inv_scale_ptr, start, numel, HAS_AMP: tl.constexpr, TILE: tl.constexpr):
    lanes = tl.arange(0, TILE)
    g = tl.load(g_ptr + start + lanes, mask=lanes < numel, other=0.0).to(tl.float32)
    if HAS_AMP:
        g = g * tl.load(inv_scale_ptr)
    return tl.sum(g * g, axis=0)


@triton.jit
def tile_sumsq_kernel(g_ptr, inv_scale_ptr, tiles_ptr, partial_ptr, HAS_AMP: tl.constexpr, TILE: tl.constexpr):
    """Large blocks, phase 1: the sum of squares of each tile's gradient (unscaled with AMP's
    ``inv_scale``), into the tile's own slot."""
    tile_id = tl.program_id(0).to(tl.int64)
    tile = tiles_ptr + tile_id * TILE_COLS
    start = tl.load(tile + TILE_START)
    numel = tl.load(tile + TILE_NUMEL)
    if _is_aligned(start, numel):
        tl.store(partial_ptr + tile_id, _sumsq(g_ptr, inv_scale_ptr, _down(start), _down(numel), HAS_AMP, TILE))
    else:
        tl.store(partial_ptr + tile_id, _sumsq(g_ptr, inv_scale_ptr, start, numel, HAS_AMP, TILE))


@triton.jit
def block_sumsq_kernel(partial_ptr, blocks_ptr, sums_ptr, CHUNK: tl.constexpr):
    """Large blocks, phase 2: add a block's tile sums in a fixed order into its slot of ``sums``."""
    block_id = tl.program_id(0).to(tl.int64)
    block = blocks_ptr + block_id * LB_COLS
    first = tl.load(block + LB_FIRST_TILE)
    num_tiles = tl.load(block + LB_NUM_TILES)
    acc = tl.zeros((CHUNK,), dtype=tl.float32)
    for k in range(0, num_tiles, CHUNK):
        idx = k + tl.arange(0, CHUNK)
        acc += tl.load(partial_ptr + first + idx, mask=idx < num_tiles, other=0.0)
    tl.store(sums_ptr + block_id, tl.sum(acc, axis=0))


@triton.jit
def large_block_v_kernel(v_ptr, coef_ptr, sums_ptr, blocks_ptr):
    """Large blocks, phase 3: a block's v from its sum of g^2 (over all ranks for a block split
    across them), the mean taken over LB_NUMEL elements (the global block size)."""
    block_id = tl.program_id(0).to(tl.int64)
    block = blocks_ptr + block_id * LB_COLS
    coef = coef_ptr + tl.load(block + LB_PARAM) * _NUM_COEF
    _new_v(v_ptr, tl.load(block + LB_V), tl.load(sums_ptr + block_id), tl.load(block + LB_NUMEL), coef)


@triton.jit
def _tile_step(
    p_ptr, g_ptr, m_ptr, scales_ptr, v_ptr, coef_ptr, tile, block, start, numel,
    TILE: tl.constexpr, PIECE: tl.constexpr, ROUNDING: tl.constexpr,
):
    coef = coef_ptr + tl.load(block + LB_PARAM) * _NUM_COEF
    _update_pieces(
        p_ptr, g_ptr, m_ptr, scales_ptr + tl.load(tile + TILE_SCALE), start, numel, tl.load(v_ptr + tl.load(block + LB_V)),
        coef, ROUNDING, TILE, PIECE, _QBLOCK,
    )


@triton.jit
def tile_step_kernel(
    p_ptr, g_ptr, m_ptr, scales_ptr, v_ptr, coef_ptr, tiles_ptr, blocks_ptr, TILE: tl.constexpr, ROUNDING: tl.constexpr
):
    """Large blocks, phase 4: update m and p of one tile with its block's new v."""
    tile = tiles_ptr + tl.program_id(0).to(tl.int64) * TILE_COLS
    block = blocks_ptr + tl.load(tile + TILE_BLOCK) * LB_COLS
    start = tl.load(tile + TILE_START)
    numel = tl.load(tile + TILE_NUMEL).to(tl.int32)  # at most TILE: [Note: span pointers]
    if _is_aligned(start, numel):
        _tile_step(p_ptr, g_ptr, m_ptr, scales_ptr, v_ptr, coef_ptr, tile, block, _down(start),
                   _down(numel), TILE, TILE, ROUNDING)
    else:
        _tile_step(p_ptr, g_ptr, m_ptr, scales_ptr, v_ptr, coef_ptr, tile, block, start, numel,
                   TILE, _piece(TILE, _QBLOCK), ROUNDING)


@triton.jit
def _adam_tile_step(
    p_ptr, g_ptr, m_ptr, v_ptr, coef_ptr, tile, start, numel,
    TILE: tl.constexpr, PIECE: tl.constexpr, ROUNDING: tl.constexpr,
):
    coef = coef_ptr + tl.load(tile + ROW_PARAM) * _NUM_COEF
    v_span = v_ptr + tl.load(tile + ROW_V)  # per-element v offsets are not aligned: scalar accesses
    for k in tl.static_range(0, TILE, PIECE):  # [Note: fallback pieces]
        lanes = tl.arange(0, PIECE)
        mask = lanes < numel - k
        first = start + k
        g = _clipped(_unscaled_grad(tl.load(g_ptr + first + lanes, mask=mask, other=0.0).to(tl.float32), coef), coef)
        v = tl.load(v_span + k + lanes, mask=mask, other=0.0) * tl.load(coef + _C_BETA2) + tl.load(coef + _C_V_WEIGHT) * (g * g)
        tl.store(v_span + k + lanes, v, mask=mask)
        # Adam blocks never have an int8 m (quantization.int8_first_moment): no scales.
        m_span = m_ptr + first
        _update_elements(p_ptr + first, m_span, m_span, first, lanes, mask, 0, g, v, coef, ROUNDING, PIECE, PIECE)


@triton.jit
def adam_step_kernel(p_ptr, g_ptr, m_ptr, v_ptr, coef_ptr, tiles_ptr, TILE: tl.constexpr, ROUNDING: tl.constexpr):
    """Adam blocks: one v per element, a tile of consecutive elements of one parameter."""
    tile = tiles_ptr + tl.program_id(0).to(tl.int64) * ROW_COLS
    start = tl.load(tile + ROW_START)
    numel = tl.load(tile + ROW_NUMEL).to(tl.int32)  # at most TILE: [Note: span pointers]
    if _is_aligned(start, numel):
        _adam_tile_step(p_ptr, g_ptr, m_ptr, v_ptr, coef_ptr, tile, _down(start),
                        _down(numel), TILE, TILE, ROUNDING)
    else:
        _adam_tile_step(p_ptr, g_ptr, m_ptr, v_ptr, coef_ptr, tile, start, numel, TILE, _piece(TILE, 1), ROUNDING)


@triton.jit
def _pow_int(base, t):
    """base ** t elementwise, float64 base, int64 t >= 0: binary exponentiation in 63 rounds."""
    result = tl.full(base.shape, 1.0, tl.float64)
    for _ in range(63):
        result = tl.where((t & 1) == 1, result * base, result)
        base = base * base
        t = t >> 1
    return result


# The JIT specializes an int argument by its value (1 becomes a constexpr, a multiple of 16 another
# variant): a seed of 1 would then fail to compile (``round_seed.to``) and the parameter count
# would recompile the kernel. Neither is worth a variant: both stay plain int32 arguments.
@triton.jit(do_not_specialize=["num_params", "round_seed"])
def step_coefficients_kernel(
    steps_ptr, active_ptr, hp_ptr, coef_ptr, inv_scale_ptr, found_inf_ptr, clip_ptr, num_params, round_seed,
    HAS_ACTIVE: tl.constexpr, HAS_AMP: tl.constexpr, HAS_CLIP: tl.constexpr, ROUNDING: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Advance each parameter's step counter (those flagged in ``active``; none when AMP's
    ``found_inf`` is set) and write its row of the float32 coefficient table, computed in float64
    (see coefficients.py), with the stochastic rounding keys of rounding.round_keys."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < num_params
    t = tl.load(steps_ptr + i, mask=mask, other=0)
    if HAS_ACTIVE:
        on = tl.load(active_ptr + i, mask=mask, other=0) != 0
    else:
        on = mask
    grad_scale = 1.0
    if HAS_AMP:
        found_inf = tl.load(found_inf_ptr) + tl.zeros((BLOCK,), dtype=tl.float32)  # as a block
        on = on & (found_inf == 0)
        grad_scale = tl.load(inv_scale_ptr).to(tl.float64)
    clip = 1.0
    if HAS_CLIP:
        clip = tl.load(clip_ptr)
    t = t + on.to(tl.int64)
    tl.store(steps_ptr + i, t, mask=mask)

    hp = hp_ptr + i.to(tl.int64) * _NUM_HP
    lr = tl.load(hp + _HP_LR, mask=mask, other=0.0)
    wd = tl.load(hp + _HP_WEIGHT_DECAY, mask=mask, other=0.0)
    beta1 = tl.load(hp + _HP_BETA1, mask=mask, other=0.0)
    beta2 = tl.load(hp + _HP_BETA2, mask=mask, other=0.0)
    eps = tl.load(hp + _HP_EPS, mask=mask, other=0.0)
    decay = tl.where(wd > 0, 1 - lr * wd, 1.0)
    t_pos = tl.maximum(t, 1)  # t is 0 only for idle, never-stepped params (masked below): no 0/0
    step_size = lr / (1 - _pow_int(beta1, t_pos))
    bc2_sqrt = tl.sqrt(1 - _pow_int(beta2, t_pos))
    # An idle parameter gets coefficients that leave it exactly as it is.
    row = coef_ptr + i.to(tl.int64) * _NUM_COEF
    tl.store(row + _C_DECAY, tl.where(on, decay, 1.0).to(tl.float32), mask=mask)
    tl.store(row + _C_STEP_SIZE, tl.where(on, step_size, 0.0).to(tl.float32), mask=mask)
    tl.store(row + _C_BC2_SQRT, tl.where(on, bc2_sqrt, 1.0).to(tl.float32), mask=mask)
    tl.store(row + _C_EPS, eps.to(tl.float32), mask=mask)
    tl.store(row + _C_BETA2, tl.where(on, beta2, 1.0).to(tl.float32), mask=mask)
    tl.store(row + _C_V_WEIGHT, tl.where(on, 1 - beta2, 0.0).to(tl.float32), mask=mask)
    tl.store(row + _C_M_WEIGHT, tl.where(on, 1 - beta1, 0.0).to(tl.float32), mask=mask)
    tl.store(row + _C_GRAD_SCALE, tl.where(on, grad_scale, 0.0).to(tl.float32), mask=mask)
    tl.store(row + _C_CLIP, clip + tl.zeros((BLOCK,), dtype=tl.float32), mask=mask)
    key = tl.zeros((BLOCK,), dtype=tl.uint32)
    if ROUNDING:
        key = _mix32(_mix32(t.to(tl.uint32)) + round_seed.to(tl.uint32))
    tl.store(row + _C_ROUND_KEY, key.to(tl.float32, bitcast=True), mask=mask)
