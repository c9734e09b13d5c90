"""Every Triton kernel configuration compiles to cubin for the A100 (sm_80) and H100 (sm_90),
without a GPU (see tests/compile_triton_kernels.py): catches what the CPU interpreter cannot,
such as type errors and constructs the compiler rejects, and checks that the launch options pin
FMA contraction ([Note: FMA contraction] in triton_kernels/launch.py): Triton's default is turned
off here, as Triton 3.10 will have it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_kernels_compile_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "0"
    script = Path(__file__).resolve().parent / "compile_triton_kernels.py"
    result = subprocess.run([sys.executable, str(script), "80", "90"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.startswith("compiled "), result.stdout
