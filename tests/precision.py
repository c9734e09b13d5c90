"""How close a fused backend's run must be to the torch backend's, per storage dtype.

float32: the two differ by summation order and FMA contraction only: 2e-6 relative after a few
steps (``max |a - b| / max |a|`` per tensor, ``grad_stream.max_rel_err``).

bfloat16 / float16: the float32 results of the two can differ in their last bit, which flips the
rounding of the stored value (p or m) by one unit in the last place where it sits right at a
rounding boundary, rarely. Measured (odd-size set and nanoGPT tree, 3 steps, seeds 9, 10, 11, 19,
31, Triton interpreter and CUDA host emulator): at most 20 of 60631 parameters differ, by at most
4.9e-4 (bf16) / 4.2e-4 (fp16) of the tensor's largest value. So every parameter must be within
one ulp of its tensor's largest value (``ULP``: 2^-7 bf16, 2^-10 fp16, as far as one flip can
reach) and at most ``FLIPS_PER_STEP`` of all elements may differ per step. A kernel that drops
weight decay (lr * wd = 1e-3 per step) is off by 1.2e-2 (bf16) / 2.9e-3 (fp16) of the largest
value and changes 31 % (bf16) / 84 % (fp16) of the elements: it fails both checks (the old
tolerances, 4e-2 / 5e-3, let it pass).
"""

from __future__ import annotations

import torch

from grad_stream import max_rel_err

FP32_TOL = 2e-6
# One unit in the last place at 1.0, relative: a stored x is within ULP * |x| of its neighbours.
ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
# Measured <= 1.1e-4 per step on the CPU (20 of 60631 elements in 3 steps); headroom for a GPU,
# where FMA contraction can make the float32 results differ by a few ulps.
FLIPS_PER_STEP = 2e-3
# v is float32 in every run and a function of the gradients only (sums of squares taken in
# different orders): 1e-5 as for float32 (measured <= 1.6e-6), 3e-5 in a group with int8 m (the
# torch backend's int8 path sums differently: measured up to 7.3e-6, an 8189-element row).
V_TOL = {False: 1e-5, True: 3e-5}
M_TOL = {torch.float32: 10 * FP32_TOL, **ULP}
INT8_CODES_DIFFER = 5e-3  # codes within one, at most this share of them (as tests/test_int8_fused.py)


def assert_runs_close(sets, opts, steps):
    """The second run of ``sets``/``opts`` against the first (the torch backend) after ``steps``
    steps, by storage dtype; see the module docstring."""
    differ = total = 0
    for a, b in zip(*sets):
        assert a.dtype == b.dtype
        err = max_rel_err(a, b)
        tol = ULP.get(a.dtype, FP32_TOL)
        assert err <= tol, (tuple(a.shape), a.dtype, err, tol)
        if a.dtype in ULP:
            differ += int((a != b).sum())
            total += a.numel()
    assert differ <= FLIPS_PER_STEP * steps * total, (differ, total)
    assert len(opts[0]._flat) == len(opts[1]._flat)
    for fa, fb in zip(opts[0]._flat, opts[1]._flat):
        assert torch.equal(fa.steps, fb.steps)
        assert max_rel_err(fa.v, fb.v) <= V_TOL[fa.m.dtype == torch.int8]
        assert fa.m.dtype == fb.m.dtype
        if fa.m.dtype == torch.int8:
            codes = (fa.m.int() - fb.m.int()).abs()
            assert codes.numel() == 0 or int(codes.max()) <= 1
            assert int((codes > 0).sum()) <= INT8_CODES_DIFFER * codes.numel()
            assert max_rel_err(fa.m_scales, fb.m_scales) <= 1e-6
        else:
            assert max_rel_err(fa.m.float(), fb.m.float()) <= M_TOL[fa.m.dtype]
