"""A few steps of every kind of work of a fused backend (``cuda`` or ``triton``, the first
argument), small, for NVIDIA compute-sanitizer.

Rows (aligned and not, a row of one element, zero-length rows, rows at exactly ROW_MAX, rows of
aligned lengths at unaligned starts), large blocks (three phases, an unaligned last tile, tiles of
aligned lengths at unaligned starts), Adam tiles (v on a 16-byte boundary and not), in
float32, bfloat16 and float16 (also with stochastic rounding, float32 state, int8 state and
clipping), with some gradients None; then every result is checked finite.
Run from the repository root, after building the extension:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck  --error-exitcode 1 python tests/gpu/sanitize_step.py cuda
    compute-sanitizer --tool racecheck --error-exitcode 1 python tests/gpu/sanitize_step.py cuda
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool initcheck --error-exitcode 1 python tests/gpu/sanitize_step.py cuda
    compute-sanitizer --tool synccheck --error-exitcode 1 python tests/gpu/sanitize_step.py cuda

(memcheck and racecheck also with ``triton``; ``tests/gpu/run_suite.sh`` runs these six,
``tests/gpu/device_session.sh`` as many as its time allows. Without the caching allocator, for
memcheck and initcheck: inside its cached segments they see no access out of a tensor's bounds
and no read of unwritten bytes.) Exit status 0 and
"sanitize_step: ok" when clean. (The extension is built with -lineinfo, so reports name lines of
csrc/kernels.cuh.)
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/

from grad_stream import clone_named  # noqa: E402
from test_cuda_backend import _sectioned_named  # noqa: E402  (the parameter set covering every path)

from adam_mini_kernels import AdamMini  # noqa: E402

STEPS = 3


def main(backend: str, device: str = "cuda") -> int:
    """``device="cpu"``: the same steps on Triton's CPU interpreter (``TRITON_INTERPRET=1``), the
    CPU test that this script still runs (tests/test_device_session.py); no sanitizer there."""
    if device == "cuda" and not torch.cuda.is_available():
        print("sanitize_step: needs a CUDA GPU", file=sys.stderr)
        return 2

    configs = [(torch.float32, {}), (torch.bfloat16, {}), (torch.float16, {}),
               (torch.bfloat16, {"stochastic_rounding": True}), (torch.float16, {"state_dtype": torch.float32}),
               (torch.float32, {"max_grad_norm": 0.1}), (torch.float32, {"state_dtype": torch.int8}),
               (torch.bfloat16, {"state_dtype": torch.int8, "stochastic_rounding": True}),
               (torch.float32, {"max_grad_norm": 0.1, "amp_scale": 2.0**20})]
    for dtype, options in configs:
        options = dict(options)
        amp_scale = options.pop("amp_scale", None)  # AMP's tensors, as GradScaler sets them
        named, dims, layouts = _sectioned_named()
        params = clone_named(named, device=device, dtype=dtype)
        opt = AdamMini(params, backend=backend, lr=1e-2, weight_decay=0.1, verbose=False, **dims, **options)
        opt.layout_overrides.update(layouts)
        if amp_scale is not None:
            opt.grad_scale, opt.found_inf = torch.full((), amp_scale, device=device), torch.zeros((), device=device)
        gen = torch.Generator(device=device).manual_seed(0)
        for step in range(STEPS):
            for i, (_, p) in enumerate(params):
                g = torch.randn(p.shape, generator=gen, device=device) * (amp_scale or 1.0)
                p.grad = None if (i + step) % 4 == 0 else g.to(dtype)
            opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        counts = {"row classes": 0, "tiles": 0, "Adam tiles": 0}
        for group in opt._flat:  # one group; two with int8 state (int8 m and float m)
            tables = group.cache["launch_tables"]
            counts["row classes"] += len(tables.row_classes)
            counts["tiles"] += 0 if tables.tiles is None else tables.tiles.shape[0]
            counts["Adam tiles"] += 0 if tables.adam is None else tables.adam.shape[0]
            for name, t in (("p", group.param_buffer), ("m", group.m), ("v", group.v), ("m_scales", group.m_scales)):
                assert t is None or torch.isfinite(t.float()).all(), f"{dtype}: non-finite values in {name}"
            assert group.m_scales is None or group.cache["launch_tables"].tiles is not None, "int8 large blocks"
        assert counts["tiles"] and counts["Adam tiles"] and counts["row classes"] >= 3, counts
        print(f"sanitize_step: {backend} {dtype} {options} amp_scale={amp_scale} ({STEPS} steps, {counts})")
    print(f"sanitize_step: {backend} ok")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("cuda", "triton"):
        sys.exit("usage: sanitize_step.py cuda|triton")
    sys.exit(main(sys.argv[1]))
