"""Packaging: the Triton kernels live under this package's namespace, not as a top-level
``triton_kernels`` (that name belongs to another distribution), and setup.py can skip the CUDA
build with a one-line notice. Paths come from the package's own location, so these checks work
in any checkout."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import adam_mini_kernels

PACKAGE_DIR = Path(adam_mini_kernels.__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
SETUP_PY = REPO_ROOT / "setup.py"
DISTRIBUTION = "adam-mini-kernels"


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP", "PYTHONSAFEPATH")}
    env.update(extra)
    return env


def test_triton_kernels_is_a_subpackage():
    module = importlib.import_module("adam_mini_kernels.triton_kernels")
    assert module.__name__ == "adam_mini_kernels.triton_kernels"
    assert hasattr(module, "__path__"), "should be a package (a folder of kernels)"
    assert module.__package__ == "adam_mini_kernels.triton_kernels"
    assert "triton_kernels" not in sys.modules or sys.modules["triton_kernels"] is not module
    assert getattr(adam_mini_kernels, "triton_kernels", module) is module


def test_no_top_level_triton_kernels_from_this_project(tmp_path):
    """Outside the source tree (as any user is), ``import triton_kernels`` must not find ours."""
    code = (
        "import importlib.util, json\n"
        "spec = importlib.util.find_spec('triton_kernels')\n"
        "locations = [] if spec is None else [spec.origin or ''] + list(spec.submodule_search_locations or [])\n"
        "try:\n"
        "    import adam_mini_kernels.triton_kernels as ours\n"
        "    paths = list(ours.__path__)\n"
        "except ModuleNotFoundError:\n"
        "    paths = None\n"
        "print(json.dumps({'locations': locations, 'ours': paths}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    if found["ours"] is None:
        pytest.skip("adam_mini_kernels is importable only from the source tree here (not installed)")
    ours = [Path(p).resolve() for p in found["ours"]]
    assert ours, "adam_mini_kernels.triton_kernels should import from a clean directory"
    for location in found["locations"]:
        if not location:
            continue
        resolved = Path(location).resolve()
        for root in ours + [REPO_ROOT]:
            assert root != resolved and root not in resolved.parents, (
                f"a top-level 'triton_kernels' resolves into this project ({resolved})"
            )


def test_distribution_declares_no_top_level_triton_kernels():
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("adam-mini-kernels is not installed as a distribution here")
    top_level = dist.read_text("top_level.txt")
    if top_level is not None:
        names = set(top_level.split())
        assert "triton_kernels" not in names
    for file in dist.files or []:
        parts = Path(str(file)).parts
        assert parts[0] != "triton_kernels", f"installed top-level file {file}"
        assert not str(file).startswith("triton_kernels."), f"installed top-level module {file}"


@pytest.mark.skipif(not SETUP_PY.exists(), reason="not a source checkout (no setup.py next to the package)")
def test_setup_skips_cuda_build_with_one_line_notice():
    result = subprocess.run(
        [sys.executable, str(SETUP_PY), "--name"],
        cwd=REPO_ROOT,
        env=_clean_env(ADAM_MINI_SKIP_CUDA_BUILD="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == DISTRIBUTION
    notice = [line for line in result.stderr.splitlines() if "CUDA" in line]
    assert len(notice) == 1, result.stderr
    assert "ADAM_MINI_SKIP_CUDA_BUILD" in notice[0]
    assert "not building" in notice[0].lower() or "skip" in notice[0].lower()


def _torch_has_cuda() -> bool:
    import torch

    return torch.version.cuda is not None  # a CUDA build, GPU or not


@pytest.mark.skipif(not SETUP_PY.exists(), reason="not a source checkout (no setup.py next to the package)")
def test_setup_installs_triton_kernels_under_the_package_namespace():
    """setup.py's package list, read without building anything."""
    code = (
        "import runpy, setuptools, json, sys\n"
        "captured = {}\n"
        "setuptools.setup = lambda **kw: captured.update(kw)\n"
        "sys.argv = ['setup.py', '--name']\n"
        f"runpy.run_path({str(SETUP_PY)!r}, run_name='__main__')\n"
        "print(json.dumps({'packages': captured.get('packages'), 'package_dir': captured.get('package_dir')}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=_clean_env(ADAM_MINI_SKIP_CUDA_BUILD="1"),
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout.strip().splitlines()[-1])
    packages = config["packages"] or []
    assert "adam_mini_kernels" in packages
    assert "adam_mini_kernels.triton_kernels" in packages
    assert all(p == "adam_mini_kernels" or p.startswith("adam_mini_kernels.") for p in packages), packages


@pytest.mark.skipif(not _torch_has_cuda(),
                    reason="a CPU-only torch: torch.utils.cpp_extension finds no CUDA_HOME at all (setup.py skips the build)")
def test_setup_finds_nvcc_on_path_when_cuda_home_has_none(tmp_path):
    """No nvcc under CUDA_HOME, one on PATH (a symlink into a toolkit, as distributions install
    it): setup.py builds the extension with that toolkit as CUDA_HOME, the rule by which
    tests/test_cuda_backend.py expects the extension (it skipped the build, and the test then
    reported the extension missing)."""
    toolkit = tmp_path / "cuda-x"
    for folder in ("bin", "include", "lib64"):
        (toolkit / folder).mkdir(parents=True)
    (toolkit / "include" / "cuda_runtime.h").write_text("")
    (toolkit / "bin" / "nvcc").write_text("")
    (toolkit / "bin" / "nvcc").chmod(0o755)
    on_path = tmp_path / "bin"
    on_path.mkdir()
    (on_path / "nvcc").symlink_to(toolkit / "bin" / "nvcc")
    code = (
        "import json, os, runpy, sys, setuptools, torch\n"
        "captured = {}\n"
        "setuptools.setup = lambda **kw: captured.update(kw)\n"
        "sys.argv = ['setup.py', '--name']\n"
        f"runpy.run_path({str(SETUP_PY)!r}, run_name='__main__')\n"
        "print(json.dumps({'ext': [e.name for e in captured.get('ext_modules', [])], 'cuda_home': os.environ.get('CUDA_HOME')}))\n"
    )
    env = _clean_env(CUDA_HOME=str(tmp_path / "no-cuda-here"), PATH=f"{on_path}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}/usr/bin:/bin")
    env = {k: v for k, v in env.items() if k not in ("ADAM_MINI_SKIP_CUDA_BUILD", "CUDA_PATH")}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found == {"ext": ["adam_mini_kernels._C"], "cuda_home": str(toolkit)}, (found, result.stderr[-2000:])
