"""Build and install adam-mini-kernels.

The Python package is ``adam_mini_kernels``; the ``triton_kernels/`` folder is installed inside it
as ``adam_mini_kernels.triton_kernels`` (a top-level ``triton_kernels`` belongs to another
distribution). The CUDA extension ``adam_mini_kernels._C`` is built from ``csrc/`` when that is
possible (a CUDA build of torch, and nvcc found under CUDA_HOME/bin or else on PATH) and
skipped with a one-line notice otherwise, or when ``ADAM_MINI_SKIP_CUDA_BUILD=1``. Install with
``pip install --no-build-isolation -e .`` so that the extension compiles against the torch
already installed.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

EXTENSION = "adam_mini_kernels._C"


def _skip(reason):
    print(f"adam-mini-kernels: not building the CUDA extension: {reason}", file=sys.stderr)
    return {}


def _toolkit_root(nvcc):
    """The CUDA toolkit folder of the ``nvcc`` found on PATH: the folder above its bin/, through
    symlinks (e.g. /usr/bin/nvcc -> /usr/local/cuda-13.0/bin/nvcc) where that holds the headers,
    else as found (torch.utils.cpp_extension's own rule)."""
    resolved = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.exists(os.path.join(resolved, "include", "cuda_runtime.h")):
        return resolved
    return os.path.dirname(os.path.dirname(nvcc))


def _find_cuda_home():
    """(CUDA_HOME, None), or (None, the reason) when no nvcc is found. nvcc under CUDA_HOME/bin
    (default /usr/local/cuda), else nvcc on PATH: the same rule as tests/test_cuda_backend.py's
    ``_nvcc_found``, so that the tests expect the extension exactly when it is built. CUDA_HOME is
    then set for torch.utils.cpp_extension, which reads CUDA_HOME (or CUDA_PATH) before PATH: a
    CUDA_HOME without nvcc would otherwise win over the nvcc on PATH."""
    cuda_home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    if os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return cuda_home, None
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None, f"nvcc not found under CUDA_HOME={cuda_home} nor on PATH"
    root = _toolkit_root(nvcc)
    print(f"adam-mini-kernels: no nvcc under CUDA_HOME={cuda_home}; using {nvcc} on PATH, CUDA_HOME={root}",
          file=sys.stderr)
    return root, None


def _cuda_extension():
    """setup() keywords that build the CUDA extension, or {} (with a notice) when it cannot be."""
    if os.environ.get("ADAM_MINI_SKIP_CUDA_BUILD") == "1":
        return _skip("ADAM_MINI_SKIP_CUDA_BUILD=1")
    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
    if not sources:
        return _skip("no CUDA sources in csrc/ yet")
    try:
        import torch
    except ImportError:
        return _skip("torch is not installed (install it first, then use --no-build-isolation)")
    if torch.version.cuda is None:
        return _skip(f"torch {torch.__version__} is a CPU-only build")
    cuda_home, reason = _find_cuda_home()
    if cuda_home is None:
        return _skip(reason)
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    # A100 and H100/H200 machine code, plus sm_90 PTX that the driver compiles at load time for
    # newer GPUs (no machine code of theirs here). The PTX costs about a second of build time
    # (it is nvcc's intermediate anyway) and ~150 kB of the .so (measured on 2 cores, nvcc 13.0).
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    # No -std flag: torch.utils.cpp_extension adds the standard its own headers need (C++20 from
    # torch 2.10 on; an explicit -std=c++17 fails on them). No --use_fast_math: the kernels rely
    # on correctly rounded sqrt/division and on denormals being kept (see [Note: float32 math,
    # IEEE sqrt and division] in csrc/kernels.cuh). --fmad=true is nvcc's default, pinned: the
    # contraction into fused multiply-adds is part of the kernels' rounding, the same as the Triton
    # backend's ([Note: FMA contraction] in triton_kernels/launch.py). -lineinfo costs nothing at
    # run time and lets compute-sanitizer and profilers name source lines.
    ext = CUDAExtension(
        EXTENSION,
        sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--fmad=true", "-lineinfo"]},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(
    name="adam-mini-kernels",
    version="0.1.0",
    description="Adam-mini optimizer for PyTorch with fused CUDA and Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["adam_mini_kernels", "adam_mini_kernels.triton_kernels"],
    package_dir={"adam_mini_kernels": "adam_mini_kernels", "adam_mini_kernels.triton_kernels": "triton_kernels"},
    install_requires=["torch>=2.11"],
    extras_require={"test": ["pytest", "adam-mini==1.1.1", "transformers"]},
    **_cuda_extension(),
)
