"""The 8-bit first-moment format (adam_mini_kernels/quantization.py, issue 10's reference):
block-wise absmax codes, both code maps, nearest and stochastic rounding; and the format study
script in its smoke mode."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adam_mini_kernels.quantization import CODE_MAX, QBLOCK, dequantize, quantize, to_codes

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("code_map", ["linear", "sqrt"])
def test_round_trip_error_is_within_half_a_step(code_map):
    """Odd row lengths (a partial last quantization block), a zero row, a row of one element."""
    gen = torch.Generator().manual_seed(0)
    for shape in [(3, 700), (1, 1), (4, QBLOCK), (2, 5)]:
        x = torch.randn(shape, generator=gen) * torch.logspace(-6, 0, shape[1])
        x[0] = 0.0 if shape[0] > 1 else x[0]
        codes, scales = quantize(x, code_map)
        assert codes.dtype == torch.int8 and codes.shape == x.shape
        assert scales.shape == (shape[0], -(-shape[1] // QBLOCK))
        y = dequantize(codes, scales, code_map)
        per_element_scale = scales.repeat_interleave(QBLOCK, dim=1)[:, : shape[1]]
        if code_map == "linear":  # uniform steps of scale / 127: error at most half a step
            bound = per_element_scale / CODE_MAX / 2
        else:  # y = s (c/127)^2: a step near |x| is 2 sqrt(|x| s) / 127 (+ s / 127^2)
            bound = (x.abs() * per_element_scale).sqrt() / CODE_MAX + per_element_scale / CODE_MAX**2
        assert ((y - x).abs() <= bound * 1.0001 + 1e-30).all(), (shape, code_map)
        # The block's largest magnitude is exact (it is the scale).
        assert torch.allclose(y.abs().amax(), x.abs().amax())


def test_sqrt_codes_are_finer_near_zero():
    x = torch.cat([torch.full((1, 255), 1e-3), torch.ones(1, 1)], dim=1)
    lin = dequantize(*quantize(x, "linear"), "linear")
    sq = dequantize(*quantize(x, "sqrt"), "sqrt")
    assert (lin[0, :255] == 0).all()  # 1e-3 of the block's max is below half a linear step
    assert ((sq[0, :255] - 1e-3).abs() < 2e-4).all()


@pytest.mark.parametrize("code_map", ["linear", "sqrt"])
def test_stochastic_codes_are_unbiased_in_the_code_domain(code_map):
    n = 100_000
    x = torch.full((1, n), 0.3)
    x[0, ::QBLOCK] = 1.0  # every quantization block has the same scale, 1
    random = torch.rand(x.shape, generator=torch.Generator().manual_seed(1))
    codes, _ = quantize(x, code_map, random=random)
    y = 0.3 if code_map == "linear" else 0.3**0.5
    target = y * CODE_MAX
    mask = torch.ones(n, dtype=torch.bool)
    mask[::QBLOCK] = False
    got = codes[0, mask].double()
    assert set(got.unique().tolist()) <= {float(int(target)), float(int(target) + 1)}
    assert abs(got.mean().item() - target) < 4 * 0.5 / (mask.sum().item() ** 0.5)


@pytest.mark.parametrize("code_map", ["linear", "sqrt"])
def test_non_finite_values_make_their_chunk_decode_to_nan(code_map):
    """[Note: non-finite int8 m]: a chunk holding a NaN gets a NaN scale, one holding an inf an inf
    scale; both get codes 0 and decode to NaN throughout; the other chunks are untouched."""
    x = torch.randn(2, 3 * QBLOCK, generator=torch.Generator().manual_seed(3))
    x[0, 5], x[1, 2 * QBLOCK + 7] = float("nan"), -float("inf")
    codes, scales = quantize(x, code_map)
    assert scales[0, 0].isnan() and scales[1, 2] == float("inf")
    bad = torch.zeros_like(scales, dtype=torch.bool)
    bad[0, 0] = bad[1, 2] = True
    assert scales[~bad].isfinite().all()
    y = dequantize(codes, scales, code_map).view(2, 3, QBLOCK)
    assert torch.equal(codes.view(2, 3, QBLOCK)[bad], torch.zeros(2, QBLOCK, dtype=torch.int8))
    assert y[bad].isnan().all() and y[~bad].isfinite().all()


def test_codes_are_clamped_and_nan_codes_are_zero():
    """The rule both the reference and the torch backend's requantizer apply: a NaN code is 0 as a
    float, before any cast to int8 (whose value for a NaN is undefined: 0 on some CPUs only)."""
    y = torch.tensor([float("nan"), 200.0, -float("inf"), 3.0, -127.0])
    assert torch.equal(to_codes(y), torch.tensor([0.0, 127.0, -127.0, 3.0, -127.0]))


def test_bad_code_map():
    with pytest.raises(ValueError, match="code_map"):
        quantize(torch.zeros(1, 4), "log")


def test_format_study_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "int8_m_study.py"), "--quick", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = tmp_path.glob("*.json")
    results = json.loads(path.read_text())["results"]
    assert set(results) == {"float32", "linear-nearest", "linear-stochastic", "sqrt-nearest", "sqrt-stochastic"}
    for name, r in results.items():
        assert r["final_val"] > 0
        assert r["quantized_fraction"] == 0 if name == "float32" else 0.9 < r["quantized_fraction"] <= 1.0
    assert path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dequantize_on_cuda_is_correctly_rounded_as_on_the_cpu():
    """``c * scale / 127`` as the kernels compute it (a true division): ATen's CUDA division by a
    Python number multiplies by its reciprocal instead, one ulp off for some 5 % of values, which
    would make the torch backend's int8 m (and a checkpoint's dequantized m) differ from the
    fused kernels' on a GPU."""
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(-127, 128, (64, 1000), generator=gen, dtype=torch.int8)
    scales = torch.rand(64, 4, generator=gen) * 10
    on_cpu = dequantize(codes, scales)
    assert torch.equal(dequantize(codes.cuda(), scales.cuda()).cpu(), on_cpu)
    reciprocal = (codes.float().reshape(64, 4, 250) * scales[..., None] * (1 / 127)).reshape(64, 1000)
    assert not torch.equal(reciprocal, on_cpu)  # the values tell the two apart
